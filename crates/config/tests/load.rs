use relay_config::{load_file, load_str, ConfigError, Security};
use std::io::Write;

const VALID: &str = r#"
[listener]
bind = ["127.0.0.1:2525"]
hostname = "relay.test"

[queue]
dir = "/tmp/q"
retry_initial = "1s"

[[accounts]]
name = "main"
mailbox = "relay@contoso.com"

[accounts.oauth]
flow = "client_credentials"
tenant_id = "t"
client_id = "c"
client_secret = "s"
"#;

fn problems(toml: &str) -> Vec<String> {
    match load_str(toml) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn valid_config_gets_defaults() {
    let c = load_str(VALID).expect("valid");
    assert_eq!(c.upstream.host, "smtp.office365.com");
    assert_eq!(c.upstream.port, 587);
    assert_eq!(c.upstream.security, Security::Starttls);
    assert_eq!(c.upstream.max_connections, 3);
    assert_eq!(c.queue.retry_initial.as_secs(), 1);
    assert_eq!(c.queue.max_age.as_secs(), 5 * 86400);
    assert_eq!(c.accounts[0].senders, vec!["*"]);
    assert_eq!(
        c.accounts[0].oauth.scope(),
        "https://outlook.office365.com/.default"
    );
    assert_eq!(
        c.accounts[0].oauth.token_url(),
        "https://login.microsoftonline.com/t/oauth2/v2.0/token"
    );
    assert_eq!(c.listener.allowed_networks.len(), 2);
    // the secret never shows in Debug output
    assert!(!format!("{c:?}").contains("client_secret: Some(\"s\")"));
}

#[test]
fn missing_tenant_names_the_key_path() {
    let p = problems(&VALID.replace("tenant_id = \"t\"\n", ""));
    assert_eq!(p, vec!["accounts[0].oauth.tenant_id is missing"]);
}

#[test]
fn unknown_key_is_an_error_with_its_path() {
    let p = problems(&VALID.replace("hostname =", "hostnme ="));
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("listener.hostnme: unknown field `hostnme`, expected one of `bind`"),
        "{p:?}"
    );
}

#[test]
fn plaintext_upstream_is_refused() {
    let p = problems(&format!("{VALID}\n[upstream]\nsecurity = \"none\"\n"));
    assert!(
        p[0].starts_with("upstream.security: \"none\" is not a security mode"),
        "{p:?}"
    );
}

#[test]
fn authority_must_be_https_unless_loopback() {
    let p = problems(&VALID.replace(
        "tenant_id",
        "authority = \"http://login.example.com\"\ntenant_id",
    ));
    assert!(p[0].contains("must be an https:// URL"), "{p:?}");
    load_str(&VALID.replace(
        "tenant_id",
        "authority = \"http://127.0.0.1:8080\"\ntenant_id",
    ))
    .expect("loopback http is fine");
}

#[test]
fn secret_sources_are_exclusive_and_files_are_checked() {
    let p = problems(&VALID.replace(
        "client_secret = \"s\"",
        "client_secret = \"s\"\nclient_secret_file = \"/x\"",
    ));
    assert_eq!(
        p[0],
        "accounts[0].oauth: set only one of client_secret and client_secret_file"
    );
    let p = problems(&VALID.replace(
        "client_secret = \"s\"",
        "client_secret_file = \"/nonexistent/secret\"",
    ));
    assert!(
        p[0].starts_with("accounts[0].oauth.client_secret_file /nonexistent/secret:"),
        "{p:?}"
    );
}

#[test]
fn bad_values_are_named() {
    let p = problems(&VALID.replace("\"127.0.0.1:2525\"", "\"localhost\""));
    assert!(p[0].starts_with("listener.bind"), "{p:?}");
    let p = problems(&VALID.replace("[[accounts]]", "[[accounts]]\nsenders = [\"a@@b\"]"));
    assert!(p[0].starts_with("accounts[0].senders[0]"), "{p:?}");
    let p = problems("");
    assert_eq!(
        p,
        vec!["accounts: at least one [[accounts]] table is required"]
    );
}

#[test]
fn environment_overrides_file() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(VALID.as_bytes()).expect("write");
    // The only test in this binary touching these variables.
    std::env::set_var("SMTP_OAUTH_RELAY__UPSTREAM__PORT", "2587");
    std::env::set_var(
        "SMTP_OAUTH_RELAY__LISTENER__BIND",
        "127.0.0.1:2600,[::1]:2600",
    );
    let c = load_file(file.path());
    std::env::remove_var("SMTP_OAUTH_RELAY__UPSTREAM__PORT");
    std::env::remove_var("SMTP_OAUTH_RELAY__LISTENER__BIND");
    let c = c.expect("valid");
    assert_eq!(c.upstream.port, 2587);
    assert_eq!(c.listener.bind.len(), 2);
}

#[test]
fn missing_file_is_explained() {
    let e = load_file(std::path::Path::new("/nonexistent/config.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/config.toml"), "{e}");
}

#[test]
fn accounts_can_come_from_the_environment_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").expect("write");
    let vars = [
        ("SMTP_OAUTH_RELAY__ACCOUNTS__0__NAME", "main"),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__MAILBOX",
            "relay@contoso.com",
        ),
        (
            "SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__FLOW",
            "client_credentials",
        ),
        ("SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__TENANT_ID", "t"),
        ("SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_ID", "c"),
        ("SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__CLIENT_SECRET", "s"),
        ("SMTP_OAUTH_RELAY__QUEUE__RETRY_INITIAL", "5s"),
    ];
    // Only these two tests set variables, and every other test here uses
    // load_str, which ignores the environment.
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let loaded = load_file(&path);
    for (k, _) in vars {
        std::env::remove_var(k);
    }
    let loaded = loaded.expect("valid from the environment");
    assert_eq!(loaded.accounts[0].mailbox, "relay@contoso.com");
    assert_eq!(loaded.accounts[0].oauth.tenant_id.as_deref(), Some("t"));
    assert_eq!(loaded.queue.retry_initial.as_secs(), 5);
}

#[test]
fn paths_may_name_environment_variables() {
    std::env::set_var("RELAY_CONFIG_TEST_STATE", "/var/lib/x");
    let c = load_str(&VALID.replace(
        "dir = \"/tmp/q\"",
        "dir = \"${RELAY_CONFIG_TEST_STATE}/queue\"",
    ))
    .expect("valid");
    assert_eq!(c.queue.dir, std::path::Path::new("/var/lib/x/queue"));
    let p = problems(&VALID.replace("dir = \"/tmp/q\"", "dir = \"${RELAY_CONFIG_TEST_UNSET}/q\""));
    assert!(
        p[0].starts_with("queue.dir:") && p[0].contains("RELAY_CONFIG_TEST_UNSET is not set"),
        "{p:?}"
    );
}

#[test]
fn every_rule_is_reported_in_one_run() {
    let p = problems(
        &VALID
            .replace("tenant_id = \"t\"\n", "")
            .replace(
                "hostname = \"relay.test\"",
                "hostname = \"relay.test\"\nallowed_networks = [\"0.0.0.0/0\", \"::/0\"]",
            )
            .replace("[queue]", "[log]\nlevel = \"warning\"\n\n[queue]"),
    );
    assert_eq!(p.len(), 4, "{p:#?}");
    assert!(
        p[0].starts_with(
            "listener.allowed_networks 0.0.0.0/0 lets anyone send: that is an open relay"
        ),
        "{p:#?}"
    );
    assert!(
        p[1].starts_with("listener.allowed_networks ::/0 lets anyone send"),
        "{p:#?}"
    );
    assert_eq!(
        p[2],
        "log.level \"warning\": \"warning\" is not a level: use error, warn, info, debug or trace, or a filter like \"info,relay_delivery=debug\""
    );
    assert_eq!(p[3], "accounts[0].oauth.tenant_id is missing");
}

#[test]
fn an_open_network_needs_required_auth() {
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    let open = VALID.replace(
        "hostname = \"relay.test\"",
        &format!("hostname = \"relay.test\"\nallowed_networks = [\"0.0.0.0/0\"]\nauth = \"required\"\n[[listener.users]]\nusername = \"app\"\npassword_hash = \"{hash}\"\n"),
    );
    load_str(&open).expect("open network with required AUTH");
    load_str(&VALID.replace(
        "[queue]",
        "[log]\nlevel = \"info,relay_delivery=debug\"\n\n[queue]",
    ))
    .expect("a filter is a level");
}

#[test]
fn plain_messages_for_addresses_networks_and_authorities() {
    let message = |toml: &str| match load_str(toml) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    for (toml, expected) in [
        (
            VALID.replace("127.0.0.1:2525", "127.0.0.1"),
            "listener.bind: `127.0.0.1`: add a port, e.g. 127.0.0.1:2525",
        ),
        (
            VALID.replace(
                "hostname = \"relay.test\"",
                "hostname = \"relay.test\"\nallowed_networks = [\"10.0.0.0/33\"]",
            ),
            "`10.0.0.0/33`: the prefix length \"33\" is not a number from 0 to 32",
        ),
        (
            VALID.replace("[queue]", "[admin]\nbind = \"::1\"\n\n[queue]"),
            "admin.bind: `::1`: add a port, e.g. [::1]:2525",
        ),
    ] {
        let m = message(&toml);
        assert!(m.contains(expected), "{m}");
    }
    let p = problems(&VALID.replace(
        "tenant_id = \"t\"",
        "tenant_id = \"t\"\nauthority = \"login.microsoftonline.us\"",
    ));
    assert_eq!(
        p,
        vec!["accounts[0].oauth.authority \"login.microsoftonline.us\": has no scheme: write https://login.microsoftonline.us"]
    );
}

#[test]
fn warnings_name_the_fix() {
    let c = load_str(
        &VALID
            .replace(
                "tenant_id = \"t\"",
                "tenant_id = \"00000000-0000-0000-0000-000000000000\"",
            )
            .replace(
                "client_secret = \"s\"",
                "client_secret = \"8c6a4f1e-2b3d-4e5f-9a0b-1c2d3e4f5a6b\"",
            ),
    )
    .expect("valid");
    let w = relay_config::warnings(&c);
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(w[0].starts_with("accounts[0].oauth.tenant_id is the example's placeholder"));
    assert!(w[1].starts_with(
        "accounts[0].oauth.client_secret looks like a GUID: that is the secret's ID; use its Value"
    ));
}

#[test]
fn schema_problems_of_every_section_in_one_run() {
    let p = problems(
        &VALID
            .replace("127.0.0.1:2525", "127.0.0.1")
            .replace("retry_initial = \"1s\"", "retry_initial = \"soon\"")
            .replace("flow = \"client_credentials\"", "flow = \"magic\""),
    );
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(
        p[0].starts_with("listener.bind: `127.0.0.1`: add a port"),
        "{p:#?}"
    );
    assert!(p[1].starts_with("queue.retry_initial: "), "{p:#?}");
    assert!(p[2].starts_with("accounts[0].oauth.flow: "), "{p:#?}");
}

#[test]
fn a_shared_queue_is_checked() {
    let c = load_str(VALID).expect("valid");
    assert_eq!(c.queue.database_url, None);
    assert_eq!(c.queue.lease_timeout.as_secs(), 60);

    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("db-password");
    std::fs::write(&password, "hunter2\n").expect("write");
    let shared = VALID.replace(
        "retry_initial = \"1s\"\n",
        &format!(
            "retry_initial = \"1s\"\ndatabase_url = \"postgres://relay@db.example.com/relay\"\n\
             database_password_file = {password:?}\nlease_timeout = \"30s\"\n"
        ),
    );
    let c = load_str(&shared).expect("valid");
    assert_eq!(c.queue.lease_timeout.as_secs(), 30);
    assert_eq!(
        c.queue
            .database_password()
            .expect("readable")
            .map(|s| s.expose().to_owned()),
        Some("hunter2".to_owned())
    );

    let p = problems(
        &shared
            .replace("postgres://", "mysql://")
            .replace("db-password", "missing")
            .replace("\"30s\"", "\"1s\""),
    );
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p[0].starts_with("queue.lease_timeout must be at least 3s"),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("queue.database_url \"mysql://relay@db.example.com/relay\" is not a PostgreSQL URL: write postgres://"),
        "{p:?}"
    );
    assert!(p[2].starts_with("queue.database_password_file "), "{p:?}");
    assert!(p[2].contains("missing"), "{p:?}");

    // a password in the URL works, with a warning, and is never shown
    let inline =
        load_str(&shared.replace("postgres://relay@", "postgres://relay:hunter2@")).expect("valid");
    let w = relay_config::warnings(&inline);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("queue.database_url \"postgres://relay:[redacted]@db.example.com/relay\" holds a password"),
        "{w:?}"
    );
    assert!(
        w[0].contains("queue.database_password_file") && !w[0].contains("hunter2"),
        "{w:?}"
    );
    let shown = serde_json::to_string(&inline.queue).expect("serialize");
    assert!(
        shown.contains("postgres://relay:[redacted]@db.example.com/relay")
            && !shown.contains("hunter2"),
        "{shown}"
    );
    // a raw '/' in it cuts the URL's host part short: refused, and masked
    // whole
    let p = problems(&shared.replace("postgres://relay@", "postgres://relay:hun/ter2@"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("queue.database_url \"postgres://[redacted]\" cannot be read: a '/' or '?' in its password")
            && p[0].contains("percent-encode them (%2F, %3F)")
            && !p[0].contains("ter2"),
        "{p:?}"
    );

    let p = problems(&VALID.replace(
        "retry_initial = \"1s\"\n",
        "retry_initial = \"1s\"\ndatabase_password_file = \"/nonexistent\"\n",
    ));
    assert!(
        p[0].starts_with("queue.database_password_file is set but queue.database_url is not"),
        "{p:?}"
    );
    let p = problems(&VALID.replace("[queue]\n", "[queue]\ndatabase = \"x\"\n"));
    assert!(p[0].contains("unknown field `database`"), "{p:?}");
}
