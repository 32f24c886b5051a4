//! Reading SMTP replies off the wire, kept whole.
//!
//! smtp-proto's reply parser stores the enhanced status in three bytes, which
//! mangles Microsoft's `5.7.705`-style codes, and the queue keeps the
//! upstream's full reply text; so transaction replies are read here.

use relay_outcome::Reply;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Replies longer than this are cut: a misbehaving server cannot make the
/// relay buffer without bound.
const MAX_REPLY: usize = 64 * 1024;

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
    use relay_outcome::Enhanced;

    #[tokio::test]
    async fn reads_multiline_and_big_enhanced_codes() {
        let mut input: &[u8] =
            b"550-5.7.708 Service unavailable.\r\n550 5.7.708 Access denied, traffic not accepted\r\n250 2.0.0 OK\r\n";
        let mut pending = Vec::new();
        let r = read_reply(&mut input, &mut pending).await.expect("reply");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 7, 708)));
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
}
