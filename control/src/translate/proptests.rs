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
    let mut out: Vec<(String, String, Vec<u8>)> = s
        .nodes
        .iter()
        .map(|(n, r)| (format!("node {n}"), format!("eds/{}@{}", r.name, r.version), r.body.to_vec()))
        .collect();
    for (role, r) in roles {
        for t in xds_proto::types::ResourceType::ALL {
            for (name, res) in r.get(t) {
                out.push((role.clone(), format!("{t}/{name}@{}", res.version), res.body.to_vec()));
            }
        }
    }
    out
}

/// Paths that overlap (`/a` and `/a/` match the same requests) and nest.
const ROUTE_PATHS: &[&str] = &["/", "/a", "/a/", "/a/b", "/a/b/", "/ab", "/b/"];
const ROUTE_HOSTS: &[&str] = &["", "a.example.com", "*.example.com"];

/// Ingresses of class mesh with overlapping paths, unique names, and colliding ages.
fn routing_ingresses() -> impl Strategy<Value = Vec<Value>> {
    let path = (pick(ROUTE_PATHS), pick(&["Exact", "Prefix", "ImplementationSpecific"]), pick(NAMES));
    let rule = (pick(ROUTE_HOSTS), proptest::collection::vec(path, 1..4));
    let ing = (proptest::collection::vec(rule, 1..3), 0..2i64, proptest::option::of(pick(NAMES)));
    proptest::collection::vec(ing, 1..4).prop_map(|ings| {
        ings.into_iter()
            .enumerate()
            .map(|(i, (rules, age, default))| {
                let b = |svc: &str| json!({"service": {"name": svc, "port": {"number": 80}}});
                let rules: Vec<Value> = rules
                    .into_iter()
                    .map(|(host, paths)| {
                        let paths: Vec<Value> = paths
                            .into_iter()
                            .map(|(p, t, svc)| json!({"path": p, "pathType": t, "backend": b(svc)}))
                            .collect();
                        json!({"host": host, "http": {"paths": paths}})
                    })
                    .collect();
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                    "metadata": {"name": format!("ing-{i}"), "namespace": "ns",
                        "creationTimestamp": format!("202{age}-01-01T00:00:00Z")},
                    "spec": {"ingressClassName": "mesh", "rules": rules, "defaultBackend": default.map(b)}})
            })
            .collect()
    })
}

/// Fisher–Yates with a small deterministic generator.
fn shuffle<T>(v: &mut [T], seed: &mut u64) {
    for i in (1..v.len()).rev() {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = (*seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
}

/// The same Ingresses with their rules, and each rule's paths, in another order (and applied in another order).
fn shuffled(ings: &[Value], mut seed: u64) -> Vec<Value> {
    let mut out: Vec<Value> = ings.to_vec();
    for ing in &mut out {
        if let Some(rules) = ing["spec"]["rules"].as_array_mut() {
            shuffle(rules, &mut seed);
            for r in rules {
                if let Some(paths) = r["http"]["paths"].as_array_mut() {
                    shuffle(paths, &mut seed);
                }
            }
        }
    }
    shuffle(&mut out, &mut seed);
    out
}

/// Where a request goes under a RouteConfiguration, as Envoy (and mesh-ingress) decide: the virtual host by
/// exact domain, else a one-label wildcard, else `*`; then the first route that matches.
fn reached(rc: &xds_proto::route::RouteConfiguration, host: &str, path: &str) -> String {
    use xds_proto::route::{route, route_action, route_match};
    let vh = rc
        .virtual_hosts
        .iter()
        .find(|v| v.domains.iter().any(|d| d == host))
        .or_else(|| {
            let (_, parent) = host.split_once('.')?;
            rc.virtual_hosts.iter().find(|v| v.domains.iter().any(|d| *d == format!("*.{parent}")))
        })
        .or_else(|| rc.virtual_hosts.iter().find(|v| v.domains.iter().any(|d| d == "*")));
    let Some(vh) = vh else { return "no host".into() };
    for r in &vh.routes {
        let matches = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
            Some(route_match::PathSpecifier::Path(p)) => path == p,
            Some(route_match::PathSpecifier::Prefix(p)) => path.starts_with(p.as_str()),
            Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
                path == p || path.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/'))
            }
            other => panic!("unexpected matcher {other:?}"),
        };
        if matches {
            return match r.action.as_ref() {
                Some(route::Action::Route(a)) => match &a.cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                    other => format!("{other:?}"),
                },
                Some(route::Action::DirectResponse(d)) => d.status.to_string(),
                Some(route::Action::Redirect(_)) => "redirect".into(),
                other => format!("{other:?}"),
            };
        }
    }
    "no route".into()
}

/// Where each of a set of requests goes, by class and listener.
fn destinations(ings: &[Value]) -> Vec<String> {
    let mut st = Store::new();
    let base = [json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "mesh"},
            "spec": {"controller": xds_proto::INGRESS_CONTROLLER}})];
    let services = NAMES.iter().map(|n| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": n, "namespace": "ns"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
    });
    for o in base.into_iter().chain(services).chain(ings.iter().cloned()).filter_map(parse) {
        st.apply(o);
    }
    let snap = translate(&st, &Options::default());
    let role = &snap.ingress["mesh"];
    let rc: xds_proto::route::RouteConfiguration =
        prost::Message::decode(&role.get(xds_proto::types::ResourceType::RouteConfiguration)["ingress/http"].body[..])
            .unwrap();
    let mut out = Vec::new();
    for host in ["a.example.com", "x.example.com", "other.test"] {
        for path in ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/bc", "/ab", "/b", "/b/", "/c"] {
            out.push(format!("{host}{path} → {}", reached(&rc, host, path)));
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

    /// Precedence never depends on order: shuffling the Ingresses, their rules and their paths never changes
    /// which backend a request reaches (overlapping Prefix paths such as `/a` and `/a/`, ties in age, the same
    /// path twice).
    #[test]
    fn shuffling_ingresses_or_rules_never_changes_where_a_request_goes(ings in routing_ingresses(), seed in any::<u64>()) {
        prop_assert_eq!(destinations(&ings), destinations(&shuffled(&ings, seed)));
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
