//! Rules the schema alone cannot express. Each problem is one line that
//! starts with the key path it is about.

use crate::{AccountConfig, Config, Flow};
use std::collections::HashSet;

pub(crate) fn problems(config: &Config) -> Vec<String> {
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
    if let Some(ca) = &u.ca_file {
        if let Err(e) = std::fs::metadata(ca) {
            out.push(format!("upstream.ca_file {}: {e}", ca.display()));
        }
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
        account_problems(&format!("accounts[{i}]"), account, &mut out);
    }
    out
}

fn account_problems(at: &str, account: &AccountConfig, out: &mut Vec<String>) {
    if account.name.trim().is_empty() {
        out.push(format!("{at}.name is empty"));
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
    let o = &account.oauth;
    let at = format!("{at}.oauth");
    if let Err(why) = check_authority(&o.authority) {
        out.push(format!("{at}.authority {:?}: {why}", o.authority));
    }
    match o.flow {
        Flow::ClientCredentials => {
            for (key, value) in [("tenant_id", &o.tenant_id), ("client_id", &o.client_id)] {
                match value.as_deref().map(str::trim) {
                    None => out.push(format!("{at}.{key} is missing")),
                    Some("") => out.push(format!("{at}.{key} is empty")),
                    Some(_) => {}
                }
            }
            match (&o.client_secret, &o.client_secret_file) {
                (None, None) => out.push(format!(
                    "{at}.client_secret_file is missing (or set {at}.client_secret)"
                )),
                (Some(_), Some(_)) => out.push(format!(
                    "{at}: set only one of client_secret and client_secret_file"
                )),
                (Some(secret), None) if secret.expose().trim().is_empty() => {
                    out.push(format!("{at}.client_secret is empty"))
                }
                (None, Some(path)) => match std::fs::read_to_string(path) {
                    Ok(text) if text.trim().is_empty() => out.push(format!(
                        "{at}.client_secret_file {} is empty",
                        path.display()
                    )),
                    Ok(_) => {}
                    Err(e) => out.push(format!("{at}.client_secret_file {}: {e}", path.display())),
                },
                (Some(_), None) => {}
            }
        }
    }
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
fn check_authority(authority: &str) -> Result<(), String> {
    let url = url::Url::parse(authority).map_err(|e| e.to_string())?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host".into()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must be an https:// URL".into()),
    }
}
