//! `check`: validate the configuration.

use anyhow::Context;
use relay_config::Secrets;
use std::path::Path;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = load_with_secrets(path)?;
    for warning in relay_config::warnings(&config) {
        eprintln!("warning: {warning}");
    }
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

/// Loads and validates the configuration without reading any credential,
/// for the verbs that never use one (queue, health, send-test…): an admin
/// runs them with read access to the config and the queue only.
pub fn load(path: &Path) -> anyhow::Result<relay_config::Config> {
    load_as(path, Secrets::Skip)
}

/// Loads and validates the configuration, credentials included, for the
/// verbs that use them (run, check, token, doctor, authorize).
pub fn load_with_secrets(path: &Path) -> anyhow::Result<relay_config::Config> {
    load_as(path, Secrets::Read)
}

fn load_as(path: &Path, secrets: Secrets) -> anyhow::Result<relay_config::Config> {
    relay_config::load_file_with(path, secrets)
        .with_context(|| format!("configuration {}", path.display()))
}
