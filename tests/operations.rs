//! Running the relay as a service: signals, reload, readiness, metrics,
//! systemd notifications and structured logs.

mod common;

use common::*;
use std::time::Duration;

/// A config whose admin endpoint is on a known port.
fn with_admin(world: &World, port: u16, admin: u16) -> String {
    world.config(port).replace(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"127.0.0.1:{admin}\""),
    )
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("admin endpoint answers");
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

// SIGTERM: idle clients get 421 at once, a transaction in progress may
// finish, then the process exits 0 with the queue intact.
#[tokio::test]
async fn sigterm_lets_a_transaction_finish() {
    let world = World::start().await;
    let port = free_port();
    let mut relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    world.upstream.stop().await; // keep the message queued
    let (mut busy, _) = Client::connect(port).await;
    busy.send(b"EHLO app.test\r\n").await;
    assert!(busy
        .send(b"MAIL FROM:<relay@contoso.com>\r\n")
        .await
        .starts_with("250"));
    let (mut idle, _) = Client::connect(port).await;
    relay.signal("TERM");
    assert!(idle.reply().await.starts_with("421 4.3.2"));
    assert!(busy
        .send(b"RCPT TO:<a@example.com>\r\n")
        .await
        .starts_with("250"));
    assert!(busy.send(b"DATA\r\n").await.starts_with("354"));
    let reply = busy
        .send(&[message("in flight").as_slice(), b".\r\n"].concat())
        .await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    assert_eq!(relay.terminate().await, Some(0));
    let out = cli(&["queue", "list", "--json"], &relay.config);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(entries.len(), 1, "the message survived the shutdown");
}

// SIGHUP with a valid config applies it to new connections without
// dropping open ones; an invalid one is refused and the old one kept.
#[tokio::test]
async fn sighup_reloads_and_refuses_broken_configs() {
    let world = World::start().await;
    let port = free_port();
    let path = world.write_config(&world.config(port));
    let relay = Relay::start(&path, port).await;
    let (mut open, _) = Client::connect(port).await;
    open.send(b"EHLO app.test\r\n").await;

    // broken: refused, everything keeps working
    std::fs::write(&path, "[listener]\nbogus = 1\n").expect("write");
    relay.signal("HUP");
    eventually(10, "the refusal in the log", || {
        relay.log().contains("reload refused")
    })
    .await;
    let (_, greeting) = Client::connect(port).await;
    assert!(greeting.starts_with("220"), "{greeting}");

    // two problems: refused in one log event on one line, naming both
    std::fs::write(
        &path,
        world.config(port).replace(
            "hostname = \"relay.test\"",
            "hostname = \"relay.test\"\nmax_recipients = 0\nmax_connections = 0",
        ),
    )
    .expect("write");
    relay.signal("HUP");
    eventually(10, "the second refusal in the log", || {
        relay.log().matches("reload refused").count() == 2
    })
    .await;
    let log = relay.log();
    let refusal = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        refusal.contains("listener.max_recipients must be more than 0; listener.max_connections must be more than 0"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("  listener.")),
        "a refusal spans lines:\n{log}"
    );

    // valid: loopback is no longer allowed, and a new hostname is used
    let locked = world.config(port).replace(
        "hostname = \"relay.test\"",
        "hostname = \"relay2.test\"\nallowed_networks = [\"10.0.0.0/8\"]",
    );
    std::fs::write(&path, locked).expect("write");
    relay.signal("HUP");
    eventually(10, "the reload", || {
        relay.log().contains("configuration reloaded")
    })
    .await;
    let (_, greeting) = Client::connect(port).await;
    assert_eq!(
        greeting,
        "554 5.7.1 127.0.0.1 is not allowed to use this relay"
    );
    // the connection opened before the reload still relays
    let reply = open
        .mail(MAILBOX, &["a@example.com"], &message("kept"))
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let got = world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    assert_eq!(
        got.len(),
        1,
        "delivery restarted after the reload; log:\n{}",
        relay.log()
    );
}

// A reload restarts the delivery workers only when what they use changed.
#[tokio::test]
async fn reload_restarts_delivery_only_when_it_changed() {
    let world = World::start().await;
    let port = free_port();
    let path = world.write_config(&world.config(port));
    let relay = Relay::start(&path, port).await;
    let starts = |relay: &Relay| relay.log().matches("delivering to the upstream").count();
    let reload = |relay: &Relay, config: String, n: usize| {
        std::fs::write(&path, config).expect("write");
        relay.signal("HUP");
        let log = relay.config.with_file_name("relay.log");
        eventually(10, "the reload", move || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("configuration reloaded")
                .count()
                == n
        })
    };
    eventually(10, "delivery", || starts(&relay) == 1).await;
    let listener_only = world
        .config(port)
        .replace("[listener]\n", "[listener]\nmax_recipients = 10\n");
    reload(&relay, listener_only, 1).await;
    assert_eq!(starts(&relay), 1, "{}", relay.log());
    let upstream_too = world
        .config(port)
        .replace("[upstream]\n", "[upstream]\nidle_timeout = \"5s\"\n");
    reload(&relay, upstream_too, 2).await;
    assert_eq!(starts(&relay), 2, "{}", relay.log());
    send_accepted(&relay, "after the restart").await;
    relay.delivered(&world, 1).await;
}

// /readyz and `health` say not ready while an account has no token, and
// ready once it has; /metrics counts a delivery and a failure.
#[tokio::test]
async fn readiness_health_and_metrics() {
    let world = World::start().await;
    std::fs::write(world.dir.path().join("secret"), "wrong").expect("secret");
    let (port, admin) = (free_port(), free_port());
    let relay = Relay::start(&world.write_config(&with_admin(&world, port, admin)), port).await;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    assert_eq!(
        get(&format!("http://127.0.0.1:{admin}/healthz")).await.0,
        200
    );
    let (code, body) = get(&readyz).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("FAIL token for account main"), "{body}");
    assert!(body.contains("ok   queue directory writable"), "{body}");
    let health = cli(&["health"], &relay.config);
    assert_eq!(health.status.code(), Some(1));

    // the secret file is fixed: the next token request succeeds
    std::fs::write(world.dir.path().join("secret"), world.idp.client_secret()).expect("secret");
    let mut ready = false;
    for _ in 0..150 {
        if get(&readyz).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never became ready; log:\n{}", relay.log());
    assert!(cli(&["health"], &relay.config).status.success());

    send_one(port, MAILBOX, &["a@example.com"], &message("ok")).await;
    send_one(
        port,
        "stranger@contoso.com",
        &["a@example.com"],
        &message("denied"),
    )
    .await;
    world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    eventually(20, "the failure", || world.upstream.rejected().len() == 1).await;
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = get(&format!("http://127.0.0.1:{admin}/metrics")).await.1;
        // the queue depth is as of the queue's last look (once a second)
        if metrics.contains("outcome=\"failed\"")
            && metrics.contains("smtp_relay_queue_depth{state=\"failed\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.contains("smtp_relay_messages_accepted_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_messages_total{outcome=\"delivered\",reason=\"none\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_messages_total{outcome=\"failed\",reason=\"send_as\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_queue_depth{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_token_expiry_seconds{account=\"main\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_upstream_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smtp_relay_token_requests_total{account=\"main\",result=\"error\"}"),
        "{metrics}"
    );
}

// Under systemd: READY=1 with a STATUS= line once listening with a token,
// watchdog pings, STOPPING=1 on SIGTERM. Multi-threaded: the blocking
// reads of the notify socket must not stall the in-process identity platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications() {
    let world = World::start().await;
    let port = free_port();
    let socket_path = world.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let socket_env = socket_path.display().to_string();
    let mut relay = Relay::start_with_env(
        &world.write_config(&world.config(port)),
        port,
        &[("NOTIFY_SOCKET", &socket_env), ("WATCHDOG_USEC", "400000")],
    )
    .await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..200 {
        if seen.iter().any(|m: &String| m.contains("READY=1"))
            && seen.iter().any(|m| m.trim() == "WATCHDOG=1")
        {
            break;
        }
        let n = socket.recv(&mut buf).expect("a notification in time");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        seen.iter().any(|m| m.trim() == "WATCHDOG=1"),
        "no watchdog ping: {seen:?}"
    );
    let ready = seen
        .iter()
        .find(|m| m.contains("READY=1"))
        .cloned()
        .unwrap_or_default();
    assert!(
        ready.contains("STATUS=queue: 0 to deliver, 0 failed; tokens: main ok"),
        "{ready}\nlog:\n{}",
        relay.log()
    );
    assert_eq!(relay.terminate().await, Some(0));
    let mut stopping = false;
    for _ in 0..200 {
        let Ok(n) = socket.recv(&mut buf) else { break };
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
}

// [log] format = "json": one object per line, with the accepted message's
// and the delivery attempt's fields.
#[tokio::test]
async fn json_logs_carry_the_fields() {
    let world = World::start().await;
    let port = free_port();
    let config = world.config(port) + "\n[log]\nformat = \"json\"\n";
    let relay = Relay::start(&world.write_config(&config), port).await;
    send_one(
        port,
        MAILBOX,
        &["a@example.com", "b@example.com"],
        &message("logged"),
    )
    .await;
    world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    eventually(10, "the delivery line", || {
        relay.log().contains("\"delivered\"")
    })
    .await;
    let lines: Vec<serde_json::Value> = relay
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let accepted = lines
        .iter()
        .find(|l| l["message"] == "accepted")
        .expect("accepted line");
    assert_eq!(accepted["client"], "127.0.0.1");
    assert_eq!(accepted["sender"], MAILBOX);
    assert_eq!(accepted["recipients"], 2);
    assert!(accepted["queue_id"].is_string() && accepted["size"].is_number());
    let delivered = lines
        .iter()
        .find(|l| l["message"] == "delivered")
        .expect("delivery line");
    assert_eq!(delivered["queue_id"], accepted["queue_id"]);
    assert_eq!(delivered["mailbox"], MAILBOX);
    assert_eq!(delivered["code"], 250);
    assert_eq!(delivered["enhanced"], "2.0.0");
    assert!(delivered["took"].is_string());
}

// SIGTERM while the relay still waits for its first token (up to 30 s)
// stops it in order, exit 0, instead of killing it outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_the_first_token() {
    let world = World::start().await;
    world.idp.set_reply_delay(Some(Duration::from_secs(20)));
    let port = free_port();
    let config = world.config(port).replace(
        "hostname = \"relay.test\"",
        "hostname = \"relay.test\"\nshutdown_timeout = \"2s\"",
    );
    let mut relay = Relay::start(&world.write_config(&config), port).await;
    assert_eq!(relay.terminate().await, Some(0), "log:\n{}", relay.log());
    assert!(relay.log().contains("shutting down"), "{}", relay.log());
    world.idp.set_reply_delay(None);
}
