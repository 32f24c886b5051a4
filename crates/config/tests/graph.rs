//! `[graph]` and an account's `transport`.

use relay_config::{load_str, ConfigError, Transport};

const GRAPH_ACCOUNT: &str = r#"
[queue]
dir = "/tmp/q"

[[accounts]]
name = "main"
mailbox = "relay@contoso.com"
transport = "graph"

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
fn defaults_and_graph_scopes() {
    let c = load_str(GRAPH_ACCOUNT).expect("valid");
    assert_eq!(c.accounts[0].transport, Transport::Graph);
    assert_eq!(c.graph.endpoint.to_string(), "https://graph.microsoft.com");
    assert_eq!(c.graph.max_requests, 4);
    assert_eq!(c.graph.timeout.as_secs(), 120);
    assert_eq!(
        c.accounts[0].oauth.scope(),
        "https://graph.microsoft.com/.default"
    );

    let delegated = GRAPH_ACCOUNT
        .replace("client_credentials", "refresh_token")
        .replace("client_secret = \"s\"\n", "");
    let c = load_str(&delegated).expect("valid");
    assert_eq!(
        c.accounts[0].oauth.scope(),
        "https://graph.microsoft.com/Mail.Send offline_access"
    );

    let explicit = format!("{GRAPH_ACCOUNT}scope = \"https://graph.microsoft.us/.default\"\n");
    let c = load_str(&explicit).expect("valid");
    assert_eq!(
        c.accounts[0].oauth.scope(),
        "https://graph.microsoft.us/.default"
    );

    let smtp = load_str(&GRAPH_ACCOUNT.replace("transport = \"graph\"\n", "")).expect("valid");
    assert_eq!(smtp.accounts[0].transport, Transport::Smtp);
    assert_eq!(
        smtp.accounts[0].oauth.scope(),
        "https://outlook.office365.com/.default"
    );
}

#[test]
fn graph_section_is_checked() {
    let with = |graph: &str| format!("[graph]\n{graph}\n{GRAPH_ACCOUNT}");
    let c = load_str(&with(
        "endpoint = \"http://127.0.0.1:8080\"\nmax_requests = 2\ntimeout = \"30s\"",
    ))
    .expect("loopback http is allowed");
    assert_eq!(c.graph.endpoint.to_string(), "http://127.0.0.1:8080");
    assert_eq!(c.graph.max_requests, 2);

    let p = problems(&with("endpoint = \"http://graph.microsoft.com\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("graph.endpoint"), "{p:?}");
    assert!(p[0].contains("must use https"), "{p:?}");

    assert_eq!(
        problems(&with("max_requests = 0")),
        vec!["graph.max_requests must be more than 0"]
    );
    let p = problems(&with("retries = 3"));
    assert!(p[0].contains("graph") && p[0].contains("retries"), "{p:?}");
    let p = problems(&GRAPH_ACCOUNT.replace("\"graph\"", "\"imap\""));
    assert!(p[0].contains("transport"), "{p:?}");
}
