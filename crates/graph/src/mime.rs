//! Reading what Graph needs from a message without copying it: the header
//! recipients, and which attachments to take out of a message too large for
//! one request (as byte ranges of the original, so the rest stays identical).

use std::collections::HashSet;
use std::ops::Range;

use mail_parser::{Address, MessageParser, MimeHeaders};

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

/// How deep multiparts are followed looking for attachments.
const MAX_DEPTH: usize = 8;

/// A transfer encoding, as far as taking an attachment out needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Base64,
    QuotedPrintable,
    Identity,
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
    transfer: Transfer,
    /// What is removed from the message: the line break and delimiter line
    /// before the part, and the part; the following delimiter stays.
    cut: Range<usize>,
}

impl Detached {
    /// The content, transfer encoding undone, in pieces of at most `max`
    /// bytes, decoded as they are asked for. Base64 pieces are a multiple of
    /// 3 bytes, so `max` should be one too.
    pub(crate) fn decoder<'a>(&self, mime: &'a [u8], max: usize) -> Decoder<'a> {
        Decoder {
            raw: &mime[self.body.clone()],
            pos: 0,
            transfer: self.transfer,
            max,
        }
    }

    /// The decoded size, without holding the content.
    pub(crate) fn decoded_len(&self, mime: &[u8]) -> usize {
        let raw = &mime[self.body.clone()];
        match self.transfer {
            Transfer::Identity => raw.len(),
            Transfer::Base64 => {
                let n = raw.iter().filter(|&&b| is_base64(b)).count();
                n / 4 * 3 + (n % 4).saturating_sub(1)
            }
            Transfer::QuotedPrintable => {
                let mut decoder = self.decoder(mime, 64 * 1024);
                std::iter::from_fn(|| decoder.next_chunk())
                    .map(|c| c.len())
                    .sum()
            }
        }
    }
}

/// Decodes an attachment piece by piece.
pub(crate) struct Decoder<'a> {
    raw: &'a [u8],
    pos: usize,
    transfer: Transfer,
    max: usize,
}

impl Decoder<'_> {
    /// The next piece, `None` at the end.
    pub(crate) fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.pos >= self.raw.len() {
            return None;
        }
        let mut out = Vec::with_capacity(self.max.min(self.raw.len() - self.pos));
        match self.transfer {
            Transfer::Identity => {
                let end = (self.pos + self.max).min(self.raw.len());
                out.extend_from_slice(&self.raw[self.pos..end]);
                self.pos = end;
            }
            Transfer::Base64 => self.base64(&mut out),
            Transfer::QuotedPrintable => self.quoted_printable(&mut out),
        }
        (!out.is_empty()).then_some(out)
    }

    /// Leniently, as mail readers do: line breaks and stray characters
    /// skipped, padding optional. Decodes in small blocks so no second copy
    /// of the piece exists.
    fn base64(&mut self, out: &mut Vec<u8>) {
        use base64::alphabet::STANDARD;
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        use base64::Engine as _;
        const LENIENT: GeneralPurpose = GeneralPurpose::new(
            &STANDARD,
            GeneralPurposeConfig::new()
                .with_decode_allow_trailing_bits(true)
                .with_decode_padding_mode(DecodePaddingMode::RequireNone),
        );
        let chars = (self.max / 3 * 4).clamp(4, 4096);
        let mut block = Vec::with_capacity(chars);
        while out.len() + chars / 4 * 3 <= self.max && self.pos < self.raw.len() {
            block.clear();
            while block.len() < chars && self.pos < self.raw.len() {
                let byte = self.raw[self.pos];
                self.pos += 1;
                if is_base64(byte) {
                    block.push(byte);
                }
            }
            if block.len() % 4 == 1 {
                block.pop();
            }
            // Cannot fail: the input is filtered to the alphabet and its
            // length is never 1 mod 4.
            let _ = LENIENT.decode_vec(&block, out);
        }
    }

    fn quoted_printable(&mut self, out: &mut Vec<u8>) {
        let raw = self.raw;
        while out.len() < self.max && self.pos < raw.len() {
            let i = self.pos;
            match raw[i] {
                b'=' if raw[i + 1..].starts_with(b"\r\n") => self.pos += 3,
                b'=' if raw[i + 1..].starts_with(b"\n") => self.pos += 2,
                b'=' => match (raw.get(i + 1).and_then(hex), raw.get(i + 2).and_then(hex)) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        self.pos += 3;
                    }
                    _ => {
                        out.push(b'=');
                        self.pos += 1;
                    }
                },
                byte => {
                    out.push(byte);
                    self.pos += 1;
                }
            }
        }
    }
}

fn is_base64(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/')
}

fn hex(c: &u8) -> Option<u8> {
    (*c as char).to_digit(16).map(|v| v as u8)
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
///
/// Only headers are parsed (part by part, following the boundaries): bodies
/// are neither decoded nor copied.
pub(crate) fn split(mime: &[u8], limit: usize) -> Option<Split> {
    let mut candidates = Vec::new();
    walk(mime, 0..mime.len(), None, 0, &mut candidates);
    candidates.sort_by_key(|d| std::cmp::Reverse(d.cut.len()));

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

/// Collects the attachments of the entity at `range` (header and body);
/// `cut_start` is where its removal would start (`None` for the message).
fn walk(
    mime: &[u8],
    range: Range<usize>,
    cut_start: Option<usize>,
    depth: usize,
    out: &mut Vec<Detached>,
) {
    let entity = &mime[range.clone()];
    let Some(header) = parser().parse_headers(entity) else {
        return;
    };
    let body = range.start + body_offset(entity);
    let content_type = header.content_type();
    if let Some(ct) = content_type.filter(|ct| ct.ctype().eq_ignore_ascii_case("multipart")) {
        if let Some(boundary) = ct.attribute("boundary").filter(|_| depth < MAX_DEPTH) {
            for (part, cut) in parts(mime, body..range.end, boundary.as_bytes()) {
                walk(mime, part, Some(cut), depth + 1, out);
            }
        }
        return;
    }
    let Some(cut_start) = cut_start else {
        return;
    };
    let disposition = header.content_disposition();
    let is_attachment = disposition.is_some_and(|d| d.is_attachment())
        || header.attachment_name().is_some()
        || content_type.is_some_and(|ct| !ct.ctype().eq_ignore_ascii_case("text"));
    if !is_attachment {
        return;
    }
    let transfer = match header.content_transfer_encoding() {
        Some(e) if e.trim().eq_ignore_ascii_case("base64") => Transfer::Base64,
        Some(e) if e.trim().eq_ignore_ascii_case("quoted-printable") => Transfer::QuotedPrintable,
        _ => Transfer::Identity,
    };
    out.push(Detached {
        name: header.attachment_name().unwrap_or("attachment").to_string(),
        content_type: content_type
            .map(|ct| match ct.subtype() {
                Some(sub) => format!("{}/{}", ct.ctype(), sub),
                None => ct.ctype().to_string(),
            })
            .unwrap_or_else(|| "text/plain".to_string())
            .to_ascii_lowercase(),
        content_id: header.content_id().map(str::to_string),
        inline: disposition.is_some_and(|d| d.is_inline()),
        body: body.min(range.end)..range.end,
        transfer,
        cut: cut_start..range.end,
    });
}

/// Where the body starts: after the first empty line (or at once, for a
/// part without header fields).
fn body_offset(entity: &[u8]) -> usize {
    if entity.starts_with(b"\r\n") {
        return 2;
    }
    if entity.starts_with(b"\n") {
        return 1;
    }
    let mut at = 0;
    while let Some(nl) = entity[at..].iter().position(|&b| b == b'\n') {
        let next = at + nl + 1;
        if entity[next..].starts_with(b"\r\n") {
            return next + 2;
        }
        if entity[next..].starts_with(b"\n") {
            return next + 1;
        }
        at = next;
    }
    entity.len()
}

/// The parts of a multipart body: each part's range (header and body) and
/// where cutting it out starts (the line break before its delimiter).
fn parts(mime: &[u8], body: Range<usize>, boundary: &[u8]) -> Vec<(Range<usize>, usize)> {
    // Delimiter lines: (start of the line, start of the next line, closing?).
    let mut delimiters = Vec::new();
    let mut pos = body.start;
    while pos < body.end {
        let line_end = mime[pos..body.end]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.end, |i| pos + i);
        let line = &mime[pos..line_end];
        if let Some(rest) = line
            .strip_prefix(b"--")
            .and_then(|l| l.strip_prefix(boundary))
        {
            let close = rest.starts_with(b"--");
            let rest = if close { &rest[2..] } else { rest };
            if rest.iter().all(u8::is_ascii_whitespace) {
                delimiters.push((pos, (line_end + 1).min(body.end), close));
                if close {
                    break;
                }
            }
        }
        pos = line_end + 1;
    }
    let line_break_before = |at: usize| {
        let mut start = at;
        if start > body.start && mime[start - 1] == b'\n' {
            start -= 1;
            if start > body.start && mime[start - 1] == b'\r' {
                start -= 1;
            }
        }
        start
    };
    let mut found = Vec::new();
    for (i, &(line, next, close)) in delimiters.iter().enumerate() {
        if close {
            break;
        }
        let end = delimiters
            .get(i + 1)
            .map_or(body.end, |&(following, _, _)| line_break_before(following));
        if end >= next {
            found.push((next..end, line_break_before(line)));
        }
    }
    found
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

    fn decode(d: &Detached) -> Vec<u8> {
        let mut decoder = d.decoder(MESSAGE, 3);
        std::iter::from_fn(|| decoder.next_chunk())
            .flatten()
            .collect()
    }

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
        assert_eq!(decode(&all.detached[0]), vec![0, 1, 2, 3, 4]);
        assert_eq!(all.detached[0].decoded_len(MESSAGE), 5);
        let both = super::split(MESSAGE, base64_len(MESSAGE.len() - 250)).expect("fits");
        assert_eq!(both.detached.len(), 2);
        let csv = both
            .detached
            .iter()
            .find(|d| d.name == "t.csv")
            .expect("csv");
        assert_eq!(decode(csv), b"a=1,\xe9x");
        assert_eq!(csv.decoded_len(MESSAGE), 6);
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

    #[test]
    fn nested_parts_lf_endings_and_no_preamble() {
        let message: &[u8] = b"To: a@b.c\nContent-Type: multipart/mixed; boundary=out\n\n--out\n\
Content-Type: application/zip\nContent-Transfer-Encoding: base64\n\nUEsDBA==\n--out\n\
Content-Type: multipart/related; boundary=\"in\"\n\n--in\nContent-Type: text/html\n\n<p>hi</p>\n\
--in\nContent-Type: image/gif\nContent-ID: <g@x>\n\nGIF89a\n--in--\n\n--out--\n";
        let split = super::split(message, 0).map(|s| s.detached.len());
        assert_eq!(split, None);
        let split = super::split(message, base64_len(message.len() - 120)).expect("fits");
        let mut names: Vec<(&str, Option<&str>)> = split
            .detached
            .iter()
            .map(|d| (d.content_type.as_str(), d.content_id.as_deref()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [("application/zip", None), ("image/gif", Some("g@x"))]
        );
        let rebuilt: Vec<u8> = split
            .kept
            .iter()
            .flat_map(|r| message[r.clone()].to_vec())
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&rebuilt),
            "To: a@b.c\nContent-Type: multipart/mixed; boundary=out\n\n\n--out\n\
Content-Type: multipart/related; boundary=\"in\"\n\n--in\nContent-Type: text/html\n\n<p>hi</p>\n\
--in--\n\n--out--\n"
        );
        let zip = split
            .detached
            .iter()
            .find(|d| d.content_id.is_none())
            .expect("zip");
        let mut decoder = zip.decoder(message, 300);
        assert_eq!(decoder.next_chunk().as_deref(), Some(&b"PK\x03\x04"[..]));
        assert_eq!(decoder.next_chunk(), None);
    }
}
