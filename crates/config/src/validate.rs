//! Rules the schema alone cannot express. Each problem is one line that
//! starts with the key path it is about.

use crate::{
    AccountConfig, Config, Flow, ListenerAuth, ListenerConfig, OAuthConfig, Provider, Secrets,
    Transport, ValueError,
};
use std::{collections::HashSet, path::Path};

/// Every problem of `config`; the credential files are read only with
/// [`Secrets::Read`].
pub(crate) fn problems(config: &Config, secrets: Secrets) -> Vec<String> {
    let mut out = Vec::new();
    let l = &config.listener;
    if l.bind.is_empty() {
        out.push("listener.bind is empty: the relay would listen nowhere".into());
    }
    if l.allowed_networks.is_empty() {
        out.push("listener.allowed_networks is empty: no client could send".into());
    }
    if l.hostname.trim().is_empty() || l.hostname.contains(char::is_whitespace) {
        out.push(format!(
            "listener.hostname {:?} is not a host name",
            l.hostname
        ));
    }
    if l.max_message_size == 0 {
        out.push("listener.max_message_size must be more than 0".into());
    }
    if l.max_recipients == 0 {
        out.push("listener.max_recipients must be more than 0".into());
    }
    listener_problems(l, secrets, &mut out);
    if let Err(why) = check_log_level(&config.log.level) {
        out.push(format!("log.level {:?}: {why}", config.log.level));
    }
    let q = &config.queue;
    if q.retry_initial.is_zero() {
        out.push("queue.retry_initial must be more than 0".into());
    }
    if q.retry_max < q.retry_initial {
        out.push("queue.retry_max is shorter than queue.retry_initial".into());
    }
    if q.max_age.is_zero() {
        out.push("queue.max_age must be more than 0".into());
    }
    if q.lease_timeout < std::time::Duration::from_secs(3) {
        out.push(
            "queue.lease_timeout must be at least 3s (it is renewed every third of it)".into(),
        );
    }
    if let Some(url) = &q.database_url {
        if !url.is_readable() {
            out.push(format!(
                "queue.database_url {url:?} cannot be read: a '/' or '?' in its password ends the host part early; percent-encode them (%2F, %3F), or better, take the password out of the URL and put it in queue.database_password_file"
            ));
        } else if !url.is_postgres() {
            out.push(format!(
                "queue.database_url {url:?} is not a PostgreSQL URL: write postgres://user@host:5432/database (or remove it to keep the queue in queue.dir)"
            ));
        }
    }
    if let Some(path) = &q.database_password_file {
        if q.database_url.is_none() {
            out.push("queue.database_password_file is set but queue.database_url is not: set the URL, or remove the password file".into());
        }
        if secrets == Secrets::Read {
            check_file("queue", "database_password_file", path, "", &mut out);
        }
    }
    let u = &config.upstream;
    if u.host.trim().is_empty() {
        out.push("upstream.host is empty".into());
    }
    if u.port == 0 {
        out.push("upstream.port must not be 0".into());
    }
    if u.max_connections == 0 {
        out.push("upstream.max_connections must be more than 0".into());
    }
    if u.messages_per_minute == 0 {
        out.push("upstream.messages_per_minute must be more than 0".into());
    }
    if u.recipients_per_day == 0 {
        out.push("upstream.recipients_per_day must be more than 0".into());
    }
    if let Some(ca) = &u.ca_file {
        if let Err(e) = std::fs::metadata(ca) {
            out.push(format!("upstream.ca_file {}: {e}", ca.display()));
        }
    }
    let g = &config.graph;
    if g.max_requests == 0 {
        out.push("graph.max_requests must be more than 0".into());
    }
    if g.timeout.is_zero() {
        out.push("graph.timeout must be more than 0".into());
    }
    if config.accounts.is_empty() {
        out.push("accounts: at least one [[accounts]] table is required".into());
    }
    let mut names = HashSet::new();
    for (i, account) in config.accounts.iter().enumerate() {
        if !names.insert(account.name.as_str()) {
            out.push(format!(
                "accounts[{i}].name {:?} is used by another account",
                account.name
            ));
        }
        for (key, value) in [
            ("messages_per_minute", account.messages_per_minute),
            ("recipients_per_day", account.recipients_per_day),
        ] {
            if value == Some(0) {
                out.push(format!("accounts[{i}].{key} must be more than 0"));
            }
        }
        account_problems(&format!("accounts[{i}]"), account, secrets, &mut out);
    }
    out
}

/// TLS, local logins, connection limits and timeouts of `[listener]`.
fn listener_problems(l: &ListenerConfig, secrets: Secrets, out: &mut Vec<String>) {
    match (&l.tls_certificate, &l.tls_private_key) {
        (Some(_), Some(_)) if secrets == Secrets::Skip => {}
        (Some(cert), Some(key)) => {
            check_file(
                "listener",
                "tls_certificate",
                cert,
                "-----BEGIN CERTIFICATE-----",
                out,
            );
            check_file("listener", "tls_private_key", key, "PRIVATE KEY-----", out);
        }
        (Some(_), None) => {
            out.push("listener.tls_private_key is missing (tls_certificate needs its key)".into())
        }
        (None, Some(_)) => out.push(
            "listener.tls_certificate is missing (tls_private_key needs its certificate)".into(),
        ),
        (None, None) => {
            if !l.implicit_tls_bind.is_empty() {
                out.push(
                    "listener.implicit_tls_bind needs listener.tls_certificate and listener.tls_private_key"
                        .into(),
                );
            }
        }
    }
    for addr in &l.implicit_tls_bind {
        if l.bind.contains(addr) {
            out.push(format!(
                "listener.implicit_tls_bind {addr} is also in listener.bind"
            ));
        }
    }
    if l.auth != ListenerAuth::Required {
        for net in l.allowed_networks.iter().filter(|n| n.prefix_len() == 0) {
            out.push(format!(
                "listener.allowed_networks {net} lets anyone send: that is an open relay. Name your networks (e.g. 192.168.10.0/24), or set listener.auth = \"required\" with [[listener.users]]"
            ));
        }
    }
    if l.auth != ListenerAuth::Off && l.users.is_empty() {
        out.push(
            "listener.users is empty: with listener.auth on, add [[listener.users]] (username, password_hash)"
                .into(),
        );
    }
    let mut names = HashSet::new();
    for (i, user) in l.users.iter().enumerate() {
        let at = format!("listener.users[{i}]");
        if user.username.is_empty() {
            out.push(format!("{at}.username is empty"));
        } else if user.username.chars().any(|c| c.is_control()) {
            out.push(format!("{at}.username contains a control character"));
        } else if !names.insert(user.username.as_str()) {
            out.push(format!(
                "{at}.username {:?} is used by another user",
                user.username
            ));
        }
        if !is_argon2_phc(&user.password_hash) {
            out.push(format!(
                "{at}.password_hash is not an argon2 PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash); make one with `smtp-oauth-relay hash-password`"
            ));
        }
    }
    if l.max_connections == 0 {
        out.push("listener.max_connections must be more than 0".into());
    }
    if l.max_connections_per_ip == 0 {
        out.push("listener.max_connections_per_ip must be more than 0".into());
    }
    for (key, value) in [
        ("command_timeout", l.command_timeout),
        ("data_block_timeout", l.data_block_timeout),
        ("data_timeout", l.data_timeout),
    ] {
        if value.is_zero() {
            out.push(format!("listener.{key} must be more than 0"));
        }
    }
}

/// `$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH` (also argon2i and argon2d).
fn is_argon2_phc(text: &str) -> bool {
    let parts: Vec<&str> = text.split('$').collect();
    matches!(parts.as_slice(),
        ["", alg, version, params, salt, hash]
            if matches!(*alg, "argon2id" | "argon2i" | "argon2d")
                && version.starts_with("v=")
                && params.contains("m=")
                && !salt.is_empty()
                && !hash.is_empty())
}

fn account_problems(at: &str, account: &AccountConfig, secrets: Secrets, out: &mut Vec<String>) {
    if account.name.trim().is_empty() {
        out.push(format!("{at}.name is empty"));
    }
    if account.transport == Transport::Graph && account.oauth.provider != Provider::Microsoft {
        out.push(format!(
            "{at}.transport = \"graph\" needs oauth.provider = \"microsoft\": Microsoft Graph takes Microsoft tokens only"
        ));
    }
    if !is_address(&account.mailbox) {
        out.push(format!(
            "{at}.mailbox {:?} is not a mailbox address (user@domain)",
            account.mailbox
        ));
    }
    if account.senders.is_empty() {
        out.push(format!(
            "{at}.senders is empty: no mail would use this account"
        ));
    }
    for (j, pattern) in account.senders.iter().enumerate() {
        let valid = pattern == "*"
            || pattern
                .strip_prefix("*@")
                .is_some_and(|domain| !domain.is_empty() && !domain.contains('@'))
            || is_address(pattern);
        if !valid {
            out.push(format!(
                "{at}.senders[{j}] {pattern:?} is not \"*\", \"*@domain\" or an address"
            ));
        }
    }
    oauth_problems(&format!("{at}.oauth"), &account.oauth, secrets, out);
}

/// The `[accounts.oauth]` rules: required keys per flow and provider, exactly
/// one client credential, readable files (with [`Secrets::Read`]).
fn oauth_problems(at: &str, o: &OAuthConfig, secrets: Secrets, out: &mut Vec<String>) {
    let read = secrets == Secrets::Read;
    if let Some(authority) = &o.authority {
        if let Err(why) = check_authority(authority) {
            out.push(format!("{at}.authority {authority:?}: {why}"));
        }
    }
    let required = |key: &str, value: &Option<String>, out: &mut Vec<String>| match value
        .as_deref()
        .map(str::trim)
    {
        None => out.push(format!("{at}.{key} is missing")),
        Some("") => out.push(format!("{at}.{key} is empty")),
        Some(_) => {}
    };
    let microsoft = o.provider == Provider::Microsoft;
    if microsoft {
        required("tenant_id", &o.tenant_id, out);
    }
    if o.flow != Flow::ServiceAccount {
        required("client_id", &o.client_id, out);
    }
    match (o.flow, o.provider) {
        (Flow::ClientCredentials, Provider::Google) => out.push(format!(
            "{at}.flow \"client_credentials\" is for Microsoft: Google uses \"service_account\" (domain-wide delegation) or \"refresh_token\""
        )),
        (Flow::ServiceAccount, Provider::Microsoft) => out.push(format!(
            "{at}.flow \"service_account\" is for provider = \"google\": Microsoft uses \"client_credentials\""
        )),
        _ => {}
    }
    let certificate = o.client_certificate.is_some() || o.client_private_key.is_some();
    let credentials = usize::from(o.client_secret.is_some())
        + usize::from(o.client_secret_file.is_some())
        + usize::from(certificate);
    match o.flow {
        Flow::ServiceAccount => {
            if credentials > 0 {
                out.push(format!(
                    "{at}: a service account authenticates with service_account_key_file only; remove client_secret, client_secret_file and client_certificate"
                ));
            }
            match &o.service_account_key_file {
                None => out.push(format!("{at}.service_account_key_file is missing")),
                Some(path) if read => {
                    check_file(at, "service_account_key_file", path, "\"private_key\"", out)
                }
                Some(_) => {}
            }
        }
        Flow::ClientCredentials | Flow::RefreshToken => {
            if o.service_account_key_file.is_some() {
                out.push(format!(
                    "{at}.service_account_key_file is only for flow = \"service_account\""
                ));
            }
            // A delegated Microsoft app may be a public client (no secret);
            // app-only and Google clients always need one.
            let optional = o.flow == Flow::RefreshToken && microsoft;
            if credentials == 0 && !optional {
                out.push(format!(
                    "{at}.client_secret_file is missing (or set {at}.client_secret, or client_certificate and client_private_key)"
                ));
            }
            if credentials > 1 {
                out.push(if certificate {
                    format!("{at}: set only one of client_secret, client_secret_file and the client_certificate/client_private_key pair")
                } else {
                    format!("{at}: set only one of client_secret and client_secret_file")
                });
            }
            if o.provider == Provider::Google && certificate {
                out.push(format!(
                    "{at}.client_certificate is for Microsoft; Google clients use a client secret"
                ));
            }
            if let Some(secret) = &o.client_secret {
                if secret.expose().trim().is_empty() {
                    out.push(format!("{at}.client_secret is empty"));
                }
            }
            if let Some(path) = o.client_secret_file.as_ref().filter(|_| read) {
                check_file(at, "client_secret_file", path, "", out);
            }
            if certificate {
                match (&o.client_certificate, &o.client_private_key) {
                    (Some(_), Some(_)) if !read => {}
                    (Some(cert), Some(key)) => {
                        check_file(at, "client_certificate", cert, "-----BEGIN CERTIFICATE-----", out);
                        check_file(at, "client_private_key", key, "PRIVATE KEY-----", out);
                    }
                    (Some(_), None) => out.push(format!(
                        "{at}.client_private_key is missing (client_certificate needs its key)"
                    )),
                    (None, _) => out.push(format!(
                        "{at}.client_certificate is missing (client_private_key needs its certificate)"
                    )),
                }
            }
        }
    }
    if o.flow != Flow::RefreshToken {
        for (key, set) in [
            ("token_cache", o.token_cache.is_some()),
            ("token_cache_key_file", o.token_cache_key_file.is_some()),
        ] {
            if set {
                out.push(format!(
                    "{at}.{key} is only used with flow = \"refresh_token\""
                ));
            }
        }
    }
    if let Some(path) = o.token_cache_key_file.as_ref().filter(|_| read) {
        match std::fs::read_to_string(path) {
            Ok(text) if !is_cache_key(text.trim()) => out.push(format!(
                "{at}.token_cache_key_file {}: must hold a 32-byte key, base64 or hex (e.g. `openssl rand -base64 32`)",
                path.display()
            )),
            Ok(_) => {}
            Err(e) => out.push(format!("{at}.token_cache_key_file {}: {e}", path.display())),
        }
    }
    if let Some(scope) = &o.scope {
        if scope.trim().is_empty() {
            out.push(format!("{at}.scope is empty"));
        }
    }
    if o.refresh_before.is_zero() {
        out.push(format!("{at}.refresh_before must be more than 0"));
    }
}

/// A readable, non-empty file that contains `marker` (when not empty).
fn check_file(at: &str, key: &str, path: &Path, marker: &str, out: &mut Vec<String>) {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => {
            out.push(format!("{at}.{key} {} is empty", path.display()))
        }
        Ok(text) if !text.contains(marker) => out.push(format!(
            "{at}.{key} {} does not look right: expected {marker}",
            path.display()
        )),
        Ok(_) => {}
        Err(e) => out.push(format!("{at}.{key} {}: {e}", path.display())),
    }
}

/// 32 bytes as 64 hex digits or base64 (standard or URL-safe, padded or not).
fn is_cache_key(text: &str) -> bool {
    decode_cache_key(text).is_some()
}

/// The 32-byte token cache key in `text` (64 hex digits, or base64).
pub fn decode_cache_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        return Some(key);
    }
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let unpadded = text.trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(unpadded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(unpadded))
        .ok()?;
    bytes.try_into().ok()
}

/// `local@domain` with one `@`, both sides non-empty, no spaces or brackets.
pub(crate) fn is_address(text: &str) -> bool {
    match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !text.contains(|c: char| c.is_whitespace() || c == '<' || c == '>')
        }
        None => false,
    }
}

/// Tokens travel to the authority: https, except to a loopback test server.
fn check_authority(authority: &str) -> Result<(), ValueError> {
    let url = match url::Url::parse(authority) {
        Ok(url) => url,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Err(ValueError::NoScheme(authority.to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(ValueError::NoHost),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(ValueError::NotHttps),
    }
}

/// `error`, `warn`, `info`, `debug`, `trace` or `off`, or a filter of
/// comma-separated `[target=]level` directives.
fn check_log_level(filter: &str) -> Result<(), ValueError> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    if filter.trim().is_empty() {
        return Err(ValueError::EmptyLogLevel);
    }
    for directive in filter.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(ValueError::NotLogLevel(level.to_owned()));
        }
    }
    Ok(())
}

/// What `check` should tell an admin although the relay would run: each
/// warning names the key and the fix. Reads the client secret file.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, account) in config.accounts.iter().enumerate() {
        let at = format!("accounts[{i}].oauth");
        let o = &account.oauth;
        for (key, value, fix) in [
            ("tenant_id", &o.tenant_id, "the Directory (tenant) ID"),
            ("client_id", &o.client_id, "the Application (client) ID"),
        ] {
            if value.as_deref().map(str::trim) == Some(PLACEHOLDER_GUID) {
                out.push(format!(
                    "{at}.{key} is the example's placeholder: put {fix} from the app registration's Overview page in Entra ID"
                ));
            }
        }
        let secret_id = "looks like a GUID: that is the secret's ID; use its Value (shown once, when the secret is created under Certificates & secrets)";
        if o.client_secret
            .as_ref()
            .is_some_and(|s| is_guid(s.expose()))
        {
            out.push(format!("{at}.client_secret {secret_id}"));
        }
        if let Some(path) = &o.client_secret_file {
            if std::fs::read_to_string(path).is_ok_and(|text| is_guid(&text)) {
                out.push(format!(
                    "{at}.client_secret_file {}: the secret {secret_id}",
                    path.display()
                ));
            }
        }
        for (key, path) in [
            ("client_secret_file", &o.client_secret_file),
            ("client_private_key", &o.client_private_key),
            ("service_account_key_file", &o.service_account_key_file),
            ("token_cache_key_file", &o.token_cache_key_file),
        ] {
            if let Some(path) = path.as_ref().filter(|p| readable_by_others(p)) {
                out.push(format!(
                    "{at}.{key} {} is readable by every user: chmod 600 {0}",
                    path.display()
                ));
            }
        }
    }
    if let Some(url) = &config.queue.database_url {
        if url.has_password() {
            out.push(format!(
                "queue.database_url {url:?} holds a password: put it in a file only the relay reads (chmod 600), name that file in queue.database_password_file, and take it out of the URL"
            ));
        }
    }
    out
}

/// The GUID the example configuration uses for the ids to fill in.
const PLACEHOLDER_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex digits.
fn is_guid(text: &str) -> bool {
    let text = text.trim();
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(unix)]
fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(not(unix))]
fn readable_by_others(_: &Path) -> bool {
    false
}
