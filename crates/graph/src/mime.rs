//! Reading what Graph needs from a message without copying it: the header
//! recipients, and which attachments to take out of a message too large for
//! one request (as byte ranges of the original, so the rest stays identical).

use std::collections::HashSet;
use std::ops::Range;

use mail_parser::{Address, Encoding, Message, MessageParser, MimeHeaders};

/// Where an envelope recipient goes on the draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    To,
    Cc,
    Bcc,
}

/// The addresses of the `To:`, `Cc:` and `Bcc:` fields, lowercased.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct HeaderRecipients {
    to: HashSet<String>,
    cc: HashSet<String>,
    bcc: HashSet<String>,
}

impl HeaderRecipients {
    /// Parses only the top-level header; `None` if there is none.
    pub(crate) fn parse(mime: &[u8]) -> Option<Self> {
        let message = parser().parse_headers(mime)?;
        Some(HeaderRecipients {
            to: addresses(message.all_to()),
            cc: addresses(message.all_cc()),
            bcc: addresses(message.all_bcc()),
        })
    }

    /// Whether Graph, reading the header, would deliver to exactly `envelope`.
    pub(crate) fn matches(&self, envelope: &[String]) -> bool {
        let envelope: HashSet<String> = envelope.iter().map(|a| a.to_ascii_lowercase()).collect();
        let header: HashSet<&String> = self.to.iter().chain(&self.cc).chain(&self.bcc).collect();
        header.len() == envelope.len() && envelope.iter().all(|a| header.contains(a))
    }

    /// The field an envelope recipient keeps: the one it has in the header,
    /// else Bcc (envelope-only recipients must not be disclosed).
    pub(crate) fn field_of(&self, address: &str) -> Field {
        let address = address.to_ascii_lowercase();
        if self.to.contains(&address) {
            Field::To
        } else if self.cc.contains(&address) {
            Field::Cc
        } else {
            Field::Bcc
        }
    }
}

fn addresses<'a, 'x: 'a>(lists: impl Iterator<Item = &'a Address<'x>>) -> HashSet<String> {
    lists
        .flat_map(|list| list.iter())
        .filter_map(|addr| addr.address())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn parser() -> MessageParser {
    MessageParser::new()
        .with_mime_headers()
        .with_address_headers()
}

/// Base64 length of `n` bytes (no line breaks, padded).
pub(crate) fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// An attachment taken out of the MIME, to be added to the draft on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detached {
    pub(crate) name: String,
    pub(crate) content_type: String,
    pub(crate) content_id: Option<String>,
    pub(crate) inline: bool,
    /// The encoded body in the original message.
    body: Range<usize>,
    encoding: Encoding,
    /// What is removed from the message: the delimiter line before the part
    /// and the part itself; the following delimiter stays.
    cut: Range<usize>,
}

impl Detached {
    /// The attachment's content, transfer encoding undone.
    pub(crate) fn decode(&self, mime: &[u8]) -> Vec<u8> {
        let raw = &mime[self.body.clone()];
        match self.encoding {
            Encoding::Base64 => decode_base64(raw),
            Encoding::QuotedPrintable => decode_quoted_printable(raw),
            Encoding::None => raw.to_vec(),
        }
    }
}

/// A message split for the draft route: the ranges of the original that
/// make up the MIME to create the draft from, and the attachments left out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub(crate) kept: Vec<Range<usize>>,
    pub(crate) detached: Vec<Detached>,
}

/// Takes attachments out, largest first, until the base64 of the rest is at
/// most `limit` bytes. `None` if even the message without any attachment is
/// too large (or it has no header).
pub(crate) fn split(mime: &[u8], limit: usize) -> Option<Split> {
    let message = parser().parse(mime)?;
    let mut candidates: Vec<Detached> = message
        .attachments()
        .filter_map(|part| detachable(&message, part, mime))
        .collect();
    candidates.sort_by_key(|d| std::cmp::Reverse(d.cut.len()));
    drop(message);

    let mut size = mime.len();
    let mut detached = Vec::new();
    for candidate in candidates {
        if base64_len(size) <= limit {
            break;
        }
        size -= candidate.cut.len();
        detached.push(candidate);
    }
    if base64_len(size) > limit {
        return None;
    }
    let mut cuts: Vec<Range<usize>> = detached.iter().map(|d| d.cut.clone()).collect();
    cuts.sort_by_key(|r| r.start);
    let mut kept = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for cut in cuts {
        kept.push(at..cut.start);
        at = cut.end;
    }
    kept.push(at..mime.len());
    kept.retain(|r| !r.is_empty());
    Some(Split { kept, detached })
}

/// A leaf part inside a multipart, with the range to cut it out.
fn detachable(
    message: &Message<'_>,
    part: &mail_parser::MessagePart<'_>,
    mime: &[u8],
) -> Option<Detached> {
    if part.is_multipart() || std::ptr::eq(part, message.root_part()) {
        return None;
    }
    let header = part.offset_header as usize;
    let end = part.offset_end as usize;
    // The delimiter is CRLF "--" boundary: cut from that CRLF (or LF).
    let newline = mime.get(..header)?.windows(3).rposition(|w| w == b"\n--")?;
    let start = if newline > 0 && mime[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    let content_type = part
        .content_type()
        .map(|ct| match ct.subtype() {
            Some(sub) => format!("{}/{}", ct.ctype(), sub),
            None => ct.ctype().to_string(),
        })
        .unwrap_or_else(|| "application/octet-stream".to_string())
        .to_ascii_lowercase();
    Some(Detached {
        name: part.attachment_name().unwrap_or("attachment").to_string(),
        content_type,
        content_id: part.content_id().map(str::to_string),
        inline: part.content_disposition().is_some_and(|d| d.is_inline()),
        body: (part.offset_body as usize).min(end)..end,
        encoding: part.encoding,
        cut: start..end,
    })
}

/// Decodes a base64 body leniently, as mail readers do: line breaks and
/// stray characters skipped, padding optional.
fn decode_base64(raw: &[u8]) -> Vec<u8> {
    use base64::alphabet::STANDARD;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    let mut clean: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))
        .collect();
    if clean.len() % 4 == 1 {
        clean.pop();
    }
    LENIENT.decode(&clean).unwrap_or_default()
}

fn decode_quoted_printable(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'=' if raw[i + 1..].starts_with(b"\r\n") => i += 3,
            b'=' if raw[i + 1..].starts_with(b"\n") => i += 2,
            b'=' => match (raw.get(i + 1).and_then(hex), raw.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'=');
                    i += 1;
                }
            },
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn hex(c: &u8) -> Option<u8> {
    (*c as char).to_digit(16).map(|v| v as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"From: a@b.c\r\nTo: X <x@y.com>, z@w.com\r\nBcc: q@r.s\r\n\
Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\npreamble\r\n--B\r\n\
Content-Type: text/plain\r\n\r\nhello\r\n--B\r\n\
Content-Type: application/pdf; name=\"a.pdf\"\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\nAwQ=\r\n--B\r\n\
Content-Type: text/csv\r\nContent-Transfer-Encoding: quoted-printable\r\n\
Content-Disposition: attachment; filename=\"t.csv\"\r\n\r\na=3D1,=E9=\r\nx\r\n--B--\r\nepilogue\r\n";

    #[test]
    fn header_recipients() {
        let h = HeaderRecipients::parse(MESSAGE).expect("a header");
        let env = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(h.matches(&env(&["Q@r.s", "z@w.com", "x@y.com"])));
        assert!(!h.matches(&env(&["x@y.com", "z@w.com"])));
        assert!(!h.matches(&env(&["x@y.com", "z@w.com", "q@r.s", "extra@e.e"])));
        assert_eq!(h.field_of("X@y.com"), Field::To);
        assert_eq!(h.field_of("q@r.s"), Field::Bcc);
        assert_eq!(h.field_of("other@e.e"), Field::Bcc);
    }

    #[test]
    fn split_cuts_whole_parts_and_keeps_the_rest_identical() {
        let split = split(MESSAGE, 0).map(|s| s.kept.len());
        assert_eq!(split, None, "the text part alone is over a zero limit");
        let all = super::split(MESSAGE, base64_len(MESSAGE.len()) - 1).expect("fits without one");
        assert_eq!(all.detached.len(), 1);
        assert_eq!(all.detached[0].name, "a.pdf");
        assert_eq!(all.detached[0].content_type, "application/pdf");
        assert_eq!(all.detached[0].decode(MESSAGE), vec![0, 1, 2, 3, 4]);
        let both = super::split(MESSAGE, base64_len(MESSAGE.len() - 250)).expect("fits");
        assert_eq!(both.detached.len(), 2);
        let csv = both
            .detached
            .iter()
            .find(|d| d.name == "t.csv")
            .expect("csv");
        assert_eq!(csv.decode(MESSAGE), b"a=1,\xe9x");
        let rebuilt: Vec<u8> = both
            .kept
            .iter()
            .flat_map(|r| MESSAGE[r.clone()].to_vec())
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&rebuilt),
            "From: a@b.c\r\nTo: X <x@y.com>, z@w.com\r\nBcc: q@r.s\r\n\
Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\npreamble\r\n--B\r\n\
Content-Type: text/plain\r\n\r\nhello\r\n--B--\r\nepilogue\r\n"
        );
    }
}
