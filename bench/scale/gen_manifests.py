#!/usr/bin/env python3
"""Writes a manifest folder of N Services x P TCP ports x E endpoints for `meshctl snapshot`.

ClusterIPs are in 127.0.0.0/8 (127.64.x.y) so that a real mesh-proxy can bind every one of them on
loopback; Pod IPs are 10.128.0.0/9 (never connected to). One file per namespace (50 namespaces).

usage: gen_manifests.py DIR [--services 10000] [--ports 1] [--endpoints 10]
Every Service port is one listening socket in mesh-proxy: keep services x ports under `ulimit -n`.
"""
import argparse
import ipaddress
import os

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--services", type=int, default=10000)
p.add_argument("--ports", type=int, default=1, choices=[1, 2])
p.add_argument("--endpoints", type=int, default=10)
a = p.parse_args()
os.makedirs(a.dir, exist_ok=True)
PORTS = [("http", 80, 8080), ("grpc", 9090, 9090)][: a.ports]
base_ip = int(ipaddress.IPv4Address("127.64.0.10"))
base_pod = int(ipaddress.IPv4Address("10.128.0.1"))
files = {}
for s in range(a.services):
    ns, name = f"ns-{s % 50:02d}", f"svc-{s:05d}"
    ip = str(ipaddress.IPv4Address(base_ip + s))
    ports = "".join(
        f"    - name: {pn}\n      port: {pp}\n      protocol: TCP\n      targetPort: {tp}\n" for pn, pp, tp in PORTS
    )
    slice_ports = "".join(f"  - name: {pn}\n    port: {tp}\n    protocol: TCP\n" for pn, _, tp in PORTS)
    eps = []
    for i in range(a.endpoints):
        pod = str(ipaddress.IPv4Address(base_pod + s * a.endpoints + i))
        eps.append(
            f"  - addresses: [\"{pod}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n"
            f"    nodeName: node-{(s * 7 + i) % 1000:04d}\n    zone: zone-{(s + i) % 3}\n"
            f"    targetRef: {{kind: Pod, namespace: {ns}, name: {name}-{i:03d}}}\n"
        )
    doc = (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  type: ClusterIP\n"
        f"  clusterIP: {ip}\n  clusterIPs: [\"{ip}\"]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n"
        f"  ports:\n{ports}---\n"
        f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n"
        f"  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n{slice_ports}"
        f"endpoints:\n{''.join(eps)}---\n"
    )
    files.setdefault(ns, []).append(doc)
for ns, docs in files.items():
    with open(os.path.join(a.dir, f"{ns}.yaml"), "w") as f:
        f.write("".join(docs))
print(f"{a.services} Services x {len(PORTS)} ports x {a.endpoints} endpoints in {a.dir}")
