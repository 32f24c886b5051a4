//! The fake Microsoft identity platform (Entra ID) token endpoint.
//!
//! Serves, like `https://login.microsoftonline.com`:
//! `POST /{tenant}/oauth2/v2.0/token` (client credentials with a secret or a
//! certificate assertion, refresh tokens that rotate, device code,
//! authorization code with PKCE), `POST /{tenant}/oauth2/v2.0/devicecode`
//! and `GET /{tenant}/oauth2/v2.0/authorize`; and under `/google` a
//! Google-style token endpoint (JWT bearer grant of service accounts,
//! refresh tokens, authorization code) and authorization endpoint. The token
//! handler dispatches on `grant_type`, one function per grant.
//!
//! For tests of a client's defences the Microsoft token endpoint can also be
//! made hostile ([`TokenFault`]): absurd lifetimes, failures, huge and
//! endless bodies; every request is recorded with its time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;

use crate::credentials::{self, ClientCertificate, Jws, RegisteredKey};
use crate::graph::GRAPH_AUDIENCE;
use crate::http::Server;
use crate::jwt::{
    TokenClaims, TokenMint, TokenRejection, EXCHANGE_AUDIENCE, GOOGLE_AUDIENCE, SEND_AS_ROLE,
};
use crate::util::{form_decode, lock, parse_form, random_guid, unix_now, utc_timestamp};

const DEFAULT_TENANT: &str = "11111111-2222-3333-4444-555555555555";
const DEFAULT_CLIENT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const DEFAULT_CLIENT_SECRET: &str = "s3cr3t~ValueFromTheAzurePortal";
const DEFAULT_LIFETIME: u64 = 3599;
/// Exchange Online's `.default` scope, which is what SMTP submission needs;
/// with [`GRAPH_SCOPE`] the only scopes the client-credentials grant accepts.
const EXCHANGE_SCOPE: &str = "https://outlook.office365.com/.default";
/// Microsoft Graph's `.default` scope, for sending through `sendMail`.
const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
/// The application permissions Graph tokens carry unless set otherwise.
const GRAPH_ROLES: [&str; 2] = ["Mail.Send", "Mail.ReadWrite"];
/// Google's scope for IMAP/SMTP.
const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";
/// The user who signs in on the delegated flows, unless set otherwise.
const DEFAULT_USER: &str = "relay@contoso.com";
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// One request that reached the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The `grant_type` form field, or an empty string if there was none.
    pub grant_type: String,
    /// The request path, e.g. `/{tenant}/oauth2/v2.0/token`.
    pub path: String,
    /// When the request arrived.
    pub at: Instant,
}

/// A way the Microsoft token endpoint misbehaves, set with
/// [`IdentityPlatform::set_fault`]. It applies to every token request until
/// cleared; scripted errors ([`IdentityPlatform::fail_next`]) come first.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenFault {
    /// Tokens are issued as usual (they really live the configured
    /// lifetime), but the reply states these `expires_in` and
    /// `ext_expires_in`: huge, zero, negative, text — any JSON.
    Lifetime {
        /// Stated as `expires_in`.
        expires_in: serde_json::Value,
        /// Stated as `ext_expires_in`.
        ext_expires_in: serde_json::Value,
    },
    /// This HTTP status with a short OAuth error (`temporarily_unavailable`,
    /// AADSTS50000), as during an outage.
    Status(u16),
    /// 500 with an OAuth error whose `error_description` makes the JSON body
    /// `size` bytes, its length declared; sent in chunks, never held whole.
    LargeError {
        /// The body's length in bytes.
        size: usize,
    },
    /// 500 with a chunked body that never ends, until the client hangs up.
    EndlessBody,
}

/// A fake Microsoft identity platform serving on `127.0.0.1`.
///
/// This is a cheap handle: clones share the same server and records.
#[derive(Debug, Clone)]
pub struct IdentityPlatform {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    tenant: String,
    client_id: String,
    client_secret: String,
    /// Object id of the app's service principal, stable per platform.
    service_principal: String,
    mint: TokenMint,
    state: Mutex<Record>,
    server: Server,
    /// Body bytes of [`TokenFault::LargeError`] and
    /// [`TokenFault::EndlessBody`] replies handed to connections.
    streamed: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Record {
    lifetime: u64,
    scripted: VecDeque<AadError>,
    requests: Vec<TokenRequest>,
    /// The user who signs in on delegated flows.
    user: String,
    /// Live refresh tokens → who they belong to.
    refresh_tokens: HashMap<String, Grant>,
    /// Refresh tokens that were used (rotated away) or revoked.
    spent_refresh_tokens: HashSet<String>,
    revoked_refresh_tokens: HashSet<String>,
    /// Whether a used refresh token stays valid (what Entra ID does) instead
    /// of being single-use (the strict default).
    reuse_refresh_tokens: bool,
    /// Refresh tokens issued, in order.
    issued_refresh_tokens: Vec<String>,
    device_codes: HashMap<String, DeviceCode>,
    device_interval: u64,
    device_lifetime: u64,
    slow_downs: u32,
    auth_codes: HashMap<String, AuthCode>,
    consent: Consent,
    certificates: Vec<RegisteredKey>,
    seen_assertion_ids: HashSet<String>,
    assertions: Vec<AssertionRecord>,
    service_accounts: HashMap<String, ServiceAccount>,
    reply_delay: Option<Duration>,
    fault: Option<TokenFault>,
    /// The `roles` of app-only Graph tokens.
    graph_roles: Vec<String>,
}

impl Record {
    fn new() -> Self {
        Record {
            lifetime: DEFAULT_LIFETIME,
            graph_roles: GRAPH_ROLES.map(str::to_owned).to_vec(),
            scripted: VecDeque::new(),
            requests: Vec::new(),
            user: DEFAULT_USER.to_string(),
            refresh_tokens: HashMap::new(),
            spent_refresh_tokens: HashSet::new(),
            revoked_refresh_tokens: HashSet::new(),
            reuse_refresh_tokens: false,
            issued_refresh_tokens: Vec::new(),
            device_codes: HashMap::new(),
            device_interval: 1,
            device_lifetime: 900,
            slow_downs: 0,
            auth_codes: HashMap::new(),
            consent: Consent::Approve,
            certificates: Vec::new(),
            seen_assertion_ids: HashSet::new(),
            assertions: Vec::new(),
            service_accounts: HashMap::new(),
            reply_delay: None,
            fault: None,
        }
    }
}

/// Who a delegated grant is for.
#[derive(Debug, Clone)]
struct Grant {
    user: String,
    scope: String,
    google: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceState {
    Pending,
    Approved,
    Declined,
}

#[derive(Debug, Clone)]
struct DeviceCode {
    user_code: String,
    scope: String,
    state: DeviceState,
    expires: Instant,
    last_poll: Option<Instant>,
    interval: Duration,
}

#[derive(Debug, Clone)]
struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    user: String,
    expires: Instant,
    google: bool,
}

#[derive(Debug, Clone)]
struct ServiceAccount {
    key_id: String,
    public_key: Vec<u8>,
    delegated: bool,
}

/// What the signed-in user answers on the consent page of the browser flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// Signs in and accepts: the browser is redirected with a code.
    Approve,
    /// Declines: the browser is redirected with `error=access_denied`.
    Decline,
}

/// A client assertion the platform accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionRecord {
    /// `alg` of its header (`PS256` or `RS256`).
    pub alg: String,
    /// Its `x5t#S256` header, if any.
    pub x5t_s256: Option<String>,
    /// Its `x5t` header, if any.
    pub x5t: Option<String>,
    /// Its `jti`.
    pub jti: String,
}

/// An error reply in the identity platform's format.
#[derive(Debug, Clone)]
struct AadError {
    status: StatusCode,
    code: u32,
    error: String,
    description: String,
}

impl AadError {
    fn new(status: StatusCode, error: &str, code: u32, text: impl Into<String>) -> Self {
        AadError {
            status,
            code,
            error: error.to_string(),
            description: format!("AADSTS{code}: {}", text.into()),
        }
    }

    /// The reply Entra ID gives when a required form field is missing.
    fn missing(field: &str) -> Self {
        AadError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{field}'."),
        )
    }
}

impl IntoResponse for AadError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": self.error,
            "error_description": self.description,
            "error_codes": [self.code],
            "timestamp": utc_timestamp(unix_now()),
            "trace_id": random_guid(),
            "correlation_id": random_guid(),
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        });
        (self.status, no_store(), Json(body)).into_response()
    }
}

/// Token responses must not be cached (RFC 6749 §5.1); Entra ID says so too.
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store, no-cache"),
        (header::PRAGMA, "no-cache"),
    ]
}

impl IdentityPlatform {
    /// Starts the token endpoint on `127.0.0.1` with an ephemeral port and the
    /// default tenant, client id and secret.
    pub async fn start() -> std::io::Result<IdentityPlatform> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let inner = Arc::new(Inner {
            addr: listener.local_addr()?,
            tenant: DEFAULT_TENANT.to_string(),
            client_id: DEFAULT_CLIENT_ID.to_string(),
            client_secret: DEFAULT_CLIENT_SECRET.to_string(),
            service_principal: random_guid(),
            mint: TokenMint::new(),
            state: Mutex::new(Record::new()),
            server: Server::default(),
            streamed: Arc::default(),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token_endpoint))
            .route(
                "/{tenant}/oauth2/v2.0/devicecode",
                post(device_code_endpoint),
            )
            .route("/{tenant}/oauth2/v2.0/authorize", get(authorize_endpoint))
            .route("/google/token", post(google_token_endpoint))
            .route("/google/o/oauth2/v2/auth", get(google_authorize_endpoint))
            .with_state(inner.clone());
        inner.server.start(listener, app, "fake identity platform");
        tracing::debug!(addr = %inner.addr, "fake identity platform listening");
        Ok(IdentityPlatform { inner })
    }

    /// Base URL to use as the OAuth authority, e.g. `http://127.0.0.1:41234`
    /// (the stand-in for `https://login.microsoftonline.com`).
    pub fn authority(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The tenant id the endpoint serves.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// The only registered application's client id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// That application's client secret (the secret *value*).
    pub fn client_secret(&self) -> &str {
        &self.inner.client_secret
    }

    /// Sets the lifetime, in seconds, of access tokens issued from now on
    /// (default 3599). Zero issues tokens that are already expired.
    pub fn set_lifetime(&self, secs: u64) {
        lock(&self.inner.state).lifetime = secs;
    }

    /// Queues a scripted error for the next token request, which gets it
    /// instead of being judged. Calls queue up in order.
    ///
    /// `description` is prefixed with `AADSTS{aadsts}: ` unless it already
    /// starts with `AADSTS`. An invalid `status` becomes 500.
    pub fn fail_next(&self, status: u16, aadsts: u32, error: &str, description: &str) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut reply = AadError::new(status, error, aadsts, description);
        if description.starts_with("AADSTS") {
            reply.description = description.to_string();
        }
        lock(&self.inner.state).scripted.push_back(reply);
    }

    /// Makes the Microsoft token endpoint misbehave (see [`TokenFault`]), or
    /// behave again with `None`.
    pub fn set_fault(&self, fault: Option<TokenFault>) {
        lock(&self.inner.state).fault = fault;
    }

    /// Body bytes of large and endless fault replies handed to connections
    /// so far: what a client that hangs up early spared itself is missing.
    pub fn streamed_bytes(&self) -> u64 {
        self.inner.streamed.load(Ordering::Relaxed)
    }

    /// How many requests reached the token (or device code) endpoints at or
    /// after `since`.
    pub fn requests_since(&self, since: Instant) -> usize {
        lock(&self.inner.state)
            .requests
            .iter()
            .filter(|r| r.at >= since)
            .count()
    }

    /// Every request that reached the token endpoint so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.inner.state).requests.clone()
    }

    /// How many token requests had this `grant_type`.
    pub fn grants(&self, grant_type: &str) -> usize {
        lock(&self.inner.state)
            .requests
            .iter()
            .filter(|r| r.grant_type == grant_type)
            .count()
    }

    /// Judges an access token the way Exchange Online does: it must have been
    /// issued here, verify, not be expired, and be for
    /// `https://outlook.office365.com`.
    pub fn check_access_token(&self, token: &str) -> Result<TokenClaims, TokenRejection> {
        self.inner.mint.check(token)
    }

    /// Judges an access token the way Microsoft Graph does: issued here,
    /// verifying, not expired, and for `https://graph.microsoft.com`.
    pub fn check_graph_token(&self, token: &str) -> Result<TokenClaims, TokenRejection> {
        self.inner.mint.check_for(token, &[GRAPH_AUDIENCE])
    }

    /// The application permissions (`roles`) of the app-only Graph tokens
    /// issued from now on; default `Mail.Send` and `Mail.ReadWrite`. Leave
    /// out `Mail.ReadWrite` to see draft-based sends refused.
    pub fn set_graph_roles(&self, roles: &[&str]) {
        lock(&self.inner.state).graph_roles = roles.iter().map(|r| r.to_string()).collect();
    }

    /// Issues a token directly, bypassing HTTP, for tests that need a token
    /// the endpoint would not hand out: another `audience`, or a lifetime in
    /// the past (negative `lifetime_secs`). It counts as issued here.
    pub fn mint_token(&self, audience: &str, lifetime_secs: i64) -> String {
        let exp = unix_now().saturating_add_signed(lifetime_secs);
        let roles = self.inner.app_roles(audience);
        self.inner
            .mint
            .mint(self.inner.app_claims(audience, roles, exp))
    }

    /// The user who signs in on the delegated flows (default
    /// `relay@contoso.com`): their tokens carry `upn` and `scp`.
    pub fn set_user(&self, user: &str) {
        lock(&self.inner.state).user = user.to_string();
    }

    /// A refresh token as if the user had signed in already (scope
    /// `SMTP.Send offline_access`).
    pub fn mint_refresh_token(&self) -> String {
        let mut state = lock(&self.inner.state);
        let grant = Grant {
            user: state.user.clone(),
            scope: "https://outlook.office.com/SMTP.Send offline_access".into(),
            google: false,
        };
        new_refresh_token(&mut state, grant)
    }

    /// Revokes every refresh token issued so far (as an admin's "revoke
    /// sessions" or a password change does): using one gets
    /// `invalid_grant` / `AADSTS50173`.
    pub fn revoke_refresh_tokens(&self) {
        let mut state = lock(&self.inner.state);
        let live: Vec<String> = state.refresh_tokens.drain().map(|(t, _)| t).collect();
        state.revoked_refresh_tokens.extend(live);
    }

    /// Whether a used refresh token stays valid until it expires, as Entra ID
    /// documents (`true`), or is single-use (`false`, the default, stricter
    /// than the real service, like the acceptance suite's fake).
    pub fn reuse_refresh_tokens(&self, reuse: bool) {
        lock(&self.inner.state).reuse_refresh_tokens = reuse;
    }

    /// Whether `refresh_token` would be accepted now.
    pub fn refresh_token_is_live(&self, refresh_token: &str) -> bool {
        lock(&self.inner.state)
            .refresh_tokens
            .contains_key(refresh_token)
    }

    /// Every refresh token issued, in order (the last one is the newest).
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        lock(&self.inner.state).issued_refresh_tokens.clone()
    }

    /// The polling interval (seconds) the device code endpoint asks for
    /// (default 1).
    pub fn set_device_interval(&self, secs: u64) {
        lock(&self.inner.state).device_interval = secs;
    }

    /// How long (seconds) device codes stay valid (default 900).
    pub fn set_device_lifetime(&self, secs: u64) {
        lock(&self.inner.state).device_lifetime = secs;
    }

    /// The next `n` device code polls get `slow_down` (RFC 8628 §3.5).
    pub fn slow_down_next(&self, n: u32) {
        lock(&self.inner.state).slow_downs = n;
    }

    /// User codes of device authorizations waiting for the user.
    pub fn pending_user_codes(&self) -> Vec<String> {
        lock(&self.inner.state)
            .device_codes
            .values()
            .filter(|d| d.state == DeviceState::Pending)
            .map(|d| d.user_code.clone())
            .collect()
    }

    /// The user enters `user_code` and signs in. False if no such code waits.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.answer_device(user_code, DeviceState::Approved)
    }

    /// The user enters `user_code` and declines. False if no such code waits.
    pub fn decline_device(&self, user_code: &str) -> bool {
        self.answer_device(user_code, DeviceState::Declined)
    }

    fn answer_device(&self, user_code: &str, answer: DeviceState) -> bool {
        let mut state = lock(&self.inner.state);
        match state
            .device_codes
            .values_mut()
            .find(|d| d.user_code == user_code && d.state == DeviceState::Pending)
        {
            Some(entry) => {
                entry.state = answer;
                true
            }
            None => false,
        }
    }

    /// What the user does on the browser flow's consent page (default approve).
    pub fn set_consent(&self, consent: Consent) {
        lock(&self.inner.state).consent = consent;
    }

    /// Generates an RSA certificate and registers it on the app, as an admin
    /// uploads one under *Certificates & secrets*. Returns the files the
    /// relay needs.
    pub fn create_client_certificate(&self) -> ClientCertificate {
        let (certificate, registered) = credentials::new_certificate();
        lock(&self.inner.state).certificates.push(registered);
        certificate
    }

    /// Client assertions accepted so far, in order.
    pub fn assertions(&self) -> Vec<AssertionRecord> {
        lock(&self.inner.state).assertions.clone()
    }

    /// Delays every token endpoint reply by `delay` after the request was
    /// judged (a refresh token is already rotated when the delay starts),
    /// to let tests kill a client in the middle of a token request.
    pub fn set_reply_delay(&self, delay: Option<Duration>) {
        lock(&self.inner.state).reply_delay = delay;
    }

    /// Base URL of the Google-style endpoints (the stand-in for
    /// `https://oauth2.googleapis.com`): `{authority}/google/token` and
    /// `{authority}/google/o/oauth2/v2/auth`.
    pub fn google_authority(&self) -> String {
        format!("http://{}/google", self.inner.addr)
    }

    /// Creates a Google service account `email` with domain-wide delegation
    /// for `https://mail.google.com/`; returns its key file (JSON).
    pub fn create_service_account(&self, email: &str) -> String {
        let token_uri = format!("{}/token", self.google_authority());
        let (json, key_id, public_key) = credentials::new_service_account(email, &token_uri);
        lock(&self.inner.state).service_accounts.insert(
            email.to_string(),
            ServiceAccount {
                key_id,
                public_key,
                delegated: true,
            },
        );
        json
    }

    /// Grants or withdraws a service account's domain-wide delegation.
    pub fn set_domain_wide_delegation(&self, email: &str, delegated: bool) {
        if let Some(account) = lock(&self.inner.state).service_accounts.get_mut(email) {
            account.delegated = delegated;
        }
    }

    /// Stops listening. Requests already being handled may finish (for a few
    /// seconds at most); idle keep-alive connections are closed. Idempotent.
    pub async fn stop(&self) {
        self.inner.server.stop().await;
    }
}

impl Inner {
    /// A delegated (user) token for `grant`.
    fn user_claims(&self, grant: &Grant, exp: u64) -> TokenClaims {
        let scp: Vec<&str> = grant
            .scope
            .split_whitespace()
            .filter(|s| !matches!(*s, "offline_access" | "openid" | "profile" | "email"))
            .map(|s| {
                if grant.google {
                    s
                } else {
                    s.rsplit('/').next().unwrap_or(s)
                }
            })
            .collect();
        let graph = grant
            .scope
            .split_whitespace()
            .any(|s| s.starts_with(GRAPH_AUDIENCE));
        TokenClaims {
            aud: if grant.google {
                GOOGLE_AUDIENCE.to_string()
            } else if graph {
                GRAPH_AUDIENCE.to_string()
            } else {
                EXCHANGE_AUDIENCE.to_string()
            },
            exp,
            roles: Vec::new(),
            scp: Some(scp.join(" ")),
            appid: self.client_id.clone(),
            tid: self.tenant.clone(),
            oid: Some(random_guid()),
            upn: Some(grant.user.clone()),
        }
    }

    /// The application permissions an app-only token for `audience` carries.
    fn app_roles(&self, audience: &str) -> Vec<String> {
        if audience == GRAPH_AUDIENCE {
            lock(&self.state).graph_roles.clone()
        } else {
            vec![SEND_AS_ROLE.to_string()]
        }
    }

    fn app_claims(&self, audience: &str, roles: Vec<String>, exp: u64) -> TokenClaims {
        TokenClaims {
            aud: audience.to_string(),
            exp,
            roles,
            scp: None,
            appid: self.client_id.clone(),
            tid: self.tenant.clone(),
            oid: Some(self.service_principal.clone()),
            upn: None,
        }
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`.
async fn token_endpoint(
    State(idp): State<Arc<Inner>>,
    Path(tenant): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|mime| {
                mime.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let form = Form(if is_form {
        parse_form(&body)
    } else {
        Vec::new()
    });
    let grant_type = form.get("grant_type").map(str::to_string);

    let scripted = record_request(&idp, grant_type.as_deref().unwrap_or_default(), &uri);
    tracing::debug!(%tenant, grant_type = ?grant_type, "token request");
    if let Some(reply) = scripted {
        return reply.into_response();
    }
    let fault = lock(&idp.state).fault.clone();
    let stated_lifetime = match fault {
        None => None,
        Some(TokenFault::Lifetime {
            expires_in,
            ext_expires_in,
        }) => Some((expires_in, ext_expires_in)),
        Some(TokenFault::Status(status)) => {
            return AadError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "temporarily_unavailable",
                50000,
                "There was an error issuing a token or an authorization code.",
            )
            .into_response()
        }
        Some(TokenFault::LargeError { size }) => return large_error(&idp, size),
        Some(TokenFault::EndlessBody) => return endless_body(&idp),
    };

    if !tenant.eq_ignore_ascii_case(&idp.tenant) {
        return AadError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID \
                 and are signing into the correct cloud."
            ),
        )
        .into_response();
    }
    // Entra ID reads the grant from the form; any other body looks empty.
    let Some(grant_type) = grant_type else {
        return AadError::missing("grant_type").into_response();
    };
    let token_url = format!("http://{}{}", idp.addr, uri.path());
    let result = match grant_type.as_str() {
        "client_credentials" => client_credentials(&idp, &form, &headers, &token_url),
        "refresh_token" => refresh_token_grant(&idp, &form, &headers, &token_url),
        DEVICE_CODE_GRANT => device_code_grant(&idp, &form, &headers, &token_url),
        "authorization_code" => authorization_code_grant(&idp, &form, &headers, &token_url),
        other => Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{other}'."),
        )),
    };
    let response = match result {
        Ok(reply) => Issued {
            stated_lifetime,
            ..reply
        }
        .into_response(),
        Err(error) => error.into_response(),
    };
    delay_reply(&idp).await;
    response
}

/// Chunks of filler for the large and endless bodies: shared, not copied.
const FILLER_CHUNK: usize = 64 * 1024;

/// A `500` whose JSON error body is `size` bytes, declared and streamed.
fn large_error(idp: &Inner, size: usize) -> Response {
    let head = Bytes::from_static(
        b"{\"error\":\"server_error\",\"error_codes\":[50000],\"error_description\":\"AADSTS50000: ",
    );
    let tail = Bytes::from_static(b"\"}");
    let filler_len = size.saturating_sub(head.len() + tail.len());
    let filler = Bytes::from(vec![b'x'; FILLER_CHUNK]);
    let mut chunks = vec![head.clone()];
    chunks.extend(std::iter::repeat_n(
        filler.clone(),
        filler_len / FILLER_CHUNK,
    ));
    chunks.push(filler.slice(..filler_len % FILLER_CHUNK));
    chunks.push(tail);
    let length = head.len() + filler_len + 2;
    let body = counted(idp, futures_util::stream::iter(chunks));
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [
            (
                header::CONTENT_TYPE,
                "application/json; charset=utf-8".to_string(),
            ),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response()
}

/// A `500` whose body never ends.
fn endless_body(idp: &Inner) -> Response {
    let filler = Bytes::from(vec![b'x'; FILLER_CHUNK]);
    let head = Bytes::from_static(b"{\"error\":\"server_error\",\"error_description\":\"");
    let chunks = std::iter::once(head).chain(std::iter::repeat(filler));
    let body = counted(idp, futures_util::stream::iter(chunks));
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A streamed body that adds what it hands on to [`Inner::streamed`].
fn counted(idp: &Inner, chunks: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Body {
    use futures_util::StreamExt as _;
    let streamed = idp.streamed.clone();
    Body::from_stream(chunks.map(move |chunk| {
        streamed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(chunk)
    }))
}

async fn delay_reply(idp: &Inner) {
    let delay = lock(&idp.state).reply_delay;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

/// The decoded form fields of a request; the first occurrence of a name wins.
struct Form(Vec<(String, String)>);

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A successful token response.
struct Issued {
    lifetime: u64,
    token: String,
    refresh_token: Option<String>,
    scope: Option<String>,
    /// `expires_in` and `ext_expires_in` to state instead of `lifetime`.
    stated_lifetime: Option<(serde_json::Value, serde_json::Value)>,
}

impl IntoResponse for Issued {
    fn into_response(self) -> Response {
        let (expires_in, ext_expires_in) = self
            .stated_lifetime
            .unwrap_or_else(|| (self.lifetime.into(), self.lifetime.into()));
        let mut body = json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": ext_expires_in,
            "access_token": self.token,
        });
        if let Some(refresh_token) = self.refresh_token {
            body["refresh_token"] = refresh_token.into();
        }
        if let Some(scope) = self.scope {
            body["scope"] = scope.into();
        }
        (StatusCode::OK, no_store(), Json(body)).into_response()
    }
}

/// `grant_type=client_credentials` with a client secret or a certificate
/// assertion (app-only token).
fn client_credentials(
    idp: &Inner,
    form: &Form,
    headers: &HeaderMap,
    token_url: &str,
) -> Result<Issued, AadError> {
    check_client_id(idp, form, headers)?;
    if form.get("client_assertion").is_some() || form.get("client_assertion_type").is_some() {
        verify_assertion(idp, form, token_url)?;
        return app_token(idp, form);
    }
    // The secret may come in the body or as HTTP Basic auth; Entra ID
    // accepts both (RFC 6749 §2.3.1).
    let secret = form
        .get("client_secret")
        .map(str::to_string)
        .or_else(|| basic_credentials(headers).map(|(_, secret)| secret))
        .ok_or_else(|| {
            AadError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or \
                 'client_secret'.",
            )
        })?;
    if secret != idp.client_secret {
        return Err(AadError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '{}'.",
                idp.client_id
            ),
        ));
    }
    app_token(idp, form)
}

/// The app-only token once the client is authenticated.
fn app_token(idp: &Inner, form: &Form) -> Result<Issued, AadError> {
    let scope = form
        .get("scope")
        .ok_or_else(|| AadError::missing("scope"))?;
    let audience = match scope {
        EXCHANGE_SCOPE => EXCHANGE_AUDIENCE,
        GRAPH_SCOPE => GRAPH_AUDIENCE,
        _ => {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
            ));
        }
    };
    let lifetime = lock(&idp.state).lifetime;
    let exp = unix_now().saturating_add(lifetime);
    let roles = idp.app_roles(audience);
    let token = idp.mint.mint(idp.app_claims(audience, roles, exp));
    Ok(Issued {
        lifetime,
        token,
        refresh_token: None,
        scope: None,
        stated_lifetime: None,
    })
}

/// Client id and secret from an `Authorization: Basic` header, if present.
/// Both halves are form-encoded before base64 (RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((
        form_decode(&decoded[..colon]),
        form_decode(&decoded[colon + 1..]),
    ))
}

/// `client_id` from the form or Basic auth, which must be the app's (700016).
fn check_client_id(idp: &Inner, form: &Form, headers: &HeaderMap) -> Result<(), AadError> {
    let client_id = form
        .get("client_id")
        .map(str::to_string)
        .or_else(|| basic_credentials(headers).map(|(id, _)| id))
        .ok_or_else(|| AadError::missing("client_id"))?;
    if !client_id.eq_ignore_ascii_case(&idp.client_id) {
        return Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{}'. \
                 This can happen if the application has not been installed by the administrator \
                 of the tenant or consented to by any user in the tenant. You may have sent your \
                 authentication request to the wrong tenant.",
                idp.tenant
            ),
        ));
    }
    Ok(())
}

/// The client of a delegated grant: the app id, plus its secret or
/// assertion if it sends one (the app also allows public client flows).
fn check_delegated_client(
    idp: &Inner,
    form: &Form,
    headers: &HeaderMap,
    token_url: &str,
) -> Result<(), AadError> {
    check_client_id(idp, form, headers)?;
    if form.get("client_assertion").is_some() {
        return verify_assertion(idp, form, token_url);
    }
    let secret = form
        .get("client_secret")
        .map(str::to_string)
        .or_else(|| basic_credentials(headers).map(|(_, s)| s));
    match secret {
        Some(secret) if secret != idp.client_secret => Err(AadError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the \
             client secret value, not the client secret ID.",
        )),
        _ => Ok(()),
    }
}

/// Verifies a certificate client assertion like Entra ID: the certificate
/// named by `x5t#S256` (or `x5t`) is registered, the PS256/RS256 signature
/// verifies with it, `aud` is the token endpoint, `iss` = `sub` = the client
/// id, the time range is sane, and the `jti` was never seen before.
fn verify_assertion(idp: &Inner, form: &Form, token_url: &str) -> Result<(), AadError> {
    let refused = |code: u32, why: &str| {
        AadError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            format!("Client assertion failed signature validation. {why}"),
        )
    };
    if form.get("client_assertion_type") != Some(ASSERTION_TYPE) {
        return Err(refused(
            700027,
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ));
    }
    let assertion = form
        .get("client_assertion")
        .ok_or_else(|| AadError::missing("client_assertion"))?;
    let jws = Jws::parse(assertion).ok_or_else(|| refused(700027, "Malformed JWT."))?;
    let mut state = lock(&idp.state);
    let x5t_s256 = jws.header_str("x5t#S256").map(str::to_string);
    let x5t = jws.header_str("x5t").map(str::to_string);
    let key = state
        .certificates
        .iter()
        .find(|c| {
            x5t_s256.as_deref() == Some(c.x5t_s256.as_str())
                || x5t.as_deref() == Some(c.x5t.as_str())
        })
        .cloned()
        .ok_or_else(|| {
            AadError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The key was not found.]",
            )
        })?;
    jws.verify(&key.public_key)
        .map_err(|why| refused(700027, &why.to_string()))?;
    if jws.claim_str("aud") != Some(token_url) {
        return Err(refused(700027, &format!("aud must be {token_url}")));
    }
    if jws.claim_str("iss") != Some(idp.client_id.as_str())
        || jws.claim_str("sub") != Some(idp.client_id.as_str())
    {
        return Err(refused(700027, "iss and sub must be the client id"));
    }
    let now = unix_now();
    let exp = jws.claim_u64("exp").unwrap_or(0);
    let nbf = jws.claim_u64("nbf").unwrap_or(now);
    if exp <= now || nbf > now + 60 || exp > now + 3600 {
        return Err(AadError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    let jti = jws.claim_str("jti").unwrap_or_default().to_string();
    if jti.is_empty() || !state.seen_assertion_ids.insert(jti.clone()) {
        return Err(refused(
            700027,
            "The jti is missing or was already used (replay).",
        ));
    }
    state.assertions.push(AssertionRecord {
        alg: jws.alg().to_string(),
        x5t_s256,
        x5t,
        jti,
    });
    Ok(())
}

/// Issues a refresh token for `grant` and remembers it.
fn new_refresh_token(state: &mut Record, grant: Grant) -> String {
    let token = format!(
        "0.AX{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 36]>())
    );
    state.refresh_tokens.insert(token.clone(), grant);
    state.issued_refresh_tokens.push(token.clone());
    token
}

/// A delegated token for `grant`, with a new refresh token when asked.
fn delegated_token(idp: &Inner, grant: Grant, with_refresh_token: bool) -> Issued {
    let mut state = lock(&idp.state);
    let lifetime = state.lifetime;
    let token = idp
        .mint
        .mint(idp.user_claims(&grant, unix_now().saturating_add(lifetime)));
    let scope = grant.scope.clone();
    let refresh_token = with_refresh_token.then(|| new_refresh_token(&mut state, grant));
    Issued {
        lifetime,
        token,
        refresh_token,
        scope: Some(scope),
        stated_lifetime: None,
    }
}

/// Takes a refresh token: rotated away unless reuse is on.
fn take_refresh_token(idp: &Inner, form: &Form) -> Result<Grant, (String, u32, String)> {
    let token = form.get("refresh_token").unwrap_or_default();
    let mut state = lock(&idp.state);
    if state.revoked_refresh_tokens.contains(token) {
        return Err((
            "invalid_grant".into(),
            50173,
            "The provided grant has expired due to it being revoked, a fresh auth token is needed. \
             The user might have changed or reset their password."
                .into(),
        ));
    }
    let reuse = state.reuse_refresh_tokens;
    let grant = if reuse {
        state.refresh_tokens.get(token).cloned()
    } else {
        state.refresh_tokens.remove(token)
    };
    match grant {
        Some(grant) => {
            state.spent_refresh_tokens.insert(token.to_string());
            Ok(grant)
        }
        None if state.spent_refresh_tokens.contains(token) => Err((
            "invalid_grant".into(),
            70008,
            "The provided authorization code or refresh token has expired due to inactivity."
                .into(),
        )),
        None => Err((
            "invalid_grant".into(),
            9002313,
            "Invalid request. Request is malformed or invalid.".into(),
        )),
    }
}

/// `grant_type=refresh_token`: every answer carries a new refresh token.
fn refresh_token_grant(
    idp: &Inner,
    form: &Form,
    headers: &HeaderMap,
    token_url: &str,
) -> Result<Issued, AadError> {
    check_delegated_client(idp, form, headers, token_url)?;
    if form.get("refresh_token").is_none() {
        return Err(AadError::missing("refresh_token"));
    }
    let mut grant = take_refresh_token(idp, form).map_err(|(error, code, text)| {
        AadError::new(StatusCode::BAD_REQUEST, &error, code, text)
    })?;
    // The access token carries the scope asked for now.
    if let Some(scope) = form.get("scope").filter(|s| !s.trim().is_empty()) {
        grant.scope = scope.to_string();
    }
    Ok(delegated_token(idp, grant, true))
}

/// Counts a request to an endpoint (tests read them with `requests`) and
/// takes the next scripted error reply, if one is queued.
fn record_request(idp: &Inner, grant_type: &str, uri: &Uri) -> Option<AadError> {
    let mut state = lock(&idp.state);
    state.requests.push(TokenRequest {
        grant_type: grant_type.to_owned(),
        path: uri.path().to_string(),
        at: Instant::now(),
    });
    state.scripted.pop_front()
}

/// `POST /{tenant}/oauth2/v2.0/devicecode`.
async fn device_code_endpoint(
    State(idp): State<Arc<Inner>>,
    Path(tenant): Path<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let form = Form(parse_form(&body));
    if let Some(reply) = record_request(&idp, "devicecode", &uri) {
        return reply.into_response();
    }
    if !tenant.eq_ignore_ascii_case(&idp.tenant) {
        return AadError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!("Tenant '{tenant}' not found."),
        )
        .into_response();
    }
    if let Err(e) = check_client_id(&idp, &form, &HeaderMap::new()) {
        return e.into_response();
    }
    let scope = form.get("scope").unwrap_or_default().to_string();
    let device_code =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let user_code = format!("{:08X}", rand::random::<u32>());
    let (interval, lifetime) = {
        let mut state = lock(&idp.state);
        let interval = state.device_interval;
        let lifetime = state.device_lifetime;
        state.device_codes.insert(
            device_code.clone(),
            DeviceCode {
                user_code: user_code.clone(),
                scope,
                state: DeviceState::Pending,
                expires: Instant::now() + Duration::from_secs(lifetime),
                last_poll: None,
                interval: Duration::from_secs(interval),
            },
        );
        (interval, lifetime)
    };
    let body = json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": lifetime,
        "interval": interval,
        "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
    });
    (StatusCode::OK, no_store(), Json(body)).into_response()
}

/// `grant_type=urn:ietf:params:oauth:grant-type:device_code`.
fn device_code_grant(
    idp: &Inner,
    form: &Form,
    headers: &HeaderMap,
    token_url: &str,
) -> Result<Issued, AadError> {
    check_delegated_client(idp, form, headers, token_url)?;
    let code = form
        .get("device_code")
        .ok_or_else(|| AadError::missing("device_code"))?;
    let grant = {
        let mut state = lock(&idp.state);
        let user = state.user.clone();
        let slow_down = if state.slow_downs > 0 {
            state.slow_downs -= 1;
            true
        } else {
            false
        };
        let now = Instant::now();
        let Some(entry) = state.device_codes.get_mut(code) else {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "expired_token",
                70020,
                "The provided value for the input parameter 'device_code' is not valid.",
            ));
        };
        let too_fast = entry.last_poll.is_some_and(|last| {
            now.duration_since(last) + Duration::from_millis(300) < entry.interval
        });
        entry.last_poll = Some(now);
        if entry.expires < now {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "expired_token",
                70020,
                "The device code has expired.",
            ));
        }
        if slow_down || too_fast {
            entry.interval += Duration::from_secs(5);
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "slow_down",
                70016,
                "Polling too fast: slow down.",
            ));
        }
        match entry.state {
            DeviceState::Pending => {
                return Err(AadError::new(
                    StatusCode::BAD_REQUEST,
                    "authorization_pending",
                    70016,
                    "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                ))
            }
            DeviceState::Declined => {
                state.device_codes.remove(code);
                return Err(AadError::new(
                    StatusCode::BAD_REQUEST,
                    "authorization_declined",
                    70000,
                    "The user declined to authorize the application.",
                ));
            }
            DeviceState::Approved => {}
        }
        let entry = state.device_codes.remove(code).expect("entry exists");
        Grant {
            user,
            scope: entry.scope,
            google: false,
        }
    };
    Ok(delegated_token(idp, grant, true))
}

/// `GET /{tenant}/oauth2/v2.0/authorize`: the user signs in (or declines)
/// and the browser is redirected to the loopback `redirect_uri`.
async fn authorize_endpoint(
    State(idp): State<Arc<Inner>>,
    Path(tenant): Path<String>,
    uri: Uri,
) -> Response {
    let query = query_map(&uri);
    if !tenant.eq_ignore_ascii_case(&idp.tenant) {
        return (StatusCode::BAD_REQUEST, "AADSTS90002: tenant not found").into_response();
    }
    authorize(&idp, &query, false)
}

/// `GET /google/o/oauth2/v2/auth`.
async fn google_authorize_endpoint(State(idp): State<Arc<Inner>>, uri: Uri) -> Response {
    authorize(&idp, &query_map(&uri), true)
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    parse_form(uri.query().unwrap_or_default().as_bytes())
        .into_iter()
        .collect()
}

fn authorize(idp: &Inner, query: &HashMap<String, String>, google: bool) -> Response {
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let bad = |why: &str| (StatusCode::BAD_REQUEST, why.to_string()).into_response();
    if !get("client_id").eq_ignore_ascii_case(&idp.client_id) {
        return bad("AADSTS700016: application not found");
    }
    let redirect_uri = get("redirect_uri");
    if !(redirect_uri.starts_with("http://localhost:")
        || redirect_uri.starts_with("http://127.0.0.1:"))
    {
        return bad("AADSTS50011: the redirect URI is not registered (loopback only)");
    }
    if get("response_type") != "code" {
        return bad("AADSTS900144: response_type must be code");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").is_empty() {
        return bad("AADSTS9002325: Proof Key for Code Exchange is required (S256)");
    }
    let state_param = get("state").to_string();
    let (consent, user) = {
        let state = lock(&idp.state);
        (state.consent, state.user.clone())
    };
    let mut location: Vec<(&str, String)> = Vec::new();
    match consent {
        Consent::Decline => {
            location.push(("error", "access_denied".into()));
            location.push((
                "error_description",
                "AADSTS65004: User declined to consent to access the app.".into(),
            ));
        }
        Consent::Approve => {
            let code =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
            lock(&idp.state).auth_codes.insert(
                code.clone(),
                AuthCode {
                    client_id: get("client_id").to_string(),
                    redirect_uri: redirect_uri.to_string(),
                    challenge: get("code_challenge").to_string(),
                    scope: get("scope").to_string(),
                    user,
                    expires: Instant::now() + Duration::from_secs(600),
                    google,
                },
            );
            location.push(("code", code));
        }
    }
    if !state_param.is_empty() {
        location.push(("state", state_param));
    }
    let target = format!(
        "{redirect_uri}?{}",
        location
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    );
    (StatusCode::FOUND, [(header::LOCATION, target)]).into_response()
}

/// Percent-encodes a query value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Takes an authorization code and checks it against the PKCE verifier and
/// redirect URI (single use, ten minutes).
fn take_auth_code(
    idp: &Inner,
    form: &Form,
    google: bool,
) -> Result<AuthCode, (String, u32, String)> {
    let code = form.get("code").unwrap_or_default();
    let entry = lock(&idp.state).auth_codes.remove(code);
    let Some(entry) = entry else {
        return Err((
            "invalid_grant".into(),
            70008,
            "The provided authorization code or refresh token has expired or was already used."
                .into(),
        ));
    };
    if entry.google != google || entry.expires < Instant::now() {
        return Err((
            "invalid_grant".into(),
            70008,
            "The authorization code has expired.".into(),
        ));
    }
    if form.get("redirect_uri") != Some(entry.redirect_uri.as_str()) {
        return Err((
            "invalid_grant".into(),
            50148,
            "The redirect_uri does not match the one of the authorization request.".into(),
        ));
    }
    if !form
        .get("client_id")
        .is_some_and(|id| id.eq_ignore_ascii_case(&entry.client_id))
    {
        return Err(("invalid_grant".into(), 700016, "client_id mismatch".into()));
    }
    let verifier = form.get("code_verifier").unwrap_or_default();
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()),
    );
    if verifier.is_empty() || computed != entry.challenge {
        return Err((
            "invalid_grant".into(),
            501481,
            "The Code_Verifier does not match the code_challenge supplied in the authorization request."
                .into(),
        ));
    }
    Ok(entry)
}

/// `grant_type=authorization_code` with PKCE.
fn authorization_code_grant(
    idp: &Inner,
    form: &Form,
    headers: &HeaderMap,
    token_url: &str,
) -> Result<Issued, AadError> {
    check_delegated_client(idp, form, headers, token_url)?;
    let entry = take_auth_code(idp, form, false).map_err(|(error, code, text)| {
        AadError::new(StatusCode::BAD_REQUEST, &error, code, text)
    })?;
    Ok(delegated_token(
        idp,
        Grant {
            user: entry.user,
            scope: entry.scope,
            google: false,
        },
        true,
    ))
}

/// An error in Google's format: no AADSTS numbers.
fn google_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        no_store(),
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// `POST /google/token`: Google's token endpoint (JWT bearer grant of
/// service accounts, refresh tokens that do not rotate, authorization code).
async fn google_token_endpoint(State(idp): State<Arc<Inner>>, uri: Uri, body: Bytes) -> Response {
    let form = Form(parse_form(&body));
    let grant_type = form.get("grant_type").unwrap_or_default().to_string();
    lock(&idp.state).requests.push(TokenRequest {
        grant_type: grant_type.clone(),
        path: uri.path().to_string(),
        at: Instant::now(),
    });
    let token_url = format!("http://{}{}", idp.addr, uri.path());
    let response = match grant_type.as_str() {
        JWT_BEARER_GRANT => service_account_grant(&idp, &form, &token_url),
        "refresh_token" | "authorization_code" => {
            let client_ok = form
                .get("client_id")
                .is_some_and(|id| id.eq_ignore_ascii_case(&idp.client_id))
                && form.get("client_secret") == Some(idp.client_secret.as_str());
            if !client_ok {
                google_error(StatusCode::UNAUTHORIZED, "invalid_client", "Unauthorized")
            } else if grant_type == "refresh_token" {
                match take_refresh_token(&idp, &form) {
                    // Google's refresh tokens do not rotate.
                    Ok(grant) => {
                        let token = form.get("refresh_token").unwrap_or_default().to_string();
                        lock(&idp.state).refresh_tokens.insert(token, grant.clone());
                        delegated_token(&idp, grant, false).into_response()
                    }
                    Err(_) => google_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "Token has been expired or revoked.",
                    ),
                }
            } else {
                match take_auth_code(&idp, &form, true) {
                    Ok(entry) => delegated_token(
                        &idp,
                        Grant {
                            user: entry.user,
                            scope: entry.scope,
                            google: true,
                        },
                        true,
                    )
                    .into_response(),
                    Err((_, _, text)) => {
                        google_error(StatusCode::BAD_REQUEST, "invalid_grant", &text)
                    }
                }
            }
        }
        _ => google_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Invalid grant_type",
        ),
    };
    delay_reply(&idp).await;
    response
}

/// The JWT bearer grant of a service account with domain-wide delegation.
fn service_account_grant(idp: &Inner, form: &Form, token_url: &str) -> Response {
    let invalid = |why: &str| google_error(StatusCode::BAD_REQUEST, "invalid_grant", why);
    let Some(jws) = form.get("assertion").and_then(Jws::parse) else {
        return invalid("Invalid JWT: malformed assertion.");
    };
    let iss = jws.claim_str("iss").unwrap_or_default().to_string();
    let account = lock(&idp.state).service_accounts.get(&iss).cloned();
    let Some(account) = account else {
        return invalid("Invalid grant: account not found");
    };
    if jws.alg() != "RS256" {
        return invalid("Invalid JWT: alg must be RS256.");
    }
    if jws
        .header_str("kid")
        .is_some_and(|kid| kid != account.key_id)
    {
        return invalid("Invalid JWT Signature.");
    }
    if jws.verify(&account.public_key).is_err() {
        return invalid("Invalid JWT Signature.");
    }
    if jws.claim_str("aud") != Some(token_url) {
        return invalid("Invalid JWT: aud must be the token endpoint.");
    }
    let now = unix_now();
    let iat = jws.claim_u64("iat").unwrap_or(0);
    let exp = jws.claim_u64("exp").unwrap_or(0);
    if exp <= now || iat > now + 60 || exp.saturating_sub(iat) > 3600 {
        return invalid(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        );
    }
    let scope = jws.claim_str("scope").unwrap_or_default().to_string();
    if !scope.split_whitespace().any(|s| s == GOOGLE_MAIL_SCOPE) {
        return google_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        );
    }
    let Some(subject) = jws.claim_str("sub").map(str::to_string) else {
        return invalid("Invalid JWT: sub (the mailbox to act as) is missing.");
    };
    if !account.delegated {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized_client",
            "Client is unauthorized to retrieve access tokens using this method, or client not \
             authorized for any of the scopes requested.",
        );
    }
    delegated_token(
        idp,
        Grant {
            user: subject,
            scope,
            google: true,
        },
        false,
    )
    .into_response()
}
