#!/usr/bin/env bash
# The `../shared/bench` CMD for mesh-ingress (HTTP): one Ingress rule (any host, Prefix /) to one Service
# whose only endpoint is $UPSTREAM_HOST:$UPSTREAM_PORT.
#
# The harness gives LISTEN_HOST, LISTEN_PORT, LISTEN_PORT_H2, UPSTREAM_HOST, UPSTREAM_PORT, RUNDIR and WORKERS.
# This script writes a manifest folder into $RUNDIR/mesh-http (IngressClass `mesh`, a headless Service with an
# EndpointSlice holding the one ready endpoint, an Ingress without host whose Prefix / rule leads to it), turns
# it into an ingress snapshot with the release `meshctl`, then execs the release `mesh-ingress` on it in the
# foreground (no daemonizing; the harness kills its process group). HTTP/1.1 is served on $LISTEN_PORT, and
# cleartext HTTP/2 (prior knowledge; the same port accepts it too) on $LISTEN_PORT_H2 through
# --extra-http-addr. The TLS port is bound on a free loopback port and unused.
#
# With TLS_CERT and TLS_KEY set (bench/tls.sh does), the Ingress also gets a `tls` entry without hosts naming
# a kubernetes.io/tls Secret made of them (the default certificate), and $LISTEN_PORT serves HTTPS instead;
# plain HTTP then goes to a free loopback port.
#
# Binaries: $MESH_BIN_DIR if set, else <repo>/target/release (or $CARGO_TARGET_DIR/release).
# Build them first:  cargo build --release -p mesh-ingress -p mesh-control --bins
# WORKERS (the peers' worker count, 1 by default) becomes mesh-ingress's --threads (worker threads, each a
# single-threaded runtime with its own SO_REUSEPORT listeners), so it is compared per worker like the peers. Extra flags go in MESH_INGRESS_ARGS (e.g. '--access-log').
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${MESH_BIN_DIR:-}
if [[ -z $bin ]]; then
  bin=$repo/target/release
  [[ -x $bin/mesh-ingress || -z ${CARGO_TARGET_DIR:-} ]] || bin=$CARGO_TARGET_DIR/release
fi
for b in meshctl mesh-ingress; do
  [[ -x $bin/$b ]] || { echo "http.sh: $bin/$b not found; run: cargo build --release -p mesh-ingress -p mesh-control --bins (or set MESH_BIN_DIR)" >&2; exit 2; }
done
: "${LISTEN_HOST:?}" "${LISTEN_PORT:?}" "${UPSTREAM_HOST:?}" "${UPSTREAM_PORT:?}" "${RUNDIR:?}"

dir=$RUNDIR/mesh-http
mkdir -p "$dir/manifests"
tls_entry=""
if [[ -n ${TLS_CERT:-} && -n ${TLS_KEY:-} ]]; then
  tls_entry="  tls:
    - secretName: bench-tls"
  cat > "$dir/manifests/secret.yaml" <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: bench-tls
  namespace: bench
type: kubernetes.io/tls
data:
  tls.crt: $(base64 -w0 < "$TLS_CERT")
  tls.key: $(base64 -w0 < "$TLS_KEY")
YAML
fi
cat > "$dir/manifests/bench.yaml" <<YAML
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: mesh
spec:
  controller: mesh.dev/ingress-controller
---
apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: bench
spec:
  clusterIP: None
  ports:
    - name: http
      port: 80
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
  - name: http
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
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: bench
  namespace: bench
spec:
  ingressClassName: mesh
$tls_entry
  rules:
    - http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: bench
                port:
                  name: http
YAML
"$bin/meshctl" --log warn snapshot --manifests "$dir/manifests" --role ingress --ingress-class mesh > "$dir/snapshot.json"
extra=()
if [[ -n $tls_entry ]]; then
  addrs=(--http-addr "$LISTEN_HOST:0" --https-addr "$LISTEN_HOST:$LISTEN_PORT")
else
  addrs=(--http-addr "$LISTEN_HOST:$LISTEN_PORT" --https-addr "$LISTEN_HOST:0")
  [[ -n ${LISTEN_PORT_H2:-} ]] && extra=(--extra-http-addr "$LISTEN_HOST:$LISTEN_PORT_H2")
fi
# shellcheck disable=SC2086
exec "$bin/mesh-ingress" --snapshot "$dir/snapshot.json" --node bench --log warn "${addrs[@]}" \
  --admin-addr 127.0.0.1:0 --threads "${WORKERS:-1}" "${extra[@]}" ${MESH_INGRESS_ARGS:-}
