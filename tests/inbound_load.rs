//! Load: 1,000 connections held open while 100 clients send at once,
//! through the relay binary. Every message is accepted exactly once and
//! delivered exactly once. (Memory is measured by a benchmark, not here.)
//! Needs about 1,200 open files in this process: `.ci/run` raises the limit.

mod common;
mod inbound_support;

use common::*;
use inbound_support::*;
use std::{collections::HashSet, time::Duration};

#[tokio::test]
async fn a_thousand_open_connections_and_a_hundred_senders() {
    let inbound = Inbound::start_with(
        "max_connections = 1200\nmax_connections_per_ip = 1200",
        "messages_per_minute = 60000\nmax_connections = 3",
    )
    .await;
    let port = inbound.port;
    // 1,000 idle sessions, each greeted
    // (in waves of 100, as a burst of 1,000 SYNs at once would overflow
    // the kernel's accept queue of a busy test machine)
    let mut idle = Vec::with_capacity(1000);
    for _ in 0..10 {
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..100 {
            connecting.spawn(async move { Client::connect(port).await });
        }
        while let Some(joined) = connecting.join_next().await {
            let (client, greeting) = joined.expect("connect task");
            assert!(greeting.starts_with("220 "), "{greeting}");
            idle.push(client);
        }
    }
    // 100 senders at once, while those stay open
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..100 {
        senders.spawn(async move {
            let subject = format!("load {i}");
            let reply = send_one(port, MAILBOX, &[RCPT], client_message(&subject).as_bytes()).await;
            (subject, reply)
        });
    }
    let mut ids = HashSet::new();
    let mut subjects = Vec::new();
    while let Some(joined) = senders.join_next().await {
        let (subject, reply) = joined.expect("sender task");
        let id = reply
            .strip_prefix("250 2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("{subject}: {reply}"))
            .to_owned();
        assert!(ids.insert(id), "{subject}: a queue id given twice");
        subjects.push(subject);
    }
    assert_eq!(ids.len(), 100);
    // the idle sessions are all still served
    for c in idle.iter_mut() {
        assert_eq!(c.send(b"NOOP\r\n").await, "250 2.0.0 Ok");
    }
    inbound.expect_delivered(&subjects).await;
    assert_eq!(inbound.world.upstream.messages().len(), 100);
    drop(idle);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
