//! `mesh-proxy`: the per-node L4 proxy that does what kube-proxy does. Every connection to a Service address
//! (ClusterIP, NodePort, LoadBalancer IP, external IP) lands on a ready Pod.
//!
//! Configuration arrives as xDS resources (from `mesh-control`, or a snapshot file) and is converted at the edge
//! into a [`table::Table`], published as an immutable `Arc` that each connection reads once.

pub mod app;
pub mod balance;
pub mod config;
pub mod copy;
pub mod health;
pub mod listeners;
pub mod netif;
pub mod saved;
pub mod state;
pub mod table;
pub mod tcp;
pub mod udp;
