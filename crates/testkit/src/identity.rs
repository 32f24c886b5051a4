//! The fake Microsoft identity platform (Entra ID) token endpoint.
//!
//! Serves `POST /{tenant}/oauth2/v2.0/token` like
//! `https://login.microsoftonline.com`. Only the client-credentials grant is
//! implemented; the handler dispatches on `grant_type` with one function per
//! grant so further grants can be added beside it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::jwt::{TokenClaims, TokenMint, TokenRejection, EXCHANGE_AUDIENCE, SEND_AS_ROLE};
use crate::util::{form_decode, lock, parse_form, random_guid, unix_now, utc_timestamp};

const DEFAULT_TENANT: &str = "11111111-2222-3333-4444-555555555555";
const DEFAULT_CLIENT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const DEFAULT_CLIENT_SECRET: &str = "s3cr3t~ValueFromTheAzurePortal";
const DEFAULT_LIFETIME: u64 = 3599;
/// The only scope the client-credentials grant accepts: Exchange Online's
/// `.default` scope, which is what SMTP submission needs.
const EXCHANGE_SCOPE: &str = "https://outlook.office365.com/.default";
/// How long `stop` lets in-flight requests finish before cutting them off.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    server: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Record {
    lifetime: u64,
    scripted: VecDeque<AadError>,
    requests: Vec<TokenRequest>,
}

#[derive(Debug)]
struct Running {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
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
            state: Mutex::new(Record {
                lifetime: DEFAULT_LIFETIME,
                scripted: VecDeque::new(),
                requests: Vec::new(),
            }),
            server: Mutex::new(None),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token_endpoint))
            .with_state(inner.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::debug!(error = %e, "fake identity platform stopped with an error");
            }
        });
        *lock(&inner.server) = Some(Running { shutdown, task });
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

    /// Issues a token directly, bypassing HTTP, for tests that need a token
    /// the endpoint would not hand out: another `audience`, or a lifetime in
    /// the past (negative `lifetime_secs`). It counts as issued here.
    pub fn mint_token(&self, audience: &str, lifetime_secs: i64) -> String {
        let exp = unix_now().saturating_add_signed(lifetime_secs);
        self.inner.mint.mint(self.inner.app_claims(audience, exp))
    }

    /// Stops listening. Requests already being handled may finish (for a few
    /// seconds at most); idle keep-alive connections are closed. Idempotent.
    pub async fn stop(&self) {
        let running = lock(&self.inner.server).take();
        let Some(Running { shutdown, mut task }) = running else {
            return;
        };
        let _ = shutdown.send(());
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Inner {
    fn app_claims(&self, audience: &str, exp: u64) -> TokenClaims {
        TokenClaims {
            aud: audience.to_string(),
            exp,
            roles: vec![SEND_AS_ROLE.to_string()],
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

    let scripted = {
        let mut state = lock(&idp.state);
        state.requests.push(TokenRequest {
            grant_type: grant_type.clone().unwrap_or_default(),
            path: uri.path().to_string(),
            at: Instant::now(),
        });
        state.scripted.pop_front()
    };
    tracing::debug!(%tenant, grant_type = ?grant_type, "token request");
    if let Some(reply) = scripted {
        return reply.into_response();
    }

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
    let result = match grant_type.as_str() {
        "client_credentials" => client_credentials(&idp, &form, &headers),
        other => Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{other}'."),
        )),
    };
    match result {
        Ok(reply) => reply.into_response(),
        Err(error) => error.into_response(),
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
}

impl IntoResponse for Issued {
    fn into_response(self) -> Response {
        let body = json!({
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "ext_expires_in": self.lifetime,
            "access_token": self.token,
        });
        (StatusCode::OK, no_store(), Json(body)).into_response()
    }
}

/// `grant_type=client_credentials` with a client secret (app-only token).
fn client_credentials(idp: &Inner, form: &Form, headers: &HeaderMap) -> Result<Issued, AadError> {
    // The secret may come in the body or as HTTP Basic auth; Entra ID
    // accepts both (RFC 6749 §2.3.1).
    let basic = basic_credentials(headers);
    let client_id = form
        .get("client_id")
        .map(str::to_string)
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()))
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
    let secret = form
        .get("client_secret")
        .map(str::to_string)
        .or_else(|| basic.map(|(_, secret)| secret))
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
    let scope = form
        .get("scope")
        .ok_or_else(|| AadError::missing("scope"))?;
    if scope != EXCHANGE_SCOPE {
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
    let lifetime = lock(&idp.state).lifetime;
    let exp = unix_now().saturating_add(lifetime);
    let token = idp.mint.mint(idp.app_claims(EXCHANGE_AUDIENCE, exp));
    Ok(Issued { lifetime, token })
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
