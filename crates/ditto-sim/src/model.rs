//! What the volume may legitimately hold: a register per 4 KiB block.
//!
//! Every write carries a stamp per block (its write id and the block index,
//! repeated over the whole block), so a read tells which write it returns and
//! a torn or misplaced block is caught. Each block keeps its versions in
//! issue order (the workload never has two modifying requests in flight over
//! the same block, so issue order is the order they take effect) and a
//! *floor*: the oldest version a read may still return.
//!
//! - An acknowledged write moves the floor to itself.
//! - A read that returns a version whose request is no longer in flight
//!   when the read completes (acknowledged, failed, or cut by a crash)
//!   moves the floor to it: a block never goes back to older data without a
//!   crash in between (item 4 of issue 9). A read that returns a write still
//!   in flight does not: until that write is acknowledged, a mirror may
//!   serve concurrent reads from a replica that has it and from one that
//!   does not yet (a regular register, as Linux md RAID-1 and every block
//!   device give: no order between a read and an unacknowledged
//!   overlapping write). Its acknowledgement then moves the floor.
//! - A forced start (the operator's `--force-stale`) or a split-brain
//!   resolve is a data-loss event: each block is [`Model::reset`] to what
//!   the replicas it started from held.
//! - A crash moves the floor back to the newest *durable* version: one
//!   acknowledged with FUA, or acknowledged before a FLUSH (or a clean
//!   stop) that then completed.
//! - Anything issued after the floor may be read: a write in flight, one that
//!   failed (it may have landed on some replica), one cut off by a crash.

use std::collections::VecDeque;

/// Bytes per client block: the unit of the register and of the stamps.
pub const BLOCK: u64 = 4096;

/// The `op` of the versions a data-loss event leaves ([`Model::reset`]).
const RESET: u64 = u64::MAX;

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Zero,
    /// Written by the client write with this id.
    Stamp(u64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Zero => write!(f, "zeroes"),
            Value::Stamp(w) => write!(f, "write #{w}"),
        }
    }
}

/// Fill `out` (a multiple of [`BLOCK`]) with write `id`'s stamps for blocks from `first`.
pub fn fill(out: &mut [u8], id: u64, first: u64) {
    for (i, block) in out.chunks_mut(BLOCK as usize).enumerate() {
        let mut pat = [0u8; 16];
        pat[..8].copy_from_slice(&id.to_le_bytes());
        pat[8..].copy_from_slice(&(first + i as u64).to_le_bytes());
        for c in block.chunks_mut(16) {
            c.copy_from_slice(&pat[..c.len()]);
        }
    }
}

/// What block `index` holds, from its bytes; Err describes garbage.
pub fn decode(data: &[u8], index: u64) -> Result<Value, String> {
    let Some(first) = data.get(..16) else {
        return Err("short block".into());
    };
    if first.iter().all(|&b| b == 0) && data.iter().all(|&b| b == 0) {
        return Ok(Value::Zero);
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&first[..8]);
    let mut idx = [0u8; 8];
    idx.copy_from_slice(&first[8..]);
    let (id, idx) = (u64::from_le_bytes(id), u64::from_le_bytes(idx));
    if !data.chunks(16).all(|c| c == &first[..c.len()]) {
        return Err(format!(
            "torn or corrupt block (starts as write #{id} block {idx})"
        ));
    }
    if idx != index || id == 0 {
        return Err(format!(
            "holds write #{id}'s data for block {idx} (misplaced)"
        ));
    }
    Ok(Value::Stamp(id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    InFlight,
    Acked {
        seq: u64,
        fua: bool,
    },
    /// The request returned an error: it may or may not have landed.
    Failed,
    /// In flight when the node crashed.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Version {
    pub vno: u64,
    pub op: u64,
    pub value: Value,
    pub status: Status,
}

#[derive(Debug, Clone)]
struct Block {
    versions: VecDeque<Version>,
    floor: u64,
    next_vno: u64,
}

impl Block {
    fn new() -> Self {
        Block {
            versions: VecDeque::from([Version {
                vno: 0,
                op: 0,
                value: Value::Zero,
                status: Status::Acked { seq: 0, fua: true },
            }]),
            floor: 0,
            next_vno: 1,
        }
    }
}

/// The register model of the whole volume.
#[derive(Debug, Clone)]
pub struct Model {
    blocks: Vec<Block>,
    /// Acknowledgements seen so far (each gets the next number).
    ack_seq: u64,
    /// Every acknowledgement numbered up to this is durable.
    durable_upto: u64,
    /// A read that returns a write still in flight settles it too (an
    /// atomic register: stricter than a mirror or any block device promises).
    pub strict_reads: bool,
}

impl Model {
    pub fn new(blocks: u64) -> Self {
        Model {
            blocks: (0..blocks).map(|_| Block::new()).collect(),
            ack_seq: 0,
            durable_upto: 0,
            strict_reads: false,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn durable(&self, v: &Version) -> bool {
        match v.status {
            Status::Acked { seq, fua } => fua || seq <= self.durable_upto,
            _ => false,
        }
    }

    /// A modifying request was issued over `[first, first+n)`.
    pub fn issue(&mut self, op: u64, first: u64, n: u64, zero: bool) {
        for b in first..first + n {
            let blk = &mut self.blocks[b as usize];
            let vno = blk.next_vno;
            blk.next_vno += 1;
            blk.versions.push_back(Version {
                vno,
                op,
                value: if zero { Value::Zero } else { Value::Stamp(op) },
                status: Status::InFlight,
            });
        }
    }

    /// The request `op` over `[first, first+n)` completed.
    pub fn complete(&mut self, op: u64, first: u64, n: u64, ok: bool, fua: bool) {
        let seq = if ok {
            self.ack_seq += 1;
            self.ack_seq
        } else {
            0
        };
        for b in first..first + n {
            let blk = &mut self.blocks[b as usize];
            if let Some(v) = blk.versions.iter_mut().rev().find(|v| v.op == op) {
                if ok {
                    v.status = Status::Acked { seq, fua };
                    blk.floor = blk.floor.max(v.vno);
                } else if v.status == Status::InFlight {
                    v.status = Status::Failed;
                }
            }
        }
    }

    /// A FLUSH (or clean stop) is issued: what it will make durable if it succeeds.
    pub fn flush_cover(&self) -> u64 {
        self.ack_seq
    }

    pub fn flushed(&mut self, cover: u64) {
        self.durable_upto = self.durable_upto.max(cover);
    }

    /// The floors of `[first, first+n)` when a read is issued.
    pub fn floors(&self, first: u64, n: u64) -> Vec<u64> {
        (first..first + n)
            .map(|b| self.blocks[b as usize].floor)
            .collect()
    }

    /// The node crashed: whatever was in flight is unknown; only durable writes are owed.
    pub fn crash(&mut self) {
        let durable_upto = self.durable_upto;
        for i in 0..self.blocks.len() {
            let versions = &self.blocks[i].versions;
            let mut floor = versions
                .iter()
                .rev()
                .find(|v| self.durable(v))
                .map_or(0, |v| v.vno);
            // The contents a data-loss event left are equally durable: any of them.
            if versions.iter().any(|v| v.vno == floor && v.op == RESET) {
                floor = versions
                    .iter()
                    .find(|v| v.op == RESET)
                    .map_or(floor, |v| v.vno);
            }
            let blk = &mut self.blocks[i];
            for v in blk.versions.iter_mut() {
                // A flush after the crash cannot make these durable any more.
                let lost = match v.status {
                    Status::InFlight => true,
                    Status::Acked { seq, fua } => !fua && seq > durable_upto,
                    _ => false,
                };
                if lost {
                    v.status = Status::Unknown;
                }
            }
            // The first version is durable, so a durable one always exists
            // unless pruning took it: then the floor stays where it was.
            if blk.versions.front().is_some_and(|v| v.vno <= floor) {
                blk.floor = floor;
            }
        }
    }

    /// Drop versions no read can return any more (call when nothing is in flight).
    pub fn prune(&mut self) {
        for blk in &mut self.blocks {
            let durable_floor = blk
                .versions
                .iter()
                .rev()
                .find(|v| match v.status {
                    Status::Acked { seq, fua } => fua || seq <= self.durable_upto,
                    _ => false,
                })
                .map_or(0, |v| v.vno)
                .min(blk.floor);
            while blk.versions.len() > 1 && blk.versions[1].vno <= durable_floor {
                blk.versions.pop_front();
            }
        }
    }

    /// Versions of `block` a read with this floor may return.
    pub fn allowed(&self, block: u64, floor: u64) -> impl Iterator<Item = &Version> {
        self.blocks[block as usize]
            .versions
            .iter()
            .filter(move |v| v.vno >= floor)
    }

    /// Describe what block `b` may hold, for a violation message.
    pub fn describe(&self, block: u64, floor: u64) -> String {
        let blk = &self.blocks[block as usize];
        let mut parts = Vec::new();
        for v in &blk.versions {
            let mark = if v.vno < floor { "(too old) " } else { "" };
            let status = match v.status {
                Status::InFlight => "in flight".to_string(),
                Status::Acked { fua, .. } if self.durable(v) => {
                    format!("acked{}, durable", if fua { " FUA" } else { "" })
                }
                Status::Acked { .. } => "acked, not flushed".to_string(),
                Status::Failed => "failed".to_string(),
                Status::Unknown => "cut by a crash".to_string(),
            };
            parts.push(format!("{mark}{} [{status}]", v.value));
        }
        parts.join(", ")
    }

    /// Is `value` a legitimate content of `block` for a read with `floor`?
    /// On success the floor moves to the version read (`observe`).
    pub fn check(&mut self, block: u64, floor: u64, value: Value, observe: bool) -> bool {
        let found = self
            .allowed(block, floor)
            .find(|v| v.value == value)
            .map(|v| (v.vno, v.status == Status::InFlight));
        match found {
            Some((vno, in_flight)) => {
                if observe && (!in_flight || self.strict_reads) {
                    let blk = &mut self.blocks[block as usize];
                    blk.floor = blk.floor.max(vno);
                }
                true
            }
            None => false,
        }
    }

    /// A data-loss event (forced start, resolve): `block` now holds one of
    /// `values` (what the replicas started from held), and nothing older.
    /// Call only while nothing is in flight.
    pub fn reset(&mut self, block: u64, values: &[Value]) {
        let blk = &mut self.blocks[block as usize];
        blk.versions.clear();
        blk.floor = blk.next_vno;
        for v in values {
            let vno = blk.next_vno;
            blk.next_vno += 1;
            blk.versions.push_back(Version {
                vno,
                op: RESET,
                value: *v,
                status: Status::Acked { seq: 0, fua: true },
            });
        }
        if blk.versions.is_empty() {
            // No replica held it (cannot happen: a forced start has one).
            blk.versions.push_back(Version {
                vno: blk.next_vno,
                op: RESET,
                value: Value::Zero,
                status: Status::Acked { seq: 0, fua: true },
            });
            blk.next_vno += 1;
        }
    }

    pub fn floor(&self, block: u64) -> u64 {
        self.blocks[block as usize].floor
    }

    /// True when the floor version of `block` was acknowledged with nothing newer issued after it:
    /// the block's content is certain.
    pub fn settled_value(&self, block: u64) -> Option<Value> {
        let blk = &self.blocks[block as usize];
        let last = blk.versions.back()?;
        (last.vno == blk.floor).then_some(last.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_roundtrip_and_catch_garbage() {
        let mut buf = vec![0u8; 2 * BLOCK as usize];
        fill(&mut buf, 42, 7);
        assert_eq!(decode(&buf[..4096], 7), Ok(Value::Stamp(42)));
        assert_eq!(decode(&buf[4096..], 8), Ok(Value::Stamp(42)));
        assert!(decode(&buf[4096..], 9).is_err());
        assert_eq!(decode(&[0u8; 4096], 3), Ok(Value::Zero));
        buf[100] ^= 1;
        assert!(decode(&buf[..4096], 7).is_err());
    }

    #[test]
    fn register_rules() {
        let mut m = Model::new(4);
        m.issue(1, 0, 1, false);
        let f = m.floors(0, 1)[0];
        assert!(m.check(0, f, Value::Zero, false));
        assert!(m.check(0, f, Value::Stamp(1), false));
        m.complete(1, 0, 1, true, false);
        let f = m.floors(0, 1)[0];
        assert!(
            !m.check(0, f, Value::Zero, false),
            "acked write must read back"
        );
        m.crash();
        let f = m.floors(0, 1)[0];
        assert!(
            m.check(0, f, Value::Zero, false),
            "unflushed write may be lost"
        );
        let cover = m.flush_cover();
        m.flushed(cover);
        m.crash();
        let f = m.floors(0, 1)[0];
        assert!(
            m.check(0, f, Value::Zero, false),
            "a flush after the crash does not cover it"
        );
        m.issue(2, 0, 1, false);
        m.complete(2, 0, 1, true, false);
        let cover = m.flush_cover();
        m.flushed(cover);
        m.crash();
        let f = m.floors(0, 1)[0];
        assert!(!m.check(0, f, Value::Stamp(1), false));
        assert!(m.check(0, f, Value::Stamp(2), true));
        m.issue(3, 0, 1, false);
        m.complete(3, 0, 1, false, false);
        let f = m.floors(0, 1)[0];
        assert!(
            m.check(0, f, Value::Stamp(3), true),
            "a failed write may have landed"
        );
        let f = m.floors(0, 1)[0];
        assert!(
            !m.check(0, f, Value::Stamp(2), false),
            "no going back after a read"
        );
        m.prune();
        assert!(m.check(0, m.floor(0), Value::Stamp(3), false));
    }

    #[test]
    fn reads_overlapping_a_write_in_flight_may_go_back_until_it_is_acked() {
        let mut m = Model::new(1);
        m.issue(1, 0, 1, false);
        m.complete(1, 0, 1, true, true);
        m.issue(2, 0, 1, false);
        // One replica already has write 2, the other not yet.
        assert!(m.check(0, m.floor(0), Value::Stamp(2), true));
        assert!(
            m.check(0, m.floor(0), Value::Stamp(1), true),
            "a read concurrent with write 2 may return the old data"
        );
        m.complete(2, 0, 1, true, false);
        assert!(!m.check(0, m.floor(0), Value::Stamp(1), false));
        // A failed write seen by a read that completed after it: settled.
        m.issue(3, 0, 1, false);
        m.complete(3, 0, 1, false, false);
        assert!(m.check(0, m.floor(0), Value::Stamp(3), true));
        assert!(!m.check(0, m.floor(0), Value::Stamp(2), false));
    }

    #[test]
    fn a_reset_holds_only_what_the_forced_replicas_held() {
        let mut m = Model::new(1);
        m.issue(1, 0, 1, false);
        m.complete(1, 0, 1, true, true);
        m.reset(0, &[Value::Zero, Value::Stamp(7)]);
        assert!(!m.check(0, m.floor(0), Value::Stamp(1), false));
        assert!(m.check(0, m.floor(0), Value::Zero, false));
        m.crash();
        assert!(m.check(0, m.floor(0), Value::Zero, false));
        assert!(m.check(0, m.floor(0), Value::Stamp(7), true));
        assert!(!m.check(0, m.floor(0), Value::Zero, false));
    }
}
