//! The queue's database against the real binary: SIGKILLs under load lose
//! nothing accepted (embedded SQLite); a relay on PostgreSQL answers `451`,
//! fails `/readyz` naming the database while it is down, and resumes by
//! itself when it is back, without losing anything it answered `250` for
//! (stopped, or hung without closing its connections); mail accepted by a
//! relay that dies is delivered by another on the same database; a relay
//! started while its database is down waits for it, answering `451`; two
//! relays sending at once keep to the mailbox's three upstream connections (or
//! four Graph requests) together and to the mailbox's pace, and when one is
//! killed mid-load the other delivers all it accepted, repeating at most
//! what was in flight.

mod common;

use common::*;
use relay_testkit::{GraphServer, Postgres};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clients sending at once during the loads.
const CLIENTS: usize = 4;

/// What the clients of a load were told.
#[derive(Default)]
struct Told {
    /// Subjects answered `250`.
    accepted: BTreeSet<String>,
    /// Other final replies to the message (`451`), or errors.
    refused: Vec<String>,
}

/// Clients sending numbered messages in a loop, each message in its own
/// session (so a refused one does not end the client), and what they were
/// told.
struct Load {
    told: Arc<Mutex<Told>>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn new() -> Load {
        Load {
            told: Arc::default(),
            stop: Arc::default(),
            clients: Vec::new(),
        }
    }

    /// Starts [`CLIENTS`] more clients sending to the relay on `port`
    /// (subjects `PREFIX-CLIENT-N`) until [`Load::finish`]. A broken
    /// connection (the relay killed) counts as refused.
    fn start(mut self, port: u16, prefix: &str) -> Load {
        for client in 0..CLIENTS {
            let told = self.told.clone();
            let stop = self.stop.clone();
            let prefix = prefix.to_owned();
            self.clients.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let subject = format!("{prefix}-{client}-{n}");
                    let sent =
                        tokio::time::timeout(Duration::from_secs(15), try_send(port, &subject))
                            .await;
                    let answered = matches!(sent, Ok(Some(_)));
                    {
                        let mut told = told.lock().expect("lock");
                        match sent {
                            Ok(Some(reply)) if reply.starts_with("250") => {
                                told.accepted.insert(subject);
                            }
                            Ok(Some(reply)) => told.refused.push(reply),
                            Ok(None) => told.refused.push("connection broken".into()),
                            Err(_) => told.refused.push("timed out".into()),
                        }
                    }
                    if !answered {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        self
    }

    /// What the clients were told so far, looked at through `look`.
    fn told<T>(&self, look: impl FnOnce(&Told) -> T) -> T {
        look(&self.told.lock().expect("lock"))
    }

    /// Waits (20 s at most) until `done` holds of what they were told.
    async fn until(&self, done: impl Fn(&Told) -> bool) {
        for _ in 0..200 {
            if self.told(&done) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the clients; what they were told.
    async fn finish(self) -> Told {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("client");
        }
        std::mem::take(&mut *self.told.lock().expect("lock"))
    }
}

/// One message in its own session; the reply to its end of data, or
/// `None` if the connection broke first.
async fn try_send(port: u16, subject: &str) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    async fn reply(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<String> {
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(line.trim_end().to_owned());
            }
        }
    }
    reply(&mut read).await?;
    let message = String::from_utf8(message(subject)).ok()?;
    for command in [
        "EHLO app.test\r\n".to_owned(),
        format!("MAIL FROM:<{MAILBOX}>\r\n"),
        "RCPT TO:<alice@example.com>\r\n".to_owned(),
        "DATA\r\n".to_owned(),
    ] {
        write.write_all(command.as_bytes()).await.ok()?;
        let answer = reply(&mut read).await?;
        if !(answer.starts_with('2') || answer.starts_with('3')) {
            return Some(answer);
        }
    }
    write
        .write_all(format!("{message}.\r\n").as_bytes())
        .await
        .ok()?;
    let answer = reply(&mut read).await;
    let _ = write.write_all(b"QUIT\r\n").await;
    answer
}

/// `config` without the pace of Microsoft 365 (30 a minute), so that what
/// the load accepted is delivered within the test's time.
fn unpaced(config: String) -> String {
    config.replace(
        "[upstream]\n",
        "[upstream]\nmessages_per_minute = 1000000\nrecipients_per_day = 4000000000\n",
    )
}

/// The subjects the stand-in received, each as often as it came.
fn received(world: &World) -> Vec<String> {
    world
        .upstream
        .messages()
        .iter()
        .filter_map(|m| subject(&m.data))
        .collect()
}

/// The `Subject:` of a message as sent.
fn subject(message: &[u8]) -> Option<String> {
    String::from_utf8_lossy(message)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
}

/// Waits (bounded) until every subject in `accepted` was received.
async fn all_delivered(world: &World, relay: &Relay, accepted: &BTreeSet<String>) {
    for _ in 0..600 {
        let got: BTreeSet<String> = received(world).into_iter().collect();
        if accepted.is_subset(&got) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got: BTreeSet<String> = received(world).into_iter().collect();
    let lost: Vec<&String> = accepted.difference(&got).collect();
    panic!(
        "accepted but never delivered: {lost:?}\nqueue: {:?}\nlog:\n{}",
        relay.queue_json(),
        relay.log()
    );
}

#[tokio::test]
async fn twenty_sigkills_under_load_lose_nothing_accepted() {
    let world = World::start().await;
    let port = free_port();
    let config = world.write_config(&unpaced(world.config(port)));
    let mut accepted = BTreeSet::new();
    for round in 0..20 {
        let mut relay = Relay::start(&config, port).await;
        let load = Load::new().start(port, &format!("kill{round}"));
        // let some mail in, and some out, then kill it mid-flight
        tokio::time::sleep(Duration::from_millis(300 + 37 * round)).await;
        relay.kill9();
        accepted.append(&mut load.finish().await.accepted);
    }
    let relay = Relay::start(&config, port).await;
    assert!(accepted.len() > 20, "too little load: {}", accepted.len());
    all_delivered(&world, &relay, &accepted).await;
    eventually(20, "an empty queue", || relay.queue_json().is_empty()).await;
}

#[tokio::test]
async fn a_postgresql_outage_is_451_and_readyz_then_resumes_by_itself() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let port = free_port();
    let admin = free_port();
    let config = unpaced(world.config_with_admin(port, admin))
        .replace(
            "[queue]\n",
            &format!(
                "[queue]\ndatabase_url = \"{}\"\ndatabase_password_file = \"{}\"\nlease_timeout = \"6s\"\n",
                pg.url(),
                pg.password_file().display()
            ),
        );
    assert!(config.contains("database_url"), "{config}");
    let config = world.write_config(&config);
    let out = cli(&["check"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = Relay::start(&config, port).await;
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    // Its sockets listen before the store is open and migrated: ready soon
    // after, within a bound even on a loaded machine.
    assert_eq!(ready(&readyz).await, Some(200), "{}", relay.log());

    let load = Load::new().start(port, "pg");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop();
    let before = load.told(|t| t.refused.len());
    not_ready_naming_the_database(&readyz).await;
    admin_verbs_name_the_database(&config, "Connection refused").await;
    // clients are told 451 meanwhile
    load.until(|t| t.refused.len() > before).await;
    pg.restart();
    let told = resumes(load, &readyz, &relay).await;
    assert!(
        told.refused
            .iter()
            .all(|r| r.starts_with("451") || r.starts_with("421")),
        "{:?}",
        told.refused
    );
    all_delivered(&world, &relay, &told.accepted).await;
    eventually(20, "an empty queue", || relay.queue_json().is_empty()).await;
}

/// Polls `/readyz` (30 s at most) until it fails, and checks that it names
/// the database; what it said.
async fn not_ready_naming_the_database(readyz: &str) -> String {
    let mut named = String::new();
    for _ in 0..300 {
        let response = tokio::time::timeout(Duration::from_secs(2), reqwest::get(readyz)).await;
        if let Ok(Ok(response)) = response {
            let status = response.status().as_u16();
            named = response.text().await.unwrap_or_default();
            if status == 503 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        named.contains("FAIL queue database: PostgreSQL 127.0.0.1:"),
        "{named}"
    );
    named
}

/// `queue list` fails saying which database it could not reach, why
/// (`why`), and which verb checks it.
async fn admin_verbs_name_the_database(config: &std::path::Path, why: &str) {
    let config = config.to_owned();
    // beside the runtime, whose clients go on sending meanwhile
    let listed = tokio::task::spawn_blocking(move || cli(&["queue", "list"], &config))
        .await
        .expect("queue list");
    let said = String::from_utf8_lossy(&listed.stderr);
    assert!(!listed.status.success(), "{said}");
    assert!(
        said.contains("queue database PostgreSQL 127.0.0.1:")
            && said.contains("`smtp-oauth-relay doctor` checks it")
            && said.contains(why),
        "{said}"
    );
}

/// A world, and the configuration of an unpaced relay on `pg` (leases of
/// 6 s) with an admin endpoint: the world, the relay's SMTP port, its
/// configuration file and its `/readyz` URL.
async fn relay_on(pg: &Postgres) -> (World, u16, std::path::PathBuf, String) {
    let world = World::start().await;
    let (port, admin) = (free_port(), free_port());
    let config = world.write_config(&shared(
        unpaced(world.config_with_admin(port, admin)),
        pg,
        "6s",
    ));
    (
        world,
        port,
        config,
        format!("http://127.0.0.1:{admin}/readyz"),
    )
}

/// After the database came back: the relay is ready again by itself and
/// mail flows again; some client was told `451 4.3.0` meanwhile. What the
/// clients were told, all in all.
async fn resumes(load: Load, readyz: &str, relay: &Relay) -> Told {
    assert_eq!(ready(readyz).await, Some(200), "{}", relay.log());
    let accepted_before = load.told(|t| t.accepted.len());
    load.until(|t| t.accepted.len() > accepted_before + CLIENTS)
        .await;
    let told = load.finish().await;
    assert!(
        told.refused.iter().any(|r| r.starts_with("451 4.3.0")),
        "no 451 during the outage: {:?}",
        told.refused
    );
    assert!(
        told.accepted.len() > accepted_before,
        "no mail after the outage"
    );
    told
}

// A relay started while its database is down does not exit: it listens,
// answers every transaction 451 and fails /readyz naming the database, and
// opens its queue by itself once the database is up.
#[tokio::test]
async fn a_relay_started_while_postgresql_is_down_answers_451_and_opens_when_it_is_up() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let (world, port, config, readyz) = relay_on(&pg).await;
    pg.stop();
    let relay = Relay::start(&config, port).await;
    let named = not_ready_naming_the_database(&readyz).await;
    assert!(named.contains("Connection refused"), "{named}");
    let metrics = readyz.replace("/readyz", "/metrics");
    assert!(scrape(&metrics)
        .await
        .contains("smtp_relay_queue_store_up 0"));

    let load = Load::new().start(port, "late");
    load.until(|t| t.refused.len() > CLIENTS).await;
    assert!(load.told(|t| t.accepted.is_empty()), "250 with no database");
    pg.restart();
    let told = resumes(load, &readyz, &relay).await;
    assert!(
        told.refused.iter().all(|r| r.starts_with("451 4.3.0")),
        "{:?}",
        told.refused
    );
    all_delivered(&world, &relay, &told.accepted).await;
    eventually(20, "an empty queue", || relay.queue_json().is_empty()).await;
    assert!(scrape(&metrics)
        .await
        .contains("smtp_relay_queue_store_up 1"));
}

/// The text of `/metrics` at `url` (bounded).
async fn scrape(url: &str) -> String {
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        reqwest::get(url).await?.text().await
    })
    .await;
    match got {
        Ok(Ok(text)) => text,
        other => panic!("{url}: {other:?}"),
    }
}

// SIGTERM stops a relay waiting for its database at once, as any other.
#[tokio::test]
async fn sigterm_stops_a_relay_waiting_for_its_database() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let (_world, port, config, readyz) = relay_on(&pg).await;
    pg.stop();
    let mut relay = Relay::start(&config, port).await;
    not_ready_naming_the_database(&readyz).await;
    assert_eq!(relay.terminate().await, Some(0), "log:\n{}", relay.log());
    assert!(
        relay
            .log()
            .contains("shutting down before the queue opened"),
        "{}",
        relay.log()
    );
}

// A server that stops answering (hung, or its host gone silent) is not
// refused like a stopped one: connections stay open and nothing comes back.
// New messages are still told 451 within seconds (no connection comes free
// for them), /readyz fails naming the database, and when it answers again
// all resumes. Only the messages whose commit was on the wire when it hung
// wait for it, and get their true answer then.
#[tokio::test]
async fn a_postgresql_that_stops_answering_is_451_and_readyz_then_resumes() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let (world, port, config, readyz) = relay_on(&pg).await;
    let relay = Relay::start(&config, port).await;
    assert_eq!(ready(&readyz).await, Some(200), "{}", relay.log());

    let load = Load::new().start(port, "hung");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.freeze();
    let named = not_ready_naming_the_database(&readyz).await;
    assert!(named.contains("the server does not answer"), "{named}");
    admin_verbs_name_the_database(&config, "no answer within 5 s").await;
    let before = load.told(|t| t.refused.len());
    load.until(|t| t.refused.len() > before + CLIENTS).await;
    pg.thaw();
    let told = resumes(load, &readyz, &relay).await;
    let waited = told.refused.iter().filter(|r| *r == "timed out").count();
    assert!(
        waited <= CLIENTS
            && told
                .refused
                .iter()
                .all(|r| r.starts_with("451") || r == "timed out"),
        "{:?}",
        told.refused
    );
    all_delivered(&world, &relay, &told.accepted).await;
    eventually(20, "an empty queue", || relay.queue_json().is_empty()).await;
}

/// Sends `n` messages (subjects `PREFIX-0` …) to the relay on `port`, each
/// in its own session, asserting each gets `250`; their subjects.
async fn send_accepted_n(port: u16, prefix: &str, n: usize) -> BTreeSet<String> {
    let mut accepted = BTreeSet::new();
    for i in 0..n {
        let subject = format!("{prefix}-{i}");
        assert_eq!(
            try_send(port, &subject).await.as_deref().map(|r| &r[..3]),
            Some("250")
        );
        accepted.insert(subject);
    }
    accepted
}

/// Writes `text` as the configuration of a second relay, with its own
/// directory (queue spool, log) beside the world's; its path.
fn second_relay_config(world: &World, text: &str) -> std::path::PathBuf {
    let b = world.dir.path().join("b");
    std::fs::create_dir(&b).expect("mkdir");
    let text = text.replace(
        &format!("{}", world.dir.path().join("queue").display()),
        &format!("{}", b.join("queue").display()),
    );
    let config = b.join("relay.toml");
    std::fs::write(&config, text).expect("config b");
    config
}

/// `config` on the shared database of `pg`, with leases of `lease_timeout`.
fn shared(config: String, pg: &Postgres, lease_timeout: &str) -> String {
    config.replace(
        "[queue]\n",
        &format!(
            "[queue]\ndatabase_url = \"{}\"\ndatabase_password_file = \"{}\"\nlease_timeout = \"{lease_timeout}\"\n",
            pg.url(),
            pg.password_file().display()
        ),
    )
}

/// Configurations for two relays on `pg`'s database, each with its own
/// directory (spool, log) and SMTP port, the same upstream and mailbox.
fn two_relays(
    world: &World,
    pg: &Postgres,
    edit: impl Fn(String) -> String,
) -> ((std::path::PathBuf, u16), (std::path::PathBuf, u16)) {
    let (port_a, port_b) = (free_port(), free_port());
    let config_a = world.write_config(&edit(shared(unpaced(world.config(port_a)), pg, "3s")));
    let config_b = second_relay_config(
        world,
        &edit(shared(unpaced(world.config(port_b)), pg, "3s")),
    );
    ((config_a, port_a), (config_b, port_b))
}

#[tokio::test]
async fn two_relays_keep_to_three_upstream_connections_together() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    // idle sessions give their slot back soon, so both relays get turns
    let ((config_a, port_a), (config_b, port_b)) = two_relays(&world, &pg, |c| {
        c.replace("[upstream]\n", "[upstream]\nidle_timeout = \"1s\"\n")
    });
    let relay_a = Relay::start(&config_a, port_a).await;
    let relay_b = Relay::start(&config_b, port_b).await;
    let load = Load::new().start(port_a, "a").start(port_b, "b");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let told = load.finish().await;
    assert!(told.refused.is_empty(), "refused: {:?}", told.refused);
    assert!(told.accepted.len() >= 8, "accepted {:?}", told.accepted);
    all_delivered(&world, &relay_b, &told.accepted).await;
    eventually(20, "an empty queue", || relay_a.queue_json().is_empty()).await;
    let got = received(&world);
    assert_eq!(got.len(), told.accepted.len(), "a message went out twice");
    assert!(
        world.upstream.max_concurrent() <= 3,
        "{} upstream connections at once\nA:\n{}\nB:\n{}",
        world.upstream.max_concurrent(),
        relay_a.log(),
        relay_b.log()
    );
}

// Graph's request cap is the mailbox's, across relays: two relays on one
// database, both sending through a slow Graph, never have more than
// `graph.max_requests` (4) requests in flight together, and send each
// message once.
#[tokio::test]
async fn two_relays_keep_to_four_graph_requests_together() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let graph = GraphServer::start(world.idp.clone())
        .await
        .expect("stand-in graph");
    graph.set_reply_delay(Some(Duration::from_millis(300)));
    let endpoint = graph.endpoint();
    let ((config_a, port_a), (config_b, port_b)) = two_relays(&world, &pg, |c| {
        c.replacen("[[accounts]]\n", "[[accounts]]\ntransport = \"graph\"\n", 1)
            + &format!("\n[graph]\nendpoint = \"{endpoint}\"\n")
    });
    let relay_a = Relay::start(&config_a, port_a).await;
    let relay_b = Relay::start(&config_b, port_b).await;
    let mut accepted = send_accepted_n(port_a, "a", 10).await;
    accepted.extend(send_accepted_n(port_b, "b", 10).await);
    let got = graph
        .wait_for_messages(accepted.len(), Duration::from_secs(60))
        .await;
    eventually(20, "an empty queue", || relay_a.queue_json().is_empty()).await;
    let mut subjects: Vec<String> = graph
        .messages()
        .iter()
        .filter_map(|m| subject(&m.mime))
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        accepted.iter().cloned().collect::<Vec<_>>(),
        "each message once ({} seen)\nA:\n{}\nB:\n{}",
        got.len(),
        relay_a.log(),
        relay_b.log()
    );
    let peak = graph.peak_concurrency();
    assert!(peak <= 4, "{peak} Graph requests at once");
    assert!(peak >= 2, "the relays did not send side by side: {peak}");
}

#[tokio::test]
async fn mail_accepted_by_a_relay_that_dies_is_delivered_by_another() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let ((config_a, port_a), (config_b, port_b)) = two_relays(&world, &pg, |c| c);

    // A accepts while the upstream is down, then dies
    world.upstream.stop().await;
    let mut relay_a = Relay::start(&config_a, port_a).await;
    let relay_b = Relay::start(&config_b, port_b).await;
    let mut accepted = send_accepted_n(port_a, "via-a", 10).await;
    accepted.extend(send_accepted_n(port_b, "via-b", 5).await);
    // both see one queue, from either relay's host
    assert_eq!(relay_a.queue_json().len(), 15);
    assert_eq!(relay_b.queue_json().len(), 15);
    relay_a.kill9();

    // B delivers everything, A's mail included, each message once
    world.upstream.restart().await.expect("upstream back");
    all_delivered(&world, &relay_b, &accepted).await;
    eventually(20, "an empty queue", || relay_b.queue_json().is_empty()).await;
    let got = received(&world);
    assert_eq!(
        got.len(),
        accepted.len(),
        "a message went out twice: {got:?}"
    );
}

#[tokio::test]
async fn a_relay_killed_mid_load_loses_nothing_and_repeats_only_its_in_flight() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let ((config_a, port_a), (config_b, port_b)) = two_relays(&world, &pg, |c| {
        c.replace("[upstream]\n", "[upstream]\nidle_timeout = \"1s\"\n")
    });
    let mut relay_a = Relay::start(&config_a, port_a).await;
    let relay_b = Relay::start(&config_b, port_b).await;
    let load = Load::new().start(port_a, "a").start(port_b, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay_a.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let told = load.finish().await;
    assert!(
        told.accepted.iter().any(|s| s.starts_with("a-")),
        "A accepted nothing before it was killed"
    );
    all_delivered(&world, &relay_b, &told.accepted).await;
    eventually(20, "an empty queue", || relay_b.queue_json().is_empty()).await;
    let got = received(&world);
    // A's workers had at most one message each (3) in hand when it died
    assert!(
        got.len() <= told.accepted.len() + 3,
        "{} deliveries of {} accepted messages",
        got.len(),
        told.accepted.len()
    );
    assert!(
        world.upstream.max_concurrent() <= 3,
        "{} upstream connections at once",
        world.upstream.max_concurrent()
    );
}

#[tokio::test]
async fn two_relays_keep_to_one_pace_together() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    // 6 a minute: each relay alone spaces its messages 10 s apart, so two
    // that did not share the pace would send 12 a minute between them
    let ((config_a, port_a), (config_b, port_b)) = two_relays(&world, &pg, |c| {
        c.replace("messages_per_minute = 1000000", "messages_per_minute = 6")
    });
    let relay_a = Relay::start(&config_a, port_a).await;
    let relay_b = Relay::start(&config_b, port_b).await;
    for n in 0..6 {
        for (port, relay) in [(port_a, "a"), (port_b, "b")] {
            let subject = format!("{relay}-{n}");
            let reply = try_send(port, &subject).await;
            assert_eq!(reply.as_deref().map(|r| &r[..3]), Some("250"), "{subject}");
        }
    }
    world
        .upstream
        .wait_for_messages(1, Duration::from_secs(20))
        .await;
    // the first minute from the first delivery, less a margin for the poll
    tokio::time::sleep(Duration::from_secs(55)).await;
    let sent = world.upstream.messages().len();
    assert!(
        (3..=6).contains(&sent),
        "{sent} messages in under a minute at 6 a minute\nA:\n{}\nB:\n{}",
        relay_a.log(),
        relay_b.log()
    );
}

// A relay stopped with SIGTERM gives its leases up as it goes: mail it had
// leased and not yet sent (here, while its workers wait for the pace) is
// delivered by another relay at once, not when the leases would have
// expired.
#[tokio::test]
async fn a_relay_stopped_hands_its_leases_over_at_once() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let (port_a, port_b) = (free_port(), free_port());
    // A keeps Microsoft's pace (30 a minute): it leases mail ahead and waits
    let config_a = world.write_config(&shared(world.config(port_a), &pg, "60s"));
    let mut relay_a = Relay::start(&config_a, port_a).await;
    let accepted = send_accepted_n(port_a, "via-a", 10).await;
    // its workers hold leases while they wait for the pace
    eventually(20, "A holding leases", || {
        relay_a.queue_json().iter().any(|m| !m["lease"].is_null())
    })
    .await;
    assert_eq!(
        relay_a.terminate().await,
        Some(0),
        "log:\n{}",
        relay_a.log()
    );

    let config_b = second_relay_config(&world, &shared(unpaced(world.config(port_b)), &pg, "60s"));
    let relay_b = Relay::start(&config_b, port_b).await;
    // well within the 60 s the leases would have lasted
    for _ in 0..150 {
        let got: BTreeSet<String> = received(&world).into_iter().collect();
        if accepted.is_subset(&got) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received(&world);
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        accepted,
        "not delivered within 15 s of A's stop\nqueue: {:?}\nA:\n{}\nB:\n{}",
        relay_b.queue_json(),
        relay_a.log(),
        relay_b.log()
    );
    assert_eq!(
        got.len(),
        accepted.len(),
        "a message went out twice: {got:?}"
    );
}

/// `/readyz`'s status once it is 200, or the last one seen after 20 s.
async fn ready(readyz: &str) -> Option<u16> {
    for _ in 0..200 {
        if http_status(readyz).await == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    http_status(readyz).await
}
