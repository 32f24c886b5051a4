//! Loopback ports that stay free between a test choosing one and a server
//! binding it.
//!
//! A port learnt by binding port 0 and closing the socket comes from the
//! kernel's ephemeral range, which the kernel goes on handing out to every
//! other `bind(0)` and outgoing connection on the machine: a relay started
//! (or restarted) on it a moment later can find it taken. Ports below that
//! range are only ever taken by someone asking for them by number.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the search starts: below the well-known services most machines run.
const LOWEST: u32 = 10_000;

/// The next candidate, counted from a per-process offset so that processes
/// running side by side do not walk the same ports.
static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);

/// A port on `127.0.0.1` that nothing listens on, outside the kernel's
/// ephemeral range, and not handed out before by this process.
pub fn reserved_port() -> io::Result<u16> {
    let (low, high) = candidates();
    let span = high - low;
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = low + CURSOR.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port).map_err(io::Error::other)?;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every loopback port outside the ephemeral range is in use",
    ))
}

/// The ports outside `net.ipv4.ip_local_port_range`: below it where there
/// is room, else above it.
fn candidates() -> (u32, u32) {
    let (first, last) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(str::parse::<u32>);
            Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999));
    if first >= LOWEST + 2_000 {
        (LOWEST, first)
    } else {
        (last.saturating_add(1).min(65_000), 65_536)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_not_repeated() {
        let (low, high) = candidates();
        let a = reserved_port().expect("a port");
        let b = reserved_port().expect("another port");
        assert_ne!(a, b);
        for port in [a, b] {
            assert!((low..high).contains(&u32::from(port)), "{port}");
        }
        let ephemeral = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 0")
            .port();
        assert!(!(low..high).contains(&u32::from(ephemeral)));
    }
}
