#!/bin/sh
# Checks deploy/systemd/smtp-oauth-relay.service with systemd's own tools:
#   - `systemd-analyze verify` on a temporary copy whose ExecStart names the
#     binary given as $1 (verify insists that ExecStart's binary exists; the
#     shipped unit keeps /usr/local/bin/smtp-oauth-relay). Any message from
#     verify (an unknown or misspelt directive is only a warning there) fails.
#   - `systemd-analyze security --offline=true`: prints the exposure score and
#     fails above $SECURITY_THRESHOLD (0-100; 20 = "2.0", the unit scores 1.2).
#
# Usage: deploy/systemd/verify.sh target/debug/smtp-oauth-relay
# Installs the `systemd` Debian package if systemd-analyze is missing and this
# runs as root with apt-get; otherwise skips with a warning (fails under CI=true).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
unit="$here/smtp-oauth-relay.service"
bin=${1:?usage: verify.sh PATH-TO-BUILT-BINARY}
threshold=${SECURITY_THRESHOLD:-20}

case "$bin" in /*) ;; *) bin="$(pwd)/$bin" ;; esac
[ -x "$bin" ] || { echo "verify.sh: $bin is not an executable; build it first" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "verify.sh: installing systemd for systemd-analyze"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q </dev/null >/dev/null
        apt-get install -y -q --no-install-recommends systemd </dev/null >/dev/null
    fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "${CI:-}" = true ]; then
        echo "verify.sh: systemd-analyze is not available" >&2
        exit 1
    fi
    echo "verify.sh: warning: systemd-analyze is not available; unit not verified" >&2
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
sed "s#/usr/local/bin/smtp-oauth-relay#$bin#g" "$unit" >"$tmp/smtp-oauth-relay.service"

# --man=no: the unit's Documentation=man:smtp-oauth-relay(1) exists only once
# installed (deploy/install.sh); `smtp-oauth-relay man` is tested separately.
out=$(systemd-analyze verify --man=no "$tmp/smtp-oauth-relay.service" 2>&1) || {
    printf '%s\n' "$out" >&2
    echo "verify.sh: systemd-analyze verify failed" >&2
    exit 1
}
if [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "verify.sh: systemd-analyze verify complained (see above)" >&2
    exit 1
fi
echo "systemd-analyze verify: smtp-oauth-relay.service OK ($(systemd-analyze --version | head -n 1))"

if ! report=$(systemd-analyze security --offline=true --no-pager --threshold="$threshold" \
    "$tmp/smtp-oauth-relay.service" 2>&1); then
    printf '%s\n' "$report" >&2
    echo "verify.sh: exposure above $threshold/100, or systemd-analyze security failed" >&2
    exit 1
fi
printf '%s\n' "$report" | grep -E 'Overall exposure level'
