//! Upstream clusters (one per Service port) and which endpoint a request goes to.
//!
//! - Endpoints come from the ClusterLoadAssignment: `HEALTHY` (ready) ones are used; `DRAINING`
//!   (serving-but-terminating) ones only when no endpoint is ready (KEP-1669), as the node proxy does;
//!   `UNHEALTHY` never.
//! - **Least request by the power of two choices**: two random candidates, the one with fewer requests in flight
//!   wins. Near-optimal spread with O(1) work and no shared state to contend on. Not EWMA-latency aware:
//!   in-flight counts already penalise a slow endpoint (its requests pile up), without a decay constant to tune.
//! - **Ejection**: [`EJECT_AFTER_FAILURES`] failed connects in a row take an endpoint out for [`EJECT_FOR`];
//!   if every candidate is ejected they are all used anyway (better a likely failure than a certain 503).
//! - Per-endpoint counters survive configuration updates (matched by address), so an EDS push does not reset
//!   in-flight counts or ejections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use xds_proto::core::{HealthStatus, address, socket_address};
use xds_proto::endpoint::{ClusterLoadAssignment, lb_endpoint};

pub use mesh_runtime::endpoint::{EJECT_AFTER_FAILURES, EJECT_FOR, EndpointStats, InFlight, now_ms};

/// Why a ClusterLoadAssignment cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// An endpoint has no usable socket address.
    #[error("cluster load assignment {cluster}: endpoint {index}: {reason}")]
    Endpoint {
        /// The cluster.
        cluster: String,
        /// Position among all endpoints.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// Whether an endpoint takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Ready.
    Ready,
    /// Terminating but still serving: used only when nothing is ready.
    Terminating,
}

/// One endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Ready or terminating.
    pub health: Health,
    /// Its counters.
    pub stats: Arc<EndpointStats>,
}

/// One Service port's endpoints.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// `{ns}/{service}/{port}`.
    pub name: Arc<str>,
    /// Usable endpoints (unhealthy ones are left out).
    pub endpoints: Vec<Endpoint>,
}

impl Cluster {
    /// Converts a ClusterLoadAssignment, carrying over the counters of endpoints `previous` already had.
    pub fn from_assignment(cla: &ClusterLoadAssignment, previous: Option<&Cluster>) -> Result<Cluster, UpstreamError> {
        let old: HashMap<SocketAddr, &Arc<EndpointStats>> =
            previous.map(|p| p.endpoints.iter().map(|e| (e.addr, &e.stats)).collect()).unwrap_or_default();
        let mut endpoints = Vec::new();
        let mut index = 0;
        for locality in &cla.endpoints {
            for lb in &locality.lb_endpoints {
                let at = index;
                let err = |reason: &str| UpstreamError::Endpoint {
                    cluster: cla.cluster_name.clone(),
                    index: at,
                    reason: reason.to_owned(),
                };
                index += 1;
                let health = match HealthStatus::try_from(lb.health_status) {
                    Ok(HealthStatus::Healthy) | Ok(HealthStatus::Unknown) => Health::Ready,
                    Ok(HealthStatus::Draining) => Health::Terminating,
                    _ => continue,
                };
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                    return Err(err("no endpoint address (named endpoints are not supported)"));
                };
                let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    return Err(err("not a socket address"));
                };
                let ip: std::net::IpAddr =
                    sa.address.parse().map_err(|_| err(&format!("address {:?} is not an IP", sa.address)))?;
                let port = match sa.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| err(&format!("port {p} out of range")))?,
                    _ => return Err(err("no port number")),
                };
                let addr = SocketAddr::new(ip, port);
                let stats = old.get(&addr).map(|s| (*s).clone()).unwrap_or_default();
                endpoints.push(Endpoint { addr, health, stats });
            }
        }
        Ok(Cluster { name: cla.cluster_name.as_str().into(), endpoints })
    }

    /// Picks an endpoint for a request, skipping those already `tried` (a retry after a failed connect): the
    /// best health tier, non-ejected if any, then least-request of two random choices.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<&Endpoint> {
        let now = now_ms();
        let usable = |e: &&Endpoint, tier: Health, skip_ejected: bool| {
            e.health == tier && !tried.contains(&e.addr) && !(skip_ejected && e.stats.ejected(now))
        };
        for tier in [Health::Ready, Health::Terminating] {
            for skip_ejected in [true, false] {
                let n = self.endpoints.iter().filter(|e| usable(e, tier, skip_ejected)).count();
                if n == 0 {
                    continue;
                }
                let nth = |i: usize| self.endpoints.iter().filter(|e| usable(e, tier, skip_ejected)).nth(i);
                if n == 1 {
                    return nth(0);
                }
                let (a, b) = mesh_runtime::endpoint::two_choices(n);
                let (a, b) = (nth(a)?, nth(b)?);
                return Some(if b.stats.in_flight() < a.stats.in_flight() { b } else { a });
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use xds_proto::core::{Address, SocketAddress};
    use xds_proto::endpoint::{LbEndpoint, LocalityLbEndpoints};

    pub(crate) fn cla(name: &str, eps: &[(SocketAddr, HealthStatus)]) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: eps
                    .iter()
                    .map(|(a, h)| LbEndpoint {
                        health_status: *h as i32,
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(xds_proto::endpoint::Endpoint {
                            address: Some(Address {
                                address: Some(address::Address::SocketAddress(SocketAddress {
                                    address: a.ip().to_string(),
                                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
                                    ..Default::default()
                                })),
                            }),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn ready_first_then_terminating_never_unhealthy() {
        let c = Cluster::from_assignment(
            &cla(
                "c",
                &[
                    (addr(1), HealthStatus::Draining),
                    (addr(2), HealthStatus::Unhealthy),
                    (addr(3), HealthStatus::Healthy),
                ],
            ),
            None,
        )
        .unwrap();
        assert_eq!(c.endpoints.len(), 2);
        for _ in 0..20 {
            assert_eq!(c.pick(&[]).unwrap().addr, addr(3));
        }
        assert_eq!(c.pick(&[addr(3)]).unwrap().addr, addr(1), "terminating only when no ready one is left");
        assert!(c.pick(&[addr(1), addr(3)]).is_none());
    }

    #[test]
    fn least_request_of_two() {
        let c = Cluster::from_assignment(
            &cla("c", &[(addr(1), HealthStatus::Healthy), (addr(2), HealthStatus::Healthy)]),
            None,
        )
        .unwrap();
        let _busy: Vec<_> = (0..5).map(|_| InFlight::new(&c.endpoints[0].stats)).collect();
        for _ in 0..20 {
            assert_eq!(c.pick(&[]).unwrap().addr, addr(2), "with two endpoints both are always compared");
        }
    }

    #[test]
    fn ejection_after_failures_and_counters_carry_over() {
        let c = Cluster::from_assignment(
            &cla("c", &[(addr(1), HealthStatus::Healthy), (addr(2), HealthStatus::Healthy)]),
            None,
        )
        .unwrap();
        let s = &c.endpoints[0].stats;
        assert!(!s.connect_failed());
        assert!(!s.connect_failed());
        assert!(s.connect_failed(), "the third failure in a row ejects");
        for _ in 0..20 {
            assert_eq!(c.pick(&[]).unwrap().addr, addr(2));
        }
        assert_eq!(c.pick(&[addr(2)]).unwrap().addr, addr(1), "ejected ones still serve when nothing else is left");
        let next = Cluster::from_assignment(
            &cla("c", &[(addr(1), HealthStatus::Healthy), (addr(3), HealthStatus::Healthy)]),
            Some(&c),
        )
        .unwrap();
        assert!(next.endpoints[0].stats.ejected(now_ms()), "the ejection survives an EDS update");
        assert!(Arc::ptr_eq(&next.endpoints[0].stats, s));
    }

    #[test]
    fn bad_addresses_are_refused() {
        let mut bad = cla("c", &[(addr(1), HealthStatus::Healthy)]);
        if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut bad.endpoints[0].lb_endpoints[0].host_identifier
            && let Some(address::Address::SocketAddress(sa)) = e.address.as_mut().and_then(|a| a.address.as_mut())
        {
            sa.address = "not-an-ip".into();
        }
        let e = Cluster::from_assignment(&bad, None).unwrap_err().to_string();
        assert!(e.contains("cluster load assignment c") && e.contains("not-an-ip"), "{e}");
    }
}
