//! Ingress status: `status.loadBalancer.ingress` of the Ingresses we serve says where users reach them, as
//! `kubectl get ingress` shows and external-dns reads.
//!
//! The addresses come from the ingress Service's LoadBalancer status (`--publish-service ns/name`; its
//! `spec.externalIPs` when it has no load balancer address), or are given (`--publish-address`). The app loop
//! hands the writer a [`View`] after each change; the writer, only while it leads (see [`lease`]), patches
//! each Ingress whose status differs:
//! - an Ingress of our classes gets the published addresses;
//! - an Ingress we do not serve (its class changed, our IngressClass was deleted) is cleared, but only if its
//!   status holds our addresses or this process wrote it: another controller's status is never touched.
//!
//! Writes are JSON merge patches of the `status` subresource (RBAC: `patch` on `ingresses/status`). A failed write
//! is retried after `retry`; the watch then brings the written status back into the store, and the next [`View`]
//! matches.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::networking::v1::{Ingress, IngressLoadBalancerIngress, IngressPortStatus};
use kube::Api;
use kube::api::{Patch, PatchParams};
use mesh_runtime::Shutdown;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub mod lease;

pub use lease::{Leadership, LeaseSettings};

use crate::model::NsName;
use crate::source::kubernetes::KubeError;
use crate::store::Store;

/// Where the addresses written into Ingress status come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// The LoadBalancer status of this Service (the ingress proxies' Service).
    Service(NsName),
    /// These IPs or hostnames.
    Addresses(Vec<String>),
}

impl Publish {
    /// Parses `--publish-service namespace/name`.
    pub fn service(value: &str) -> Result<Self, KubeError> {
        match value.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Publish::Service(NsName::new(ns, name)))
            }
            _ => Err(KubeError::PublishService(value.to_owned())),
        }
    }
}

/// Ingress status writing: what to publish and the Lease that elects the one writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSettings {
    /// The addresses to publish.
    pub publish: Publish,
    /// The leader Lease.
    pub lease: LeaseSettings,
    /// Delay before retrying failed writes.
    pub retry: Duration,
}

/// One Ingress as the writer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Whether it is of one of our IngressClasses.
    pub served: bool,
    /// Its `status.loadBalancer.ingress` now, sorted.
    pub current: Vec<IngressLoadBalancerIngress>,
}

/// What the writer works from: the published addresses and every Ingress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// The addresses to write on served Ingresses, sorted.
    pub publish: Vec<IngressLoadBalancerIngress>,
    /// Every Ingress in the store.
    pub ingresses: BTreeMap<NsName, Entry>,
}

fn sort(mut v: Vec<IngressLoadBalancerIngress>) -> Vec<IngressLoadBalancerIngress> {
    v.sort_by(|a, b| (&a.ip, &a.hostname).cmp(&(&b.ip, &b.hostname)));
    v.dedup();
    v
}

/// The addresses to publish, from the store (for [`Publish::Service`]) or the flag.
pub fn published(store: &Store, publish: &Publish) -> Vec<IngressLoadBalancerIngress> {
    let out = match publish {
        Publish::Addresses(addrs) => addrs
            .iter()
            .map(|a| match a.parse::<IpAddr>() {
                Ok(_) => IngressLoadBalancerIngress { ip: Some(a.clone()), ..Default::default() },
                Err(_) => IngressLoadBalancerIngress { hostname: Some(a.clone()), ..Default::default() },
            })
            .collect(),
        Publish::Service(key) => {
            let Some(svc) = store.service(key) else { return Vec::new() };
            let lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
            match lb.filter(|l| !l.is_empty()) {
                Some(lb) => lb
                    .iter()
                    .map(|i| IngressLoadBalancerIngress {
                        ip: i.ip.clone(),
                        hostname: i.hostname.clone(),
                        ports: i.ports.as_ref().map(|ps| {
                            ps.iter()
                                .map(|p| IngressPortStatus {
                                    port: p.port,
                                    protocol: p.protocol.clone(),
                                    error: p.error.clone(),
                                })
                                .collect()
                        }),
                    })
                    .collect(),
                None => svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.external_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|ip| IngressLoadBalancerIngress { ip: Some(ip.clone()), ..Default::default() })
                    .collect(),
            }
        }
    };
    sort(out)
}

/// Builds the writer's view: O(Ingresses), so the app loop builds it only when Ingresses or the published
/// Service may have changed.
pub fn view(store: &Store, served: &BTreeSet<NsName>, publish: &Publish) -> View {
    let ingresses = store
        .ingresses()
        .map(|(key, ing)| {
            let current = ing
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.clone())
                .unwrap_or_default();
            (key.clone(), Entry { served: served.contains(key), current: sort(current) })
        })
        .collect();
    View { publish: published(store, publish), ingresses }
}

/// What the status of one Ingress should become, if it must change.
fn desired(
    key: &NsName,
    e: &Entry,
    publish: &[IngressLoadBalancerIngress],
    written: &BTreeSet<NsName>,
) -> Option<Vec<IngressLoadBalancerIngress>> {
    let want = if e.served {
        publish.to_vec()
    } else if !e.current.is_empty() && (e.current == publish || written.contains(key)) {
        Vec::new()
    } else {
        return None;
    };
    (want != e.current).then_some(want)
}

/// Starts the writer: it follows `views` and writes while `leadership` says we lead, until `shutdown`.
pub fn spawn(
    client: kube::Client,
    mut views: watch::Receiver<Option<View>>,
    mut leadership: Leadership,
    retry: Duration,
    shutdown: Shutdown,
    metrics: crate::source::kubernetes::KubeMetrics,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Ingresses this process set to our addresses: cleared when we stop serving them even if the published
        // addresses changed meanwhile.
        let mut written: BTreeSet<NsName> = BTreeSet::new();
        let mut failed = false;
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                r = views.changed() => if r.is_err() { return },
                more = leadership.changed() => if !more { return },
                _ = tokio::time::sleep(retry), if failed => {}
            }
            failed = false;
            if !leadership.is_leader() {
                continue;
            }
            let Some(view) = views.borrow_and_update().clone() else { continue };
            for (key, entry) in &view.ingresses {
                let Some(want) = desired(key, entry, &view.publish, &written) else {
                    if entry.served && !entry.current.is_empty() {
                        written.insert(key.clone());
                    }
                    continue;
                };
                // Leadership may be lost mid-pass (a slow API server): stop writing at once.
                if !leadership.is_leader() || shutdown.is_triggered() {
                    break;
                }
                let api: Api<Ingress> = Api::namespaced(client.clone(), &key.namespace);
                let value = if want.is_empty() { serde_json::Value::Null } else { serde_json::json!(want) };
                let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": value}}});
                match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {
                        metrics.status_write(true);
                        info!(ingress = %key, addresses = want.len(), "Ingress status written");
                        if want.is_empty() {
                            written.remove(key);
                        } else {
                            written.insert(key.clone());
                        }
                    }
                    // Deleted meanwhile: the watch will drop it from the view.
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        metrics.status_write(false);
                        warn!(ingress = %key, "cannot write Ingress status: {e} (check the ClusterRole granting patch on ingresses/status)");
                        failed = true;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(ip: &str) -> IngressLoadBalancerIngress {
        IngressLoadBalancerIngress { ip: Some(ip.into()), ..Default::default() }
    }

    #[test]
    fn desired_status_serves_ours_and_clears_only_what_we_wrote() {
        let publish = vec![lb("1.2.3.4")];
        let key = NsName::new("ns", "a");
        let none = BTreeSet::new();
        let e = |served, current: Vec<IngressLoadBalancerIngress>| Entry { served, current };
        assert_eq!(desired(&key, &e(true, vec![]), &publish, &none), Some(publish.clone()));
        assert_eq!(desired(&key, &e(true, publish.clone()), &publish, &none), None);
        // Not ours any more, holding our address: cleared.
        assert_eq!(desired(&key, &e(false, publish.clone()), &publish, &none), Some(vec![]));
        // Another controller's status: untouched, unless this process wrote it (our address changed since).
        assert_eq!(desired(&key, &e(false, vec![lb("9.9.9.9")]), &publish, &none), None);
        let written = BTreeSet::from([key.clone()]);
        assert_eq!(desired(&key, &e(false, vec![lb("9.9.9.9")]), &publish, &written), Some(vec![]));
        assert_eq!(desired(&key, &e(false, vec![]), &publish, &written), None);
    }

    #[test]
    fn publish_flags_parse() {
        assert!(matches!(Publish::service("mesh-system/mesh-ingress"), Ok(Publish::Service(_))));
        assert!(Publish::service("mesh-ingress").is_err());
        assert!(Publish::service("a/b/c").is_err());
        let out = published(&Store::new(), &Publish::Addresses(vec!["lb.example.com".into(), "10.0.0.1".into()]));
        assert_eq!(out[0].hostname.as_deref(), Some("lb.example.com"));
        assert_eq!(out[1].ip.as_deref(), Some("10.0.0.1"));
    }
}
