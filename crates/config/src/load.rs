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

/// Reads, overrides from the environment, parses and validates the file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        });
    }
    let source = File::from(path).format(FileFormat::Toml).required(true);
    let builder = config::Config::builder().add_source(source);
    load(with_environment(builder, std::env::vars_os())?)
}

/// Parses and validates TOML text, without environment overrides: for
/// built-in configurations (the demo) and tests.
pub fn load_str(toml: &str) -> Result<Config, ConfigError> {
    load(config::Config::builder().add_source(File::from_str(toml, FileFormat::Toml)))
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
) -> Result<Config, ConfigError> {
    let merged = builder
        .build()
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // the config crate appends the key again; the path already says it
        let inner = match inner.rfind(" for key `") {
            Some(at) => inner[..at].to_owned(),
            None => inner,
        };
        ConfigError::Invalid(vec![if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }])
    })?;
    let problems = crate::validate::problems(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}
