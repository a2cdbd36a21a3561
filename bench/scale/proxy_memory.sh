#!/usr/bin/env bash
# mesh-proxy's memory with N Services × E endpoints loaded, the way a node runs it: release `mesh-control` on a
# generated manifest folder, release `mesh-proxy --workers 1` fed over xDS (Delta), every Service address a real
# listening socket on 127.64.x.y. Prints the proxy's VmRSS, VmHWM and PSS once it is ready and has bound every
# address; with --snapshot also the same from a snapshot file (meshctl snapshot) instead of xDS.
#
#   cargo build --release -p mesh-control -p mesh-proxy --bins
#   bench/scale/proxy_memory.sh [--services 10000] [--endpoints 10] [--snapshot]
#
# Loopback only; both processes are killed by PID on exit. Needs `ulimit -n` above the Service count (raised
# here when the hard limit allows).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${MESH_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
services=10000 endpoints=10 snapshot=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --services) services=$2; shift 2 ;;
    --endpoints) endpoints=$2; shift 2 ;;
    --snapshot) snapshot=1; shift ;;
    *) echo "usage: $0 [--services N] [--endpoints E] [--snapshot]" >&2; exit 2 ;;
  esac
done
ulimit -n $((services + 1000)) 2>/dev/null || { echo "ulimit -n $((services + 1000)) not allowed" >&2; exit 2; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
python3 "$here/gen_manifests.py" "$work/m" --services "$services" --ports 1 --endpoints "$endpoints" >/dev/null

# Waits (bounded) for a line matching $2 in file $1 and prints it.
line() { for _ in $(seq 600); do grep -m1 -E "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done; echo "timed out waiting for '$2' in $1" >&2; exit 1; }
# Waits (bounded) until the proxy at admin $1 is ready and listens on every Service address.
ready() {
  for _ in $(seq 900); do
    if curl -fs "http://$1/ready" >/dev/null && [[ $(curl -fs "http://$1/metrics" | awk '/^mesh_proxy_listeners /{print $2}') == "$services" ]]; then return 0; fi
    sleep 0.2
  done
  echo "the proxy did not get ready with $services listeners" >&2; exit 1
}
mem() {  # pid label
  local rss hwm pss
  rss=$(awk '/^VmRSS/{print $2}' "/proc/$1/status"); hwm=$(awk '/^VmHWM/{print $2}' "/proc/$1/status")
  pss=$(awk '/^Pss:/{print $2}' "/proc/$1/smaps_rollup")
  printf '%-28s VmRSS %6.1f MB  VmHWM %6.1f MB  PSS %6.1f MB\n' "$2" "$(echo "$rss/1000" | bc -l)" "$(echo "$hwm/1000" | bc -l)" "$(echo "$pss/1000" | bc -l)"
}

if [[ $snapshot == 0 ]]; then
  "$bin/mesh-control" --manifests "$work/m" --xds-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --log warn >"$work/control.out" 2>&1 &
  pids+=($!)
  xds=$(line "$work/control.out" '^mesh-control xds=' | sed -E 's/.*xds=([^ ]+).*/\1/')
  "$bin/mesh-proxy" --xds "http://$xds" --node node-1 --workers 1 --admin-addr 127.0.0.1:0 --log warn >"$work/proxy.out" 2>&1 &
else
  "$bin/meshctl" --log warn snapshot --manifests "$work/m" --role proxy >"$work/snapshot.json"
  "$bin/mesh-proxy" --snapshot "$work/snapshot.json" --node node-1 --workers 1 --admin-addr 127.0.0.1:0 --log warn >"$work/proxy.out" 2>&1 &
fi
proxy=$!
pids+=($proxy)
admin=$(line "$work/proxy.out" '^mesh-proxy admin=' | sed -E 's/.*admin=([^ ]+).*/\1/')
ready "$admin"
mem "$proxy" "ready ($services×$endpoints)"
# Settled: background work after the load (the saver, the first metrics scrape) has run.
sleep 3
mem "$proxy" "3 s later"
