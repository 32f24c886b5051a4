#!/bin/sh
# Builds the Debian package, target/debian/smtp-oauth-relay_VERSION-1_ARCH.deb,
# with cargo-deb (metadata: [package.metadata.deb] in Cargo.toml). What the
# package ships that is not in the tree is derived here from its source, so
# nothing is kept twice (the conffile is config/smtp-oauth-relay.toml as is):
#   - the systemd unit: deploy/systemd/smtp-oauth-relay.service with
#     ExecStart in /usr/bin (its drop-in deploy/debian/debian.conf adds the
#     system user and the placeholder guard);
#   - man pages and bash/zsh/fish completions, printed by the binary itself.
#
# Usage: deploy/debian/build.sh         (PROFILE=dev for a quick, unoptimised package)
set -eu
cd "$(dirname "$0")/../.."

profile=${PROFILE:-release}
case $profile in
    dev) dir=debug ;;
    *) dir=$profile ;;
esac
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0
cargo build --locked --profile "$profile" --bin smtp-oauth-relay
bin=target/$dir/smtp-oauth-relay

assets=target/debian-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"

sed 's#/usr/local/bin/smtp-oauth-relay#/usr/bin/smtp-oauth-relay#g' \
    deploy/systemd/smtp-oauth-relay.service >"$assets/smtp-oauth-relay.service"
grep -q '^ExecStart=/usr/bin/smtp-oauth-relay run ' "$assets/smtp-oauth-relay.service" ||
    die "the unit's ExecStart no longer names /usr/local/bin/smtp-oauth-relay run: update this script"
! grep -q /usr/local "$assets/smtp-oauth-relay.service" || die "the unit still names /usr/local"

"$bin" man --dir "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1
"$bin" completions bash >"$assets/completions/smtp-oauth-relay"
"$bin" completions zsh >"$assets/completions/_smtp-oauth-relay"
"$bin" completions fish >"$assets/completions/smtp-oauth-relay.fish"

cargo deb --no-build --profile "$profile"
