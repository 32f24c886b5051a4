//! A stored message read out of its rows, on either engine.

use sqlx::Row;

use super::time;
use crate::types::{Envelope, LeaseHolder, Message, MessageState, Progress, Recipient};
use crate::StoreError;

/// The [`Message`] (without recipients) in a row of `message_columns!`,
/// on either engine.
pub(super) fn message_of<'r, R>(row: &'r R) -> Result<Message, StoreError>
where
    R: Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let lease = match (
        row.try_get::<Option<String>, _>("lease_relay")?,
        row.try_get::<Option<i64>, _>("lease_expires")?,
    ) {
        (Some(relay), Some(expires)) => Some(LeaseHolder {
            relay,
            expires: time(expires),
        }),
        _ => None,
    };
    let state = MessageState::parse(&id, &row.try_get::<String, _>("state")?)?;
    Ok(Message {
        progress: Progress {
            state,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            next_attempt: row.try_get::<Option<i64>, _>("next_attempt")?.map(time),
            last_error: row.try_get("last_error")?,
            recipients: Vec::new(),
        },
        envelope: Envelope {
            account: row.try_get("account")?,
            sender: row.try_get("sender")?,
            client: row.try_get("client")?,
            received_at: time(row.try_get("received_at")?),
            passthrough: row.try_get("passthrough")?,
            id,
        },
        held: row.try_get("held")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
        lease,
    })
}

/// The recipients, in order, of the messages `$ids` (`Option<&[String]>`:
/// all with `None`), each with its message's id, ordered by that id.
macro_rules! recipients_of {
    ($conn:expr, $Db:ty, $ids:expr) => {{
        let ids: &[String] = $ids;
        let mut q = sqlx::QueryBuilder::<$Db>::new(
            "SELECT message_id, address, state, reply_code, reply_enhanced, reply_text, reason
             FROM recipients WHERE message_id",
        );
        push_in!(q, ids.iter().map(String::as_str));
        q.push(" ORDER BY message_id, position");
        q.build()
            .fetch_all($conn)
            .await?
            .iter()
            .map(|row| -> Result<(String, Recipient), StoreError> {
                let id: String = row.try_get("message_id")?;
                let state = RecipientState::parse(&id, &row.try_get::<String, _>("state")?)?;
                let reply = match row.try_get::<Option<String>, _>("reply_text")? {
                    Some(text) => Some(Reply {
                        code: u16::try_from(
                            row.try_get::<Option<i64>, _>("reply_code")?.unwrap_or(0),
                        )
                        .unwrap_or(0),
                        enhanced: row.try_get("reply_enhanced")?,
                        text,
                    }),
                    None => None,
                };
                let recipient = Recipient {
                    address: row.try_get("address")?,
                    state,
                    reply,
                    reason: row.try_get("reason")?,
                };
                Ok((id, recipient))
            })
            .collect::<Result<Vec<_>, StoreError>>()?
    }};
}
pub(super) use recipients_of;

/// Gives each message (ordered by id) its recipients (ordered by message
/// id, then position).
pub(super) fn attach(messages: &mut [Message], recipients: Vec<(String, Recipient)>) {
    let mut recipients = recipients.into_iter().peekable();
    for m in messages {
        while let Some((id, _)) = recipients.peek() {
            match id.as_str().cmp(m.envelope.id.as_str()) {
                std::cmp::Ordering::Less => {
                    recipients.next();
                }
                std::cmp::Ordering::Equal => {
                    if let Some((_, r)) = recipients.next() {
                        m.progress.recipients.push(r);
                    }
                }
                std::cmp::Ordering::Greater => break,
            }
        }
    }
}
