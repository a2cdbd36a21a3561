#!/usr/bin/env bash
# TLS termination benchmark, in the shared harness's style (../shared/bench: its lib.sh does the process
# handling, CPU/PSS accounting and the watchdog): TLS 1.3 with one ECDSA P-256 certificate, the proxy under
# test terminating TLS and proxying "/" to the harness's nginx backend over HTTP/1.1 keep-alive.
#   tls_keepalive  wrk -t1 -c$CONNS over HTTPS, keep-alive: requests/s and proxy CPU per request
#   tls_handshake  wrk -t1 -c$CONNS over HTTPS with `Connection: close`: every request is a new TCP connection
#                  and a full TLS 1.3 handshake: handshakes/s and proxy CPU per handshake. wrk would resume
#                  its last session on a reconnect, so every server here has resumption off (nginx: no session
#                  cache, no tickets; HAProxy: cache size 0, no tickets; mesh-ingress: --tls-session-cache 0).
# usage: bench/tls.sh LABEL CMD      (CMD as for the harness: bench/tls/launch.sh nginx|haproxy, or
#                                      bench/adapters/http.sh, which serves HTTPS when TLS_CERT is set)
# The certificate is made once per run in $RUNDIR with openssl (prime256v1, CN/SAN bench.example).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARED_BENCH=${SHARED_BENCH:-$here/../../shared/bench}
# shellcheck source=/dev/null
source "$SHARED_BENCH/lib.sh"
label=${1:?label}; cmd=${2:?command}
: "${CONNS:=50}"
export TLS_CERT=$RUNDIR/tls.crt TLS_KEY=$RUNDIR/tls.key TLS_PEM=$RUNDIR/tls.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench.example \
  -addext subjectAltName=DNS:bench.example -keyout "$TLS_KEY" -out "$TLS_CERT" 2>/dev/null
cat "$TLS_CERT" "$TLS_KEY" > "$TLS_PEM"
export MESH_INGRESS_ARGS="${MESH_INGRESS_ARGS:-} --tls-session-cache 0"
start_backend_http
start_proxy "$label" "$cmd" "$BACKEND_HTTP_PORT"
url="https://127.0.0.1:$LISTEN_PORT/"

S=tls_keepalive
lg timeout $((WARMUP + 15)) wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" > "$RUNDIR/warm.out" 2>&1 || true
measure_begin
run_lg "$RUNDIR/wrk.out" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$BENCH_DIR/wrk_report.lua" "$url"
measure_end
declare -A R; while read -r k v; do R[$k]=$v; done < <(parse.py wrk "$RUNDIR/wrk.out")
emit $S "$label" rps "${R[rps]}"
emit $S "$label" p99_ms "${R[p99_ms]}"
emit $S "$label" errors "${R[errors]}"
emit_proxy_cpu $S "$label" "${R[requests]}" req

S=tls_handshake
measure_begin
run_lg "$RUNDIR/wrk-hs.out" wrk -t1 -c"$CONNS" -d"${DURATION}s" -H 'Connection: close' --latency -s "$BENCH_DIR/wrk_report.lua" "$url"
measure_end
unset R; declare -A R; while read -r k v; do R[$k]=$v; done < <(parse.py wrk "$RUNDIR/wrk-hs.out")
emit $S "$label" rps "${R[rps]}"
emit $S "$label" p99_ms "${R[p99_ms]}"
emit $S "$label" errors "${R[errors]}"
emit_proxy_cpu $S "$label" "${R[requests]}" hs
exit 0
