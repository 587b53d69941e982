//! The diskless tiebreaker's side, in one place: what a witness record
//! does with claims and membership records. The daemon's tiebreaker node
//! (which stores the record) and the cluster simulator's both decide by
//! these functions.
//!
//! A witness follows one primary per volume at an epoch, exactly as a
//! held replica does ([`crate::fence::judge_claim`]), so "one epoch, one
//! assembly" holds with it. Besides, it holds the membership that primary
//! last recorded ([`VoteRecord`]): a claim is answered with it (the new
//! primary may start only from a replica it vouches for), and only the
//! followed primary, at its epoch, may record a newer one.

use ditto_engine::VoteRecord;
use uuid::Uuid;

use crate::fence::{judge_claim, ClaimVerdict};
use crate::wire::Superseded;

/// A volume's witness record, as the tiebreaker node keeps it (durably).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    pub volume: Uuid,
    pub volume_name: String,
    /// The primary it follows, and that primary's epoch.
    pub primary: String,
    pub epoch: u64,
    /// The membership that primary last recorded here.
    pub record: VoteRecord,
}

impl Witness {
    /// Node `from` claims the volume at `epoch`, as it would at a held
    /// replica. Returns the record held before the claim (the claimant's
    /// start trusts only replicas it vouches for); the witness follows the
    /// claimant from now on. `me` names this node in a refusal.
    pub fn claim(&mut self, me: &str, from: &str, epoch: u64) -> Result<VoteRecord, Superseded> {
        match judge_claim(&self.primary, self.epoch, from, epoch) {
            ClaimVerdict::Refuse => Err(Superseded {
                node: self.primary.clone(),
                epoch: self.epoch,
                why: format!(
                    "tiebreaker {me} follows node {} as the primary of {} at epoch {}, newer than or equal to node {from}'s {epoch}",
                    self.primary, self.volume_name, self.epoch
                ),
            }),
            ClaimVerdict::Follow | ClaimVerdict::TakeOver => {
                self.primary = from.to_string();
                self.epoch = epoch;
                Ok(self.record.clone())
            }
        }
    }

    /// Node `from` records the membership `record`. Taken only from the
    /// followed primary at the epoch it claimed (a primary's records carry
    /// the epoch of its start); an older record than the one held (a late
    /// connection) is acknowledged and ignored. Returns whether it changed.
    pub fn record(&mut self, me: &str, from: &str, record: VoteRecord) -> Result<bool, Superseded> {
        if from != self.primary || record.epoch != self.epoch {
            return Err(Superseded {
                node: self.primary.clone(),
                epoch: self.epoch,
                why: format!(
                    "tiebreaker {me} follows node {} as the primary of {} at epoch {}; node {from}'s membership at epoch {} is not recorded",
                    self.primary, self.volume_name, self.epoch, record.epoch
                ),
            });
        }
        if (record.epoch, record.generation) < (self.record.epoch, self.record.generation) {
            return Ok(false);
        }
        let changed = record != self.record;
        self.record = record;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn witness() -> Witness {
        Witness {
            volume: Uuid::from_u128(1),
            volume_name: "vm1".into(),
            primary: "a".into(),
            epoch: 3,
            record: VoteRecord::default(),
        }
    }

    fn rec(epoch: u64, generation: u64) -> VoteRecord {
        VoteRecord {
            epoch,
            generation,
            in_sync: vec![Uuid::from_u128(generation.into())],
        }
    }

    #[test]
    fn only_the_followed_primary_at_its_epoch_records() {
        let mut w = witness();
        assert_eq!(w.record("t", "a", rec(3, 5)), Ok(true));
        assert_eq!(w.record.generation, 5);
        // A late, older record is ignored, not taken.
        assert_eq!(w.record("t", "a", rec(3, 4)), Ok(false));
        assert_eq!(w.record.generation, 5);
        // Another node, or the primary at another epoch, is refused.
        assert!(w.record("t", "b", rec(3, 6)).is_err());
        assert!(w.record("t", "a", rec(4, 6)).is_err());
        assert_eq!(w.record.generation, 5);
    }

    #[test]
    fn a_takeover_gets_the_record_and_fences_the_old_primary() {
        let mut w = witness();
        w.record("t", "a", rec(3, 5)).unwrap();
        // Same epoch from another node: refused, naming the primary.
        let refused = w.claim("t", "b", 3).unwrap_err();
        assert_eq!((refused.node.as_str(), refused.epoch), ("a", 3));
        let held = w.claim("t", "b", 4).unwrap();
        assert_eq!(held, rec(3, 5));
        assert_eq!((w.primary.as_str(), w.epoch), ("b", 4));
        // The old primary's heartbeat is refused from now on.
        assert!(w.record("t", "a", rec(3, 6)).is_err());
        assert_eq!(w.record("t", "b", rec(4, 1)), Ok(true));
    }
}
