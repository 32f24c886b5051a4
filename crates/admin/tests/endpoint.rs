//! The endpoint over a real socket.

use relay_admin::{install_recorder, Check, Endpoint, Readiness, Status};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use tokio_util::sync::CancellationToken;

struct Fake {
    queue_ok: AtomicBool,
}

impl Status for Fake {
    fn readiness(&self) -> Vec<Check> {
        vec![
            Check {
                name: "listening".into(),
                readiness: Readiness::Ready("127.0.0.1:2525".into()),
            },
            Check {
                name: "queue directory writable".into(),
                readiness: if self.queue_ok.load(Ordering::SeqCst) {
                    Readiness::Ready("/q".into())
                } else {
                    Readiness::NotReady("/q: permission denied".into())
                },
            },
        ]
    }
    fn refresh(&self) {
        metrics::gauge!("smtp_relay_test_gauge").set(7.0);
    }
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let metrics = install_recorder().expect("recorder");
    metrics::counter!("smtp_relay_test_total").increment(2);
    let endpoint = Endpoint::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let base = format!("http://{}", endpoint.local_addr().expect("addr"));
    let status = Arc::new(Fake {
        queue_ok: AtomicBool::new(false),
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(endpoint.serve(status.clone(), metrics, shutdown.clone()));
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("request");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok\n".into()));
    let (code, body) = get("/readyz").await;
    assert_eq!(code, 503);
    assert_eq!(body, "not ready\nok   listening: 127.0.0.1:2525\nFAIL queue directory writable: /q: permission denied\n");
    status.queue_ok.store(true, Ordering::SeqCst);
    assert_eq!(get("/readyz").await.0, 200);
    let (code, body) = get("/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("smtp_relay_test_total 2"), "{body}");
    assert!(body.contains("smtp_relay_test_gauge 7"), "{body}");
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("stops")
        .expect("no panic");
}
