#!/usr/bin/env bash
# All TLS targets (nginx, HAProxy, mesh-ingress), N interleaved rounds, one results folder:
#   bench/tls_all.sh [--reps N] [--out DIR]
# Build first: cargo build --release -p mesh-ingress -p mesh-control --bins
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
reps=3; out=$here/../target/bench/tls-$(date +%Y%m%d-%H%M)
while [[ $# -gt 0 ]]; do
  case $1 in --reps) reps=$2; shift 2 ;; --out) out=$2; shift 2 ;; *) echo "unknown $1" >&2; exit 2 ;; esac
done
mkdir -p "$out"; out=$(cd "$out" && pwd)
export RESULTS=$out/results.csv
targets=("nginx=$here/tls/launch.sh nginx" "haproxy=$here/tls/launch.sh haproxy" "mesh-ingress=$here/adapters/http.sh")
for ((r = 1; r <= reps; r++)); do
  n=${#targets[@]}
  for ((i = 0; i < n; i++)); do
    entry=${targets[$(((i + r - 1) % n))]}
    echo "[$(date +%T)] round $r/$reps ${entry%%=*}" >&2
    ROUND=$r "$here/tls.sh" "${entry%%=*}" "${entry#*=}" >> "$out/run.log" 2>&1 || echo "failed: ${entry%%=*} (see run.log)" >&2
  done
done
python3 "$here/tls_summary.py" "$RESULTS" | tee "$out/summary.md"
