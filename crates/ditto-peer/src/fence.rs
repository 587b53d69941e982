//! The fencing rule, in one place: whom a node holding replicas of a volume
//! follows when primaries claim it. The daemon's held replicas and the
//! simulator's nodes both decide by these functions, so the simulator
//! checks the rule the daemon runs.
//!
//! A node follows one primary per volume, at an epoch. A claim from that
//! primary at its epoch or newer updates it (a new member list); a claim
//! from another node is followed only at a strictly newer epoch (a
//! takeover), and refused otherwise. Two claims at one epoch from two
//! nodes: the first one a node hears wins there, so with a majority quorum
//! at most one of them can gather a majority.

/// What a node holding replicas does with a primary claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// The claim comes from the primary followed already (at its epoch or newer).
    Follow,
    /// Another node takes the volume over at a newer epoch: follow it, and
    /// refuse the old primary's sessions from now on.
    TakeOver,
    /// Older than or as old as the epoch followed, from another node.
    Refuse,
}

/// Judge a claim by node `from` at `epoch`, for a node following `followed`
/// at `followed_epoch`.
pub fn judge_claim(followed: &str, followed_epoch: u64, from: &str, epoch: u64) -> ClaimVerdict {
    if followed == from {
        if epoch >= followed_epoch {
            ClaimVerdict::Follow
        } else {
            ClaimVerdict::Refuse
        }
    } else if epoch > followed_epoch {
        ClaimVerdict::TakeOver
    } else {
        ClaimVerdict::Refuse
    }
}

/// Whether a node that runs a volume as primary at `mine` steps down for a
/// claim at `epoch` by another node (it is superseded); otherwise the claim
/// is refused (two primaries at one epoch are a split brain).
pub fn superseded_by_claim(mine: u64, epoch: u64) -> bool {
    epoch > mine
}

/// Whether node `from` may open a replica that follows `followed`.
pub fn may_open(followed: Option<&str>, from: &str) -> bool {
    followed.is_none_or(|f| f == from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_followed_primary_may_renew_but_not_go_back() {
        assert_eq!(judge_claim("a", 3, "a", 3), ClaimVerdict::Follow);
        assert_eq!(judge_claim("a", 3, "a", 4), ClaimVerdict::Follow);
        assert_eq!(judge_claim("a", 3, "a", 2), ClaimVerdict::Refuse);
    }

    #[test]
    fn another_node_needs_a_strictly_newer_epoch() {
        assert_eq!(judge_claim("a", 3, "b", 3), ClaimVerdict::Refuse);
        assert_eq!(judge_claim("a", 3, "b", 2), ClaimVerdict::Refuse);
        assert_eq!(judge_claim("a", 3, "b", 4), ClaimVerdict::TakeOver);
        assert!(!superseded_by_claim(3, 3));
        assert!(superseded_by_claim(3, 4));
    }

    #[test]
    fn only_the_followed_primary_opens() {
        assert!(may_open(None, "b"));
        assert!(may_open(Some("b"), "b"));
        assert!(!may_open(Some("a"), "b"));
    }
}
