//! Free ports on loopback addresses, for processes that must be told their port in advance.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

/// The lowest port handed out.
const LOWEST: u16 = 10_000;

/// A TCP port that is free on `ip` now and stays likely free until the process that was told it binds it.
///
/// For a port that must be known in advance (a Service port, the ingress listener Envoy binds when
/// mesh-control sends it); anything that can bind port 0 itself should. Port 0 is not used here: the kernel
/// picks port 0 binds from the ephemeral range, where every outgoing connection also takes its local port, so
/// on a busy machine a port found that way is soon someone's connection and Envoy's bind fails ("Address
/// already in use"; seen in CI-like runs). So the port is chosen at random outside the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`) and checked free by binding it.
///
/// To find a port for a listener on `0.0.0.0` (Envoy binds the ingress listener there), pass `0.0.0.0`: the
/// port is then free on every address. Nothing is ever sent to that address.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    let ephemeral = ephemeral_range();
    let mut random = RandomState::new().build_hasher();
    for attempt in 0u64..2_000 {
        random.write_u64(attempt);
        let port = LOWEST + (random.finish() % u64::from(u16::MAX - LOWEST + 1)) as u16;
        if ephemeral.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port on {ip} outside the ephemeral range {ephemeral:?}"),
    ))
}

/// The kernel's ephemeral port range (Linux default 32768–60999 when it cannot be read).
fn ephemeral_range() -> RangeInclusive<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|s| s.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo <= hi => lo..=hi,
        _ => 32_768..=60_999,
    }
}

/// Whether a failed connect was refused (RST to the SYN: nothing listens), as opposed to timing out or not being
/// routed. An error from inside a network namespace crosses a thread as a value and as text: either form counts.
pub fn is_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    }) || format!("{e:#}").contains("os error 111")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_outside_the_ephemeral_range_and_bindable() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..20 {
            let p = free_port(ip).unwrap();
            assert!(p >= LOWEST && !ephemeral_range().contains(&p), "{p}");
            TcpListener::bind(SocketAddr::new(ip, p)).unwrap();
        }
    }
}
