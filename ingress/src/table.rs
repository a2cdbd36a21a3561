//! The ingress's whole configuration as one immutable value: what the xDS handler (the one writer) builds off
//! the request path and publishes with an atomic swap, and what every request reads once.
//!
//! Each resource type's update is converted against the previous table: only changed resources are decoded and
//! converted; unchanged ones are shared (`Arc`). A resource that fails conversion rejects the update of its type
//! (the NACK names it and says why) and the previous table stays in force. Dependencies are resolved late and
//! leniently, as Envoy does: a route naming a Cluster not (yet) known answers 503; a TLS host whose Secret has
//! not arrived gets no certificate (the default one, or a refused handshake).

use std::sync::Arc;

use imbl::{HashMap, OrdMap};

use prost::Message;
use xds_proto::hcm::{HttpConnectionManager, http_connection_manager::RouteSpecifier};
use xds_proto::listener::{Listener, filter};
use xds_proto::names;
use xds_proto::route::RouteConfiguration;
use xds_proto::tls::Secret;
use xds_proto::types::ResourceType;

use crate::routes::{RouteError, RouteTable};
use crate::tls::{Cert, CertTable, SniPlan, TlsError};
use crate::upstream::{Cluster, UpstreamError};

/// Why an update cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A resource does not decode as its type.
    #[error("{kind} resource {name}: does not decode: {reason}")]
    Decode {
        /// The type.
        kind: ResourceType,
        /// The resource.
        name: String,
        /// The decoder's message.
        reason: String,
    },
    /// A RouteConfiguration cannot be served.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A Secret or TLS chain cannot be served.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A ClusterLoadAssignment cannot be used.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A Listener cannot be served.
    #[error("listener {name}: {reason}")]
    Listener {
        /// The Listener.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What the ingress takes from a Listener: which RouteConfiguration it serves, and for TLS, which certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// The Listener's name (`ingress/http`, `ingress/https`).
    pub name: String,
    /// The RouteConfiguration its HTTP connection manager names (RDS).
    pub route_config: String,
    /// SNI → Secret, for a TLS listener.
    pub tls: Option<SniPlan>,
}

impl ListenerSpec {
    /// Reads a Listener: every filter chain must run an HTTP connection manager over RDS, all naming the same
    /// RouteConfiguration (the ingress serves one route table per port).
    pub fn from_listener(l: &Listener) -> Result<ListenerSpec, TableError> {
        let bad = |reason: String| TableError::Listener { name: l.name.clone(), reason };
        let mut route_config: Option<String> = None;
        let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
        let mut tls = false;
        for chain in chains {
            tls |= chain.transport_socket.is_some();
            let hcm = chain
                .filters
                .iter()
                .find_map(|f| match &f.config_type {
                    Some(filter::ConfigType::TypedConfig(any))
                        if any.type_url.ends_with("http_connection_manager.v3.HttpConnectionManager") =>
                    {
                        Some(HttpConnectionManager::decode(&any.value[..]))
                    }
                    _ => None,
                })
                .ok_or_else(|| bad(format!("filter chain {:?} has no HTTP connection manager", chain.name)))?
                .map_err(|e| bad(format!("filter chain {:?}: bad HTTP connection manager: {e}", chain.name)))?;
            let name = match hcm.route_specifier {
                Some(RouteSpecifier::Rds(rds)) => rds.route_config_name,
                _ => return Err(bad(format!("filter chain {:?}: routes must come over RDS", chain.name))),
            };
            match &route_config {
                None => route_config = Some(name),
                Some(other) if *other != name => {
                    return Err(bad(format!("filter chains name different route configurations ({other}, {name})")));
                }
                Some(_) => {}
            }
        }
        let route_config = route_config.ok_or_else(|| bad("no filter chain".into()))?;
        let tls = if tls { Some(SniPlan::from_listener(l)?) } else { None };
        Ok(ListenerSpec { name: l.name.clone(), route_config, tls })
    }
}

/// The current configuration. Its maps are persistent (`imbl`): the next table shares everything an update did
/// not touch, so cloning it is cheap and a one-endpoint change costs O(that Cluster), not O(every Cluster).
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// The accepted version of each type.
    pub versions: OrdMap<ResourceType, String>,
    /// SDS: certificates by Secret name.
    pub secrets: OrdMap<String, Arc<Cert>>,
    /// CDS: the Clusters that exist.
    pub cluster_names: OrdMap<String, ()>,
    /// EDS: endpoints by Cluster name.
    pub assignments: OrdMap<String, Arc<Cluster>>,
    /// LDS.
    pub listeners: OrdMap<String, Arc<ListenerSpec>>,
    /// RDS, built.
    pub route_configs: OrdMap<String, Arc<RouteTable>>,
    /// Derived: every Cluster in CDS with its endpoints (none yet when EDS has not named it).
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// Derived: the routes of the plain-HTTP port.
    pub http: Arc<RouteTable>,
    /// Derived: the routes of the TLS port.
    pub https: Arc<RouteTable>,
    /// Derived: certificates by SNI.
    pub certs: Arc<CertTable>,
}

fn decode<M: Message + Default>(kind: ResourceType, name: &str, body: &[u8]) -> Result<M, TableError> {
    M::decode(body).map_err(|e| TableError::Decode { kind, name: name.to_owned(), reason: e.to_string() })
}

impl Table {
    /// The next table after an update of one type: `resources` gives the body of each `changed` name; `removed`
    /// names are gone. The current table is untouched, so an error leaves it in force.
    pub fn apply<'a>(
        &self,
        kind: ResourceType,
        resources: impl Fn(&str) -> Option<&'a [u8]>,
        changed: &[String],
        removed: &[String],
        version: &str,
    ) -> Result<Table, TableError> {
        let mut t = self.clone();
        let body = |name: &str| resources(name).unwrap_or_default();
        match kind {
            ResourceType::Secret => {
                for n in removed {
                    t.secrets.remove(n);
                }
                for n in changed {
                    let s: Secret = decode(kind, n, body(n))?;
                    t.secrets.insert(n.clone(), Arc::new(Cert::from_secret(&s)?));
                }
                t.rebuild_certs();
            }
            ResourceType::Cluster => {
                for n in removed {
                    t.cluster_names.remove(n);
                }
                for n in changed {
                    let _: xds_proto::cluster::Cluster = decode(kind, n, body(n))?;
                    t.cluster_names.insert(n.clone(), ());
                }
                t.rebuild_clusters(changed.iter().chain(removed));
            }
            ResourceType::ClusterLoadAssignment => {
                for n in removed {
                    t.assignments.remove(n);
                }
                for n in changed {
                    let cla: xds_proto::endpoint::ClusterLoadAssignment = decode(kind, n, body(n))?;
                    let prev = self.assignments.get(n).map(|c| &**c);
                    t.assignments.insert(n.clone(), Arc::new(Cluster::from_assignment(&cla, prev)?));
                }
                t.rebuild_clusters(changed.iter().chain(removed));
            }
            ResourceType::Listener => {
                for n in removed {
                    t.listeners.remove(n);
                }
                for n in changed {
                    let l: Listener = decode(kind, n, body(n))?;
                    t.listeners.insert(n.clone(), Arc::new(ListenerSpec::from_listener(&l)?));
                }
                t.rebuild_routes();
                t.rebuild_certs();
            }
            ResourceType::RouteConfiguration => {
                for n in removed {
                    t.route_configs.remove(n);
                }
                for n in changed {
                    let rc: RouteConfiguration = decode(kind, n, body(n))?;
                    t.route_configs.insert(n.clone(), Arc::new(RouteTable::build(&rc)?));
                }
                t.rebuild_routes();
            }
        }
        t.versions.insert(kind, version.to_owned());
        Ok(t)
    }

    /// The names of every resource of a type in the table.
    pub fn names(&self, kind: ResourceType) -> Vec<String> {
        match kind {
            ResourceType::Secret => self.secrets.keys().cloned().collect(),
            ResourceType::Cluster => self.cluster_names.keys().cloned().collect(),
            ResourceType::ClusterLoadAssignment => self.assignments.keys().cloned().collect(),
            ResourceType::Listener => self.listeners.keys().cloned().collect(),
            ResourceType::RouteConfiguration => self.route_configs.keys().cloned().collect(),
        }
    }

    /// Brings the joined Cluster map up to date for the names an update touched.
    fn rebuild_clusters<'a>(&mut self, touched: impl Iterator<Item = &'a String>) {
        for n in touched {
            let key: Arc<str> = Arc::from(n.as_str());
            if self.cluster_names.contains_key(n) {
                let c = self
                    .assignments
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Cluster { name: key.clone(), endpoints: Vec::new() }));
                self.clusters.insert(key, c);
            } else {
                self.clusters.remove(&key);
            }
        }
    }

    fn routes_of(&self, listener: &str) -> Arc<RouteTable> {
        self.listeners.get(listener).and_then(|l| self.route_configs.get(&l.route_config)).cloned().unwrap_or_default()
    }

    fn rebuild_routes(&mut self) {
        self.http = self.routes_of(names::INGRESS_HTTP);
        self.https = self.routes_of(names::INGRESS_HTTPS);
    }

    fn rebuild_certs(&mut self) {
        let plan = self.listeners.get(names::INGRESS_HTTPS).and_then(|l| l.tls.clone()).unwrap_or_default();
        self.certs = Arc::new(CertTable::build(&plan, |n| self.secrets.get(n).cloned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{prefix, vhost};
    use crate::tls::tests::{secret, self_signed};
    use crate::upstream::tests::cla;
    use xds_proto::core::HealthStatus;

    fn apply(t: &Table, kind: ResourceType, items: Vec<(String, Vec<u8>)>) -> Result<Table, TableError> {
        let map: std::collections::BTreeMap<String, Vec<u8>> = items.into_iter().collect();
        let names: Vec<String> = map.keys().cloned().collect();
        t.apply(kind, |n| map.get(n).map(|b| &b[..]), &names, &[], "v1")
    }

    #[test]
    fn bad_resources_name_themselves_and_leave_the_table() {
        let t = Table::default();
        let rc = RouteConfiguration {
            name: names::INGRESS_HTTP.into(),
            virtual_hosts: vec![vhost("a.com", vec![prefix("/", "ns/svc/80")])],
            ..Default::default()
        };
        let t = apply(&t, ResourceType::RouteConfiguration, vec![(rc.name.clone(), rc.encode_to_vec())]).unwrap();
        assert_eq!(t.route_configs.len(), 1);
        let e = apply(&t, ResourceType::RouteConfiguration, vec![("broken".into(), vec![0xff, 0xff])]).unwrap_err();
        assert!(e.to_string().contains("rds resource broken"), "{e}");
        let (c, _) = self_signed(&["x.com"]);
        let (_, k) = self_signed(&["y.com"]);
        let s = secret("ns/tls", &c, &k);
        let e = apply(&t, ResourceType::Secret, vec![("ns/tls".into(), s.encode_to_vec())]).unwrap_err();
        assert!(e.to_string().contains("secret ns/tls"), "{e}");
    }

    #[test]
    fn clusters_join_cds_and_eds() {
        let t = Table::default();
        let c = xds_proto::cluster::Cluster { name: "ns/svc/80".into(), ..Default::default() };
        let t = apply(&t, ResourceType::Cluster, vec![(c.name.clone(), c.encode_to_vec())]).unwrap();
        assert!(t.clusters["ns/svc/80"].endpoints.is_empty());
        let a = cla("ns/svc/80", &[("127.0.0.1:9".parse().unwrap(), HealthStatus::Healthy)]);
        let t =
            apply(&t, ResourceType::ClusterLoadAssignment, vec![(a.cluster_name.clone(), a.encode_to_vec())]).unwrap();
        assert_eq!(t.clusters["ns/svc/80"].endpoints.len(), 1);
    }
}
