//! `token`: obtains (or reads from the token cache) the account's access
//! token and shows what it says — flow, expiry, the claims that matter for
//! SMTP or Graph — with warnings when it cannot work. The token itself is printed
//! only with `--print`, alone on stdout, for piping into other tools.

use anyhow::Context;
use relay_tokens::{describe_token, TokenSource};
use std::{io::Write, path::Path, time::Duration};

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The account (default: the only one).
    #[arg(long)]
    account: Option<String>,
    /// Print the access token itself, and nothing else, to stdout.
    #[arg(long)]
    print: bool,
}

pub async fn token(path: &Path, args: TokenArgs) -> anyhow::Result<()> {
    let config = crate::check::load_with_secrets(path)?;
    let account = crate::authorize::pick_account(&config, args.account.as_deref(), None)?;
    let source = TokenSource::for_account(account, &config.queue.dir)
        .with_context(|| format!("account {:?}", account.name))?;
    let flow = source.flow();
    let tokens = crate::relay::token_manager(&config, account, source.clone()).await?;
    let token = tokens
        .token()
        .await
        .with_context(|| format!("account {:?}: no access token", account.name))?;
    let mut out = std::io::stdout();
    if args.print {
        writeln!(out, "{}", token.secret().expose())?;
        return Ok(());
    }
    let expires = Duration::from_secs(token.expires_in().as_secs());
    writeln!(out, "account:   {}", account.name)?;
    writeln!(out, "mailbox:   {}", account.mailbox)?;
    writeln!(out, "provider:  {}", source.provider().name())?;
    writeln!(out, "flow:      {}", flow.name())?;
    writeln!(out, "endpoint:  {}", source.token_url())?;
    writeln!(out, "scope:     {}", source.scope())?;
    if let Some(cache) = source.cache() {
        writeln!(out, "cache:     {}", cache.path().display())?;
    }
    writeln!(out, "expires:   in {}", humantime::format_duration(expires))?;
    let report = describe_token(token.secret().expose(), flow, &account.mailbox);
    if report.decoded {
        writeln!(out, "claims:")?;
        for (name, value) in &report.claims {
            writeln!(out, "  {name:<18} {value}")?;
        }
    } else if report.warnings.is_empty() {
        writeln!(out, "claims:    (opaque token: nothing to decode)")?;
    }
    // A graph account's token is judged for Graph, not for SMTP.
    let (warnings, works_for) = match account.transport {
        relay_config::Transport::Smtp => (report.warnings, "SMTP AUTH XOAUTH2"),
        relay_config::Transport::Graph => (
            crate::doctor::graph_claims_problem(&report.claims)
                .into_iter()
                .collect(),
            "Microsoft Graph sendMail",
        ),
    };
    for warning in &warnings {
        writeln!(out, "warning:   {warning}")?;
    }
    if warnings.is_empty() {
        writeln!(out, "ok:        this token should work for {works_for}")?;
    }
    Ok(())
}
