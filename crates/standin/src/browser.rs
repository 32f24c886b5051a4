//! A user's browser, reduced to what the authorization code flow needs: GET
//! a URL and follow redirects (to the kit's consent page, then to the
//! relay's loopback listener). Plain HTTP/1.1 over loopback only.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens `url` (an `http://` URL) like a browser: follows up to five
/// redirects and returns the final status code, the URL it came from and the
/// body. Every step is bounded by ten seconds.
pub async fn open_in_browser(url: &str) -> io::Result<(u16, String, String)> {
    let mut url = url.to_string();
    for _ in 0..6 {
        let (status, location, body) = get(&url).await?;
        match location {
            Some(next) if (300..400).contains(&status) => url = next,
            _ => return Ok((status, url, body)),
        }
    }
    Err(io::Error::other("too many redirects"))
}

async fn get(url: &str) -> io::Result<(u16, Option<String>, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| io::Error::other(format!("not an http:// URL: {url}")))?;
    let (host, target) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let connect_to = host.replace("localhost", "127.0.0.1");
    let exchange = async {
        let mut stream = TcpStream::connect(&connect_to).await?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: relay-standin-browser\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {url} timed out")))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no HTTP status from {url}")))?;
    let location = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("location")
            .then(|| value.trim().to_string())
    });
    Ok((status, location, body.to_string()))
}
