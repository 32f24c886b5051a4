#!/usr/bin/env bash
# One benchmark run with every peer, as recorded in BENCHMARKS.md.
#
#   bash bench/run.sh            # full run (about 6 minutes plus the build), report in target/bench/report.md
#   bash bench/run.sh --quick    # CI-sized (about a minute with the peers)
#
# Builds the relay and the bench tool (release), starts Postfix on
# 127.0.0.1:2526 (bench/postfix.sh), installs email-oauth2-proxy in a venv
# (bench/emailproxy.sh), installs PostgreSQL if missing, runs `bench`
# against the relay and the peers, then (full run only) the criterion
# micro-benchmarks, and stops Postfix.
# Everything listens on 127.0.0.1. Needs root (apt-get, Postfix).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bench

cargo build --release --locked --bin smtp-oauth-relay --bin bench
bash bench/postfix.sh start
trap 'bash bench/postfix.sh stop >/dev/null 2>&1 || true' EXIT
EMAILPROXY=$(bash bench/emailproxy.sh install)
# The postgres phase starts servers of its own from the distribution's binaries.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q postgresql; }

echo "uptime before: $(uptime)" >&2
target/release/bench "$@" \
    --postfix "$(bash bench/postfix.sh addr)" \
    --postfix-config "$(bash bench/postfix.sh config)" \
    --emailproxy "$EMAILPROXY" \
    --smtp-source /usr/sbin/smtp-source | tee target/bench/report.md
echo "uptime after: $(uptime)" >&2

case " $* " in
*" --quick "*) ;;
*) cargo bench --locked -p relay-listener --bench receive 2>&1 | grep -E '^[a-z_]+/|time:|thrpt:' | tee target/bench/criterion.txt ;;
esac
