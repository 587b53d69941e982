//! A diskless tiebreaker as the engine sees it: a voter in the volume's
//! quorum that holds no data, only a record of which replicas were in sync
//! at which (epoch, generation) (docs/replication.md, "The diskless
//! tiebreaker").
//!
//! Its vote counts for an acknowledgement only while it holds the volume's
//! current generation: the engine records every membership change there
//! before the change is durable, so an acknowledgement that leaned on the
//! vote is always described by the voter's record. A start that counts the
//! voter's claim towards its majority then trusts only replicas that record
//! vouches for, so two data nodes that each saw different writes cannot
//! start from the one that missed them.

use std::sync::Arc;

use ditto_format::Superblock;
use uuid::Uuid;

use crate::BoxFuture;

/// What a voter holds: the replicas in sync at (epoch, generation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VoteRecord {
    pub epoch: u64,
    pub generation: u64,
    pub in_sync: Vec<Uuid>,
}

impl VoteRecord {
    /// Whether a replica with superblock `sb` may be current as far as this
    /// record knows: it was in sync when the record was made, or its own
    /// superblock is newer than the record (the volume moved on with it
    /// while the voter was away; then the voter's vote was not needed).
    pub fn vouches_for(&self, sb: &Superblock) -> bool {
        sb.order_key() > (self.epoch, self.generation) || self.in_sync.contains(&sb.replica_uuid)
    }
}

/// A voter: records the volume's membership, or says why not.
pub trait Voter: Send + Sync {
    /// The failure domain (node) it votes for.
    fn domain(&self) -> &str;
    /// Record `record` (the volume's membership now). An error means the
    /// voter did not take it (unreachable, or following another primary):
    /// its vote is lost until a later record succeeds.
    fn record(&self, record: VoteRecord) -> BoxFuture<'_, Result<(), String>>;
}

/// A volume's tiebreaker, as a start hands it to [`crate::Volume::open`].
#[derive(Clone)]
pub struct Tiebreaker {
    pub voter: Arc<dyn Voter>,
    /// What the voter held when it took this start's claim; None when it
    /// did not take it (then it counts neither for the start nor, until it
    /// records a generation, for I/O).
    pub claimed: Option<VoteRecord>,
}

impl std::fmt::Debug for Tiebreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiebreaker")
            .field("domain", &self.voter.domain())
            .field("claimed", &self.claimed)
            .finish()
    }
}
