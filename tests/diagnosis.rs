//! `doctor` against the test kit with each scripted fault, and `send-test`
//! through a running relay. The stand-ins run in this process while the
//! binary runs, so the tests use a multi-threaded runtime.

mod common;

use common::*;
use relay_testkit::{Postgres, SubmissionOptions, SubmissionServer};

fn doctor(world: &World, config: &str, extra: &[&str]) -> (bool, String) {
    let path = world.write_config(config);
    let mut args = vec!["doctor"];
    args.extend_from_slice(extra);
    let out = cli(&args, &path);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_working_setup_and_sends_a_test() {
    let world = World::start().await;
    let (ok, text) = doctor(
        &world,
        &world.config(free_port()),
        &["--send-to", "alice@example.com"],
    );
    assert!(ok, "{text}");
    for step in [
        "✓ config",
        "✓ DNS: localhost resolves",
        "✓ TCP: connect to port",
        "✓ STARTTLS: offered by the server",
        "✓ TLS: handshake and certificate chain — TLS 1.3, certificate valid for localhost",
        "✓ EHLO after TLS: AUTH XOAUTH2 offered",
        "✓ token: client_credentials from",
        "✓ token claims — aud=https://outlook.office365.com roles=SMTP.SendAsApp",
        "✓ AUTH XOAUTH2 as relay@contoso.com — 235 accepted",
        "✓ test message to alice@example.com — 250 2.0.0 OK",
        "All checks passed",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    assert_eq!(world.upstream.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_the_broken_step_and_its_fix() {
    let world = World::start().await;
    let config = world.config(free_port());

    // wrong secret: AADSTS7000215 explained
    std::fs::write(world.dir.path().join("secret"), "the-secret-id").expect("secret");
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(!ok);
    assert!(
        text.contains("✗ token") && text.contains("AADSTS7000215") && text.contains("Secret ID"),
        "{text}"
    );
    std::fs::write(world.dir.path().join("secret"), world.idp.client_secret()).expect("secret");

    // SMTP AUTH disabled: the Set-CASMailbox command with the mailbox
    world.upstream.push_auth_fault("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.");
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(!ok);
    assert!(
        text.contains("✗ AUTH XOAUTH2 as relay@contoso.com — 535 5.7.139"),
        "{text}"
    );
    assert!(
        text.contains(
            "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{text}"
    );
    assert!(text.contains("transport = \"graph\""), "{text}");

    // token refused: service principal, Enterprise Application object id, mailbox permission
    world
        .upstream
        .push_auth_fault("535 5.7.3 Authentication unsuccessful");
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(!ok);
    let sp = text.find("New-ServicePrincipal").unwrap_or(usize::MAX);
    let object = text.find("Enterprise Application's").unwrap_or(usize::MAX);
    let permission = text
        .find("Add-MailboxPermission -Identity relay@contoso.com")
        .unwrap_or(usize::MAX);
    assert!(
        sp < object && object < permission && permission != usize::MAX,
        "{text}"
    );

    // untrusted certificate: no ca_file
    let untrusted = config.replace(
        &format!("ca_file = \"{}/ca.pem\"\n", world.dir.path().display()),
        "",
    );
    let (ok, text) = doctor(&world, &untrusted, &[]);
    assert!(!ok);
    assert!(
        text.contains("✗ TLS: handshake and certificate chain — certificate not trusted"),
        "{text}"
    );
    assert!(text.contains("upstream.ca_file"), "{text}");

    // nothing listening
    world.upstream.stop().await;
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(!ok);
    assert!(text.contains("✗ TCP: connect to port"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_refuses_a_server_without_starttls() {
    let world = World::start().await;
    let plain = SubmissionServer::start_with(
        world.idp.clone(),
        SubmissionOptions {
            offer_starttls: false,
            ..SubmissionOptions::default()
        },
    )
    .await
    .expect("server");
    let config = world.config(free_port()).replace(
        &format!("port = {}", world.upstream.port()),
        &format!("port = {}", plain.port()),
    );
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(!ok);
    assert!(
        text.contains("✗ STARTTLS: offered by the server — not offered"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_goes_through_the_whole_path() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    let out = cli(&["send-test", "--to", "alice@example.com"], &relay.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("relay: 250 2.0.0 Ok: queued as") && text.contains("delivered"),
        "{text}"
    );
    let got = world.upstream.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].text().contains("Subject: smtp-oauth-relay test"));

    let out = cli(
        &[
            "send-test",
            "--to",
            "a@example.com",
            "--from",
            "stranger@contoso.com",
        ],
        &relay.config,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed: 554 5.2.252"),
        "{out:?}"
    );
}

// With a shared queue, the database is the first thing after the config:
// reachable, new enough, the role allowed to create and use the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_shared_database_first() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let world = World::start().await;
    let shared = |user: &str, password_file: &std::path::Path| {
        world.config(free_port()).replace(
            "[queue]\n",
            &format!(
                "[queue]\ndatabase_url = \"{}\"\ndatabase_password_file = \"{}\"\n",
                pg.url().replace("relay@", &format!("{user}@")),
                password_file.display()
            ),
        )
    };
    // a role that may log in but not create tables (PostgreSQL 15's
    // default), before any relay created them
    pg.sql("CREATE ROLE sender LOGIN PASSWORD 'sender-password'");
    let sender_password = world.dir.path().join("sender-password");
    std::fs::write(&sender_password, "sender-password").expect("password file");
    let sender = shared("sender", &sender_password);
    let (ok, text) = doctor(&world, &sender, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("✗ queue database")
            && text.contains("role sender may not create tables in schema public"),
        "{text}"
    );
    assert!(
        text.contains("fix: GRANT CREATE ON SCHEMA public TO sender"),
        "{text}"
    );
    assert!(!text.contains("TCP: connect"), "it stops there: {text}");
    // the relay itself refuses to start, naming the database and doctor
    let out = cli(&["run"], &world.write_config(&sender));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("queue database PostgreSQL 127.0.0.1:")
            && stderr.contains("`smtp-oauth-relay doctor` checks it")
            && stderr.contains("permission denied for schema public"),
        "{stderr}"
    );

    // the owner: the tables are made when a relay (or this check's token
    // step, which shares the refresh token through them) first opens it
    let config = shared("relay", &pg.password_file());
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(ok, "{text}");
    let step = format!(
        "✓ queue database PostgreSQL {} — PostgreSQL ",
        pg.url().trim_start_matches("postgres://relay@")
    );
    assert!(text.contains(&step), "missing {step:?} in:\n{text}");
    assert!(text.contains("role relay, no tables yet"), "{text}");
    assert!(text.contains("All checks passed"), "{text}");
    let (ok, text) = doctor(&world, &config, &[]);
    assert!(ok && text.contains("(this relay's)"), "{text}");

    // the other role, now that the tables are the owner's
    let (ok, text) = doctor(&world, &sender, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("role sender may not read and write the tables _sqlx_migrations, bodies"),
        "{text}"
    );
    assert!(
        text.contains(
            "fix: GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO sender"
        ),
        "{text}"
    );

    // a wrong password
    std::fs::write(&sender_password, "wrong").expect("password file");
    let (ok, text) = doctor(&world, &shared("sender", &sender_password), &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("✗ queue database") && text.contains("password authentication failed"),
        "{text}"
    );
    assert!(
        text.contains("queue.database_password_file") && text.contains("pg_hba.conf"),
        "{text}"
    );
    // a refusal is not waited out as an unreachable database is: the relay
    // exits, naming it
    let out = cli(
        &["run"],
        &world.write_config(&shared("sender", &sender_password)),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("password authentication failed"),
        "{stderr}"
    );
}
