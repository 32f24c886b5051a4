//! The command line's contract: `check`, bad configurations, environment
//! overrides, `queue list`.

mod common;

use common::*;

#[tokio::test]
async fn check_accepts_a_valid_config() {
    let world = World::start().await;
    let out = cli(&["check"], &world.write_config(&world.config(2525)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(": valid (1 account(s); listening on 127.0.0.1:2525; upstream localhost:"),
        "{stdout}"
    );
    assert!(!stdout.contains("Graph"), "{stdout}");
}

#[tokio::test]
async fn check_and_run_name_the_missing_key() {
    let world = World::start().await;
    let config = world.config(free_port());
    let broken: String = config
        .lines()
        .filter(|l| !l.starts_with("tenant_id"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = world.write_config(&broken);
    let out = cli(&["check"], &path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accounts[0].oauth.tenant_id is missing"),
        "{stderr}"
    );
    let out = cli(&["run"], &path);
    assert!(!out.status.success(), "run started with a broken config");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant_id"));
}

#[tokio::test]
async fn unknown_keys_and_plaintext_are_refused() {
    let world = World::start().await;
    let config = world.config(free_port());
    let path = world.write_config(&config.replace("hostname =", "hostnam ="));
    let stderr = String::from_utf8(cli(&["check"], &path).stderr).unwrap_or_default();
    assert!(
        stderr.contains("listener.hostnam: unknown field `hostnam`"),
        "{stderr}"
    );
    let path = world.write_config(&config.replace("[upstream]", "[upstream]\nsecurity = \"none\""));
    let stderr = String::from_utf8(cli(&["check"], &path).stderr).unwrap_or_default();
    assert!(stderr.contains("upstream.security"), "{stderr}");
}

#[tokio::test]
async fn environment_overrides_the_file() {
    let world = World::start().await;
    let path = world.write_config(&world.config(2525));
    let out = cli_env(
        &["check"],
        &path,
        &[("SMTP_OAUTH_RELAY__UPSTREAM__PORT", "2587")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("upstream localhost:2587"), "{stdout}");
    // and the config path itself can come from the environment
    let out = std::process::Command::new(BIN)
        .arg("check")
        .env("SMTP_OAUTH_RELAY_CONFIG", &path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn missing_config_file_is_named() {
    let out = cli(&["check"], std::path::Path::new("/nonexistent/relay.toml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/relay.toml"));
}

// The shipped example is complete and valid: every key it shows exists.
#[tokio::test]
async fn the_example_config_is_valid() {
    let world = World::start().await;
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/smtp-oauth-relay.toml"
    ))
    .expect("example config");
    let secret = world.dir.path().join("secret");
    let text = example.replace(
        "${CREDENTIALS_DIRECTORY}/client-secret",
        &secret.display().to_string(),
    );
    let out = cli(&["check"], &world.write_config(&text));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// `demo` writes its configuration and names it, so the admin verbs can be
// tried against the running demo.
#[tokio::test]
async fn demo_config_serves_the_admin_verbs() {
    demo_serves_the_admin_verbs("smtp").await;
}

// The same tour through the stand-in Microsoft Graph.
#[tokio::test]
async fn demo_through_graph_serves_the_admin_verbs() {
    demo_serves_the_admin_verbs("graph").await;
}

async fn demo_serves_the_admin_verbs(transport: &str) {
    use std::io::BufRead;
    let port = free_port();
    let mut demo = std::process::Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--transport", transport])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = demo.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut config = None;
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        if let Some((_, path)) = line.split_once(" queue list --config ") {
            config = Some(std::path::PathBuf::from(path.trim()));
            break;
        }
    }
    let Some(config) = config else {
        let _ = demo.kill();
        panic!("demo printed no --config PATH");
    };
    for args in [
        &["queue", "list"][..],
        &["health"],
        &["token"],
        &["doctor"],
        &["doctor", "--send-to", "bob@example.com"],
        &["send-test", "--to", "bob@example.com"],
    ] {
        let out = cli(args, &config);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status();
    let mut exited = false;
    for _ in 0..200 {
        if let Ok(Some(_)) = demo.try_wait() {
            exited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if !exited {
        let _ = demo.kill();
    }
    assert!(exited, "demo did not stop on SIGTERM");
}

// The admin verbs read no credential: with the secret's path naming
// ${CREDENTIALS_DIRECTORY} (set only for the service), they work without it.
#[tokio::test]
async fn admin_verbs_need_no_secret() {
    let world = World::start().await;
    let port = free_port();
    let secret = world.dir.path().join("secret").display().to_string();
    let config = world
        .config(port)
        .replace(&secret, "${CREDENTIALS_DIRECTORY}/secret")
        .replace(
            "bind = \"127.0.0.1:0\"",
            &format!("bind = \"127.0.0.1:{}\"", free_port()),
        );
    assert!(config.contains("${CREDENTIALS_DIRECTORY}/secret"));
    let path = world.write_config(&config);
    let without_credentials = |args: &[&str]| cli_env(args, &path, &[] as &[(&str, &str)]);
    let out = without_credentials(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accounts[0].oauth.client_secret_file")
            && stderr.contains("CREDENTIALS_DIRECTORY is not set"),
        "{stderr}"
    );
    let dir = world.dir.path().display().to_string();
    let relay = Relay::start_with_env(&path, port, &[("CREDENTIALS_DIRECTORY", &dir)]).await;
    send_accepted(&relay, "no secret needed").await;
    relay.delivered(&world, 1).await;
    for args in [
        &["queue", "list"][..],
        &["queue", "list", "--json"],
        &["queue", "retry", "--all"],
        &["queue", "delete", "--failed"],
        &["health"],
    ] {
        let out = without_credentials(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// `config show` prints the merged configuration, environment overrides
// included, with secrets masked, and reads no secret.
#[tokio::test]
async fn config_show_prints_the_effective_configuration() {
    let world = World::start().await;
    let config = world
        .config(2525)
        .replace("[upstream]\n", "[upstream]\nmax_connections = 2\n")
        .replace(
            "[accounts.oauth]\n",
            "[accounts.oauth]\nclient_secret = \"hunter2\"\n",
        );
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("client_secret_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = world.write_config(&config);
    let out = cli_env(
        &["config", "show"],
        &path,
        &[("SMTP_OAUTH_RELAY__UPSTREAM__PORT", "2587")],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "upstream.port = 2587",
        "upstream.max_connections = 2",
        "listener.bind = [\"127.0.0.1:2525\"]",
        "queue.retry_initial = \"300ms\"",
        "accounts[0].oauth.client_secret = \"[redacted]\"",
        "log.level = \"info\"",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains("hunter2"), "{stdout}");
}
