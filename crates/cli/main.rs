//! `smtp-oauth-relay`: the command line. Each verb lives in its own module;
//! `relay` wires listener → queue → delivery, with tokens on the side.

mod authorize;
mod check;
mod demo;
mod doctor;
mod generate;
mod hash_password;
mod health;
mod notify;
mod queue;
mod relay;
mod send_test;
mod sendmail;
mod show_config;
mod status;
mod submit;
mod supervise;
mod token;

use clap::{Parser, Subcommand};
use relay_config::LogFormat;
use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

/// A local SMTP relay for applications that cannot do OAuth: they send
/// without authentication to 127.0.0.1, the relay delivers to Microsoft 365
/// with OAuth 2.0 (AUTH XOAUTH2).
#[derive(Parser)]
#[command(name = "smtp-oauth-relay", version, about)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(
        long,
        global = true,
        env = "SMTP_OAUTH_RELAY_CONFIG",
        default_value = "/etc/smtp-oauth-relay/config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: listen, queue, deliver, until SIGTERM or Ctrl-C.
    Run,
    /// Validate the configuration and exit (non-zero, naming each bad key, if it is wrong).
    Check,
    /// Print the effective configuration: `config show`.
    Config {
        #[command(subcommand)]
        command: show_config::ConfigCommand,
    },
    /// Inspect the queue (works while the relay runs).
    Queue {
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
    /// Run the relay against a built-in stand-in for Microsoft 365 and send a sample message; no config needed.
    Demo(demo::DemoArgs),
    /// Sign in once for a delegated (flow = "refresh_token") account: device code by default, --browser for a browser on this machine; writes the token cache.
    Authorize(authorize::AuthorizeArgs),
    /// Obtain (or read) an account's access token and show its flow, expiry and claims, with warnings; --print prints the token itself.
    Token(token::TokenArgs),
    /// Ask the running relay whether it is ready (its /readyz); exit 0 if so, 1 if not.
    Health,
    /// Read a password from standard input and print its argon2 hash, for [[listener.users]] password_hash.
    HashPassword,
    /// Walk the Microsoft 365 setup step by step (DNS, TCP, STARTTLS, TLS, token, claims, AUTH) and stop at the first broken step with its fix.
    Doctor(doctor::DoctorArgs),
    /// Send a test message through the running relay (listener → queue → delivery) and wait for the outcome.
    SendTest(send_test::SendTestArgs),
    /// Submit a message from standard input to the running relay, as /usr/sbin/sendmail does (also when run as `sendmail`).
    Sendmail(sendmail::SendmailArgs),
    /// Print the manual page (roff) to stdout, or write one page per verb into --dir; for packagers.
    #[command(hide = true)]
    Man(generate::ManArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(hide = true)]
    Completions(generate::CompletionsArgs),
}

fn main() -> ExitCode {
    large_buffers_back_to_the_system();
    // One crypto provider for every rustls user in the process (reqwest,
    // mail-send, the test kit), installed before any of them builds a config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse_from(sendmail::argv(std::env::args_os()));
    if let Command::Sendmail(args) = &cli.command {
        return sendmail::sendmail(&cli.config, &args.args);
    }
    // `run` logs as its configuration says; the other verbs print their
    // results and log only problems.
    let run_config = match cli.command {
        Command::Run => match check::load_with_secrets(&cli.config) {
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!("error: {}", describe(&e));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    match &run_config {
        Some(config) => {
            init_logging(&config.log.level, config.log.format);
            for warning in relay_config::warnings(config) {
                tracing::warn!("{warning}");
            }
        }
        None => {
            let quiet = matches!(
                cli.command,
                Command::Check
                    | Command::Config { .. }
                    | Command::Queue { .. }
                    | Command::Authorize(_)
                    | Command::Token(_)
                    | Command::Health
                    | Command::Doctor(_)
                    | Command::SendTest(_)
            );
            init_logging(if quiet { "warn" } else { "info" }, LogFormat::Text);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => match run_config {
                Some(config) => relay::run(config, &cli.config).await,
                None => Ok(()),
            },
            Command::Check => check::check(&cli.config),
            Command::Config { command } => show_config::config(&cli.config, command),
            Command::Queue { command } => queue::queue(&cli.config, command).await,
            Command::Demo(args) => demo::demo(args).await,
            Command::Authorize(args) => authorize::authorize(&cli.config, args).await,
            Command::Token(args) => token::token(&cli.config, args).await,
            Command::Health => health::health(&cli.config).await,
            Command::HashPassword => hash_password::hash_password(),
            Command::Doctor(args) => doctor::doctor(&cli.config, args).await,
            Command::SendTest(args) => send_test::send_test(&cli.config, args).await,
            Command::Man(args) => generate::man(args),
            Command::Completions(args) => generate::completions(args),
            Command::Sendmail(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error with its causes, each said once: a cause whose text its
/// context already ends with (as in "cannot listen on …: Address already
/// in use") is not repeated.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Logs go to stderr, one event per line; `RUST_LOG` overrides the level.
/// Colour only on a terminal, and never with `NO_COLOR` set: journald,
/// `docker logs` and files get plain text.
fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Whether log lines are coloured: on a terminal, unless `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Large messages pass through buffers of megabytes (a body read back for
/// its commit or its delivery). glibc serves such sizes from its per-thread
/// heaps once a first one was freed (it raises its mmap threshold up to
/// 32 MiB) and keeps what they free, so a burst of large messages left the
/// relay holding hundreds of MiB. A fixed threshold of 1 MiB maps each
/// large buffer on its own and gives it back when it is freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn large_buffers_back_to_the_system() {
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn large_buffers_back_to_the_system() {}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
