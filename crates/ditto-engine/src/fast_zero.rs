//! Whether zeroing a volume is fast: what NBD_CMD_FLAG_FAST_ZERO asks.

use crate::volume::{ReplicaState, Volume};

impl Volume {
    /// True when zeroing by deallocation is a metadata operation on every
    /// replica a write goes to (in sync or rebuilding), so a WRITE_ZEROES
    /// that may deallocate is fast. False if any of them would fall back to
    /// writing zeroes (no hole punching there), or when there is none.
    pub fn fast_zero(&self) -> bool {
        let members = self.with_state(&[ReplicaState::InSync, ReplicaState::Rebuilding]);
        !members.is_empty() && members.iter().all(|m| m.backend.fast_zero())
    }
}
