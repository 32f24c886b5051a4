//! Checks on command lines that smtp-proto's parser does not make (or makes
//! loosely): line length, control characters, the address rules of RFC 5321
//! 4.5.3.1, source routes and `%` hacks, and a `SIZE=` too large to count.

/// The longest command line, CRLF included (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// The longest local part (RFC 5321 4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// The longest domain (RFC 5321 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;

/// The line without its end (`CRLF`, or a bare `LF` from a sloppy client).
pub fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Whether a command line (without its end) holds a CR or a NUL: both are
/// refused rather than silently dropped, as smtp-proto would drop a CR
/// inside an address.
pub fn has_control(content: &[u8]) -> bool {
    content.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
}

/// The raw text between `<` and its `>` in a `MAIL FROM:` / `RCPT TO:`
/// line, as the client wrote it (quotes and source routes included).
pub fn raw_path(content: &[u8]) -> Option<&[u8]> {
    let colon = content.iter().position(|&b| b == b':')?;
    let rest = &content[colon + 1..];
    let open = rest.iter().position(|&b| b != b' ')?;
    let rest = rest[open..].strip_prefix(b"<")?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in rest.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// The parameters after the path of a `MAIL FROM:` line.
fn parameters(content: &[u8]) -> &[u8] {
    match raw_path(content) {
        Some(path) => {
            // the path is a sub-slice of content: skip past its `>`
            let start = path.as_ptr() as usize - content.as_ptr() as usize + path.len() + 1;
            content.get(start..).unwrap_or_default()
        }
        None => &[],
    }
}

/// What `SIZE=` says, counted without overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclaredSize {
    None,
    Bytes(u64),
    /// More than fits in 64 bits: certainly too big.
    Huge,
}

/// The `SIZE=` parameter of a `MAIL FROM:` line, read from the raw line:
/// smtp-proto 0.2 saturates and then wraps a long number, so
/// `SIZE=99999999999999999999999` would pass as a small one.
pub fn declared_size(content: &[u8]) -> DeclaredSize {
    for param in parameters(content).split(|&b| b == b' ') {
        if param.len() >= 5 && param[..5].eq_ignore_ascii_case(b"SIZE=") {
            let digits = &param[5..];
            let mut value: u64 = 0;
            for &d in digits {
                if !d.is_ascii_digit() {
                    return DeclaredSize::None; // the parser refuses it
                }
                value = match value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(d - b'0')))
                {
                    Some(v) => v,
                    None => return DeclaredSize::Huge,
                };
            }
            return DeclaredSize::Bytes(value);
        }
    }
    DeclaredSize::None
}

/// Why the raw path of a command is refused, if it is.
pub fn check_raw_path(raw: &[u8]) -> Result<(), &'static str> {
    if raw.first() == Some(&b'@') {
        return Err("source routes are not accepted");
    }
    if raw.contains(&b'"') || raw.contains(&b'\\') {
        return Err("quoted local parts are not accepted");
    }
    Ok(())
}

/// Why `address` (`local@domain`, as parsed) is refused, if it is.
pub fn check_address(address: &str) -> Result<(), &'static str> {
    if address.is_empty() {
        return Err("the address is empty");
    }
    if address.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("control characters are not allowed");
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err("no domain");
    };
    if local.is_empty() {
        return Err("the local part is empty");
    }
    if local.len() > MAX_LOCAL_PART {
        return Err("the local part is longer than 64 octets");
    }
    if local.contains('@') {
        return Err("more than one @");
    }
    if local.contains('%') {
        return Err("%-hack routing is not accepted");
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err("misplaced dot in the local part");
    }
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii();
    if !local.chars().all(atext) {
        return Err("invalid character in the local part");
    }
    check_domain(domain)
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("the domain is empty");
    }
    if domain.len() > MAX_DOMAIN {
        return Err("the domain is longer than 255 octets");
    }
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(literal) = literal.strip_suffix(']') else {
            return Err("unclosed address literal");
        };
        let valid = match literal.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => literal.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return if valid {
            Ok(())
        } else {
            Err("invalid address literal")
        };
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("empty label in the domain");
        }
        if label.len() > 63 {
            return Err("a domain label is longer than 63 octets");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a domain label starts or ends with a hyphen");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
        {
            return Err("invalid character in the domain");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "a@b.c",
            "first.last+tag@sub.example.com",
            "grüße@exämple.com",
            "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]",
            "o'brien@example.com",
            &format!("{}@example.com", "l".repeat(64)),
            &format!("a@{}.com", vec!["d".repeat(63); 3].join(".")),
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("a", "no domain"),
            ("a@", "the domain is empty"),
            ("@b.c", "the local part is empty"),
            ("user%host@relay.example", "%-hack routing is not accepted"),
            ("a\0b@c.d", "control characters are not allowed"),
            ("a\rb@c.d", "control characters are not allowed"),
            ("a b@c.d", "invalid character in the local part"),
            (".a@c.d", "misplaced dot in the local part"),
            ("a@c..d", "empty label in the domain"),
            ("a@-c.d", "a domain label starts or ends with a hyphen"),
            ("a@[999.1.1.1]", "invalid address literal"),
            ("a@c d", "invalid character in the domain"),
        ] {
            assert_eq!(check_address(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            check_address(&format!("{}@example.com", "l".repeat(65))),
            Err("the local part is longer than 64 octets")
        );
        let long_domain = format!("{}.com", vec!["d".repeat(60); 5].join("."));
        assert_eq!(
            check_address(&format!("a@{long_domain}")),
            Err("the domain is longer than 255 octets")
        );
    }

    #[test]
    fn raw_paths() {
        assert_eq!(raw_path(b"MAIL FROM:<a@b>"), Some(&b"a@b"[..]));
        assert_eq!(
            raw_path(b"RCPT TO: <@x,@y:a@b> X=1"),
            Some(&b"@x,@y:a@b"[..])
        );
        assert_eq!(raw_path(b"RCPT TO:<\"a>b\"@c>"), Some(&b"\"a>b\"@c"[..]));
        assert_eq!(raw_path(b"RCPT TO:a@b"), None);
        assert!(check_raw_path(b"@x,@y:a@b").is_err());
        assert!(check_raw_path(b"\"a b\"@c").is_err());
        assert!(check_raw_path(b"a@b").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(declared_size(b"MAIL FROM:<a@b>"), DeclaredSize::None);
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> BODY=8BITMIME size=123"),
            DeclaredSize::Bytes(123)
        );
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> SIZE=18446744073709551615"),
            DeclaredSize::Bytes(u64::MAX)
        );
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> SIZE=18446744073709551616"),
            DeclaredSize::Huge
        );
        assert_eq!(
            declared_size(b"MAIL FROM:<a@b> SIZE=99999999999999999999999"),
            DeclaredSize::Huge
        );
        // a `SIZE=` inside the address is not the parameter
        assert_eq!(declared_size(b"MAIL FROM:<SIZE=1@b>"), DeclaredSize::None);
    }

    #[test]
    fn line_ends_and_controls() {
        assert_eq!(strip_line_end(b"NOOP\r\n"), b"NOOP");
        assert_eq!(strip_line_end(b"NOOP\n"), b"NOOP");
        assert!(has_control(b"MAIL FROM:<a\rb@c>"));
        assert!(has_control(b"NO\0OP"));
        assert!(!has_control(b"NOOP"));
    }
}
