//! Interactive sign-in for delegated accounts (`smtp-oauth-relay authorize`):
//! the device code flow (RFC 8628) for headless servers, and the
//! authorization code flow with PKCE (RFC 7636) and a one-shot loopback
//! listener (RFC 8252) for a machine with a browser. Both end by writing the
//! account's token cache.

use crate::{
    assertion::{random_id, unix_now},
    cache::CacheEntry,
    http, TokenError, TokenSource,
};
use relay_config::{Flow, Provider, Secret};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// RFC 8628 §3.5: `slow_down` adds five seconds to the interval.
const SLOW_DOWN: Duration = Duration::from_secs(5);
/// Bounds on what the device authorization response may ask for: Entra ID
/// gives 900 s and 5 s.
const DEVICE_CODE_MAX_SECS: u64 = 3600;
const POLL_INTERVAL_MAX_SECS: u64 = 60;
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What the identity platform answered to a device authorization request.
pub struct DeviceAuthorization {
    device_code: Secret,
    /// The code the user types at the verification page.
    pub user_code: String,
    /// The page to open.
    pub verification_uri: String,
    /// The identity platform's own instructions (Microsoft sends one), or
    /// one made from the two above.
    pub message: String,
    /// How long the code is valid.
    pub expires_in: Duration,
    /// How long to wait between polls.
    pub interval: Duration,
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// A browser sign-in in progress: the URL to open and the listener waiting
/// for the redirect.
pub struct BrowserAuthorization {
    /// The URL the user opens.
    pub url: String,
    /// `http://localhost:PORT`, registered on the app.
    pub redirect_uri: String,
    state: String,
    verifier: Secret,
    listeners: Vec<TcpListener>,
}

impl std::fmt::Debug for BrowserAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserAuthorization")
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

fn num(value: &serde_json::Value, key: &str) -> Option<u64> {
    match value.get(key)? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(value: &serde_json::Value, key: &str) -> Option<String> {
    value.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

impl TokenSource {
    fn check_delegated(&self) -> Result<(), TokenError> {
        if self.flow() != Flow::RefreshToken {
            return Err(TokenError::Config(format!(
                "account {:?} uses flow = {:?}: `authorize` is for flow = \"refresh_token\" (app-only and service-account flows need no sign-in)",
                self.account(),
                self.flow().name()
            )));
        }
        Ok(())
    }

    /// Starts the device code flow: ask for a user code to show.
    pub async fn start_device_authorization(&self) -> Result<DeviceAuthorization, TokenError> {
        self.check_delegated()?;
        let client = crate::manager::http_client(self)?;
        let value = http::post_form(
            &client,
            self.device_code_url(),
            &[("client_id", self.client_id()), ("scope", self.scope())],
        )
        .await?;
        let bad = |what: &str| TokenError::Transport {
            url: self.device_code_url().to_owned(),
            reason: format!("device authorization response without {what}"),
        };
        let device_code = text(&value, "device_code").ok_or_else(|| bad("device_code"))?;
        let user_code = text(&value, "user_code").ok_or_else(|| bad("user_code"))?;
        // Google says verification_url.
        let verification_uri = text(&value, "verification_uri")
            .or_else(|| text(&value, "verification_url"))
            .ok_or_else(|| bad("verification_uri"))?;
        let message = text(&value, "message").unwrap_or_else(|| {
            format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate.")
        });
        Ok(DeviceAuthorization {
            device_code: Secret::new(device_code),
            user_code,
            verification_uri,
            message,
            expires_in: Duration::from_secs(
                num(&value, "expires_in")
                    .unwrap_or(900)
                    .clamp(60, DEVICE_CODE_MAX_SECS),
            ),
            interval: Duration::from_secs(
                num(&value, "interval")
                    .unwrap_or(5)
                    .clamp(1, POLL_INTERVAL_MAX_SECS),
            ),
        })
    }

    /// Polls until the user signed in (then writes the token cache), declined,
    /// or the code expired. Honours `interval` and `slow_down`.
    pub async fn finish_device_authorization(
        &self,
        device: &DeviceAuthorization,
    ) -> Result<CacheEntry, TokenError> {
        let client = crate::manager::http_client(self)?;
        let deadline = tokio::time::Instant::now() + device.expires_in;
        let mut interval = device.interval;
        loop {
            tokio::time::sleep(interval).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(TokenError::Authorization(
                    "the sign-in code expired before the sign-in was completed: run `smtp-oauth-relay authorize` again".into(),
                ));
            }
            let result = self
                .request(
                    &client,
                    &[
                        ("grant_type", DEVICE_CODE_GRANT),
                        ("device_code", device.device_code.expose()),
                    ],
                )
                .await;
            match result {
                Ok(reply) => return self.save_sign_in(&reply),
                Err(TokenError::Refused { error, description, .. }) => match error.as_str() {
                    "authorization_pending" => {}
                    "slow_down" => {
                        interval = (interval + SLOW_DOWN)
                            .min(Duration::from_secs(POLL_INTERVAL_MAX_SECS));
                        tracing::debug!(?interval, "identity platform asked to slow down");
                    }
                    "expired_token" | "code_expired" => {
                        return Err(TokenError::Authorization(
                            "the sign-in code expired before the sign-in was completed: run `smtp-oauth-relay authorize` again and finish within the time shown".into(),
                        ))
                    }
                    "authorization_declined" | "access_denied" => {
                        return Err(TokenError::Authorization(format!(
                            "the sign-in was declined ({error}: {description}): run `smtp-oauth-relay authorize` again and accept the permissions requested"
                        )))
                    }
                    "bad_verification_code" => {
                        return Err(TokenError::Authorization(format!(
                            "the identity platform does not know this device code ({description})"
                        )))
                    }
                    _ => {
                        return Err(crate::http::refused(&error, &description, &[]));
                    }
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the authorization code flow: binds the one-shot loopback
    /// listener (`port` 0 picks one) and builds the URL to open.
    pub async fn start_browser_authorization(
        &self,
        port: u16,
    ) -> Result<BrowserAuthorization, TokenError> {
        self.check_delegated()?;
        let bind_error = |e: std::io::Error| {
            TokenError::Authorization(format!(
                "cannot listen on 127.0.0.1:{port} for the sign-in redirect: {e}"
            ))
        };
        let v4 = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(bind_error)?;
        let port = v4.local_addr().map_err(bind_error)?.port();
        let mut listeners = vec![v4];
        // A browser may resolve localhost to ::1 first.
        if let Ok(v6) = TcpListener::bind(("::1", port)).await {
            listeners.push(v6);
        }
        let redirect_uri = format!("http://localhost:{port}");
        let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
        let state = random_id();
        let mut params = vec![
            ("client_id", self.client_id().to_owned()),
            ("response_type", "code".to_owned()),
            ("redirect_uri", redirect_uri.clone()),
            ("response_mode", "query".to_owned()),
            ("scope", self.scope().to_owned()),
            ("state", state.clone()),
            ("code_challenge", challenge.as_str().to_owned()),
            ("code_challenge_method", "S256".to_owned()),
        ];
        if self.provider() == Provider::Google {
            // a refresh token, every time
            params.push(("access_type", "offline".to_owned()));
            params.push(("prompt", "consent".to_owned()));
        }
        let url = reqwest::Url::parse_with_params(self.authorize_url(), &params).map_err(|e| {
            TokenError::Config(format!("authorize URL {}: {e}", self.authorize_url()))
        })?;
        Ok(BrowserAuthorization {
            url: url.to_string(),
            redirect_uri,
            state,
            verifier: Secret::new(verifier.secret().clone()),
            listeners,
        })
    }

    /// Waits (at most `timeout`) for the browser to come back to the
    /// loopback listener, checks `state`, exchanges the code with the PKCE
    /// verifier and writes the token cache.
    pub async fn finish_browser_authorization(
        &self,
        browser: BrowserAuthorization,
        timeout: Duration,
    ) -> Result<CacheEntry, TokenError> {
        let BrowserAuthorization {
            redirect_uri,
            state,
            verifier,
            listeners,
            ..
        } = browser;
        let code = tokio::time::timeout(timeout, wait_for_redirect(&listeners, &state))
            .await
            .map_err(|_| {
                TokenError::Authorization(format!(
                    "no sign-in came back to {redirect_uri} within {}s: run `smtp-oauth-relay authorize --browser` again",
                    timeout.as_secs()
                ))
            })??;
        drop(listeners);
        let client = crate::manager::http_client(self)?;
        let reply = self
            .request(
                &client,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code.expose()),
                    ("redirect_uri", &redirect_uri),
                    ("code_verifier", verifier.expose()),
                    ("scope", self.scope()),
                ],
            )
            .await?;
        self.save_sign_in(&reply)
    }
}

const PAGE_OK: &str = "<!doctype html><title>smtp-oauth-relay</title><p>Signed in. The relay has its token; you can close this window.</p>";
const PAGE_FAILED: &str = "<!doctype html><title>smtp-oauth-relay</title><p>The sign-in did not complete. See the terminal for details.</p>";

/// Serves the loopback listener until the redirect with `code` (or an
/// error) arrives; other requests (favicon…) get 404. Only the redirect
/// with the right `state` is accepted.
async fn wait_for_redirect(listeners: &[TcpListener], state: &str) -> Result<Secret, TokenError> {
    loop {
        let accepted = match listeners {
            [one] => one.accept().await,
            [a, b, ..] => tokio::select! {
                r = a.accept() => r,
                r = b.accept() => r,
            },
            [] => return Err(TokenError::Authorization("no listener".into())),
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let head = match tokio::time::timeout(Duration::from_secs(10), read_head(&mut stream)).await
        {
            Ok(Ok(head)) => head,
            _ => continue,
        };
        let target = head
            .lines()
            .next()
            .and_then(|line| {
                let mut parts = line.split(' ');
                (parts.next() == Some("GET"))
                    .then(|| parts.next())
                    .flatten()
            })
            .unwrap_or("")
            .to_owned();
        let Ok(url) = reqwest::Url::parse(&format!("http://localhost{target}")) else {
            let _ = respond(&mut stream, "400 Bad Request", PAGE_FAILED).await;
            continue;
        };
        let get = |key: &str| {
            url.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let (code, error) = (get("code"), get("error"));
        if url.path() != "/" || (code.is_none() && error.is_none()) {
            let _ = respond(&mut stream, "404 Not Found", "not found").await;
            continue;
        }
        if get("state").as_deref() != Some(state) {
            let _ = respond(&mut stream, "400 Bad Request", PAGE_FAILED).await;
            return Err(TokenError::Authorization(
                "the sign-in redirect carried the wrong state (not the sign-in this command started): run `smtp-oauth-relay authorize --browser` again".into(),
            ));
        }
        if let Some(error) = error {
            let _ = respond(&mut stream, "200 OK", PAGE_FAILED).await;
            let description = relay_http::clip(
                &get("error_description").unwrap_or_default(),
                relay_http::TEXT_LIMIT,
            );
            let hint = crate::explain::explain_error(&error)
                .map(|h| format!(" — {h}"))
                .unwrap_or_default();
            return Err(TokenError::Authorization(format!(
                "the sign-in failed: {error}: {description}{hint}"
            )));
        }
        let _ = respond(&mut stream, "200 OK", PAGE_OK).await;
        return code
            .map(Secret::new)
            .ok_or_else(|| TokenError::Authorization("no code".into()));
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Seconds since the epoch, re-exported for the CLI's expiry display.
pub fn now_unix() -> u64 {
    unix_now()
}
