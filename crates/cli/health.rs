//! `health`: asks the running relay's `/readyz` and exits 0 when it is
//! ready, 1 when not (for container health checks and scripts).

use anyhow::{bail, Context};
use std::{net::SocketAddr, path::Path, time::Duration};

pub async fn health(config: &Path) -> anyhow::Result<()> {
    let config = crate::check::load(config)?;
    let url = format!("http://{}/readyz", reachable(config.admin.bind));
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

/// A wildcard bind address is reached on loopback.
fn reachable(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], bind.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bind.port())),
        _ => bind,
    }
}
