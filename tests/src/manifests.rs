//! Manifest text the end-to-end tests write into `mesh-control`'s folder: the pieces several tests need in the
//! same shape (a ClusterIP Service with its slice of ready Pods, our IngressClass, a TLS Secret, the two-host
//! Ingress of the full-path tests). Each returns one or more YAML documents, each ending in a newline; join them
//! with [`join`].

use std::net::IpAddr;

use base64::Engine;

/// A ready, serving Pod behind a Service.
#[derive(Debug, Clone)]
pub struct ReadyPod {
    /// Its name (the slice's `targetRef`).
    pub name: String,
    /// Its address.
    pub ip: IpAddr,
    /// The node it runs on (`nodeName`).
    pub node: String,
}

impl ReadyPod {
    /// A Pod `name` at `ip` on `node`.
    pub fn new(name: impl Into<String>, ip: impl Into<IpAddr>, node: impl Into<String>) -> ReadyPod {
        ReadyPod { name: name.into(), ip: ip.into(), node: node.into() }
    }
}

/// YAML documents as one multi-document text.
pub fn join(docs: &[String]) -> String {
    docs.join("---\n")
}

/// A ClusterIP Service `ns/name` on `cluster_ip` with one TCP port (`port_name`, `port` → `target`), and its
/// EndpointSlice `{name}-1` listing `pods` as ready and serving.
pub fn service_with_pods(
    ns: &str,
    name: &str,
    cluster_ip: impl Into<IpAddr>,
    port_name: &str,
    port: u16,
    target: u16,
    pods: &[ReadyPod],
) -> String {
    let ip = cluster_ip.into();
    let mut s = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
    - {{name: {port_name}, port: {port}, protocol: TCP, targetPort: {target}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: {port_name}, port: {target}, protocol: TCP}}
endpoints:
"
    );
    for p in pods {
        s += &format!(
            "  - addresses: [{ip}]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: {node}
    targetRef: {{kind: Pod, namespace: {ns}, name: {name}}}
",
            ip = p.ip,
            node = p.node,
            name = p.name
        );
    }
    s
}

/// The IngressClass `mesh`, naming our controller.
pub fn ingress_class() -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: mesh}}
spec: {{controller: {}}}
",
        xds_proto::INGRESS_CONTROLLER
    )
}

/// A `kubernetes.io/tls` Secret `ns/name` holding a PEM certificate chain and key.
pub fn tls_secret(ns: &str, name: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {ns}}}
type: kubernetes.io/tls
data:
  tls.crt: {crt}
  tls.key: {key}
",
        crt = b64(cert_pem),
        key = b64(key_pem)
    )
}

/// The full-path tests' Ingress `ns/shop` (class `mesh`): `tls_host` over TLS with the Secret `secret`, `/api` to
/// the Service `api` and `/` to `web`; `plain_host` `/` to `web`. Plain HTTP to `tls_host` is redirected to
/// HTTPS (asked for with `mesh.dev/ssl-redirect`; the default serves it).
pub fn shop_ingress(ns: &str, tls_host: &str, plain_host: &str, secret: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: {ns}
  annotations: {{mesh.dev/ssl-redirect: \"true\"}}
spec:
  ingressClassName: mesh
  tls:
    - hosts: [{tls_host}]
      secretName: {secret}
  rules:
    - host: {tls_host}
      http:
        paths:
          - {{path: /api, pathType: Prefix, backend: {{service: {{name: api, port: {{name: http}}}}}}}}
          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}
    - host: {plain_host}
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}
"
    )
}

/// An Ingress `ns/tls-only` as the Ingress conformance suite writes one: `host` listed under `tls` (Secret
/// `secret`) and `/` to the Service `web`, with no annotation, so plain HTTP to `host` is served, not redirected.
pub fn tls_host_ingress(ns: &str, host: &str, secret: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: tls-only, namespace: {ns}}}
spec:
  ingressClassName: mesh
  tls:
    - hosts: [{host}]
      secretName: {secret}
  rules:
    - host: {host}
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}
"
    )
}
