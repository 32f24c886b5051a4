//! `config show`: the configuration in force once the file, the defaults
//! and the `SMTP_OAUTH_RELAY__…` environment overrides are merged, one
//! `key = value` a line (like `postconf`), secrets shown as `[redacted]`.
//! Credential paths are shown as written: no secret is read.

use clap::Subcommand;
use serde_json::Value;
use std::path::Path;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file, defaults and environment overrides), secrets masked.
    Show,
}

pub fn config(path: &Path, command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Show => {
            let config = crate::check::load(path)?;
            let mut lines = Vec::new();
            flatten("", &serde_json::to_value(&config)?, &mut lines);
            for line in lines {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `key = value` lines for every leaf of `value`; tables of tables (the
/// accounts) are numbered like the error messages name them (`accounts[0]`).
fn flatten(prefix: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, value, out);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        Value::Null => {}
        leaf => out.push(format!("{prefix} = {leaf}")),
    }
}
