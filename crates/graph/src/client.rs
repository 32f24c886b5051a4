//! The HTTP side: one reqwest client for every mailbox, a gate per mailbox
//! (concurrency and Retry-After), and the two routes of a send.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::write::EncoderStringWriter;
use base64::Engine as _;
use reqwest::header::{HeaderMap, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::{Failure, GraphError, Step};
use crate::mime::{self, Detached, Field, HeaderRecipients};
use crate::settings::Settings;

/// No request body may be larger (Graph answers 413).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Attachments above this go through an upload session; a smaller one fits a
/// `POST …/attachments` as base64 JSON.
pub const UPLOAD_SESSION_ABOVE: usize = 3_000_000;
/// Upload ranges: the largest multiple of 320 KiB (the granularity Graph's
/// upload sessions expect) within [`MAX_REQUEST`]; also a multiple of 3, so
/// base64 decodes into it in whole groups.
pub const UPLOAD_CHUNK: usize = 12 * 320 * 1024;
/// Room for the JSON around an attachment's base64.
const ATTACHMENT_JSON_ROOM: usize = 4096;
/// The header a draft carries naming the message it is for (the caller's
/// key, the queue id), so that the next attempt finds a draft an interrupted
/// one left behind and deletes it instead of leaving it, or sending twice.
pub const DRAFT_TAG_HEADER: &str = "X-Relay-Queue-Id";
/// [`DRAFT_TAG_HEADER`] as Exchange stores it: reading MIME, it makes each
/// such header a string named property in the internet headers property set
/// (`PS_INTERNET_HEADERS`, MS-OXCMAIL section 2.2.3.2.29), which `$filter` on
/// `singleValueExtendedProperties` can match.
const DRAFT_TAG_PROPERTY: &str =
    "String {00020386-0000-0000-C000-000000000046} Name X-Relay-Queue-Id";
/// Most leftover drafts deleted per attempt: one interrupted attempt leaves
/// at most one.
const LEFTOVERS_LISTED: &str = "10";

/// A message Graph accepted (202): queued for sending, not yet delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `request-id` of the request that sent it.
    pub request_id: Option<String>,
    /// Whether it went as a draft (recipients rewritten or too large for `sendMail`).
    pub via_draft: bool,
}

/// A Microsoft Graph mail-sending client, shared by every mailbox and worker.
#[derive(Debug)]
pub struct GraphClient {
    http: reqwest::Client,
    settings: Settings,
    mailboxes: Mutex<HashMap<String, Arc<Gate>>>,
}

/// Per mailbox: requests in flight and the pause Graph asked for.
#[derive(Debug)]
struct Gate {
    permits: Semaphore,
    paused_until: Mutex<Option<Instant>>,
}

/// One answer, its body read up to [`relay_http::REPLY_LIMIT`]: a huge
/// error page must not fill memory or logs.
struct Reply {
    request_id: Option<String>,
    body: Vec<u8>,
}

/// One send in progress, for one mailbox.
struct Sending<'a> {
    client: &'a GraphClient,
    gate: Arc<Gate>,
    token: &'a str,
    mailbox: &'a str,
    key: &'a str,
}

impl GraphClient {
    /// A client with its own connection pool.
    pub fn new(settings: Settings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .build()?;
        Ok(GraphClient {
            http,
            settings,
            mailboxes: Mutex::new(HashMap::new()),
        })
    }

    /// A client with `settings` in place of `previous` (a reload): the
    /// pauses Graph asked `previous` for still hold, so no request goes to
    /// a throttled mailbox before its `Retry-After` has passed.
    pub fn replacing(previous: &GraphClient, settings: Settings) -> Result<Self, reqwest::Error> {
        let client = GraphClient::new(settings)?;
        let now = Instant::now();
        let paused: Vec<(String, Instant)> = previous
            .mailboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(mailbox, gate)| Some((mailbox.clone(), now + gate.paused_for(now)?)))
            .collect();
        for (mailbox, until) in paused {
            client.gate(&mailbox).pause(until);
        }
        Ok(client)
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Sends `mime` as `mailbox` to exactly `recipients` (the envelope's),
    /// with `token` as the bearer token (never logged). `key` names the
    /// message across attempts (the queue id: letters, digits, `-`, `.`,
    /// `_`).
    ///
    /// When the header recipients are the envelope's and the message fits
    /// one request, this is one `sendMail`. Otherwise a draft tagged with
    /// `key` is created from the MIME (large attachments taken out and added
    /// separately), its recipients set to the envelope's, and sent; a draft
    /// whose send does not happen is deleted, and one that an interrupted
    /// attempt left behind is deleted before the new one is made.
    pub async fn send(
        &self,
        token: &str,
        mailbox: &str,
        key: &str,
        recipients: &[String],
        mime: &[u8],
    ) -> Result<Accepted, GraphError> {
        if recipients.is_empty() {
            return Err(GraphError::local(Step::Prepare, "no envelope recipients"));
        }
        let key_usable = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !key_usable {
            return Err(GraphError::local(
                Step::Prepare,
                "the message key is not usable as a draft tag",
            ));
        }
        let header = HeaderRecipients::parse(mime)
            .ok_or_else(|| GraphError::local(Step::Prepare, "the message has no header"))?;
        let exact = header.matches(recipients);
        let sending = Sending {
            client: self,
            gate: self.gate(mailbox),
            token,
            mailbox,
            key,
        };
        let fits = mime::base64_len(mime.len()) <= MAX_REQUEST;
        if exact && fits {
            return sending.send_mail(mime).await;
        }
        let patch = (!exact).then(|| recipients_patch(&header, recipients));
        let tag_len = draft_tag(key).len();
        if mime::base64_len(tag_len + mime.len()) <= MAX_REQUEST {
            return sending
                .send_draft(mime, std::slice::from_ref(&(0..mime.len())), &[], patch)
                .await;
        }
        let split =
            mime::split(mime, MAX_REQUEST - mime::base64_len(tag_len)).ok_or_else(|| {
                GraphError::local(
                    Step::Prepare,
                    "the message is over 4 MB even without its attachments: Graph cannot take it",
                )
            })?;
        sending
            .send_draft(mime, &split.kept, &split.detached, patch)
            .await
    }

    fn gate(&self, mailbox: &str) -> Arc<Gate> {
        let mut mailboxes = self
            .mailboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        mailboxes
            .entry(mailbox.to_ascii_lowercase())
            .or_insert_with(|| {
                Arc::new(Gate {
                    permits: Semaphore::new(self.settings.max_requests.get()),
                    paused_until: Mutex::new(None),
                })
            })
            .clone()
    }
}

impl Gate {
    fn paused_for(&self, now: Instant) -> Option<Duration> {
        let until = *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.filter(|&u| u > now).map(|u| u - now)
    }

    fn pause(&self, until: Instant) {
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *paused = Some(paused.map_or(until, |p| p.max(until)));
    }
}

impl Sending<'_> {
    fn url(&self, rest: &[&str]) -> Url {
        self.client.settings.endpoint.user_url(self.mailbox, rest)
    }

    fn graph(&self, method: Method, rest: &[&str]) -> RequestBuilder {
        self.client
            .http
            .request(method, self.url(rest))
            .bearer_auth(self.token)
    }

    /// Sends one request through the mailbox's gate; anything but 2xx
    /// becomes a classified error.
    async fn call(&self, step: Step, request: RequestBuilder) -> Result<Reply, GraphError> {
        let _permit = self
            .gate
            .permits
            .acquire()
            .await
            .map_err(|_| GraphError::local(Step::Prepare, "the client is shutting down"))?;
        if let Some(wait) = self.gate.paused_for(Instant::now()) {
            return Err(GraphError::paused(step, wait));
        }
        let response = request
            .send()
            .await
            .map_err(|e| GraphError::network(step, e))?;
        let status = response.status();
        let request_id = header_text(response.headers(), "request-id");
        let retry_after = retry_after(response.headers());
        let body = relay_http::read_bounded(response, relay_http::REPLY_LIMIT)
            .await
            .map_err(|e| GraphError::network(step, e))?
            .bytes;
        tracing::debug!(
            mailbox = self.mailbox,
            %step,
            status = status.as_u16(),
            request_id = request_id.as_deref().unwrap_or(""),
            "graph request"
        );
        if status.is_success() {
            return Ok(Reply { request_id, body });
        }
        if let Some(wait) = retry_after {
            self.gate.pause(Instant::now() + wait);
        }
        Err(GraphError::reply(
            step,
            self.mailbox,
            status.as_u16(),
            retry_after,
            request_id,
            &body,
        ))
    }

    async fn send_mail(&self, mime: &[u8]) -> Result<Accepted, GraphError> {
        let request = self
            .graph(Method::POST, &["sendMail"])
            .header(CONTENT_TYPE, "text/plain")
            .body(STANDARD.encode(mime));
        let reply = self.call(Step::SendMail, request).await?;
        Ok(Accepted {
            request_id: reply.request_id,
            via_draft: false,
        })
    }

    /// Draft from `kept` (ranges of `mime`) and the tag, the `detached`
    /// attachments added, recipients patched, then sent; deleted if anything
    /// fails. Drafts of earlier attempts go first.
    async fn send_draft(
        &self,
        mime: &[u8],
        kept: &[std::ops::Range<usize>],
        detached: &[Detached],
        patch: Option<serde_json::Value>,
    ) -> Result<Accepted, GraphError> {
        self.delete_leftovers().await?;
        let mut encoder = EncoderStringWriter::new(&STANDARD);
        // Writing to a String cannot fail.
        let _ = encoder.write_all(draft_tag(self.key).as_bytes());
        for range in kept {
            // Writing to a String cannot fail.
            let _ = encoder.write_all(&mime[range.clone()]);
        }
        let request = self
            .graph(Method::POST, &["messages"])
            .header(CONTENT_TYPE, "text/plain")
            .body(encoder.into_inner());
        let reply = self.call(Step::CreateDraft, request).await?;
        let draft: Created = parse(Step::CreateDraft, &reply)?;
        let result = self.complete_draft(&draft.id, mime, detached, patch).await;
        if result.is_err() {
            self.delete_draft(&draft.id).await;
        }
        result
    }

    async fn complete_draft(
        &self,
        id: &str,
        mime: &[u8],
        detached: &[Detached],
        patch: Option<serde_json::Value>,
    ) -> Result<Accepted, GraphError> {
        for attachment in detached {
            let size = attachment.decoded_len(mime);
            if size > UPLOAD_SESSION_ABOVE
                || mime::base64_len(size) + ATTACHMENT_JSON_ROOM > MAX_REQUEST
            {
                self.upload(id, attachment, mime, size).await?;
                continue;
            }
            let content = attachment
                .decoder(mime, usize::MAX)
                .next_chunk()
                .unwrap_or_default();
            let body = FileAttachment {
                odata_type: "#microsoft.graph.fileAttachment",
                name: &attachment.name,
                content_type: &attachment.content_type,
                content_bytes: STANDARD.encode(&content),
                content_id: attachment.content_id.as_deref(),
                is_inline: attachment.inline,
            };
            drop(content);
            let request = self
                .graph(Method::POST, &["messages", id, "attachments"])
                .json(&body);
            drop(body);
            self.call(Step::AddAttachment, request).await?;
        }
        if let Some(patch) = patch {
            let request = self.graph(Method::PATCH, &["messages", id]).json(&patch);
            self.call(Step::SetRecipients, request).await?;
        }
        let request = self
            .graph(Method::POST, &["messages", id, "send"])
            .header(reqwest::header::CONTENT_LENGTH, "0");
        let reply = self.call(Step::SendDraft, request).await?;
        Ok(Accepted {
            request_id: reply.request_id,
            via_draft: true,
        })
    }

    /// An upload session and `PUT`s of [`UPLOAD_CHUNK`] bytes to its
    /// pre-authorised URL (no bearer token goes there), each piece decoded
    /// only when its turn comes.
    async fn upload(
        &self,
        id: &str,
        attachment: &Detached,
        mime: &[u8],
        size: usize,
    ) -> Result<(), GraphError> {
        let item = UploadItem {
            attachment_type: "file",
            name: &attachment.name,
            size,
            content_type: &attachment.content_type,
            content_id: attachment.content_id.as_deref(),
            is_inline: attachment.inline,
        };
        let request = self
            .graph(
                Method::POST,
                &["messages", id, "attachments", "createUploadSession"],
            )
            .json(&json!({ "AttachmentItem": item }));
        let reply = self.call(Step::CreateUploadSession, request).await?;
        let session: UploadSession = parse(Step::CreateUploadSession, &reply)?;
        let url = Url::parse(&session.upload_url)
            .ok()
            .filter(|u| u.scheme() == "https" || !self.client.settings.endpoint.is_https())
            .ok_or_else(|| {
                GraphError::local(
                    Step::CreateUploadSession,
                    "Graph returned an unusable upload URL",
                )
            })?;
        let mut decoder = attachment.decoder(mime, UPLOAD_CHUNK);
        let mut first = 0;
        while let Some(chunk) = decoder.next_chunk() {
            let last = first + chunk.len() - 1;
            let request = self
                .client
                .http
                .put(url.clone())
                .header(CONTENT_RANGE, format!("bytes {first}-{last}/{size}"))
                .body(chunk);
            self.call(Step::Upload, request).await?;
            first = last + 1;
        }
        Ok(())
    }

    /// Deletes the drafts tagged with this message's key: an attempt that
    /// was interrupted (the relay killed, the host down) left them. They are
    /// never sent (each attempt sends only its own draft), so a failed
    /// delete, or a listing Graph refuses outright, only leaves clutter and
    /// the send goes on. A temporary failure, a refused token or missing
    /// `Mail.ReadWrite` stops the attempt, as creating the draft would fail
    /// alike.
    async fn delete_leftovers(&self) -> Result<(), GraphError> {
        let mut url = self.url(&["mailFolders", "drafts", "messages"]);
        url.query_pairs_mut()
            .append_pair(
                "$filter",
                &format!(
                    "singleValueExtendedProperties/any(ep: ep/id eq '{DRAFT_TAG_PROPERTY}' \
                     and ep/value eq '{}')",
                    self.key
                ),
            )
            .append_pair("$select", "id")
            .append_pair("$top", LEFTOVERS_LISTED);
        let request = self.client.http.get(url).bearer_auth(self.token);
        let reply = match self.call(Step::FindLeftovers, request).await {
            Err(e) if e.failure == Failure::Permanent => {
                tracing::warn!(mailbox = self.mailbox, error = %e, "could not look for drafts an interrupted attempt left behind");
                return Ok(());
            }
            other => other?,
        };
        let found: Listed = parse(Step::FindLeftovers, &reply)?;
        for draft in found.value {
            tracing::info!(
                mailbox = self.mailbox,
                key = self.key,
                "deleting the draft an interrupted attempt left behind"
            );
            self.delete_draft(&draft.id).await;
        }
        Ok(())
    }

    /// Best effort: a draft left behind is never sent (each attempt makes
    /// its own) and the next attempt deletes it, so failing to delete it
    /// now only leaves clutter in Drafts meanwhile.
    async fn delete_draft(&self, id: &str) {
        if self.gate.paused_for(Instant::now()).is_some() {
            tracing::warn!(
                mailbox = self.mailbox,
                "graph draft left in Drafts: the mailbox is throttled"
            );
            return;
        }
        let request = self.graph(Method::DELETE, &["messages", id]);
        if let Err(e) = self.call(Step::DeleteDraft, request).await {
            tracing::warn!(mailbox = self.mailbox, error = %e, "could not delete the unsent graph draft");
        }
    }
}

/// The header line a draft's MIME starts with.
fn draft_tag(key: &str) -> String {
    format!("{DRAFT_TAG_HEADER}: {key}\r\n")
}

/// The PATCH setting the draft's recipients to exactly the envelope's.
fn recipients_patch(header: &HeaderRecipients, recipients: &[String]) -> serde_json::Value {
    let mut fields: [Vec<serde_json::Value>; 3] = Default::default();
    let mut seen = std::collections::HashSet::new();
    for address in recipients {
        if !seen.insert(address.to_ascii_lowercase()) {
            continue;
        }
        let slot = match header.field_of(address) {
            Field::To => 0,
            Field::Cc => 1,
            Field::Bcc => 2,
        };
        fields[slot].push(json!({ "emailAddress": { "address": address } }));
    }
    let [to, cc, bcc] = fields;
    json!({ "toRecipients": to, "ccRecipients": cc, "bccRecipients": bcc })
}

/// `POST …/attachments` body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileAttachment<'a> {
    #[serde(rename = "@odata.type")]
    odata_type: &'static str,
    name: &'a str,
    content_type: &'a str,
    content_bytes: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_id: Option<&'a str>,
    is_inline: bool,
}

/// `AttachmentItem` of `createUploadSession`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UploadItem<'a> {
    attachment_type: &'static str,
    name: &'a str,
    size: usize,
    content_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_id: Option<&'a str>,
    is_inline: bool,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// A `GET` of a message collection with `$select=id`.
#[derive(Deserialize)]
struct Listed {
    value: Vec<Created>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadSession {
    upload_url: String,
}

fn parse<T: for<'de> Deserialize<'de>>(step: Step, reply: &Reply) -> Result<T, GraphError> {
    serde_json::from_slice(&reply.body).map_err(|e| {
        let mut error = GraphError::local(step, format!("unexpected reply from Graph: {e}"));
        error.request_id = reply.request_id.clone();
        error.failure = Failure::Temporary { retry_after: None };
        error
    })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(crate::error::truncate)
}

/// `Retry-After` in seconds (the form Graph uses).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}
