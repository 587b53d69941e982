//! Which replica serves a read: keep sequential streams on one replica, spread the rest.
//!
//! Like md's RAID-1 balancing for SSDs: a read that continues where a replica's
//! last read ended stays there (read-ahead and large sequential transfers stay
//! efficient); any other read goes to the replica with the fewest reads in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::volume::Member;

/// Pick a replica among `members` for a read at `offset`.
pub fn choose(members: &[Arc<Member>], offset: u64) -> Option<Arc<Member>> {
    if let Some(m) = members
        .iter()
        .find(|m| m.next_offset.load(Ordering::Acquire) == offset)
    {
        return Some(m.clone());
    }
    members
        .iter()
        .min_by_key(|m| m.pending.load(Ordering::Acquire))
        .cloned()
}
