//! `health`: asks the running relay's `/readyz` and exits 0 when it is
//! ready, 1 when not (for container health checks and scripts).

use anyhow::{bail, Context};
use std::{path::Path, time::Duration};

pub async fn health(config: &Path) -> anyhow::Result<()> {
    let config = crate::check::load(config)?;
    let url = format!(
        "http://{}/readyz",
        crate::submit::reachable(config.admin.bind)
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("asking {url} (is the relay running?)"))?;
    let ready = response.status().is_success();
    print!("{}", response.text().await.unwrap_or_default());
    if !ready {
        bail!("the relay is not ready");
    }
    Ok(())
}
