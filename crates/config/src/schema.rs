//! The configuration schema. Each field's doc comment is its reference
//! documentation; defaults are what an admin gets when the key is absent.

use crate::Secret;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::{fmt::Display, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where legacy applications connect.
    #[serde(default)]
    pub listener: ListenerConfig,
    /// The durable queue between the listener and delivery.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The submission server mail is delivered to (Microsoft 365).
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// The administrative HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The mailboxes the relay sends as, each with its own OAuth credentials.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
}

/// `[listener]`: the local, unauthenticated SMTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Addresses to listen on, `ip:port`. Default `["127.0.0.1:2525"]`.
    /// From the environment: a comma-separated list.
    #[serde(default = "default_bind", deserialize_with = "one_or_many")]
    pub bind: Vec<SocketAddr>,
    /// The name in the greeting and the EHLO reply. Default: the system's host name.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Client networks allowed to send (CIDR). Everyone else gets `554` and is
    /// disconnected: the relay is never open. Default: loopback only.
    #[serde(default = "default_allowed_networks", deserialize_with = "one_or_many")]
    pub allowed_networks: Vec<IpNet>,
    /// Largest message accepted, in bytes; advertised with `SIZE`. Larger
    /// messages get `552 5.3.4`. Default 36700160 (35 MiB, Microsoft 365's default).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Recipients per message; each `RCPT` past it gets `452 4.5.3`. Default 500
    /// (Microsoft 365's limit).
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
}

/// `[queue]`: where accepted mail waits, and how failed attempts are retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue directory; must be writable by the relay. Default
    /// `/var/lib/smtp-oauth-relay/queue`.
    #[serde(default = "default_queue_dir")]
    pub dir: PathBuf,
    /// Delay before the first retry of a temporary failure; it doubles with
    /// every attempt. Default `1m`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between retries. Default `1h`.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long a message may stay undelivered before it fails. Default `5d`.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

/// How the connection to the upstream is secured. There is no plaintext option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Security {
    /// Plain TCP upgraded with STARTTLS, which the server must offer (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl TryFrom<String> for Security {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "starttls" => Ok(Security::Starttls),
            "tls" => Ok(Security::Tls),
            _ => Err(format!(
                "{value:?} is not a security mode: use \"starttls\" or \"tls\" (there is no plaintext mode)"
            )),
        }
    }
}

/// `[upstream]`: the submission server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name; also the name its TLS certificate must carry. Default `smtp.office365.com`.
    #[serde(default = "default_upstream_host")]
    pub host: String,
    /// Port. Default 587.
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    /// `starttls` (default) or `tls`.
    #[serde(default = "default_security")]
    pub security: Security,
    /// Extra trust roots (PEM), added to the system's.
    pub ca_file: Option<PathBuf>,
    /// Concurrent connections per mailbox. Default 3, Microsoft 365's limit:
    /// more get `432 4.3.2`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// `[admin]`: health and metrics endpoint (served by a later release).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint. Default `127.0.0.1:9925`.
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
}

/// `[[accounts]]`: a mailbox the relay authenticates as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// A short name for logs and commands.
    pub name: String,
    /// The mailbox (UPN) used as the XOAUTH2 user.
    pub mailbox: String,
    /// Envelope senders routed to this account: `user@domain`, `*@domain` or
    /// `*`. The most specific match across accounts wins. Default `["*"]`.
    #[serde(default = "default_senders", deserialize_with = "one_or_many")]
    pub senders: Vec<String>,
    /// How the account obtains access tokens.
    pub oauth: OAuthConfig,
}

/// The OAuth 2.0 grant an account uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Flow {
    /// App-only: the app registration's own credentials (SMTP.SendAsApp).
    ClientCredentials,
}

impl TryFrom<String> for Flow {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "client_credentials" => Ok(Flow::ClientCredentials),
            _ => Err(format!(
                "{value:?} is not a flow: use \"client_credentials\""
            )),
        }
    }
}

/// `[accounts.oauth]`: where and how tokens are obtained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The grant: `client_credentials`.
    pub flow: Flow,
    /// Identity platform base URL. https only, except loopback (tests).
    /// Default `https://login.microsoftonline.com`; sovereign clouds use
    /// their own (e.g. `https://login.microsoftonline.us`).
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Directory (tenant) id: a GUID or a verified domain.
    pub tenant_id: Option<String>,
    /// Application (client) id of the app registration.
    pub client_id: Option<String>,
    /// The client secret's *value* (not its id). Prefer `client_secret_file`.
    pub client_secret: Option<Secret>,
    /// A file holding the client secret value (surrounding white space is
    /// ignored). Read at each token request, so a rotated secret needs no restart.
    pub client_secret_file: Option<PathBuf>,
    /// Scope requested. Default for client credentials:
    /// `https://outlook.office365.com/.default`.
    pub scope: Option<String>,
}

impl OAuthConfig {
    /// The scope to request: the configured one, or the flow's default.
    pub fn scope(&self) -> &str {
        match (&self.scope, self.flow) {
            (Some(scope), _) => scope,
            (None, Flow::ClientCredentials) => "https://outlook.office365.com/.default",
        }
    }

    /// `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant_id.as_deref().unwrap_or_default()
        )
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: default_bind(),
            hostname: default_hostname(),
            allowed_networks: default_allowed_networks(),
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: default_queue_dir(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            max_age: default_max_age(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: default_upstream_host(),
            port: default_upstream_port(),
            security: default_security(),
            ca_file: None,
            max_connections: default_max_connections(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: default_admin_bind(),
        }
    }
}

fn default_bind() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 2525))]
}
fn default_hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
fn default_allowed_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}
fn default_max_message_size() -> u64 {
    36_700_160
}
fn default_max_recipients() -> usize {
    500
}
fn default_queue_dir() -> PathBuf {
    PathBuf::from("/var/lib/smtp-oauth-relay/queue")
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(60)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_age() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}
fn default_upstream_host() -> String {
    "smtp.office365.com".into()
}
fn default_upstream_port() -> u16 {
    587
}
fn default_security() -> Security {
    Security::Starttls
}
fn default_max_connections() -> usize {
    3
}
fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9925))
}
fn default_senders() -> Vec<String> {
    vec!["*".into()]
}
fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}

/// A list, or (as environment variables give them) one comma-separated string.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Many(items) => items,
        OneOrMany::One(joined) => joined.split(',').map(str::to_owned).collect(),
    };
    items
        .iter()
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|e| serde::de::Error::custom(format!("`{}`: {e}", item.trim())))
        })
        .collect()
}
