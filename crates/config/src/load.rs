use crate::Config;
use config::{File, FileFormat};
use std::path::{Path, PathBuf};

/// Environment variables `SMTP_OAUTH_RELAY__SECTION__KEY` override file keys,
/// e.g. `SMTP_OAUTH_RELAY__UPSTREAM__PORT=2587`.
pub const ENV_PREFIX: &str = "SMTP_OAUTH_RELAY";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The file is not valid TOML.
    #[error("{0}")]
    Syntax(String),
    /// The content breaks the schema or the rules; one message per problem,
    /// each naming the key path.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Whether loading reads the credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Expand `${NAME}` in the credential files' paths and check each file
    /// can be read: for the verbs that use them (`run`, `check`, `token`,
    /// `doctor`, `authorize`).
    Read,
    /// Leave credential paths as written and never open them: for verbs
    /// that only work on the queue or ask the running relay, so an admin
    /// without access to the secret (or outside systemd, with no
    /// `CREDENTIALS_DIRECTORY`) can run them. The one exception is
    /// `queue.database_password_file`, whose path is expanded (not
    /// checked): a shared queue cannot be reached without it.
    Skip,
}

/// Reads, overrides from the environment, parses and validates the file at
/// `path`, credentials included.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    load_file_with(path, Secrets::Read)
}

/// [`load_file`], reading the credentials or not.
pub fn load_file_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        });
    }
    let source = File::from(path).format(FileFormat::Toml).required(true);
    let builder = config::Config::builder().add_source(source);
    load(with_environment(builder, std::env::vars_os())?, secrets)
}

/// Parses and validates TOML text, without environment overrides: for
/// built-in configurations (the demo) and tests.
pub fn load_str(toml: &str) -> Result<Config, ConfigError> {
    load(
        config::Config::builder().add_source(File::from_str(toml, FileFormat::Toml)),
        Secrets::Read,
    )
}

/// Every `SMTP_OAUTH_RELAY__A__B=value` becomes an override of key `a.b`. A
/// numeric segment is an array index, so a container can be configured from
/// the environment alone, accounts included:
/// `SMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__TENANT_ID=…` sets
/// `accounts[0].oauth.tenant_id`. (The config crate's own environment source
/// cannot address array elements.)
fn with_environment(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::Invalid(vec![format!("{name} is not valid UTF-8")]))?;
        let mut key = String::new();
        for segment in rest.split("__") {
            let segment = segment.to_ascii_lowercase();
            if segment.is_empty() {
                return Err(ConfigError::Invalid(vec![format!(
                    "{name}: empty key segment"
                )]));
            }
            if segment.bytes().all(|b| b.is_ascii_digit()) {
                key.push_str(&format!("[{segment}]"));
            } else {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(&segment);
            }
        }
        builder = builder
            .set_override(key.as_str(), value)
            .map_err(|e| ConfigError::Invalid(vec![format!("{name}: {e}")]))?;
    }
    Ok(builder)
}

fn load(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let merged = builder
        .build()
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let mut config: Config = match serde_path_to_error::deserialize(merged.clone()) {
        Ok(config) => config,
        Err(e) => {
            // Each section on its own, so one run names the first problem
            // of every section, not only of the first.
            let mut problems = section_problems(&merged);
            if problems.is_empty() {
                problems.push(describe("", e));
            }
            return Err(ConfigError::Invalid(problems));
        }
    };
    default_graph_scopes(&mut config);
    let mut problems = Vec::new();
    expand_credential_paths(&mut config, secrets, &mut problems);
    problems.extend(crate::validate::problems(&config, secrets));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// A graph account without an explicit `scope` asks for a Graph token: the
/// scope is decided here, once, so the token source, `authorize`, `token`
/// and `config show` all see the same one.
fn default_graph_scopes(config: &mut Config) {
    for account in &mut config.accounts {
        let oauth = &mut account.oauth;
        if account.transport != crate::Transport::Graph
            || oauth.scope.is_some()
            || oauth.provider != crate::Provider::Microsoft
        {
            continue;
        }
        let scope = match oauth.flow {
            crate::Flow::RefreshToken => crate::GRAPH_DELEGATED_SCOPE,
            _ => crate::GRAPH_APP_SCOPE,
        };
        oauth.scope = Some(scope.to_owned());
    }
}

/// The first schema problem of each top-level section.
fn section_problems(merged: &config::Config) -> Vec<String> {
    fn check<T: serde::de::DeserializeOwned>(
        merged: &config::Config,
        key: &str,
        out: &mut Vec<String>,
    ) {
        if let Ok(value) = merged.get::<config::Value>(key) {
            if let Err(e) = serde_path_to_error::deserialize::<_, T>(value) {
                out.push(describe(key, e));
            }
        }
    }
    let mut out = Vec::new();
    check::<crate::ListenerConfig>(merged, "listener", &mut out);
    check::<crate::QueueConfig>(merged, "queue", &mut out);
    check::<crate::UpstreamConfig>(merged, "upstream", &mut out);
    check::<crate::GraphConfig>(merged, "graph", &mut out);
    check::<crate::AdminConfig>(merged, "admin", &mut out);
    check::<crate::LogConfig>(merged, "log", &mut out);
    check::<Vec<crate::AccountConfig>>(merged, "accounts", &mut out);
    out
}

/// `section.path: reason` for a schema error found under `section`.
fn describe(section: &str, e: serde_path_to_error::Error<config::ConfigError>) -> String {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    // the config crate appends the key again; the path already says it
    let inner = match inner.rfind(" for key `") {
        Some(at) => inner[..at].to_owned(),
        None => inner,
    };
    let path = match (section, path.as_str()) {
        ("", ".") => return inner,
        ("", path) => path.to_owned(),
        (section, ".") => section.to_owned(),
        (section, path) if path.starts_with('[') => format!("{section}{path}"),
        (section, path) => format!("{section}.{path}"),
    };
    format!("{path}: {inner}")
}

/// Expands `${NAME}` in every credential file's path (kept as written by
/// the schema until the secrets are read). With [`Secrets::Skip`] only in
/// the database password's: the queue verbs need it to reach a shared
/// queue, and nothing else.
fn expand_credential_paths(config: &mut Config, secrets: Secrets, problems: &mut Vec<String>) {
    let mut paths = vec![(
        "queue.database_password_file".to_owned(),
        &mut config.queue.database_password_file,
    )];
    if secrets == Secrets::Skip {
        expand_paths(paths, problems);
        return;
    }
    let listener = &mut config.listener;
    paths.extend([
        (
            "listener.tls_certificate".to_owned(),
            &mut listener.tls_certificate,
        ),
        (
            "listener.tls_private_key".to_owned(),
            &mut listener.tls_private_key,
        ),
    ]);
    for (i, account) in config.accounts.iter_mut().enumerate() {
        let o = &mut account.oauth;
        let at = format!("accounts[{i}].oauth");
        paths.extend([
            (
                format!("{at}.client_secret_file"),
                &mut o.client_secret_file,
            ),
            (
                format!("{at}.client_certificate"),
                &mut o.client_certificate,
            ),
            (
                format!("{at}.client_private_key"),
                &mut o.client_private_key,
            ),
            (
                format!("{at}.service_account_key_file"),
                &mut o.service_account_key_file,
            ),
            (
                format!("{at}.token_cache_key_file"),
                &mut o.token_cache_key_file,
            ),
        ]);
    }
    expand_paths(paths, problems);
}

fn expand_paths(paths: Vec<(String, &mut Option<PathBuf>)>, problems: &mut Vec<String>) {
    for (key, path) in paths {
        let Some(written) = path.as_ref() else {
            continue;
        };
        match crate::schema::expand_env(&written.to_string_lossy()) {
            Ok(expanded) => *path = Some(PathBuf::from(expanded)),
            Err(why) => problems.push(format!("{key}: {why}")),
        }
    }
}
