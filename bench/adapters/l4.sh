#!/usr/bin/env bash
# The `../shared/bench` CMD for mesh-proxy (L4): one Service that forwards
# $LISTEN_HOST:$LISTEN_PORT to $UPSTREAM_HOST:$UPSTREAM_PORT.
#
# The harness gives LISTEN_HOST, LISTEN_PORT, UPSTREAM_HOST, UPSTREAM_PORT, RUNDIR and WORKERS.
# This script writes a manifest folder into $RUNDIR/mesh-l4 (a ClusterIP Service whose ClusterIP
# is $LISTEN_HOST, port $LISTEN_PORT, and an EndpointSlice with one ready endpoint at
# $UPSTREAM_HOST:$UPSTREAM_PORT), turns it into a proxy snapshot with the release `meshctl`, then
# execs the release `mesh-proxy` on it in the foreground (no daemonizing; the harness kills its
# process group).
#
# Binaries: $MESH_BIN_DIR if set, else <repo>/target/release (or $CARGO_TARGET_DIR/release).
# Build them first:  cargo build --release -p mesh-proxy -p mesh-control --bins
# WORKERS (the harness gives the peers' worker count, 1 by default) becomes mesh-proxy's --workers (its
# serving threads; 1 = a single-threaded runtime), so it is compared per worker like the peers. Unset: one
# worker per core.
# Extra flags for mesh-proxy can be given in MESH_PROXY_ARGS (e.g. '--lb round-robin').
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${MESH_BIN_DIR:-}
if [[ -z $bin ]]; then
  bin=$repo/target/release
  [[ -x $bin/mesh-proxy || -z ${CARGO_TARGET_DIR:-} ]] || bin=$CARGO_TARGET_DIR/release
fi
for b in meshctl mesh-proxy; do
  [[ -x $bin/$b ]] || { echo "l4.sh: $bin/$b not found; run: cargo build --release -p mesh-proxy -p mesh-control --bins (or set MESH_BIN_DIR)" >&2; exit 2; }
done
: "${LISTEN_HOST:?}" "${LISTEN_PORT:?}" "${UPSTREAM_HOST:?}" "${UPSTREAM_PORT:?}" "${RUNDIR:?}"

dir=$RUNDIR/mesh-l4
mkdir -p "$dir/manifests"
cat > "$dir/manifests/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: bench
spec:
  type: ClusterIP
  clusterIP: $LISTEN_HOST
  clusterIPs:
    - $LISTEN_HOST
  ipFamilies:
    - IPv4
  ipFamilyPolicy: SingleStack
  sessionAffinity: None
  ports:
    - name: tcp
      port: $LISTEN_PORT
      protocol: TCP
      targetPort: $UPSTREAM_PORT
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: bench
  labels:
    kubernetes.io/service-name: bench
addressType: IPv4
ports:
  - name: tcp
    port: $UPSTREAM_PORT
    protocol: TCP
endpoints:
  - addresses:
      - $UPSTREAM_HOST
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: bench
YAML
"$bin/meshctl" --log warn snapshot --manifests "$dir/manifests" --role proxy > "$dir/snapshot.json"
# shellcheck disable=SC2086
exec "$bin/mesh-proxy" --snapshot "$dir/snapshot.json" --node bench --admin-addr 127.0.0.1:0 --log warn \
  --workers "${WORKERS:-0}" ${MESH_PROXY_ARGS:-}
