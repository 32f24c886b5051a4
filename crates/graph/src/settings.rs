//! What the client needs to know: where Graph is, how many requests a
//! mailbox may have in flight, how long one request may take.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::time::Duration;

use reqwest::Url;

/// Microsoft Graph in the global cloud.
pub const DEFAULT_ENDPOINT: &str = "https://graph.microsoft.com";
/// Graph's `MailboxConcurrency` limit: 4 requests per app and mailbox.
pub const DEFAULT_MAX_REQUESTS: usize = 4;
/// How long one HTTP request (including an upload range) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Settings of a [`GraphClient`](crate::GraphClient).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The Graph base URL, e.g. `https://graph.microsoft.us` for a national cloud.
    pub endpoint: Endpoint,
    /// Requests in flight per mailbox, across all callers.
    pub max_requests: NonZeroUsize,
    /// Limit for each HTTP request.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            endpoint: Endpoint::default(),
            max_requests: NonZeroUsize::new(DEFAULT_MAX_REQUESTS).expect("4 is not zero"),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A Graph base URL: https, or plain http on a loopback address (tests, `demo`).
/// Deserializes from a string, validated the same way; serializes back to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Endpoint(Url);

/// Why an endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL at all.
    #[error("graph endpoint {0:?} is not a URL")]
    NotAUrl(String),
    /// http (or another scheme) to a host that is not loopback.
    #[error("graph endpoint {0:?} must use https (plain http only on loopback)")]
    NotHttps(String),
    /// A path, query or fragment that the API paths would be appended to.
    #[error("graph endpoint {0:?} must be a bare origin like https://graph.microsoft.com")]
    NotAnOrigin(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = Url::parse(text).map_err(|_| EndpointError::NotAUrl(text.to_string()))?;
        let host = url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => return Err(EndpointError::NotHttps(text.to_string())),
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(EndpointError::NotAnOrigin(text.to_string()));
        }
        Ok(Endpoint(url))
    }
}

impl TryFrom<String> for Endpoint {
    type Error = EndpointError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        DEFAULT_ENDPOINT
            .parse()
            .expect("the default endpoint is valid")
    }
}

impl Endpoint {
    /// The host, for logs (`relay=`).
    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or_default()
    }

    /// `{endpoint}/v1.0/users/{mailbox}/{rest...}`, each segment escaped.
    pub(crate) fn user_url(&self, mailbox: &str, rest: &[&str]) -> Url {
        let mut url = self.0.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .clear()
                .extend(["v1.0", "users", mailbox])
                .extend(rest);
        }
        url
    }

    /// Whether the endpoint is https: upload URLs Graph hands out must be too.
    pub(crate) fn is_https(&self) -> bool {
        self.0.scheme() == "https"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_or_loopback_http() {
        assert!("https://graph.microsoft.us".parse::<Endpoint>().is_ok());
        assert!("http://127.0.0.1:8080".parse::<Endpoint>().is_ok());
        assert!("http://[::1]:8080/".parse::<Endpoint>().is_ok());
        assert!("http://localhost:1".parse::<Endpoint>().is_ok());
        assert_eq!(
            "http://graph.microsoft.com".parse::<Endpoint>(),
            Err(EndpointError::NotHttps("http://graph.microsoft.com".into()))
        );
        assert!(matches!(
            "https://graph.microsoft.com/v1.0".parse::<Endpoint>(),
            Err(EndpointError::NotAnOrigin(_))
        ));
        assert!(matches!(
            "graph".parse::<Endpoint>(),
            Err(EndpointError::NotAUrl(_))
        ));
    }

    #[test]
    fn mailbox_is_one_escaped_segment() {
        let e: Endpoint = "https://graph.microsoft.com".parse().expect("valid");
        assert_eq!(
            e.user_url("a/b@contoso.com", &["messages", "AAMk=", "send"])
                .as_str(),
            "https://graph.microsoft.com/v1.0/users/a%2Fb@contoso.com/messages/AAMk=/send"
        );
    }
}
