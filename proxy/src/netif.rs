//! Making Service addresses local, as kube-proxy's IPVS mode does with `kube-ipvs0`: a dummy interface the proxy
//! owns holds every ClusterIP, external IP and LoadBalancer IP it serves, so the kernel delivers their traffic
//! to the proxy's listening sockets. Addresses are removed when their Services go.
//!
//! Uses `ip` (iproute2) and needs `CAP_NET_ADMIN`. Loopback addresses (127.0.0.0/8, ::1) are local already and
//! are never added.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use tracing::{info, warn};

/// Why the interface could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// `ip` failed.
    #[error("`ip {args}` failed: {reason} (mesh-proxy needs CAP_NET_ADMIN and iproute2 to manage {iface})")]
    Ip {
        /// The interface.
        iface: String,
        /// The arguments.
        args: String,
        /// What it said.
        reason: String,
    },
}

/// The dummy interface and the addresses the proxy put on it.
#[derive(Debug)]
pub struct Interface {
    name: String,
    added: BTreeSet<IpAddr>,
    created: bool,
}

fn ip(iface: &str, args: &[&str]) -> Result<(), NetifError> {
    let out = Command::new("ip").args(args).output().map_err(|e| NetifError::Ip {
        iface: iface.to_owned(),
        args: args.join(" "),
        reason: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetifError::Ip {
        iface: iface.to_owned(),
        args: args.join(" "),
        reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Whether an address needs to be put on the interface (loopback is local already).
pub fn needs_interface(ip: &IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified()
}

impl Interface {
    /// The interface `name` (created on first use).
    pub fn new(name: &str) -> Self {
        Interface { name: name.to_owned(), added: BTreeSet::new(), created: false }
    }

    /// Makes the interface hold exactly `wanted` (minus loopback addresses).
    pub fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), NetifError> {
        let wanted: BTreeSet<IpAddr> = wanted.iter().copied().filter(needs_interface).collect();
        if !self.created && !wanted.is_empty() {
            // It may exist from an earlier run (or be made by the operator where the kernel has no dummy
            // interfaces): then adopt it, flushing stale addresses.
            if let Err(e) = ip(&self.name, &["link", "add", &self.name, "type", "dummy"]) {
                ip(&self.name, &["addr", "flush", "dev", &self.name]).map_err(|_| e)?;
            }
            ip(&self.name, &["link", "set", &self.name, "up"])?;
            self.created = true;
            info!(iface = %self.name, "managing Service addresses on a dummy interface");
        }
        for addr in wanted.difference(&self.added.clone()) {
            let cidr = if addr.is_ipv4() { format!("{addr}/32") } else { format!("{addr}/128") };
            match ip(&self.name, &["addr", "add", &cidr, "dev", &self.name]) {
                Ok(()) => {
                    self.added.insert(*addr);
                }
                Err(e) => warn!("{e}"),
            }
        }
        for addr in self.added.difference(&wanted).copied().collect::<Vec<_>>() {
            let cidr = if addr.is_ipv4() { format!("{addr}/32") } else { format!("{addr}/128") };
            if let Err(e) = ip(&self.name, &["addr", "del", &cidr, "dev", &self.name]) {
                warn!("{e}");
            }
            self.added.remove(&addr);
        }
        Ok(())
    }

    /// Removes the interface (on shutdown).
    pub fn remove(&mut self) {
        if self.created {
            let _ = ip(&self.name, &["link", "del", &self.name]);
            self.created = false;
            self.added.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_needs_nothing() {
        assert!(!needs_interface(&"127.10.0.1".parse().unwrap()));
        assert!(!needs_interface(&"::1".parse().unwrap()));
        assert!(!needs_interface(&"0.0.0.0".parse().unwrap()));
        assert!(needs_interface(&"10.96.0.1".parse().unwrap()));
        let mut i = Interface::new("mesh-test-none");
        // Only loopback wanted: the interface is never created.
        i.sync(&["127.0.0.9".parse().unwrap()].into_iter().collect()).unwrap();
        assert!(!i.created);
    }
}
