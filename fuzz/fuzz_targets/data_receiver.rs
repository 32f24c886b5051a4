//! The DATA receiver: whatever the bytes and however they are split across
//! reads, the result is the same, only `CRLF.CRLF` ends the message, and
//! the stored body holds no bare CR or LF (SMTP smuggling).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_listener::fuzzing::DataReceiver;

mod split;
use split::split;

fn only_crlf(body: &[u8]) -> bool {
    body.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => body.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && body[i - 1] == b'\r',
        _ => true,
    })
}

fuzz_target!(|data: &[u8]| {
    let (splits, wire) = split(data);
    // all at once
    let mut whole = DataReceiver::new(1 << 20);
    let (used, done) = whole.ingest(&wire);
    assert!(used <= wire.len());
    if done {
        // the end is exactly CRLF . CRLF on the wire (or `.` CRLF at the start)
        let end = &wire[..used];
        assert!(
            end.ends_with(b"\r\n.\r\n") || end == b".\r\n",
            "ended on {:?}",
            &end[end.len().saturating_sub(5)..]
        );
    } else {
        assert_eq!(used, wire.len());
    }
    // in pieces
    let mut pieces = DataReceiver::new(1 << 20);
    let mut at = 0;
    let mut piece_done = false;
    for &s in splits.iter().chain(std::iter::once(&u8::MAX)) {
        let len = (s as usize % 64 + 1).min(wire.len() - at);
        let (n, d) = pieces.ingest(&wire[at..at + len]);
        at += n;
        if d {
            piece_done = true;
            break;
        }
        if at == wire.len() {
            break;
        }
    }
    while !piece_done && at < wire.len() {
        let (n, d) = pieces.ingest(&wire[at..]);
        at += n;
        piece_done = d;
    }
    assert_eq!(piece_done, done);
    if done {
        assert_eq!(at, used);
    }
    assert_eq!(pieces.size(), whole.size());
    let body = whole.into_body();
    assert_eq!(pieces.into_body(), body);
    assert!(only_crlf(&body), "bare CR or LF stored");
});
