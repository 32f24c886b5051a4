//! The Graph client against the stand-in Graph, over loopback sockets.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use relay_graph::{Failure, GraphClient, Settings, ACCESS_DENIED_FIX, MAX_REQUEST};
use relay_standin::{GraphCall, GraphFault, GraphServer, IdentityPlatform, GRAPH_AUDIENCE};

const MAILBOX: &str = "relay@contoso.com";
/// The queue id the sends are tagged with.
const KEY: &str = "1A2B3C4D5E6F7";

struct World {
    idp: IdentityPlatform,
    graph: GraphServer,
    client: Arc<GraphClient>,
    token: String,
}

async fn world() -> World {
    world_with(4).await
}

async fn world_with(max_requests: usize) -> World {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let idp = IdentityPlatform::start().await.expect("identity platform");
    let graph = GraphServer::start(idp.clone()).await.expect("graph");
    let settings = Settings {
        endpoint: graph.endpoint().parse().expect("loopback endpoint"),
        max_requests: NonZeroUsize::new(max_requests).expect("not zero"),
        ..Settings::default()
    };
    let client = Arc::new(GraphClient::new(settings).expect("client"));
    let token = idp.mint_token(GRAPH_AUDIENCE, 3600);
    World {
        idp,
        graph,
        client,
        token,
    }
}

fn envelope(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

fn simple(to: &str, cc: &str) -> Vec<u8> {
    format!("From: relay@contoso.com\r\nTo: {to}\r\nCc: {cc}\r\nSubject: hello\r\n\r\nBody.\r\n")
        .into_bytes()
}

impl World {
    async fn send(
        &self,
        recipients: &[&str],
        mime: &[u8],
    ) -> Result<relay_graph::Accepted, relay_graph::GraphError> {
        self.client
            .send(&self.token, MAILBOX, KEY, &envelope(recipients), mime)
            .await
    }

    fn calls(&self) -> Vec<Option<GraphCall>> {
        self.graph.requests().iter().map(|r| r.call).collect()
    }
}

#[tokio::test]
async fn header_recipients_equal_to_the_envelope_go_in_one_send_mail() {
    let w = world().await;
    let mime = simple("A <a@example.com>", "b@example.net");
    let accepted = w
        .send(&["B@example.net", "a@example.com"], &mime)
        .await
        .expect("sent");
    assert!(!accepted.via_draft);
    assert!(accepted.request_id.is_some());
    let [sent] = &w.graph.messages()[..] else {
        panic!("one message")
    };
    assert_eq!(sent.mailbox, MAILBOX);
    assert_eq!(sent.recipients(), ["a@example.com", "b@example.net"]);
    assert_eq!(sent.mime, mime);
    assert_eq!(w.calls(), [Some(GraphCall::SendMail)]);
}

#[tokio::test]
async fn exactly_the_envelope_recipients_receive_the_message() {
    let w = world().await;
    let mime = simple("a@example.com, header-only@example.org", "c@example.net");
    let accepted = w
        .send(
            &["a@example.com", "c@example.net", "hidden@example.org"],
            &mime,
        )
        .await
        .expect("sent");
    assert!(accepted.via_draft);
    let [sent] = &w.graph.messages()[..] else {
        panic!("one message")
    };
    assert_eq!(sent.to, ["a@example.com"]);
    assert_eq!(sent.cc, ["c@example.net"]);
    assert_eq!(sent.bcc, ["hidden@example.org"]);
    let tagged = [format!("X-Relay-Queue-Id: {KEY}\r\n").as_bytes(), &mime].concat();
    assert_eq!(sent.mime, tagged);
    assert_eq!(
        w.calls(),
        [
            Some(GraphCall::ListDrafts),
            Some(GraphCall::CreateDraft),
            Some(GraphCall::UpdateDraft),
            Some(GraphCall::SendDraft)
        ]
    );
    assert_eq!(w.graph.drafts(), 0);
}

/// Deterministic bytes that do not compress into a pattern the splitter
/// could confuse with MIME.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn base64_lines(data: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(text.len() + text.len() / 38);
    for line in text.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push_str("\r\n");
    }
    out
}

#[tokio::test]
async fn a_12_mb_attachment_arrives_byte_identical_with_no_request_over_4_mib() {
    let w = world().await;
    let data = noise(12 * 1024 * 1024);
    let small = noise(100_000);
    let head = "From: relay@contoso.com\r\nTo: a@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=\"XYZ\"\r\n\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\n\
        See attached.\r\n";
    let big_part = format!(
        "--XYZ\r\nContent-Type: application/octet-stream; name=\"scan.bin\"\r\n\
         Content-Disposition: attachment; filename=\"scan.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}",
        base64_lines(&data)
    );
    let small_part = format!(
        "--XYZ\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\n\
         Content-Disposition: inline; filename=\"logo.png\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}",
        base64_lines(&small)
    );
    let tail = "--XYZ--\r\n";
    let mime = format!("{head}{big_part}{small_part}{tail}").into_bytes();

    let accepted = w
        .send(&["a@example.com", "bcc@example.org"], &mime)
        .await
        .expect("sent");
    assert!(accepted.via_draft);
    let [sent] = &w.graph.messages()[..] else {
        panic!("one message")
    };
    assert_eq!(sent.recipients(), ["a@example.com", "bcc@example.org"]);
    assert_eq!(sent.bcc, ["bcc@example.org"]);
    // Only the big attachment was taken out, the rest is byte-identical.
    assert_eq!(
        sent.mime,
        format!("X-Relay-Queue-Id: {KEY}\r\n{head}{small_part}{tail}").into_bytes()
    );
    let [attachment] = &sent.attachments[..] else {
        panic!("one attachment added separately")
    };
    assert_eq!(attachment.name, "scan.bin");
    assert_eq!(attachment.content_type, "application/octet-stream");
    assert!(attachment.content == data, "attachment content differs");

    let requests = w.graph.requests();
    assert!(requests
        .iter()
        .all(|r| r.size <= MAX_REQUEST && r.status < 300));
    let uploads: Vec<_> = requests
        .iter()
        .filter(|r| r.call == Some(GraphCall::Upload))
        .collect();
    assert_eq!(
        uploads.len(),
        data.len().div_ceil(relay_graph::UPLOAD_CHUNK)
    );
    assert!(
        uploads.iter().all(|r| !r.authorization),
        "bearer token sent to the upload URL"
    );
    assert_eq!(w.graph.drafts(), 0);
}

#[tokio::test]
async fn retry_after_is_surfaced_and_pauses_the_whole_mailbox() {
    let w = world().await;
    w.graph.push_fault(
        GraphFault::new(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        )
        .retry_after(30),
    );
    let mime = simple("a@example.com", "b@example.com");
    let error = w
        .send(&["a@example.com", "b@example.com"], &mime)
        .await
        .expect_err("throttled");
    assert_eq!(
        error.failure,
        Failure::Temporary {
            retry_after: Some(Duration::from_secs(30))
        }
    );
    assert_eq!(error.status, Some(429));
    assert_eq!(error.code.as_deref(), Some("ApplicationThrottled"));
    assert!(error.request_id.is_some());

    // The next send for the mailbox waits without asking Graph.
    let again = w
        .send(&["a@example.com", "b@example.com"], &mime)
        .await
        .expect_err("still paused");
    let wait = again.retry_after().expect("a remaining pause");
    assert!(wait <= Duration::from_secs(30) && wait > Duration::from_secs(0));
    assert_eq!(w.graph.requests().len(), 1);

    // A client rebuilt by a reload keeps the pause, for that mailbox only.
    let rebuilt = GraphClient::replacing(&w.client, w.client.settings().clone()).expect("client");
    let again = rebuilt
        .send(&w.token, MAILBOX, KEY, &envelope(&["a@example.com"]), &mime)
        .await
        .expect_err("still paused");
    let left = again.retry_after().expect("a remaining pause");
    assert!(left <= wait, "{left:?} > {wait:?}");
    assert_eq!(w.graph.requests().len(), 1);
    rebuilt
        .send(
            &w.token,
            "other@contoso.com",
            KEY,
            &envelope(&["a@example.com"]),
            &simple("a@example.com", ""),
        )
        .await
        .expect("another mailbox is not paused");
}

#[tokio::test]
async fn access_denied_is_permanent_with_the_fix() {
    let w = world().await;
    w.graph.forbid_mailbox(MAILBOX);
    let error = w
        .send(
            &["a@example.com"],
            &simple("a@example.com", "a@example.com"),
        )
        .await
        .expect_err("denied");
    assert_eq!(error.failure, Failure::AccessDenied);
    assert!(!error.failure.is_temporary());
    assert_eq!(error.status, Some(403));
    assert_eq!(error.code.as_deref(), Some("ErrorAccessDenied"));
    assert!(error.to_string().contains(ACCESS_DENIED_FIX), "{error}");
}

#[tokio::test]
async fn a_rejected_token_is_classified_for_one_refetch() {
    let w = world().await;
    let mime = simple("a@example.com", "a@example.com");
    for token in [
        w.idp.mint_token(GRAPH_AUDIENCE, -10),
        w.idp.mint_token("https://outlook.office365.com", 3600),
    ] {
        let error = w
            .client
            .send(&token, MAILBOX, KEY, &envelope(&["a@example.com"]), &mime)
            .await
            .expect_err("refused");
        assert_eq!(error.failure, Failure::TokenRejected, "{error}");
        assert_eq!(error.code.as_deref(), Some("InvalidAuthenticationToken"));
    }
    assert!(w.graph.messages().is_empty());
}

#[tokio::test]
async fn without_mail_read_write_drafts_fail_and_direct_sends_still_flow() {
    let w = world().await;
    w.graph.set_app_permissions(&["Mail.Send"]);
    let mime = simple("a@example.com", "b@example.com");
    let error = w
        .send(&["a@example.com"], &mime)
        .await
        .expect_err("needs a draft");
    assert_eq!(error.failure, Failure::DraftForbidden);
    assert!(error.to_string().contains("Mail.ReadWrite"), "{error}");
    w.send(&["a@example.com", "b@example.com"], &mime)
        .await
        .expect("sendMail needs no draft");
    assert_eq!(w.graph.messages().len(), 1);
}

#[tokio::test]
async fn mailbox_not_found_names_the_mailbox() {
    let w = world().await;
    w.graph.push_fault(GraphFault::new(
        404,
        "MailboxNotEnabledForRESTAPI",
        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
    ));
    let error = w
        .send(
            &["a@example.com"],
            &simple("a@example.com", "a@example.com"),
        )
        .await
        .expect_err("not found");
    assert_eq!(
        error.failure,
        Failure::MailboxNotFound {
            mailbox: MAILBOX.into()
        }
    );
    assert!(error.to_string().contains(MAILBOX));
}

#[tokio::test]
async fn never_more_than_max_requests_in_flight_per_mailbox() {
    let w = world_with(3).await;
    w.graph.set_reply_delay(Some(Duration::from_millis(50)));
    let direct = simple("a@example.com", "b@example.com");
    let drafted = simple("a@example.com", "other@example.com");
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..12 {
        let mime = if i % 2 == 0 {
            direct.clone()
        } else {
            drafted.clone()
        };
        let (client, token) = (w.client.clone(), w.token.clone());
        sends.spawn(async move {
            let recipients = envelope(&["a@example.com", "b@example.com"]);
            let key = format!("Q{i}");
            client.send(&token, MAILBOX, &key, &recipients, &mime).await
        });
    }
    while let Some(result) = sends.join_next().await {
        result.expect("joined").expect("sent");
    }
    assert_eq!(w.graph.messages().len(), 12);
    let peak = w.graph.peak_concurrency();
    assert!(peak <= 3, "{peak} requests in flight");
}

#[tokio::test]
async fn a_draft_whose_send_fails_is_deleted() {
    let w = world().await;
    w.graph.push_fault(
        GraphFault::new(503, "ServiceUnavailable", "Try later.").on(GraphCall::SendDraft),
    );
    let mime = simple("a@example.com", "b@example.com");
    let error = w
        .send(&["a@example.com"], &mime)
        .await
        .expect_err("send step failed");
    assert_eq!(error.failure, Failure::Temporary { retry_after: None });
    assert!(w.graph.messages().is_empty());
    assert_eq!(w.graph.drafts(), 0);
    assert_eq!(w.graph.deleted_drafts(), 1);
    assert_eq!(w.calls().last(), Some(&Some(GraphCall::DeleteDraft)));
}

/// Leaves a draft tagged `key` behind: its send and then its delete fail.
async fn leave_a_draft(w: &World, key: &str) {
    w.graph.push_fault(
        GraphFault::new(503, "ServiceUnavailable", "Try later.").on(GraphCall::SendDraft),
    );
    w.graph.push_fault(
        GraphFault::new(503, "ServiceUnavailable", "Try later.").on(GraphCall::DeleteDraft),
    );
    let mime = simple("a@example.com", "b@example.com");
    w.client
        .send(&w.token, MAILBOX, key, &envelope(&["a@example.com"]), &mime)
        .await
        .expect_err("send step failed");
}

#[tokio::test]
async fn a_draft_an_earlier_attempt_left_is_deleted_not_sent() {
    let w = world().await;
    leave_a_draft(&w, KEY).await;
    leave_a_draft(&w, "OTHER").await;
    assert_eq!(w.graph.drafts(), 2);
    let mime = simple("a@example.com", "b@example.com");
    let accepted = w.send(&["a@example.com"], &mime).await.expect("sent");
    assert!(accepted.via_draft);
    let [sent] = &w.graph.messages()[..] else {
        panic!("one message")
    };
    assert_eq!(sent.to, ["a@example.com"]);
    assert_eq!(w.graph.deleted_drafts(), 1);
    assert_eq!(w.graph.drafts(), 1, "another message's draft is kept");
    let calls = w.calls();
    assert_eq!(
        calls[calls.len() - 5..],
        [
            Some(GraphCall::ListDrafts),
            Some(GraphCall::DeleteDraft),
            Some(GraphCall::CreateDraft),
            Some(GraphCall::UpdateDraft),
            Some(GraphCall::SendDraft)
        ]
    );
}

#[tokio::test]
async fn drafts_are_sent_even_when_graph_refuses_the_leftover_search() {
    let w = world().await;
    w.graph.push_fault(
        GraphFault::new(400, "ErrorInvalidUrlQueryFilter", "Unsupported filter.")
            .on(GraphCall::ListDrafts),
    );
    let mime = simple("a@example.com", "b@example.com");
    w.send(&["a@example.com"], &mime).await.expect("sent");
    assert_eq!(w.graph.messages().len(), 1);

    w.graph.push_fault(
        GraphFault::new(429, "ApplicationThrottled", "Too many requests.")
            .on(GraphCall::ListDrafts),
    );
    let error = w
        .send(&["a@example.com"], &mime)
        .await
        .expect_err("throttled");
    assert_eq!(error.failure, Failure::Temporary { retry_after: None });
    assert_eq!(w.graph.messages().len(), 1);
}

#[tokio::test]
async fn a_huge_error_body_is_cut() {
    let w = world().await;
    w.graph.push_fault(GraphFault::new(
        400,
        "ErrorInvalidRequest",
        &"x".repeat(1_000_000),
    ));
    let error = w
        .send(
            &["a@example.com"],
            &simple("a@example.com", "a@example.com"),
        )
        .await
        .expect_err("refused");
    assert_eq!(error.failure, Failure::Permanent);
    assert!(error.message.len() < 400, "{} bytes", error.message.len());
    assert!(error.message.ends_with("[…]"));
}
