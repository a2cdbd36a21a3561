#!/usr/bin/env bash
# Launches a TLS peer in the foreground (the harness records its PID and kills its process group):
# tls/launch.sh nginx|haproxy. Needs RUNDIR, LISTEN_*, UPSTREAM_*, WORKERS, TLS_CERT, TLS_KEY, TLS_PEM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
render() { sed -e "s|@LISTEN_HOST@|$LISTEN_HOST|g; s|@LISTEN_PORT@|$LISTEN_PORT|g; s|@UPSTREAM_HOST@|$UPSTREAM_HOST|g" \
  -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g; s|@WORKERS@|${WORKERS:-1}|g; s|@RUNDIR@|$RUNDIR|g" \
  -e "s|@TLS_CERT@|$TLS_CERT|g; s|@TLS_KEY@|$TLS_KEY|g; s|@TLS_PEM@|$TLS_PEM|g" "$1"; }
case ${1:?peer} in
  nginx) render "$here/nginx-tls.conf" > "$RUNDIR/nginx-tls.conf"
    exec nginx -p "$RUNDIR" -e "$RUNDIR/nginx-tls.err" -c "$RUNDIR/nginx-tls.conf" ;;
  haproxy) render "$here/haproxy-tls.cfg" > "$RUNDIR/haproxy-tls.cfg"
    exec haproxy -db -f "$RUNDIR/haproxy-tls.cfg" ;;
  *) echo "unknown TLS peer $1" >&2; exit 2 ;;
esac
