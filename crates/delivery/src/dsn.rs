//! Delivery status notifications (RFC 3464) for `bounce = true` accounts:
//! when a message fails, its envelope sender learns which recipients failed
//! and why, in a `multipart/report` sent from the account's mailbox.

use relay_outcome::Reply;
use std::time::{SystemTime, UNIX_EPOCH};

/// A recipient the notification reports.
pub struct Failed<'a> {
    pub recipient: &'a str,
    pub reply: &'a Reply,
}

/// Whether a message may be answered with a notification: never a
/// notification itself or an automatic reply (RFC 3834), so two systems can
/// never bounce at each other.
pub fn may_bounce(sender: &str, message: &[u8]) -> bool {
    if sender.is_empty() {
        return false;
    }
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let head = String::from_utf8_lossy(&message[..end]).to_ascii_lowercase();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    !unfolded.lines().any(|line| {
        (line.starts_with("auto-submitted:")
            && !line["auto-submitted:".len()..].trim().starts_with("no"))
            || (line.starts_with("content-type:") && line.contains("multipart/report"))
    })
}

/// The notification for `original`, which failed for `failed`.
pub fn notification(
    mailbox: &str,
    reporting_host: &str,
    sender: &str,
    original: &[u8],
    failed: &[Failed<'_>],
    now: SystemTime,
) -> Vec<u8> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let boundary = format!("=_report_{secs:x}_{:x}", original.len());
    let date = rfc5322_date(secs);
    let end = original
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(original.len());
    let headers = &original[..end];
    let mut text = format!(
        "This is the mail relay at {reporting_host}.\r\n\r\nYour message could not be delivered to {} recipient(s):\r\n\r\n",
        failed.len()
    );
    let mut status = format!("Reporting-MTA: dns; {reporting_host}\r\n");
    for f in failed {
        text.push_str(&format!(
            "  <{}>: {}\r\n",
            f.recipient,
            one_line(&f.reply.text)
        ));
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            f.recipient,
            enhanced_status(f.reply),
            one_line(&f.reply.text)
        ));
    }
    let mut out = format!(
        "From: Mail Delivery System <{mailbox}>\r\nTo: <{sender}>\r\nSubject: Undelivered Mail Returned to Sender\r\nDate: {date}\r\nMessage-ID: <{secs:x}.{:x}.dsn@{reporting_host}>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n boundary=\"{boundary}\"\r\n\r\nThis is a MIME-encapsulated delivery status notification.\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status}\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n",
        original.len()
    )
    .into_bytes();
    out.extend_from_slice(headers);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn one_line(reply: &str) -> String {
    reply.replace(['\r', '\n'], " ")
}

/// The reply's enhanced status, or 5.0.0 when it has none.
fn enhanced_status(reply: &Reply) -> String {
    reply
        .enhanced
        .map_or_else(|| "5.0.0".into(), |e| e.to_string())
}

/// `Fri, 27 Nov 2026 10:00:00 +0000`.
fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // civil-from-days (Howard Hinnant), for the proleptic Gregorian calendar
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_format() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_773_600),
            "Fri, 27 Nov 2026 10:00:00 +0000"
        );
    }

    #[test]
    fn never_bounce_a_bounce() {
        assert!(may_bounce("a@b.c", b"Subject: x\r\n\r\nhi\r\n"));
        assert!(!may_bounce("", b"Subject: x\r\n\r\nhi\r\n"));
        assert!(!may_bounce(
            "a@b.c",
            b"Auto-Submitted: auto-replied\r\n\r\n"
        ));
        assert!(may_bounce("a@b.c", b"Auto-Submitted: no\r\n\r\n"));
        assert!(!may_bounce(
            "a@b.c",
            b"Content-Type: multipart/report;\r\n report-type=delivery-status\r\n\r\n"
        ));
    }

    #[test]
    fn report_names_each_failed_recipient() {
        let dsn = notification(
            "relay@contoso.com",
            "relay.test",
            "app@x.y",
            b"Subject: hello\r\nFrom: app@x.y\r\n\r\nbody\r\n",
            &[Failed {
                recipient: "bob@example.net",
                reply: &Reply::parse("550 5.1.1 User unknown").expect("reply"),
            }],
            UNIX_EPOCH + std::time::Duration::from_secs(1_795_773_600),
        );
        let text = String::from_utf8(dsn).expect("utf-8");
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\r\n"));
        assert!(text.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: app@x.y\r\n"
        ));
        assert!(!may_bounce("relay@contoso.com", text.as_bytes()));
        assert!(
            !text.contains("body\r\n"),
            "the original body is not returned"
        );
    }
}
