//! The administrative HTTP endpoint on `[admin] bind`: liveness, readiness
//! and Prometheus metrics, for systemd, container health checks and
//! monitoring.
//!
//! - `GET /healthz`: 200 while the process serves requests at all.
//! - `GET /readyz`: 200 only when every readiness check passes; the body
//!   lists each check, so a failing one says what is wrong.
//! - `GET /metrics`: Prometheus text format.
//!
//! The other crates record metrics through the `metrics` facade (counters,
//! gauges, histograms named `smtp_relay_…`); [`install_recorder`] makes them
//! visible here. Values that are cheaper to read than to track (queue depth,
//! token expiry) are set by [`Status::refresh`] just before each scrape.

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::{net::SocketAddr, sync::Arc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin.bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// One readiness check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `queue directory writable`.
    pub name: String,
    /// Whether it passes, and what it found or why not.
    pub readiness: Readiness,
}

/// A readiness check's outcome, with the text `/readyz` shows for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The check passes: what was found, e.g. the queue directory.
    Ready(String),
    /// The check fails: why.
    NotReady(String),
}

/// What the endpoint asks the running relay.
pub trait Status: Send + Sync + 'static {
    /// Every readiness check, in a stable order.
    fn readiness(&self) -> Vec<Check>;
    /// Sets the gauges that are read rather than tracked.
    fn refresh(&self);
}

/// Installs the process-wide metrics recorder (once) and returns a handle
/// that renders it.
pub fn install_recorder() -> Result<PrometheusHandle, AdminError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        )
        .map_err(|e| AdminError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| AdminError::Recorder(e.to_string()))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

struct App {
    status: Arc<dyn Status>,
    metrics: PrometheusHandle,
}

/// A bound endpoint, ready to serve.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Endpoint, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Endpoint { listener })
    }

    /// The address bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`.
    pub async fn serve(
        self,
        status: Arc<dyn Status>,
        metrics: PrometheusHandle,
        shutdown: CancellationToken,
    ) {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(render))
            .with_state(Arc::new(App { status, metrics }));
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    }
}

async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let checks = app.status.readiness();
    let ready = checks
        .iter()
        .all(|c| matches!(c.readiness, Readiness::Ready(_)));
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for check in checks {
        match check.readiness {
            Readiness::Ready(detail) => body.push_str(&format!("ok   {}: {detail}\n", check.name)),
            Readiness::NotReady(why) => body.push_str(&format!("FAIL {}: {why}\n", check.name)),
        }
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn render(State(app): State<Arc<App>>) -> String {
    app.status.refresh();
    app.metrics.render()
}
