//! Peer protocol: ditto's own wire format between nodes, the replica server
//! that exposes a node's replicas to a primary elsewhere, and the remote
//! replica backend that the volume engine drives like a local file.
//!
//! Data path across machines: the primary's [`ditto_engine::Volume`] →
//! [`RemoteReplica`] (a [`ditto_engine::ReplicaBackend`]) → frames over TCP
//! ([`wire`]) → [`server::PeerServer`] on the replica's node → that node's
//! own backend (a `FileReplica`), which owns the file and its superblock.
//!
//! Written by hand: the format is ditto's (versioned, feature-negotiated,
//! checksummed, bounded; `docs/peer-protocol.md`), so no crate implements it.
//! Fencing lives on the serving side: a request whose generation is older
//! than the replica's superblock is refused, so a primary that was
//! superseded while away can never write.

pub mod client;
pub mod fence;
pub mod server;
pub mod tls;
pub mod wire;
pub mod witness;

pub use client::RemoteReplica;
pub use server::{PeerServer, ReplicaRegistry};
pub use wire::{Frame, FrameError, Kind};
