//! Bounds on what a remote HTTP party can make the relay hold or repeat,
//! shared by every HTTP client of the relay (the token endpoint, Graph): a
//! reply body is read up to a limit and the rest dropped unread (closing the
//! connection), text from a reply is clipped before it goes into an error
//! (which ends up in logs, queue metadata and SMTP replies), and a reqwest
//! error is told with its causes on one line.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

/// The most of a reply body that is read: token responses and Graph's
/// answers are a few KiB.
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
/// character boundary) marked as cut with the full length: `… [cut, N
/// bytes]`. Control characters become spaces: the text goes into one log
/// line.
pub fn clip(text: &str, limit: usize) -> String {
    let (mut out, cut) = clipped(text, limit);
    if cut {
        out.push_str(&format!("… [cut, {} bytes]", text.len()));
    }
    out
}

/// [`clip`] with a short mark, `[…]`, for text that goes into an SMTP reply
/// where every byte of a line counts.
pub fn clip_ellipsis(text: &str, limit: usize) -> String {
    let (mut out, cut) = clipped(text, limit);
    if cut {
        out.push_str("[…]");
    }
    out
}

/// The first `limit` bytes of `text`, control characters as spaces, and
/// whether anything was cut.
fn clipped(text: &str, limit: usize) -> (String, bool) {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let out = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    (out, end < text.len())
}

/// `error` and its sources, `: `-separated: reqwest's own text alone says
/// only "error sending request", the cause (refused, TLS, DNS) is below.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_marks_long_text() {
        // text, limit, clip, clip_ellipsis
        let cases = [
            ("short", 10, "short", "short"),
            ("0123456789", 10, "0123456789", "0123456789"),
            (
                "0123456789ab",
                10,
                "0123456789… [cut, 12 bytes]",
                "0123456789[…]",
            ),
            ("a\r\nb", 10, "a  b", "a  b"),
            // never splits a character: "é" is two bytes
            ("aé", 2, "a… [cut, 3 bytes]", "a[…]"),
        ];
        for (text, limit, counted, brief) in cases {
            assert_eq!(clip(text, limit), counted);
            assert_eq!(clip_ellipsis(text, limit), brief);
        }
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

    #[test]
    fn error_chain_names_every_cause() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let error = Layer(
            "error sending request",
            Some(Box::new(Layer("connection refused", None))),
        );
        assert_eq!(
            error_chain(&error),
            "error sending request: connection refused"
        );
    }
}
