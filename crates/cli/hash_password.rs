//! `hash-password`: prints the argon2 PHC string of a password, for
//! `[[listener.users]] password_hash`. The password is read from standard
//! input (one line), so it stays out of the shell history and `ps`.

use anyhow::{bail, Context as _};
use std::io::{BufRead, IsTerminal, Write};

pub fn hash_password() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    if terminal {
        eprint!("Password (it will be shown as you type; or pipe it in): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password: type it, or pipe it in (e.g. `printf %s \"$PW\" | smtp-oauth-relay hash-password`)");
    }
    let phc = relay_listener::hash_password(password.as_bytes())?;
    println!("{phc}");
    Ok(())
}
