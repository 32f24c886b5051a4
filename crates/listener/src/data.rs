//! Receives the message after `354`, byte by byte across reads.
//!
//! The end of data is `CRLF . CRLF` on the wire and nothing else: the usual
//! smuggling variants (`LF . LF`, `LF . CRLF`, `CR . CR LF`, `CRLF . CR x`…)
//! are content. Bare CR and bare LF are normalised to CRLF, so what is stored
//! (and later sent upstream, dot-stuffed again) can never be read as an end of
//! data by the next server either. The message starts as if after a CRLF, so a
//! first line of `.` or `..x` is handled like any other.

/// Once a message has grown past its spill threshold, the receiver holds at
/// most this much (plus the 3 bytes one input byte can emit) before the
/// session must [`DataReceiver::take_spill`] it to disk.
const STAGING: usize = 64 * 1024;

/// Where the receiver is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After a real CRLF (or at the start): a dot here is special.
    LineStart,
    /// After a bare CR or LF (already normalised): a dot here is content.
    LooseLineStart,
    /// `.` at a line start.
    Dot,
    /// `.` CR at a line start: LF ends the message.
    DotCr,
    /// Inside a line.
    Text,
    /// CR inside a line: LF makes a CRLF.
    Cr,
}

/// The message being received. It stays synchronous (no I/O): past the
/// spill threshold the caller moves the bytes to disk in chunks, so memory
/// per message in progress stays bounded whatever its size.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    /// What is stored and not yet handed out by `take_spill`.
    body: Vec<u8>,
    limit: u64,
    size: u64,
    /// Past this size the message is spilled (`u64::MAX`: never).
    spill_after: u64,
}

impl DataReceiver {
    /// A receiver that keeps at most `limit` bytes (it keeps reading past
    /// them, to find the end, but stores nothing more), all in memory.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn new(limit: u64) -> Self {
        Self::spilling(limit, u64::MAX)
    }

    /// A receiver like [`DataReceiver::new`] that, once the message is
    /// larger than `spill_after`, stops taking input whenever it holds
    /// 64 KiB, until the caller takes them with
    /// [`DataReceiver::take_spill`].
    pub fn spilling(limit: u64, spill_after: u64) -> Self {
        DataReceiver {
            state: State::LineStart,
            body: Vec::new(),
            limit,
            size: 0,
            spill_after,
        }
    }

    /// Takes bytes from `input`; returns how many it consumed and whether the
    /// end of data was among them (the rest of `input` is the next command).
    /// When spilling it may stop early (having consumed less than all of
    /// `input`, maybe nothing) until [`DataReceiver::take_spill`] is called.
    pub fn ingest(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while let Some(&byte) = input.get(i) {
            if self.spill_ready() {
                return (i, false);
            }
            let run = match self.state {
                State::Text => self.plain_run(&input[i..]),
                _ => 0,
            };
            if run > 0 {
                self.emit(&input[i..i + run]);
                i += run;
            } else if self.step(byte) {
                return (i + 1, true);
            } else {
                i += 1;
            }
        }
        (input.len(), false)
    }

    fn spill_ready(&self) -> bool {
        self.size > self.spill_after && self.body.len() >= STAGING
    }

    /// How many bytes at the start of `rest` (inside a line) are stored as
    /// they come: up to the next CR or LF, which the state machine decides,
    /// and no further than a byte at a time would go before a spill.
    fn plain_run(&self, rest: &[u8]) -> usize {
        let line = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
        let until_size = self.spill_after.saturating_add(1).saturating_sub(self.size);
        let until_staging = STAGING.saturating_sub(self.body.len());
        let until_spill = usize::try_from(until_size)
            .unwrap_or(usize::MAX)
            .max(until_staging);
        line.min(until_spill)
    }

    /// The bytes stored so far, once the message is past its spill
    /// threshold and they fill the staging buffer; the caller appends them
    /// to the spooled body. What remains at the end is
    /// [`DataReceiver::into_body`], the message's tail.
    pub fn take_spill(&mut self) -> Option<Vec<u8>> {
        self.spill_ready()
            .then(|| std::mem::replace(&mut self.body, Vec::with_capacity(STAGING)))
    }

    /// The size of the message as stored (after un-stuffing and normalising).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the message grew past the limit.
    pub fn too_big(&self) -> bool {
        self.size > self.limit
    }

    /// The received message (after spills: the rest of it), ending in
    /// CRLF unless it is empty.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    fn step(&mut self, byte: u8) -> bool {
        use State::*;
        self.state = match (self.state, byte) {
            (LineStart, b'.') => Dot,
            (Dot, b'\r') => DotCr,
            (DotCr, b'\n') => return true,
            // `.` then a bare CR: a line holding a dot, then a normalised line end
            (DotCr, _) => {
                self.emit(b".\r\n");
                return self.continue_loose(byte);
            }
            // `.` ended by a bare LF: content
            (Dot, b'\n') => {
                self.emit(b".\r\n");
                LooseLineStart
            }
            // a stuffed dot: drop the first (RFC 5321 4.5.2)
            (Dot, other) => return self.text(other),
            (Cr, b'\n') => {
                self.emit(b"\r\n");
                LineStart
            }
            (Cr, b'\r') => {
                self.emit(b"\r\n");
                Cr
            }
            (Cr, other) => {
                self.emit(b"\r\n");
                return self.continue_loose(other);
            }
            (LineStart | LooseLineStart | Text, other) => return self.text(other),
        };
        false
    }

    /// `byte` starts a line after a normalised bare CR.
    fn continue_loose(&mut self, byte: u8) -> bool {
        self.state = State::LooseLineStart;
        self.text(byte)
    }

    fn text(&mut self, byte: u8) -> bool {
        self.state = match byte {
            b'\r' => State::Cr,
            b'\n' => {
                self.emit(b"\r\n");
                State::LooseLineStart
            }
            other => {
                self.emit(&[other]);
                State::Text
            }
        };
        false
    }

    fn emit(&mut self, bytes: &[u8]) {
        let room = usize::try_from(self.limit.saturating_sub(self.size)).unwrap_or(usize::MAX);
        self.body.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.size += bytes.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(wire: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut r = DataReceiver::new(1 << 20);
        let (used, done) = r.ingest(wire);
        done.then(|| (r.into_body(), used))
    }

    #[test]
    fn plain_message_and_leftover() {
        let (body, used) = receive(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n").expect("end");
        assert_eq!(body, b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(used, 21);
    }

    #[test]
    fn dot_unstuffing_including_first_line() {
        assert_eq!(receive(b"..x\r\n.\r\n").expect("end").0, b".x\r\n");
        assert_eq!(receive(b".\r\n").expect("end").0, b"");
        assert_eq!(
            receive(b"a\r\n..\r\n...b\r\n.\r\n").expect("end").0,
            b"a\r\n.\r\n..b\r\n"
        );
    }

    #[test]
    fn smuggling_variants_are_content() {
        for wire in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r\n\0.\r\nMAIL FROM:<x@y>\r\n",
        ] {
            assert!(receive(wire).is_none(), "{wire:?} ended the message");
            let mut full = wire.to_vec();
            full.extend_from_slice(b".\r\n");
            let (body, _) = receive(&full).expect("real end");
            // every line ends in CRLF; no bare CR or LF survives
            let text = String::from_utf8_lossy(&body);
            assert!(!text.replace("\r\n", "").contains(['\r', '\n']), "{text:?}");
        }
    }

    #[test]
    fn end_split_across_reads() {
        let mut r = DataReceiver::new(100);
        assert_eq!(r.ingest(b"x\r"), (2, false));
        assert_eq!(r.ingest(b"\n."), (2, false));
        assert_eq!(r.ingest(b"\r"), (1, false));
        assert_eq!(r.ingest(b"\nNOOP"), (1, true));
        assert_eq!(r.into_body(), b"x\r\n");
    }

    #[test]
    fn spilling_hands_out_bounded_chunks_of_the_same_bytes() {
        let mut wire = Vec::new();
        for i in 0..20_000 {
            wire.extend_from_slice(format!("line {i}\n..dot\r\n").as_bytes());
        }
        wire.extend_from_slice(b".\r\nQUIT\r\n");
        let mut whole = DataReceiver::new(1 << 30);
        let (used_whole, done) = whole.ingest(&wire);
        assert!(done);
        let expected = whole.into_body();

        let mut r = DataReceiver::spilling(1 << 30, 100_000);
        let (mut spilled, mut at, mut chunks) = (Vec::new(), 0, 0);
        loop {
            let (n, done) = r.ingest(&wire[at..at + 7000.min(wire.len() - at)]);
            at += n;
            assert!(r.body.len() <= 100_003, "held {}", r.body.len());
            if let Some(chunk) = r.take_spill() {
                chunks += 1;
                spilled.extend_from_slice(&chunk);
            }
            if done {
                break;
            }
        }
        assert_eq!(at, used_whole);
        assert!(chunks > 3);
        assert!(r.body.len() <= STAGING + 3);
        assert_eq!(r.size(), expected.len() as u64);
        spilled.extend_from_slice(&r.into_body());
        assert_eq!(spilled, expected);
    }

    #[test]
    fn runs_inside_lines_match_a_byte_at_a_time() {
        let mut long = b"Subject: x\r\n\r\n".to_vec();
        for i in 0..3000 {
            long.extend_from_slice(format!("{i} plain text\r\n.dot\rbare\nlf..\r\n").as_bytes());
        }
        long.extend_from_slice(b".\r\nQUIT\r\n");
        let wires: [&[u8]; 5] = [
            b"Subject: x\r\n\r\nhello world\r\n.\r\nNOOP\r\n",
            b"a\r\n..b\r\nc\rd\ne\r\r\n.x\r\n.\r\n",
            b"no end here\r\n.\n.\r.\r\n",
            b"x\r\n.\r\n",
            &long,
        ];
        for wire in wires {
            for (limit, spill_after) in [(1 << 30, u64::MAX), (1 << 30, 5_000), (40, u64::MAX)] {
                let mut whole = DataReceiver::spilling(limit, spill_after);
                let mut bytewise = DataReceiver::spilling(limit, spill_after);
                let (mut at_whole, mut at_byte) = (0, 0);
                let (mut out_whole, mut out_byte) = (Vec::new(), Vec::new());
                let end_whole = loop {
                    let (n, done) = whole.ingest(&wire[at_whole..]);
                    at_whole += n;
                    assert!(spill_after == u64::MAX || whole.body.len() <= STAGING + 3);
                    out_whole.extend(whole.take_spill().unwrap_or_default());
                    if done || at_whole == wire.len() {
                        break done;
                    }
                };
                let end_byte = loop {
                    let (n, done) = bytewise.ingest(&wire[at_byte..(at_byte + 1).min(wire.len())]);
                    at_byte += n;
                    out_byte.extend(bytewise.take_spill().unwrap_or_default());
                    if done || at_byte == wire.len() {
                        break done;
                    }
                };
                assert_eq!((end_whole, at_whole), (end_byte, at_byte));
                assert_eq!(whole.size(), bytewise.size());
                out_whole.extend(whole.into_body());
                out_byte.extend(bytewise.into_body());
                assert_eq!(out_whole, out_byte);
                assert!(out_whole.len() as u64 <= limit);
            }
        }
    }

    #[test]
    fn size_limit_keeps_reading() {
        let mut r = DataReceiver::new(4);
        let (_, done) = r.ingest(b"123456789\r\n.\r\n");
        assert!(done && r.too_big());
        assert_eq!(r.size(), 11);
    }
}
