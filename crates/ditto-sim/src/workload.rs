//! The random workload: client I/O from several connections interleaved
//! with operator commands and faults, chosen from the world's state.
//!
//! Each seed also draws its own *profile* (replica count, concurrency,
//! working set, request sizes, how often and which incidents happen): swarm
//! testing, so that some seeds crash constantly, some never do, some hammer
//! one region, and rare combinations get their turn.

use std::collections::VecDeque;
use std::time::Duration;

use ditto_engine::ReplicaState;

use crate::disk::{CrashMode, FaultKind, FaultRule, OpKind};
use crate::model::BLOCK;
use crate::rng::SimRng;
use crate::world::{Event, NodeState, Rate, Refusal, World};

/// What a seed's workload looks like.
#[derive(Debug, Clone)]
pub struct Profile {
    pub replicas: usize,
    /// Client requests kept in flight.
    pub conns: usize,
    /// Client I/O stays within the first this many blocks.
    pub working_set: u64,
    pub max_blocks: u64,
    /// Weights of read, write, flush, trim, write-zeroes.
    pub io_weights: [u64; 5],
    pub fua_per_mille: u64,
    /// Chance (per mille) that a client request is followed by an incident.
    pub incident_per_mille: u64,
    /// Weights of the incidents, in [`INCIDENTS`] order.
    pub incident_weights: [u64; INCIDENTS.len()],
    pub settle_every: u64,
    /// Let starts pick throttled resync rates.
    pub throttle: bool,
    /// Let starts pick a dirty clear delay (0..2 s) and a small hot set.
    pub vary_dirty: bool,
    /// Chance (per mille) that the operator forces a start refused as
    /// stale-only (`--force-stale`) rather than bringing the disks back.
    pub force_per_mille: u64,
}

/// Incident classes.
pub const INCIDENTS: [&str; 16] = [
    "crash",
    "stop",
    "fail",
    "readd",
    "add",
    "remove",
    "scrub",
    "fault",
    "stall",
    "gone",
    "blank",
    "nopunch",
    "last-leg",
    "verify",
    "read-error",
    "heal",
];

impl Profile {
    pub fn draw(rng: &mut SimRng, blocks: u64) -> Profile {
        let mut w = |lo: u64, hi: u64| rng.range(lo, hi);
        let working_set = [32, 128, 512, blocks][w(0, 3) as usize].min(blocks);
        let mut incident_weights = [0u64; INCIDENTS.len()];
        for (i, slot) in incident_weights.iter_mut().enumerate() {
            // Each incident class is off for some seeds (swarm testing).
            *slot = if w(0, 4) == 0 {
                0
            } else {
                match INCIDENTS[i] {
                    "crash" | "fault" | "fail" | "readd" => w(2, 10),
                    "verify" | "heal" => w(1, 4),
                    _ => w(1, 6),
                }
            };
        }
        Profile {
            replicas: w(2, 3) as usize,
            conns: [1, 2, 4, 8][w(0, 3) as usize],
            working_set,
            max_blocks: [1, 4, 16][w(0, 2) as usize],
            io_weights: [w(20, 50), w(20, 50), w(2, 10), w(0, 6), w(0, 6)],
            fua_per_mille: [0, 50, 300][w(0, 2) as usize],
            incident_per_mille: [5, 20, 60][w(0, 2) as usize],
            incident_weights,
            settle_every: [50, 200, 800][w(0, 2) as usize],
            throttle: false,
            vary_dirty: false,
            force_per_mille: [0, 150, 500][w(0, 2) as usize],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    /// Heal everything and bring every disk back.
    Heal,
    /// Re-add what is out of sync, settle, read everything back.
    Finish,
    Done,
}

/// Chooses the next events from the world's state.
pub struct Generator {
    rng: SimRng,
    pub profile: Profile,
    target: u64,
    issued: u64,
    since_settle: u64,
    /// Gone slots and the request count at which they come back.
    gone: Vec<(u8, u64)>,
    queue: VecDeque<(u32, Event)>,
    phase: Phase,
    /// A start was refused and a start with every disk was already tried.
    full_start_tried: bool,
    /// Starts tried since the node was last running (to give up on a lost volume).
    recoveries: u32,
    /// The absent mask of the last start.
    last_absent: u32,
    /// Waits for a stopped instance's hung operations.
    waits: u32,
    /// The volume has run once: its first open is the node's creation,
    /// which opens every replica it just formatted (`Node::create_volume`).
    created: bool,
}

impl Generator {
    pub fn new(seed: u64, ops: u64, blocks: u64) -> Generator {
        let mut rng = SimRng::stream(seed, "workload");
        let profile = Profile::draw(&mut rng, blocks);
        Generator {
            rng,
            profile,
            target: ops,
            issued: 0,
            since_settle: 0,
            gone: Vec::new(),
            queue: VecDeque::new(),
            phase: Phase::Run,
            full_start_tried: false,
            recoveries: 0,
            last_absent: 0,
            waits: 0,
            created: false,
        }
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done && self.queue.is_empty()
    }

    fn jitter(&mut self) -> u32 {
        self.rng.below(1000) as u32
    }

    fn push(&mut self, e: Event) {
        let j = self.jitter();
        self.queue.push_back((j, e));
    }

    /// The next event to run now, or None to let time pass.
    pub fn next(&mut self, w: &World) -> Option<(u32, Event)> {
        if let Some(e) = self.queue.pop_front() {
            return Some(e);
        }
        if self.phase == Phase::Done {
            return None;
        }
        match w.node {
            NodeState::Starting => return None,
            NodeState::Down => {
                self.start(w);
                return self.queue.pop_front();
            }
            NodeState::Stopping | NodeState::Running => {}
        }
        if w.node == NodeState::Running {
            self.full_start_tried = false;
            self.recoveries = 0;
            self.waits = 0;
            self.created = true;
        }
        match self.phase {
            Phase::Run => {}
            Phase::Heal => {
                for s in 0..w.slots.len() {
                    self.push(Event::Heal { slot: s as u8 });
                    self.push(Event::Back { slot: s as u8 });
                }
                self.gone.clear();
                self.push(Event::Settle);
                self.phase = Phase::Finish;
                return self.queue.pop_front();
            }
            Phase::Finish => {
                if w.node != NodeState::Running || !w.idle() {
                    return None;
                }
                for (s, slot) in w.slots.iter().enumerate() {
                    let state = w.state_of(s);
                    if slot.in_record
                        && matches!(
                            state,
                            Some(
                                ReplicaState::Failed | ReplicaState::Stale | ReplicaState::Missing
                            )
                        )
                    {
                        self.push(Event::Readd { slot: s as u8 });
                    }
                }
                self.push(Event::Settle);
                self.push(Event::Verify);
                self.push(Event::Settle);
                self.phase = Phase::Done;
                return self.queue.pop_front();
            }
            Phase::Done => return None,
        }
        if self.issued >= self.target {
            if w.io_in_flight() == 0 {
                self.phase = Phase::Heal;
            }
            return None;
        }
        // Gone disks come back after a while.
        if let Some(i) = self.gone.iter().position(|(_, at)| *at <= self.issued) {
            let (slot, _) = self.gone.remove(i);
            return Some((0, Event::Back { slot }));
        }
        if self.since_settle >= self.profile.settle_every {
            self.since_settle = 0;
            return Some((0, Event::Settle));
        }
        if w.io_in_flight() >= self.profile.conns {
            return None;
        }
        let io = self.io(w)?;
        self.issued += 1;
        self.since_settle += 1;
        if self.rng.below(1000) < self.profile.incident_per_mille {
            self.incident(w);
        }
        let j = self.jitter();
        Some((j, io))
    }

    fn all_back(&mut self, w: &World) {
        for s in 0..w.slots.len() {
            self.push(Event::Back { slot: s as u8 });
        }
        self.gone.clear();
    }

    fn start(&mut self, w: &World) {
        if let Some((why, _)) = w.refused {
            if why == Refusal::Draining && self.waits < 60 {
                // The operator waits for the hung disk, then starts again.
                self.waits += 1;
                self.push(Event::Sleep { ms: 500 });
                self.push_start(self.last_absent, false);
                return;
            }
            self.recoveries += 1;
            if self.recoveries > 4 {
                // Nothing brings it back: the volume is lost (legitimately,
                // e.g. its only current replica was wiped, and forcing failed).
                self.phase = Phase::Done;
                return;
            }
            match why {
                Refusal::SplitBrain => {
                    // The operator keeps a side: mostly the one the volume
                    // last ran on, sometimes the other (losing its writes).
                    let members = Self::member_slots(w);
                    let current: Vec<u8> = w
                        .known_current
                        .iter()
                        .map(|s| *s as u8)
                        .filter(|s| members.contains(s))
                        .collect();
                    let keep = if current.is_empty() || self.rng.chance(0.2) {
                        self.pick_slot(&members)
                    } else {
                        self.pick_slot(&current)
                    };
                    if let Some(keep) = keep {
                        self.all_back(w);
                        self.push(Event::Resolve { keep });
                        return;
                    }
                }
                Refusal::StaleOnly
                    if self.full_start_tried
                        || self.rng.below(1000) < self.profile.force_per_mille =>
                {
                    // The operator accepts the loss: `--force-stale`, with
                    // the disks as they are (a full start was refused too:
                    // the current replicas are really lost).
                    let absent = if self.full_start_tried {
                        0
                    } else {
                        self.last_absent
                    };
                    self.push_start(absent, true);
                    return;
                }
                _ => {}
            }
            if self.full_start_tried {
                self.phase = Phase::Done;
                return;
            }
            self.full_start_tried = true;
            self.all_back(w);
            self.push_start(0, false);
            return;
        }
        let members: Vec<usize> = (0..w.slots.len())
            .filter(|s| w.slots[*s].in_record)
            .collect();
        let mut absent = 0u32;
        if self.created && self.phase == Phase::Run && self.rng.chance(0.3) && members.len() > 1 {
            for &s in &members {
                if self.rng.chance(0.5) && s < 32 {
                    absent |= 1 << s;
                }
            }
            if members.iter().all(|s| absent & (1 << s) != 0) {
                absent &= !(1 << members[0]);
            }
        }
        self.push_start(absent, false);
    }

    fn push_start(&mut self, absent: u32, force: bool) {
        self.last_absent = absent;
        let rate = if self.profile.throttle {
            [Rate::Unlimited, Rate::Fast, Rate::Slow][self.rng.below(3) as usize]
        } else {
            Rate::Unlimited
        };
        let (clear_ms, hot) = if self.profile.vary_dirty {
            let clear = if self.rng.chance(0.25) {
                0
            } else {
                self.rng.below(2001) as u32
            };
            let hot = if self.rng.chance(0.3) {
                self.rng.range(2, 8) as u16
            } else {
                0
            };
            (clear, hot)
        } else {
            (0, 0)
        };
        self.push(Event::Start {
            absent,
            rate,
            clear_ms,
            hot,
            force,
        });
    }

    fn io(&mut self, w: &World) -> Option<Event> {
        let p = &self.profile;
        let total: u64 = p.io_weights.iter().sum();
        let mut pick = self.rng.below(total.max(1));
        let mut kind = 0;
        for (i, wt) in p.io_weights.iter().enumerate() {
            if pick < *wt {
                kind = i;
                break;
            }
            pick -= wt;
        }
        let ws = p.working_set.min(w.blocks());
        let max = p.max_blocks;
        let fua = self.rng.below(1000) < p.fua_per_mille;
        for _ in 0..4 {
            let n = if self.rng.chance(0.6) {
                1
            } else {
                self.rng.range(1, max)
            }
            .min(ws);
            let block = self.rng.below(ws - n + 1);
            let (b, n16) = (block as u32, n as u16);
            let e = match kind {
                0 => return Some(Event::Read { block: b, n: n16 }),
                2 => return Some(Event::Flush),
                1 => Event::Write {
                    block: b,
                    n: n16,
                    fua,
                },
                3 => Event::Trim { block: b, n: n16 },
                _ => Event::Zeroes {
                    block: b,
                    n: n16,
                    punch: self.rng.chance(0.5),
                    fua,
                },
            };
            if !w.busy(block, n) {
                return Some(e);
            }
        }
        Some(Event::Read {
            block: self.rng.below(ws) as u32,
            n: 1,
        })
    }

    fn member_slots(w: &World) -> Vec<u8> {
        (0..w.slots.len())
            .filter(|s| w.slots[*s].in_record)
            .map(|s| s as u8)
            .collect()
    }

    fn pick_slot(&mut self, slots: &[u8]) -> Option<u8> {
        self.rng.pick(slots).copied()
    }

    fn random_rule(&mut self, w: &World) -> FaultRule {
        let timeout = w.cfg.io_timeout.as_millis() as u64;
        let ops = match self.rng.below(6) {
            0 => vec![OpKind::Read],
            1 => vec![OpKind::Write],
            2 => vec![OpKind::Sync],
            3 => vec![OpKind::Write, OpKind::Zero, OpKind::Punch],
            4 => vec![OpKind::Allocation, OpKind::Read],
            _ => vec![OpKind::Read, OpKind::Write, OpKind::Sync],
        };
        let kind = match self.rng.below(20) {
            0..=9 => FaultKind::Eio,
            10..=12 => FaultKind::Enospc,
            13..=16 => FaultKind::Hang(Duration::from_millis(
                self.rng.range(timeout / 5, timeout * 4 / 5),
            )),
            _ => FaultKind::Hang(Duration::from_millis(
                self.rng.range(timeout * 6 / 5, timeout * 4),
            )),
        };
        let data_offset = w.layout().data_offset;
        let range = match self.rng.below(5) {
            0..=2 => {
                let ws = self.profile.working_set.min(w.blocks());
                let b = self.rng.below(ws);
                let n = self.rng.range(1, 16);
                Some(data_offset + b * BLOCK..data_offset + (b + n) * BLOCK)
            }
            3 => Some(0..data_offset),
            _ => None,
        };
        let (count, per_mille) = if self.rng.chance(0.1) {
            (None, self.rng.range(20, 300) as u16)
        } else {
            (Some(self.rng.range(1, 3) as u32), 1000)
        };
        FaultRule {
            ops,
            range,
            kind,
            count,
            per_mille,
        }
    }

    fn incident(&mut self, w: &World) {
        let weights = self.profile.incident_weights;
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return;
        }
        let mut pick = self.rng.below(total);
        let mut class = 0;
        for (i, wt) in weights.iter().enumerate() {
            if pick < *wt {
                class = i;
                break;
            }
            pick -= wt;
        }
        let members = Self::member_slots(w);
        let in_sync: Vec<u8> = w.in_sync_slots().into_iter().map(|s| s as u8).collect();
        let out: Vec<u8> = members
            .iter()
            .copied()
            .filter(|s| !in_sync.contains(s))
            .collect();
        let timeout = w.cfg.io_timeout.as_millis() as u64;
        match INCIDENTS[class] {
            "crash" => {
                let mode = match self.rng.below(10) {
                    0..=5 => CrashMode::Random,
                    6 | 7 => CrashMode::LoseAll,
                    8 => CrashMode::KeepCompleted,
                    _ => CrashMode::KeepAll,
                };
                self.push(Event::Crash { mode });
            }
            "stop" => self.push(Event::Stop),
            "fail" => {
                if let Some(slot) = self.pick_slot(&in_sync) {
                    self.push(Event::Fail { slot });
                }
            }
            "readd" => {
                let ready: Vec<u8> = out
                    .iter()
                    .copied()
                    .filter(|s| !w.slots[usize::from(*s)].disk.is_gone())
                    .collect();
                if let Some(slot) = self.pick_slot(&ready) {
                    self.push(Event::Readd { slot });
                }
            }
            "add" if members.len() < 4 && w.slots.len() < 30 => self.push(Event::Add),
            "remove" => {
                let from = if out.is_empty() || self.rng.chance(0.2) {
                    &members
                } else {
                    &out
                };
                if members.len() > 1 {
                    if let Some(slot) = self.pick_slot(&from.clone()) {
                        self.push(Event::Remove { slot });
                    }
                }
            }
            "scrub" => {
                let source = if self.rng.chance(0.3) {
                    self.pick_slot(&in_sync)
                } else {
                    None
                };
                let repair = self.rng.chance(0.5);
                self.push(Event::Scrub { repair, source });
            }
            "fault" => {
                if let Some(slot) = self.pick_slot(&members) {
                    let rule = self.random_rule(w);
                    self.push(Event::Fault { slot, rule });
                }
            }
            "stall" => {
                if let Some(slot) = self.pick_slot(&members) {
                    let ms = self.rng.range(timeout / 5, timeout * 3) as u32;
                    self.push(Event::Stall { slot, ms });
                }
            }
            "gone" => {
                if let Some(slot) = self.pick_slot(&members) {
                    if !w.slots[usize::from(slot)].disk.is_gone() {
                        let back = self.issued + self.rng.range(10, 400);
                        self.gone.push((slot, back));
                        self.push(Event::Gone { slot });
                    }
                }
            }
            "blank" => {
                // A disk is replaced while away (or out of the set): never
                // under an in-sync replica, which no local file system does.
                let away: Vec<u8> = members
                    .iter()
                    .copied()
                    .filter(|s| w.slots[usize::from(*s)].disk.is_gone() || out.contains(s))
                    .collect();
                if let Some(slot) = self.pick_slot(&away) {
                    self.gone.retain(|(s, _)| *s != slot);
                    self.push(Event::Blank { slot });
                }
            }
            "nopunch" => {
                if let Some(slot) = self.pick_slot(&members) {
                    self.push(Event::NoPunch { slot });
                }
            }
            "last-leg" if in_sync.len() == 1 => {
                let kind = match self.rng.below(3) {
                    0 => FaultKind::Eio,
                    1 => FaultKind::Enospc,
                    _ => FaultKind::Hang(Duration::from_millis(
                        self.rng.range(timeout * 6 / 5, timeout * 2),
                    )),
                };
                self.push(Event::Fault {
                    slot: in_sync[0],
                    rule: FaultRule {
                        ops: vec![OpKind::Write, OpKind::Zero, OpKind::Punch, OpKind::Sync],
                        range: None,
                        kind,
                        count: Some(1),
                        per_mille: 1000,
                    },
                });
            }
            "verify" => {
                self.push(Event::Settle);
                self.push(Event::Verify);
            }
            "read-error" => {
                if let Some(slot) = self.pick_slot(&in_sync) {
                    let ws = self.profile.working_set.min(w.blocks());
                    let b = self.rng.below(ws);
                    let off = w.layout().data_offset + b * BLOCK;
                    let len = self.rng.range(1, 16) * BLOCK;
                    let count = self.rng.range(1, 3) as u32;
                    self.push(Event::Fault {
                        slot,
                        rule: FaultRule {
                            ops: vec![OpKind::Read],
                            range: Some(off..off + len),
                            kind: FaultKind::Eio,
                            count: Some(count),
                            per_mille: 1000,
                        },
                    });
                }
            }
            "heal" => {
                if let Some(slot) = self.pick_slot(&members) {
                    self.push(Event::Heal { slot });
                }
            }
            _ => {}
        }
    }
}
