//! Bounds on what a remote party can make the relay hold or repeat: a reply
//! body is read up to a limit and the rest dropped unread (closing the
//! connection), and text from a reply is clipped before it goes into an
//! error, which ends up in logs and in queue metadata.
//!
//! Public so every HTTP client of the relay (token endpoint, Graph) applies
//! the same bounds.

/// The most of a reply body that is read; token responses are a few KiB.
pub const REPLY_LIMIT: usize = 64 * 1024;

/// The most of a remote party's text that goes into one error.
pub const TEXT_LIMIT: usize = 300;

/// A reply body read up to a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedBody {
    /// The bytes read: all of the body, or its first `limit` bytes.
    pub bytes: Vec<u8>,
    /// Whether the body went on past what was read.
    pub cut: bool,
    /// The length the server declared (`Content-Length`), if any.
    pub declared: Option<u64>,
}

impl BoundedBody {
    /// The body's size for a message: exact when read whole or declared,
    /// otherwise a lower bound.
    pub fn size(&self) -> String {
        match (self.cut, self.declared) {
            (false, _) => format!("{} bytes", self.bytes.len()),
            (true, Some(declared)) => format!("{declared} bytes"),
            (true, None) => format!("more than {} bytes", self.bytes.len()),
        }
    }
}

/// Reads at most `limit` bytes of `response`'s body; the rest is never read
/// (dropping the response closes the connection). Memory held is the
/// limit plus at most one chunk of the transport.
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<BoundedBody, reqwest::Error> {
    let declared = response.content_length();
    let initial = declared.map_or(4096, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let mut bytes = Vec::with_capacity(initial);
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(BoundedBody {
                bytes,
                cut: true,
                declared,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(BoundedBody {
        bytes,
        cut: false,
        declared,
    })
}

/// `text` if it is at most `limit` bytes, else its first `limit` bytes (on a
/// character boundary) marked as cut with the full length. Control
/// characters become spaces: the text goes into one log line.
pub fn clip(text: &str, limit: usize) -> String {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < text.len() {
        out.push_str(&format!("… [cut, {} bytes]", text.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_marks_long_text() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("0123456789", 10), "0123456789");
        assert_eq!(clip("0123456789ab", 10), "0123456789… [cut, 12 bytes]");
        assert_eq!(clip("a\r\nb", 10), "a  b");
        // never splits a character: "é" is two bytes
        assert_eq!(clip("aé", 2), "a… [cut, 3 bytes]");
        let huge = "x".repeat(52_428_800);
        let clipped = clip(&huge, TEXT_LIMIT);
        assert!(clipped.ends_with("… [cut, 52428800 bytes]"), "{clipped}");
        assert!(clipped.len() < TEXT_LIMIT + 40);
    }

    #[test]
    fn size_is_exact_declared_or_a_lower_bound() {
        let body = |cut, declared| BoundedBody {
            bytes: vec![0; 10],
            cut,
            declared,
        };
        assert_eq!(body(false, Some(10)).size(), "10 bytes");
        assert_eq!(body(true, Some(5000)).size(), "5000 bytes");
        assert_eq!(body(true, None).size(), "more than 10 bytes");
    }
}
