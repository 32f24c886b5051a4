//! `check`: validate the configuration.

use anyhow::Context;
use relay_config::{Secrets, Transport};
use std::path::Path;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = load_with_secrets(path)?;
    for warning in relay_config::warnings(&config) {
        eprintln!("warning: {warning}");
    }
    let listening = config
        .listener
        .bind
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut summary = format!(
        "{} account(s); listening on {listening}",
        config.accounts.len()
    );
    // only the ways out some account uses
    let uses = |transport| config.accounts.iter().any(|a| a.transport == transport);
    if uses(Transport::Smtp) {
        let upstream = &config.upstream;
        summary.push_str(&format!("; upstream {}:{}", upstream.host, upstream.port));
    }
    if uses(Transport::Graph) {
        summary.push_str(&format!("; Microsoft Graph {}", config.graph.endpoint));
    }
    println!("{}: valid ({summary})", path.display());
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
