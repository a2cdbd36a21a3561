//! Property tests: random clusters (drawn from small pools of names, addresses and ports so that objects
//! collide, conflict and refer to each other) never make translation panic, always translate to byte-identical
//! snapshots, and the incremental translator always agrees with the full one.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::model::{Object, Parsed};
use crate::store::Store;

const NAMES: &[&str] = &["a", "b", "c"];
const IPS: &[&str] = &["10.96.0.1", "10.96.0.2", "fd00::1", "None", "300.1.1.1", ""];
const EP_IPS: &[&str] = &["10.0.0.1", "10.0.0.2", "fd00::5", "nope", "10.0.0.1"];
const PORT_NAMES: &[&str] = &["", "http", "grpc"];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "QUIC"];
const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Weird"];
const HOSTS: &[&str] = &["", "a.example.com", "*.example.com", "b.example.com", "1.2.3.4", "Bad_Host"];
const PATHS: &[&str] = &["/", "/a", "/a/", "/a/b", "relative", "/q?x", ""];
const PATH_TYPES: &[&str] = &["Exact", "Prefix", "ImplementationSpecific", "Regex"];
const CLASSES: &[&str] = &["mesh", "nginx", "other"];

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = &'static str> + Clone {
    proptest::sample::select(pool)
}

fn opt_bool() -> impl Strategy<Value = Value> {
    prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool)]
}

fn service() -> impl Strategy<Value = Value> {
    let port = (pick(PORT_NAMES), 0..70_000i32, pick(PROTOCOLS), proptest::option::of(30_000..30_010i32));
    (
        pick(NAMES),
        pick(TYPES),
        proptest::collection::vec(pick(IPS), 0..3),
        proptest::collection::vec(port, 0..3),
        any::<bool>(),
        pick(&["Cluster", "Local"]),
        proptest::option::of(0..3i64),
    )
        .prop_map(|(name, ty, ips, ports, affinity, policy, age)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(n, p, proto, np)| json!({"name": n, "port": p, "protocol": proto, "nodePort": np}))
                .collect();
            let mut meta = json!({"name": name, "namespace": "ns"});
            if let Some(age) = age {
                meta["creationTimestamp"] = json!(format!("202{age}-01-01T00:00:00Z"));
            }
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {"type": ty, "clusterIPs": ips, "ports": ports, "externalTrafficPolicy": policy,
                    "internalTrafficPolicy": policy,
                    "sessionAffinity": if affinity { "ClientIP" } else { "None" }},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}})
        })
}

fn slice() -> impl Strategy<Value = Value> {
    let ep = (pick(EP_IPS), opt_bool(), opt_bool(), opt_bool(), proptest::option::of(pick(&["n1", "n2"])));
    (
        0..4u8,
        pick(NAMES),
        pick(&["IPv4", "IPv6", "FQDN"]),
        proptest::collection::vec((pick(PORT_NAMES), proptest::option::of(0..70_000i32), pick(PROTOCOLS)), 0..3),
        proptest::collection::vec(ep, 0..4),
    )
        .prop_map(|(i, svc, family, ports, eps)| {
            let ports: Vec<Value> =
                ports.into_iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect();
            let eps: Vec<Value> = eps
                .into_iter()
                .map(|(ip, r, s, t, node)| {
                    json!({"addresses": [ip], "nodeName": node,
                        "conditions": {"ready": r, "serving": s, "terminating": t}})
                })
                .collect();
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{svc}-{i}"), "namespace": "ns",
                    "labels": {"kubernetes.io/service-name": svc}},
                "addressType": family, "ports": ports, "endpoints": eps})
        })
}

fn ingress() -> impl Strategy<Value = Value> {
    let backend = (
        pick(NAMES),
        prop_oneof![(0..100i32).prop_map(|n| json!({"number": n})), pick(PORT_NAMES).prop_map(|n| json!({"name": n}))],
    );
    let path = (pick(PATHS), pick(PATH_TYPES), backend.clone());
    let rule = (pick(HOSTS), proptest::collection::vec(path, 0..4));
    (
        pick(NAMES),
        proptest::option::of(pick(CLASSES)),
        proptest::collection::vec(rule, 0..3),
        proptest::option::of(backend),
        proptest::collection::vec((proptest::collection::vec(pick(HOSTS), 0..2), pick(NAMES)), 0..2),
        0..3i64,
    )
        .prop_map(|(name, class, rules, default, tls, age)| {
            let b = |(svc, port): (&str, Value)| json!({"service": {"name": svc, "port": port}});
            let rules: Vec<Value> = rules
                .into_iter()
                .map(|(host, paths)| {
                    let paths: Vec<Value> = paths
                        .into_iter()
                        .map(|(p, t, be)| json!({"path": p, "pathType": t, "backend": b(be)}))
                        .collect();
                    json!({"host": host, "http": {"paths": paths}})
                })
                .collect();
            let tls: Vec<Value> =
                tls.into_iter().map(|(hosts, secret)| json!({"hosts": hosts, "secretName": secret})).collect();
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": format!("ing-{name}"), "namespace": "ns",
                    "creationTimestamp": format!("202{age}-01-01T00:00:00Z")},
                "spec": {"ingressClassName": class, "rules": rules, "tls": tls,
                    "defaultBackend": default.map(b)}})
        })
}

fn others() -> impl Strategy<Value = Value> {
    prop_oneof![
        (pick(CLASSES), any::<bool>(), any::<bool>()).prop_map(|(name, ours, default)| {
            let controller = if ours { xds_proto::INGRESS_CONTROLLER } else { "k8s.io/ingress-nginx" };
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                "metadata": {"name": name, "annotations": {"ingressclass.kubernetes.io/is-default-class": default.to_string()}},
                "spec": {"controller": controller}})
        }),
        (pick(NAMES), any::<bool>()).prop_map(|(name, good)| {
            // "LS0t" is base64 of "---": not PEM.
            let crt = if good { "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=" } else { "LS0t" };
            let key = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JR0gKLS0tLS1FTkQgUFJJVkFURSBLRVktLS0tLQo=";
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": name, "namespace": "ns"}, "data": {"tls.crt": crt, "tls.key": key}})
        }),
        (pick(&["n1", "n2"]), pick(&["z1", "z2"])).prop_map(|(name, zone)| {
            json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
        }),
    ]
}

fn object() -> impl Strategy<Value = Value> {
    prop_oneof![3 => service(), 3 => slice(), 3 => ingress(), 2 => others()]
}

fn parse(v: Value) -> Option<Object> {
    match Object::parse(v) {
        Ok(Parsed::Object(o)) => Some(o),
        _ => None,
    }
}

fn encoded(s: &Snapshot) -> Vec<(String, String, Vec<u8>)> {
    let roles = std::iter::once(("proxy".to_owned(), &s.proxy)).chain(s.ingress.iter().map(|(c, r)| (c.clone(), r)));
    let mut out = Vec::new();
    for (role, r) in roles {
        for t in xds_proto::types::ResourceType::ALL {
            for (name, res) in r.get(t) {
                out.push((role.clone(), format!("{t}/{name}@{}", res.version), res.body.to_vec()));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any mix of objects: no panic, the same snapshot bytes every time, and every resource decodes back.
    #[test]
    fn translation_is_total_and_deterministic(objs in proptest::collection::vec(object(), 0..16)) {
        let mut st = Store::new();
        for o in objs.iter().cloned().filter_map(parse) {
            st.apply(o);
        }
        let a = translate(&st, &Options::default());
        let b = translate(&st.clone(), &Options::default());
        prop_assert_eq!(encoded(&a), encoded(&b));
        for (_, name, body) in encoded(&a) {
            let url = match name.split('/').next().unwrap() {
                "lds" => xds_proto::types::LISTENER,
                "cds" => xds_proto::types::CLUSTER,
                "eds" => xds_proto::types::CLUSTER_LOAD_ASSIGNMENT,
                "rds" => xds_proto::types::ROUTE_CONFIGURATION,
                _ => xds_proto::types::SECRET,
            };
            prop_assert!(xds_proto::codec::to_json(url, &body).is_ok(), "{} does not decode", name);
        }
    }

    /// Objects applied (and some deleted again) one change at a time through the incremental translator give
    /// the same snapshot as a full translation of the final store.
    #[test]
    fn incremental_equals_full(objs in proptest::collection::vec(object(), 0..16), deletes in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4)) {
        let objs: Vec<Object> = objs.into_iter().filter_map(parse).collect();
        let mut st = Store::new();
        let mut t = Translator::new(Options::default());
        t.full(&st);
        for o in &objs {
            let ch = st.apply(o.clone());
            t.update(&st, &ch);
        }
        if !objs.is_empty() {
            for d in deletes {
                let r = objs[d.index(objs.len())].object_ref();
                let ch = st.delete(&r);
                t.update(&st, &ch);
            }
        }
        let full = translate(&st, &Options::default());
        prop_assert_eq!(encoded(t.snapshot()), encoded(&full));
        prop_assert_eq!(&t.snapshot().problems, &full.problems);
    }

    /// Arbitrary JSON documents never panic the manifest parser.
    #[test]
    fn parse_never_panics(kind in pick(&["Service", "EndpointSlice", "Ingress", "IngressClass", "Secret", "Node", "List"]),
                          api in pick(&["v1", "discovery.k8s.io/v1", "networking.k8s.io/v1", "x/v1"]),
                          spec in proptest::arbitrary::any::<Vec<(String, i64)>>()) {
        let fields: serde_json::Map<String, Value> = spec.into_iter().map(|(k, v)| (k, json!(v))).collect();
        let doc = json!({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}, "spec": fields, "items": [fields.clone()]});
        let _ = crate::model::parse_document(doc);
    }
}
