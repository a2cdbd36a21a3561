//! Route lookup at scale: one RouteConfiguration of 10,000 hosts × 10 paths (per host: 3 Exact, 6 Prefix of
//! depths 1–3, and the root Prefix; a tenth of the hosts are `*.` wildcards), the shape `mesh-control` emits.
//!
//! - `routes/lookup/*`: [`RouteTable::find`] after [`path::normalize`], for an exact host and a deep prefix,
//!   an exact path, a wildcard host, a Host with a port in upper case, and a miss (target < 1 µs each).
//! - `routes/build`: [`RouteTable::build`] of the whole configuration (what an RDS update costs off the
//!   request path).
//!
//! Run: `cargo bench -p mesh-ingress --bench routes` (results: `docs/BENCHMARKS.md`).

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use mesh_ingress::path;
use mesh_ingress::routes::RouteTable;
use xds_proto::route::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};

const HOSTS: usize = 10_000;

fn r(spec: route_match::PathSpecifier, cluster: String) -> Route {
    Route {
        r#match: Some(RouteMatch { path_specifier: Some(spec), ..Default::default() }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn config() -> RouteConfiguration {
    let vhosts = (0..HOSTS)
        .map(|i| {
            let domain = if i % 10 == 9 { format!("*.tenant-{i}.example.com") } else { format!("app-{i}.example.com") };
            let c = |k: usize| format!("ns-{i}/svc-{k}/http");
            let mut routes = vec![
                r(route_match::PathSpecifier::Path("/healthz".into()), c(0)),
                r(route_match::PathSpecifier::Path("/login".into()), c(1)),
                r(route_match::PathSpecifier::Path("/api/v1/status".into()), c(2)),
            ];
            for (k, p) in
                ["/api/v1/users/admin", "/api/v1/users", "/api/v2", "/api", "/static/img", "/static"].iter().enumerate()
            {
                routes.push(r(route_match::PathSpecifier::PathSeparatedPrefix((*p).into()), c(3 + k)));
            }
            routes.push(r(route_match::PathSpecifier::Prefix("/".into()), c(9)));
            let one_label = if domain.starts_with("*.") {
                xds_proto::meta::build([(xds_proto::meta::WILDCARD_ONE_LABEL, true.into())])
            } else {
                None
            };
            VirtualHost {
                name: domain.clone(),
                domains: vec![domain],
                routes,
                metadata: one_label,
                ..Default::default()
            }
        })
        .collect();
    RouteConfiguration { name: "ingress/https".into(), virtual_hosts: vhosts, ..Default::default() }
}

fn main() {
    let rc = config();
    let table = RouteTable::build(&rc).expect("the generated configuration is valid");
    let mut c = Criterion::default().configure_from_args().measurement_time(Duration::from_secs(3));
    {
        let mut g = c.benchmark_group("routes/lookup");
        for (name, host, p) in [
            ("deep_prefix", "app-4242.example.com", "/api/v1/users/42/orders"),
            ("exact", "app-4242.example.com", "/api/v1/status"),
            ("wildcard", "shop.tenant-4249.example.com", "/static/img/logo.png"),
            ("port_and_case", "APP-4242.Example.com:443", "/login"),
            ("root", "app-17.example.com", "/"),
            ("miss", "nope.example.org", "/x"),
        ] {
            g.bench_function(name, |b| {
                b.iter(|| {
                    let n = path::normalize(black_box(p));
                    black_box(table.find(black_box(host), &n).map(|(_, r)| r.label.len()))
                })
            });
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("routes");
        g.sample_size(10).measurement_time(Duration::from_secs(10));
        g.bench_function("build", |b| {
            b.iter(|| black_box(RouteTable::build(black_box(&rc)).map(|t| t.vhosts().len())))
        });
        g.finish();
    }
    c.final_summary();
}
