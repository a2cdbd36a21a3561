//! Deterministic encoding and Envoy's JSON mapping of the resources we emit.
//!
//! Two problems, one descriptor set. prost generates protobuf `map` fields as `HashMap`, so two encodings of the
//! same metadata can differ byte-wise; versions derived from content and "byte-identical snapshots" need a
//! canonical form, which [`encode`] gives by sorting map entries at the wire level. And `envoy-types` has no
//! JSON mapping: [`to_json`] / [`from_json`] use `prost-reflect` over descriptors compiled (by `protox`, at
//! build time) from the `.proto` files shipped in the `envoy-types` package, so the JSON is the canonical
//! proto3 mapping a real Envoy reads, `Any` included.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex, PoisonError};

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};

use crate::protobuf::Any;

/// Why a resource could not be encoded, decoded or mapped to JSON.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The type is not in our descriptor set (check the type URL).
    #[error("unknown message type `{0}` (not one of the Envoy types this build knows)")]
    UnknownType(String),
    /// The bytes are not a valid encoding of the type.
    #[error("malformed protobuf for `{type_name}`: {reason}")]
    Malformed {
        /// Full protobuf name of the type.
        type_name: String,
        /// What was wrong.
        reason: String,
    },
    /// The JSON does not fit the type.
    #[error("invalid JSON for `{type_name}`: {reason}")]
    Json {
        /// Full protobuf name of the type.
        type_name: String,
        /// What was wrong.
        reason: String,
    },
}

/// What canonical encoding needs, kept for the life of the process (a few hundred KiB); the descriptor pool
/// it is derived from is not (see [`release_pool`]).
struct Plans {
    /// Every message type the pool knows (full names): to refuse an unknown type without the pool.
    known: HashSet<String>,
    /// A walk plan for every message that contains a map field, directly or through a message field: the only
    /// ones worth rewriting. Indexed by position; `plan_of` finds a message's plan by name.
    plans: Vec<Plan>,
    plan_of: HashMap<String, usize>,
}

/// What to do with each length-delimited field of a message that holds maps.
#[derive(Debug, Default)]
struct Plan {
    /// By field number, sorted: the fields that need work. Every other field is copied as it is.
    fields: Vec<(u32, Step)>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// A map field: its entries are collected, made canonical with this plan (or copied when `None`), and
    /// written sorted at the end of the message.
    Map(Option<usize>),
    /// A message field that holds maps somewhere below: rewritten in place with this plan.
    Recurse(usize),
}

impl Plan {
    fn step(&self, number: u32) -> Option<Step> {
        self.fields.binary_search_by_key(&number, |(n, _)| *n).ok().map(|i| self.fields[i].1)
    }
}

/// The descriptor pool, decoded on first use and kept until [`release_pool`].
static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

static PLANS: LazyLock<Plans> = LazyLock::new(|| {
    let pool = pool();
    let known = pool.all_messages().map(|m| m.full_name().to_owned()).collect();
    let mut has_map: HashSet<String> =
        pool.all_messages().filter(|m| m.fields().any(|f| f.is_map())).map(|m| m.full_name().to_owned()).collect();
    loop {
        let before = has_map.len();
        for m in pool.all_messages() {
            if has_map.contains(m.full_name()) {
                continue;
            }
            let nested = m.fields().any(|f| match f.kind() {
                Kind::Message(inner) => has_map.contains(inner.full_name()),
                _ => false,
            });
            if nested {
                has_map.insert(m.full_name().to_owned());
            }
        }
        if has_map.len() == before {
            break;
        }
    }
    let mut names: Vec<&String> = has_map.iter().collect();
    names.sort();
    let plan_of: HashMap<String, usize> = names.iter().enumerate().map(|(i, n)| ((*n).clone(), i)).collect();
    let plans = names
        .iter()
        .map(|name| {
            let m = pool.get_message_by_name(name).expect("a message of the pool");
            let mut fields: Vec<(u32, Step)> = m
                .fields()
                .filter_map(|f| match f.kind() {
                    Kind::Message(inner) if f.is_map() => {
                        Some((f.number(), Step::Map(plan_of.get(inner.full_name()).copied())))
                    }
                    Kind::Message(inner) => plan_of.get(inner.full_name()).map(|i| (f.number(), Step::Recurse(*i))),
                    _ => None,
                })
                .collect();
            fields.sort_by_key(|(n, _)| *n);
            Plan { fields }
        })
        .collect();
    Plans { known, plans, plan_of }
});

/// The descriptor pool of every Envoy type we emit (and what they import). A cheap handle (the pool is
/// reference-counted); decoded again after a [`release_pool`].
pub fn pool() -> DescriptorPool {
    let mut slot = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    slot.get_or_insert_with(|| {
        DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"))[..])
            .expect("the descriptor set compiled by build.rs decodes")
    })
    .clone()
}

/// Drops the cached descriptor pool (about 8 MiB of heap). Only the JSON mapping needs it: a node proxy reads
/// one snapshot file at start and then never again, so it gives the memory back. Handles already taken stay
/// valid; the next [`to_json`]/[`from_json`] decodes the pool again.
pub fn release_pool() {
    POOL.lock().unwrap_or_else(PoisonError::into_inner).take();
}

fn type_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, n)| n)
}

fn descriptor(type_url: &str) -> Result<MessageDescriptor, CodecError> {
    let name = type_name(type_url);
    pool().get_message_by_name(name).ok_or_else(|| CodecError::UnknownType(name.to_owned()))
}

/// Encodes a message canonically: the same message always gives the same bytes.
pub fn encode<M: Message + prost::Name>(msg: &M) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    match canonicalize(&M::full_name(), &raw) {
        Ok(bytes) => bytes,
        // A type outside the descriptor set has no maps we fill; its plain encoding stands.
        Err(_) => raw,
    }
}

/// Packs a message into an `Any`, canonically encoded.
pub fn pack_any<M: Message + prost::Name>(msg: &M) -> Any {
    Any { type_url: M::type_url(), value: encode(msg) }
}

/// Rewrites an encoding of `type_name` (full name or type URL) into canonical form: the entries of every map
/// sorted (and written after the message's other fields), at every depth. Other bytes are kept as they are.
/// Sorting never changes a length, so nested messages are rewritten in place.
pub fn canonicalize(type_name: &str, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    let name = self::type_name(type_name);
    let plans = &*PLANS;
    if !plans.known.contains(name) {
        return Err(CodecError::UnknownType(name.to_owned()));
    }
    let mut out = Vec::with_capacity(bytes.len());
    match plans.plan_of.get(name) {
        None => out.extend_from_slice(bytes),
        Some(plan) => canon_message(*plan, bytes, &mut out)
            .map_err(|reason| CodecError::Malformed { type_name: name.to_owned(), reason })?,
    }
    Ok(out)
}

fn read_varint(input: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *input.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

thread_local! {
    /// Scratch buffers for map entries, reused across calls (one per nesting depth in use).
    static SCRATCH: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn canon_message(plan: usize, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let plan = &PLANS.plans[plan];
    // Map entries, canonicalized into `scratch`: (field number, start, end), in order of appearance.
    let mut entries: Vec<(u32, usize, usize)> = Vec::new();
    let mut scratch: Option<Vec<u8>> = None;
    let mut pos = 0;
    let result = (|| {
        while pos < input.len() {
            let start = pos;
            let key = read_varint(input, &mut pos)?;
            let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
            match key & 7 {
                0 => {
                    read_varint(input, &mut pos)?;
                    out.extend_from_slice(&input[start..pos]);
                }
                1 | 5 => {
                    pos += if key & 7 == 1 { 8 } else { 4 };
                    if pos > input.len() {
                        return Err("truncated fixed-width field".to_owned());
                    }
                    out.extend_from_slice(&input[start..pos]);
                }
                2 => {
                    let len = usize::try_from(read_varint(input, &mut pos)?).map_err(|_| "length out of range")?;
                    let body = pos;
                    let end = pos.checked_add(len).filter(|e| *e <= input.len()).ok_or("truncated field")?;
                    pos = end;
                    match plan.step(number) {
                        Some(Step::Map(entry_plan)) => {
                            let buf = scratch
                                .get_or_insert_with(|| SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default());
                            let from = buf.len();
                            match entry_plan {
                                Some(p) => canon_message(p, &input[body..end], buf)?,
                                None => buf.extend_from_slice(&input[body..end]),
                            }
                            entries.push((number, from, buf.len()));
                        }
                        Some(Step::Recurse(p)) => {
                            out.extend_from_slice(&input[start..body]);
                            canon_message(p, &input[body..end], out)?;
                        }
                        None => out.extend_from_slice(&input[start..end]),
                    }
                }
                w => return Err(format!("unsupported wire type {w} in field {number}")),
            }
        }
        Ok(())
    })();
    if let Some(buf) = &scratch {
        // By field, then by entry bytes. Nothing is dropped, so the message keeps its length (its parent wrote
        // that length before it).
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| buf[a.1..a.2].cmp(&buf[b.1..b.2])));
        for (number, from, to) in &entries {
            write_varint((u64::from(*number) << 3) | 2, out);
            write_varint((to - from) as u64, out);
            out.extend_from_slice(&buf[*from..*to]);
        }
    }
    if let Some(mut buf) = scratch {
        buf.clear();
        SCRATCH.with(|s| s.borrow_mut().push(buf));
    }
    result
}

/// Envoy's JSON mapping of an encoded resource (field names as in the `.proto`, as Envoy's config_dump prints).
pub fn to_json(type_url: &str, bytes: &[u8]) -> Result<serde_json::Value, CodecError> {
    let desc = descriptor(type_url)?;
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| CodecError::Malformed { type_name: desc.full_name().to_owned(), reason: e.to_string() })?;
    let opts = SerializeOptions::new().use_proto_field_name(true);
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| CodecError::Json { type_name: desc.full_name().to_owned(), reason: e.to_string() })
}

/// Encodes (canonically) a resource given in Envoy's JSON mapping; both `snake_case` and `lowerCamelCase` field
/// names are accepted, as Envoy does.
pub fn from_json(type_url: &str, json: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
    use serde::de::IntoDeserializer;
    let desc = descriptor(type_url)?;
    let msg = DynamicMessage::deserialize(desc.clone(), json.clone().into_deserializer()).map_err(
        |e: serde_json::Error| CodecError::Json { type_name: desc.full_name().to_owned(), reason: e.to_string() },
    )?;
    canonicalize(desc.full_name(), &msg.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::core::{Address, SocketAddress, socket_address::PortSpecifier};
    use crate::listener::{Filter, Listener, filter::ConfigType};
    use crate::meta;
    use crate::tcp_proxy::{TcpProxy, tcp_proxy::ClusterSpecifier};

    fn listener() -> Listener {
        let tcp = TcpProxy {
            stat_prefix: "web".into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster("shop/web/http".into())),
            ..Default::default()
        };
        Listener {
            name: "svc/shop/web/http@10.0.0.1".into(),
            address: Some(Address {
                address: Some(crate::core::address::Address::SocketAddress(SocketAddress {
                    address: "10.0.0.1".into(),
                    port_specifier: Some(PortSpecifier::PortValue(80)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![crate::listener::FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(ConfigType::TypedConfig(pack_any(&tcp))),
                }],
                ..Default::default()
            }],
            metadata: meta::build((0..20).map(|i| (meta::SERVICE, meta::MetaValue::Num(f64::from(i))))),
            ..Default::default()
        }
    }

    fn many_keys() -> Cluster {
        let keys = [
            meta::SERVICE,
            meta::PORT,
            meta::PROTOCOL,
            meta::ADDRESS_KIND,
            meta::TRAFFIC_POLICY,
            meta::AFFINITY_TIMEOUT_SECONDS,
            meta::INTERNAL_TRAFFIC_POLICY,
            meta::EXTERNAL_TRAFFIC_POLICY,
        ];
        Cluster {
            name: "a/b/c".into(),
            metadata: meta::build(keys.iter().map(|k| (*k, meta::MetaValue::Str(k.to_string())))),
            ..Default::default()
        }
    }

    #[test]
    fn encoding_is_canonical_across_hash_orders() {
        // Each build makes new HashMaps with new random seeds: the encodings must still agree.
        let first = encode(&many_keys());
        for _ in 0..50 {
            assert_eq!(encode(&many_keys()), first);
        }
        let decoded = Cluster::decode(&first[..]).unwrap();
        assert_eq!(decoded, many_keys());
    }

    #[test]
    fn nested_maps_are_canonical_at_every_depth() {
        use crate::endpoint::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints};
        let cla = || ClusterLoadAssignment {
            cluster_name: "a/b/80".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: (0..10)
                    .map(|i| LbEndpoint {
                        metadata: meta::build([
                            (meta::POD, meta::MetaValue::Str(format!("pod-{i}"))),
                            (meta::FOR_ZONES, meta::MetaValue::List(vec!["a".into(), "b".into()])),
                            (meta::FOR_NODES, meta::MetaValue::List(vec!["n".into()])),
                        ]),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let first = encode(&cla());
        for _ in 0..30 {
            assert_eq!(encode(&cla()), first);
        }
        assert_eq!(ClusterLoadAssignment::decode(&first[..]).unwrap(), cla());
        assert_eq!(canonicalize(crate::types::CLUSTER_LOAD_ASSIGNMENT, &first).unwrap(), first, "idempotent");
    }

    #[test]
    fn json_round_trip_keeps_any_and_bytes() {
        let l = listener();
        let bytes = encode(&l);
        let json = to_json(crate::types::LISTENER, &bytes).unwrap();
        let filter = &json["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(filter["@type"], "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy");
        assert_eq!(filter["cluster"], "shop/web/http");
        assert_eq!(json["address"]["socket_address"]["port_value"], 80);
        let back = from_json(crate::types::LISTENER, &json).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(to_json("type.googleapis.com/nope.Nope", &[]), Err(CodecError::UnknownType(_))));
        assert!(matches!(to_json(crate::types::LISTENER, &[0x0a, 0xff]), Err(CodecError::Malformed { .. })));
        let bad = serde_json::json!({"name": 5});
        assert!(matches!(from_json(crate::types::LISTENER, &bad), Err(CodecError::Json { .. })));
        assert!(canonicalize(crate::types::CLUSTER, &[0x0a, 0x05, 1]).is_err());
        assert!(canonicalize(crate::types::CLUSTER, &[0x0b]).is_err());
    }
}
