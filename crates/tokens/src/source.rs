//! Where tokens come from: one grant against the identity platform, and for
//! delegated accounts the token cache that carries the refresh token.

use crate::{
    assertion::{self, Certificate, ASSERTION_TYPE, JWT_BEARER},
    cache::{CacheEntry, TokenCache},
    http::{self, TokenReply},
    lifetime::Lifetime,
    TokenError,
};
use relay_config::{AccountConfig, Flow, OAuthConfig, Provider, Secret};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

/// A cached access token is reused at start only with this much life left.
const CACHED_TOKEN_MIN: u64 = 120;

/// A token just issued.
pub(crate) struct Issued {
    pub access_token: Secret,
    pub lifetime: Lifetime,
}

/// How the client authenticates itself to the identity platform.
#[derive(Debug, Clone)]
enum ClientCredential {
    /// A public client (delegated flows only).
    None,
    Secret(Secret),
    SecretFile(PathBuf),
    Certificate(Certificate),
    /// A Google service account key file.
    ServiceAccount(PathBuf),
}

/// What the source knows about its token cache beyond the file.
#[derive(Default)]
struct CacheState {
    /// The file's bytes when last read or written by this process.
    seen: Option<Vec<u8>>,
    /// The newest entry: the file's, or a rotated one not yet saved.
    entry: Option<CacheEntry>,
    /// The refresh token in the file with these bytes is dead (and why):
    /// no request is made until the file changes.
    dead: Option<(Option<Vec<u8>>, String)>,
}

/// The grant an account uses to obtain tokens, built from its `[accounts.oauth]`.
#[derive(Clone)]
pub struct TokenSource {
    account: String,
    mailbox: String,
    flow: Flow,
    provider: Provider,
    token_url: String,
    device_code_url: String,
    authorize_url: String,
    client_id: String,
    credential: ClientCredential,
    scope: String,
    cache: Option<TokenCache>,
    refresh_before: Duration,
    state: Arc<Mutex<CacheState>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("account", &self.account)
            .field("flow", &self.flow)
            .field("provider", &self.provider)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
            .field("scope", &self.scope)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// The source for a validated account configuration. Delegated accounts
    /// need `token_cache` set; [`TokenSource::for_account`] also knows the
    /// default location.
    pub fn from_config(oauth: &OAuthConfig) -> Result<Self, TokenError> {
        let cache = match (&oauth.token_cache, oauth.uses_token_cache()) {
            (Some(path), true) => Some(path.clone()),
            (None, true) => {
                return Err(TokenError::Config(
                    "oauth.token_cache is missing (a refresh_token account keeps its refresh token there)".into(),
                ))
            }
            (_, false) => None,
        };
        Self::build("main", "", oauth, cache)
    }

    /// The source of `account`; its token cache (if the flow keeps one)
    /// defaults to `tokens/NAME.json` beside `queue_dir`.
    pub fn for_account(account: &AccountConfig, queue_dir: &Path) -> Result<Self, TokenError> {
        let oauth = &account.oauth;
        let cache = oauth
            .uses_token_cache()
            .then(|| oauth.token_cache_path(&account.name, queue_dir));
        Self::build(&account.name, &account.mailbox, oauth, cache)
    }

    fn build(
        account: &str,
        mailbox: &str,
        oauth: &OAuthConfig,
        cache: Option<PathBuf>,
    ) -> Result<Self, TokenError> {
        let missing = |key: &str| TokenError::Config(format!("oauth.{key} is missing"));
        let credential = match (
            &oauth.client_secret,
            &oauth.client_secret_file,
            &oauth.client_certificate,
            &oauth.client_private_key,
            &oauth.service_account_key_file,
        ) {
            _ if oauth.flow == Flow::ServiceAccount => ClientCredential::ServiceAccount(
                oauth
                    .service_account_key_file
                    .clone()
                    .ok_or_else(|| missing("service_account_key_file"))?,
            ),
            (Some(secret), _, _, _, _) => ClientCredential::Secret(secret.clone()),
            (None, Some(path), _, _, _) => ClientCredential::SecretFile(path.clone()),
            (None, None, Some(cert), Some(key), _) => ClientCredential::Certificate(Certificate {
                cert: cert.clone(),
                key: key.clone(),
                algorithm: oauth.assertion_algorithm,
            }),
            _ if oauth.flow == Flow::RefreshToken => ClientCredential::None,
            _ => return Err(missing("client_secret_file")),
        };
        let client_id = match oauth.flow {
            Flow::ServiceAccount => oauth.client_id.clone().unwrap_or_default(),
            _ => oauth
                .client_id
                .clone()
                .ok_or_else(|| missing("client_id"))?,
        };
        let cache = match cache {
            Some(path) => Some(TokenCache::new(
                path,
                oauth.token_cache_key_file.as_deref(),
            )?),
            None => None,
        };
        Ok(TokenSource {
            account: account.to_owned(),
            mailbox: mailbox.to_owned(),
            flow: oauth.flow,
            provider: oauth.provider,
            token_url: oauth.token_url(),
            device_code_url: oauth.device_code_url(),
            authorize_url: oauth.authorize_url(),
            client_id,
            credential,
            scope: oauth.scope().to_owned(),
            cache,
            refresh_before: oauth.refresh_before,
            state: Arc::default(),
        })
    }

    /// The token endpoint this source talks to.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// The grant.
    pub fn flow(&self) -> Flow {
        self.flow
    }

    /// Microsoft or Google.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The account's name.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The scope requested.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The token cache, for flows that keep one.
    pub fn cache(&self) -> Option<&TokenCache> {
        self.cache.as_ref()
    }

    /// How long before expiry a token is renewed (at most; a third of the
    /// lifetime for short-lived tokens).
    pub fn refresh_before(&self) -> Duration {
        self.refresh_before
    }

    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    pub(crate) fn device_code_url(&self) -> &str {
        &self.device_code_url
    }

    pub(crate) fn authorize_url(&self) -> &str {
        &self.authorize_url
    }

    fn secret(&self, path: &Path) -> Result<Secret, TokenError> {
        // Read at each request so a rotated secret file needs no restart.
        std::fs::read_to_string(path)
            .map(|text| Secret::new(text.trim()))
            .map_err(|e| TokenError::SecretFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// The form fields that authenticate the client (none for a public
    /// client): a secret, or a freshly signed client assertion.
    pub(crate) fn client_auth(&self) -> Result<Vec<(&'static str, String)>, TokenError> {
        Ok(match &self.credential {
            ClientCredential::None | ClientCredential::ServiceAccount(_) => Vec::new(),
            ClientCredential::Secret(secret) => {
                vec![("client_secret", secret.expose().to_owned())]
            }
            ClientCredential::SecretFile(path) => {
                vec![("client_secret", self.secret(path)?.expose().to_owned())]
            }
            ClientCredential::Certificate(cert) => vec![
                ("client_assertion_type", ASSERTION_TYPE.to_owned()),
                (
                    "client_assertion",
                    cert.assertion(&self.client_id, &self.token_url)?,
                ),
            ],
        })
    }

    /// A token request with the client's credentials added.
    pub(crate) async fn request(
        &self,
        client: &reqwest::Client,
        fields: &[(&str, &str)],
    ) -> Result<TokenReply, TokenError> {
        let auth = self.client_auth()?;
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        if !matches!(self.credential, ClientCredential::ServiceAccount(_)) {
            form.push(("client_id", &self.client_id));
        }
        form.extend(auth.iter().map(|(k, v)| (*k, v.as_str())));
        http::token_request(client, &self.token_url, &form).await
    }

    /// Performs the grant once. `allow_cached`: a delegated account may hand
    /// out the access token saved in its cache if it has life left (at start).
    pub(crate) async fn fetch(
        &self,
        client: &reqwest::Client,
        allow_cached: bool,
    ) -> Result<Issued, TokenError> {
        let reply = match self.flow {
            Flow::ClientCredentials => {
                self.request(
                    client,
                    &[("grant_type", "client_credentials"), ("scope", &self.scope)],
                )
                .await?
            }
            Flow::ServiceAccount => {
                let ClientCredential::ServiceAccount(key) = &self.credential else {
                    return Err(TokenError::Config(
                        "oauth.service_account_key_file is missing".into(),
                    ));
                };
                let jwt = assertion::service_account_assertion(
                    key,
                    &self.mailbox,
                    &self.scope,
                    &self.token_url,
                )?;
                self.request(client, &[("grant_type", JWT_BEARER), ("assertion", &jwt)])
                    .await?
            }
            Flow::RefreshToken => return self.refresh(client, allow_cached).await,
        };
        Ok(Issued {
            access_token: reply.access_token,
            lifetime: reply.lifetime,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn needs_authorization(&self, reason: impl Into<String>) -> TokenError {
        TokenError::NeedsAuthorization {
            account: self.account.clone(),
            reason: reason.into(),
        }
    }

    /// The newest cache entry: the file's, unless this process holds a newer
    /// one it could not save yet and nobody changed the file since.
    fn current_entry(
        &self,
        cache: &TokenCache,
    ) -> Result<(Option<Vec<u8>>, CacheEntry), TokenError> {
        let raw = cache.read_raw()?;
        let mut state = self.lock();
        if let Some((dead, reason)) = &state.dead {
            if *dead == raw {
                return Err(self.needs_authorization(reason.clone()));
            }
            state.dead = None;
        }
        if state.seen == raw {
            if let Some(entry) = &state.entry {
                return Ok((raw, entry.clone()));
            }
        }
        let Some(bytes) = &raw else {
            let reason = format!(
                "no token cache at {} (nobody has signed in for this account yet)",
                cache.path().display()
            );
            state.dead = Some((None, reason.clone()));
            return Err(self.needs_authorization(reason));
        };
        let entry = cache.parse(bytes)?;
        if entry.client_id != self.client_id {
            let reason = format!(
                "the token cache {} was made for client_id {}, not {}",
                cache.path().display(),
                entry.client_id,
                self.client_id
            );
            state.dead = Some((raw.clone(), reason.clone()));
            return Err(self.needs_authorization(reason));
        }
        state.seen = raw.clone();
        state.entry = Some(entry.clone());
        Ok((raw, entry))
    }

    /// The refresh token grant. The rotated refresh token is saved before
    /// the access token is handed out: if saving fails, the token is not
    /// used (the new refresh token stays in memory for the next attempt).
    async fn refresh(
        &self,
        client: &reqwest::Client,
        allow_cached: bool,
    ) -> Result<Issued, TokenError> {
        let Some(cache) = &self.cache else {
            return Err(TokenError::Config("oauth.token_cache is missing".into()));
        };
        let (raw, entry) = self.current_entry(cache)?;
        if allow_cached {
            if let (Some(token), Some(expires_at)) =
                (&entry.access_token, entry.access_token_expires_at)
            {
                let now = assertion::unix_now();
                if expires_at > now.saturating_add(CACHED_TOKEN_MIN) {
                    tracing::debug!(account = %self.account, "using the access token from the token cache");
                    return Ok(Issued {
                        access_token: Secret::new(token.clone()),
                        lifetime: Lifetime::from_secs(expires_at - now),
                    });
                }
            }
        }
        let refresh_token = entry.refresh_token();
        let result = self
            .request(
                client,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose()),
                    ("scope", &self.scope),
                ],
            )
            .await;
        let reply = match result {
            Ok(reply) => reply,
            Err(e) if is_dead_grant(&e) => {
                let reason = format!("the refresh token no longer works ({e})");
                self.lock().dead = Some((raw, reason.clone()));
                return Err(self.needs_authorization(reason));
            }
            Err(e) => return Err(e),
        };
        let rotated = reply.refresh_token.is_some();
        let new_entry = TokenCache::entry(
            &self.account,
            self.provider.name(),
            &self.client_id,
            &entry.scope,
            reply.refresh_token.as_ref().unwrap_or(&refresh_token),
            Some((&reply.access_token, reply.lifetime.secs())),
        );
        {
            let mut state = self.lock();
            state.entry = Some(new_entry.clone());
            // `seen` stays the file's old bytes until the save succeeds.
        }
        let saved = cache.save(&new_entry)?;
        self.lock().seen = Some(saved);
        tracing::info!(account = %self.account, rotated, "token cache updated");
        Ok(Issued {
            access_token: reply.access_token,
            lifetime: reply.lifetime,
        })
    }

    /// Saves what an interactive sign-in returned as the account's cache.
    pub(crate) fn save_sign_in(&self, reply: &TokenReply) -> Result<CacheEntry, TokenError> {
        let Some(cache) = &self.cache else {
            return Err(TokenError::Config(format!(
                "account {:?} does not keep a token cache: `authorize` is for flow = \"refresh_token\"",
                self.account
            )));
        };
        let Some(refresh_token) = &reply.refresh_token else {
            return Err(TokenError::Authorization(
                "the sign-in returned no refresh token: the scope must include offline_access (Microsoft), or the consent must ask for offline access (Google)".into(),
            ));
        };
        let entry = TokenCache::entry(
            &self.account,
            self.provider.name(),
            &self.client_id,
            &self.scope,
            refresh_token,
            Some((&reply.access_token, reply.lifetime.secs())),
        );
        let saved = cache.save(&entry)?;
        let mut state = self.lock();
        state.seen = Some(saved);
        state.entry = Some(entry.clone());
        state.dead = None;
        Ok(entry)
    }
}

/// A refresh token the identity platform will never accept again: only a
/// new sign-in helps, so retrying is pointless.
fn is_dead_grant(e: &TokenError) -> bool {
    match e {
        TokenError::Refused { error, code, .. } => {
            matches!(error.as_str(), "invalid_grant" | "interaction_required")
                || matches!(
                    code,
                    Some(70008 | 700082 | 70043 | 50173 | 700084 | 50076 | 50079)
                )
        }
        _ => false,
    }
}
