//! An upstream reply, kept whole: the text as sent and, read once from it,
//! the code and the enhanced status.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Most octets of one reply line, its CRLF included (RFC 5321 4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;

/// One reply: code, enhanced status (if any) and the whole text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reply {
    /// The three-digit reply code (an HTTP status is mapped to the SMTP
    /// code that means the same). `0` only for a reply stored as bare text
    /// by an older relay, which had no code.
    pub code: u16,
    /// The RFC 3463 enhanced status, e.g. `5.7.705`.
    pub enhanced: Option<Enhanced>,
    /// The whole reply as sent, continuation lines joined with a space.
    pub text: String,
}

/// An RFC 3463 enhanced status code, e.g. `5.7.705`, kept whole (smtp-proto
/// keeps it in three bytes, which mangles Microsoft's three-digit details).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Enhanced {
    /// 2 (success), 4 (temporary) or 5 (permanent).
    pub class: u8,
    /// The subject, e.g. 7 for security or policy.
    pub subject: u16,
    /// The detail, e.g. 705.
    pub detail: u16,
}

impl Enhanced {
    /// `class.subject.detail`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Enhanced {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    /// Reads the enhanced status at the start of `text` (`5.7.705 Access
    /// denied` gives 5.7.705); `None` when it does not start with one.
    pub fn parse(text: &str) -> Option<Enhanced> {
        let word = text.split_whitespace().next()?;
        let mut parts = word.splitn(3, '.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        matches!(class, 2 | 4 | 5).then_some(Enhanced::new(class, subject, detail))
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Serialize for Enhanced {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Enhanced {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Enhanced, D::Error> {
        let text = String::deserialize(d)?;
        Enhanced::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("bad enhanced status {text:?}")))
    }
}

impl Reply {
    /// Whether the code is a 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Reads a reply from the lines the server sent (without line ends):
    /// `250-first` … `250 last`. `None` when the first has no code.
    pub fn from_lines(lines: &[String]) -> Option<Reply> {
        let first = lines.first()?;
        let code = reply_code(first)?;
        let enhanced = first.get(4..).and_then(Enhanced::parse);
        // keep the code once, then each line's text
        let text = std::iter::once(first.get(..3).unwrap_or_default())
            .chain(lines.iter().map(|line| line.get(4..).unwrap_or_default()))
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Some(Reply {
            code,
            enhanced,
            text,
        })
    }

    /// Reads a one-line reply such as `550 5.1.1 User unknown`.
    pub fn parse(line: &str) -> Option<Reply> {
        Reply::from_lines(&[line.to_owned()])
    }

    /// A reply for a condition found by the relay itself, worded like a
    /// server's: `{code} {enhanced} {text}`.
    pub fn local(code: u16, enhanced: Enhanced, text: &str) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: format!("{code} {enhanced} {text}"),
        }
    }

    /// This reply with its text replaced, code and status kept (a note
    /// added by the relay, e.g. that it gave up).
    pub fn with_text(&self, text: String) -> Reply {
        Reply {
            code: self.code,
            enhanced: self.enhanced,
            text,
        }
    }

    /// The reply as the lines to write to an SMTP client, each without its
    /// CRLF: the text wrapped at spaces so that no line, CRLF included, is
    /// over [`MAX_REPLY_LINE`] octets, and every line carrying the code and
    /// the enhanced status, as Postfix writes them (`550-5.7.1 …` and a last
    /// `550 5.7.1 …`). A character that is not printable ASCII becomes `?`:
    /// upstream text must neither end the reply early with a line break nor
    /// give a client that did not ask for SMTPUTF8 anything but ASCII. A
    /// reply without a code (stored by an older relay) goes out as `451`.
    pub fn wire_lines(&self) -> Vec<String> {
        let code = if (200..600).contains(&self.code) {
            self.code
        } else {
            451
        };
        let enhanced = self.enhanced.map(|e| e.to_string());
        let mut body = self.text.as_str();
        if reply_code(body).is_some() {
            body = body.get(4..).unwrap_or_default();
        }
        if let Some(status) = &enhanced {
            if let Some(rest) = body.strip_prefix(status.as_str()) {
                if rest.is_empty() || rest.starts_with(' ') {
                    body = rest;
                }
            }
        }
        let body: String = body
            .chars()
            .map(|c| match c {
                ' '..='~' => c,
                c if c.is_whitespace() => ' ',
                _ => '?',
            })
            .collect();
        let status = enhanced.map(|e| format!("{e} ")).unwrap_or_default();
        // code, separator, status; the rest of the line is text
        let room = MAX_REPLY_LINE - 2 - 4 - status.len();
        let mut texts: Vec<String> = Vec::new();
        let mut current = String::new();
        for word in body.split_whitespace() {
            let mut word = word;
            if !current.is_empty() && current.len() + 1 + word.len() > room {
                texts.push(std::mem::take(&mut current));
            }
            // a word longer than a line is cut (it is ASCII by now)
            while word.len() > room {
                texts.push(word[..room].to_string());
                word = &word[room..];
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
        if !current.is_empty() || texts.is_empty() {
            texts.push(current);
        }
        let last = texts.len() - 1;
        texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                let separator = if i == last { ' ' } else { '-' };
                format!("{code}{separator}{status}{text}")
                    .trim_end()
                    .to_string()
            })
            .collect()
    }
}

fn reply_code(line: &str) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match line.as_bytes().get(3) {
        None | Some(b' ' | b'-') => digits.parse().ok(),
        Some(_) => None,
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A reply as stored: structured, or the bare text an older relay wrote.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Structured {
        code: u16,
        enhanced: Option<Enhanced>,
        text: String,
    },
    Text(String),
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Reply, D::Error> {
        Ok(match Stored::deserialize(d)? {
            Stored::Structured {
                code,
                enhanced,
                text,
            } => Reply {
                code,
                enhanced,
                text,
            },
            Stored::Text(text) => Reply::parse(&text).unwrap_or(Reply {
                code: 0,
                enhanced: None,
                text,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_and_big_enhanced_codes() {
        let r = Reply::from_lines(&[
            "550-5.7.708 Service unavailable.".into(),
            "550 5.7.708 Access denied, traffic not accepted".into(),
        ])
        .expect("reply");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 7, 708)));
        assert_eq!(
            r.enhanced.map(|e| e.to_string()).as_deref(),
            Some("5.7.708")
        );
        assert_eq!(
            r.text,
            "550 5.7.708 Service unavailable. 5.7.708 Access denied, traffic not accepted"
        );
    }

    #[test]
    fn wire_lines_stay_within_512_octets_and_repeat_the_status() {
        let short = Reply::local(550, Enhanced::new(5, 7, 1), "denied");
        assert_eq!(short.wire_lines(), ["550 5.7.1 denied"]);

        let words = "word ".repeat(150);
        let long = Reply::local(550, Enhanced::new(5, 7, 1), words.trim_end());
        let lines = long.wire_lines();
        // 10 octets of "550-5.7.1 ", then as many "word" as fit in 500
        let first = format!("550-5.7.1 {}", ["word"; 100].join(" "));
        assert_eq!(first.len(), 509);
        let last = format!("550 5.7.1 {}", ["word"; 50].join(" "));
        assert_eq!(lines, [first, last]);

        let unbroken = Reply::local(451, Enhanced::new(4, 7, 0), &"x".repeat(1200));
        let lines = unbroken.wire_lines();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() + 2 <= MAX_REPLY_LINE));
        assert_eq!(lines[0], format!("451-4.7.0 {}", "x".repeat(500)));
        assert_eq!(lines[2], format!("451 4.7.0 {}", "x".repeat(200)));

        let hostile = Reply::local(550, Enhanced::new(5, 7, 1), "no\r\n250 ok [\u{2026}]\u{7}");
        assert_eq!(hostile.wire_lines(), ["550 5.7.1 no 250 ok [?]?"]);

        let bare = Reply::parse("554 no status here").expect("reply");
        assert_eq!(bare.wire_lines(), ["554 no status here"]);
        let upstream = Reply::from_lines(&[
            "550-5.7.708 Service unavailable.".into(),
            "550 5.7.708 Access denied".into(),
        ])
        .expect("reply");
        assert_eq!(
            upstream.wire_lines(),
            ["550 5.7.708 Service unavailable. 5.7.708 Access denied"]
        );
        let old: Reply = serde_json::from_str(r#""cannot connect""#).expect("text");
        assert_eq!(old.wire_lines(), ["451 cannot connect"]);
    }

    #[test]
    fn without_enhanced_or_code() {
        let r = Reply::parse("421 Service not available").expect("reply");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "421 Service not available");
        assert_eq!(Reply::parse("cannot connect"), None);
        assert_eq!(Reply::parse("4210 x"), None);
    }

    #[test]
    fn older_bare_text_still_loads() {
        let r: Reply = serde_json::from_str(r#""554 5.2.252 SendAsDenied""#).expect("text");
        assert_eq!(r.code, 554);
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 2, 252)));
        let r: Reply = serde_json::from_str(r#""cannot connect to x:587: refused""#).expect("text");
        assert_eq!((r.code, r.enhanced), (0, None));
        assert_eq!(r.text, "cannot connect to x:587: refused");
        let r: Reply =
            serde_json::from_str(r#"{"code":550,"enhanced":"5.7.705","text":"550 5.7.705 no"}"#)
                .expect("structured");
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 7, 705)));
    }
}
