//! `check`: validate the configuration.

use anyhow::Context;
use std::path::Path;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    println!(
        "{}: valid ({} account(s); listening on {}; upstream {}:{})",
        path.display(),
        config.accounts.len(),
        config
            .listener
            .bind
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        config.upstream.host,
        config.upstream.port
    );
    Ok(())
}

/// Loads and validates the configuration, for every verb that needs it.
pub fn load(path: &Path) -> anyhow::Result<relay_config::Config> {
    relay_config::load_file(path).with_context(|| format!("configuration {}", path.display()))
}
