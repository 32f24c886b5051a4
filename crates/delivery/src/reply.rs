//! Upstream replies, kept as the full text the server sent.
//!
//! smtp-proto's reply parser stores the enhanced status in three bytes, which
//! mangles Microsoft's `5.7.705`-style codes, and the queue must keep "the
//! upstream's full reply text"; so transaction replies are read here.

use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Replies longer than this are cut: a misbehaving server cannot make the
/// relay buffer without bound.
const MAX_REPLY: usize = 64 * 1024;

/// One SMTP reply: code, enhanced status (if any) and text, lines joined by a space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    /// The whole reply as sent, continuation lines joined with a space.
    pub text: String,
}

/// An RFC 3463 enhanced status code, e.g. `5.7.705`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Parses the lines of a complete reply (without line ends).
    pub fn from_lines(lines: &[String]) -> Option<Reply> {
        let first = lines.first()?;
        let code: u16 = first.get(..3)?.parse().ok()?;
        let enhanced = first.get(4..).and_then(parse_enhanced);
        // "250-first" and "250 last" lines: keep the code once, then each line's text
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

    /// A reply for a condition found locally, worded like a server reply.
    pub fn local(code: u16, enhanced: &str, text: &str) -> Reply {
        Reply {
            code,
            enhanced: parse_enhanced(enhanced),
            text: format!("{code} {enhanced} {text}"),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_enhanced(text: &str) -> Option<Enhanced> {
    let word = text.split_whitespace().next()?;
    let mut parts = word.splitn(3, '.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    matches!(class, 2 | 4 | 5).then_some(Enhanced {
        class,
        subject,
        detail,
    })
}

/// Reads one complete reply from `stream`. `pending` keeps bytes read past
/// the reply (a server may answer pipelined commands in one packet).
pub async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> std::io::Result<Reply> {
    let mut lines = Vec::new();
    loop {
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
            let last = line.as_bytes().get(3).is_none_or(|&sep| sep != b'-');
            lines.push(line);
            if last {
                return Reply::from_lines(&lines)
                    .ok_or_else(|| invalid(format!("unparseable reply {:?}", lines.join(" / "))));
            }
        }
        if pending.len() > MAX_REPLY {
            return Err(invalid("reply too long".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn invalid(text: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_multiline_and_big_enhanced_codes() {
        let mut input: &[u8] =
            b"550-5.7.708 Service unavailable.\r\n550 5.7.708 Access denied, traffic not accepted\r\n250 2.0.0 OK\r\n";
        let mut pending = Vec::new();
        let r = read_reply(&mut input, &mut pending).await.expect("reply");
        assert_eq!(r.code, 550);
        assert_eq!(
            r.enhanced,
            Some(Enhanced {
                class: 5,
                subject: 7,
                detail: 708
            })
        );
        assert_eq!(
            r.text,
            "550 5.7.708 Service unavailable. 5.7.708 Access denied, traffic not accepted"
        );
        let r = read_reply(&mut input, &mut pending)
            .await
            .expect("second reply");
        assert_eq!(r.text, "250 2.0.0 OK");
        assert!(read_reply(&mut input, &mut pending).await.is_err());
    }

    #[test]
    fn reply_without_enhanced_code() {
        let r = Reply::from_lines(&["421 Service not available".into()]).expect("reply");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "421 Service not available");
    }
}
