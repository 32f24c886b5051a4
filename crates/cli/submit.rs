//! A minimal SMTP client, one command and one reply at a time, as a legacy
//! application would talk to the relay: used by `demo` and `send-test`.

use anyhow::{bail, Context};
use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends `message` (headers and body, CRLF line ends, not dot-stuffed) from
/// `from` to `to` through the relay at `addr`; returns the reply to the data.
pub async fn submit(
    addr: SocketAddr,
    from: &str,
    to: &str,
    message: &str,
) -> anyhow::Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}"))?
        .with_context(|| format!("connecting to {addr} (is the relay running?)"))?;
    let mut data = message.replace("\r\n.", "\r\n..");
    if !data.ends_with("\r\n") {
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    let steps = [
        String::new(),
        "EHLO smtp-oauth-relay.local\r\n".into(),
        format!("MAIL FROM:<{from}>\r\n"),
        format!("RCPT TO:<{to}>\r\n"),
        "DATA\r\n".into(),
        data,
    ];
    let mut last = String::new();
    for step in steps {
        stream.write_all(step.as_bytes()).await?;
        last = read_reply(&mut stream).await?;
        if last.starts_with(['4', '5']) {
            bail!(
                "the relay answered {last:?} to {:?}",
                step.lines().next().unwrap_or("")
            );
        }
    }
    stream.write_all(b"QUIT\r\n").await?;
    Ok(last)
}

async fn read_reply(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut text = String::new();
    let mut byte = [0u8; 1];
    let read = async {
        loop {
            if stream.read(&mut byte).await? == 0 {
                bail!("the relay closed the connection");
            }
            text.push(char::from(byte[0]));
            // the last line of a reply is "ddd text\r\n"
            if text.ends_with("\r\n") {
                let last = text.trim_end().rsplit("\r\n").next().unwrap_or("");
                if last.as_bytes().get(3) != Some(&b'-') {
                    return Ok(last.to_owned());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .context("waiting for the relay")?
}

/// Where a client reaches a listener bound to `bind` (a wildcard address is
/// reached on loopback).
pub fn reachable(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], bind.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bind.port())),
        _ => bind,
    }
}
