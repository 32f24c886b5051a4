//! `bench`: throughput, latency, memory and token cost of the relay, measured
//! side by side with its alternatives on the same machine.
//!
//! It starts the test kit's identity platform and submission server
//! (STARTTLS + XOAUTH2) in this process, starts the relay as a child process
//! (the built `smtp-oauth-relay run --config …`, so its memory can be read
//! from `/proc/PID/status`), and drives it with N concurrent SMTP clients.
//! Peers, when given: Postfix (`--postfix ADDR`, set up by
//! `bench/postfix.sh`) for the accept workload, email-oauth2-proxy
//! (`--emailproxy PATH`, installed by `bench/emailproxy.sh`) for the
//! end-to-end workload, `smtp-source` (`--smtp-source PATH`) as a second
//! load generator. The postgres phase starts PostgreSQL servers of its own
//! (the test kit's) for the relay's shared queue. Everything listens on 127.0.0.1; every loop is bounded by
//! a count and a time. Figures are printed (Markdown), never asserted.
//!
//! `bench --quick` is CI-sized (seconds); `bench` is the full run recorded
//! in BENCHMARKS.md.

mod procs;
mod smtp;

use clap::Parser;
use procs::{EmailProxy, Relay, RelayOptions, MAILBOX, PROXY_PASSWORD};
use relay_standin::{GraphServer, IdentityPlatform, SubmissionServer};
use smtp::{Client, Load, LoadResult, Login};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

const RECIPIENT: &str = "someone@example.com";
/// Raised pace for the end-to-end and memory runs (the default, 30 a
/// minute, is Microsoft 365's limit and would measure the pacer).
const RAW_PACE: u32 = 1_000_000_000;
/// `upstream.max_connections` when relays share a queue on PostgreSQL: it
/// holds for the mailbox across all of them, so the one-relay and
/// two-relay runs both get twice Microsoft 365's 3, to let a second relay
/// add connections of its own.
const SHARED_UPSTREAM_CONNECTIONS: usize = 6;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmarks of smtp-oauth-relay against its alternatives"
)]
struct Args {
    /// CI-sized run (a few seconds; figures are indicative only).
    #[arg(long)]
    quick: bool,
    /// The relay binary [default: smtp-oauth-relay beside this program].
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Where queues and scratch files go (must be the disk the relay would
    /// use) [default: the system's temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Phases to run, comma-separated: fsync,accept,e2e,memory,tokens,postgres.
    #[arg(
        long,
        default_value = "fsync,accept,e2e,memory,tokens,postgres",
        value_delimiter = ','
    )]
    only: Vec<String>,
    /// Postfix's smtpd on loopback (started by `bench/postfix.sh start`):
    /// gets the same accept workload.
    #[arg(long)]
    postfix: Option<SocketAddr>,
    /// That Postfix instance's configuration directory: its queue is emptied
    /// with `postsuper -c DIR -d ALL` after each run.
    #[arg(long)]
    postfix_config: Option<PathBuf>,
    /// The `emailproxy` program (email-oauth2-proxy; `bench/emailproxy.sh
    /// install`): gets the same end-to-end workload.
    #[arg(long)]
    emailproxy: Option<PathBuf>,
    /// Postfix's `smtp-source`: also drives the 4 KB / 32-client accept
    /// workload against the relay and Postfix, as a second load generator.
    #[arg(long)]
    smtp_source: Option<PathBuf>,
    /// Clients for the accept runs.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    clients: Vec<usize>,
    /// Seconds per accept run [default: 10, quick 0.5].
    #[arg(long)]
    seconds: Option<f64>,
    /// Clients for the end-to-end runs (and the postgres phase's delivery
    /// runs).
    #[arg(long, default_value_t = 32)]
    e2e_clients: usize,
    /// Clients for the postgres phase's 4 KB accept run.
    #[arg(long, default_value_t = 32)]
    postgres_clients: usize,
    /// Messages in each end-to-end run [default: 10016, quick 160].
    #[arg(long)]
    e2e_messages: Option<usize>,
    /// Size of the large message for the memory run, bytes [default:
    /// 36,696,064 = 35 MiB less 4 KiB, under the relay's 35 MiB limit; quick
    /// 4 MiB].
    #[arg(long)]
    large: Option<usize>,
    /// Idle connections for the memory run.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Clients each holding a 10 MB message mid-way, for the memory run
    /// [default: 100, quick 10].
    #[arg(long)]
    large_clients: Option<usize>,
    /// Keep the scratch directory (queues, configs, the peers' logs).
    #[arg(long)]
    keep: bool,
    /// The relay's log level during the runs (its log goes to a file).
    #[arg(long, default_value = "info")]
    log_level: String,
}

struct Bench {
    args: Args,
    bin: PathBuf,
    work: tempfile::TempDir,
    idp: IdentityPlatform,
    /// Figures the targets are judged on, as phases produce them.
    summary: Summary,
}

#[derive(Default)]
struct Summary {
    fsync: Option<FsyncFigures>,
    /// (size, clients, peer) → result
    accept: Vec<(usize, usize, &'static str, LoadResult)>,
    /// relay/direct, relay/emailproxy
    e2e_ratio: Option<f64>,
    proxy_ratio: Option<f64>,
    /// idle, 1000 connections, large-message peak (KiB)
    memory: Option<(u64, u64, u64, usize)>,
    /// Clients, RSS with each mid-way through a 10 MB message, peak.
    concurrent_large: Option<(usize, u64, u64)>,
    /// The queue on PostgreSQL, 4 KB accept: the relay, and Postfix run
    /// beside it.
    postgres_accept: Option<(LoadResult, Option<LoadResult>)>,
    /// The queue on PostgreSQL, end to end: one relay's msg/s, two relays'.
    shared_delivery: Option<(f64, f64)>,
}

impl Summary {
    /// Prints an accept run's row and keeps it for the targets.
    fn accept_result(
        &mut self,
        size: usize,
        label: &str,
        clients: usize,
        peer: &'static str,
        r: LoadResult,
        before: &str,
    ) {
        accept_row(label, clients, peer, &r, before);
        self.accept.push((size, clients, peer, r));
    }
}

#[derive(Clone, Copy)]
struct FsyncFigures {
    single: procs::Commits,
    enqueue: procs::Commits,
    parallel: procs::Commits,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let bin = match &args.relay_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("smtp-oauth-relay"))
            .unwrap_or_default(),
    };
    anyhow::ensure!(
        bin.is_file(),
        "no relay binary at {} (build it with `cargo build --release`, or pass --relay-bin)",
        bin.display()
    );
    procs::KEEP.store(args.keep, std::sync::atomic::Ordering::Relaxed);
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("relay-bench-")
        .tempdir_in(&base)?;
    let idp = IdentityPlatform::start().await?;
    let mut bench = Bench {
        args,
        bin,
        work,
        idp,
        summary: Summary::default(),
    };
    bench.header();
    let phases = bench.args.only.clone();
    let has = |p: &str| phases.iter().any(|x| x == p);
    if has("fsync") {
        bench.fsync_phase()?;
    }
    if has("accept") {
        bench.accept_phase().await?;
    }
    let mut tokens = None;
    if has("e2e") || has("tokens") {
        tokens = Some(bench.e2e_phase(has("e2e")).await?);
    }
    if has("memory") {
        bench.memory_phase().await?;
    }
    if let Some(t) = tokens.filter(|_| has("tokens")) {
        bench.tokens_report(&t);
    }
    if has("postgres") {
        bench.postgres_phase().await?;
    }
    bench.targets();
    println!("\nload average at the end: {}", procs::loadavg());
    bench.idp.stop().await;
    if bench.args.keep {
        eprintln!("kept {}", bench.work.keep().display());
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn progress(text: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {t:7.1}s, load {}] {text}", procs::loadavg());
}

impl Bench {
    fn quick(&self) -> bool {
        self.args.quick
    }

    /// Seconds per accept run.
    fn accept_seconds(&self) -> f64 {
        self.args
            .seconds
            .unwrap_or(if self.quick() { 0.5 } else { 10.0 })
    }

    /// Messages per end-to-end run.
    fn e2e_messages(&self) -> usize {
        self.args
            .e2e_messages
            .unwrap_or(if self.quick() { 160 } else { 10_016 })
    }

    fn header(&self) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        println!(
            "# smtp-oauth-relay bench ({} mode)\n",
            if self.quick() { "quick" } else { "full" }
        );
        println!(
            "- machine: {cpu}, {cores} cores, {} GiB RAM",
            mem / 1024 / 1024
        );
        println!("- scratch/queue directory: {}", self.work.path().display());
        println!("- relay: {}", self.bin.display());
        println!("- load average at the start: {}", procs::loadavg());
        if self.quick() {
            println!("- quick mode: short runs and small counts; the figures only show that every phase works (in CI they come from a debug build)");
        }
    }

    fn fsync_phase(&mut self) -> anyhow::Result<()> {
        progress("fsync: commit loops");
        let (dur, max) = if self.quick() {
            (Duration::from_millis(300), 2_000)
        } else {
            (Duration::from_secs(5), 200_000)
        };
        let work = self.work.path();
        let file_only = procs::fsync_loop(work, 4096, dur, max)?;
        let single = procs::commit_loop(work, 4096, 1, dur, max)?;
        let enqueue = procs::commit_loop(work, 4096, 2, dur, max)?;
        let mb = procs::commit_loop(work, 1 << 20, 1, dur, max)?;
        let parallel = procs::parallel_commit_loop(work, 4096, 32, dur, max)?;
        // 4 KB body + about 400 bytes of metadata per message.
        let log = procs::log_loop(work, 4096 + 400, 32, dur, max)?;
        println!("\n## 3. Disk: the machine's commit rate (measured by the tool)\n");
        println!("| loop | commits/s | mean per commit (ms) |");
        println!("|---|---:|---:|");
        println!(
            "| write 4 KB + fsync, no rename or dir fsync (Postfix's pattern: one fsync per message) | {:.0} | {:.3} |",
            file_only.rate(),
            file_only.mean_ms()
        );
        println!(
            "| write 4 KB + fsync + rename + dir fsync | {:.0} | {:.3} |",
            single.rate(),
            single.mean_ms()
        );
        println!(
            "| relay enqueue protocol, 4 KB (2 × that: body + metadata) | {:.0} | {:.3} |",
            enqueue.rate(),
            enqueue.mean_ms()
        );
        println!(
            "| write 1 MB + fsync + rename + dir fsync | {:.0} | {:.3} |",
            mb.rate(),
            mb.mean_ms()
        );
        println!(
            "| 32 threads at once, each: write 4 KB + fsync + rename + dir fsync (sum) | {:.0} | {:.3} (per commit, overall) |",
            parallel.rate(),
            parallel.mean_ms()
        );
        println!(
            "| for comparison, a write-ahead log: 32 messages (4 KB + 400 B each) appended with one write + fdatasync | {:.0} messages/s | {:.3} per batch of 32 |",
            log.rate(),
            log.mean_ms() * 32.0
        );
        self.summary.fsync = Some(FsyncFigures {
            single,
            enqueue,
            parallel,
        });
        Ok(())
    }

    async fn upstream(&self) -> anyhow::Result<SubmissionServer> {
        Ok(SubmissionServer::start(self.idp.clone()).await?)
    }

    fn start_relay(
        &self,
        upstream: &SubmissionServer,
        messages_per_minute: Option<u32>,
    ) -> anyhow::Result<Relay> {
        self.start_relay_with(upstream, messages_per_minute, None)
    }

    fn start_relay_with(
        &self,
        upstream: &SubmissionServer,
        messages_per_minute: Option<u32>,
        graph: Option<SocketAddr>,
    ) -> anyhow::Result<Relay> {
        self.start_relay_options(
            upstream,
            RelayOptions {
                messages_per_minute,
                max_connections: 3,
                graph,
                database: None,
            },
        )
    }

    fn start_relay_options(
        &self,
        upstream: &SubmissionServer,
        options: RelayOptions<'_>,
    ) -> anyhow::Result<Relay> {
        Relay::start(
            &self.bin,
            self.work.path(),
            &self.idp,
            upstream,
            options,
            &self.args.log_level,
        )
    }

    /// The relay's end-to-end run with `transport = "graph"`: the same load,
    /// delivered through the stand-in Graph (`sendMail`, 4 requests per
    /// mailbox at most). Returns what was delivered, how long it took and
    /// the peak of concurrent Graph requests.
    async fn graph_run(&self, load: Load, wire: Arc<Vec<u8>>) -> anyhow::Result<GraphRun> {
        let limit = load.duration + Duration::from_secs(60);
        let upstream = self.upstream().await?;
        let graph = GraphServer::start(self.idp.clone()).await?;
        let addr: SocketAddr = graph.endpoint().trim_start_matches("http://").parse()?;
        let relay = self.start_relay_with(&upstream, Some(RAW_PACE), Some(addr))?;
        let before = procs::loadavg();
        let start = Instant::now();
        let sent = smtp::run(
            relay.addr,
            &Login::Plain,
            load,
            wire,
            MAILBOX,
            RECIPIENT,
            true,
        )
        .await;
        let got = graph.wait_for_messages(sent.messages, limit).await.len();
        let elapsed = start.elapsed();
        let peak = graph.peak_concurrency();
        relay.stop();
        graph.stop().await;
        upstream.stop().await;
        Ok(GraphRun {
            got,
            elapsed,
            peak,
            failed: sent.failed,
            before,
        })
    }

    fn clean_postfix(&self) {
        if let Some(dir) = &self.args.postfix_config {
            let _ = std::process::Command::new("postsuper")
                .arg("-c")
                .arg(dir)
                .args(["-d", "ALL"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    async fn accept_phase(&mut self) -> anyhow::Result<()> {
        let seconds = self.accept_seconds();
        let duration = Duration::from_secs_f64(seconds);
        let upstream = self.upstream().await?;
        println!("\n## 1. Accept throughput and latency (queue mode, fsync on)\n");
        println!(
            "Each client: one connection, EHLO once, then MAIL/RCPT/DATA in a loop for {seconds} s. Latency: end of data (`.` written) → `250`. The relay keeps its queue in its embedded store (SQLite in `queue.dir`, a fresh directory per run) and its default pace (30 messages a minute upstream), so delivery barely runs during the measurement; Postfix holds what it accepts (HOLD, no delivery). load = 1-minute load average before the run.\n"
        );
        println!("| size | clients | peer | msg/s | p50 ms | p99 ms | messages | errors | load |");
        println!("|---|---:|---|---:|---:|---:|---:|---:|---|");
        let mut second = String::new();
        for size in [4096usize, 1 << 20] {
            let wire = Arc::new(smtp::message(size, MAILBOX, RECIPIENT));
            for &clients in &self.args.clients {
                let load = Load {
                    clients,
                    per_client: 1_000_000,
                    duration,
                    connect_at_once: None,
                };
                let label = if size < 1 << 20 { "4 KB" } else { "1 MB" };
                progress(&format!("accept: relay {label} × {clients} clients"));
                settle().await;
                let before = procs::loadavg();
                let relay = self.start_relay(&upstream, None)?;
                let r = accept_run(relay.addr, load, &wire).await;
                relay.stop();
                self.summary
                    .accept_result(size, label, clients, "relay", r, &before);
                if let Some(addr) = self.args.postfix {
                    progress(&format!("accept: postfix {label} × {clients} clients"));
                    settle().await;
                    let before = procs::loadavg();
                    let r = accept_run(addr, load, &wire).await;
                    self.clean_postfix();
                    self.summary
                        .accept_result(size, label, clients, "postfix", r, &before);
                }
            }
            // Right after the 4 KB runs, before the 1 MB runs load the disk.
            if size == 4096 {
                if let Some(source) = &self.args.smtp_source {
                    second = self.smtp_source_runs(source, &upstream).await?;
                }
            }
        }
        print!("{second}");
        upstream.stop().await;
        Ok(())
    }

    /// The same 4 KB / 32-client workload from Postfix's own generator.
    async fn smtp_source_runs(
        &self,
        source: &Path,
        upstream: &SubmissionServer,
    ) -> anyhow::Result<String> {
        use std::fmt::Write as _;
        let count: usize = if self.quick() { 320 } else { 3200 };
        let mut out = String::new();
        writeln!(
            out,
            "\nSecond load generator, run right after the 4 KB runs: `smtp-source -d -s 32 -m {count} -l 4096 -M bench.local -f {MAILBOX} -t {RECIPIENT}` (32 parallel sessions, messages sent over the same connection (`-d`); wall time, connection setup included). One relay serves all its runs. Each peer first gets one untimed warm-up run, then the timed runs go relay, Postfix, Postfix, relay, so that neither always runs first.\n"
        )?;
        writeln!(out, "| peer | messages | seconds | msg/s | load |")?;
        writeln!(out, "|---|---:|---:|---:|---|")?;
        // A relay started a moment ago is slow for its first seconds (its
        // fresh queue directories' first files; 445 msg/s in a 1 s run
        // against 2,924 in a 10 s one), while Postfix's queue is long-lived:
        // without a warm-up this 3-second workload measures the start.
        let relay = self.start_relay(upstream, None)?;
        let postfix = self.args.postfix;
        let mut runs: Vec<(&str, SocketAddr, bool)> = vec![("relay", relay.addr, true)];
        if let Some(addr) = postfix {
            runs.push(("postfix", addr, true));
            runs.extend([
                ("relay", relay.addr, false),
                ("postfix", addr, false),
                ("postfix", addr, false),
            ]);
        }
        runs.push(("relay", relay.addr, false));
        for (name, addr, warm_up) in runs {
            progress(&format!("smtp-source → {name}"));
            settle().await;
            let before = procs::loadavg();
            let start = Instant::now();
            let mut command = std::process::Command::new(source);
            command
                .args(["-d", "-s", "32", "-m", &count.to_string(), "-l", "4096"])
                .args(["-M", "bench.local"])
                .args(["-f", MAILBOX, "-t", RECIPIENT])
                .arg(addr.to_string());
            let status =
                tokio::task::spawn_blocking(move || run_bounded(command, Duration::from_secs(600)))
                    .await?;
            let elapsed = start.elapsed();
            if name == "postfix" {
                self.clean_postfix();
            }
            let label = if warm_up {
                format!("{name} (warm-up, not counted)")
            } else {
                name.to_owned()
            };
            if matches!(&status, Ok(s) if s.success()) {
                writeln!(
                    out,
                    "| {label} | {count} | {:.2} | {:.0} | {before} |",
                    elapsed.as_secs_f64(),
                    count as f64 / elapsed.as_secs_f64()
                )?;
            } else {
                writeln!(
                    out,
                    "| {label} | {count} | failed: {status:?} | | {before} |"
                )?;
            }
        }
        relay.stop();
        Ok(out)
    }

    async fn e2e_phase(&mut self, print: bool) -> anyhow::Result<TokenFigures> {
        let total = self.e2e_messages();
        let clients = self.args.e2e_clients;
        let per_client = total.div_ceil(clients);
        let load = Load {
            clients,
            per_client,
            duration: Duration::from_secs(if self.quick() { 60 } else { 600 }),
            connect_at_once: None,
        };
        let limit = load.duration + Duration::from_secs(60);
        let wire = Arc::new(smtp::message(4096, MAILBOX, RECIPIENT));

        // The relay: queue mode, 3 upstream connections, pace raised.
        progress(&format!("e2e: relay, {clients} clients × {per_client}"));
        settle().await;
        let before = procs::loadavg();
        let upstream = self.upstream().await?;
        let grants_before = self.idp.requests().len();
        let relay = self.start_relay(&upstream, Some(RAW_PACE))?;
        // A relay started a moment ago is slow for its first seconds (see
        // `smtp_source_runs`); a fifth of the load, delivered before the
        // clock starts, measures it running rather than starting.
        let warm_up = Load {
            per_client: per_client.div_ceil(5),
            ..load
        };
        progress(&format!(
            "e2e: relay warm-up, {clients} clients × {}",
            warm_up.per_client
        ));
        let warm = smtp::run(
            relay.addr,
            &Login::Plain,
            warm_up,
            wire.clone(),
            MAILBOX,
            RECIPIENT,
            true,
        )
        .await;
        let warm = upstream.wait_for_messages(warm.messages, limit).await.len();
        settle().await;
        let cpu_before = (procs::cpu_time(Some(relay.pid())), procs::cpu_time(None));
        let start = Instant::now();
        let sent = smtp::run(
            relay.addr,
            &Login::Plain,
            load,
            wire.clone(),
            MAILBOX,
            RECIPIENT,
            true,
        )
        .await;
        let accepted_at = start.elapsed();
        let got = upstream
            .wait_for_messages(warm + sent.messages, limit)
            .await
            .len()
            - warm;
        let relay_elapsed = start.elapsed();
        let relay_cpu = (
            procs::cpu_time(Some(relay.pid())) - cpu_before.0,
            procs::cpu_time(None) - cpu_before.1,
        );
        let max_conns = upstream.max_concurrent();
        let relay_tokens = self.idp.requests().len() - grants_before;
        relay.stop();
        upstream.stop().await;
        let relay_rate = got as f64 / relay_elapsed.as_secs_f64();

        // Directly to the submission server: STARTTLS + XOAUTH2 per client.
        progress(&format!("e2e: direct, {clients} clients × {per_client}"));
        settle().await;
        let before_direct = procs::loadavg();
        let upstream = self.upstream().await?;
        let login = Login::Xoauth2 {
            tls: smtp::connector(&upstream.ca_pem())?,
            user: MAILBOX.into(),
            token: self.idp.mint_token("https://outlook.office365.com", 3600),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], upstream.port()));
        let cpu_before = procs::cpu_time(None);
        let direct = smtp::run(addr, &login, load, wire.clone(), MAILBOX, RECIPIENT, true).await;
        let direct_cpu = procs::cpu_time(None) - cpu_before;
        // The same messages over 3 connections only (the relay's upstream limit).
        let three = Load {
            clients: 3,
            per_client: (clients * per_client).div_ceil(3),
            ..load
        };
        let direct3 = smtp::run(addr, &login, three, wire.clone(), MAILBOX, RECIPIENT, true).await;
        upstream.stop().await;
        let direct_rate = direct.rate();

        progress(&format!(
            "e2e: relay through Graph, {clients} clients × {per_client}"
        ));
        settle().await;
        let graph = self.graph_run(load, wire.clone()).await?;

        // email-oauth2-proxy, when given.
        let mut proxy = None;
        let mut proxy3 = None;
        if let Some(program) = &self.args.emailproxy {
            progress(&format!(
                "e2e: emailproxy, {clients} clients × {per_client}"
            ));
            settle().await;
            let before_proxy = procs::loadavg();
            let upstream = self.upstream().await?;
            let grants_before = self.idp.requests().len();
            let p = EmailProxy::start(program, self.work.path(), &self.idp, &upstream)?;
            let login = Login::AuthPlain {
                user: MAILBOX.into(),
                password: PROXY_PASSWORD.into(),
            };
            let start = Instant::now();
            // Its listen backlog is 5 (`listen(5)`): more clients connecting at
            // once are lost on loopback and hang, so they connect 4 at a time.
            let load = Load {
                connect_at_once: Some(4),
                ..load
            };
            let r = smtp::run(p.addr, &login, load, wire.clone(), MAILBOX, RECIPIENT, true).await;
            let got = upstream.wait_for_messages(r.messages, limit).await.len();
            let elapsed = start.elapsed();
            let (rss, hwm) = procs::rss(p.pid()).unwrap_or_default();
            let tokens = self.idp.requests().len() - grants_before;
            p.stop();
            upstream.stop().await;
            proxy = Some((r, got, elapsed, tokens, before_proxy, rss, hwm));

            // The same messages from 3 clients: 3 upstream connections, the
            // most Microsoft 365 allows a mailbox (the stand-in does not
            // enforce it; 32 proxied connections would be throttled there).
            progress("e2e: emailproxy, 3 clients");
            settle().await;
            let upstream = self.upstream().await?;
            let p = EmailProxy::start(program, self.work.path(), &self.idp, &upstream)?;
            let three = Load {
                clients: 3,
                per_client: (clients * per_client).div_ceil(3),
                connect_at_once: Some(3),
                ..load
            };
            let start = Instant::now();
            let r = smtp::run(
                p.addr,
                &login,
                three,
                wire.clone(),
                MAILBOX,
                RECIPIENT,
                true,
            )
            .await;
            let got = upstream.wait_for_messages(r.messages, limit).await.len();
            proxy3 = Some((r, got, start.elapsed(), three.per_client));
            p.stop();
            upstream.stop().await;
        }

        self.summary.e2e_ratio = Some(relay_rate / direct_rate);
        if let Some((_, got, elapsed, ..)) = &proxy {
            self.summary.proxy_ratio = Some(relay_rate / (*got as f64 / elapsed.as_secs_f64()));
        }
        if print {
            println!("\n## 2. End-to-end throughput (first byte → upstream `250`)\n");
            println!(
                "{clients} clients × {per_client} messages of 4 KB (one connection each, login included in the time). The relay: warmed up first with a fifth of that load (delivered before the clock starts), queue mode (fsync on), `upstream.max_connections = 3`, `messages_per_minute` raised to {RAW_PACE} and `recipients_per_day` to 4,000,000,000 (the defaults, 30 a minute and 10,000 a day, are Microsoft 365's limits and would measure the pacer). Direct: each client does STARTTLS + AUTH XOAUTH2 itself on its own connection ({clients} upstream connections). email-oauth2-proxy: clients AUTH PLAIN to it with local credentials; it opens one upstream connection per client (a thread each); its listen backlog is 5, so its clients connect at most 4 at a time (connections past the backlog are lost and hang).\n"
            );
            println!("| path | upstream connections | delivered | seconds | msg/s | ratio to direct | errors | load |");
            println!("|---|---:|---:|---:|---:|---:|---:|---|");
            println!(
                "| direct (STARTTLS + XOAUTH2) | {clients} | {} | {:.2} | {:.0} | 1.00 | {} | {before_direct} |",
                direct.messages,
                direct.elapsed.as_secs_f64(),
                direct_rate,
                direct.failed
            );
            println!(
                "| direct, 3 connections ({} messages each) | 3 | {} | {:.2} | {:.0} | {:.2} | {} | {before_direct} |",
                three.per_client,
                direct3.messages,
                direct3.elapsed.as_secs_f64(),
                direct3.rate(),
                direct3.rate() / direct_rate,
                direct3.failed
            );
            println!(
                "| relay | {max_conns} (max seen) | {got} | {:.2} (all accepted after {:.2}) | {:.0} | {:.2} | {} | {before} |",
                relay_elapsed.as_secs_f64(),
                accepted_at.as_secs_f64(),
                relay_rate,
                relay_rate / direct_rate,
                sent.failed
            );
            let graph_rate = graph.got as f64 / graph.elapsed.as_secs_f64();
            println!(
                "| relay, `transport = \"graph\"` (stand-in Graph `sendMail`, not warmed up) | {} Graph requests (max seen) | {} | {:.2} | {graph_rate:.0} | {:.2} | {} | {} |",
                graph.peak,
                graph.got,
                graph.elapsed.as_secs_f64(),
                graph_rate / direct_rate,
                graph.failed,
                graph.before
            );
            if let Some((r, got, elapsed, _, before, _, _)) = &proxy {
                let rate = *got as f64 / elapsed.as_secs_f64();
                println!(
                    "| email-oauth2-proxy | {clients} | {got} | {:.2} | {rate:.0} | {:.2} | {} | {before} |",
                    elapsed.as_secs_f64(),
                    rate / direct_rate,
                    r.failed
                );
                if let Some((r, got, elapsed, each)) = &proxy3 {
                    let rate3 = *got as f64 / elapsed.as_secs_f64();
                    println!(
                        "| email-oauth2-proxy, 3 clients ({each} messages each) | 3 | {got} | {:.2} | {rate3:.0} | {:.2} | {} | |",
                        elapsed.as_secs_f64(),
                        rate3 / direct_rate,
                        r.failed
                    );
                }
                println!(
                    "\nrelay / email-oauth2-proxy = **{:.2}×** at {clients} clients",
                    relay_rate / rate
                );
                if let Some((_, got, elapsed, _)) = &proxy3 {
                    println!(
                        "\nrelay ({clients} clients, 3 upstream connections) / email-oauth2-proxy with 3 clients (3 upstream connections) = **{:.2}×**",
                        relay_rate / (*got as f64 / elapsed.as_secs_f64())
                    );
                }
            }
            cpu_report(direct_cpu, direct.messages, relay_cpu, got, direct_rate);
            for (name, r) in [("relay", &sent), ("direct", &direct)] {
                if let Some(e) = &r.first_error {
                    println!("\nfirst error ({name}): {e}");
                }
            }
            if let Some((r, ..)) = &proxy {
                if let Some(e) = &r.first_error {
                    println!("\nfirst error (email-oauth2-proxy): {e}");
                }
            }
        }
        // Token cost when every message comes on its own connection, as most
        // legacy applications send.
        let single = if self.quick() { 10 } else { 200 };
        let per_message = Load {
            clients: 1,
            per_client: 1,
            duration: Duration::from_secs(60),
            connect_at_once: None,
        };
        progress(&format!("tokens: {single} messages, one connection each"));
        let upstream = self.upstream().await?;
        let grants_before = self.idp.requests().len();
        let relay = self.start_relay(&upstream, Some(RAW_PACE))?;
        let mut sent_single = 0;
        for _ in 0..single {
            let r = smtp::run(
                relay.addr,
                &Login::Plain,
                per_message,
                wire.clone(),
                MAILBOX,
                RECIPIENT,
                true,
            )
            .await;
            sent_single += r.messages;
        }
        let got_single = upstream.wait_for_messages(sent_single, limit).await.len();
        let relay_single = (self.idp.requests().len() - grants_before, got_single);
        relay.stop();
        upstream.stop().await;
        let mut proxy_single = None;
        if let Some(program) = &self.args.emailproxy {
            let upstream = self.upstream().await?;
            let grants_before = self.idp.requests().len();
            let p = EmailProxy::start(program, self.work.path(), &self.idp, &upstream)?;
            let login = Login::AuthPlain {
                user: MAILBOX.into(),
                password: PROXY_PASSWORD.into(),
            };
            let mut sent = 0;
            for _ in 0..single {
                let r = smtp::run(
                    p.addr,
                    &login,
                    per_message,
                    wire.clone(),
                    MAILBOX,
                    RECIPIENT,
                    true,
                )
                .await;
                sent += r.messages;
            }
            let got = upstream.wait_for_messages(sent, limit).await.len();
            proxy_single = Some((self.idp.requests().len() - grants_before, got));
            p.stop();
            upstream.stop().await;
        }
        Ok(TokenFigures {
            relay_tokens,
            relay_messages: got,
            proxy: proxy.map(|(_, got, _, tokens, _, rss, hwm)| (tokens, got, rss, hwm)),
            relay_single,
            proxy_single,
        })
    }

    fn tokens_report(&self, t: &TokenFigures) {
        println!("\n## 5. Token cost\n");
        println!("Token endpoint requests (the stand-in identity platform's count) from process start to the last delivery; tokens live 1 hour. First the end-to-end runs above (long connections), then messages sent one per connection (connect, send, QUIT), as most legacy applications do.\n");
        println!("| path | token requests | messages delivered | per 10,000 messages |");
        println!("|---|---:|---:|---:|");
        let per = |tokens: usize, messages: usize| {
            if messages >= 10_000 {
                format!("{tokens} (measured over {messages})")
            } else {
                format!("n/a: {tokens} for {messages} messages")
            }
        };
        println!(
            "| relay | {} | {} | {} |",
            t.relay_tokens,
            t.relay_messages,
            per(t.relay_tokens, t.relay_messages)
        );
        if let Some((tokens, got, ..)) = t.proxy {
            println!(
                "| email-oauth2-proxy | {tokens} | {got} | {} |",
                per(tokens, got)
            );
        }
        let (tokens, got) = t.relay_single;
        println!(
            "| relay, one connection per message | {tokens} | {got} | {} |",
            per(tokens, got)
        );
        if let Some((tokens, got)) = t.proxy_single {
            println!(
                "| email-oauth2-proxy, one connection per message | {tokens} | {got} | {} |",
                per(tokens, got)
            );
        }
        if let Some((_, _, rss, hwm)) = t.proxy {
            println!(
                "\n(email-oauth2-proxy's RSS at the end of its run: {} MiB, peak {} MiB)",
                mib(rss),
                mib(hwm)
            );
        }
    }

    async fn memory_phase(&mut self) -> anyhow::Result<()> {
        let upstream = self.upstream().await?;
        // Idle: started, first token fetched, nothing else.
        progress("memory: idle relay");
        let grants_before = self.idp.requests().len();
        let relay = self.start_relay(&upstream, None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.idp.requests().len() == grants_before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle, _) = procs::rss(relay.pid())?;

        // Idle connections: each greeted and EHLO answered, then held open.
        progress(&format!("memory: {} idle connections", self.args.idle));
        // Opened 100 at a time: a relay may pause before its greeting.
        let mut conns = Vec::with_capacity(self.args.idle);
        let mut refused = 0;
        let mut left = self.args.idle;
        while left > 0 {
            let batch = left.min(100);
            left -= batch;
            let mut opening = tokio::task::JoinSet::new();
            for _ in 0..batch {
                opening.spawn(Client::connect(relay.addr));
            }
            while let Some(opened) = opening.join_next().await {
                match opened {
                    Ok(Ok(c)) => conns.push(c),
                    _ => refused += 1,
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (with_conns, _) = procs::rss(relay.pid())?;
        let open = conns.len();
        drop(conns);
        relay.stop();

        // One large message through a fresh relay delivering at once: peak
        // RSS from receiving it to the upstream's 250.
        let size = self.args.large.unwrap_or(if self.quick() {
            4 << 20
        } else {
            (35 << 20) - 4096
        });
        progress(&format!("memory: relaying one {size}-byte message"));
        let grants_before = self.idp.requests().len();
        let relay = self.start_relay(&upstream, Some(RAW_PACE))?;
        let pid = relay.pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.idp.requests().len() == grants_before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (before_large, _) = procs::rss(pid)?;
        procs::reset_peak(pid);
        let wire = Arc::new(smtp::message(size, MAILBOX, RECIPIENT));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = tokio::spawn({
            let done = done.clone();
            async move {
                let mut peak = 0;
                for _ in 0..60_000 {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match procs::rss(pid) {
                        Ok((rss, _)) => peak = peak.max(rss),
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                peak
            }
        });
        let load = Load {
            clients: 1,
            per_client: 1,
            duration: Duration::from_secs(120),
            connect_at_once: None,
        };
        let start = Instant::now();
        let sent = smtp::run(
            relay.addr,
            &Login::Plain,
            load,
            wire,
            MAILBOX,
            RECIPIENT,
            true,
        )
        .await;
        let got = upstream
            .wait_for_messages(sent.messages, Duration::from_secs(120))
            .await;
        let elapsed = start.elapsed();
        let delivered = got.first().map(|m| m.data.len()).unwrap_or(0);
        let (after, hwm) = procs::rss(pid)?;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let sampled = sampler.await.unwrap_or(0);
        relay.stop();
        let concurrent = self.concurrent_large(&upstream).await?;
        upstream.stop().await;

        println!("\n## 4. Memory (relay RSS from /proc/PID/status)\n");
        println!("| state | RSS MiB |");
        println!("|---|---:|");
        println!("| idle (listening, first token fetched) | {} |", mib(idle));
        println!(
            "| {open} idle connections (greeted; {refused} refused) | {} |",
            mib(with_conns)
        );
        println!(
            "| relaying one {:.1} MiB message: before | {} |",
            size as f64 / 1048576.0,
            mib(before_large)
        );
        println!(
            "| relaying one {:.1} MiB message: peak (VmHWM, reset before; sampled every 5 ms: {} MiB) | **{}** |",
            size as f64 / 1048576.0,
            mib(sampled),
            mib(hwm.max(sampled))
        );
        println!("| after delivery | {} |", mib(after));
        println!(
            "\nThe large message: accepted {}, delivered upstream {} bytes, {:.2} s first byte → upstream 250.",
            if sent.messages == 1 { "yes" } else { "NO" },
            delivered,
            elapsed.as_secs_f64()
        );
        if let Some(e) = &sent.first_error {
            println!("first error: {e}");
        }
        let (clients, mid_way, peak, accepted) = concurrent;
        println!("\n| RSS under {clients} concurrent 10 MB messages | RSS MiB |\n|---|---:|");
        println!(
            "| each client mid-way (5 MB sent, message in progress) | **{}** |",
            mib(mid_way)
        );
        println!(
            "| peak (VmHWM) until every end of data is answered | {} |",
            mib(peak)
        );
        println!("\n{accepted} of {clients} messages accepted (250).");
        self.summary.memory = Some((idle, with_conns, hwm.max(sampled), open));
        self.summary.concurrent_large = Some((clients, mid_way, peak));
        Ok(())
    }

    /// RSS while many clients are each mid-way through a 10 MB message
    /// (the listener spools each to disk past a threshold), then the peak
    /// until all are accepted. Returns (clients, mid-way RSS, peak,
    /// accepted).
    async fn concurrent_large(
        &self,
        upstream: &SubmissionServer,
    ) -> anyhow::Result<(usize, u64, u64, usize)> {
        const SIZE: usize = 10_000_000;
        let clients = self
            .args
            .large_clients
            .unwrap_or(if self.quick() { 10 } else { 100 });
        progress(&format!(
            "memory: {clients} clients each mid-way through a 10 MB message"
        ));
        let relay = self.start_relay(upstream, None)?;
        let pid = relay.pid();
        let wire = Arc::new(smtp::message(SIZE, MAILBOX, RECIPIENT));
        let half = wire.len() / 2;
        procs::reset_peak(pid);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(clients);
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (wire, ready, mut go) = (wire.clone(), ready_tx.clone(), go_rx.clone());
            let addr = relay.addr;
            tasks.spawn(async move {
                let started = async {
                    let mut c = Client::open(addr, &Login::Plain, None).await?;
                    c.start_message(MAILBOX, RECIPIENT, &wire[..half]).await?;
                    anyhow::Ok(c)
                }
                .await;
                let _ = ready.send(started.is_ok()).await;
                let mut c = started?;
                go.wait_for(|go| *go).await?;
                c.end_message(&wire[half..]).await?;
                c.quit().await;
                anyhow::Ok(())
            });
        }
        drop(ready_tx);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut ready = 0;
        while ready < clients {
            match tokio::time::timeout_at(deadline.into(), ready_rx.recv()).await {
                Ok(Some(_)) => ready += 1,
                Ok(None) | Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (mid_way, _) = procs::rss(pid)?;
        let _ = go_tx.send(true);
        let mut accepted = 0;
        let mut first_error = None;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline.into(), tasks.join_next()).await
        {
            match done {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(e)) => {
                    first_error.get_or_insert_with(|| e.to_string());
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let (_, peak) = procs::rss(pid)?;
        relay.stop();
        if let Some(e) = first_error {
            println!("\nConcurrent 10 MB messages, first error: {e}");
        }
        Ok((clients, mid_way, peak.max(mid_way), accepted))
    }

    /// The queue on PostgreSQL (a server of its own on this machine, a new
    /// one per run): the 4 KB accept workload beside Postfix, then end to
    /// end through one relay and through two relays sharing the database.
    async fn postgres_phase(&mut self) -> anyhow::Result<()> {
        let seconds = self.accept_seconds();
        let clients = self.args.postgres_clients;
        let load = Load {
            clients,
            per_client: 1_000_000,
            duration: Duration::from_secs_f64(seconds),
            connect_at_once: None,
        };
        let wire = Arc::new(smtp::message(4096, MAILBOX, RECIPIENT));
        progress(&format!("postgres: accept, relay 4 KB × {clients} clients"));
        let database = procs::start_postgres().await?;
        let upstream = self.upstream().await?;
        settle().await;
        let before = procs::loadavg();
        let relay = self.start_relay_options(
            &upstream,
            RelayOptions {
                messages_per_minute: None,
                max_connections: 3,
                graph: None,
                database: Some(&database),
            },
        )?;
        let relay_result = accept_run(relay.addr, load, &wire).await;
        relay.stop();
        upstream.stop().await;
        drop(database);
        println!(
            "\n## 6. The queue on PostgreSQL (`[queue] database_url`, a server on this machine)\n"
        );
        println!(
            "A PostgreSQL server of its own for each run, started the way the tests start theirs (the distribution's `initdb` and `pg_ctl` in a temporary directory, on 127.0.0.1 and a free port; fsync and `synchronous_commit` on, the defaults), so each run starts on an empty database. First the accept workload of section 1: 4 KB, {clients} clients, {seconds} s, default pace; Postfix gets the same right after.\n"
        );
        println!("| size | clients | peer | msg/s | p50 ms | p99 ms | messages | errors | load |");
        println!("|---|---:|---|---:|---:|---:|---:|---:|---|");
        accept_row("4 KB", clients, "relay, PostgreSQL", &relay_result, &before);
        let mut postfix_result = None;
        if let Some(addr) = self.args.postfix {
            progress(&format!(
                "postgres: accept, postfix 4 KB × {clients} clients"
            ));
            settle().await;
            let before = procs::loadavg();
            let r = accept_run(addr, load, &wire).await;
            self.clean_postfix();
            accept_row("4 KB", clients, "postfix", &r, &before);
            postfix_result = Some(r);
        }
        self.summary.postgres_accept = Some((relay_result, postfix_result));

        let clients = self.args.e2e_clients;
        let per_client = self.e2e_messages().div_ceil(clients);
        let one = self.shared_run(1, clients, per_client, &wire).await?;
        let two = self.shared_run(2, clients, per_client, &wire).await?;
        println!(
            "\nThen end to end as in section 2 (first byte → the stand-in's `250` for the last message; {clients} clients × {per_client} messages of 4 KB, not warmed up), through one relay, then through two relays on one database with the clients split between them. Pace raised as in section 2; `upstream.max_connections = {SHARED_UPSTREAM_CONNECTIONS}` in both runs (a limit for the mailbox across all relays on the database; the stand-in itself limits nothing), so that the connections do not cap the second relay.\n"
        );
        println!("| relays | upstream connections (max seen) | delivered | seconds | msg/s | errors | load |");
        println!("|---:|---:|---:|---:|---:|---:|---|");
        for (relays, run) in [(1, &one), (2, &two)] {
            println!(
                "| {relays} | {} | {} | {:.2} | {:.0} | {} | {} |",
                run.max_connections,
                run.delivered,
                run.elapsed.as_secs_f64(),
                run.rate(),
                run.failed,
                run.before
            );
        }
        println!(
            "\ntwo relays / one relay = **{:.2}×**",
            two.rate() / one.rate().max(1e-9)
        );
        for (relays, run) in [(1, &one), (2, &two)] {
            if let Some(e) = &run.first_error {
                println!("\nfirst error ({relays} relays): {e}");
            }
        }
        self.summary.shared_delivery = Some((one.rate(), two.rate()));
        Ok(())
    }

    /// `relays` relays on one new PostgreSQL database, `clients` clients
    /// split between them, each sending `per_client` messages: first byte
    /// to the stand-in's `250` for the last one.
    async fn shared_run(
        &self,
        relays: usize,
        clients: usize,
        per_client: usize,
        wire: &Arc<Vec<u8>>,
    ) -> anyhow::Result<SharedRun> {
        progress(&format!(
            "postgres: end to end, {relays} relay(s) on one database, {clients} clients × {per_client}"
        ));
        let database = procs::start_postgres().await?;
        let upstream = self.upstream().await?;
        let options = RelayOptions {
            messages_per_minute: Some(RAW_PACE),
            max_connections: SHARED_UPSTREAM_CONNECTIONS,
            graph: None,
            database: Some(&database),
        };
        let started = (0..relays)
            .map(|_| self.start_relay_options(&upstream, options))
            .collect::<anyhow::Result<Vec<Relay>>>()?;
        settle().await;
        let before = procs::loadavg();
        let duration = Duration::from_secs(if self.quick() { 60 } else { 600 });
        let start = Instant::now();
        let mut sending = tokio::task::JoinSet::new();
        for (i, relay) in started.iter().enumerate() {
            let load = Load {
                clients: clients / relays + usize::from(i < clients % relays),
                per_client,
                duration,
                connect_at_once: None,
            };
            let (addr, wire) = (relay.addr, wire.clone());
            sending.spawn(async move {
                let login = Login::Plain;
                smtp::run(addr, &login, load, wire, MAILBOX, RECIPIENT, true).await
            });
        }
        let (mut sent, mut failed, mut first_error) = (0, 0, None);
        while let Some(done) = sending.join_next().await {
            let r = done?;
            sent += r.messages;
            failed += r.failed;
            first_error = first_error.or(r.first_error);
        }
        let delivered = upstream
            .wait_for_messages(sent, duration + Duration::from_secs(60))
            .await
            .len();
        let elapsed = start.elapsed();
        let max_connections = upstream.max_concurrent();
        for relay in started {
            relay.stop();
        }
        upstream.stop().await;
        drop(database);
        Ok(SharedRun {
            delivered,
            failed,
            elapsed,
            max_connections,
            before,
            first_error,
        })
    }

    /// The targets against what this run measured.
    fn targets(&self) {
        let s = &self.summary;
        println!("\n## Targets\n");
        println!("| target | measured | verdict |");
        println!("|---|---|---|");
        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        let find = |size: usize, clients: usize, peer: &str| {
            s.accept
                .iter()
                .find(|(sz, c, p, _)| *sz == size && *c == clients && *p == peer)
                .map(|(.., r)| r)
        };
        if let (Some(f), Some(r)) = (s.fsync, find(4096, 32, "relay")) {
            let goal = 0.5 * f.single.rate();
            println!(
                "| accept, 4 KB, 32 clients ≥ 50 % × fsync-commit rate × batch (one thread's rate {:.0}/s, batch = 1 as the relay has no group commit: {:.0} msg/s) | {:.0} msg/s = {:.0} % of the commit rate (concurrent commits overlap in the file system and the disk: 32 threads reach {:.0} commits/s, {:.0} % of that) | {} |",
                f.single.rate(),
                goal,
                r.rate(),
                100.0 * r.rate() / f.single.rate(),
                f.parallel.rate(),
                100.0 * r.rate() / f.parallel.rate(),
                verdict(r.rate() >= goal)
            );
        }
        for size in [4096usize, 1 << 20] {
            if let (Some(r), Some(p)) = (find(size, 32, "relay"), find(size, 32, "postfix")) {
                println!(
                    "| accept, {}, 32 clients: ahead of Postfix | relay {:.0} vs Postfix {:.0} msg/s ({:.2}×) | {} |",
                    if size == 4096 { "4 KB" } else { "1 MB" },
                    r.rate(),
                    p.rate(),
                    r.rate() / p.rate().max(1e-9),
                    verdict(r.rate() > p.rate())
                );
            }
        }
        if let (Some(f), Some(r)) = (s.fsync, find(4096, 1, "relay")) {
            let goal = f.single.mean_ms() + 1.0;
            let p50 = r.percentile(50.0).as_secs_f64() * 1000.0;
            println!(
                "| added p50 latency (4 KB, 1 client) ≤ one fsync-commit + 1 ms = {goal:.2} ms | {p50:.2} ms (the enqueue protocol alone takes {:.2} ms here) | {} |",
                f.enqueue.mean_ms(),
                verdict(p50 <= goal)
            );
        }
        if let Some(ratio) = s.e2e_ratio {
            println!(
                "| end-to-end relay/direct ≥ 0.9 (3 upstream connections) | {ratio:.2} | {} |",
                verdict(ratio >= 0.9)
            );
        }
        if let Some((idle, conns, peak, open)) = s.memory {
            println!(
                "| idle RSS ≤ 15 MB | {} MiB | {} |",
                mib(idle),
                verdict(idle <= 15 * 1024)
            );
            println!(
                "| {open} idle connections ≤ 64 MB | {} MiB | {} |",
                mib(conns),
                verdict(conns <= 64 * 1024 && open >= 1000)
            );
            println!(
                "| one large message peaks < 100 MB | {} MiB | {} |",
                mib(peak),
                verdict(peak < 100 * 1024)
            );
        }
        if let Some((clients, mid_way, peak)) = s.concurrent_large {
            println!(
                "| {clients} clients each mid-way through a 10 MB message ≤ 300 MB | {} MiB (peak {} MiB) | {} |",
                mib(mid_way),
                mib(peak),
                verdict(mid_way <= 300 * 1024 && peak <= 300 * 1024)
            );
        }
        if let Some(ratio) = s.proxy_ratio {
            println!(
                "| ≥ 10× email-oauth2-proxy end-to-end at {} clients | {ratio:.1}× | {} |",
                self.args.e2e_clients,
                verdict(ratio >= 10.0)
            );
        }
        // The queue in a SQL store: the embedded one (the accept and e2e
        // phases), and PostgreSQL.
        if let (Some(r), Some(p)) = (find(4096, 32, "relay"), find(4096, 32, "postfix")) {
            println!(
                "| SQL store: embedded, accept 4 KB, 32 clients ≥ 10,000 msg/s and ≥ 4× Postfix | {:.0} msg/s, {:.2}× Postfix ({:.0} msg/s) | {} |",
                r.rate(),
                r.rate() / p.rate().max(1e-9),
                p.rate(),
                verdict(r.rate() >= 10_000.0 && r.rate() >= 4.0 * p.rate())
            );
        }
        if let (Some(r), Some(p)) = (find(4096, 1, "relay"), find(4096, 1, "postfix")) {
            println!(
                "| SQL store: embedded, accept 4 KB, 1 client: ahead of Postfix | relay {:.0} vs Postfix {:.0} msg/s ({:.2}×) | {} |",
                r.rate(),
                p.rate(),
                r.rate() / p.rate().max(1e-9),
                verdict(r.rate() > p.rate())
            );
        }
        if let Some(ratio) = s.e2e_ratio {
            println!(
                "| SQL store: end-to-end relay/direct ≥ 0.3 | {ratio:.2} | {} |",
                verdict(ratio >= 0.3)
            );
        }
        if let Some(ratio) = s.proxy_ratio {
            println!(
                "| SQL store: ≥ 3× email-oauth2-proxy end-to-end at {} clients | {ratio:.2}× | {} |",
                self.args.e2e_clients,
                verdict(ratio >= 3.0)
            );
        }
        if let Some((r, Some(p))) = &s.postgres_accept {
            println!(
                "| SQL store: PostgreSQL, accept 4 KB, {} clients: ahead of Postfix | relay {:.0} vs Postfix {:.0} msg/s ({:.2}×) | {} |",
                self.args.postgres_clients,
                r.rate(),
                p.rate(),
                r.rate() / p.rate().max(1e-9),
                verdict(r.rate() > p.rate())
            );
        }
        if let Some((one, two)) = s.shared_delivery {
            let ratio = two / one.max(1e-9);
            println!(
                "| SQL store: two relays on one PostgreSQL deliver ≥ 1.6× one | {two:.0} vs {one:.0} msg/s ({ratio:.2}×) | {} |",
                verdict(ratio >= 1.6)
            );
        }
    }
}

struct TokenFigures {
    relay_tokens: usize,
    relay_messages: usize,
    /// email-oauth2-proxy: token requests, messages, RSS and peak (KiB).
    proxy: Option<(usize, usize, u64, u64)>,
    /// (token requests, messages) with one connection per message.
    relay_single: (usize, usize),
    proxy_single: Option<(usize, usize)>,
}

/// Where the end-to-end runs spend CPU, and the rate the relay path could
/// reach if CPU were its only limit.
fn cpu_report(
    direct: Duration,
    direct_messages: usize,
    (relay, bench): (Duration, Duration),
    relay_messages: usize,
    direct_rate: f64,
) {
    let per_1000 = |cpu: Duration, n: usize| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
    let direct_ms = per_1000(direct, direct_messages);
    let relay_ms = per_1000(relay, relay_messages);
    let bench_ms = per_1000(bench, relay_messages);
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let ceiling = cores * 1e6 / (relay_ms + bench_ms);
    println!(
        "\nCPU time per 1,000 messages (user + system, /proc/PID/stat): direct {direct_ms:.0} ms (the bench process: clients and stand-in server); through the relay {:.0} ms = relay process {relay_ms:.0} ms + bench process {bench_ms:.0} ms. With {cores:.0} cores and nothing else running, CPU alone caps the relay path at {ceiling:.0} msg/s, **{:.2}** of direct.",
        relay_ms + bench_ms,
        ceiling / direct_rate,
    );
}

/// One timed accept run against `addr`: plain SMTP, no wait for delivery.
async fn accept_run(addr: SocketAddr, load: Load, wire: &Arc<Vec<u8>>) -> LoadResult {
    smtp::run(
        addr,
        &Login::Plain,
        load,
        wire.clone(),
        MAILBOX,
        RECIPIENT,
        false,
    )
    .await
}

fn accept_row(size: &str, clients: usize, peer: &str, r: &LoadResult, load: &str) {
    println!(
        "| {size} | {clients} | {peer} | {:.0} | {} | {} | {} | {} | {load} |",
        r.rate(),
        ms(r.percentile(50.0)),
        ms(r.percentile(99.0)),
        r.messages,
        r.failed
    );
    if let Some(e) = &r.first_error {
        eprintln!("  {peer} {size} × {clients}: first error: {e}");
    }
}

/// Runs `command`, killing it if it outlives `limit`.
fn run_bounded(
    mut command: std::process::Command,
    limit: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets the disk write back what earlier runs left dirty (`sync`, bounded),
/// so a run does not pay for its predecessor's writes.
async fn settle() {
    let sync = tokio::task::spawn_blocking(|| {
        run_bounded(std::process::Command::new("sync"), Duration::from_secs(120))
    });
    let _ = sync.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// An end-to-end run through relays sharing one PostgreSQL database.
struct SharedRun {
    delivered: usize,
    failed: usize,
    elapsed: Duration,
    max_connections: usize,
    before: String,
    first_error: Option<String>,
}

impl SharedRun {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The relay's end-to-end run through the stand-in Graph.
struct GraphRun {
    got: usize,
    elapsed: Duration,
    peak: usize,
    failed: usize,
    before: String,
}
