//! A delegated account's refresh token shared by the relays on one
//! database: one relay redeems it at a time, and the rotated token it
//! stores is what the next one redeems, so no rotated-away token is ever
//! presented (an identity platform that treats a reused refresh token as
//! stolen would revoke them all).
//!
//! The store holds the newest token; the account's token cache file stays
//! the relay's own copy, and the refresh grant itself is the source's
//! ([`TokenSource`]): under the store's redeem lock the store's token is
//! written into the file, the source redeems what the file holds (saving
//! the rotation there first, as without a database), and the file's token
//! is stored back. Which of the two is newer:
//!
//! * the store's, unless the store has none yet (the first relay seeds it
//!   from the file an `authorize` wrote);
//! * the file's, when it changed since this process last wrote or read it
//!   (an `authorize` on this host while the relay runs): a new sign-in
//!   replaces the shared token.
//!
//! With `oauth.token_cache_key_file` the token is stored sealed under that
//! key, bound to the account ([`TokenCache::seal_shared`]): every relay
//! sharing the account needs the same key.
//!
//! Cancel safety: dropped while redeeming, the lock expires after
//! [`REDEEM_TTL`], and the store keeps the token it had (a token the
//! platform rotated meanwhile is in this relay's file only).

use crate::{cache::TokenCache, source::Issued, TokenError, TokenSource};
use rand::Rng;
use relay_config::Secret;
use relay_store::{Redeem, SharedToken, Store};
use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

/// How long a relay may hold the redeem lock: above the token request's
/// own timeout (30 s), so a slow request does not lose it.
const REDEEM_TTL: Duration = Duration::from_secs(45);
/// How long a relay waits for another's redemption before giving up this
/// attempt (the manager's back-off decides the next).
const REDEEM_WAIT: Duration = Duration::from_secs(60);
/// How often a waiting relay asks again (less up to a half).
const REDEEM_POLL: Duration = Duration::from_millis(250);
/// Tries at storing the rotated token before leaving it to the file.
const PUBLISH_TRIES: u32 = 3;

/// The shared refresh token of one account.
pub(crate) struct SharedRefresh {
    store: Store,
    /// The cache file's bytes when this process last wrote or read them.
    synced: Mutex<Option<Vec<u8>>>,
}

impl SharedRefresh {
    pub(crate) fn new(store: Store) -> SharedRefresh {
        SharedRefresh {
            store,
            synced: Mutex::new(None),
        }
    }

    /// The refresh grant of `source`, one relay at a time. `allow_cached`
    /// as for [`TokenSource::fetch`].
    pub(crate) async fn fetch(
        &self,
        source: &TokenSource,
        client: &reqwest::Client,
        allow_cached: bool,
    ) -> Result<Issued, TokenError> {
        let Some(cache) = source.cache() else {
            return Err(TokenError::Config("oauth.token_cache is missing".into()));
        };
        let account = source.account();
        let shared = self.begin(account).await?;
        let token = match shared
            .token
            .map(|t| cache.open_shared(account, &t))
            .transpose()
        {
            Ok(token) => token,
            Err(e) => {
                self.finish(account, None).await;
                return Err(e);
            }
        };
        let result = match self.sync(source, cache, token.as_ref()) {
            Ok(()) => source.fetch(client, allow_cached).await,
            Err(e) => Err(e),
        };
        let newest = self.read_back(cache);
        let rotated = match (&result, newest) {
            (Ok(_), Some(newest)) if Some(&newest) != token.as_ref() => {
                match cache.seal_shared(account, &newest) {
                    Ok(sealed) => Some(sealed),
                    Err(e) => {
                        tracing::warn!(%account, error = %e, "other relays keep the previous refresh token");
                        None
                    }
                }
            }
            _ => None,
        };
        self.finish(account, rotated.as_ref()).await;
        result
    }

    /// Waits (bounded) for the redeem lock; another relay's redemption
    /// ends with its rotated token stored, which this one then gets.
    async fn begin(&self, account: &str) -> Result<SharedToken, TokenError> {
        let deadline = tokio::time::Instant::now() + REDEEM_WAIT;
        loop {
            let busy = match self
                .store
                .begin_redeem(account, SystemTime::now(), REDEEM_TTL)
                .await?
            {
                Redeem::Granted(shared) => return Ok(shared),
                Redeem::Busy { relay, .. } => relay,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(TokenError::Redeeming { relay: busy });
            }
            tracing::debug!(%account, relay = %busy, "another relay is redeeming the refresh token: waiting for its result");
            let pause = REDEEM_POLL.mul_f64(1.0 - rand::rng().random::<f64>() / 2.0);
            tokio::time::sleep(pause).await;
        }
    }

    /// Puts the store's token into the cache file, unless the file's is
    /// newer (see the module documentation).
    fn sync(
        &self,
        source: &TokenSource,
        cache: &TokenCache,
        shared: Option<&Secret>,
    ) -> Result<(), TokenError> {
        let raw = cache.read_raw()?;
        let mut synced = self.lock();
        let signed_in = synced.is_some() && *synced != raw;
        let Some(token) = shared.filter(|_| !signed_in) else {
            if signed_in {
                tracing::info!(account = %source.account(), "the token cache changed (a new sign-in): sharing its refresh token");
            }
            *synced = raw;
            return Ok(());
        };
        let entry = raw.as_deref().map(|bytes| cache.parse(bytes)).transpose()?;
        if entry
            .as_ref()
            .is_some_and(|e| e.refresh_token == token.expose())
        {
            *synced = raw;
            return Ok(());
        }
        let entry = match entry {
            // the access token stays: it is usable whichever refresh token came with it
            Some(mut entry) => {
                entry.refresh_token = token.expose().to_owned();
                entry
            }
            None => TokenCache::entry(
                source.account(),
                source.provider().name(),
                source.client_id(),
                source.scope(),
                token,
                None,
            ),
        };
        *synced = Some(cache.save(&entry)?);
        Ok(())
    }

    /// The cache file's refresh token after the grant, noting its bytes.
    fn read_back(&self, cache: &TokenCache) -> Option<Secret> {
        let raw = cache.read_raw().ok()?;
        let entry = raw.as_deref().and_then(|bytes| cache.parse(bytes).ok());
        *self.lock() = raw;
        entry.map(|e| e.refresh_token())
    }

    /// Stores the rotated token (if any) and frees the lock. Failing that,
    /// the lock expires and the store keeps the previous token.
    async fn finish(&self, account: &str, rotated: Option<&Secret>) {
        for tries in 1..=PUBLISH_TRIES {
            match self
                .store
                .finish_redeem(account, rotated, SystemTime::now())
                .await
            {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!(%account, "the refresh token's redeem lock expired before the rotated token was stored; other relays keep the previous one");
                    return;
                }
                Err(e) if tries == PUBLISH_TRIES => {
                    tracing::warn!(%account, error = %e, "cannot store the rotated refresh token; other relays keep the previous one");
                }
                Err(_) => tokio::time::sleep(REDEEM_POLL).await,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        self.synced.lock().unwrap_or_else(|p| p.into_inner())
    }
}
