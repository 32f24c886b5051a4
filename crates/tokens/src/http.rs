//! oauth2 5 speaks its own `HttpRequest`; this adapter sends it with the
//! project's reqwest client, so one HTTP stack (and one TLS stack) serves all.

use oauth2::{HttpRequest, HttpResponse};

pub(crate) async fn send(
    client: &reqwest::Client,
    request: HttpRequest,
) -> Result<HttpResponse, reqwest::Error> {
    let (parts, body) = request.into_parts();
    let response = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    let mut out = HttpResponse::new(Vec::new());
    *out.status_mut() = response.status();
    *out.headers_mut() = response.headers().clone();
    *out.body_mut() = response.bytes().await?.to_vec();
    Ok(out)
}

/// The HTTP client for identity-platform requests: no redirects (a token
/// request must not be forwarded elsewhere), bounded time.
pub(crate) fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("smtp-oauth-relay/", env!("CARGO_PKG_VERSION")))
        .build()
}
