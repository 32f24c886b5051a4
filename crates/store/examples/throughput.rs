//! Durable inserts per second at 1 and 32 concurrent writers, on SQLite in
//! a temporary directory and on a throwaway PostgreSQL server (when
//! installed). A measurement, not a test: it prints figures for
//! BENCHMARKS.md and asserts nothing.
//!
//! `cargo run --release -p relay-store --example throughput [SECONDS]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_store::{Envelope, Location, NewMessage, Progress, Secret, Store, StoreSettings};
use relay_testkit::Postgres;

const BODY: usize = 4096;

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("temporary directory");
    let postgres = Postgres::start();
    let mut engines = vec![(
        "SQLite (WAL, synchronous=FULL)",
        Location::Sqlite(dir.path().to_path_buf()),
    )];
    if let Some(pg) = &postgres {
        engines.push((
            "PostgreSQL (synchronous_commit=on)",
            Location::Postgres {
                url: pg.url().into(),
                password: Some(Secret::new(
                    std::fs::read_to_string(pg.password_file()).expect("password"),
                )),
            },
        ));
    }
    println!("| engine | writers | durable inserts/s | inserts per commit |");
    println!("|---|---:|---:|---:|");
    for (name, location) in engines {
        let store = Store::open(StoreSettings {
            location,
            relay: "bench".to_string(),
            max_connections: 8,
        })
        .await
        .expect("open the store");
        for writers in [1, 32] {
            let (rate, per_commit) = run(&store, writers, Duration::from_secs(seconds)).await;
            println!("| {name} | {writers} | {rate:.0} | {per_commit:.1} |");
        }
    }
}

/// Inserts from `writers` tasks for `length`; returns inserts per second
/// and inserts per commit.
async fn run(store: &Store, writers: u64, length: Duration) -> (f64, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let commits_before = store.group_commits();
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let body = vec![b'x'; BODY];
                let recipients = vec!["you@example.com".to_string()];
                while start.elapsed() < length {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let now = SystemTime::now();
                    store
                        .insert(NewMessage {
                            envelope: Envelope {
                                id: format!("{writers:02}{w:02}{n:012X}"),
                                account: "box@contoso.com".to_string(),
                                sender: "app@contoso.com".to_string(),
                                client: None,
                                received_at: now,
                                passthrough: false,
                            },
                            progress: Progress::new(&recipients, now),
                            held: false,
                            lease: None,
                            body: relay_store::Body::Bytes(body.clone()),
                        })
                        .await
                        .expect("insert");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let inserts = next.load(Ordering::Relaxed) as f64;
    let commits = (store.group_commits() - commits_before).max(1) as f64;
    (inserts / elapsed, inserts / commits)
}
