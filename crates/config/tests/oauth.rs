//! `[accounts.oauth]` rules for the credentials and flows.

use relay_config::{load_str, ConfigError, Flow, Provider};

fn problems(oauth: &str) -> Vec<String> {
    let toml = format!("[[accounts]]\nname = \"main\"\nmailbox = \"relay@contoso.com\"\n\n[accounts.oauth]\n{oauth}\n");
    match load_str(&toml) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(p)) => p,
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn exactly_one_client_credential() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("app.pem");
    let key = dir.path().join("app.key");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let base = "flow = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"";
    let pair = format!(
        "client_certificate = '{}'\nclient_private_key = '{}'",
        cert.display(),
        key.display()
    );
    assert!(problems(&format!("{base}\n{pair}")).is_empty());
    let both = problems(&format!("{base}\n{pair}\nclient_secret = \"s\""));
    assert_eq!(both.len(), 1, "{both:?}");
    assert!(
        both[0].starts_with("accounts[0].oauth: set only one of"),
        "{both:?}"
    );
    let half = problems(&format!(
        "{base}\nclient_certificate = '{}'",
        cert.display()
    ));
    assert_eq!(
        half,
        vec!["accounts[0].oauth.client_private_key is missing (client_certificate needs its key)"]
    );
    let none = problems(base);
    assert!(
        none[0].starts_with("accounts[0].oauth.client_secret_file is missing"),
        "{none:?}"
    );
    let bad = problems(&format!(
        "{base}\nclient_certificate = '{}'\nclient_private_key = '{}'",
        key.display(),
        key.display()
    ));
    assert!(
        bad[0].starts_with("accounts[0].oauth.client_certificate"),
        "{bad:?}"
    );
}

#[test]
fn delegated_and_google_rules() {
    // a delegated Microsoft app may be a public client
    assert!(problems("flow = \"refresh_token\"\ntenant_id = \"t\"\nclient_id = \"c\"").is_empty());
    let google = problems("provider = \"google\"\nflow = \"service_account\"");
    assert_eq!(
        google,
        vec!["accounts[0].oauth.service_account_key_file is missing"]
    );
    let cc = problems("provider = \"google\"\nflow = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"");
    assert!(cc[0].contains("Google uses \"service_account\""), "{cc:?}");
    let cache = problems("flow = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntoken_cache = \"/x\"");
    assert_eq!(
        cache,
        vec!["accounts[0].oauth.token_cache is only used with flow = \"refresh_token\""]
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "too short").unwrap();
    let bad_key = problems(&format!("flow = \"refresh_token\"\ntenant_id = \"t\"\nclient_id = \"c\"\ntoken_cache_key_file = '{}'", key.display()));
    assert!(bad_key[0].contains("32-byte key"), "{bad_key:?}");
}

#[test]
fn defaults_per_flow_and_provider() {
    let toml = "[queue]\ndir = \"/srv/relay/queue\"\n[[accounts]]\nname = \"a/b\"\nmailbox = \"relay@contoso.com\"\n[accounts.oauth]\nflow = \"refresh_token\"\ntenant_id = \"t\"\nclient_id = \"c\"\n";
    let config = load_str(toml).unwrap();
    let oauth = &config.accounts[0].oauth;
    assert_eq!(oauth.flow, Flow::RefreshToken);
    assert_eq!(oauth.provider, Provider::Microsoft);
    assert_eq!(
        oauth.scope(),
        "https://outlook.office.com/SMTP.Send offline_access"
    );
    assert_eq!(
        oauth.device_code_url(),
        "https://login.microsoftonline.com/t/oauth2/v2.0/devicecode"
    );
    assert_eq!(oauth.refresh_before, std::time::Duration::from_secs(600));
    assert_eq!(
        oauth.token_cache_path("a/b", &config.queue.dir),
        std::path::Path::new("/srv/relay/tokens/a_b.json")
    );
}
