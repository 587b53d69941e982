//! The node-side record of each volume's membership, beside the replicas'
//! own superblocks.
//!
//! A replica failed out cannot be told so (its disk is gone); only the
//! survivors record it. If that replica later comes back alone, its own
//! superblock still says "in sync". The node keeps the last generation and
//! in-sync set it saw, so such a lone replica is judged stale (md judges a
//! member by its event count the same way) and refused unless the operator
//! accepts the loss.

use std::sync::Arc;

use uuid::Uuid;

use crate::BoxFuture;

/// The membership a volume last recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownMembership {
    pub generation: u64,
    /// Replicas in sync at that generation.
    pub in_sync: Vec<Uuid>,
}

impl KnownMembership {
    /// Whether a replica at `generation` may hold every acknowledged write:
    /// it was in sync at the recorded generation, or it saw a newer one (the
    /// record is written after the survivors' superblocks, so it can lag them
    /// by one change, and only survivors get the newer generation).
    ///
    /// Being *at* the recorded generation is not enough: a disk formatted by
    /// `replica add`, or a replica missing since the volume's first start,
    /// carries the volume's generation without ever having held its data.
    pub fn vouches_for(&self, replica: Uuid, generation: u64) -> bool {
        generation > self.generation || self.in_sync.contains(&replica)
    }
}

/// Where a node keeps [`KnownMembership`] records.
pub trait MembershipLog: Send + Sync + 'static {
    /// The last record of `volume`, if any.
    fn last(&self, volume: Uuid) -> Option<KnownMembership>;
    /// Replace the record of `volume`; durable when the future completes.
    fn record(
        &self,
        volume: Uuid,
        membership: KnownMembership,
    ) -> BoxFuture<'_, Result<(), String>>;
}

/// A shared [`MembershipLog`], printable inside `VolumeOptions`.
#[derive(Clone)]
pub struct MembershipLogRef(pub Arc<dyn MembershipLog>);

impl std::fmt::Debug for MembershipLogRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MembershipLog")
    }
}
