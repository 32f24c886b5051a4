//! The fake Microsoft Graph mail API (`https://graph.microsoft.com`), on
//! loopback over plain HTTP.
//!
//! Serves what a relay uses to send as a mailbox: `sendMail` with base64
//! MIME, drafts from MIME, `PATCH` of a draft's recipients, small
//! attachments, upload sessions and their `PUT` ranges, sending and deleting
//! a draft, and listing the drafts whose MIME carried an `X-` header with a
//! given value (the one `$filter` form [`INTERNET_HEADER_FILTER`] documents). Like Graph, it takes recipients from the MIME `To:`/`Cc:`/`Bcc:`
//! fields (never from an envelope), refuses request bodies over 4 MiB with
//! 413 and puts a `request-id` header on every reply. Bearer tokens must come
//! from the [`IdentityPlatform`], be for `https://graph.microsoft.com` and
//! carry `Mail.Send`; drafts also need `Mail.ReadWrite`.
//!
//! It records every request (with start and end time, so tests can check
//! concurrency and pacing) and every message sent, and can be scripted to
//! fail: [`GraphServer::push_fault`], [`GraphServer::forbid_mailbox`],
//! [`GraphServer::set_app_permissions`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::Server;
use crate::identity::IdentityPlatform;
use crate::jwt::TokenRejection;
use crate::util::{form_decode, lock, random_guid};

/// The resource Graph tokens must be issued for (`aud`).
pub const GRAPH_AUDIENCE: &str = "https://graph.microsoft.com";
/// The permission every request needs.
pub const MAIL_SEND: &str = "Mail.Send";
/// The permission drafts need besides [`MAIL_SEND`].
pub const MAIL_READ_WRITE: &str = "Mail.ReadWrite";
/// The largest request body Graph takes.
pub const GRAPH_MAX_REQUEST: usize = 4 * 1024 * 1024;
/// How Exchange names the named property an `X-` header of a MIME message
/// becomes (`PS_INTERNET_HEADERS`), followed by the header's name.
const INTERNET_HEADER_PROPERTY: &str = "String {00020386-0000-0000-C000-000000000046} Name ";
/// Bodies beyond this are cut off by the server itself (still a 413).
const BODY_CEILING: usize = 64 * 1024 * 1024;

/// The kinds of request the fake serves, for targeting faults and reading
/// the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphCall {
    /// `POST /v1.0/users/{mailbox}/sendMail`.
    SendMail,
    /// `GET /v1.0/users/{mailbox}/mailFolders/drafts/messages`, filtered
    /// on one internet header.
    ListDrafts,
    /// `POST /v1.0/users/{mailbox}/messages`.
    CreateDraft,
    /// `PATCH /v1.0/users/{mailbox}/messages/{id}`.
    UpdateDraft,
    /// `DELETE /v1.0/users/{mailbox}/messages/{id}`.
    DeleteDraft,
    /// `POST …/messages/{id}/attachments`.
    AddAttachment,
    /// `POST …/messages/{id}/attachments/createUploadSession`.
    CreateUploadSession,
    /// `PUT` to an upload URL.
    Upload,
    /// `POST …/messages/{id}/send`.
    SendDraft,
}

impl GraphCall {
    fn needs_drafts(self) -> bool {
        !matches!(
            self,
            GraphCall::SendMail | GraphCall::SendDraft | GraphCall::Upload
        )
    }
}

/// A scripted reply, given instead of serving a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphFault {
    /// The kind of request it is for; `None` takes the next request of any kind.
    pub call: Option<GraphCall>,
    /// HTTP status, e.g. 429.
    pub status: u16,
    /// Graph's `error.code`, e.g. `ApplicationThrottled`.
    pub code: String,
    /// Graph's `error.message`.
    pub message: String,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
}

impl GraphFault {
    /// A fault for the next request of any kind.
    pub fn new(status: u16, code: &str, message: &str) -> Self {
        GraphFault {
            call: None,
            status,
            code: code.to_string(),
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// Only for the next request of this kind.
    pub fn on(mut self, call: GraphCall) -> Self {
        self.call = Some(call);
        self
    }

    /// With a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

/// An attachment of a sent message that was added to its draft through the
/// API (a small `fileAttachment` or an upload session); attachments that
/// stayed inside the MIME are in [`GraphMessage::mime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphAttachment {
    /// File name.
    pub name: String,
    /// MIME type as given.
    pub content_type: String,
    /// The decoded content.
    pub content: Vec<u8>,
    /// `contentId`, for inline parts.
    pub content_id: Option<String>,
    /// Whether it was marked inline.
    pub inline: bool,
}

/// A message Graph accepted for sending (202).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphMessage {
    /// The mailbox it was sent as (from the URL, lowercased).
    pub mailbox: String,
    /// `toRecipients` (addresses as given).
    pub to: Vec<String>,
    /// `ccRecipients`.
    pub cc: Vec<String>,
    /// `bccRecipients`.
    pub bcc: Vec<String>,
    /// The MIME it was sent with, or its draft created from.
    pub mime: Vec<u8>,
    /// Attachments added to the draft.
    pub attachments: Vec<GraphAttachment>,
    /// Whether it went through a draft rather than `sendMail`.
    pub via_draft: bool,
}

impl GraphMessage {
    /// Every recipient, lowercased and sorted: who Graph delivers to.
    pub fn recipients(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|a| a.to_ascii_lowercase())
            .collect();
        all.sort();
        all
    }
}

/// One request the fake served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphRequest {
    /// What it was, if the path is one the fake knows.
    pub call: Option<GraphCall>,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Reply status.
    pub status: u16,
    /// Request body size (`Content-Length`).
    pub size: usize,
    /// Whether it carried an `Authorization` header.
    pub authorization: bool,
    /// When it arrived.
    pub start: Instant,
    /// When the reply was ready.
    pub end: Instant,
}

/// A fake Microsoft Graph serving on `127.0.0.1`. A cheap handle: clones
/// share the same server and records.
#[derive(Debug, Clone)]
pub struct GraphServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    idp: IdentityPlatform,
    state: Mutex<Record>,
    sent_count: watch::Sender<usize>,
    server: Server,
}

#[derive(Debug)]
struct Record {
    app_permissions: Vec<String>,
    forbidden: HashSet<String>,
    faults: VecDeque<GraphFault>,
    drafts: HashMap<String, Draft>,
    uploads: HashMap<String, Upload>,
    sent: Vec<GraphMessage>,
    deleted_drafts: usize,
    requests: Vec<GraphRequest>,
    live: usize,
    peak: usize,
    reply_delay: Option<Duration>,
}

#[derive(Debug)]
struct Draft {
    message: GraphMessage,
    uploads_open: usize,
}

#[derive(Debug)]
struct Upload {
    draft: String,
    attachment: GraphAttachment,
    size: usize,
}

/// A Graph error reply.
struct GraphReply {
    status: StatusCode,
    code: String,
    message: String,
    retry_after: Option<u64>,
}

impl GraphReply {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        GraphReply {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    fn not_found() -> Self {
        GraphReply::new(
            StatusCode::NOT_FOUND,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        )
    }

    fn access_denied() -> Self {
        GraphReply::new(
            StatusCode::FORBIDDEN,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        )
    }
}

impl IntoResponse for GraphReply {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "innerError": {"request-id": random_guid()},
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type Served = Result<Response, GraphReply>;

impl GraphServer {
    /// Starts the fake on an ephemeral port of `127.0.0.1`, trusting tokens
    /// from `idp`.
    pub async fn start(idp: IdentityPlatform) -> std::io::Result<GraphServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let inner = Arc::new(Inner {
            addr: listener.local_addr()?,
            idp,
            state: Mutex::new(Record {
                app_permissions: vec![MAIL_SEND.to_string(), MAIL_READ_WRITE.to_string()],
                forbidden: HashSet::new(),
                faults: VecDeque::new(),
                drafts: HashMap::new(),
                uploads: HashMap::new(),
                sent: Vec::new(),
                deleted_drafts: 0,
                requests: Vec::new(),
                live: 0,
                peak: 0,
                reply_delay: None,
            }),
            sent_count: watch::Sender::new(0),
            server: Server::default(),
        });
        let app = Router::new()
            .fallback(serve)
            .layer(middleware::from_fn_with_state(
                inner.clone(),
                record_request,
            ))
            .layer(DefaultBodyLimit::max(BODY_CEILING))
            .with_state(inner.clone());
        inner.server.start(listener, app, "fake graph");
        tracing::debug!(addr = %inner.addr, "fake graph listening");
        Ok(GraphServer { inner })
    }

    /// The base URL to use as the Graph endpoint, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The Graph application permissions the app holds with admin consent
    /// (default `Mail.Send` and `Mail.ReadWrite`), for app-only tokens: a
    /// token whose `roles` name `Mail.*` permissions gets those of them that
    /// are granted here; one whose `roles` name none (the identity platform's
    /// Exchange roles) gets all granted here. Delegated tokens are judged by
    /// their `scp` alone.
    pub fn set_app_permissions(&self, permissions: &[&str]) {
        lock(&self.inner.state).app_permissions =
            permissions.iter().map(|p| p.to_string()).collect();
    }

    /// Puts a mailbox out of the app's scope: every request for it gets 403
    /// `ErrorAccessDenied` (as with RBAC for Applications or an
    /// ApplicationAccessPolicy that leaves it out).
    pub fn forbid_mailbox(&self, mailbox: &str) {
        lock(&self.inner.state)
            .forbidden
            .insert(mailbox.to_ascii_lowercase());
    }

    /// Queues a scripted reply; faults are used in order, each by the first
    /// request it matches (after the token check).
    pub fn push_fault(&self, fault: GraphFault) {
        lock(&self.inner.state).faults.push_back(fault);
    }

    /// Holds every reply this long (so concurrent requests overlap).
    pub fn set_reply_delay(&self, delay: Option<Duration>) {
        lock(&self.inner.state).reply_delay = delay;
    }

    /// Messages accepted for sending so far, in order.
    pub fn messages(&self) -> Vec<GraphMessage> {
        lock(&self.inner.state).sent.clone()
    }

    /// Waits until at least `n` messages were sent or `timeout` passes, then
    /// returns the messages sent so far (possibly fewer than `n`).
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<GraphMessage> {
        let mut sent = self.inner.sent_count.subscribe();
        let _ = tokio::time::timeout(timeout, sent.wait_for(|count| *count >= n)).await;
        self.messages()
    }

    /// Drafts that exist now (created, neither sent nor deleted).
    pub fn drafts(&self) -> usize {
        lock(&self.inner.state).drafts.len()
    }

    /// Drafts deleted so far.
    pub fn deleted_drafts(&self) -> usize {
        lock(&self.inner.state).deleted_drafts
    }

    /// Every request served so far, in the order they finished.
    pub fn requests(&self) -> Vec<GraphRequest> {
        lock(&self.inner.state).requests.clone()
    }

    /// The most requests that were in progress at the same time.
    pub fn peak_concurrency(&self) -> usize {
        lock(&self.inner.state).peak
    }

    /// Stops serving; records are kept. Idempotent.
    pub async fn stop(&self) {
        self.inner.server.stop().await;
    }
}

/// Counts a request in flight for the peak while it lives.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn enter(inner: &Arc<Inner>) -> Self {
        let mut state = lock(&inner.state);
        state.live += 1;
        state.peak = state.peak.max(state.live);
        InFlight(inner.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0.state).live -= 1;
    }
}

/// Logs each request with its timing, and stamps a `request-id` on the reply.
async fn record_request(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let in_flight = InFlight::enter(&inner);
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let size = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let authorization = request.headers().contains_key(header::AUTHORIZATION);
    let delay = lock(&inner.state).reply_delay;
    let mut response = next.run(request).await;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    drop(in_flight);
    if let Ok(id) = HeaderValue::from_str(&random_guid()) {
        response.headers_mut().insert("request-id", id);
    }
    lock(&inner.state).requests.push(GraphRequest {
        call: route(&method, &segments(&path)).map(|(call, _, _)| call),
        method: method.to_string(),
        path,
        status: response.status().as_u16(),
        size,
        authorization,
        start,
        end: Instant::now(),
    });
    response
}

/// The path's segments, percent-decoded (`+` kept: it is common in addresses).
fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(|s| form_decode(s.replace('+', "%2B").as_bytes()))
        .collect()
}

/// The call, mailbox and draft (or upload) id a request is for.
fn route(method: &Method, segments: &[String]) -> Option<(GraphCall, String, String)> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let call = match (method.as_str(), s.as_slice()) {
        ("PUT", ["upload", id]) => return Some((GraphCall::Upload, String::new(), id.to_string())),
        ("POST", ["v1.0", "users", _, "sendMail"]) => GraphCall::SendMail,
        ("GET", ["v1.0", "users", _, "mailFolders", "drafts", "messages"]) => GraphCall::ListDrafts,
        ("POST", ["v1.0", "users", _, "messages"]) => GraphCall::CreateDraft,
        ("PATCH", ["v1.0", "users", _, "messages", _]) => GraphCall::UpdateDraft,
        ("DELETE", ["v1.0", "users", _, "messages", _]) => GraphCall::DeleteDraft,
        ("POST", ["v1.0", "users", _, "messages", _, "attachments"]) => GraphCall::AddAttachment,
        ("POST", ["v1.0", "users", _, "messages", _, "attachments", "createUploadSession"]) => {
            GraphCall::CreateUploadSession
        }
        ("POST", ["v1.0", "users", _, "messages", _, "send"]) => GraphCall::SendDraft,
        _ => return None,
    };
    let mailbox = s[2].to_ascii_lowercase();
    let id = match call {
        GraphCall::ListDrafts => String::new(),
        _ => s.get(4).map(|id| id.to_string()).unwrap_or_default(),
    };
    Some((call, mailbox, id))
}

async fn serve(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve_call(&inner, &method, &uri, &headers, body).unwrap_or_else(IntoResponse::into_response)
}

fn serve_call(
    inner: &Inner,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Served {
    let path = uri.path();
    if body.len() > GRAPH_MAX_REQUEST {
        return Err(GraphReply::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ErrorRequestEntityTooLarge",
            "The request is larger than 4 MB.",
        ));
    }
    let Some((call, mailbox, id)) = route(method, &segments(path)) else {
        return Err(GraphReply::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("Resource not found for the segment '{path}'."),
        ));
    };
    if call == GraphCall::Upload {
        // The upload URL is pre-authorised; Graph refuses a bearer token there.
        if headers.contains_key(header::AUTHORIZATION) {
            return Err(GraphReply::new(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "An Authorization header must not be sent to an upload URL.",
            ));
        }
        take_fault(inner, call)?;
        return upload(inner, &id, headers, &body);
    }
    let permissions = judge(inner, headers)?;
    take_fault(inner, call)?;
    if lock(&inner.state).forbidden.contains(&mailbox) {
        return Err(GraphReply::access_denied());
    }
    if call.needs_drafts() && !permissions.iter().any(|p| p == MAIL_READ_WRITE) {
        return Err(GraphReply::access_denied());
    }
    match call {
        GraphCall::ListDrafts => {
            let (name, value) = header_filter(uri.query().unwrap_or_default())?;
            let state = lock(&inner.state);
            let found: Vec<Value> = state
                .drafts
                .iter()
                .filter(|(_, d)| d.message.mailbox == mailbox)
                .filter(|(_, d)| {
                    header_fields(&d.message.mime)
                        .into_iter()
                        .find(|(n, _)| *n == name)
                        .is_some_and(|(_, v)| v == value)
                })
                .map(|(id, _)| json!({"id": id}))
                .collect();
            Ok((StatusCode::OK, Json(json!({"value": found}))).into_response())
        }
        GraphCall::SendMail => {
            let message = from_mime(&mailbox, headers, &body, false)?;
            if message.recipients().is_empty() {
                return Err(no_recipients());
            }
            record_sent(inner, message);
            Ok(StatusCode::ACCEPTED.into_response())
        }
        GraphCall::CreateDraft => {
            let message = from_mime(&mailbox, headers, &body, true)?;
            let id = format!("AAMk{}", random_guid().replace('-', ""));
            lock(&inner.state).drafts.insert(
                id.clone(),
                Draft {
                    message,
                    uploads_open: 0,
                },
            );
            Ok((
                StatusCode::CREATED,
                Json(json!({"id": id, "isDraft": true})),
            )
                .into_response())
        }
        GraphCall::UpdateDraft => {
            let patch: Value = json_body(&body)?;
            let mut state = lock(&inner.state);
            let draft = draft_of(&mut state, &id, &mailbox)?;
            for (key, list) in [
                ("toRecipients", &mut draft.message.to),
                ("ccRecipients", &mut draft.message.cc),
                ("bccRecipients", &mut draft.message.bcc),
            ] {
                if let Some(entries) = patch.get(key).and_then(Value::as_array) {
                    *list = entries
                        .iter()
                        .filter_map(|r| r.pointer("/emailAddress/address")?.as_str())
                        .map(str::to_string)
                        .collect();
                }
            }
            Ok((StatusCode::OK, Json(json!({"id": id}))).into_response())
        }
        GraphCall::DeleteDraft => {
            let mut state = lock(&inner.state);
            draft_of(&mut state, &id, &mailbox)?;
            state.drafts.remove(&id);
            state.uploads.retain(|_, upload| upload.draft != id);
            state.deleted_drafts += 1;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        GraphCall::AddAttachment => {
            let item: Value = json_body(&body)?;
            let content = item
                .get("contentBytes")
                .and_then(Value::as_str)
                .and_then(|b| STANDARD.decode(b).ok())
                .ok_or_else(|| bad_request("contentBytes is missing or not base64."))?;
            let attachment = attachment_of(&item, content);
            let mut state = lock(&inner.state);
            draft_of(&mut state, &id, &mailbox)?
                .message
                .attachments
                .push(attachment);
            Ok((StatusCode::CREATED, Json(json!({"id": random_guid()}))).into_response())
        }
        GraphCall::CreateUploadSession => {
            let request: Value = json_body(&body)?;
            let item = request
                .get("AttachmentItem")
                .ok_or_else(|| bad_request("AttachmentItem is missing."))?;
            let size = item
                .get("size")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad_request("AttachmentItem.size is missing."))?;
            let upload_id = random_guid().replace('-', "");
            let mut state = lock(&inner.state);
            draft_of(&mut state, &id, &mailbox)?.uploads_open += 1;
            state.uploads.insert(
                upload_id.clone(),
                Upload {
                    draft: id,
                    attachment: attachment_of(item, Vec::new()),
                    size: usize::try_from(size).unwrap_or(usize::MAX),
                },
            );
            let url = format!("http://{}/upload/{upload_id}", inner.addr);
            Ok((
                StatusCode::CREATED,
                Json(json!({
                    "uploadUrl": url,
                    "expirationDateTime": "2099-01-01T00:00:00Z",
                    "nextExpectedRanges": ["0-"],
                })),
            )
                .into_response())
        }
        GraphCall::SendDraft => {
            let mut state = lock(&inner.state);
            let draft = draft_of(&mut state, &id, &mailbox)?;
            if draft.uploads_open > 0 {
                return Err(bad_request("An attachment upload is not complete."));
            }
            if draft.message.recipients().is_empty() {
                return Err(no_recipients());
            }
            let Some(draft) = state.drafts.remove(&id) else {
                return Err(GraphReply::not_found());
            };
            drop(state);
            record_sent(inner, draft.message);
            Ok(StatusCode::ACCEPTED.into_response())
        }
        GraphCall::Upload => Err(GraphReply::not_found()),
    }
}

/// The permissions of a valid Graph token, or the 401/403 Graph gives.
fn judge(inner: &Inner, headers: &HeaderMap) -> Result<Vec<String>, GraphReply> {
    let invalid = |why: &str| {
        GraphReply::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            format!("Access token validation failure: {why}."),
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| invalid("no bearer token"))?;
    let claims = inner
        .idp
        .check_graph_token(token)
        .map_err(|rejection| match rejection {
            TokenRejection::WrongAudience => invalid(&format!("audience is not {GRAPH_AUDIENCE}")),
            other => invalid(&other.to_string()),
        })?;
    let granted = lock(&inner.state).app_permissions.clone();
    let permissions: Vec<String> = if let Some(scp) = &claims.scp {
        scp.split_whitespace().map(str::to_string).collect()
    } else if claims.roles.iter().any(|r| r.starts_with("Mail.")) {
        claims
            .roles
            .into_iter()
            .filter(|r| granted.contains(r))
            .collect()
    } else {
        granted
    };
    if !permissions.iter().any(|p| p == MAIL_SEND) {
        return Err(GraphReply::access_denied());
    }
    Ok(permissions)
}

/// The (lowercased) header name and value of the one `$filter` form the
/// drafts listing takes, `singleValueExtendedProperties/any(ep: ep/id eq
/// '{INTERNET_HEADER_PROPERTY}{name}' and ep/value eq '{value}')`; any other
/// gets Graph's 400.
fn header_filter(query: &str) -> Result<(String, String), GraphReply> {
    let filter = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| form_decode(key.as_bytes()) == "$filter")
        .map(|(_, value)| form_decode(value.as_bytes()))
        .unwrap_or_default();
    filter
        .strip_prefix("singleValueExtendedProperties/any(ep: ep/id eq '")
        .and_then(|rest| rest.strip_suffix("')"))
        .and_then(|rest| rest.split_once("' and ep/value eq '"))
        .and_then(|(property, value)| {
            let name = property.strip_prefix(INTERNET_HEADER_PROPERTY)?;
            Some((name.to_ascii_lowercase(), value.to_string()))
        })
        .ok_or_else(|| {
            GraphReply::new(
                StatusCode::BAD_REQUEST,
                "ErrorInvalidUrlQueryFilter",
                format!("The stand-in does not take the filter {filter:?}."),
            )
        })
}

fn take_fault(inner: &Inner, call: GraphCall) -> Result<(), GraphReply> {
    let mut state = lock(&inner.state);
    let Some(at) = state
        .faults
        .iter()
        .position(|f| f.call.is_none_or(|c| c == call))
    else {
        return Ok(());
    };
    let Some(fault) = state.faults.remove(at) else {
        return Ok(());
    };
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Err(GraphReply {
        status,
        code: fault.code,
        message: fault.message,
        retry_after: fault.retry_after,
    })
}

fn upload(inner: &Inner, id: &str, headers: &HeaderMap, body: &[u8]) -> Served {
    let mut state = lock(&inner.state);
    let Some(session) = state.uploads.get_mut(id) else {
        return Err(GraphReply::not_found());
    };
    let have = session.attachment.content.len();
    let range = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let expected = parse_range(&range)
        .filter(|&(first, last, total)| {
            first == have && last + 1 - first == body.len() && total == session.size
        })
        .is_some();
    if !expected {
        return Err(GraphReply::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            format!(
                "Bad Content-Range {range:?}; expected bytes {have}-…/{}",
                session.size
            ),
        ));
    }
    session.attachment.content.extend_from_slice(body);
    let have = session.attachment.content.len();
    if have < session.size {
        return Ok((
            StatusCode::OK,
            Json(json!({"expirationDateTime": "2099-01-01T00:00:00Z", "nextExpectedRanges": [format!("{have}-")]})),
        )
            .into_response());
    }
    let Some(done) = state.uploads.remove(id) else {
        return Err(GraphReply::not_found());
    };
    if let Some(draft) = state.drafts.get_mut(&done.draft) {
        draft.uploads_open -= 1;
        draft.message.attachments.push(done.attachment);
    }
    Ok(StatusCode::CREATED.into_response())
}

/// `bytes first-last/total`.
fn parse_range(text: &str) -> Option<(usize, usize, usize)> {
    let spec = text.strip_prefix("bytes ")?;
    let (span, total) = spec.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last, total) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
    (first <= last && last < total).then_some((first, last, total))
}

fn draft_of<'a>(
    state: &'a mut Record,
    id: &str,
    mailbox: &str,
) -> Result<&'a mut Draft, GraphReply> {
    state
        .drafts
        .get_mut(id)
        .filter(|d| d.message.mailbox == mailbox)
        .ok_or_else(GraphReply::not_found)
}

fn record_sent(inner: &Inner, message: GraphMessage) {
    let count = {
        let mut state = lock(&inner.state);
        state.sent.push(message);
        state.sent.len()
    };
    inner.sent_count.send_replace(count);
}

fn bad_request(message: &str) -> GraphReply {
    GraphReply::new(StatusCode::BAD_REQUEST, "ErrorInvalidRequest", message)
}

fn no_recipients() -> GraphReply {
    GraphReply::new(
        StatusCode::BAD_REQUEST,
        "ErrorInvalidRecipients",
        "At least one recipient is not valid.",
    )
}

fn json_body(body: &[u8]) -> Result<Value, GraphReply> {
    serde_json::from_slice(body).map_err(|_| bad_request("The request body is not valid JSON."))
}

fn attachment_of(item: &Value, content: Vec<u8>) -> GraphAttachment {
    let text = |key: &str| item.get(key).and_then(Value::as_str).map(str::to_string);
    GraphAttachment {
        name: text("name").unwrap_or_default(),
        content_type: text("contentType").unwrap_or_default(),
        content,
        content_id: text("contentId"),
        inline: item
            .get("isInline")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

/// A message from base64 MIME (`Content-Type: text/plain`), its recipients
/// from the header.
fn from_mime(
    mailbox: &str,
    headers: &HeaderMap,
    body: &[u8],
    via_draft: bool,
) -> Result<GraphMessage, GraphReply> {
    let text_plain = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !text_plain {
        return Err(GraphReply::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "RequestBodyRead",
            "MIME content must be sent as text/plain (base64).",
        ));
    }
    let mime = STANDARD.decode(body).map_err(|_| {
        GraphReply::new(
            StatusCode::BAD_REQUEST,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        )
    })?;
    let header = header_fields(&mime);
    Ok(GraphMessage {
        mailbox: mailbox.to_string(),
        to: addresses(&header, "to"),
        cc: addresses(&header, "cc"),
        bcc: addresses(&header, "bcc"),
        mime,
        attachments: Vec::new(),
        via_draft,
    })
}

/// The top-level header fields, unfolded: (lowercased name, value).
fn header_fields(mime: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(mime);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    fields
}

/// The addresses of every `name` field: `<addr>` where given, else the bare
/// word with an `@`; group names, display names and comments skipped.
fn addresses(fields: &[(String, String)], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, value) in fields.iter().filter(|(n, _)| n == name) {
        let mut item = String::new();
        let mut quoted = false;
        let mut angle = false;
        let mut comment = 0u32;
        for c in value.chars().chain([',']) {
            match c {
                '(' if !quoted => comment += 1,
                ')' if !quoted && comment > 0 => comment -= 1,
                _ if comment > 0 => {}
                '"' => quoted = !quoted,
                '<' if !quoted => {
                    angle = true;
                    item.clear();
                }
                '>' if !quoted && angle => {
                    angle = false;
                    out.push(item.trim().to_string());
                    item.clear();
                }
                ',' | ';' if !quoted && !angle => {
                    let bare = item.rsplit(':').next().unwrap_or_default().trim();
                    if bare.contains('@') && !bare.contains(' ') {
                        out.push(bare.to_string());
                    }
                    item.clear();
                }
                c if !quoted => item.push(c),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_addresses() {
        let fields = header_fields(
            b"To: \"Doe, J\" <j@x.com>, k@y.com\r\nCc: team: a@b.c, <d@e.f>;\r\n\
              Bcc: undisclosed-recipients:;\r\nTo: m@n.o\r\n (comment)\r\n\r\nTo: body@x.y\r\n",
        );
        assert_eq!(addresses(&fields, "to"), ["j@x.com", "k@y.com", "m@n.o"]);
        assert_eq!(addresses(&fields, "cc"), ["a@b.c", "d@e.f"]);
        assert!(addresses(&fields, "bcc").is_empty());
    }

    /// One HTTP/1.1 request on its own connection: (status, body).
    async fn http(server: &GraphServer, head: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(server.inner.addr)
            .await
            .expect("connect");
        let request = format!(
            "{head}\r\nHost: graph\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        // The server may answer (413) before reading everything.
        let _ = stream.write_all(body).await;
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply).await;
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let status = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, reply)
    }

    #[tokio::test]
    async fn judges_requests_like_graph() {
        let idp = IdentityPlatform::start().await.expect("idp");
        let graph = GraphServer::start(idp.clone()).await.expect("graph");
        let good = idp.mint_token(GRAPH_AUDIENCE, 60);
        let exchange = idp.mint_token("https://outlook.office365.com", 60);
        let send =
            "POST /v1.0/users/relay@contoso.com/sendMail HTTP/1.1\r\nContent-Type: text/plain";
        let mime = STANDARD.encode("To: a@b.c\r\n\r\nhi\r\n");

        let (status, reply) = http(
            &graph,
            &format!("{send}\r\nAuthorization: Bearer {exchange}"),
            mime.as_bytes(),
        )
        .await;
        assert_eq!(status, 401, "{reply}");
        assert!(reply.contains("InvalidAuthenticationToken"));
        let (status, _) = http(&graph, send, mime.as_bytes()).await;
        assert_eq!(status, 401);

        let big = vec![b'A'; GRAPH_MAX_REQUEST + 4];
        let (status, reply) = http(
            &graph,
            &format!("{send}\r\nAuthorization: Bearer {good}"),
            &big,
        )
        .await;
        assert_eq!(status, 413, "{reply}");

        let (status, reply) = http(
            &graph,
            &format!("{send}\r\nAuthorization: Bearer {good}"),
            mime.as_bytes(),
        )
        .await;
        assert_eq!(status, 202, "{reply}");
        assert!(reply.to_ascii_lowercase().contains("request-id:"));
        assert_eq!(graph.messages()[0].recipients(), ["a@b.c"]);

        graph.set_app_permissions(&[]);
        let (status, reply) = http(
            &graph,
            &format!("{send}\r\nAuthorization: Bearer {good}"),
            mime.as_bytes(),
        )
        .await;
        assert_eq!(status, 403, "{reply}");

        let upload = format!(
            "PUT /upload/x HTTP/1.1\r\nAuthorization: Bearer {good}\r\nContent-Range: bytes 0-0/1"
        );
        let (status, _) = http(&graph, &upload, b"x").await;
        assert_eq!(status, 401, "a bearer token on an upload URL is refused");
        assert_eq!(graph.requests().len(), 6);
        graph.stop().await;
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes 0-9/20"), Some((0, 9, 20)));
        assert_eq!(parse_range("bytes 10-19/20"), Some((10, 19, 20)));
        assert_eq!(parse_range("bytes 10-20/20"), None);
        assert_eq!(parse_range("0-9/20"), None);
    }
}
