//! The SMTP session state machine, driven over an in-memory pipe: any bytes,
//! in any split, must end the session (no panic, no hang) once the client
//! stops sending, and every reply must be a well-formed reply line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_listener::{fuzzing::Session, Context, Router};
use std::{net::SocketAddr, sync::Arc, sync::OnceLock, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio_util::sync::CancellationToken;

mod split;
use split::split;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    ctx: Arc<Context>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = relay_config::load_str(
            "[listener]\nhostname = \"fuzz.test\"\ngreet_delay = \"0s\"\nmax_message_size = 4096\n\
             max_recipients = 5\ncommand_timeout = \"2s\"\ndata_block_timeout = \"2s\"\n\
             [[accounts]]\nname = \"main\"\nmailbox = \"m@contoso.com\"\nsenders = [\"*@contoso.com\"]\n\
             [accounts.oauth]\nflow = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
        )
        .expect("config");
        let queue = runtime
            .block_on(relay_queue::Queue::open(relay_queue::QueueSettings {
                dir: dir.path().join("queue"),
                database: None,
                lease_timeout: Duration::from_secs(60),
                retry_initial: Duration::from_secs(60),
                retry_max: Duration::from_secs(3600),
                max_age: Duration::from_secs(86400),
            }))
            .expect("queue");
        let ctx = Context::new(config.listener, Router::new(&config.accounts), queue)
            .expect("context");
        Fixture {
            runtime,
            ctx: Arc::new(ctx),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (splits, wire) = split(data);
    let f = fixture();
    f.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let peer = SocketAddr::from(([127, 0, 0, 1], 50000));
        let session =
            tokio::spawn(Session::new(server, peer, f.ctx.clone()).run(CancellationToken::new()));
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        let mut at = 0;
        for &s in splits.iter() {
            if at >= wire.len() {
                break;
            }
            let len = (s as usize % 128 + 1).min(wire.len() - at);
            if wr.write_all(&wire[at..at + len]).await.is_err() {
                break;
            }
            at += len;
            tokio::task::yield_now().await;
        }
        if at < wire.len() {
            let _ = wr.write_all(&wire[at..]).await;
        }
        let _ = wr.shutdown().await;
        let out = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the session did not end after the client stopped")
            .expect("reader task");
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(ended.is_ok(), "the session task did not finish");
        // every reply line: three digits, then space or dash, ending in CRLF
        for line in out.split_inclusive(|&b| b == b'\n') {
            assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
            assert!(
                line.len() >= 5
                    && line[..3].iter().all(u8::is_ascii_digit)
                    && (line[3] == b' ' || line[3] == b'-'),
                "malformed reply line: {line:?}"
            );
        }
    });
});
