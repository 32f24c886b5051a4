#!/usr/bin/env bash
# email-oauth2-proxy (PyPI `emailproxy`) as the end-to-end peer.
#
#   bash bench/emailproxy.sh install   # venv + pip install; prints the program's path
#   bash bench/emailproxy.sh path      # prints the program's path (for `bench --emailproxy`)
#
# The bench starts and stops the proxy itself, because its configuration
# names the ports of the stand-in identity platform and submission server,
# which the bench starts on ephemeral ports. What it writes (see
# bench/src/procs.rs, `EmailProxy::start`) is:
#
#   [SMTP-<free port>]                  # the proxy listens on 127.0.0.1:<port>
#   server_address = localhost          # the stand-in submission server
#   server_port = <its port>
#   server_starttls = True              # STARTTLS, then AUTH XOAUTH2 upstream
#   local_address = 127.0.0.1
#
#   [relay@contoso.com]                 # the account: client credentials
#   token_url = http://127.0.0.1:<idp port>/<tenant>/oauth2/v2.0/token
#   oauth2_scope = https://outlook.office365.com/.default
#   oauth2_flow = client_credentials
#   client_id = <the stand-in's client id>
#   client_secret = <its secret>
#
# and runs `emailproxy --no-gui --config-file … --cache-store … --log-file …`
# with SSL_CERT_FILE set to the stand-in's CA. Clients log in to the proxy
# with AUTH PLAIN as relay@contoso.com and a local password (which only
# encrypts the proxy's cached tokens); the proxy swaps that for XOAUTH2.
set -euo pipefail

VERSION=${EMAILPROXY_VERSION:-2026.7.3}
VENV=${EMAILPROXY_VENV:-$(cd "$(dirname "$0")/.." && pwd)/target/bench/emailproxy-venv}

case "${1:-}" in
install)
    if [ ! -x "$VENV/bin/emailproxy" ]; then
        command -v python3 >/dev/null || { apt-get update -q && apt-get install -y -q python3 python3-venv; }
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q "emailproxy==$VERSION"
    fi
    echo "$VENV/bin/emailproxy"
    ;;
path) echo "$VENV/bin/emailproxy" ;;
*)
    echo "usage: $0 install|path" >&2
    exit 2
    ;;
esac
