#!/bin/sh
# Installs smtp-oauth-relay as a systemd service. Run as root from the source
# tree after `cargo build --release`:
#
#   sudo sh deploy/install.sh
#
# Safe to run again (to upgrade): it replaces the binary, the unit, the man
# pages and the completions, and never touches an existing config.toml or
# client-secret. No system user is created: the unit runs under a dynamic user
# (DynamicUser=yes) that systemd allocates when the service starts.
#
# Environment:
#   BIN=PATH     the binary to install (default target/release/smtp-oauth-relay)
#   DESTDIR=DIR  stage everything under DIR instead of / (packaging, tests);
#                then root is not required and systemctl is not called
#   PREFIX=DIR   where binary, man pages and completions go (default /usr/local;
#                the unit's ExecStart names /usr/local/bin/smtp-oauth-relay)
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$src/target/release/smtp-oauth-relay}
destdir=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}
etc="$destdir/etc/smtp-oauth-relay"
unitdir="$destdir/etc/systemd/system"

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ -n "$destdir" ] || [ "$(id -u)" = 0 ] || die "run as root (sudo sh deploy/install.sh), or set DESTDIR"
[ -x "$bin" ] || die "$bin not found: run \`cargo build --release\` first (or set BIN)"
"$bin" --version >/dev/null || die "$bin does not run"

# install SRC DEST MODE, atomically (a running binary is replaced, not overwritten)
put() {
    install -d -m 0755 "$(dirname "$2")"
    install -m "$3" "$1" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
}
# write stdin to DEST with MODE, atomically
put_stdin() {
    install -d -m 0755 "$(dirname "$1")"
    cat >"$1.new.$$"
    chmod "$2" "$1.new.$$"
    mv -f "$1.new.$$" "$1"
}

put "$bin" "$destdir$prefix/bin/smtp-oauth-relay" 0755
say "installed $prefix/bin/smtp-oauth-relay ($("$bin" --version))"

put "$src/deploy/systemd/smtp-oauth-relay.service" "$unitdir/smtp-oauth-relay.service" 0644
if [ "$prefix" != /usr/local ]; then
    sed -i "s#/usr/local/bin/smtp-oauth-relay#$prefix/bin/smtp-oauth-relay#g" \
        "$unitdir/smtp-oauth-relay.service"
fi
say "installed /etc/systemd/system/smtp-oauth-relay.service"

install -d -m 0755 "$etc"
# The full commented example (every key with its default), always refreshed,
# to compare with after an upgrade. Its client_secret_file names the unit's
# credential.
put "$src/config/smtp-oauth-relay.toml" "$etc/config.toml.example" 0644
if [ -e "$etc/config.toml" ]; then
    say "kept existing /etc/smtp-oauth-relay/config.toml (new example: config.toml.example)"
else
    put "$src/config/smtp-oauth-relay.toml" "$etc/config.toml" 0644
    say "installed /etc/smtp-oauth-relay/config.toml (edit it)"
fi
if [ -e "$etc/client-secret" ]; then
    say "kept existing /etc/smtp-oauth-relay/client-secret"
else
    (umask 077 && : >"$etc/client-secret")
    chmod 0600 "$etc/client-secret"
    say "created /etc/smtp-oauth-relay/client-secret (empty, mode 0600: put the secret's Value in it)"
fi

mandir="$destdir$prefix/share/man/man1"
install -d -m 0755 "$mandir"
"$bin" man --dir "$mandir" >/dev/null
chmod 0644 "$mandir"/smtp-oauth-relay*.1
say "installed man pages in $prefix/share/man/man1 (man smtp-oauth-relay)"

"$bin" completions bash | put_stdin "$destdir$prefix/share/bash-completion/completions/smtp-oauth-relay" 0644
"$bin" completions zsh | put_stdin "$destdir$prefix/share/zsh/site-functions/_smtp-oauth-relay" 0644
"$bin" completions fish | put_stdin "$destdir$prefix/share/fish/vendor_completions.d/smtp-oauth-relay.fish" 0644
say "installed bash, zsh and fish completions in $prefix/share"

if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    say "systemctl daemon-reload: done"
    if systemctl is-active --quiet smtp-oauth-relay; then
        say "the service is running the old binary: systemctl restart smtp-oauth-relay"
    fi
elif [ -z "$destdir" ]; then
    say "systemd is not running here: skipped systemctl daemon-reload"
fi

cat <<'EOF'

Next steps:
  1. Put the client secret's Value (not its Secret ID) in the secret file:
       sudo sh -c 'cat > /etc/smtp-oauth-relay/client-secret'    # paste, then Ctrl-D
  2. Edit /etc/smtp-oauth-relay/config.toml: mailbox, tenant_id, client_id,
     and allowed_networks if applications on other hosts send through it.
  3. Check it (the service finds the secret in $CREDENTIALS_DIRECTORY):
       sudo CREDENTIALS_DIRECTORY=/etc/smtp-oauth-relay smtp-oauth-relay check
  4. Start it now and at every boot, and watch the log:
       sudo systemctl enable --now smtp-oauth-relay
       journalctl -u smtp-oauth-relay -f
  5. Point an application at 127.0.0.1:2525 (no TLS, no authentication), then:
       sudo CREDENTIALS_DIRECTORY=/etc/smtp-oauth-relay smtp-oauth-relay queue list
EOF
