//! `rewrite_from`: make a message from a hard-coded sender acceptable to
//! Microsoft 365, which refuses a From the mailbox may not send as
//! (`554 5.2.252 SendAsDenied`). The `From:` header becomes the mailbox (its
//! display name kept) and the original address moves to `Reply-To:` unless
//! the message already has one, so replies still reach the application's
//! intended address.

/// The message with its `From:` rewritten to `mailbox`.
pub fn rewrite_from(message: &[u8], mailbox: &str) -> Vec<u8> {
    let header_end = header_end(message);
    let (head, rest) = message.split_at(header_end);
    let fields = split_fields(head);
    let original_from = fields
        .iter()
        .find(|f| field_name_is(f, "from"))
        .map(|f| unfold_value(f));
    let has_reply_to = fields.iter().any(|f| field_name_is(f, "reply-to"));

    let mut out = Vec::with_capacity(message.len() + mailbox.len() + 64);
    let mut wrote_from = false;
    for field in &fields {
        if field_name_is(field, "from") {
            if wrote_from {
                continue; // a second From would make the message invalid anyway
            }
            wrote_from = true;
            let value = original_from.as_deref().unwrap_or_default();
            out.extend_from_slice(format!("From: {}\r\n", with_address(value, mailbox)).as_bytes());
            if !has_reply_to && !value.trim().is_empty() {
                out.extend_from_slice(format!("Reply-To: {}\r\n", value.trim()).as_bytes());
            }
        } else {
            out.extend_from_slice(field);
        }
    }
    if !wrote_from {
        out.extend_from_slice(format!("From: {mailbox}\r\n").as_bytes());
    }
    out.extend_from_slice(rest);
    out
}

/// Where the header section ends: at the empty line's CRLF (kept in `rest`).
fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(message.len())
}

/// Header fields, each with its continuation lines and line ends.
fn split_fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let end = head[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| i + p + 2)
            .unwrap_or(head.len());
        let continues = matches!(head.get(end), Some(b' ' | b'\t'));
        if !continues {
            fields.push(&head[start..end]);
            start = end;
        }
        i = end;
    }
    fields
}

fn field_name_is(field: &[u8], name: &str) -> bool {
    field.iter().position(|&b| b == b':').is_some_and(|colon| {
        field[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
    })
}

fn unfold_value(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    String::from_utf8_lossy(&field[colon + 1..])
        .replace("\r\n", "")
        .trim()
        .to_owned()
}

/// `"Name" <old@x>` → `"Name" <mailbox>`; a bare address → the mailbox.
fn with_address(value: &str, mailbox: &str) -> String {
    match value.rfind('<') {
        Some(open) if !value[..open].trim().is_empty() => {
            format!("{} <{mailbox}>", value[..open].trim())
        }
        _ => mailbox.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_from;

    fn rewrite(message: &str) -> String {
        String::from_utf8(rewrite_from(message.as_bytes(), "relay@contoso.com")).expect("utf-8")
    }

    #[test]
    fn keeps_the_name_and_the_original_in_reply_to() {
        assert_eq!(
            rewrite("Subject: x\r\nFrom: \"Web Shop\"\r\n <noreply@shop.example>\r\nTo: a@b.c\r\n\r\nFrom: body line\r\n"),
            "Subject: x\r\nFrom: \"Web Shop\" <relay@contoso.com>\r\nReply-To: \"Web Shop\" <noreply@shop.example>\r\nTo: a@b.c\r\n\r\nFrom: body line\r\n"
        );
    }

    #[test]
    fn an_existing_reply_to_is_kept() {
        assert_eq!(
            rewrite("from: app@x.y\r\nReply-To: help@x.y\r\n\r\nhi\r\n"),
            "From: relay@contoso.com\r\nReply-To: help@x.y\r\n\r\nhi\r\n"
        );
    }

    #[test]
    fn a_message_without_from_gets_one() {
        assert_eq!(
            rewrite("Subject: s\r\n\r\nhi\r\n"),
            "Subject: s\r\nFrom: relay@contoso.com\r\n\r\nhi\r\n"
        );
    }
}
