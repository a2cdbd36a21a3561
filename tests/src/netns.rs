//! Network namespaces for tests that need real routing (a node, Pods and a client each with their own network
//! stack), made with iproute2 and deleted by a guard, even when the test panics.
//!
//! Sockets are made *inside* a namespace from this process: a short-lived thread moves itself into the
//! namespace (`setns(2)`) and creates the socket there; the socket stays in that namespace for its whole life and
//! is then used from the test's Tokio runtime like any other. So stand-in Pods and clients need no helper
//! process, and no runtime thread ever changes namespace. Only the binary under test runs inside a namespace as
//! a process (`ip netns exec NAME BIN ...`, which execs BIN, so the [`crate::Process`] guard's PID is BIN's).
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); [`skip`] says why a test must skip otherwise
//! (or fails it, under `MESH_REQUIRE_NETNS=1`).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Where `ip netns add` puts a namespace's handle.
const NETNS_DIR: &str = "/run/netns";

/// Why network-namespace tests cannot run here, or `None` when they can: the process must be root and
/// `ip netns add` must work (a probe namespace is made and deleted).
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to create network namespaces (CI runs as root)".into());
    }
    // Unique within the process too: tests of one binary may run on parallel threads.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("meshe2e-probe-{}-{n}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(_) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!("`ip netns add` does not work here: {e:#}")),
    }
}

/// Whether a network-namespace test must skip: `true` (after printing why) when namespaces are [`unavailable`].
/// With `MESH_REQUIRE_NETNS=1` (set by `.ci/run`, which runs as root) it panics instead, so CI cannot pass
/// without running these tests.
pub fn skip() -> bool {
    let Some(why) = unavailable() else { return false };
    let required = std::env::var("MESH_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    assert!(!required, "{why}, and MESH_REQUIRE_NETNS=1 requires the network-namespace tests to run");
    eprintln!("SKIPPED: {why}");
    true
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `ip {}`: {e} (is iproute2 installed?)", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace this test created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (which must be unique: include the test's PID) with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes namespaces named `{prefix}{pid}-…` whose process `pid` is gone: left by a test run that was
    /// killed before its guards ran. Namespaces of live processes are never touched.
    pub fn remove_stale(prefix: &str) {
        let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(prefix).and_then(|r| r.split('-').next()) else { continue };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command running `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A veth pair: `dev` here and `far_dev` in `far`, both up, without addresses.
    pub fn veth(&self, dev: &str, far: &Netns, far_dev: &str) -> anyhow::Result<()> {
        self.ip(&["link", "add", dev, "type", "veth", "peer", "name", far_dev, "netns", far.name()])?;
        self.ip(&["link", "set", dev, "up"])?;
        far.ip(&["link", "set", far_dev, "up"])?;
        Ok(())
    }

    /// A point-to-point link from this namespace (a node) to `far` (a Pod or a client): a veth pair with `dev`
    /// here and `eth0` in `far`, addresses `near/30` and `far_ip/30` (so give each link its own /30), and in
    /// `far` a route to `far_route` (`default`, or a prefix) via `near`.
    pub fn link(
        &self,
        dev: &str,
        near: Ipv4Addr,
        far: &Netns,
        far_ip: Ipv4Addr,
        far_route: &str,
    ) -> anyhow::Result<()> {
        self.veth(dev, far, "eth0")?;
        self.ip(&["addr", "add", &format!("{near}/30"), "dev", dev])?;
        far.ip(&["addr", "add", &format!("{far_ip}/30"), "dev", "eth0"])?;
        far.ip(&["route", "add", far_route, "via", &near.to_string()])?;
        Ok(())
    }

    /// Makes `iface` usable as `mesh-proxy --interface`: the proxy creates a dummy interface itself, but some
    /// kernels are built without dummy interfaces (CONFIG_DUMMY, e.g. this project's VM); there `iface` is
    /// pre-created as an empty bridge, which the proxy adopts as it adopts any existing interface (flushes it,
    /// manages its addresses, deletes it on exit). Says so on stderr when it has to.
    pub fn prepare_dummy(&self, iface: &str) -> anyhow::Result<()> {
        match self.ip(&["link", "add", "meshprobe", "type", "dummy"]) {
            Ok(_) => {
                self.ip(&["link", "del", "meshprobe"])?;
            }
            Err(e) => {
                eprintln!(
                    "NOTE: no dummy interfaces on this kernel ({e:#}); {iface} is pre-created as an empty bridge"
                );
                self.ip(&["link", "add", iface, "type", "bridge"])?;
            }
        }
        Ok(())
    }

    /// Turns IPv4 forwarding on: a node namespace routes between its Pods and the other nodes (a new namespace
    /// starts with forwarding off). `/proc/sys/net` shows the namespace of the thread that opens it.
    pub fn forward_ipv4(&self) -> anyhow::Result<()> {
        self.enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
    }

    /// Runs `f` on a new thread that has moved into the namespace, and returns what it made (sockets made
    /// there stay in the namespace). The thread ends with `f`, so no other code ever runs in the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> anyhow::Result<T> {
        enter(&self.name, f)
    }

    /// A TCP listening socket bound to `addr` inside the namespace.
    pub fn tcp_listener(&self, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        self.enter(|| std::net::TcpListener::bind(addr))
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
        self.enter(|| std::net::UdpSocket::bind(addr))
    }

    /// A TCP connection to `to` made from inside the namespace (the connect is bounded by `timeout`).
    pub async fn connect(&self, to: SocketAddr, timeout: Duration) -> anyhow::Result<tokio::net::TcpStream> {
        let name = self.name.clone();
        let stream = tokio::task::spawn_blocking(move || {
            enter(&name, || {
                let s = std::net::TcpStream::connect_timeout(&to, timeout)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
        })
        .await
        .map_err(|e| anyhow::anyhow!("connecting inside {}: {e}", self.name))?
        .map_err(|e| e.context(format!("connect to {to}")))?;
        Ok(tokio::net::TcpStream::from_std(stream)?)
    }

    /// A UDP socket bound to `addr` inside the namespace, for Tokio.
    pub fn tokio_udp(&self, addr: SocketAddr) -> anyhow::Result<tokio::net::UdpSocket> {
        let s = self.udp_socket(addr)?;
        s.set_nonblocking(true)?;
        Ok(tokio::net::UdpSocket::from_std(s)?)
    }
}

/// [`Netns::enter`] by name.
fn enter<T: Send>(name: &str, f: impl FnOnce() -> std::io::Result<T> + Send) -> anyhow::Result<T> {
    let path = Path::new(NETNS_DIR).join(name);
    std::thread::scope(|s| {
        s.spawn(|| {
            let handle = File::open(&path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            move_into_link_name_space(handle.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| anyhow::anyhow!("cannot enter network namespace {name}: {e}"))?;
            f().map_err(|e| anyhow::anyhow!("in network namespace {name}: {e}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace {name} panicked"))?
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Also removes every interface in it (veth pairs vanish with either end).
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_made_inside_stay_inside_and_the_namespace_goes_on_drop() {
        if skip() {
            return;
        }
        let name = format!("meshe2e-{}-unit", std::process::id());
        let ns = Netns::create(&name).unwrap();
        // A listener made inside is reached by a connection made inside (the namespace's own loopback).
        let l = ns.tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let c = ns.connect(addr, Duration::from_secs(2)).await.unwrap();
        let (_, from) = l.accept().unwrap();
        assert_eq!(from, c.local_addr().unwrap());
        drop(c);
        drop(l);
        drop(ns);
        assert!(!Path::new(NETNS_DIR).join(&name).exists(), "namespace {name} survived its guard");
    }
}
