//! Step-by-step checks of the path to the upstream, for `doctor`: name
//! resolution, TCP, STARTTLS, the TLS version and certificate chain, AUTH
//! XOAUTH2, and optionally a test message. Each step reports what it found
//! and how long it took; a failing step says how to fix it, and the walk
//! stops there.

use crate::{
    classify::hint,
    session::{authenticate, describe, Session},
    Upstream,
};
use mail_send::SmtpClient;
use relay_config::Security;
use relay_outcome::Outcome;
use relay_tokens::AccessToken;
use smtp_proto::{EhloResponse, EXT_START_TLS};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// One checked step.
#[derive(Debug, Clone)]
pub struct Step {
    /// What was checked.
    pub what: String,
    /// What was found, or what is wrong and how to fix it.
    pub finding: Finding,
    pub took: Duration,
}

/// What a step found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The step works: what was found.
    Pass(String),
    /// The step is broken: the problem, and how to fix it where known.
    Fail {
        problem: String,
        fix: Option<String>,
    },
}

impl Finding {
    pub fn passed(&self) -> bool {
        matches!(self, Finding::Pass(_))
    }
}

impl Step {
    fn timed<T>(
        what: &str,
        started: Instant,
        result: Result<(T, String), (String, Option<String>)>,
    ) -> (Option<T>, Step) {
        let (value, finding) = match result {
            Ok((value, detail)) => (Some(value), Finding::Pass(detail)),
            Err((problem, fix)) => (None, Finding::Fail { problem, fix }),
        };
        let step = Step {
            what: what.to_owned(),
            finding,
            took: started.elapsed(),
        };
        (value, step)
    }
}

/// A secured connection to the upstream, ready for AUTH.
pub struct Secured {
    client: SmtpClient<TlsStream<TcpStream>>,
    capabilities: EhloResponse<String>,
}

impl Upstream {
    /// Resolves, connects and secures a connection, reporting each step to
    /// `report`. `None` when a step failed.
    pub async fn probe_tls(&self, report: &mut impl FnMut(Step)) -> Option<Secured> {
        let target = format!("{}:{}", self.host, self.port);
        let started = Instant::now();
        let resolved =
            tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host(target.clone())).await;
        let (addrs, step) = Step::timed(
            &format!("DNS: {} resolves", self.host),
            started,
            match resolved {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    let listed = addrs
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    Ok((addrs, listed))
                }
                Ok(Err(e)) => Err((
                    e.to_string(),
                    Some(format!(
                        "check upstream.host ({}) and this machine's DNS",
                        self.host
                    )),
                )),
                Err(_) => Err((
                    "no answer".into(),
                    Some("check this machine's DNS resolver".into()),
                )),
            },
        );
        report(step);
        let addrs = addrs?;

        let started = Instant::now();
        let mut last_error = String::from("no address");
        let mut connected = None;
        for addr in &addrs {
            match tokio::time::timeout(STEP_TIMEOUT, SmtpClient::connect(*addr, STEP_TIMEOUT)).await
            {
                Ok(Ok(client)) => {
                    connected = Some((client, *addr));
                    break;
                }
                Ok(Err(e)) => last_error = format!("{addr}: {}", describe(&e)),
                Err(_) => last_error = format!("{addr}: timed out"),
            }
        }
        let (client, step) = Step::timed(
            &format!("TCP: connect to port {}", self.port),
            started,
            connected
                .map(|(client, addr)| (client, format!("connected to {addr}")))
                .ok_or((
                    last_error,
                    Some(format!(
                        "a firewall or proxy blocks outgoing port {}; allow it to {}",
                        self.port, self.host
                    )),
                )),
        );
        report(step);
        let mut client = client?;

        let started = Instant::now();
        let secured = match self.security {
            Security::Starttls => self.starttls(&mut client, report, started).await,
            Security::Tls => Some(started),
        };
        let started = secured?;
        let handshake = match self.security {
            Security::Starttls => client.start_tls(&self.tls, &self.host).await,
            Security::Tls => client.into_tls(&self.tls, &self.host).await,
        };
        let (tls, step) = Step::timed(
            "TLS: handshake and certificate chain",
            started,
            match handshake {
                Ok(tls) => {
                    let version = tls
                        .tls_connection()
                        .protocol_version()
                        .map(|v| format!("{v:?}").replace("TLSv1_", "TLS 1."))
                        .unwrap_or_else(|| "TLS".into());
                    Ok((
                        tls,
                        format!("{version}, certificate valid for {}", self.host),
                    ))
                }
                Err(e) => Err(tls_problem(&e)),
            },
        );
        report(step);
        let mut tls = tls?;

        let started = Instant::now();
        let greeting = async {
            if self.security == Security::Tls {
                tls.read().await?;
            }
            tls.ehlo(&self.helo).await
        };
        let (capabilities, step) = Step::timed(
            "EHLO after TLS: AUTH XOAUTH2 offered",
            started,
            match tokio::time::timeout(STEP_TIMEOUT, greeting).await {
                Ok(Ok(caps)) if caps.auth_mechanisms & smtp_proto::AUTH_XOAUTH2 != 0 => {
                    Ok((caps, "yes".into()))
                }
                Ok(Ok(_)) => Err((
                    "the server does not offer AUTH XOAUTH2".into(),
                    Some(
                        "upstream.host must be the client submission endpoint (smtp.office365.com)"
                            .into(),
                    ),
                )),
                Ok(Err(e)) => Err((describe(&e), None)),
                Err(_) => Err(("no answer".into(), None)),
            },
        );
        report(step);
        Some(Secured {
            client: tls,
            capabilities: capabilities?,
        })
    }

    /// Greeting, EHLO and the STARTTLS offer; returns when the handshake may start.
    async fn starttls(
        &self,
        client: &mut SmtpClient<TcpStream>,
        report: &mut impl FnMut(Step),
        started: Instant,
    ) -> Option<Instant> {
        let offered = async {
            client.read().await?;
            client.ehlo(&self.helo).await
        };
        let (_, step) = Step::timed(
            "STARTTLS: offered by the server",
            started,
            match tokio::time::timeout(STEP_TIMEOUT, offered).await {
                Ok(Ok(caps)) if caps.capabilities & EXT_START_TLS != 0 => Ok(((), "yes".into())),
                Ok(Ok(_)) => Err((
                    "not offered; the relay never sends without TLS".into(),
                    Some("something between here and the server strips STARTTLS, or upstream.host is not Microsoft 365's".into()),
                )),
                Ok(Err(e)) => Err((describe(&e), None)),
                Err(_) => Err(("no greeting".into(), None)),
            },
        );
        let ok = step.finding.passed();
        report(step);
        ok.then(Instant::now)
    }
}

fn tls_problem(e: &mail_send::Error) -> (String, Option<String>) {
    match e {
        mail_send::Error::Tls(error) => match error.as_ref() {
            rustls::Error::InvalidCertificate(why) => (
                format!("certificate not trusted: {why:?}"),
                Some("if a TLS-inspecting proxy sits in the way, add its CA to upstream.ca_file; inside a container, install the CA bundle (ca-certificates)".into()),
            ),
            rustls::Error::PeerIncompatible(why) => (
                format!("no common TLS version or cipher: {why:?}"),
                Some("Microsoft 365 requires TLS 1.2 or later".into()),
            ),
            other => (other.to_string(), None),
        },
        other => (describe(other), None),
    }
}

impl Secured {
    /// AUTH XOAUTH2 as `mailbox`; a refusal names the setup step to fix.
    pub async fn authenticate(
        &mut self,
        mailbox: &str,
        token: &AccessToken,
        report: &mut impl FnMut(Step),
    ) -> bool {
        let started = Instant::now();
        let result = authenticate(&mut self.client, &self.capabilities, mailbox, token).await;
        let (_, step) = Step::timed(
            &format!("AUTH XOAUTH2 as {mailbox}"),
            started,
            match result {
                Ok(()) => Ok(((), "235 accepted".into())),
                Err(failure) => {
                    let fix = auth_fix(&failure, mailbox);
                    Err((failure.reply.text, fix))
                }
            },
        );
        let ok = step.finding.passed();
        report(step);
        ok
    }

    /// Sends a short test message from `from` to `to` and reports the reply.
    pub async fn send_test(self, from: &str, to: &str, report: &mut impl FnMut(Step)) -> bool {
        let started = Instant::now();
        let message = format!(
            "From: {from}\r\nTo: {to}\r\nSubject: smtp-oauth-relay doctor test\r\n\r\nThis test message was sent by `smtp-oauth-relay doctor`.\r\n"
        );
        let mut session = Session {
            client: self.client,
            capabilities: self.capabilities,
            pending: Vec::new(),
            transactions: 0,
        };
        let outcome = session
            .transaction(from, &[to.to_owned()], message.as_bytes())
            .await;
        let (_, step) = Step::timed(
            &format!("test message to {to}"),
            started,
            match outcome {
                Ok(outcomes) => match outcomes.into_iter().next() {
                    Some(outcome) if outcome.is_delivered() => Ok(((), outcome.reply.text)),
                    Some(outcome) => {
                        let hint = hint(&outcome).map(str::to_owned);
                        Err((outcome.reply.text, hint))
                    }
                    None => Err(("no reply".into(), None)),
                },
                Err(broken) => Err((broken.outcome.reply.text, None)),
            },
        );
        let ok = step.finding.passed();
        report(step);
        session.quit().await;
        ok
    }
}

/// The fix for an authentication refusal, in the order an admin checks it.
fn auth_fix(failure: &Outcome, mailbox: &str) -> Option<String> {
    let e = failure.reply.enhanced?;
    Some(match (e.subject, e.detail) {
        (7, 139) => format!(
            "SMTP AUTH is off for the tenant or the mailbox (security defaults and the CIS benchmark turn it off). Either turn it on for the mailbox, in Exchange Online PowerShell:\n    Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false\nor send through Microsoft Graph instead: set transport = \"graph\" on the account (see the README, \"When SMTP AUTH is off: Microsoft Graph\")"
        ),
        (7, 3) | (7, 8) => format!(
            "the token was refused. Check, in this order:\n    1. the service principal exists: New-ServicePrincipal -AppId <client_id> -ObjectId <object id>\n    2. that object id is the Enterprise Application's (Enterprise applications → the app → Object ID), not the App registration's\n    3. the mailbox permission: Add-MailboxPermission -Identity {mailbox} -User <that object id> -AccessRights FullAccess"
        ),
        _ => hint(failure)?.to_owned(),
    })
}
