//! A throwaway PostgreSQL server from the distribution's packages, for
//! tests of the shared store.
//!
//! `initdb` refuses to run as root, so as root the server runs as the
//! `postgres` user (`runuser`) in a temporary directory that user owns;
//! otherwise as the current user. It listens on 127.0.0.1 on a free port
//! and keeps its socket in that directory. Dropping it stops the server
//! (immediate shutdown) and removes the directory. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use relay_standin::LocalhostCertificate;

/// The database superuser the tests connect as.
pub const POSTGRES_USER: &str = "relay";
/// Its password (also in [`Postgres::password_file`]).
pub const POSTGRES_PASSWORD: &str = "relay-test-password";

/// How long `pg_ctl` may wait for the server to start or stop, in seconds.
const PG_CTL_WAIT: &str = "60";

/// A running PostgreSQL server; stopped when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
    tls: bool,
    /// Between [`Postgres::freeze`] and [`Postgres::thaw`].
    frozen: std::sync::atomic::AtomicBool,
}

impl Postgres {
    /// Starts a server, or returns `None` when PostgreSQL is not installed
    /// (`/usr/lib/postgresql/*/bin/initdb`). With `CI` or
    /// `POSTGRES_REQUIRED` set, a missing installation panics instead: CI
    /// installs it, so its absence is a failure, not a reason to skip. Panics when the server does not start.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(None)
    }

    /// [`Postgres::start`] with TLS on (`ssl = on`), presenting `certificate`
    /// (for `localhost` and `127.0.0.1`, signed by its CA, which
    /// [`Postgres::ca_file`] holds). Clients may still connect without TLS.
    pub fn start_with_tls(certificate: &LocalhostCertificate) -> Option<Postgres> {
        Postgres::start_with(Some(certificate))
    }

    fn start_with(tls: Option<&LocalhostCertificate>) -> Option<Postgres> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("POSTGRES_REQUIRED").is_none(),
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); \
                 .ci/run installs the `postgresql` package"
            );
            eprintln!("PostgreSQL is not installed: skipping its half of the test");
            return None;
        };
        let as_postgres = run(Command::new("id").arg("-u")).trim() == "0";
        let dir = tempfile::tempdir().expect("temporary directory");
        if as_postgres {
            to_postgres(dir.path());
        }
        let mut server = Postgres {
            dir,
            bin,
            as_postgres,
            port: 0,
            tls: tls.is_some(),
            frozen: Default::default(),
        };
        std::fs::write(server.password_file(), POSTGRES_PASSWORD).expect("password file");
        if let Some(certificate) = tls {
            server.write_tls(certificate);
        }
        let data = server.data();
        server.pg(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                POSTGRES_USER,
                "--pwfile",
                path_str(&server.password_file()),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--no-sync",
            ],
        );
        // A port may still be taken between looking and binding: try a few.
        for _ in 0..5 {
            let port = relay_standin::reserved_port().expect("a free port");
            if server.pg_start(port).status.success() {
                return Some(server);
            }
        }
        let log = std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    /// The certificate and key the server presents, and the CA for
    /// clients; the key readable by the server's user alone, as it demands.
    fn write_tls(&self, certificate: &LocalhostCertificate) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(self.ca_file(), &certificate.ca_pem).expect("CA file");
        let cert = self.dir.path().join("server.crt");
        let key = self.dir.path().join("server.key");
        std::fs::write(&cert, &certificate.cert_pem).expect("certificate file");
        std::fs::write(&key, &certificate.key_pem).expect("key file");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("key mode");
        if self.as_postgres {
            to_postgres(&cert);
            to_postgres(&key);
        }
    }

    /// The CA that signed the server's certificate (with TLS on).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts the server on `port` (remembered when it starts).
    fn pg_start(&mut self, port: u16) -> Output {
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {}",
            path_str(self.dir.path())
        );
        if self.tls {
            let dir = path_str(self.dir.path());
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key"
            ));
        }
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let started = self.pg_try(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                PG_CTL_WAIT,
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &options,
            ],
        );
        if started.status.success() {
            self.port = port;
        }
        started
    }

    /// Stops the server at once (clients are cut off), as an outage would.
    pub fn stop(&self) {
        let out = self.pg_stop();
        assert!(
            out.status.success(),
            "PostgreSQL did not stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_stop(&self) -> Output {
        let data = self.data();
        self.pg_try(
            "pg_ctl",
            &[
                "stop",
                "-m",
                "immediate",
                "-w",
                "-t",
                PG_CTL_WAIT,
                "-D",
                path_str(&data),
            ],
        )
    }

    /// Starts the stopped server again on its port.
    pub fn restart(&mut self) {
        let out = self.pg_start(self.port);
        assert!(
            out.status.success(),
            "PostgreSQL did not start again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `postgres://relay@127.0.0.1:PORT/postgres` (no password in it).
    pub fn url(&self) -> String {
        format!(
            "postgres://{POSTGRES_USER}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Stops the server's processes (SIGSTOP) without closing anything, as
    /// a hung server or a host gone silent looks to its clients: connections
    /// open and stay open, and nothing is answered until [`Postgres::thaw`].
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
        self.signal_all("STOP");
    }

    /// Lets a [`Postgres::freeze`]d server run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("CONT");
        self.frozen.store(false, Ordering::Relaxed);
    }

    /// Sends `signal` to the postmaster and every process it started.
    fn signal_all(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("postmaster.pid: the server is running");
        let postmaster = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid …: the command may hold spaces, not ')'
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let out = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .output()
            .expect("run kill");
        assert!(
            out.status.success(),
            "kill -{signal} {pids:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The directory of the server's Unix socket (`.s.PGSQL.PORT`), where
    /// it trusts every local login.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The port it listens on (TCP, and the socket's name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A file holding the password, as `database_password_file` would.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// Runs `sql` as the superuser with `psql` (over the server's socket).
    pub fn sql(&self, sql: &str) {
        let port = self.port.to_string();
        self.pg(
            "psql",
            &[
                "-h",
                path_str(self.dir.path()),
                "-p",
                &port,
                "-U",
                POSTGRES_USER,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let out = self.pg_try(tool, args);
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_try(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.frozen.load(Ordering::Relaxed) {
            self.thaw();
        }
        if self.port != 0 {
            self.pg_stop();
        }
    }
}

/// Gives `path` to the `postgres` user (the server runs as it under root).
fn to_postgres(path: &Path) {
    let id = |flag: &str| -> u32 {
        run(Command::new("id").args([flag, "postgres"]))
            .trim()
            .parse()
            .expect("the postgres user's id")
    };
    std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g")))
        .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
}

/// The newest installed `/usr/lib/postgresql/VERSION/bin` with `initdb`.
fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("run a command");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
