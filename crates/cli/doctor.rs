//! `doctor`: walks the Microsoft 365 setup in the order the README's setup
//! guide gives it, one line per step (✓ or ✗, what was checked, how long it
//! took), and stops at the first broken step with its fix.

use relay_delivery::{Step, Upstream};
use relay_tokens::{describe_token, TokenManager, TokenSource};
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
        match &step.result {
            Ok(detail) => println!("✓ {} — {detail} ({ms} ms)", step.what),
            Err(problem) => {
                self.failed = true;
                println!("✗ {} — {problem} ({ms} ms)", step.what);
                if let Some(fix) = &step.fix {
                    println!("  fix: {fix}");
                }
            }
        }
    }

    fn check(
        &mut self,
        what: &str,
        started: Instant,
        result: Result<String, (String, Option<String>)>,
    ) -> bool {
        let (result, fix) = match result {
            Ok(detail) => (Ok(detail), None),
            Err((problem, fix)) => (Err(problem), fix),
        };
        self.step(Step {
            what: what.to_owned(),
            result,
            fix,
            took: started.elapsed(),
        });
        !self.failed
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
                Ok(format!("{} is valid", path.display())),
            );
            config
        }
        Err(e) => {
            report.check(
                "config",
                started,
                Err((
                    format!("{e:#}"),
                    Some(
                        "correct the keys named above; `smtp-oauth-relay check` repeats this check"
                            .into(),
                    ),
                )),
            );
            anyhow::bail!("the setup is broken at the first step");
        }
    };
    let account = crate::authorize::pick_account(&config, args.account.as_deref(), None)?;
    let started = Instant::now();
    let upstream = match Upstream::new(&config.upstream, &config.listener.hostname) {
        Ok(upstream) => upstream,
        Err(e) => {
            report.check("trust roots", started, Err((e.to_string(), None)));
            anyhow::bail!("the setup is broken");
        }
    };
    let Some(mut secured) = upstream.probe_tls(&mut |step| report.step(step)).await else {
        anyhow::bail!("the setup is broken (see the ✗ step above)");
    };

    let started = Instant::now();
    let source = TokenSource::for_account(account, &config.queue.dir)?;
    let flow = source.flow();
    let tokens = TokenManager::new(&account.name, source.clone())?;
    let token = match tokens.token().await {
        Ok(token) => {
            report.check(
                &format!("token: {} from {}", flow.name(), source.token_url()),
                started,
                Ok(format!(
                    "obtained, expires in {} min",
                    token.expires_in().as_secs() / 60
                )),
            );
            token
        }
        Err(e) => {
            report.check(
                &format!("token: {} from {}", flow.name(), source.token_url()),
                started,
                Err((e.to_string(), None)),
            );
            anyhow::bail!("the setup is broken (see the ✗ step above)");
        }
    };

    let started = Instant::now();
    let claims = describe_token(token.secret().expose(), flow, &account.mailbox);
    let summary = claims
        .claims
        .iter()
        .filter(|(name, _)| ["aud", "roles", "scp", "upn"].contains(&name.as_str()))
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    let claims_ok = report.check(
        "token claims",
        started,
        if claims.warnings.is_empty() {
            Ok(if summary.is_empty() {
                "opaque token".into()
            } else {
                summary
            })
        } else {
            Err((
                claims.warnings.join("; "),
                Some("see `smtp-oauth-relay token` and the README's setup steps".into()),
            ))
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
