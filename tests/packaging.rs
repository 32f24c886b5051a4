//! What the systemd unit and the container image rely on, tested against the
//! binary directly (no systemd or Docker engine needed): configuration from
//! the environment alone, the secret from `$CREDENTIALS_DIRECTORY` or a
//! Docker secrets file, the queue created inside a writable state volume,
//! the man page and completions, `deploy/install.sh`, and static checks of
//! the shipped unit, Dockerfile and compose file (so a regression is caught
//! where `systemd-analyze` is not available).

mod common;

use common::*;
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Starts `run` with extra environment variables (and an admin endpoint on a
/// free loopback port, so parallel relays do not collide).
async fn start_with_env(config: &Path, port: u16, env: &[(String, String)]) -> Relay {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![("SMTP_OAUTH_RELAY__ADMIN__BIND", admin.as_str())];
    vars.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Relay::start_with_env(config, port, &vars).await
}

/// Runs a verb with extra environment variables.
fn var(key: &str, value: impl ToString) -> (String, String) {
    (format!("SMTP_OAUTH_RELAY__{key}"), value.to_string())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

async fn deliver_one(world: &World, relay: &Relay, subject: &str) {
    let before = world.upstream.messages().len();
    send_accepted(relay, subject).await;
    let got = relay.delivered(world, before + 1).await;
    let last = got.last().expect("a message");
    assert_eq!(last.auth_user, MAILBOX);
    assert!(
        String::from_utf8_lossy(&last.data).contains(subject),
        "another message arrived"
    );
}

// The container: an empty config file, everything (accounts included) from
// SMTP_OAUTH_RELAY__… variables, the secret from a Docker-secrets-like file.
#[tokio::test]
async fn configured_from_the_environment_alone_it_delivers() {
    let world = World::start().await;
    let dir = world.dir.path();
    let port = free_port();
    let config = world.write_config("");
    let secrets = dir.join("run/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(
        secrets.join("client-secret"),
        format!("{}\n", world.idp.client_secret()),
    )
    .unwrap();
    let env = vec![
        var("LISTENER__BIND", format!("127.0.0.1:{port}")),
        var("LISTENER__HOSTNAME", "relay.test"),
        var("LISTENER__ALLOWED_NETWORKS", "127.0.0.0/8,::1/128"),
        var("UPSTREAM__HOST", "localhost"),
        var("UPSTREAM__PORT", world.upstream.port()),
        var("UPSTREAM__CA_FILE", dir.join("ca.pem").display()),
        var("QUEUE__DIR", dir.join("state/queue").display()),
        var("QUEUE__RETRY_INITIAL", "300ms"),
        var("QUEUE__RETRY_MAX", "1s"),
        var("ACCOUNTS__0__NAME", "main"),
        var("ACCOUNTS__0__MAILBOX", MAILBOX),
        var("ACCOUNTS__0__SENDERS", format!("{MAILBOX},*@contoso.com")),
        var("ACCOUNTS__0__OAUTH__FLOW", "client_credentials"),
        var("ACCOUNTS__0__OAUTH__AUTHORITY", world.idp.authority()),
        var("ACCOUNTS__0__OAUTH__TENANT_ID", world.idp.tenant()),
        var("ACCOUNTS__0__OAUTH__CLIENT_ID", world.idp.client_id()),
        var(
            "ACCOUNTS__0__OAUTH__CLIENT_SECRET_FILE",
            secrets.join("client-secret").display(),
        ),
    ];

    let check = cli_env(&["check"], &config, &env);
    assert!(
        check.status.success(),
        "check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("1 account(s)"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let relay = start_with_env(&config, port, &env).await;
    deliver_one(&world, &relay, "from the environment").await;
    // A sender outside the comma-separated `senders` list is refused.
    let (mut c, _) = Client::connect(port).await;
    assert!(c.send(b"EHLO app.test\r\n").await.starts_with("250"));
    let reply = c.send(b"MAIL FROM:<app@example.org>\r\n").await;
    assert!(reply.starts_with("550"), "{reply}");
}

// The systemd unit: LoadCredential= puts the secret in $CREDENTIALS_DIRECTORY
// and StateDirectory= gives a writable, empty /var/lib/smtp-oauth-relay in
// which the relay creates queue/ itself (mode 0700, whatever the umask).
#[tokio::test]
async fn credentials_directory_secret_and_a_fresh_state_directory() {
    let world = World::start().await;
    let dir = world.dir.path();
    let port = free_port();
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("client-secret"), world.idp.client_secret()).unwrap();
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = world
        .config(port)
        .replace(
            &format!("client_secret_file = \"{}/secret\"", dir.display()),
            "client_secret_file = \"${CREDENTIALS_DIRECTORY}/client-secret\"",
        )
        .replace(
            &format!("dir = \"{}/queue\"", dir.display()),
            "dir = \"${STATE_DIRECTORY}/queue\"",
        );
    assert!(text.contains("${CREDENTIALS_DIRECTORY}") && text.contains("${STATE_DIRECTORY}"));
    let config = world.write_config(&text);

    let state_env = ("STATE_DIRECTORY".to_owned(), state.display().to_string());
    // Without the variable, the error names it.
    let out = cli_env(&["check"], &config, std::slice::from_ref(&state_env));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variable CREDENTIALS_DIRECTORY is not set"),
        "{stderr}"
    );

    let env = vec![
        (
            "CREDENTIALS_DIRECTORY".to_owned(),
            credentials.display().to_string(),
        ),
        state_env,
    ];
    let out = cli_env(&["check"], &config, &env);
    assert!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let relay = start_with_env(&config, port, &env).await;
    deliver_one(&world, &relay, "with LoadCredential").await;
    let queue = state.join("queue");
    assert!(queue.is_dir(), "queue directory not created");
    assert_eq!(mode(&queue), 0o700, "queue directory mode");
    assert_eq!(mode(&state), 0o755, "the state directory was changed");
    // Admin verbs from a shell name the same variables.
    let out = cli_env(&["queue", "list", "--json"], &config, &env);
    assert!(
        out.status.success(),
        "queue list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// The container: the image's config file plus the relay environment of
// deploy/docker/compose.yaml is a valid configuration, listening on every
// interface of the container but trusting only the named networks.
#[test]
fn the_container_config_and_the_compose_environment_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let env = compose_environment("deploy/docker/compose.yaml", dir.path());
    let stdout = check_in_container(&env);
    assert!(stdout.contains("listening on 0.0.0.0:2525"), "{stdout}");

    // Without the compose environment the image's own file trusts loopback
    // only: never an open relay by default.
    let image = repo_file("deploy/docker/config.toml");
    let allowed = image
        .lines()
        .find(|l| l.starts_with("allowed_networks"))
        .expect("allowed_networks in the image config");
    assert_eq!(allowed, r#"allowed_networks = ["127.0.0.0/8", "::1/128"]"#);
    assert!(image.contains(r#"dir = "/var/lib/smtp-oauth-relay/queue""#));
}

// deploy/docker/compose.postgres.yaml: both relays' environment is a valid
// configuration sharing the queue through the compose file's PostgreSQL
// service, its password read from the Docker secret.
#[test]
fn the_shared_queue_compose_environment_is_valid() {
    let file = "deploy/docker/compose.postgres.yaml";
    let dir = tempfile::tempdir().unwrap();
    let env = compose_environment(file, dir.path());
    let url = env
        .iter()
        .find(|(key, _)| key == "SMTP_OAUTH_RELAY__QUEUE__DATABASE_URL")
        .map(|(_, url)| url.as_str());
    assert_eq!(url, Some("postgres://relay@postgres:5432/relay"));
    let stdout = check_in_container(&env);
    assert!(stdout.contains("listening on 0.0.0.0:2525"), "{stdout}");
    let compose = repo_file(file);
    for service in ["postgres:", "relay-a:", "relay-b:", "legacy-app:"] {
        assert!(
            compose.contains(&format!("\n  {service}\n")),
            "{file} lacks {service}"
        );
    }
    assert!(compose.contains("POSTGRES_PASSWORD_FILE: /run/secrets/db-password"));
}

/// The `SMTP_OAUTH_RELAY__…` variables a compose file gives its relays, with
/// `${NAME…}` filled in as from `.env` and each secret's path replaced by a
/// file in `dir`. Checks that every required key is there and that no
/// network is trusted wholesale.
fn compose_environment(file: &str, dir: &Path) -> Vec<(String, String)> {
    let compose = repo_file(file);
    let mut env = Vec::new();
    for line in compose.lines() {
        let line = line.trim();
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        if !key.starts_with("SMTP_OAUTH_RELAY__") {
            continue;
        }
        let mut value = value.trim().trim_matches('"').to_owned();
        // ${NAME:?message} and ${NAME:-default}: compose fills these from .env
        while let Some(start) = value.find("${") {
            let end = start + value[start..].find('}').expect("closed ${");
            let name = value[start + 2..end]
                .split([':', '-', '?'])
                .next()
                .unwrap()
                .to_owned();
            let example = match name.as_str() {
                "MAILBOX" => MAILBOX.to_owned(),
                _ => "00000000-0000-0000-0000-000000000000".to_owned(),
            };
            value.replace_range(start..=end, &example);
        }
        for (suffix, secret) in [
            ("__CLIENT_SECRET_FILE", "client-secret"),
            ("__DATABASE_PASSWORD_FILE", "db-password"),
        ] {
            if key.ends_with(suffix) {
                assert_eq!(value, format!("/run/secrets/{secret}"), "{file}: {key}");
                let local = dir.join(secret);
                std::fs::write(&local, "s3cret").unwrap();
                value = local.display().to_string();
            }
        }
        if key.ends_with("__ALLOWED_NETWORKS") {
            assert!(
                !value.contains("0.0.0.0/0") && !value.contains("::/0"),
                "{file} makes an open relay: {value}"
            );
        }
        env.push((key.to_owned(), value));
    }
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for required in [
        "SMTP_OAUTH_RELAY__LISTENER__ALLOWED_NETWORKS",
        "SMTP_OAUTH_RELAY__ACCOUNTS__0__MAILBOX",
        "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__TENANT_ID",
        "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_ID",
        "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_SECRET_FILE",
    ] {
        assert!(keys.contains(&required), "{file} lacks {required}");
    }
    env
}

/// `check` of the image's config file under `env`; its output.
fn check_in_container(env: &[(String, String)]) -> String {
    let config = Path::new(ROOT).join("deploy/docker/config.toml");
    let out = cli_env(&["check"], &config, env);
    assert!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// README's "Use it", outside systemd: the example with the README's own
// `sed` line applied passes `check` with no CREDENTIALS_DIRECTORY.
#[test]
fn the_readmes_use_it_passes_check_outside_systemd() {
    let readme = repo_file("README.md");
    let section = &readme[readme.find("## Use it").expect("Use it")..];
    let sed = section
        .lines()
        .find(|l| l.starts_with("sudo sed -i "))
        .expect("the sed line")
        .trim_start_matches("sudo ");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    let config = dir.path().join("config.toml");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::copy(
        Path::new(ROOT).join("config/smtp-oauth-relay.toml"),
        &config,
    )
    .unwrap();
    let sed = sed
        .replace(
            "/etc/smtp-oauth-relay/config.toml",
            &config.display().to_string(),
        )
        .replace(
            "/etc/smtp-oauth-relay/client-secret",
            &secret.display().to_string(),
        );
    let status = Command::new("sh")
        .arg("-c")
        .arg(&sed)
        .status()
        .expect("sed");
    assert!(status.success(), "{sed}");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "/var/lib/smtp-oauth-relay",
        &dir.path().display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let out = cli_env(&["check"], &config, &[] as &[(&str, &str)]);
    assert!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// The example installed for the systemd service passes `check` once the
// secret file exists in $CREDENTIALS_DIRECTORY.
#[test]
fn the_systemd_config_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), "s3cret").unwrap();
    let config = Path::new(ROOT).join("config/smtp-oauth-relay.toml");
    let env = [(
        "CREDENTIALS_DIRECTORY".to_owned(),
        dir.path().display().to_string(),
    )];
    let out = cli_env(&["check"], &config, &env);
    assert!(
        out.status.success(),
        "check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_page_and_completions_are_generated_from_the_cli() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let man = run(&["man"]);
    assert!(man.contains(".TH smtp-oauth-relay 1"), "{man}");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH ENVIRONMENT",
        ".SH FILES",
        ".SH CONFIGURATION",
        ".SH SIGNALS",
        ".SH EXIT STATUS",
    ] {
        assert!(man.contains(section), "man page lacks {section}");
    }
    // the configuration reference, and the exit status the code gives
    assert!(man.contains("shutdown_timeout = \"10s\""), "{man}");
    assert!(man.contains("\\fB2\\fR\nA usage error"), "{man}");
    for verb in ["run", "check", "queue"] {
        assert!(
            man.contains(&format!("smtp\\-oauth\\-relay\\-{verb}(1)")),
            "man page lacks {verb}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let listed = run(&["man", "--dir", &dir.path().display().to_string()]);
    for page in ["smtp-oauth-relay.1", "smtp-oauth-relay-queue-list.1"] {
        assert!(dir.path().join(page).is_file(), "{page} not written");
        assert!(listed.contains(page), "{listed}");
    }

    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F"), "{bash}");
    assert!(bash.contains("smtp-oauth-relay") && bash.contains("queue"));
    assert!(run(&["completions", "zsh"]).starts_with("#compdef smtp-oauth-relay"));
    assert!(run(&["completions", "fish"]).contains("complete -c smtp-oauth-relay"));
    let unknown = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());

    // Hidden from --help (they are for packagers), --version works.
    let help = run(&["--help"]);
    assert!(
        !help.contains("completions") && !help.contains("  man "),
        "{help}"
    );
    assert!(run(&["--version"]).starts_with("smtp-oauth-relay "));
}

// The bash completion completes verbs and sub-verbs, asked the way bash
// asks it (COMP_WORDS, then the completion function, read with compgen).
#[test]
fn bash_completes_subcommands() {
    let script = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .expect("run");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smtp-oauth-relay.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                r#"source "$1"
                COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
                cur="${{COMP_WORDS[COMP_CWORD]}}"; prev="${{COMP_WORDS[COMP_CWORD-1]}}"
                fn=$(complete -p smtp-oauth-relay | sed -E 's/.* -F ([^ ]+) .*/\1/')
                "$fn" smtp-oauth-relay "$cur" "$prev"
                printf '%s\n' "${{COMPREPLY[@]}}""#
            ))
            .arg("bash")
            .arg(&path)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(complete("smtp-oauth-relay qu"), "queue\n");
    assert_eq!(complete("smtp-oauth-relay send"), "send-test\nsendmail\n");
    assert_eq!(complete("smtp-oauth-relay queue li"), "list\n");
    assert_eq!(complete("smtp-oauth-relay config sh"), "show\n");
    assert!(complete("smtp-oauth-relay queue list --j").contains("--json"));
    // and with compgen, as an interactive bash would list them
    let verbs = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1"; COMP_WORDS=(smtp-oauth-relay queue ""); COMP_CWORD=2; fn=$(complete -p smtp-oauth-relay | sed -E 's/.* -F ([^ ]+) .*/\1/'); "$fn" smtp-oauth-relay "" queue; compgen -W "${COMPREPLY[*]}" -- re | sort"#)
        .arg("bash")
        .arg(&path)
        .output()
        .expect("bash");
    assert_eq!(String::from_utf8_lossy(&verbs.stdout), "release\nretry\n");
}

/// `[Section] Key=value` lines of a unit file; a key may repeat.
fn unit_directives(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        out.entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    out
}

#[test]
fn the_systemd_unit_has_the_required_directives() {
    let unit = unit_directives(&repo_file("deploy/systemd/smtp-oauth-relay.service"));
    let get = |key: &str| -> Vec<String> {
        unit.get(&("Service".to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_default()
    };
    let one = |key: &str| -> String {
        let values = get(key);
        assert_eq!(values.len(), 1, "{key}= should be set once: {values:?}");
        values[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/smtp-oauth-relay run --config /etc/smtp-oauth-relay/config.toml"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let watchdog = one("WatchdogSec");
    assert!(
        !matches!(watchdog.as_str(), "" | "0" | "infinity"),
        "WatchdogSec={watchdog}"
    );
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "smtp-oauth-relay");
    assert_eq!(one("ConfigurationDirectory"), "smtp-oauth-relay");
    assert_eq!(
        one("LoadCredential"),
        "client-secret:/etc/smtp-oauth-relay/client-secret"
    );
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert!(
        get("AmbientCapabilities").is_empty(),
        "ambient capabilities granted"
    );
    assert_eq!(one("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    assert_eq!(get("SystemCallFilter")[0], "@system-service");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectProc"), "invisible");
    assert_eq!(one("ProcSubset"), "pid");
    assert_eq!(one("DevicePolicy"), "closed");
    assert_eq!(one("SystemCallArchitectures"), "native");
    assert_eq!(one("UMask"), "0077");
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RemoveIPC",
    ] {
        assert_eq!(one(key), "yes", "{key}");
    }
    assert_eq!(
        unit.get(&("Install".to_owned(), "WantedBy".to_owned())),
        Some(&vec!["multi-user.target".to_owned()])
    );

    // The config installed with it matches the unit: the credential's name,
    // and a queue inside the StateDirectory.
    let config = repo_file("config/smtp-oauth-relay.toml");
    assert!(config.contains(r#"client_secret_file = "${CREDENTIALS_DIRECTORY}/client-secret""#));
    assert!(config.contains(r#"dir = "/var/lib/smtp-oauth-relay/queue""#));
}

/// Dockerfile instructions (continuations joined, comments dropped), by stage.
fn dockerfile_stages(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(start) = trimmed.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (op, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("FROM first")
            .push((op, args.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    stages
}

#[test]
fn the_dockerfile_has_the_required_instructions() {
    let stages = dockerfile_stages(&repo_file("deploy/docker/Dockerfile"));
    assert!(stages.len() >= 2, "multi-stage");
    let find = |stage: &[(String, String)], op: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.clone())
            .collect()
    };
    // The builder is the Rust image of the project's toolchain.
    let manifest = repo_file("Cargo.toml");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("rust-version in Cargo.toml");
    let builder = &stages[0];
    assert_eq!(
        find(builder, "FROM")[0],
        format!("rust:{rust_version}-slim-bookworm AS build")
    );
    assert!(find(builder, "RUN")
        .iter()
        .any(|r| r.contains("cargo build --release --locked")));

    // The dependency layer: every workspace member's manifest is copied
    // (and built) before the sources.
    let sources_at = builder
        .iter()
        .position(|(op, args)| op == "COPY" && args == ". .")
        .expect("COPY . .");
    let members: Vec<String> = manifest
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("workspace members")
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.len() >= 9, "{members:?}");
    for manifest in ["Cargo.toml Cargo.lock ./".to_owned()]
        .into_iter()
        .chain(members.iter().map(|m| format!("{m}/Cargo.toml {m}/")))
    {
        let at = builder
            .iter()
            .position(|(op, args)| op == "COPY" && *args == manifest)
            .unwrap_or_else(|| panic!("COPY {manifest} missing"));
        assert!(at < sources_at, "COPY {manifest} after the sources");
    }
    assert!(builder[..sources_at]
        .iter()
        .any(|(op, args)| op == "RUN" && args.contains("cargo build --release --locked")));

    let runtime = stages.last().unwrap();
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.description",
    ] {
        assert!(
            find(runtime, "LABEL").iter().any(|l| l.contains(label)),
            "{label}"
        );
    }
    assert_eq!(find(runtime, "ENV"), ["NO_COLOR=1"]);
    let from = &find(runtime, "FROM")[0];
    assert!(
        from.starts_with("gcr.io/distroless/cc-debian12")
            || from.starts_with("debian:bookworm-slim"),
        "{from}"
    );
    let user = find(runtime, "USER");
    assert_eq!(user.len(), 1, "USER in the runtime stage");
    let uid = user[0].split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as root: {uid}");
    assert_eq!(find(runtime, "VOLUME"), ["/var/lib/smtp-oauth-relay"]);
    assert_eq!(find(runtime, "EXPOSE"), ["2525 9925"]);
    let health = find(runtime, "HEALTHCHECK");
    assert_eq!(health.len(), 1);
    assert!(
        health[0].ends_with(r#"CMD ["smtp-oauth-relay", "health"]"#),
        "{}",
        health[0]
    );
    assert_eq!(find(runtime, "ENTRYPOINT"), [r#"["smtp-oauth-relay"]"#]);
    assert_eq!(find(runtime, "CMD"), [r#"["run"]"#]);
    // The volume's mount point belongs to the runtime user.
    assert!(
        find(runtime, "COPY")
            .iter()
            .any(|c| c.contains(&format!("--chown={uid}"))
                && c.ends_with("/var/lib/smtp-oauth-relay"))
    );

    let compose = repo_file("deploy/docker/compose.yaml");
    for needle in [
        "dockerfile: deploy/docker/Dockerfile",
        "relay-state:/var/lib/smtp-oauth-relay",
        "file: ./client-secret.txt",
        "smtp://relay:2525",
    ] {
        assert!(compose.contains(needle), "compose.yaml lacks {needle}");
    }
    let ignore = repo_file(".dockerignore");
    assert!(ignore.lines().any(|l| l == "/target"), ".dockerignore");
}

// deploy/install.sh, staged into a directory: everything in place, secrets
// 0600, and a second run keeps the admin's config and secret.
#[test]
fn install_script_stages_everything_and_is_idempotent() {
    let dest = tempfile::tempdir().unwrap();
    let install = || {
        let out = Command::new("sh")
            .arg(Path::new(ROOT).join("deploy/install.sh"))
            .env("DESTDIR", dest.path())
            .env("BIN", BIN)
            .stdin(Stdio::null())
            .output()
            .expect("run install.sh");
        assert!(
            out.status.success(),
            "install.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let at = |p: &str| -> PathBuf { dest.path().join(p.trim_start_matches('/')) };
    let first = install();
    assert!(first.contains("Next steps"), "{first}");
    assert_eq!(mode(&at("/usr/local/bin/smtp-oauth-relay")), 0o755);
    assert_eq!(
        std::fs::read(at("/etc/systemd/system/smtp-oauth-relay.service")).unwrap(),
        repo_file("deploy/systemd/smtp-oauth-relay.service").as_bytes()
    );
    assert_eq!(
        std::fs::read_to_string(at("/etc/smtp-oauth-relay/config.toml")).unwrap(),
        repo_file("config/smtp-oauth-relay.toml")
    );
    assert_eq!(mode(&at("/etc/smtp-oauth-relay/client-secret")), 0o600);
    for file in [
        "/usr/local/share/man/man1/smtp-oauth-relay.1",
        "/usr/local/share/man/man1/smtp-oauth-relay-run.1",
        "/usr/local/share/bash-completion/completions/smtp-oauth-relay",
        "/usr/local/share/zsh/site-functions/_smtp-oauth-relay",
        "/usr/local/share/fish/vendor_completions.d/smtp-oauth-relay.fish",
    ] {
        assert!(at(file).is_file(), "{file} not installed");
        assert_eq!(mode(&at(file)), 0o644, "{file}");
    }

    std::fs::write(at("/etc/smtp-oauth-relay/config.toml"), "# mine\n").unwrap();
    std::fs::write(at("/etc/smtp-oauth-relay/client-secret"), "s3cret").unwrap();
    let second = install();
    assert!(second.contains("kept existing"), "{second}");
    assert_eq!(
        std::fs::read_to_string(at("/etc/smtp-oauth-relay/config.toml")).unwrap(),
        "# mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(at("/etc/smtp-oauth-relay/client-secret")).unwrap(),
        "s3cret"
    );
    assert_eq!(mode(&at("/etc/smtp-oauth-relay/client-secret")), 0o600);
    let leftovers: Vec<_> = walk(dest.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".new."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
