//! `transport = "graph"` end to end: the real binary, the stand-in identity
//! platform and the stand-in Microsoft Graph.

mod common;

use base64::Engine as _;
use common::{cli, eventually, free_port, plain, send_one, Relay, World, MAILBOX};
use relay_testkit::{GraphCall, GraphFault, GraphServer, RelayConfig, Section};
use std::time::Duration;

/// The stand-ins plus a Graph.
struct GraphWorld {
    world: World,
    graph: GraphServer,
}

impl GraphWorld {
    async fn start() -> GraphWorld {
        let world = World::start().await;
        let graph = GraphServer::start(world.idp.clone())
            .await
            .expect("stand-in graph");
        GraphWorld { world, graph }
    }

    /// A relay whose one account sends through the stand-in Graph.
    async fn relay(&self, port: u16) -> Relay {
        self.relay_with(port, "").await
    }

    /// [`GraphWorld::relay`] with more `[listener]` lines.
    async fn relay_with(&self, port: u16, listener: &str) -> Relay {
        let w = &self.world;
        let toml = RelayConfig::new(&w.idp, &w.upstream, w.dir.path())
            .listener(format!("127.0.0.1:{port}"), "relay.test")
            .client_secret_file(w.dir.path().join("secret"))
            .admin("127.0.0.1:0")
            .extra(Section::Listener, "max_message_size = 36700160\n")
            .extra(Section::Listener, listener)
            .extra(
                Section::Queue,
                "retry_initial = \"300ms\"\nretry_max = \"1s\"\n",
            )
            .extra(
                Section::Account,
                "transport = \"graph\"\nmessages_per_minute = 1000\n",
            )
            .extra(
                Section::End,
                &format!("\n[graph]\nendpoint = \"{}\"\n", self.graph.endpoint()),
            )
            .to_toml();
        Relay::start(&w.write_config(&toml), port).await
    }

    async fn delivered(&self, relay: &Relay, n: usize) -> Vec<relay_testkit::GraphMessage> {
        let got = self
            .graph
            .wait_for_messages(n, Duration::from_secs(30))
            .await;
        assert_eq!(got.len(), n, "log:\n{}", relay.log());
        got
    }
}

/// Sends a short message to alice@example.com (header and envelope alike).
async fn send_to_alice(port: u16, subject: &str) -> String {
    send_one(
        port,
        MAILBOX,
        &["alice@example.com"],
        &common::message(subject),
    )
    .await
}

fn text_message(to: &str, cc: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {MAILBOX}\r\nTo: {to}\r\nCc: {cc}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@app.test>\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

/// A message with one attachment of `content`, base64 in 76-column lines.
fn with_attachment(subject: &str, content: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(content);
    let mut mime = format!(
        "From: {MAILBOX}\r\nTo: alice@example.com\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"scan.bin\"\r\n\
         Content-Disposition: attachment; filename=\"scan.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    for line in encoded.as_bytes().chunks(76) {
        mime.extend_from_slice(line);
        mime.extend_from_slice(b"\r\n");
    }
    mime.extend_from_slice(b"--b1--\r\n");
    mime
}

/// Bytes that are not all alike, so a misplaced range would show.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
}

#[tokio::test]
async fn exactly_the_envelope_recipients_receive_the_message() {
    let g = GraphWorld::start().await;
    let port = free_port();
    let relay = g.relay(port).await;
    // carol is only in the header; bob only in the envelope (a Bcc).
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com", "bob@example.net"],
        &text_message("alice@example.com", "carol@example.org", "exact"),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let [sent] = g.delivered(&relay, 1).await.try_into().expect("one");
    assert_eq!(sent.mailbox, MAILBOX);
    assert_eq!(sent.recipients(), ["alice@example.com", "bob@example.net"]);
    assert_eq!(sent.to, ["alice@example.com"]);
    assert_eq!(sent.bcc, ["bob@example.net"]);
    assert!(sent.via_draft);
    assert_eq!(g.graph.drafts(), 0);

    // When the header says exactly the envelope, one sendMail.
    send_one(
        port,
        MAILBOX,
        &["alice@example.com", "carol@example.org"],
        &text_message("alice@example.com", "carol@example.org", "plain"),
    )
    .await;
    let sent = g.delivered(&relay, 2).await;
    assert!(!sent[1].via_draft);
    assert_eq!(
        sent[1].recipients(),
        ["alice@example.com", "carol@example.org"]
    );
    assert!(g.world.upstream.messages().is_empty(), "nothing over SMTP");
    let log = plain(&relay.log());
    let line = log
        .lines()
        .find(|l| l.contains("to=bob@example.net") && l.contains("status=sent"))
        .unwrap_or_else(|| panic!("no delivery line for bob:\n{log}"));
    assert!(
        line.contains(&format!("relay={}", g.graph.endpoint())),
        "{line}"
    );
    assert!(line.contains("request-id"), "{line}");
}

#[tokio::test]
async fn a_12_mb_attachment_arrives_byte_identical_in_small_requests() {
    let g = GraphWorld::start().await;
    let port = free_port();
    let relay = g.relay(port).await;
    let content = pattern(12 * 1024 * 1024);
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com"],
        &with_attachment("big", &content),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    let [sent] = g.delivered(&relay, 1).await.try_into().expect("one");
    let [attachment] = sent.attachments.try_into().expect("one attachment");
    assert_eq!(attachment.name, "scan.bin");
    assert_eq!(attachment.content_type, "application/octet-stream");
    assert!(attachment.content == content, "content differs");
    let requests = g.graph.requests();
    assert!(requests.iter().all(|r| r.size <= 4 * 1024 * 1024));
    assert!(requests.iter().all(|r| r.status != 413));
    let uploads: Vec<_> = requests
        .iter()
        .filter(|r| r.call == Some(GraphCall::Upload))
        .collect();
    assert!(uploads.len() >= 3, "{uploads:?}");
    assert!(
        uploads.iter().all(|r| !r.authorization),
        "no bearer token to the upload URL"
    );
}

impl GraphWorld {
    /// A relay whose first `sendMail` (of "throttled", sent now) gets 429
    /// with `Retry-After: seconds`.
    async fn throttled_relay(&self, seconds: u64) -> Relay {
        self.graph.push_fault(
            GraphFault::new(429, "ApplicationThrottled", "Too many requests")
                .on(GraphCall::SendMail)
                .retry_after(seconds),
        );
        let port = free_port();
        let relay = self.relay(port).await;
        send_to_alice(port, "throttled").await;
        relay
    }

    /// No request followed the 429 before its `Retry-After` of `seconds`.
    fn assert_paused_after_the_429(&self, seconds: u64, relay: &Relay) {
        let requests = self.graph.requests();
        let throttled = requests.iter().find(|r| r.status == 429).expect("the 429");
        for later in requests.iter().filter(|r| r.start > throttled.end) {
            assert!(
                later.start >= throttled.end + Duration::from_secs(seconds),
                "a request {:?} after the 429, before Retry-After\nlog:\n{}",
                later.start - throttled.end,
                relay.log()
            );
        }
    }
}

#[tokio::test]
async fn throttling_pauses_the_mailbox_for_retry_after() {
    let g = GraphWorld::start().await;
    let relay = g.throttled_relay(3).await;
    g.delivered(&relay, 1).await;
    g.assert_paused_after_the_429(3, &relay);
    let log = plain(&relay.log());
    assert!(
        log.contains("status=deferred") && log.contains("ApplicationThrottled"),
        "{log}"
    );
}

#[tokio::test]
async fn a_reload_keeps_the_retry_after_pause() {
    let g = GraphWorld::start().await;
    let relay = g.throttled_relay(4).await;
    eventually(10, "the 429", || {
        g.graph.requests().iter().any(|r| r.status == 429)
    })
    .await;
    // a [graph] change: the delivery side, Graph client included, is rebuilt
    let config = std::fs::read_to_string(&relay.config).expect("config");
    let changed = config.replace("[graph]\n", "[graph]\ntimeout = \"1m\"\n");
    assert_ne!(changed, config);
    std::fs::write(&relay.config, changed).expect("config");
    relay.signal("HUP");
    eventually(10, "the reload", || {
        relay.log().contains("configuration reloaded")
    })
    .await;
    g.delivered(&relay, 1).await;
    g.assert_paused_after_the_429(4, &relay);
}

#[tokio::test]
async fn access_denied_fails_with_the_fix_and_is_not_retried() {
    let g = GraphWorld::start().await;
    g.graph.forbid_mailbox(MAILBOX);
    let port = free_port();
    let relay = g.relay(port).await;
    send_to_alice(port, "denied").await;
    eventually(20, "the bounce in the log", || {
        plain(&relay.log()).contains("status=bounced")
    })
    .await;
    // a few retry intervals: nothing more is sent
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sends = g
        .graph
        .requests()
        .iter()
        .filter(|r| r.call == Some(GraphCall::SendMail))
        .count();
    assert_eq!(sends, 1);
    let log = plain(&relay.log());
    let line = log
        .lines()
        .find(|l| l.contains("status=bounced"))
        .expect("bounce line");
    for part in [
        "550 5.7.1",
        "ErrorAccessDenied",
        "request-id",
        "Mail.Send",
        "admin consent",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    let queue = relay.queue_json();
    assert_eq!(queue.len(), 1, "the failure stays visible: {queue:?}");
    assert_eq!(queue[0]["state"], "failed");
}

#[tokio::test]
async fn a_refused_token_is_replaced_once() {
    let g = GraphWorld::start().await;
    g.graph.push_fault(
        GraphFault::new(
            401,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        )
        .on(GraphCall::SendMail),
    );
    let port = free_port();
    let relay = g.relay(port).await;
    send_to_alice(port, "token").await;
    g.delivered(&relay, 1).await;
    assert_eq!(g.world.idp.grants("client_credentials"), 2);
    let statuses: Vec<u16> = g.graph.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 202]);
}

#[tokio::test]
async fn never_more_than_four_requests_at_once() {
    let g = GraphWorld::start().await;
    g.graph.set_reply_delay(Some(Duration::from_millis(300)));
    let port = free_port();
    let relay = g.relay(port).await;
    for n in 0..12 {
        let reply = send_to_alice(port, &format!("m{n}")).await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    g.delivered(&relay, 12).await;
    let peak = g.graph.peak_concurrency();
    assert!(peak <= 4, "{peak} requests at once");
}

#[tokio::test]
async fn killed_during_an_upload_delivers_once_after_restart() {
    let g = GraphWorld::start().await;
    g.graph.set_reply_delay(Some(Duration::from_millis(400)));
    let port = free_port();
    let mut relay = g.relay(port).await;
    let content = pattern(12 * 1024 * 1024);
    let reply = send_one(
        port,
        MAILBOX,
        &["alice@example.com"],
        &with_attachment("killed", &content),
    )
    .await;
    assert!(reply.starts_with("250"), "{reply}");
    eventually(30, "an upload range", || {
        g.graph
            .requests()
            .iter()
            .any(|r| r.call == Some(GraphCall::Upload))
    })
    .await;
    relay.kill9();
    assert!(g.graph.messages().is_empty(), "sent before the kill");
    g.graph.set_reply_delay(None);
    let relay = Relay::start(&relay.config, port).await;
    let [sent] = g.delivered(&relay, 1).await.try_into().expect("one");
    assert!(sent.attachments[0].content == content);
    // retries would have happened by now
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(g.graph.messages().len(), 1, "sent twice");
    assert_eq!(g.graph.drafts(), 0, "the killed attempt's draft is left");
    assert_eq!(g.graph.deleted_drafts(), 1, "log:\n{}", relay.log());
    assert!(relay.queue_json().is_empty());
}

#[tokio::test]
async fn without_mail_readwrite_only_drafts_fail_and_say_why() {
    let g = GraphWorld::start().await;
    g.world.idp.set_graph_roles(&["Mail.Send"]);
    let port = free_port();
    let relay = g.relay(port).await;
    // needs a draft (bob is a Bcc) ...
    send_one(
        port,
        MAILBOX,
        &["alice@example.com", "bob@example.net"],
        &text_message("alice@example.com", "", "draft"),
    )
    .await;
    eventually(20, "the bounce in the log", || {
        plain(&relay.log()).contains("status=bounced")
    })
    .await;
    // ... this one does not
    send_to_alice(port, "direct").await;
    let [sent] = g.delivered(&relay, 1).await.try_into().expect("one");
    assert!(!sent.via_draft);
    let log = plain(&relay.log());
    let line = log
        .lines()
        .find(|l| l.contains("status=bounced"))
        .expect("bounce line");
    assert!(line.contains("Mail.ReadWrite"), "{line}");
}

#[tokio::test]
async fn passthrough_answers_with_graphs_verdict() {
    let g = GraphWorld::start().await;
    // Graph's message, cut to 300 bytes, and the fix: over 512 octets.
    g.graph.push_fault(
        GraphFault::new(
            403,
            "ErrorAccessDenied",
            &"Access to this mailbox is denied by policy. ".repeat(8),
        )
        .on(GraphCall::SendMail),
    );
    let port = free_port();
    let _relay = g.relay_with(port, "mode = \"passthrough\"\n").await;
    let reply = send_to_alice(port, "passthrough").await;
    let rid = reply
        .split("(request-id ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("a request-id");
    assert_eq!(rid.len(), 36, "{reply}");
    let expected = format!(
        "550-5.7.1 graph sendMail: 403 ErrorAccessDenied: {}Access to this mailbox is denied by \
         [?] (request-id RID); the app needs the Microsoft Graph application permission \
         Mail.Send with admin consent (Entra admin center\r\n\
         550 5.7.1 > App registrations > API permissions), and where mailboxes are scoped (RBAC \
         for Applications, or an ApplicationAccessPolicy) this mailbox must be in the app's scope \
         (check with Test-ServicePrincipalAuthorization)",
        "Access to this mailbox is denied by policy. ".repeat(6)
    );
    assert_eq!(reply, expected.replace("RID", rid));
    assert!(reply.split("\r\n").all(|line| line.len() + 2 <= 512));
}

// `doctor` runs as a child process the test waits for: the stand-ins need
// threads of their own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_graph_token_and_names_the_entra_steps() {
    let g = GraphWorld::start().await;
    let port = free_port();
    let relay = g.relay(port).await;
    let out = cli(&["doctor", "--send-to", "bob@example.com"], &relay.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("✓ token claims for Microsoft Graph — aud=https://graph.microsoft.com roles=Mail.Send Mail.ReadWrite"),
        "{text}"
    );
    assert!(text.contains("✓ test message to bob@example.com"), "{text}");
    let out = cli(&["token"], &relay.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("scope:     https://graph.microsoft.com/.default")
            && text.contains("ok:        this token should work for Microsoft Graph sendMail"),
        "{text}"
    );

    // a token for Exchange, not Graph
    let config = std::fs::read_to_string(&relay.config).expect("config");
    let wrong = config.replace(
        "[accounts.oauth]\n",
        "[accounts.oauth]\nscope = \"https://outlook.office365.com/.default\"\n",
    );
    std::fs::write(&relay.config, wrong).expect("config");
    let out = cli(&["doctor"], &relay.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("not Microsoft Graph"), "{text}");
    for step in [
        "Mail.Send",
        "Grant admin consent",
        "New-ManagementScope",
        "New-ManagementRoleAssignment",
        "\"Application Mail.Send\"",
        "Test-ServicePrincipalAuthorization",
    ] {
        assert!(text.contains(step), "{step} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_graph_endpoint_not_the_smtp_upstream() {
    let g = GraphWorld::start().await;
    let port = free_port();
    let relay = g.relay(port).await;
    let out = cli(&["check"], &relay.config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.ends_with(&format!(
            ": valid (1 account(s); listening on 127.0.0.1:{port}; Microsoft Graph {})\n",
            g.graph.endpoint()
        )),
        "{stdout}"
    );
}

#[tokio::test]
async fn reload_switches_an_account_to_graph() {
    let g = GraphWorld::start().await;
    let port = free_port();
    let relay = g.relay(port).await;
    let graph_config = std::fs::read_to_string(&relay.config).expect("config");
    std::fs::write(
        &relay.config,
        graph_config.replace("transport = \"graph\"\n", ""),
    )
    .expect("config");
    relay.signal("HUP");
    eventually(10, "the reload", || {
        relay.log().matches("configuration reloaded").count() == 1
    })
    .await;
    send_to_alice(port, "over smtp").await;
    relay.delivered(&g.world, 1).await;

    std::fs::write(&relay.config, graph_config).expect("config");
    relay.signal("HUP");
    eventually(10, "the second reload", || {
        relay.log().matches("configuration reloaded").count() == 2
    })
    .await;
    send_to_alice(port, "over graph").await;
    g.delivered(&relay, 1).await;
    assert_eq!(g.world.upstream.messages().len(), 1);
}
