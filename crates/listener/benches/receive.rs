//! Micro-benchmarks of the listener's hot paths: the command parser a
//! session runs every pipelined command through, and the data receiver
//! (end-of-data detection, dot-unstuffing, CR/LF normalisation) in MB/s.
//!
//! `cargo bench -p relay-listener` (criterion; figures in BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay_listener::fuzzing::DataReceiver;
use smtp_proto::{request::receiver::RequestReceiver, Error as ParseError, Request};
use std::hint::black_box;
use std::time::Duration;

/// One pipelined transaction, as a client with PIPELINING sends it.
const TRANSACTION: &[u8] = b"EHLO app.example.com\r\n\
MAIL FROM:<noreply@contoso.com> SIZE=4096 BODY=8BITMIME\r\n\
RCPT TO:<alice@example.com>\r\n\
RCPT TO:<bob@example.org>\r\n\
RCPT TO:<carol@example.net>\r\n\
DATA\r\n\
RSET\r\n\
NOOP\r\n\
QUIT\r\n";
const COMMANDS: u64 = 9;

/// Parses `input` command by command the way the session does (each
/// request made owned), returning how many were parsed.
fn parse_all(input: &[u8]) -> u64 {
    let mut parser = RequestReceiver::default();
    let mut bytes = input.iter();
    let mut n = 0;
    loop {
        match parser.ingest(&mut bytes).map(Request::into_owned) {
            Ok(request) => {
                black_box(&request);
                n += 1;
            }
            Err(ParseError::NeedsMoreData { .. }) => return n,
            Err(e) => {
                black_box(&e);
                n += 1;
            }
        }
    }
}

fn session_parser(c: &mut Criterion) {
    assert_eq!(parse_all(TRANSACTION), COMMANDS);
    let mut group = c.benchmark_group("session_parser");
    group.throughput(Throughput::Elements(COMMANDS));
    group.bench_function("pipelined_transaction", |b| {
        b.iter(|| parse_all(black_box(TRANSACTION)))
    });
    // The same bytes arriving in two reads split mid-command.
    let (first, second) = TRANSACTION.split_at(TRANSACTION.len() / 2 + 3);
    group.bench_function("split_across_reads", |b| {
        b.iter(|| {
            let mut parser = RequestReceiver::default();
            let mut n = 0u64;
            for part in [first, second] {
                let mut bytes = part.iter();
                loop {
                    match parser.ingest(&mut bytes).map(Request::into_owned) {
                        Ok(request) => {
                            black_box(&request);
                            n += 1;
                        }
                        Err(ParseError::NeedsMoreData { .. }) => break,
                        Err(_) => n += 1,
                    }
                }
            }
            n
        })
    });
    group.finish();
}

/// A message as it arrives after `354`: 78-byte lines, ending in `.`.
fn plain_message(size: usize) -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod temp\r\n";
    let mut out = b"Subject: bench\r\nFrom: <a@contoso.com>\r\n\r\n".to_vec();
    while out.len() + line.len() <= size {
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The worst case for the state machine: every line dot-stuffed, and bare
/// LFs to normalise.
fn awkward_message(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 3);
    while out.len() < size {
        out.extend_from_slice(b"..a stuffed line\r\nbare lf\n");
    }
    out.extend_from_slice(b"\r\n.\r\n");
    out
}

/// Feeds `wire` in 64 KiB reads (the session's read buffer) until the end.
fn receive(wire: &[u8]) -> usize {
    let mut receiver = DataReceiver::new(64 << 20);
    for chunk in wire.chunks(64 * 1024) {
        let (_, done) = receiver.ingest(chunk);
        if done {
            return receiver.into_body().len();
        }
    }
    unreachable!("no end of data");
}

fn data_receiver(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_receiver");
    for (name, wire) in [
        ("4KB", plain_message(4 << 10)),
        ("1MB", plain_message(1 << 20)),
        ("1MB_stuffed_bare_lf", awkward_message(1 << 20)),
    ] {
        assert!(receive(&wire) > 0);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &wire, |b, wire| {
            b.iter(|| receive(black_box(wire)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = session_parser, data_receiver
}
criterion_main!(benches);
