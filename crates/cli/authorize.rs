//! `authorize`: the one-time sign-in of a delegated (`refresh_token`)
//! account. Device code flow by default (headless servers, containers);
//! `--browser` for the authorization code flow with PKCE and a loopback
//! redirect. Ends by writing the account's token cache; a running relay
//! picks it up within seconds.

use anyhow::{bail, Context};
use relay_config::{AccountConfig, Config, Flow, Provider};
use relay_tokens::TokenSource;
use std::{io::Write, path::Path, time::Duration};

/// How long the browser flow waits for the redirect.
const BROWSER_WAIT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct AuthorizeArgs {
    /// The account to sign in for (default: the only account with flow = "refresh_token").
    #[arg(long)]
    account: Option<String>,
    /// Sign in with a browser on this machine (authorization code + PKCE,
    /// redirect to http://localhost:PORT) instead of a device code.
    #[arg(long)]
    browser: bool,
}

/// The account named `name`, or the only one (with `flow`, if given).
pub fn pick_account<'a>(
    config: &'a Config,
    name: Option<&str>,
    flow: Option<Flow>,
) -> anyhow::Result<&'a AccountConfig> {
    if let Some(name) = name {
        return config
            .accounts
            .iter()
            .find(|a| a.name == name)
            .with_context(|| {
                format!(
                    "no account named {name:?} (configured: {})",
                    config
                        .accounts
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
    }
    let candidates: Vec<&AccountConfig> = config
        .accounts
        .iter()
        .filter(|a| flow.is_none_or(|f| a.oauth.flow == f))
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => match flow {
            Some(f) => bail!("no account uses flow = \"{}\"", f.name()),
            None => bail!("no account is configured"),
        },
        many => bail!(
            "several accounts qualify ({}): choose one with --account NAME",
            many.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub async fn authorize(path: &Path, args: AuthorizeArgs) -> anyhow::Result<()> {
    let config = crate::check::load_with_secrets(path)?;
    let account = pick_account(&config, args.account.as_deref(), Some(Flow::RefreshToken))?;
    let source = TokenSource::for_account(account, &config.queue.dir)
        .with_context(|| format!("account {:?}", account.name))?;
    let mut out = std::io::stdout();
    // Google does not allow the device code flow for the Gmail scope.
    let browser = args.browser || account.oauth.provider == Provider::Google;
    if browser && !args.browser {
        writeln!(
            out,
            "Google allows https://mail.google.com/ only in the browser flow; using it."
        )?;
    }
    let entry = if browser {
        let sign_in = source.start_browser_authorization(0).await?;
        writeln!(
            out,
            "Open this URL in a browser on this machine and sign in as {}:\n\n  {}\n\nWaiting up to {} minutes for the sign-in to come back to {} ...",
            account.mailbox,
            sign_in.url,
            BROWSER_WAIT.as_secs() / 60,
            sign_in.redirect_uri
        )?;
        out.flush()?;
        source
            .finish_browser_authorization(sign_in, BROWSER_WAIT)
            .await?
    } else {
        let device = source.start_device_authorization().await?;
        writeln!(out, "{}", device.message)?;
        writeln!(
            out,
            "(Sign in as {}. Waiting up to {} minutes ...)",
            account.mailbox,
            device.expires_in.as_secs() / 60
        )?;
        out.flush()?;
        source.finish_device_authorization(&device).await?
    };
    let cache = source.cache().map(|c| c.path().display().to_string());
    writeln!(
        out,
        "Signed in; scope {}. Token cache written to {} (mode 0600). A running relay uses it within seconds.",
        entry.scope,
        cache.unwrap_or_default()
    )?;
    Ok(())
}
