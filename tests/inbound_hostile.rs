//! Clients a production relay meets on a bad day, against the relay binary
//! in front of the stand-in Microsoft 365: one dripping a command line a
//! byte at a time, one sending more recipients than `max_recipients`
//! (Python's smtplib), one sending non-ASCII addresses without SMTPUTF8.

mod common;
mod inbound_support;

use common::*;
use inbound_support::*;
use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A client writing one byte every 500 ms, never a line end, is told
/// `421 4.4.2` and disconnected once `command_timeout` has passed since
/// its first byte.
#[tokio::test]
async fn a_client_dripping_a_command_line_is_disconnected() {
    let inbound =
        Inbound::start_with("command_timeout = \"2s\"", "messages_per_minute = 6000").await;
    let mut stream = TcpStream::connect(("127.0.0.1", inbound.port))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("greeting in time")
            .expect("read the greeting");
        assert!(n > 0, "closed before the greeting");
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got, b"220 relay.test ESMTP smtp-oauth-relay ready\r\n");
    got.clear();
    let first = Instant::now();
    // at most 20 s of dripping: today's limit is 2 s from the first byte
    for _ in 0..40 {
        if stream.write_all(b"X").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
        if got.ends_with(b"\r\n") {
            break;
        }
    }
    let cut_after = first.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "421 4.4.2 relay.test Error: timeout exceeded\r\n",
        "log:\n{}",
        inbound.relay.log()
    );
    assert!(
        cut_after >= Duration::from_secs(2) && cut_after < Duration::from_secs(10),
        "disconnected after {cut_after:?}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .expect("closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

/// Python's smtplib sends 520 recipients with `max_recipients = 500`: the
/// 20 over the limit get `452 4.5.3` without ending the session, the client
/// sends them in a second transaction, and all 520 receive the message
/// exactly once.
#[tokio::test]
async fn five_hundred_and_twenty_recipients_all_receive_the_message() {
    let inbound = Inbound::start_with("max_recipients = 500", "messages_per_minute = 6000").await;
    let recipients: Vec<String> = (0..520).map(|i| format!("r{i:03}@example.com")).collect();
    let script = r#"
import json, smtplib, sys
port, sender = sys.argv[1], sys.argv[2]
recipients = sys.argv[3:]
msg = sys.stdin.buffer.read()
s = smtplib.SMTP("127.0.0.1", int(port), timeout=30)
s.ehlo("python.test")
refused = s.sendmail(sender, recipients, msg)
replies = sorted({"%d %s" % (code, text.decode()) for code, text in refused.values()})
again = s.sendmail(sender, list(refused), msg)
s.quit()
print(json.dumps({"refused": list(refused), "replies": replies, "refused_again": list(again)}))
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .arg(inbound.port.to_string())
        .arg(MAILBOX)
        .args(&recipients)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let message = format!(
        "From: {MAILBOX}\r\nTo: undisclosed-recipients:;\r\nSubject: 520 recipients\r\n\r\nHello, all of you.\r\n"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = cmd.spawn().expect("python3 is required");
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(message.as_bytes())
                .expect("feed the message");
            drop(stdin);
            child.wait_with_output().expect("python3 output")
        }),
    )
    .await
    .expect("smtplib finished in time")
    .expect("smtplib task");
    assert!(
        out.status.success(),
        "smtplib: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        inbound.relay.log()
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from smtplib");
    assert_eq!(
        result,
        serde_json::json!({
            "refused": recipients[500..],
            "replies": ["452 4.5.3 Error: too many recipients"],
            "refused_again": [],
        })
    );
    // every recipient gets it, exactly once, in two messages
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut messages = Vec::new();
    for _ in 0..300 {
        messages = inbound
            .world
            .upstream
            .messages()
            .into_iter()
            .filter(|m| m.text().contains("Subject: 520 recipients\r\n"))
            .collect();
        if messages.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(messages.len(), 2, "log:\n{}", inbound.relay.log());
    for m in &messages {
        assert_eq!(m.mail_from, MAILBOX);
        for to in &m.rcpt_to {
            *copies.entry(to.clone()).or_default() += 1;
        }
    }
    let mut sizes: Vec<usize> = messages.iter().map(|m| m.rcpt_to.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [20, 500]);
    assert_eq!(copies.len(), 520);
    assert!(recipients.iter().all(|r| copies.get(r) == Some(&1)));
}

/// Non-ASCII addresses without SMTPUTF8 on `MAIL FROM` are refused with
/// `553 5.6.7` and never reach the upstream; the rest of the transaction
/// goes on.
#[tokio::test]
async fn non_ascii_addresses_without_smtputf8_are_refused() {
    let inbound = Inbound::start().await;
    let (mut c, greeting) = Client::connect(inbound.port).await;
    assert_eq!(greeting, "220 relay.test ESMTP smtp-oauth-relay ready");
    assert!(c.send(b"EHLO app.test\r\n").await.contains("250-SMTPUTF8"));
    let refused = "553 5.6.7 Must declare SMTPUTF8 to send unicode address";
    assert_eq!(
        c.send("MAIL FROM:<grüße@contoso.com>\r\n".as_bytes()).await,
        refused
    );
    assert_eq!(
        c.send(format!("MAIL FROM:<{MAILBOX}>\r\n").as_bytes())
            .await,
        "250 2.1.0 Ok"
    );
    assert_eq!(
        c.send("RCPT TO:<jürgen@exämple.com>\r\n".as_bytes()).await,
        refused
    );
    assert_eq!(
        c.send(format!("RCPT TO:<{RCPT}>\r\n").as_bytes()).await,
        "250 2.1.5 Ok"
    );
    assert_eq!(
        c.send(b"DATA\r\n").await,
        "354 End data with <CR><LF>.<CR><LF>"
    );
    let reply = c
        .send(format!("{}.\r\n", client_message("ascii only")).as_bytes())
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    // with SMTPUTF8 the same addresses are taken
    assert_eq!(
        c.send("MAIL FROM:<grüße@contoso.com> SMTPUTF8\r\n".as_bytes())
            .await,
        "250 2.1.0 Ok"
    );
    assert_eq!(
        c.send("RCPT TO:<jürgen@exämple.com>\r\n".as_bytes()).await,
        "250 2.1.5 Ok"
    );
    assert_eq!(c.send(b"RSET\r\n").await, "250 2.0.0 Ok");
    assert_eq!(c.send(b"QUIT\r\n").await, "221 2.0.0 Bye");
    inbound.expect_delivered(&["ascii only".to_owned()]).await;
    assert_eq!(inbound.world.upstream.messages().len(), 1);
}
