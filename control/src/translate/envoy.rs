//! Small builders for the Envoy messages translation emits, so the translation code reads as Kubernetes logic.

use std::net::IpAddr;

use xds_proto::codec::pack_any;
use xds_proto::core::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, TransportSocket, address,
    config_source::ConfigSourceSpecifier, socket_address,
};
use xds_proto::listener::{Filter, FilterChain, ListenerFilter, filter, listener_filter};
use xds_proto::protobuf::Duration;

/// The IP protocol of a Service port we proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// A socket address for a listener or an endpoint.
pub fn socket(ip: IpAddr, port: u16, protocol: Protocol) -> Address {
    let protocol = match protocol {
        Protocol::Tcp => socket_address::Protocol::Tcp,
        Protocol::Udp => socket_address::Protocol::Udp,
    };
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: protocol as i32,
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// "Fetch this over the same ADS stream", the only config source we use.
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// A duration from milliseconds.
pub fn millis(ms: u64) -> Duration {
    Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// A network filter with a typed config.
pub fn network_filter<M: prost::Message + prost::Name>(name: &str, config: &M) -> Filter {
    Filter { name: name.to_owned(), config_type: Some(filter::ConfigType::TypedConfig(pack_any(config))) }
}

/// A listener filter with a typed config (UDP proxies are listener filters).
pub fn listener_filter<M: prost::Message + prost::Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.to_owned(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(config))),
        ..Default::default()
    }
}

/// A filter chain holding one network filter.
pub fn chain(filter: Filter, transport_socket: Option<TransportSocket>) -> FilterChain {
    FilterChain { filters: vec![filter], transport_socket, ..Default::default() }
}

/// Envoy's TCP proxy filter to one cluster; with session affinity, hashing on the source IP (the cluster is
/// RING_HASH then).
pub fn tcp_proxy(cluster: &str, affinity: bool) -> Filter {
    use xds_proto::envoy_type::{HashPolicy, hash_policy};
    use xds_proto::tcp_proxy::{TcpProxy, tcp_proxy::ClusterSpecifier};
    let cfg = TcpProxy {
        stat_prefix: cluster.to_owned(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_owned())),
        hash_policy: if affinity {
            vec![HashPolicy {
                policy_specifier: Some(hash_policy::PolicySpecifier::SourceIp(hash_policy::SourceIp {})),
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    network_filter("envoy.filters.network.tcp_proxy", &cfg)
}

/// Envoy's UDP proxy (a listener filter) to one cluster, routed with a matcher whose only action is the
/// cluster (the `cluster` field is deprecated in Envoy's API).
pub fn udp_proxy(cluster: &str, affinity: bool) -> ListenerFilter {
    use xds_proto::udp_proxy::{Route, UdpProxyConfig, udp_proxy_config};
    use xds_proto::xds_core::TypedExtensionConfig;
    use xds_proto::xds_matcher::{Matcher, matcher::OnMatch, matcher::on_match};
    let route = TypedExtensionConfig {
        name: "route".into(),
        typed_config: Some(pack_any(&Route { cluster: cluster.to_owned() })),
    };
    let cfg = UdpProxyConfig {
        stat_prefix: cluster.to_owned(),
        route_specifier: Some(udp_proxy_config::RouteSpecifier::Matcher(Matcher {
            on_no_match: Some(Box::new(OnMatch {
                on_match: Some(on_match::OnMatch::Action(route)),
                keep_matching: false,
            })),
            ..Default::default()
        })),
        hash_policies: if affinity {
            vec![udp_proxy_config::HashPolicy {
                policy_specifier: Some(udp_proxy_config::hash_policy::PolicySpecifier::SourceIp(true)),
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    listener_filter("envoy.filters.udp_listener.udp_proxy", &cfg)
}
