//! The relay's configuration file for a kit, written once for the tests,
//! `demo` and `bench` so the TOML (and its quoting) cannot drift apart.

use crate::{IdentityPlatform, SubmissionServer};
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// Where [`RelayConfig::extra`] puts its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `[listener]` (written only with [`RelayConfig::listener`]).
    Listener,
    /// `[upstream]`.
    Upstream,
    /// `[queue]`.
    Queue,
    /// The `[[accounts]]` table (e.g. `transport = "graph"`).
    Account,
    /// After everything else, for whole tables such as `[log]`.
    End,
}

/// Builds the TOML of a relay that delivers to a kit's [`SubmissionServer`]
/// with one client-credentials account at its [`IdentityPlatform`].
///
/// Only what every caller shares is fixed; the sections callers tune take
/// extra TOML lines ([`RelayConfig::extra`]), and whole further tables go at
/// the end ([`Section::End`]). `[listener]` and
/// `[admin]` are written only when set, so a delivery-only test gets no
/// sockets it does not use. The output is plain text so a test may still
/// edit it (remove a key, break a value) before writing it out.
///
/// ```no_run
/// # async fn demo(dir: &std::path::Path) -> std::io::Result<()> {
/// use relay_standin::{IdentityPlatform, RelayConfig, Section, SubmissionServer};
///
/// let idp = IdentityPlatform::start().await?;
/// let smtp = SubmissionServer::start(idp.clone()).await?;
/// std::fs::write(dir.join("ca.pem"), smtp.ca_pem())?;
/// std::fs::write(dir.join("client-secret"), idp.client_secret())?;
/// let toml = RelayConfig::new(&idp, &smtp, dir)
///     .listener("127.0.0.1:2525", "relay.test")
///     .admin("127.0.0.1:0")
///     .extra(Section::Queue, "retry_initial = \"1s\"\n")
///     .to_toml();
/// # let _ = toml;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RelayConfig {
    listener: Option<(String, String)>,
    admin_bind: Option<String>,
    queue_dir: PathBuf,
    upstream_port: u16,
    ca_file: PathBuf,
    account: String,
    mailbox: String,
    authority: String,
    tenant: String,
    client_id: String,
    client_secret_file: PathBuf,
    listener_toml: String,
    upstream_toml: String,
    queue_toml: String,
    account_toml: String,
    end_toml: String,
}

impl RelayConfig {
    /// Points at `idp` and `upstream` (host `localhost`, so the kit's
    /// certificate matches), with account `main` for the server's mailbox
    /// and, in `dir`, the queue (`queue/`), the CA (`ca.pem`) and the client
    /// secret (`client-secret`). The caller writes those two files.
    pub fn new(idp: &IdentityPlatform, upstream: &SubmissionServer, dir: &Path) -> RelayConfig {
        RelayConfig {
            listener: None,
            admin_bind: None,
            queue_dir: dir.join("queue"),
            upstream_port: upstream.port(),
            ca_file: dir.join("ca.pem"),
            account: "main".to_owned(),
            mailbox: upstream.mailbox(),
            authority: idp.authority(),
            tenant: idp.tenant().to_owned(),
            client_id: idp.client_id().to_owned(),
            client_secret_file: dir.join("client-secret"),
            listener_toml: String::new(),
            upstream_toml: String::new(),
            queue_toml: String::new(),
            account_toml: String::new(),
            end_toml: String::new(),
        }
    }

    /// Adds `[listener]` with one `bind` address and the `hostname` the relay
    /// greets with.
    pub fn listener(mut self, bind: impl std::fmt::Display, hostname: &str) -> RelayConfig {
        self.listener = Some((bind.to_string(), hostname.to_owned()));
        self
    }

    /// Adds `[admin]` bound to `bind` (`127.0.0.1:0` keeps parallel relays
    /// from colliding).
    pub fn admin(mut self, bind: &str) -> RelayConfig {
        self.admin_bind = Some(bind.to_owned());
        self
    }

    /// Where the CA file is, instead of `dir/ca.pem`.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> RelayConfig {
        self.ca_file = path.into();
        self
    }

    /// Where the client secret is, instead of `dir/client-secret`.
    pub fn client_secret_file(mut self, path: impl Into<PathBuf>) -> RelayConfig {
        self.client_secret_file = path.into();
        self
    }

    /// The account's name, instead of `main`.
    pub fn account(mut self, name: &str) -> RelayConfig {
        self.account = name.to_owned();
        self
    }

    /// Adds `lines` of TOML to `section`, for what a caller tunes.
    pub fn extra(mut self, section: Section, lines: &str) -> RelayConfig {
        let extra = match section {
            Section::Listener => &mut self.listener_toml,
            Section::Upstream => &mut self.upstream_toml,
            Section::Queue => &mut self.queue_toml,
            Section::Account => &mut self.account_toml,
            Section::End => &mut self.end_toml,
        };
        extra.push_str(lines);
        self
    }

    /// The configuration file's text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // `write!` to a String cannot fail.
        if let Some((bind, hostname)) = &self.listener {
            let _ = write!(
                out,
                "[listener]\nbind = [{}]\nhostname = {}\n{}\n",
                quote(bind),
                quote(hostname),
                self.listener_toml
            );
        }
        let _ = write!(
            out,
            "[upstream]\nhost = \"localhost\"\nport = {}\nca_file = {}\n{}\n",
            self.upstream_port,
            quote_path(&self.ca_file),
            self.upstream_toml
        );
        let _ = write!(
            out,
            "[[accounts]]\nname = {}\nmailbox = {}\n{}\n",
            quote(&self.account),
            quote(&self.mailbox),
            self.account_toml
        );
        let _ = write!(
            out,
            "[accounts.oauth]\nflow = \"client_credentials\"\nauthority = {}\ntenant_id = {}\n\
             client_id = {}\nclient_secret_file = {}\n\n",
            quote(&self.authority),
            quote(&self.tenant),
            quote(&self.client_id),
            quote_path(&self.client_secret_file)
        );
        if let Some(bind) = &self.admin_bind {
            let _ = write!(out, "[admin]\nbind = {}\n\n", quote(bind));
        }
        let _ = write!(
            out,
            "[queue]\ndir = {}\n{}",
            quote_path(&self.queue_dir),
            self.queue_toml
        );
        out.push_str(&self.end_toml);
        out
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML string (a non-UTF-8 byte becomes U+FFFD).
fn quote_path(path: &Path) -> String {
    quote(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quotes_what_toml_needs_escaped() {
        assert_eq!(quote("/tmp/a b/ca.pem"), "\"/tmp/a b/ca.pem\"");
        assert_eq!(quote("C:\\x\"y"), "\"C:\\\\x\\\"y\"");
        assert_eq!(quote("a\nb\u{7f}"), "\"a\\u000Ab\\u007F\"");
    }
}
