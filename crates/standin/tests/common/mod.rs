//! Tiny raw HTTP and SMTP clients for exercising the kit over loopback.
//! Every read is bounded so a misbehaving server fails the test instead of
//! hanging it.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const STEP: Duration = Duration::from_secs(10);

/// A parsed HTTP response.
pub struct HttpResponse {
    pub status: u16,
    pub json: serde_json::Value,
}

/// POSTs `body` to `authority` + `path` with the given content type and
/// extra header lines, using HTTP/1.1 with `Connection: close`.
pub async fn post(
    authority: &str,
    path: &str,
    content_type: &str,
    extra_headers: &[&str],
    body: &str,
) -> HttpResponse {
    let host = authority.trim_start_matches("http://");
    let mut stream = timeout(STEP, TcpStream::connect(host))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for header in extra_headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    timeout(STEP, stream.read_to_end(&mut raw))
        .await
        .expect("response timed out")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body split");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "tiny client cannot read chunked bodies"
    );
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    HttpResponse { status, json }
}

/// Form-encodes name/value pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The XOAUTH2 initial response for `user` and `token`.
pub fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// An SMTP reply: its code and all its lines.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The whole reply, lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A raw SMTP client over plain TCP or TLS.
pub struct Smtp<S> {
    io: BufReader<S>,
}

impl Smtp<TcpStream> {
    /// Connects to the server and reads its greeting.
    pub async fn connect(port: u16) -> (Smtp<TcpStream>, Reply) {
        let stream = timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut smtp = Smtp {
            io: BufReader::new(stream),
        };
        let greeting = smtp.reply().await.expect("greeting");
        (smtp, greeting)
    }

    /// Sends STARTTLS, expects 220 and upgrades, trusting only `ca_pem` and
    /// checking the certificate against `server_name`.
    pub async fn starttls(mut self, ca_pem: &str, server_name: &str) -> Smtp<TlsStream<TcpStream>> {
        let reply = self.cmd("STARTTLS").await;
        assert_eq!(reply.code, 220, "{reply:?}");
        let tls = timeout(
            STEP,
            connector(ca_pem).connect(name(server_name), self.io.into_inner()),
        )
        .await
        .expect("handshake timed out")
        .expect("handshake");
        Smtp {
            io: BufReader::new(tls),
        }
    }
}

/// A TLS connector trusting only the given CA.
pub fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

fn name(server_name: &str) -> ServerName<'static> {
    ServerName::try_from(server_name.to_string()).expect("server name")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    /// Sends raw bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
    }

    /// Sends one command line and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply()
            .await
            .unwrap_or_else(|| panic!("no reply to {line:?}"))
    }

    /// Reads one (possibly multi-line) reply; `None` if the server closed
    /// the connection first.
    pub async fn reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = timeout(STEP, self.io.read_line(&mut line))
                .await
                .expect("reply timed out")
                .ok()?;
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        let code = lines[0]
            .get(..3)
            .and_then(|c| c.parse().ok())
            .expect("reply code");
        Some(Reply { code, lines })
    }

    /// True once the server has closed the connection (EOF or reset).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            timeout(STEP, self.io.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
