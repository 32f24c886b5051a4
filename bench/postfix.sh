#!/usr/bin/env bash
# Postfix as the accept-throughput peer, on loopback only.
#
#   bash bench/postfix.sh start    # installs postfix (Debian) if needed, starts an instance
#   bash bench/postfix.sh addr     # prints 127.0.0.1:PORT (for `bench --postfix`)
#   bash bench/postfix.sh config   # prints its config directory (for `bench --postfix-config`)
#   bash bench/postfix.sh clean    # empties its queue
#   bash bench/postfix.sh stop     # stops it (its files stay in $POSTFIX_BENCH_DIR)
#
# The instance is separate from the system's Postfix (which is left alone and
# not started): its own config directory, queue and log under
# $POSTFIX_BENCH_DIR (default /tmp/relay-bench-postfix), smtpd on
# 127.0.0.1:$POSTFIX_BENCH_PORT (default 2526), no chroot. It takes mail from
# 127.0.0.0/8 for any domain and puts every message on HOLD: smtpd's cleanup
# writes it to the queue (fsynced before the 250, as always in Postfix) and
# nothing is delivered, so the workload is pure accept-into-queue, the same
# job as the relay's queue mode. Up to 200 smtpd processes, so 128 clients
# are served at once (Debian's default is 100). Needs root.
set -eu

DIR=${POSTFIX_BENCH_DIR:-/tmp/relay-bench-postfix}
PORT=${POSTFIX_BENCH_PORT:-2526}
ETC=$DIR/etc

install_postfix() {
    if command -v postconf >/dev/null 2>&1 && [ -x /usr/sbin/smtp-source ]; then
        return
    fi
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix
}

configure() {
    mkdir -p "$ETC" "$DIR/spool" "$DIR/lib"
    cp /etc/postfix/master.cf "$ETC/master.cf"
    # A main.cf of our own: only what differs from Postfix's built-in defaults.
    cat >"$ETC/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $DIR/spool
data_directory = $DIR/lib
maillog_file = $DIR/maillog
maillog_file_prefixes = $DIR
myhostname = postfix.bench.local
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relayhost =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
EOF
    # smtpd on loopback only, and nothing chrooted (the queue is not under /var/spool).
    postconf -c "$ETC" -MX smtp/inet
    postconf -c "$ETC" -M "127.0.0.1:$PORT/inet=127.0.0.1:$PORT inet n - n - - smtpd"
    postconf -c "$ETC" -F '*/*/chroot = n'
}

case "${1:-}" in
start)
    install_postfix
    if postfix -c "$ETC" status >/dev/null 2>&1; then
        echo "already running: 127.0.0.1:$PORT ($ETC)"
        exit 0
    fi
    configure
    postfix -c "$ETC" set-permissions >/dev/null 2>&1 || true
    # errors go to the terminal only when there is one; say where to look
    postfix -c "$ETC" check || { echo "postfix check failed: run it under \`script -qc\` to see why" >&2; exit 1; }
    postfix -c "$ETC" start
    # wait (bounded) for smtpd to answer
    i=0
    while [ $i -lt 50 ]; do
        if (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null; then break; fi
        i=$((i + 1)); sleep 0.1
    done 2>/dev/null || true
    echo "postfix listening on 127.0.0.1:$PORT (config $ETC, log $DIR/maillog)"
    ;;
addr) echo "127.0.0.1:$PORT" ;;
config) echo "$ETC" ;;
clean) postsuper -c "$ETC" -d ALL ;;
stop) postfix -c "$ETC" stop ;;
*)
    echo "usage: $0 start|addr|config|clean|stop" >&2
    exit 2
    ;;
esac
