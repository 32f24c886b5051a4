//! `doctor`: walks the Microsoft 365 setup in the order the README's setup
//! guide gives it, one line per step (✓ or ✗, what was checked, how long it
//! took), and stops at the first broken step with its fix. A graph account
//! is checked against Microsoft Graph instead of the submission server.

use relay_config::{AccountConfig, Config, Transport};
use relay_delivery::{Finding, Step, Upstream};
use relay_tokens::{describe_token, AccessToken, TokenReport, TokenSource};
use std::{path::Path, time::Instant};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// The account to check (default: the only one, or the first).
    #[arg(long)]
    account: Option<String>,
    /// Also send a test message to this address and show Microsoft's reply.
    #[arg(long, value_name = "ADDR")]
    send_to: Option<String>,
}

/// Prints steps and remembers whether one failed.
struct Report {
    failed: bool,
}

impl Report {
    fn step(&mut self, step: Step) {
        let ms = step.took.as_millis();
        match &step.finding {
            Finding::Pass(detail) => println!("✓ {} — {detail} ({ms} ms)", step.what),
            Finding::Fail { problem, fix } => {
                self.failed = true;
                println!("✗ {} — {problem} ({ms} ms)", step.what);
                if let Some(fix) = fix {
                    println!("  fix: {fix}");
                }
            }
        }
    }

    fn check(&mut self, what: &str, started: Instant, finding: Finding) -> bool {
        self.step(Step {
            what: what.to_owned(),
            finding,
            took: started.elapsed(),
        });
        !self.failed
    }
}

/// A step broken by `e`, with no fix to offer.
fn failed(e: &impl std::fmt::Display) -> Finding {
    Finding::Fail {
        problem: e.to_string(),
        fix: None,
    }
}

pub async fn doctor(path: &Path, args: DoctorArgs) -> anyhow::Result<()> {
    let mut report = Report { failed: false };
    let started = Instant::now();
    let loaded = crate::check::load_with_secrets(path);
    let config = match loaded {
        Ok(config) => {
            report.check(
                "config",
                started,
                Finding::Pass(format!("{} is valid", path.display())),
            );
            config
        }
        Err(e) => {
            report.check(
                "config",
                started,
                Finding::Fail {
                    problem: format!("{e:#}"),
                    fix: Some(
                        "correct the keys named above; `smtp-oauth-relay check` repeats this check"
                            .into(),
                    ),
                },
            );
            anyhow::bail!("the setup is broken at the first step");
        }
    };
    let account = crate::authorize::pick_account(&config, args.account.as_deref(), None)?;
    if account.transport == Transport::Graph {
        return doctor_graph(&config, account, args, &mut report).await;
    }
    let started = Instant::now();
    let upstream = match Upstream::new(&config.upstream, &config.listener.hostname) {
        Ok(upstream) => upstream,
        Err(e) => {
            report.check("trust roots", started, failed(&e));
            anyhow::bail!("the setup is broken");
        }
    };
    let Some(mut secured) = upstream.probe_tls(&mut |step| report.step(step)).await else {
        anyhow::bail!("the setup is broken (see the ✗ step above)");
    };
    let token = fetch_token(&config, account, &mut report).await?;

    let started = Instant::now();
    let (claims, summary) = token_claims(&token, account);
    let claims_ok = report.check(
        "token claims",
        started,
        if claims.warnings.is_empty() {
            Finding::Pass(if summary.is_empty() {
                "opaque token".into()
            } else {
                summary
            })
        } else {
            Finding::Fail {
                problem: claims.warnings.join("; "),
                fix: Some("see `smtp-oauth-relay token` and the README's setup steps".into()),
            }
        },
    );
    if !claims_ok {
        anyhow::bail!("the setup is broken (see the ✗ step above)");
    }

    if !secured
        .authenticate(&account.mailbox, &token, &mut |step| report.step(step))
        .await
    {
        anyhow::bail!("the setup is broken (see the ✗ step above)");
    }
    if let Some(to) = &args.send_to {
        if !secured
            .send_test(&account.mailbox, to, &mut |step| report.step(step))
            .await
        {
            anyhow::bail!("Microsoft 365 refused the test message (see above)");
        }
    }
    println!(
        "All checks passed: account {} can send as {}.",
        account.name, account.mailbox
    );
    Ok(())
}

/// The token's claims, and the ones that decide whether it can send as
/// `aud=… roles=… scp=… upn=…`.
fn token_claims(token: &AccessToken, account: &AccountConfig) -> (TokenReport, String) {
    let claims = describe_token(
        token.secret().expose(),
        account.oauth.flow,
        &account.mailbox,
    );
    let summary = claims
        .claims
        .iter()
        .filter(|(name, _)| ["aud", "roles", "scp", "upn"].contains(&name.as_str()))
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    (claims, summary)
}

/// The account's token, reported as a step.
async fn fetch_token(
    config: &Config,
    account: &AccountConfig,
    report: &mut Report,
) -> anyhow::Result<AccessToken> {
    let started = Instant::now();
    let source = TokenSource::for_account(account, &config.queue.dir)?;
    let what = format!(
        "token: {} from {}",
        source.flow().name(),
        source.token_url()
    );
    let tokens = crate::relay::token_manager(config, account, source).await?;
    match tokens.token().await {
        Ok(token) => {
            report.check(
                &what,
                started,
                Finding::Pass(format!(
                    "obtained, expires in {} min",
                    token.expires_in().as_secs() / 60
                )),
            );
            Ok(token)
        }
        Err(e) => {
            report.check(&what, started, failed(&e));
            anyhow::bail!("the setup is broken (see the ✗ step above)");
        }
    }
}

/// Graph's audience, as a URL and as its application id.
const GRAPH_AUDIENCES: [&str; 3] = [
    "https://graph.microsoft.com",
    "https://graph.microsoft.com/",
    "00000003-0000-0000-c000-000000000000",
];

/// The Entra steps a graph account needs.
const GRAPH_SETUP: &str = "in the Entra admin center: App registrations > the app > API permissions > Add a permission > Microsoft Graph > Application permissions > Mail.Send (and Mail.ReadWrite for messages sent as drafts), then \"Grant admin consent\"; scope the app to the relay's mailboxes with RBAC for Applications: New-ManagementScope -Name RelayMailboxes -RecipientRestrictionFilter \"PrimarySmtpAddress -eq '<mailbox>'\", New-ManagementRoleAssignment -App <client_id> -Role \"Application Mail.Send\" -CustomResourceScope RelayMailboxes, and check with Test-ServicePrincipalAuthorization -Identity <client_id> -Resource <mailbox>. A delegated (refresh_token) account needs scope https://graph.microsoft.com/Mail.Send offline_access: run `smtp-oauth-relay authorize` again";

/// Whether a Graph token can send mail: its audience is Graph and it
/// carries `Mail.Send` (`roles` for an app, `scp` for a user).
pub fn graph_claims_problem(claims: &[(String, String)]) -> Option<String> {
    let claim = |name: &str| {
        claims
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let aud = claim("aud").unwrap_or_default();
    if !GRAPH_AUDIENCES.contains(&aud) {
        return Some(format!(
            "aud is {aud:?}, not Microsoft Graph (https://graph.microsoft.com): the token was issued for another resource (check accounts.oauth.scope)"
        ));
    }
    let sends = ["roles", "scp"]
        .into_iter()
        .filter_map(claim)
        .any(|granted| granted.split_whitespace().any(|p| p == "Mail.Send"));
    (!sends).then(|| {
        format!(
            "the token carries no Mail.Send (roles={:?} scp={:?})",
            claim("roles").unwrap_or_default(),
            claim("scp").unwrap_or_default()
        )
    })
}

/// `doctor` for `transport = "graph"`: the token is for Graph and may send
/// mail; with `--send-to`, a test message through Graph.
async fn doctor_graph(
    config: &Config,
    account: &AccountConfig,
    args: DoctorArgs,
    report: &mut Report,
) -> anyhow::Result<()> {
    let token = fetch_token(config, account, report).await?;
    let started = Instant::now();
    let (claims, summary) = token_claims(&token, account);
    let ok = report.check(
        "token claims for Microsoft Graph",
        started,
        match graph_claims_problem(&claims.claims) {
            None => Finding::Pass(summary),
            Some(problem) => Finding::Fail {
                problem,
                fix: Some(GRAPH_SETUP.to_owned()),
            },
        },
    );
    if !ok {
        anyhow::bail!("the setup is broken (see the ✗ step above)");
    }
    if let Some(to) = &args.send_to {
        let started = Instant::now();
        let client = crate::relay::graph_client(&config.graph)?;
        let message = format!(
            "From: {from}\r\nTo: {to}\r\nSubject: smtp-oauth-relay doctor test\r\n\r\nThis test message was sent by `smtp-oauth-relay doctor` through Microsoft Graph.\r\n",
            from = account.mailbox
        );
        let sent = client
            .send(
                token.secret().expose(),
                &account.mailbox,
                &format!("doctor-{}", std::process::id()),
                std::slice::from_ref(to),
                message.as_bytes(),
            )
            .await;
        let ok = report.check(
            &format!("test message to {to} through {}", config.graph.endpoint),
            started,
            match sent {
                Ok(accepted) => Finding::Pass(format!(
                    "202 accepted (request-id {})",
                    accepted.request_id.as_deref().unwrap_or("none")
                )),
                Err(e) => Finding::Fail {
                    problem: e.to_string(),
                    fix: e.failure.hint(),
                },
            },
        );
        if !ok {
            anyhow::bail!("Microsoft Graph refused the test message (see above)");
        }
    }
    println!(
        "All checks passed: account {} can send as {} through Microsoft Graph.",
        account.name, account.mailbox
    );
    Ok(())
}
