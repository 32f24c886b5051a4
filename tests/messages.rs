//! What an admin reads when something is wrong: each message, said once and
//! plainly, with its exit status (1 for a bad configuration or a failure, 2
//! for a usage error).

mod common;

use common::*;
use std::process::Output;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `check` of the world's configuration edited by `edit`: exit 1 and a
/// message containing `expected`.
async fn refused(edit: impl Fn(String) -> String, expected: &str) {
    let world = World::start().await;
    let path = world.write_config(&edit(world.config(free_port())));
    let out = cli(&["check"], &path);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(expected), "{}", stderr(&out));
}

#[tokio::test]
async fn a_port_in_use_is_said_once() {
    let world = World::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = cli(&["run"], &world.write_config(&world.config(port)));
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{text}"
    );
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");
}

#[tokio::test]
async fn an_address_without_a_port() {
    refused(
        |c| c.replace("bind = [\"127.0.0.1:", "bind = [\"127.0.0.1\"]\n#"),
        "listener.bind: `127.0.0.1`: add a port, e.g. 127.0.0.1:2525",
    )
    .await;
}

#[tokio::test]
async fn a_bad_cidr_prefix() {
    refused(
        |c| {
            c.replace(
                "[listener]\n",
                "[listener]\nallowed_networks = [\"192.168.1.0/40\"]\n",
            )
        },
        "`192.168.1.0/40`: the prefix length \"40\" is not a number from 0 to 32",
    )
    .await;
}

#[tokio::test]
async fn an_authority_without_a_scheme() {
    refused(
        |c| {
            let (start, rest) = c.split_once("authority = ").expect("authority");
            let end = rest.find('\n').unwrap_or(rest.len());
            format!(
                "{start}authority = \"login.microsoftonline.us\"{}",
                &rest[end..]
            )
        },
        "has no scheme: write https://login.microsoftonline.us",
    )
    .await;
}

#[tokio::test]
async fn an_unknown_log_level_and_an_open_relay() {
    refused(
        |c| {
            c.replace(
                "[listener]\n",
                "[listener]\nallowed_networks = [\"0.0.0.0/0\"]\n",
            ) + "\n[log]\nlevel = \"warning\"\n"
        },
        "listener.allowed_networks 0.0.0.0/0 lets anyone send: that is an open relay",
    )
    .await;
    refused(
        |c| c + "\n[log]\nlevel = \"warning\"\n",
        "log.level \"warning\": \"warning\" is not a level",
    )
    .await;
}

#[tokio::test]
async fn check_warns_with_the_fix_and_still_passes() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    let secret = world.dir.path().join("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = world.config(free_port());
    let (start, rest) = config.split_once("client_id = ").expect("client_id");
    let end = rest.find('\n').unwrap_or(rest.len());
    let config = format!(
        "{start}client_id = \"00000000-0000-0000-0000-000000000000\"{}",
        &rest[end..]
    );
    let out = cli(&["check"], &world.write_config(&config));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("warning: accounts[0].oauth.client_id is the example's placeholder"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "is readable by every user: chmod 600 {}",
            secret.display()
        )),
        "{text}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["queue"],
        &["check", "--no-such-flag"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn logs_have_no_colour_off_a_terminal() {
    let world = World::start().await;
    let port = free_port();
    let relay = Relay::start(&world.write_config(&world.config(port)), port).await;
    eventually(10, "the listening line", || {
        relay.log().contains("listening for SMTP")
    })
    .await;
    assert!(!relay.log().contains('\u{1b}'), "{}", relay.log());
}
