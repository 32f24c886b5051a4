//! `demo`: the relay's main job on an embedded default. Starts the test kit's
//! stand-in identity platform and Microsoft 365 submission server on
//! loopback, a relay configured for them, sends a sample message through and
//! shows what arrived, then keeps serving so a user can try their own client.
//! With `--transport graph` the account sends through a stand-in Microsoft
//! Graph instead of the submission server.
//! Its configuration is written to a file, so the admin verbs (`queue list`,
//! `doctor`, `health`…) can be tried against the running demo.

use crate::relay::{termination, Running};
use anyhow::{bail, Context};
use relay_standin::{
    GraphMessage, GraphServer, IdentityPlatform, ReceivedMessage, RelayConfig, Section,
    SubmissionServer,
};
use std::{net::SocketAddr, time::Duration};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the demo relay listens.
    #[arg(long, default_value = "127.0.0.1:2525")]
    listen: SocketAddr,
    /// How the demo account sends: "smtp" (SMTP AUTH XOAUTH2) or "graph"
    /// (Microsoft Graph sendMail).
    #[arg(long, default_value = "smtp", value_parser = ["smtp", "graph"])]
    transport: String,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let idp = IdentityPlatform::start()
        .await
        .context("starting the stand-in identity platform")?;
    let upstream = SubmissionServer::start(idp.clone())
        .await
        .context("starting the stand-in submission server")?;
    let dir = tempfile::Builder::new()
        .prefix("smtp-oauth-relay-demo-")
        .tempdir()?;
    let ca = dir.path().join("stand-in-ca.pem");
    std::fs::write(&ca, upstream.ca_pem())?;
    std::fs::write(dir.path().join("client-secret"), idp.client_secret())?;
    let graph = match args.transport.as_str() {
        "graph" => Some(
            GraphServer::start(idp.clone())
                .await
                .context("starting the stand-in Microsoft Graph")?,
        ),
        _ => None,
    };
    let mut toml = RelayConfig::new(&idp, &upstream, dir.path())
        .listener(args.listen, "relay.demo")
        .admin(&free_loopback_address()?.to_string())
        .ca_file(&ca)
        .account("demo")
        .extra(
            Section::Queue,
            "retry_initial = \"5s\"\nretry_max = \"1m\"\n",
        );
    if let Some(graph) = &graph {
        toml = toml
            .extra(Section::Account, "transport = \"graph\"\n")
            .extra(
                Section::End,
                &format!("\n[graph]\nendpoint = \"{}\"\n", graph.endpoint()),
            );
    }
    let toml = toml.to_toml();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &toml)?;
    let config = relay_config::load_str(&toml).context("the demo configuration")?;
    let never = std::pin::pin!(std::future::pending::<()>());
    let relay = Running::start(config, never)
        .await
        .with_context(|| {
            format!(
                "starting the relay on {} (use --listen to pick another address)",
                args.listen
            )
        })?
        .context("the demo's queue did not open")?;
    let mailbox = upstream.mailbox();
    println!("smtp-oauth-relay demo");
    println!(
        "  stand-in identity platform  {} (tenant {})",
        idp.authority(),
        idp.tenant()
    );
    match &graph {
        Some(graph) => println!(
            "  stand-in Microsoft Graph    {} (sendMail as {mailbox})",
            graph.endpoint()
        ),
        None => println!(
            "  stand-in Microsoft 365      127.0.0.1:{} (STARTTLS + AUTH XOAUTH2 as {mailbox})",
            upstream.port()
        ),
    }
    println!(
        "  relay                       {} (queue in {})",
        args.listen,
        dir.path().display()
    );
    println!();
    let reply = crate::submit::submit(
        args.listen,
        &mailbox,
        "alice@example.com",
        &format!("From: Legacy App <{mailbox}>\r\nTo: alice@example.com\r\nSubject: Hello through smtp-oauth-relay\r\n\r\nThis message went app -> relay (no auth) -> Microsoft 365 (OAuth 2.0).\r\n"),
    )
        .await
        .context("sending the sample message")?;
    println!("Sent a sample message to the relay: {reply}");
    let mut shown = match &graph {
        Some(graph) => graph
            .wait_for_messages(1, Duration::from_secs(30))
            .await
            .len(),
        None => upstream
            .wait_for_messages(1, Duration::from_secs(30))
            .await
            .len(),
    };
    if shown == 0 {
        relay.stop().await;
        bail!("the sample message did not reach the stand-in within 30 s (see the log above)");
    }
    match &graph {
        Some(graph) => {
            println!("The stand-in Microsoft Graph accepted it:");
            graph.messages().iter().for_each(print_graph_message);
        }
        None => {
            println!("The stand-in Microsoft 365 received it:");
            upstream.messages().iter().for_each(print_message);
        }
    }
    println!();
    println!(
        "The relay keeps running. Point an application at {} (no AUTH, no TLS), e.g.:",
        args.listen
    );
    println!(
        "  swaks --server {} --from {mailbox} --to you@example.com",
        args.listen
    );
    println!(
        "  curl smtp://{} --mail-from {mailbox} --mail-rcpt you@example.com --upload-file message.eml",
        args.listen
    );
    println!("The stand-in lets only {mailbox} send (others get 554 5.2.252 SendAsDenied, as in Microsoft 365).");
    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "smtp-oauth-relay".into());
    let config_arg = format!("--config {}", config_path.display());
    println!(
        "Its configuration is {}; try, in another terminal:",
        config_path.display()
    );
    for verb in [
        "queue list",
        "health",
        "token",
        "doctor",
        "send-test --to you@example.com",
    ] {
        println!("  {exe} {verb} {config_arg}");
    }
    println!("Messages arriving are printed below. Ctrl-C stops.");
    let mut rejected = upstream.rejected().len();
    let signal = termination()?;
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        match &graph {
            Some(graph) => {
                for message in graph.messages().iter().skip(shown) {
                    println!();
                    print_graph_message(message);
                    shown += 1;
                }
            }
            None => {
                for message in upstream.messages().iter().skip(shown) {
                    println!();
                    print_message(message);
                    shown += 1;
                }
            }
        }
        for refusal in upstream.rejected().iter().skip(rejected) {
            println!("\nThe stand-in refused a message: {refusal}");
            rejected += 1;
        }
    }
    relay.stop().await;
    if let Some(graph) = graph {
        graph.stop().await;
    }
    upstream.stop().await;
    idp.stop().await;
    Ok(())
}

/// A loopback address with a port free right now, for the admin endpoint:
/// the config file must name the real port for `health` to find it.
fn free_loopback_address() -> anyhow::Result<SocketAddr> {
    let port =
        relay_standin::reserved_port().context("finding a free port for the admin endpoint")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn print_message(m: &ReceivedMessage) {
    let claims = &m.token_claims;
    let expires_in = claims.exp.saturating_sub(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    );
    let subject = m
        .text()
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        .unwrap_or_default();
    println!("  MAIL FROM   {}", m.mail_from);
    println!("  RCPT TO     {}", m.rcpt_to.join(", "));
    println!("  AUTH        XOAUTH2 as {}", m.auth_user);
    println!(
        "  token       aud={} roles={} appid={} tid={} (expires in {expires_in} s)",
        claims.aud,
        claims.roles.join(","),
        claims.appid,
        claims.tid
    );
    println!("  message     {} bytes, Subject: {subject}", m.data.len());
}

fn print_graph_message(m: &GraphMessage) {
    let subject = String::from_utf8_lossy(&m.mime)
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        .unwrap_or_default();
    println!("  sent as     {}", m.mailbox);
    println!("  recipients  {}", m.recipients().join(", "));
    println!(
        "  request     {}",
        if m.via_draft {
            "draft (recipients set to the envelope's), then send"
        } else {
            "sendMail"
        }
    );
    println!(
        "  message     {} bytes, {} attachment(s) added, Subject: {subject}",
        m.mime.len(),
        m.attachments.len()
    );
}
