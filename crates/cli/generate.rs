//! `man` and `completions`: the manual pages and shell completion scripts,
//! generated from the command line definition itself, so they never drift
//! from it. Both are hidden verbs for packagers (`deploy/install.sh` runs them):
//!
//! ```sh
//! smtp-oauth-relay man > smtp-oauth-relay.1                   # the main page
//! smtp-oauth-relay man --dir /usr/local/share/man/man1        # and one per verb
//! smtp-oauth-relay completions bash > /usr/local/share/bash-completion/completions/smtp-oauth-relay
//! ```

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;
use std::{io::Write, path::PathBuf};

#[derive(Args)]
pub struct ManArgs {
    /// Write the main page and one page per verb (smtp-oauth-relay-queue-list.1, …)
    /// into this directory instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to generate the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Sections clap does not know about, in roff.
const EXTRA_SECTIONS: &str = r#".SH ENVIRONMENT
.TP
\fBSMTP_OAUTH_RELAY_CONFIG\fR
The configuration file, instead of \fI/etc/smtp\-oauth\-relay/config.toml\fR.
.TP
\fBSMTP_OAUTH_RELAY__\fISECTION\fB__\fIKEY\fR
Overrides a key of the configuration file, e.g.
\fBSMTP_OAUTH_RELAY__LISTENER__ALLOWED_NETWORKS=172.28.0.0/24,127.0.0.0/8\fR
(lists comma\-separated). A numeric segment is an array index:
\fBSMTP_OAUTH_RELAY__ACCOUNTS__0__OAUTH__TENANT_ID\fR.
.TP
\fBCREDENTIALS_DIRECTORY\fR, \fBSTATE_DIRECTORY\fR, any variable
Path keys may name environment variables as \fB${NAME}\fR, e.g.
\fBclient_secret_file = "${CREDENTIALS_DIRECTORY}/client\-secret"\fR under
systemd's \fBLoadCredential=\fR.
.TP
\fBRUST_LOG\fR
Log filter (\fBinfo\fR, \fBdebug\fR, \fBrelay_delivery=debug\fR, ...); logs go to standard error.
.SH FILES
.TP
\fI/etc/smtp\-oauth\-relay/config.toml\fR
The configuration (TOML). \fBsmtp\-oauth\-relay check\fR validates it.
.TP
\fI/etc/smtp\-oauth\-relay/client\-secret\fR
The client secret's value, mode 0600; the systemd unit passes it as the credential \fBclient\-secret\fR.
.TP
\fI/var/lib/smtp\-oauth\-relay/queue\fR
The durable queue (mode 0700); \fBsmtp\-oauth\-relay queue list\fR shows it.
.TP
\fI/var/lib/smtp\-oauth\-relay/tokens\fR
Token caches of delegated (\fBrefresh_token\fR) accounts.
.TP
\fI/var/lib/smtp\-oauth\-relay/queue/pacing\fR
Each mailbox's pace, kept across restarts.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop: new connections are refused, clients in the middle of a transaction and
deliveries in hand get \fBlistener.shutdown_timeout\fR to finish; what is
queued stays on disk for the next start.
.TP
\fBSIGHUP\fR
Reload the configuration: the listener's policy, the upstream, the accounts
and the TLS certificate and key (read again) take effect without dropping
connections or mail; delivery restarts only when the upstream or the
accounts changed. An invalid configuration is refused, logged, and the
running one stays. Listen addresses, \fB[queue]\fR, \fB[admin]\fR and
\fB[log]\fR need a restart.
.SH EXIT STATUS
.TP
\fB0\fR
Success (for \fBrun\fR: stopped by a signal).
.TP
\fB1\fR
An error, printed to standard error: an invalid configuration, an address
in use, a relay that is not ready (\fBhealth\fR), a failed step
(\fBdoctor\fR, \fBsend\-test\fR), or, for \fBrun\fR, a task of the relay
that ended unexpectedly (systemd then restarts it).
.TP
\fB2\fR
A usage error: an unknown verb or option, a missing argument.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBswaks\fR(1); the README.md of the project.
"#;

/// Prints the main manual page (roff, section 1) to stdout, or writes the
/// whole set into `--dir`.
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    let Some(dir) = args.dir else {
        return write_stdout(&main_page()?);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = crate::Cli::command().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), &dir, &mut written)?;
    }
    let main = dir.join(clap_mangen::Man::new(command).get_filename());
    std::fs::write(&main, main_page()?).with_context(|| format!("writing {}", main.display()))?;
    written.push(main);
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// The page of `command` and of each of its (visible) subcommands.
fn write_pages(
    command: clap::Command,
    dir: &std::path::Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    let path = clap_mangen::Man::new(command)
        .generate_to(dir)
        .with_context(|| format!("writing a manual page into {}", dir.display()))?;
    written.push(path);
    Ok(())
}

/// The main page: clap's sections plus CONFIGURATION, ENVIRONMENT, FILES,
/// SIGNALS, EXIT STATUS, SEE ALSO.
fn main_page() -> anyhow::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(crate::Cli::command().disable_help_subcommand(true));
    let mut page = Vec::new();
    (|| {
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        man.render_subcommands_section(&mut page)?;
        page.write_all(configuration_section().as_bytes())?;
        page.write_all(EXTRA_SECTIONS.as_bytes())?;
        man.render_version_section(&mut page)
    })()
    .context("rendering the manual page")?;
    Ok(page)
}

/// The example configuration, every key with its comment (the reference),
/// as a CONFIGURATION section.
fn configuration_section() -> String {
    let mut out = String::from(
        ".SH CONFIGURATION\nEvery key, with its default, as in the example shipped with the relay \
         (\\fIconfig/smtp\\-oauth\\-relay.toml\\fR); unknown keys are errors.\n.nf\n",
    );
    for line in EXAMPLE_CONFIG.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}

const EXAMPLE_CONFIG: &str = include_str!("../../config/smtp-oauth-relay.toml");

/// Prints the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut command = crate::Cli::command();
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, &name, &mut script);
    if args.shell == Shell::Bash {
        script = bash_function_names(&script, &name).into_bytes();
    }
    write_stdout(&script)
}

/// clap_complete's bash script names a hyphenated binary's states two ways
/// (`smtp__oauth__relay__…` where it sets them, `smtp__subcmd__oauth__…`
/// where it matches them), so no subcommand would complete: one spelling.
fn bash_function_names(script: &[u8], name: &str) -> String {
    String::from_utf8_lossy(script)
        .replace(&name.replace('-', "__subcmd__"), &name.replace('-', "__"))
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
