//! Type URLs of the resources in the snapshot, and the order in which they must reach a client.

use std::fmt;

/// `type.googleapis.com/envoy.config.listener.v3.Listener`
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `type.googleapis.com/envoy.config.cluster.v3.Cluster`
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment`
pub const CLUSTER_LOAD_ASSIGNMENT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// `type.googleapis.com/envoy.config.route.v3.RouteConfiguration`
pub const ROUTE_CONFIGURATION: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// `type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret`
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The five resource kinds of a snapshot.
///
/// The declaration order is the order in which additions must reach a client so that nothing is ever
/// referenced before it exists (Clusters, then their endpoints, then the Listeners/Routes that use them);
/// removals go in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    /// SDS: TLS certificates, needed before a listener that names them.
    Secret,
    /// CDS.
    Cluster,
    /// EDS.
    ClusterLoadAssignment,
    /// LDS.
    Listener,
    /// RDS.
    RouteConfiguration,
}

impl ResourceType {
    /// Every type, in the order additions are sent.
    pub const ALL: [ResourceType; 5] = [
        ResourceType::Secret,
        ResourceType::Cluster,
        ResourceType::ClusterLoadAssignment,
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
    ];

    /// The type URL used on the wire.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Secret => SECRET,
            ResourceType::Cluster => CLUSTER,
            ResourceType::ClusterLoadAssignment => CLUSTER_LOAD_ASSIGNMENT,
            ResourceType::Listener => LISTENER,
            ResourceType::RouteConfiguration => ROUTE_CONFIGURATION,
        }
    }

    /// The type for a type URL, if it is one of ours.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// The short xDS name (`lds`, `cds`, ...) used in logs, metrics and JSON keys.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Secret => "sds",
            ResourceType::Cluster => "cds",
            ResourceType::ClusterLoadAssignment => "eds",
            ResourceType::Listener => "lds",
            ResourceType::RouteConfiguration => "rds",
        }
    }

    /// The type for a short name.
    pub fn from_short(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.short() == s)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Name;

    #[test]
    fn type_urls_match_the_generated_types() {
        assert_eq!(crate::listener::Listener::type_url(), LISTENER);
        assert_eq!(crate::cluster::Cluster::type_url(), CLUSTER);
        assert_eq!(crate::endpoint::ClusterLoadAssignment::type_url(), CLUSTER_LOAD_ASSIGNMENT);
        assert_eq!(crate::route::RouteConfiguration::type_url(), ROUTE_CONFIGURATION);
        assert_eq!(crate::tls::Secret::type_url(), SECRET);
    }

    #[test]
    fn round_trips() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
            assert_eq!(ResourceType::from_short(t.short()), Some(t));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/x"), None);
    }
}
