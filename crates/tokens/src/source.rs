//! Where tokens come from: one grant against the identity platform.

use crate::{error::parse_aadsts, http, TokenError};
use oauth2::{
    basic::BasicClient, AuthType, ClientId, ClientSecret, RequestTokenError, Scope, TokenResponse,
    TokenUrl,
};
use relay_config::{Flow, OAuthConfig, Secret};
use std::{path::PathBuf, time::Duration};

/// Used when a token response carries no `expires_in`: short, so the
/// relay asks again soon rather than present a dead token.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(600);

/// A token just issued.
pub(crate) struct Issued {
    pub access_token: Secret,
    pub lifetime: Duration,
}

/// How the client authenticates itself to the identity platform.
#[derive(Debug, Clone)]
enum ClientCredential {
    Secret(Secret),
    SecretFile(PathBuf),
}

/// The grant an account uses to obtain tokens, built from its `[accounts.oauth]`.
#[derive(Debug, Clone)]
pub struct TokenSource {
    flow: Flow,
    token_url: String,
    client_id: String,
    credential: ClientCredential,
    scopes: Vec<String>,
}

impl TokenSource {
    /// The source for a validated account configuration.
    pub fn from_config(oauth: &OAuthConfig) -> Result<Self, TokenError> {
        let missing = |key: &str| TokenError::Config(format!("oauth.{key} is missing"));
        let credential = match (&oauth.client_secret, &oauth.client_secret_file) {
            (Some(secret), _) => ClientCredential::Secret(secret.clone()),
            (None, Some(path)) => ClientCredential::SecretFile(path.clone()),
            (None, None) => return Err(missing("client_secret_file")),
        };
        Ok(TokenSource {
            flow: oauth.flow,
            token_url: oauth.token_url(),
            client_id: oauth
                .client_id
                .clone()
                .ok_or_else(|| missing("client_id"))?,
            credential,
            scopes: oauth
                .scope()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    }

    /// The token endpoint this source talks to.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    fn secret(&self) -> Result<Secret, TokenError> {
        match &self.credential {
            ClientCredential::Secret(secret) => Ok(secret.clone()),
            // Read at each request so a rotated secret file needs no restart.
            ClientCredential::SecretFile(path) => std::fs::read_to_string(path)
                .map(|text| Secret::new(text.trim()))
                .map_err(|e| TokenError::SecretFile {
                    path: path.clone(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Performs the grant once.
    pub(crate) async fn fetch(&self, client: &reqwest::Client) -> Result<Issued, TokenError> {
        let transport = |reason: String| TokenError::Transport {
            url: self.token_url.clone(),
            reason,
        };
        let token_url =
            TokenUrl::new(self.token_url.clone()).map_err(|e| transport(e.to_string()))?;
        let oauth = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.secret()?.expose().to_owned()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(token_url);
        // an owning future: a borrowing closure trips the `Send` check of tokio::spawn
        let send = |request| {
            let client = client.clone();
            async move { http::send(&client, request).await }
        };
        let response = match self.flow {
            Flow::ClientCredentials => {
                oauth
                    .exchange_client_credentials()
                    .add_scopes(self.scopes.iter().cloned().map(Scope::new))
                    .request_async(&send)
                    .await
            }
        };
        let response = response.map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => {
                let description = r.error_description().cloned().unwrap_or_default();
                TokenError::Refused {
                    error: r.error().to_string(),
                    code: parse_aadsts(&description),
                    description,
                }
            }
            RequestTokenError::Request(e) => transport(error_chain(&e)),
            RequestTokenError::Parse(e, _) => transport(format!("unreadable answer: {e}")),
            RequestTokenError::Other(e) => transport(e),
        })?;
        Ok(Issued {
            access_token: Secret::new(response.access_token().secret().clone()),
            lifetime: response.expires_in().unwrap_or(ASSUMED_LIFETIME),
        })
    }
}

/// reqwest's top-level message ("error sending request") hides the cause
/// (connection refused, DNS, TLS): include the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
