use crate::Config;
use config::{Environment, File, FileFormat};
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
    load(config::Config::builder().add_source(source))
}

/// Parses and validates TOML text (plus environment overrides): what
/// [`load_file`] does after reading the file. Used for built-in configurations.
pub fn load_str(toml: &str) -> Result<Config, ConfigError> {
    load(config::Config::builder().add_source(File::from_str(toml, FileFormat::Toml)))
}

fn load(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<Config, ConfigError> {
    let merged = builder
        .add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__"),
        )
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
