//! The processes under test (the relay, email-oauth2-proxy), their memory as
//! the kernel reports it, and the disk's own commit rate.

use anyhow::{bail, Context as _};
use relay_standin::{IdentityPlatform, RelayConfig, Section, SubmissionServer};
use relay_testkit::Postgres;
use std::{
    fs::{self, File},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Set by `--keep`: leave every directory (configs, logs, queues) behind.
pub static KEEP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn remove_dir(dir: &Path) {
    if KEEP.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The mailbox the stand-in submission server accepts.
pub const MAILBOX: &str = "relay@contoso.com";

/// A free port on 127.0.0.1 for a peer to bind next, outside the range
/// the kernel hands to other sockets meanwhile.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(relay_standin::reserved_port()?)
}

/// Resident set size and its peak (VmRSS, VmHWM) of `pid`, in KiB.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU time (user + system, every thread) used so far by `pid`, or by this
/// process with `None`.
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let ticks = fs::read_to_string(path).ok().and_then(|stat| {
        // After the command name (which may hold spaces), utime and stime
        // are the 12th and 13th fields.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n)?.parse::<u64>().ok();
        Some(field(11)? + field(12)?)
    });
    // USER_HZ is 100 on every Linux ABI.
    Duration::from_millis(ticks.unwrap_or(0) * 10)
}

/// Resets the kernel's peak-RSS record of `pid` (VmHWM), so a later read
/// shows the peak of what happened since.
pub fn reset_peak(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// How the relay under test is configured.
#[derive(Clone, Copy)]
pub struct RelayOptions<'a> {
    /// `upstream.messages_per_minute`; `None` keeps the default (30).
    pub messages_per_minute: Option<u32>,
    pub max_connections: usize,
    /// Deliver through Microsoft Graph at this (stand-in) address instead
    /// of SMTP: `transport = "graph"`.
    pub graph: Option<SocketAddr>,
    /// Keep the queue in this PostgreSQL server (`queue.database_url` and
    /// `database_password_file`) instead of the embedded store in
    /// `queue.dir`.
    pub database: Option<&'a Postgres>,
}

/// A relay started as a child process: `smtp-oauth-relay run --config …`.
pub struct Relay {
    process: Spawned,
    pub addr: SocketAddr,
}

impl Relay {
    /// Writes a configuration pointing at `idp` and `upstream`, starts the
    /// relay and waits (bounded) until it greets on its port.
    pub fn start(
        bin: &Path,
        work: &Path,
        idp: &IdentityPlatform,
        upstream: &SubmissionServer,
        options: RelayOptions<'_>,
        log_level: &str,
    ) -> anyhow::Result<Relay> {
        let dir = tempfile::Builder::new()
            .prefix("relay-")
            .tempdir_in(work)?
            .keep();
        fs::write(dir.join("ca.pem"), upstream.ca_pem())?;
        fs::write(dir.join("client-secret"), idp.client_secret())?;
        // Limits of newer relays that would cap the load generator rather
        // than measure the relay (one source address here); an older relay
        // that does not know the keys is started without them.
        let extras = "max_connections = 100000\nmax_connections_per_ip = 100000\n";
        match Relay::start_with(bin, &dir, idp, upstream, options, log_level, extras) {
            Err(e) if format!("{e:#}").contains("unknown field") => {
                Relay::start_with(bin, &dir, idp, upstream, options, log_level, "")
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_with(
        bin: &Path,
        dir: &Path,
        idp: &IdentityPlatform,
        upstream: &SubmissionServer,
        options: RelayOptions<'_>,
        log_level: &str,
        listener_extras: &str,
    ) -> anyhow::Result<Relay> {
        let dir = dir.to_path_buf();
        let port = free_port()?;
        let pacing = match options.messages_per_minute {
            // raised for raw throughput; the day limit is raised with it
            Some(n) => format!("messages_per_minute = {n}\nrecipients_per_day = 4000000000\n"),
            None => String::new(),
        };
        let mut config = RelayConfig::new(idp, upstream, &dir)
            .listener(format!("127.0.0.1:{port}"), "relay.bench")
            .extra(Section::Listener, listener_extras)
            .admin("127.0.0.1:0")
            .account("bench")
            .extra(
                Section::Upstream,
                &format!("max_connections = {}\n{pacing}", options.max_connections),
            )
            .extra(Section::Queue, "retry_initial = \"5s\"\n")
            .extra(Section::Queue, &shared_queue(options.database))
            .extra(Section::End, &format!("\n[log]\nlevel = \"{log_level}\"\n"));
        if let Some(graph) = options.graph {
            config = config
                .extra(
                    Section::Account,
                    &format!("transport = \"graph\"\n{pacing}"),
                )
                .extra(
                    Section::End,
                    &format!("\n[graph]\nendpoint = \"http://{graph}\"\n"),
                );
        }
        let config = config.to_toml();
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config)?;
        let log = File::create(dir.join("relay.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("SMTP_OAUTH_RELAY_CONFIG")
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut relay = Relay {
            process: Spawned { child, dir },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        relay.wait_listening()?;
        Ok(relay)
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.process.child.try_wait()? {
                let log =
                    fs::read_to_string(self.process.dir.join("relay.log")).unwrap_or_default();
                bail!("the relay exited ({status}) before listening:\n{log}");
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the relay did not listen on {} within 30 s", self.addr)
    }

    /// SIGTERM, a bounded wait, then SIGKILL; removes its directory.
    pub fn stop(self) {
        self.process.stop();
    }
}

/// The `[queue]` keys that put the queue in `database`; none for the
/// embedded store.
fn shared_queue(database: Option<&Postgres>) -> String {
    database.map_or_else(String::new, |db| {
        format!(
            "database_url = \"{}\"\ndatabase_password_file = \"{}\"\n",
            db.url(),
            db.password_file().display()
        )
    })
}

/// A PostgreSQL server of its own, started the way the tests start theirs
/// (`initdb` and `pg_ctl` in a temporary directory, as the `postgres` user
/// when run as root, on a free port on 127.0.0.1; stopped and removed when
/// dropped): an empty database for each run, as each embedded-store run
/// gets a fresh queue directory.
pub async fn start_postgres() -> anyhow::Result<Postgres> {
    tokio::task::spawn_blocking(Postgres::start)
        .await
        .context("starting PostgreSQL")?
        .context("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): install Debian's `postgresql` package, or leave out the postgres phase")
}

/// A child process and the scratch directory it runs in: stopped (SIGTERM,
/// a bounded wait, then SIGKILL) and its directory removed by `stop`;
/// killed if dropped while running.
struct Spawned {
    child: Child,
    dir: PathBuf,
}

impl Spawned {
    fn stop(mut self) {
        stop_child(&mut self.child);
        remove_dir(&self.dir);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stop_child(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// email-oauth2-proxy (PyPI `emailproxy`) as a child process, in
/// client-credentials mode against the stand-ins; clients log in to it with
/// AUTH PLAIN as `MAILBOX` and a local password.
pub struct EmailProxy {
    process: Spawned,
    pub addr: SocketAddr,
}

/// The local password the proxy's clients log in with (it only encrypts the
/// proxy's token cache).
pub const PROXY_PASSWORD: &str = "local-bench-password";

impl EmailProxy {
    pub fn start(
        program: &Path,
        work: &Path,
        idp: &IdentityPlatform,
        upstream: &SubmissionServer,
    ) -> anyhow::Result<EmailProxy> {
        let dir = tempfile::Builder::new()
            .prefix("emailproxy-")
            .tempdir_in(work)?
            .keep();
        let ca = dir.join("ca.pem");
        fs::write(&ca, upstream.ca_pem())?;
        let port = free_port()?;
        let config = format!(
            r#"[SMTP-{port}]
server_address = localhost
server_port = {upstream_port}
server_starttls = True
local_address = 127.0.0.1

[{MAILBOX}]
token_url = {authority}/{tenant}/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = {client}
client_secret = {secret}
"#,
            upstream_port = upstream.port(),
            authority = idp.authority(),
            tenant = idp.tenant(),
            client = idp.client_id(),
            secret = idp.client_secret(),
        );
        let config_path = dir.join("emailproxy.config");
        fs::write(&config_path, config)?;
        let log = File::create(dir.join("emailproxy.out"))?;
        let child = Command::new(program)
            .arg("--no-gui")
            .arg("--config-file")
            .arg(&config_path)
            .arg("--cache-store")
            .arg(dir.join("cache.config"))
            .arg("--log-file")
            .arg(dir.join("emailproxy.log"))
            .args(std::env::var_os("BENCH_EMAILPROXY_DEBUG").map(|_| "--debug"))
            .env("SSL_CERT_FILE", &ca)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut proxy = EmailProxy {
            process: Spawned { child, dir },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proxy.process.child.try_wait()? {
                let out = fs::read_to_string(proxy.process.dir.join("emailproxy.out"))
                    .unwrap_or_default();
                bail!("emailproxy exited ({status}) before listening:\n{out}");
            }
            if std::net::TcpStream::connect_timeout(&proxy.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                bail!("emailproxy did not listen on {} within 30 s", proxy.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub fn stop(self) {
        self.process.stop();
    }
}

/// What a commit loop measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Commits {
    pub count: u64,
    pub elapsed: Duration,
}

impl Commits {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn mean_ms(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1000.0 / (self.count.max(1) as f64)
    }
}

/// The disk's commit rate, the way a queue commits: `files` files of `size`
/// bytes each written and fsynced in `tmp/`, each renamed into its own
/// directory, each of those directories fsynced. `files = 1` is the plain
/// write + fsync + rename + dir fsync loop; `files = 2` is exactly what the
/// relay's enqueue does per message (body and metadata). Runs for
/// `duration` or `max` iterations, whichever is first.
pub fn commit_loop(
    work: &Path,
    size: usize,
    files: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<Commits> {
    let root = tempfile::Builder::new().prefix("fsync-").tempdir_in(work)?;
    let tmp = root.path().join("tmp");
    fs::create_dir(&tmp)?;
    let dirs: Vec<PathBuf> = (0..files)
        .map(|i| root.path().join(format!("d{i}")))
        .collect();
    for d in &dirs {
        fs::create_dir(d)?;
    }
    let data = vec![b'x'; size];
    let start = Instant::now();
    let mut count = 0;
    while count < max && start.elapsed() < duration {
        for (i, d) in dirs.iter().enumerate() {
            let from = tmp.join(format!("{count}.{i}"));
            let mut f = File::create(&from)?;
            f.write_all(&data)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&from, d.join(count.to_string()))?;
            File::open(d)?.sync_all()?;
        }
        count += 1;
    }
    Ok(Commits {
        count,
        elapsed: start.elapsed(),
    })
}

/// Write + fsync of a new file, nothing else (what Postfix's cleanup does
/// per message before its 250: the queue file is renamed, but neither the
/// rename nor the directory is synced).
pub fn fsync_loop(
    work: &Path,
    size: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<Commits> {
    let root = tempfile::Builder::new().prefix("fsync-").tempdir_in(work)?;
    let data = vec![b'x'; size];
    let start = Instant::now();
    let mut count = 0;
    while count < max && start.elapsed() < duration {
        let mut f = File::create(root.path().join(count.to_string()))?;
        f.write_all(&data)?;
        f.sync_all()?;
        count += 1;
    }
    Ok(Commits {
        count,
        elapsed: start.elapsed(),
    })
}

/// Group commit into a write-ahead log, the alternative to a file per
/// message: `batch` records of `size` bytes appended to one file with a
/// single write and an fdatasync. Counts records (messages), not batches.
pub fn log_loop(
    work: &Path,
    size: usize,
    batch: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<Commits> {
    let root = tempfile::Builder::new().prefix("fsync-").tempdir_in(work)?;
    let mut log = File::create(root.path().join("log"))?;
    let data = vec![b'x'; size * batch];
    let start = Instant::now();
    let mut count = 0;
    while count < max && start.elapsed() < duration {
        log.write_all(&data)?;
        log.sync_data()?;
        count += batch as u64;
    }
    Ok(Commits {
        count,
        elapsed: start.elapsed(),
    })
}

/// [`commit_loop`] in `threads` threads at once (each in its own
/// directories), summed: what the file system does with concurrent commits
/// (commits that arrive together overlap in the file system and the disk).
pub fn parallel_commit_loop(
    work: &Path,
    size: usize,
    threads: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<Commits> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<Commits>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || commit_loop(work, size, 1, duration, max)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("commit thread panicked")))
            })
            .collect()
    });
    let mut count = 0;
    for r in results {
        count += r?.count;
    }
    Ok(Commits {
        count,
        elapsed: start.elapsed(),
    })
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
