//! The configuration schema. Each field's doc comment is its reference
//! documentation; defaults are what an admin gets when the key is absent.

use crate::{Secret, ValueError};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// Microsoft Graph, for accounts with `transport = "graph"`.
    #[serde(default)]
    pub graph: GraphConfig,
    /// The administrative HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The mailboxes the relay sends as, each with its own OAuth credentials.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
}

/// `[listener]`: the local, unauthenticated SMTP server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// `queue` (default): `250` as soon as the message is on disk; delivery
    /// follows. `passthrough`: the reply to `DATA` waits for Microsoft 365's
    /// and carries its code and text, so an application's "test settings"
    /// button sees the real error. A durable copy is still written first;
    /// a message Microsoft 365 did not take is not retried (the client was
    /// told) and stays listed as failed.
    #[serde(default)]
    pub mode: Mode,
    /// On SIGTERM, how long a client in the middle of a transaction may take
    /// to finish it (idle clients are told `421` at once), and how long
    /// deliveries in progress get. Default `10s`.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Certificate chain (PEM) for TLS with clients. With `tls_private_key`,
    /// it enables `STARTTLS` (advertised only then) and `implicit_tls_bind`.
    /// Both files are read again on every reload (SIGHUP), so a renewed
    /// certificate is used by new connections without a restart. TLS 1.2
    /// and 1.3 only. Default: none (no TLS).
    #[serde(default, deserialize_with = "credential_path")]
    pub tls_certificate: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, deserialize_with = "credential_path")]
    pub tls_private_key: Option<PathBuf>,
    /// Addresses for implicit TLS (TLS from the first byte, usually port
    /// 465), in addition to `bind`. Needs `tls_certificate`. Default: none.
    #[serde(default, deserialize_with = "one_or_many")]
    pub implicit_tls_bind: Vec<SocketAddr>,
    /// Local `AUTH` for applications that insist on logging in: `off`
    /// (default; `AUTH` is not offered), `optional` (offered; clients that do
    /// not log in may still send) or `required` (`MAIL` needs a login first:
    /// `530 5.7.0`). `AUTH PLAIN` and `LOGIN` are offered only over TLS or to
    /// loopback clients. These logins are checked here and never go upstream.
    #[serde(default)]
    pub auth: ListenerAuth,
    /// `[[listener.users]]`: who may log in when `auth` is not `off`.
    #[serde(default)]
    pub users: Vec<ListenerUser>,
    /// Clients connected at once, in total; one more is told `421 4.3.2`
    /// and disconnected. Default 1000.
    #[serde(default = "default_listener_max_connections")]
    pub max_connections: usize,
    /// Clients connected at once from one IP address; one more is told
    /// `421 4.7.0` and disconnected. Default 50.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// How long the relay waits for a command (RFC 5321 4.5.3.2). Default `5m`.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long the relay waits for the next piece of a message after
    /// `354` (RFC 5321: 3 minutes per data block). Default `3m`.
    #[serde(default = "default_data_block_timeout", with = "humantime_serde")]
    pub data_block_timeout: Duration,
    /// The longest a whole message may take, from `354` to its end.
    /// Default `10m`.
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Bytes per second a message must average against slow-drip clients:
    /// after `354`, a client gets `data_block_timeout` plus one second per
    /// `min_data_rate` bytes received so far (never more than
    /// `data_timeout`), else `421 4.4.2`. `0` turns the check off. Default 1024.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u64,
    /// The pause before the greeting. A client that talks before the
    /// greeting (a spam bot, or a command-injection attempt) is told `554
    /// 5.5.1` and disconnected, like Postfix's postscreen pregreet test.
    /// `0s` turns it off. Default `200ms`.
    #[serde(default = "default_greet_delay", with = "humantime_serde")]
    pub greet_delay: Duration,
}

/// `listener.auth`: whether clients log in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum ListenerAuth {
    /// `AUTH` is not offered.
    #[default]
    Off,
    /// Offered; mail is taken with or without a login.
    Optional,
    /// Mail is taken only after a login.
    Required,
}

impl TryFrom<String> for ListenerAuth {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "off" => Ok(ListenerAuth::Off),
            "optional" => Ok(ListenerAuth::Optional),
            "required" => Ok(ListenerAuth::Required),
            _ => Err(ValueError::Unknown {
                value,
                what: "an auth setting",
                choices: r#""off", "optional" or "required""#,
            }),
        }
    }
}

/// `[[listener.users]]`: one local login.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerUser {
    /// The user name the application logs in with.
    pub username: String,
    /// Its password as an argon2 PHC string (`$argon2id$v=19$...`); print
    /// one with `smtp-oauth-relay hash-password`. The password itself is
    /// never stored.
    #[serde(serialize_with = "redacted")]
    pub password_hash: String,
}

/// When the listener answers the end of `DATA`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum Mode {
    /// Once the message is safely queued.
    #[default]
    Queue,
    /// Once the upstream answered, with its answer.
    Passthrough,
}

impl TryFrom<String> for Mode {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "queue" => Ok(Mode::Queue),
            "passthrough" => Ok(Mode::Passthrough),
            _ => Err(ValueError::Unknown {
                value,
                what: "a mode",
                choices: r#""queue" or "passthrough""#,
            }),
        }
    }
}

/// `[queue]`: where accepted mail waits, and how failed attempts are retried.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue directory; must be writable by the relay. Default
    /// `/var/lib/smtp-oauth-relay/queue`.
    #[serde(default = "default_queue_dir", deserialize_with = "env_path")]
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
    /// Share the queue with other relays: the PostgreSQL database (13 or
    /// later) they all use, as `postgres://user@host:5432/db?sslmode=verify-full`
    /// (`postgresql://` also works), without the password (one in it works,
    /// percent-encoded, but `check` and the start warn, and `config show`
    /// masks it). Not set
    /// (the default): the queue is an embedded database in `dir`.
    #[serde(default)]
    pub database_url: Option<crate::DatabaseUrl>,
    /// File holding the database user's password (`${NAME}` is expanded,
    /// e.g. `${CREDENTIALS_DIRECTORY}/db-password`); surrounding whitespace
    /// is ignored. Not needed when the server trusts the relay otherwise
    /// (a client certificate, a local socket).
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    /// How long a relay's claim on a message it is delivering lasts without
    /// being renewed (it is renewed every third of this): a relay that dies
    /// has its messages taken over by another after this. Default `60s`.
    #[serde(default = "default_lease_timeout", with = "humantime_serde")]
    pub lease_timeout: Duration,
}

impl QueueConfig {
    /// The database password from `database_password_file`, trimmed;
    /// `None` when no file is set.
    pub fn database_password(&self) -> std::io::Result<Option<crate::Secret>> {
        self.database_password_file
            .as_ref()
            .map(|path| std::fs::read_to_string(path).map(|text| crate::Secret::new(text.trim())))
            .transpose()
    }
}

/// How the connection to the upstream is secured. There is no plaintext option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum Security {
    /// Plain TCP upgraded with STARTTLS, which the server must offer (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl TryFrom<String> for Security {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "starttls" => Ok(Security::Starttls),
            "tls" => Ok(Security::Tls),
            _ => Err(ValueError::Unknown {
                value,
                what: "a security mode",
                choices: r#""starttls" or "tls" (there is no plaintext mode)"#,
            }),
        }
    }
}

/// `[upstream]`: the submission server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    #[serde(default, deserialize_with = "opt_env_path")]
    pub ca_file: Option<PathBuf>,
    /// Concurrent connections per mailbox. Default 3, Microsoft 365's limit:
    /// more get `432 4.3.2`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Messages per minute per mailbox. Default 30, Microsoft 365's limit.
    /// Mail past the pace waits in the queue. An account may set its own.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_minute: u32,
    /// Recipients per rolling day per mailbox. Default 10000, Microsoft
    /// 365's limit. An account may set its own.
    #[serde(default = "default_recipients_per_day")]
    pub recipients_per_day: u32,
    /// An upstream connection unused this long is closed. Default `30s`.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

/// `[graph]`: Microsoft Graph's `sendMail`, the way out for accounts with
/// `transport = "graph"` (tenants where SMTP AUTH is switched off).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Graph's base URL. Default `https://graph.microsoft.com`; national
    /// clouds: `https://graph.microsoft.us`, `https://dod-graph.microsoft.us`,
    /// `https://microsoftgraph.chinacloudapi.cn`. Must be https, except on
    /// loopback.
    #[serde(default)]
    pub endpoint: relay_graph::Endpoint,
    /// Requests in flight per mailbox, across all its deliveries. Default 4,
    /// Graph's `MailboxConcurrency` limit: more get `429`.
    #[serde(default = "default_graph_max_requests")]
    pub max_requests: usize,
    /// The longest one HTTP request (or one upload range) may take. Default `2m`.
    #[serde(default = "default_graph_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            endpoint: relay_graph::Endpoint::default(),
            max_requests: default_graph_max_requests(),
            timeout: default_graph_timeout(),
        }
    }
}

fn default_graph_max_requests() -> usize {
    relay_graph::DEFAULT_MAX_REQUESTS
}
fn default_graph_timeout() -> Duration {
    relay_graph::DEFAULT_TIMEOUT
}

/// How an account's mail leaves the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// SMTP submission with AUTH XOAUTH2 to `[upstream]`.
    #[default]
    Smtp,
    /// Microsoft Graph's `sendMail` at `[graph] endpoint`.
    Graph,
}

/// The token scope of a Graph account using client credentials.
pub const GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";
/// The token scope of a Graph account using a refresh token (delegated).
pub const GRAPH_DELEGATED_SCOPE: &str = "https://graph.microsoft.com/Mail.Send offline_access";

/// `[log]`: where and how the relay logs (always to standard error, which
/// systemd's journal and container runtimes collect).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
    /// `error`, `warn`, `info` (default), `debug` or `trace`, or a full
    /// filter like `info,relay_delivery=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(ValueError::Unknown {
                value,
                what: "a log format",
                choices: r#""text" or "json""#,
            }),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[admin]`: the health and metrics HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
    /// Default `127.0.0.1:9925`. Keep it on loopback or a management network.
    #[serde(default = "default_admin_bind", deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
}

/// `[[accounts]]`: a mailbox the relay authenticates as.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// This mailbox's messages per minute, instead of `upstream.messages_per_minute`.
    pub messages_per_minute: Option<u32>,
    /// This mailbox's recipients per day, instead of `upstream.recipients_per_day`.
    pub recipients_per_day: Option<u32>,
    /// Rewrite the envelope sender and the `From:` header to the mailbox,
    /// keeping the original sender in `Reply-To:` when the message has none:
    /// the fix for applications with a hard-coded sender that Microsoft 365
    /// refuses with `554 5.2.252 SendAsDenied`. Default false.
    #[serde(default)]
    pub rewrite_from: bool,
    /// Send a delivery status notification (RFC 3464) to the envelope sender
    /// when a message fails, from the mailbox. Never for a null sender or
    /// for a notification. Default false.
    #[serde(default)]
    pub bounce: bool,
    /// `smtp` (default): SMTP submission to `[upstream]`. `graph`: Microsoft
    /// Graph's `sendMail` at `[graph] endpoint`, for tenants where SMTP AUTH
    /// is off (`535 5.7.139`). The token scope then defaults to
    /// `https://graph.microsoft.com/.default` (client credentials) or
    /// `https://graph.microsoft.com/Mail.Send offline_access` (refresh
    /// token). Pacing applies the same.
    #[serde(default)]
    pub transport: Transport,
    /// How the account obtains access tokens.
    pub oauth: OAuthConfig,
}

/// The OAuth 2.0 grant an account uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum Flow {
    /// App-only: the app registration's own credentials (SMTP.SendAsApp),
    /// a client secret or a certificate.
    ClientCredentials,
    /// Delegated: a user signs in once with `smtp-oauth-relay authorize`; the
    /// relay keeps the refresh token in the token cache.
    RefreshToken,
    /// Google only: a service account with domain-wide delegation, acting as
    /// the account's mailbox (JWT bearer grant).
    ServiceAccount,
}

impl Flow {
    /// The name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Flow::ClientCredentials => "client_credentials",
            Flow::RefreshToken => "refresh_token",
            Flow::ServiceAccount => "service_account",
        }
    }
}

impl TryFrom<String> for Flow {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "client_credentials" => Ok(Flow::ClientCredentials),
            "refresh_token" => Ok(Flow::RefreshToken),
            "service_account" => Ok(Flow::ServiceAccount),
            _ => Err(ValueError::Unknown {
                value,
                what: "a flow",
                choices: r#""client_credentials", "refresh_token" or "service_account""#,
            }),
        }
    }
}

/// Whose identity platform issues the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[serde(try_from = "String")]
pub enum Provider {
    /// Microsoft Entra ID (Microsoft 365). The default.
    #[default]
    Microsoft,
    /// Google (Gmail / Google Workspace).
    Google,
}

impl Provider {
    /// The name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Microsoft => "microsoft",
            Provider::Google => "google",
        }
    }
}

impl TryFrom<String> for Provider {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "microsoft" => Ok(Provider::Microsoft),
            "google" => Ok(Provider::Google),
            _ => Err(ValueError::Unknown {
                value,
                what: "a provider",
                choices: r#""microsoft" or "google""#,
            }),
        }
    }
}

/// How a client assertion (certificate credential) is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "String")]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256, certificate named by `x5t#S256`. The default,
    /// and what current Microsoft documentation asks for.
    #[default]
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, certificate named by `x5t` (SHA-1
    /// thumbprint), for tenants that still expect the older form.
    RS256,
}

impl TryFrom<String> for AssertionAlgorithm {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        match value.as_str() {
            "PS256" => Ok(AssertionAlgorithm::PS256),
            "RS256" => Ok(AssertionAlgorithm::RS256),
            _ => Err(ValueError::Unknown {
                value,
                what: "an assertion algorithm",
                choices: r#""PS256" or "RS256""#,
            }),
        }
    }
}

/// Microsoft's identity platform.
pub const MICROSOFT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Google's token service.
pub const GOOGLE_AUTHORITY: &str = "https://oauth2.googleapis.com";
/// Where Google users sign in (the authorization endpoint lives on another host).
pub const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";

/// `[accounts.oauth]`: where and how tokens are obtained.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The grant: `client_credentials` (app-only, Microsoft), `refresh_token`
    /// (delegated: a user signs in once with `smtp-oauth-relay authorize`), or
    /// `service_account` (Google Workspace domain-wide delegation).
    pub flow: Flow,
    /// `microsoft` (default) or `google`.
    #[serde(default)]
    pub provider: Provider,
    /// Identity platform base URL. https only, except loopback (tests).
    /// Default `https://login.microsoftonline.com` (Google:
    /// `https://oauth2.googleapis.com`); sovereign clouds use their own
    /// (e.g. `https://login.microsoftonline.us`, `https://login.chinacloudapi.cn`).
    pub authority: Option<String>,
    /// Directory (tenant) id: a GUID or a verified domain (Microsoft only).
    pub tenant_id: Option<String>,
    /// Application (client) id of the app registration (Google: the OAuth client id).
    pub client_id: Option<String>,
    /// The client secret's *value* (not its id). Prefer `client_secret_file`.
    pub client_secret: Option<Secret>,
    /// A file holding the client secret value (surrounding white space is
    /// ignored). Read at each token request, so a rotated secret needs no restart.
    #[serde(default, deserialize_with = "credential_path")]
    pub client_secret_file: Option<PathBuf>,
    /// The certificate uploaded to the app registration (PEM), instead of a
    /// secret; goes with `client_private_key`.
    #[serde(default, deserialize_with = "credential_path")]
    pub client_certificate: Option<PathBuf>,
    /// The certificate's RSA private key (PEM, PKCS#8 or PKCS#1, unencrypted).
    #[serde(default, deserialize_with = "credential_path")]
    pub client_private_key: Option<PathBuf>,
    /// How the client assertion is signed: `PS256` (default, with `x5t#S256`)
    /// or `RS256` (with `x5t`).
    #[serde(default)]
    pub assertion_algorithm: AssertionAlgorithm,
    /// Google service account key (the JSON file downloaded from the Cloud
    /// console), for `flow = "service_account"`.
    #[serde(default, deserialize_with = "credential_path")]
    pub service_account_key_file: Option<PathBuf>,
    /// Scope requested. Default: `https://outlook.office365.com/.default`
    /// (client credentials), `https://outlook.office.com/SMTP.Send
    /// offline_access` (refresh token), `https://mail.google.com/` (Google);
    /// for `transport = "graph"`: `https://graph.microsoft.com/.default`
    /// (client credentials), `https://graph.microsoft.com/Mail.Send
    /// offline_access` (refresh token).
    pub scope: Option<String>,
    /// The token cache of a `refresh_token` account (written by `authorize`,
    /// rotated by the relay; mode 0600). Default: `tokens/NAME.json` in the
    /// directory that holds `queue.dir`.
    #[serde(default, deserialize_with = "opt_env_path")]
    pub token_cache: Option<PathBuf>,
    /// A file with a 32-byte key (base64 or hex) that encrypts the token
    /// cache at rest (ChaCha20-Poly1305), and the refresh token relays
    /// share through `queue.database_url` (give every relay the same key).
    /// Default: not encrypted.
    #[serde(default, deserialize_with = "credential_path")]
    pub token_cache_key_file: Option<PathBuf>,
    /// Renew a token this long before it expires (capped at a third of its
    /// lifetime for short-lived tokens). Default `10m`.
    #[serde(default = "default_refresh_before", with = "humantime_serde")]
    pub refresh_before: Duration,
}

impl OAuthConfig {
    /// The scope to request: the configured one, or the flow's default.
    pub fn scope(&self) -> &str {
        match (&self.scope, self.provider, self.flow) {
            (Some(scope), _, _) => scope,
            (None, Provider::Google, _) => "https://mail.google.com/",
            (None, Provider::Microsoft, Flow::RefreshToken) => {
                "https://outlook.office.com/SMTP.Send offline_access"
            }
            (None, Provider::Microsoft, _) => "https://outlook.office365.com/.default",
        }
    }

    /// The identity platform's base URL: the configured one or the provider's.
    pub fn authority(&self) -> &str {
        match (&self.authority, self.provider) {
            (Some(authority), _) => authority.trim_end_matches('/'),
            (None, Provider::Microsoft) => MICROSOFT_AUTHORITY,
            (None, Provider::Google) => GOOGLE_AUTHORITY,
        }
    }

    fn microsoft_endpoint(&self, name: &str) -> String {
        format!(
            "{}/{}/oauth2/v2.0/{name}",
            self.authority(),
            self.tenant_id.as_deref().unwrap_or_default()
        )
    }

    /// Microsoft: `{authority}/{tenant}/oauth2/v2.0/token`; Google: `{authority}/token`.
    pub fn token_url(&self) -> String {
        match self.provider {
            Provider::Microsoft => self.microsoft_endpoint("token"),
            Provider::Google => format!("{}/token", self.authority()),
        }
    }

    /// The device authorization endpoint (RFC 8628).
    pub fn device_code_url(&self) -> String {
        match self.provider {
            Provider::Microsoft => self.microsoft_endpoint("devicecode"),
            Provider::Google => format!("{}/device/code", self.authority()),
        }
    }

    /// Where a user signs in for the authorization code flow.
    pub fn authorize_url(&self) -> String {
        match (self.provider, &self.authority) {
            (Provider::Microsoft, _) => self.microsoft_endpoint("authorize"),
            (Provider::Google, None) => GOOGLE_AUTHORIZE_URL.to_owned(),
            (Provider::Google, Some(_)) => format!("{}/o/oauth2/v2/auth", self.authority()),
        }
    }

    /// Whether the account keeps a refresh token in a token cache.
    pub fn uses_token_cache(&self) -> bool {
        self.flow == Flow::RefreshToken
    }

    /// The token cache file: `token_cache`, or `tokens/{account}.json` in the
    /// directory that holds the queue directory (see [`crate::StateDir`]).
    pub fn token_cache_path(&self, account: &str, queue_dir: &std::path::Path) -> PathBuf {
        crate::StateDir::around(queue_dir).token_cache_of(account, self.token_cache.as_deref())
    }
}

fn default_refresh_before() -> Duration {
    Duration::from_secs(600)
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: default_bind(),
            hostname: default_hostname(),
            allowed_networks: default_allowed_networks(),
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            mode: Mode::default(),
            shutdown_timeout: default_shutdown_timeout(),
            tls_certificate: None,
            tls_private_key: None,
            implicit_tls_bind: Vec::new(),
            auth: ListenerAuth::default(),
            users: Vec::new(),
            max_connections: default_listener_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            command_timeout: default_command_timeout(),
            data_block_timeout: default_data_block_timeout(),
            data_timeout: default_data_timeout(),
            min_data_rate: default_min_data_rate(),
            greet_delay: default_greet_delay(),
        }
    }
}

fn default_listener_max_connections() -> usize {
    1000
}
fn default_max_connections_per_ip() -> usize {
    50
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_block_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_min_data_rate() -> u64 {
    1024
}
fn default_greet_delay() -> Duration {
    Duration::from_millis(200)
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: default_queue_dir(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
            max_age: default_max_age(),
            database_url: None,
            database_password_file: None,
            lease_timeout: default_lease_timeout(),
        }
    }
}

fn default_lease_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: default_upstream_host(),
            port: default_upstream_port(),
            security: default_security(),
            ca_file: None,
            max_connections: default_max_connections(),
            messages_per_minute: default_messages_per_minute(),
            recipients_per_day: default_recipients_per_day(),
            idle_timeout: default_idle_timeout(),
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
fn default_messages_per_minute() -> u32 {
    30
}
fn default_recipients_per_day() -> u32 {
    10_000
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9925))
}
fn default_senders() -> Vec<String> {
    vec!["*".into()]
}

/// Path keys may name environment variables as `${NAME}`, e.g.
/// `${CREDENTIALS_DIRECTORY}/client-secret` under systemd's `LoadCredential=`
/// or `${STATE_DIRECTORY}/queue`.
fn env_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    let text = String::deserialize(deserializer)?;
    expand_env(&text)
        .map(PathBuf::from)
        .map_err(serde::de::Error::custom)
}

fn opt_env_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    env_path(deserializer).map(Some)
}

/// A file holding a credential (client secret, private key, …), kept as
/// written: its `${NAME}`s are expanded only when the secrets are read
/// ([`crate::Secrets::Read`]), so verbs that never use them work where
/// `CREDENTIALS_DIRECTORY` is not set.
fn credential_path<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    String::deserialize(deserializer).map(|text| Some(PathBuf::from(text)))
}

pub(crate) fn expand_env(text: &str) -> Result<String, ValueError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ValueError::UnclosedVariable {
                text: text.to_owned(),
            })?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| ValueError::UnsetVariable {
            text: text.to_owned(),
            name: name.to_owned(),
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A list, or (as environment variables give them) one comma-separated string.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Item,
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
            T::parse(item.trim())
                .map_err(|why| serde::de::Error::custom(format!("`{}`: {why}", item.trim())))
        })
        .collect()
}

/// One address.
fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    SocketAddr::parse(text.trim())
        .map_err(|why| serde::de::Error::custom(format!("`{}`: {why}", text.trim())))
}

/// A list item, parsed with an error that says what to write instead.
trait Item: Sized {
    fn parse(text: &str) -> Result<Self, ValueError>;
}

impl Item for String {
    fn parse(text: &str) -> Result<Self, ValueError> {
        Ok(text.to_owned())
    }
}

impl Item for SocketAddr {
    fn parse(text: &str) -> Result<Self, ValueError> {
        if let Ok(addr) = text.parse() {
            return Ok(addr);
        }
        let bare = text.trim_start_matches('[').trim_end_matches(']');
        Err(match bare.parse() {
            Ok(ip) => ValueError::NoPort(ip),
            Err(_) => ValueError::NotSocketAddr,
        })
    }
}

impl Item for IpNet {
    fn parse(text: &str) -> Result<Self, ValueError> {
        if let Ok(net) = text.parse() {
            return Ok(net);
        }
        let Some((addr, prefix)) = text.split_once('/') else {
            return Err(match text.parse() {
                Ok(ip) => ValueError::HostNotNetwork(ip),
                Err(_) => ValueError::NotNetwork,
            });
        };
        Err(match addr.parse::<std::net::IpAddr>() {
            Ok(ip) => ValueError::PrefixLength {
                prefix: prefix.to_owned(),
                max: if ip.is_ipv4() { 32 } else { 128 },
            },
            Err(_) => ValueError::NotIpAddress(addr.to_owned()),
        })
    }
}

/// Shown as `[redacted]` when the configuration is printed.
fn redacted<S: serde::Serializer>(_: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("[redacted]")
}
