//! `doctor`: walks the Microsoft 365 setup in the order the README's setup
//! guide gives it, one line per step (✓ or ✗, what was checked, how long it
//! took), and stops at the first broken step with its fix. A graph account
//! is checked against Microsoft Graph instead of the submission server.
//! With `queue.database_url` the shared database is checked first, without
//! changing it.

use relay_config::{AccountConfig, Config, Transport};
use relay_delivery::{Finding, Step, Upstream};
use relay_store::{Inspection, StoreError, SCHEMA_VERSION};
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
    if let Some(url) = &config.queue.database_url {
        let started = Instant::now();
        let finding = match crate::relay::database_password(&config.queue) {
            Ok(password) => database_finding(
                relay_store::inspect(url, password.as_ref(), "doctor").await,
                SCHEMA_VERSION,
            ),
            Err(e) => Finding::Fail {
                problem: format!("cannot read {e:#}"),
                fix: Some("run doctor as the user the relay runs as, or correct the path".into()),
            },
        };
        let what = format!("queue database PostgreSQL {}", url.place());
        if !report.check(&what, started, finding) {
            anyhow::bail!("the setup is broken (see the ✗ step above)");
        }
    }
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

/// Whether relays of this build (schema version `known`) can work on the
/// database `inspect` looked at, and how to mend it when not.
fn database_finding(inspected: Result<Inspection, StoreError>, known: i64) -> Finding {
    let found = match inspected {
        Ok(found) => found,
        Err(e @ StoreError::ServerTooOld { .. }) => {
            return Finding::Fail {
                problem: e.to_string(),
                fix: Some("upgrade the server to PostgreSQL 13 or newer".into()),
            }
        }
        Err(e @ StoreError::Connect(_)) => {
            return Finding::Fail {
                problem: e.to_string(),
                fix: Some(
                    "check queue.database_url (host, port, database, user, sslmode; for a \
                     certificate from a private CA, sslrootcert=/path/to/ca.pem) and \
                     queue.database_password_file, and that the server lets this host in \
                     (listen_addresses, pg_hba.conf)"
                        .into(),
                ),
            }
        }
        Err(e) => return failed(&e),
    };
    let (role, schema_version) = (&found.role, found.schema_version);
    let Some(schema) = &found.schema else {
        return Finding::Fail {
            problem: format!("no schema of role {role}'s search_path exists"),
            fix: Some(format!(
                "CREATE SCHEMA relay AUTHORIZATION {role}, or set the role's search_path to an existing schema"
            )),
        };
    };
    if schema_version > known {
        return Finding::Fail {
            problem: format!(
                "the schema is at version {schema_version}, newer than this relay knows (up to {known})"
            ),
            fix: Some("upgrade this relay to the release the others on this database run".into()),
        };
    }
    if !found.out_of_reach.is_empty() {
        return Finding::Fail {
            problem: format!(
                "role {role} may not read and write the tables {}",
                found.out_of_reach.join(", ")
            ),
            fix: Some(format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}, \
                 or run every relay as the role that created them"
            )),
        };
    }
    let server = found
        .server_version
        .split_whitespace()
        .next()
        .unwrap_or(&found.server_version);
    if schema_version == known {
        return Finding::Pass(format!(
            "PostgreSQL {server}, role {role}, schema version {known} (this relay's)"
        ));
    }
    if !found.may_create {
        return Finding::Fail {
            problem: format!(
                "role {role} may not create tables in schema {schema}, and the relay needs to \
                 (the schema is at version {schema_version}, this relay's is {known})"
            ),
            fix: Some(format!(
                "GRANT CREATE ON SCHEMA {schema} TO {role} (PostgreSQL 15 and newer no longer \
                 grant it to every role), or make {role} the database's owner"
            )),
        };
    }
    Finding::Pass(if schema_version == 0 {
        format!(
            "PostgreSQL {server}, role {role}, no tables yet: they are made (schema \
             version {known}) when a relay first opens it"
        )
    } else {
        format!(
            "PostgreSQL {server}, role {role}, schema version {schema_version}: this \
             relay migrates it to {known} when it opens it (upgrade every relay on it together)"
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn found(schema_version: i64) -> Inspection {
        Inspection {
            server_version: "15.8 (Debian 15.8-0+deb12u1)".into(),
            schema_version,
            role: "relay".into(),
            schema: Some("public".into()),
            may_create: true,
            out_of_reach: Vec::new(),
        }
    }

    fn text(finding: Finding) -> String {
        match finding {
            Finding::Pass(detail) => format!("pass: {detail}"),
            Finding::Fail { problem, fix } => format!("fail: {problem}; fix: {fix:?}"),
        }
    }

    #[test]
    fn the_database_is_judged_by_its_schema_and_the_roles_rights() {
        assert_eq!(
            text(database_finding(Ok(found(6)), 6)),
            "pass: PostgreSQL 15.8, role relay, schema version 6 (this relay's)"
        );
        assert_eq!(
            text(database_finding(Ok(found(4)), 6)),
            "pass: PostgreSQL 15.8, role relay, schema version 4: this relay migrates it to 6 \
             when it opens it (upgrade every relay on it together)"
        );
        assert!(text(database_finding(Ok(found(7)), 6)).starts_with(
            "fail: the schema is at version 7, newer than this relay knows (up to 6)"
        ));
        let no_create = Inspection {
            may_create: false,
            ..found(4)
        };
        assert!(text(database_finding(Ok(no_create.clone()), 6))
            .contains("GRANT CREATE ON SCHEMA public TO relay"));
        // all migrated: creating is not needed
        assert!(text(database_finding(
            Ok(Inspection {
                schema_version: 6,
                ..no_create
            }),
            6
        ))
        .starts_with("pass"));
        let unreachable_tables = Inspection {
            out_of_reach: vec!["messages".into(), "slots".into()],
            ..found(6)
        };
        assert_eq!(
            text(database_finding(Ok(unreachable_tables), 6)),
            "fail: role relay may not read and write the tables messages, slots; fix: \
             Some(\"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO relay, \
             or run every relay as the role that created them\")"
        );
        let no_schema = Inspection {
            schema: None,
            ..found(0)
        };
        assert!(text(database_finding(Ok(no_schema), 6)).contains("CREATE SCHEMA"));
        let old = StoreError::ServerTooOld {
            version: "12.22".into(),
        };
        assert!(text(database_finding(Err(old), 6)).contains("upgrade the server"));
    }
}
