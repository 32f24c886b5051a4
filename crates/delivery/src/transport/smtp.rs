//! SMTP submission with AUTH XOAUTH2 (Microsoft 365's `smtp.office365.com`).

use super::{Broken, Delivered, Message, SlowDown, Transport, Unopened};
pub use crate::session::Session;
use crate::{Account, Upstream};
use std::time::Duration;

impl Transport for Upstream {
    type Session = Session;

    fn relay(&self) -> &str {
        &self.address
    }

    fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    async fn open(&self, account: &Account) -> Result<Session, Unopened> {
        Session::open(self, &account.mailbox, &account.tokens)
            .await
            .map_err(Unopened::from)
    }

    async fn deliver(
        &self,
        session: &mut Session,
        message: Message<'_>,
    ) -> Result<Delivered, Broken> {
        match session
            .transaction(message.sender, message.recipients, message.body)
            .await
        {
            Ok(outcomes) => Ok(Delivered {
                slow_down: SlowDown::from_outcomes(&outcomes),
                outcomes,
            }),
            Err(broken) => Err(Broken {
                outcome: broken.outcome,
                retry_fresh: broken.before_data,
            }),
        }
    }

    fn reused(session: &Session) -> bool {
        session.transactions > 0
    }

    async fn close(&self, session: Session) {
        session.quit().await;
    }
}
