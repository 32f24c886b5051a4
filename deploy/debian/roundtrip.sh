#!/bin/sh
# The Debian package's round trip, as root on a Debian machine (CI):
#   build it (deploy/debian/build.sh), `dpkg -i` it, check what it installed
#   (user, state directory, conffile, enabled unit, `systemd-analyze verify`
#   of the installed unit, man page, completions, the placeholder guard, the
#   sendmail alternative without touching another MTA's /usr/sbin/sendmail),
#   relay a `sendmail -t` message through the installed binary and config
#   to the stand-in (tests/deb.rs), then `dpkg --purge` and check that
#   nothing is left but a queue that still held mail.
#
# Usage: deploy/debian/roundtrip.sh [PACKAGE.deb]   (default: build one; PROFILE=dev builds faster)
set -eu
cd "$(dirname "$0")/../.."

die() { printf 'roundtrip.sh: %s\n' "$*" >&2; exit 1; }
ok() { printf 'roundtrip.sh: ok: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || die "run as root: it installs and purges the package"

deb=${1:-}
if [ -z "$deb" ]; then
    sh deploy/debian/build.sh
    deb=$(ls -t target/debian/smtp-oauth-relay_*.deb | head -n 1)
fi
[ -f "$deb" ] || die "$deb: no such package"

export DEBIAN_FRONTEND=noninteractive
dpkg --purge smtp-oauth-relay >/dev/null 2>&1 || true
sendmail_before=$(readlink /usr/sbin/sendmail 2>/dev/null || echo none)
state=/var/lib/smtp-oauth-relay

install_package() {
    dpkg -i "$deb"
    getent passwd smtp-oauth-relay >/dev/null || die "no system user smtp-oauth-relay"
    [ "$(stat -c %U:%a $state)" = smtp-oauth-relay:700 ] || die "$state: $(stat -c %U:%a $state)"
}

install_package
ok "installed $deb: user smtp-oauth-relay owns $state"

dpkg-query -W -f='${Conffiles}\n' smtp-oauth-relay | grep -q ' /etc/smtp-oauth-relay/config.toml ' ||
    die "config.toml is not a conffile"
cmp -s /etc/smtp-oauth-relay/config.toml config/smtp-oauth-relay.toml || die "config.toml is not the example"
[ "$(stat -c %a /etc/smtp-oauth-relay/client-secret)" = 600 ] || die "client-secret is not mode 0600"
ok "conffile /etc/smtp-oauth-relay/config.toml, empty client-secret (0600)"

[ -L /etc/systemd/system/multi-user.target.wants/smtp-oauth-relay.service ] || die "the unit is not enabled"
grep -q '^ExecStart=/usr/bin/smtp-oauth-relay run ' /usr/lib/systemd/system/smtp-oauth-relay.service ||
    die "the installed unit does not run /usr/bin/smtp-oauth-relay"
out=$(systemd-analyze verify /usr/lib/systemd/system/smtp-oauth-relay.service 2>&1) || {
    printf '%s\n' "$out" >&2
    die "systemd-analyze verify failed"
}
[ -z "$out" ] || { printf '%s\n' "$out" >&2; die "systemd-analyze verify complained"; }
ok "unit enabled; systemd-analyze verify: clean (man page found: $(man -w smtp-oauth-relay))"

[ -s /usr/share/bash-completion/completions/smtp-oauth-relay ] &&
    [ -s /usr/share/zsh/vendor-completions/_smtp-oauth-relay ] &&
    [ -s /usr/share/fish/vendor_completions.d/smtp-oauth-relay.fish ] || die "completions missing"
ok "bash, zsh and fish completions"

# The guard the unit's ExecCondition runs: placeholder tenant -> 1, one line.
if guard=$(runuser -u smtp-oauth-relay -- /usr/lib/smtp-oauth-relay/configured /etc/smtp-oauth-relay/config.toml); then
    die "the guard let the placeholder configuration start"
fi
[ "$(printf '%s\n' "$guard" | wc -l)" = 1 ] && printf '%s\n' "$guard" | grep -q 'placeholder tenant_id' ||
    die "the guard said: $guard"
configured=$(mktemp)
sed 's/^tenant_id = .*/tenant_id = "contoso.onmicrosoft.com"/' /etc/smtp-oauth-relay/config.toml >"$configured"
/usr/lib/smtp-oauth-relay/configured "$configured" || die "the guard refused a configured tenant"
rm -f "$configured"
ok "placeholder guard: \"$guard\""

case $sendmail_before in
    none | /etc/alternatives/sendmail) ;;
    *)
        [ "$(readlink /usr/sbin/sendmail)" = "$sendmail_before" ] ||
            die "another MTA's /usr/sbin/sendmail ($sendmail_before) was replaced"
        ok "another MTA's /usr/sbin/sendmail ($sendmail_before) kept"
        ;;
esac

# Purge with mail still queued: only the queue stays.
install -d -o smtp-oauth-relay -m 0700 "$state/queue/meta" "$state/tokens"
echo '{}' >"$state/queue/meta/0000000000000001.json"
echo '{}' >"$state/tokens/main.json"
dpkg --purge smtp-oauth-relay
[ -f "$state/queue/meta/0000000000000001.json" ] || die "purge removed a queue that held mail"
[ "$(ls -A $state)" = queue ] || die "purge left more than the queue: $(ls -A $state)"
rm -rf "$state"
ok "purge kept a non-empty queue, and only it"

# Install and purge again, with /usr/sbin/sendmail free (another MTA's
# link set aside meanwhile): the alternative provides it, the message goes
# through /usr/sbin/sendmail, and purge leaves nothing of the package.
saved=""
if [ "$sendmail_before" != none ] && [ "$sendmail_before" != /etc/alternatives/sendmail ]; then
    saved=/usr/sbin/sendmail.roundtrip-saved
    mv /usr/sbin/sendmail "$saved"
    trap 'mv -f "$saved" /usr/sbin/sendmail' EXIT INT TERM
fi
install_package
[ "$(readlink -f /usr/sbin/sendmail)" = /usr/bin/smtp-oauth-relay ] || die "/usr/sbin/sendmail is not the alternative"
update-alternatives --query sendmail | grep -q '^Alternative: /usr/bin/smtp-oauth-relay$' || die "no sendmail alternative"
ok "sendmail alternative: /usr/sbin/sendmail -> /etc/alternatives/sendmail -> /usr/bin/smtp-oauth-relay"

cargo test --locked --test deb -- --ignored
ok "sendmail -t through the installed binary and config reached the stand-in"

dpkg --purge smtp-oauth-relay
for path in /usr/bin/smtp-oauth-relay /etc/smtp-oauth-relay "$state" \
    /usr/lib/systemd/system/smtp-oauth-relay.service /usr/lib/smtp-oauth-relay \
    /etc/systemd/system/multi-user.target.wants/smtp-oauth-relay.service \
    /usr/sbin/sendmail /etc/alternatives/sendmail /usr/share/man/man1/smtp-oauth-relay.1.gz; do
    [ ! -e "$path" ] && [ ! -L "$path" ] || die "$path is left after purge"
done
! update-alternatives --query sendmail 2>/dev/null | grep -q smtp-oauth-relay || die "the alternative is left"
ok "purge left nothing behind"
if [ -n "$saved" ]; then
    mv "$saved" /usr/sbin/sendmail
    trap - EXIT INT TERM
fi
