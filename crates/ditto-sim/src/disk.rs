//! `SimDisk`: an in-memory [`IoFile`] that loses unflushed writes on a crash
//! and fails, hangs or lands abandoned writes late on demand.
//!
//! Content is kept per 4 KiB sector in two layers: what is durable, and the
//! versions written since the last `sync_data` that covered them. A crash
//! resolves every sector to one of its versions at random (none, some or the
//! last of the unflushed writes survive). Every operation takes a small
//! random simulated latency, which is what makes concurrent requests
//! interleave differently per seed. An operation whose future is dropped
//! before it completes (the engine's `io_timeout`) is *abandoned*, not
//! cancelled: as a kernel still holding the I/O would, its write lands at its
//! completion time anyway, applied by [`SimDisk::pump`] from whoever touches
//! the disk next, independent of the dropped future.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ditto_engine::{Allocation, BoxFuture, IoFile};

use crate::rng::SimRng;

/// Bytes per simulated sector: the unit of crash atomicity. 4 KiB, so a
/// client block is never torn (what a 4Kn disk or a filesystem block gives).
pub const SECTOR: u64 = 4096;

const EIO: i32 = 5;
const ENOSPC: i32 = 28;
const EOPNOTSUPP: i32 = 95;

static ZERO_SECTOR: [u8; SECTOR as usize] = [0; SECTOR as usize];

/// Which operations a fault rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Sync,
    Punch,
    Zero,
    Allocation,
}

impl OpKind {
    fn modifies(self) -> bool {
        matches!(self, OpKind::Write | OpKind::Punch | OpKind::Zero)
    }
}

/// What an injected fault does to the operation it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The operation fails with EIO (and has no effect).
    Eio,
    /// A modifying operation fails with ENOSPC (a sparse pool that ran out).
    Enospc,
    /// The operation completes (successfully) only after this long.
    Hang(Duration),
}

/// A scripted fault: hits operations of kind `ops` overlapping `range`
/// (bytes of the disk; None = anywhere), `count` times (None = forever).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FaultRule {
    pub ops: Vec<OpKind>,
    pub range: Option<Range<u64>>,
    pub kind: FaultKind,
    pub count: Option<u32>,
    /// Per-mille chance that a matching operation is hit.
    pub per_mille: u16,
}

/// How a crash treats the sectors written since their last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// Every sector ends as one of its versions (durable or unflushed) at random.
    Random,
    /// Everything written survives (a daemon kill: the page cache is intact).
    KeepAll,
    /// Nothing unflushed survives.
    LoseAll,
    /// Completed writes survive, operations still in flight do not.
    KeepCompleted,
}

/// Counters for stats and for the checker's "had a fault" question.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub ops: u64,
    /// Faults injected (rules hit, plus operations failed because the disk is gone).
    pub faults: u64,
    pub late_landed: u64,
    pub late_dropped: u64,
}

type Version = (u64, Option<Bytes>);

enum Effect {
    Write(u64, Bytes),
    Punch(u64, u64),
    Zero(u64, u64),
}

struct Late {
    due: Duration,
    incarnation: u64,
    effect: Effect,
    /// For the trace log.
    what: Option<String>,
}

struct DiskState {
    len: u64,
    /// Bumped when the disk is replaced by a blank one: older operations no longer land.
    incarnation: u64,
    durable: Vec<Option<Bytes>>,
    /// Sector → versions written since the last sync that covered them, oldest first.
    volatile: BTreeMap<u64, Vec<Version>>,
    /// Orders writes against syncs: a sync makes durable what was written before it was issued.
    write_seq: u64,
    abandoned: Vec<Late>,
    rng: SimRng,
    faults: Vec<FaultRule>,
    gone: bool,
    stall_until: Duration,
    punch_supported: bool,
    latency_us: (u64, u64),
    stats: DiskStats,
    name: String,
    /// Where operations are logged (verbose runs), and where the data area starts.
    log: Option<Arc<Mutex<Vec<String>>>>,
    data_offset: u64,
}

/// An in-memory disk shared (through an `Arc`) by the simulated host and the
/// checker; it survives simulated crashes, as a real disk does.
pub struct SimDisk {
    name: String,
    state: Mutex<DiskState>,
}

/// Simulated time now: the turmoil clock inside a running host, else
/// the time the driver last set.
fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or(Duration::ZERO)
}

fn os_err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

struct Plan {
    due: Duration,
    result: io::Result<()>,
    incarnation: u64,
    write_seq: u64,
}

impl DiskState {
    fn trace(&self, line: String) {
        if let Some(log) = &self.log {
            let t = sim_now().as_secs_f64();
            match log.lock() {
                Ok(mut g) => g.push(format!("{t:10.4}     disk: {line}")),
                Err(p) => p.into_inner().push(line),
            }
        }
    }

    fn sectors(&self) -> u64 {
        self.len.div_ceil(SECTOR)
    }

    fn visible(&self, s: u64) -> Option<&Bytes> {
        match self.volatile.get(&s).and_then(|v| v.last()) {
            Some((_, b)) => b.as_ref(),
            None => self.durable.get(s as usize).and_then(|b| b.as_ref()),
        }
    }

    fn put(&mut self, s: u64, content: Option<Bytes>) {
        if s >= self.sectors() {
            return;
        }
        self.write_seq += 1;
        let seq = self.write_seq;
        self.volatile.entry(s).or_default().push((seq, content));
    }

    fn read(&self, offset: u64, len: usize) -> Bytes {
        let end = offset + len as u64;
        if offset.is_multiple_of(SECTOR) && len as u64 == SECTOR {
            return self
                .visible(offset / SECTOR)
                .cloned()
                .unwrap_or_else(|| Bytes::from_static(&ZERO_SECTOR));
        }
        let mut out = BytesMut::zeroed(len);
        let mut pos = offset;
        while pos < end {
            let s = pos / SECTOR;
            let within = (pos % SECTOR) as usize;
            let n = ((SECTOR as usize - within) as u64).min(end - pos) as usize;
            if let Some(b) = self.visible(s) {
                let at = (pos - offset) as usize;
                out[at..at + n].copy_from_slice(&b[within..within + n]);
            }
            pos += n as u64;
        }
        out.freeze()
    }

    /// Write `data` at `offset`; `None` content punches (whole sectors become holes).
    fn write(&mut self, offset: u64, data: &Bytes) {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let s = pos / SECTOR;
            let within = (pos % SECTOR) as usize;
            let n = ((SECTOR as usize - within) as u64).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            let content = if within == 0 && n == SECTOR as usize {
                data.slice(at..at + n)
            } else {
                let mut sector = match self.visible(s) {
                    Some(b) => BytesMut::from(&b[..]),
                    None => BytesMut::zeroed(SECTOR as usize),
                };
                sector[within..within + n].copy_from_slice(&data[at..at + n]);
                sector.freeze()
            };
            self.put(s, Some(content));
            pos += n as u64;
        }
    }

    fn zero(&mut self, offset: u64, len: u64, hole: bool) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let s = pos / SECTOR;
            let within = pos % SECTOR;
            let n = (SECTOR - within).min(end - pos);
            if within == 0 && n == SECTOR {
                let content = if hole {
                    None
                } else {
                    Some(Bytes::from_static(&ZERO_SECTOR))
                };
                self.put(s, content);
            } else if let Some(b) = self.visible(s) {
                let mut sector = BytesMut::from(&b[..]);
                sector[within as usize..(within + n) as usize].fill(0);
                self.put(s, Some(sector.freeze()));
            }
            pos += n;
        }
    }

    fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::Write(o, d) => self.write(*o, d),
            Effect::Punch(o, l) => self.zero(*o, *l, true),
            Effect::Zero(o, l) => self.zero(*o, *l, false),
        }
    }

    /// Everything written up to `seq` becomes durable.
    fn sync(&mut self, seq: u64) {
        let mut emptied = Vec::new();
        for (s, versions) in self.volatile.iter_mut() {
            let covered = versions.iter().take_while(|(q, _)| *q <= seq).count();
            if covered > 0 {
                let (_, content) = versions[covered - 1].clone();
                if let Some(slot) = self.durable.get_mut(*s as usize) {
                    *slot = content;
                }
                versions.drain(..covered);
            }
            if versions.is_empty() {
                emptied.push(*s);
            }
        }
        for s in emptied {
            self.volatile.remove(&s);
        }
    }

    fn pump(&mut self, now: Duration) {
        if self.abandoned.is_empty() {
            return;
        }
        self.abandoned.sort_by_key(|l| l.due);
        while self.abandoned.first().is_some_and(|l| l.due <= now) {
            let late = self.abandoned.remove(0);
            if late.incarnation == self.incarnation && !self.gone {
                self.apply(&late.effect);
                self.stats.late_landed += 1;
                if let Some(w) = &late.what {
                    let msg = format!("{} {w}: abandoned, landed late", self.name);
                    self.trace(msg);
                }
            } else {
                self.stats.late_dropped += 1;
            }
        }
    }

    fn plan(&mut self, handle: u64, op: OpKind, range: Range<u64>, now: Duration) -> Plan {
        self.pump(now);
        self.stats.ops += 1;
        let (lo, hi) = self.latency_us;
        let latency = Duration::from_micros(self.rng.range(lo, hi));
        let mut plan = Plan {
            due: now.max(self.stall_until) + latency,
            result: Ok(()),
            incarnation: self.incarnation,
            write_seq: self.write_seq,
        };
        if now < self.stall_until {
            // Delayed by a stall: a fault this operation met.
            self.stats.faults += 1;
        }
        if self.gone || handle != self.incarnation {
            // A replaced disk never answers through a handle opened on the old one.
            self.stats.faults += 1;
            plan.due = now + latency;
            plan.result = Err(os_err(EIO));
            return plan;
        }
        if op == OpKind::Punch && !self.punch_supported {
            plan.result = Err(os_err(EOPNOTSUPP));
            return plan;
        }
        for i in 0..self.faults.len() {
            let rule = &self.faults[i];
            let overlaps = rule
                .range
                .as_ref()
                .is_none_or(|r| r.start < range.end.max(range.start + 1) && range.start < r.end);
            if !rule.ops.contains(&op) || !overlaps || rule.count == Some(0) {
                continue;
            }
            let per_mille = u64::from(rule.per_mille);
            if self.rng.below(1000) >= per_mille {
                continue;
            }
            let kind = rule.kind;
            if kind == FaultKind::Enospc && !op.modifies() {
                continue;
            }
            if let Some(c) = self.faults[i].count.as_mut() {
                *c -= 1;
            }
            self.stats.faults += 1;
            match kind {
                FaultKind::Eio => plan.result = Err(os_err(EIO)),
                FaultKind::Enospc => plan.result = Err(os_err(ENOSPC)),
                FaultKind::Hang(d) => plan.due = now.max(self.stall_until) + d,
            }
            break;
        }
        self.faults.retain(|r| r.count != Some(0));
        plan
    }
}

fn describe(op: OpKind, range: &Range<u64>, effect: Option<&Effect>, data_offset: u64) -> String {
    let place = |off: u64, len: u64| {
        if off >= data_offset && data_offset > 0 {
            let b = (off - data_offset) / crate::model::BLOCK;
            format!("blk {b}+{}", len.div_ceil(crate::model::BLOCK))
        } else {
            format!("meta @{off}+{len}")
        }
    };
    let len = range.end - range.start;
    match effect {
        Some(Effect::Write(o, d)) => format!(
            "write {} {}",
            place(*o, d.len() as u64),
            describe_data(d, *o, data_offset)
        ),
        Some(Effect::Punch(o, l)) => format!("punch {}", place(*o, *l)),
        Some(Effect::Zero(o, l)) => format!("zero {}", place(*o, *l)),
        None => match op {
            OpKind::Sync => "sync".to_string(),
            OpKind::Read => format!("read {}", place(range.start, len)),
            _ => format!("{op:?} {}", place(range.start, len)),
        },
    }
}

/// The first block's stamp, for logs.
fn describe_data(d: &Bytes, offset: u64, data_offset: u64) -> String {
    if offset < data_offset || data_offset == 0 || d.len() < crate::model::BLOCK as usize {
        return String::new();
    }
    let b = (offset - data_offset) / crate::model::BLOCK;
    match crate::model::decode(&d[..crate::model::BLOCK as usize], b) {
        Ok(v) => format!("({v}{})", if d.len() > 4096 { ", ..." } else { "" }),
        Err(e) => format!("({e})"),
    }
}

/// Turns a dropped, unfinished modifying operation into an abandoned one.
struct Pending<'a> {
    disk: &'a SimDisk,
    late: Option<Late>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(late) = self.late.take() {
            let mut s = self.disk.lock();
            if let Some(w) = &late.what {
                s.trace(format!("{} {w}: abandoned by its caller", self.disk.name));
            }
            s.abandoned.push(late);
        }
    }
}

impl SimDisk {
    /// A blank (all holes) disk of `len` bytes; `seed` drives its latencies and faults.
    pub fn new(name: impl Into<String>, len: u64, seed: u64) -> Arc<Self> {
        let name = name.into();
        let sectors = len.div_ceil(SECTOR) as usize;
        Arc::new(SimDisk {
            state: Mutex::new(DiskState {
                len,
                incarnation: 0,
                durable: vec![None; sectors],
                volatile: BTreeMap::new(),
                write_seq: 0,
                abandoned: Vec::new(),
                rng: SimRng::stream(seed, &name),
                faults: Vec::new(),
                gone: false,
                stall_until: Duration::ZERO,
                punch_supported: true,
                latency_us: (20, 400),
                stats: DiskStats::default(),
                name: name.clone(),
                log: None,
                data_offset: 0,
            }),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Log every operation into `log` (verbose runs); `data_offset` names client blocks.
    pub fn set_trace(&self, log: Arc<Mutex<Vec<String>>>, data_offset: u64) {
        let mut s = self.lock();
        s.log = Some(log);
        s.data_offset = data_offset;
    }

    fn tracing(&self) -> bool {
        self.lock().log.is_some()
    }

    fn data_offset(&self) -> u64 {
        self.lock().data_offset
    }

    /// Latency range of every operation, in microseconds.
    pub fn set_latency(&self, min_us: u64, max_us: u64) {
        self.lock().latency_us = (min_us, max_us.max(min_us));
    }

    pub fn add_fault(&self, rule: FaultRule) {
        self.lock().faults.push(rule);
    }

    pub fn clear_faults(&self) {
        let mut s = self.lock();
        s.faults.clear();
        s.stall_until = Duration::ZERO;
    }

    pub fn faults(&self) -> Vec<FaultRule> {
        self.lock().faults.clone()
    }

    /// Every operation issued before `until` completes no earlier than it (a stalled disk).
    pub fn stall_until(&self, until: Duration) {
        let mut s = self.lock();
        s.stall_until = s.stall_until.max(until);
        s.stats.faults += 1;
    }

    /// A filesystem without hole punching: `punch_hole` fails with EOPNOTSUPP.
    pub fn set_punch_supported(&self, yes: bool) {
        self.lock().punch_supported = yes;
    }

    /// The disk disappears (every operation fails; abandoned writes never land)
    /// or comes back with its content.
    pub fn set_gone(&self, gone: bool) {
        let mut s = self.lock();
        s.gone = gone;
        if gone {
            let dropped = s.abandoned.len() as u64;
            s.abandoned.clear();
            s.stats.late_dropped += dropped;
        }
    }

    /// Bumped by every [`SimDisk::replace_blank`]; handles opened before see a dead disk.
    pub fn incarnation(&self) -> u64 {
        self.lock().incarnation
    }

    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// Swap in a blank disk of the same size under the same name.
    pub fn replace_blank(&self) {
        let mut s = self.lock();
        let sectors = s.sectors() as usize;
        s.incarnation += 1;
        s.durable = vec![None; sectors];
        s.volatile.clear();
        let dropped = s.abandoned.len() as u64;
        s.abandoned.clear();
        s.stats.late_dropped += dropped;
        s.faults.clear();
        s.stall_until = Duration::ZERO;
        s.gone = false;
    }

    /// Land the abandoned writes due by `now`.
    pub fn pump(&self, now: Duration) {
        self.lock().pump(now);
    }

    /// Abandoned writes that have not landed yet.
    pub fn pending_late(&self) -> usize {
        self.lock().abandoned.len()
    }

    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// Power loss: abandoned writes land or not, then every sector written
    /// since its last sync ends as one of its versions; stalls end.
    pub fn crash(&self, rng: &mut SimRng, mode: CrashMode) {
        let mut s = self.lock();
        let late = std::mem::take(&mut s.abandoned);
        for l in late {
            let lands = match mode {
                CrashMode::KeepAll => true,
                CrashMode::LoseAll | CrashMode::KeepCompleted => false,
                CrashMode::Random => rng.chance(0.5),
            };
            if l.incarnation == s.incarnation && !s.gone && lands {
                s.apply(&l.effect);
                s.stats.late_landed += 1;
            } else {
                s.stats.late_dropped += 1;
            }
        }
        let volatile = std::mem::take(&mut s.volatile);
        for (sector, versions) in volatile {
            let pick = match mode {
                CrashMode::KeepAll | CrashMode::KeepCompleted => versions.len(),
                CrashMode::LoseAll => 0,
                CrashMode::Random => rng.below(versions.len() as u64 + 1) as usize,
            };
            if pick > 0 {
                if let Some(slot) = s.durable.get_mut(sector as usize) {
                    *slot = versions[pick - 1].1.clone();
                }
            }
        }
        s.stall_until = Duration::ZERO;
    }

    /// What a read at `offset` would return now, bypassing faults and latency (for the checker).
    pub fn peek(&self, offset: u64, len: usize) -> Bytes {
        self.lock().read(offset, len)
    }

    /// True when the sectors `[first, first+n)` of both disks read the same.
    pub fn same_content(&self, other: &SimDisk, offset: u64, len: u64) -> bool {
        let a = self.lock();
        let b = other.lock();
        let first = offset / SECTOR;
        let n = len.div_ceil(SECTOR);
        (first..first + n).all(|s| match (a.visible(s), b.visible(s)) {
            (None, None) => true,
            (Some(x), None) | (None, Some(x)) => x.iter().all(|&v| v == 0),
            (Some(x), Some(y)) => x == y,
        })
    }

    /// Write straight to durable content (to prepare a scenario).
    pub fn poke(&self, offset: u64, data: Bytes) {
        let mut s = self.lock();
        s.write(offset, &data);
        let seq = s.write_seq;
        s.sync(seq);
    }

    async fn run(
        &self,
        handle: u64,
        op: OpKind,
        range: Range<u64>,
        effect: Option<Effect>,
    ) -> io::Result<Option<Bytes>> {
        let now = sim_now();
        let plan = self.lock().plan(handle, op, range.clone(), now);
        let what = self
            .tracing()
            .then(|| describe(op, &range, effect.as_ref(), self.data_offset()));
        // The effect rides in the guard so a dropped future still lands it.
        let mut pending = Pending {
            disk: self,
            late: match (effect, plan.result.is_err()) {
                (Some(effect), false) => Some(Late {
                    due: plan.due,
                    incarnation: plan.incarnation,
                    effect,
                    what: what.clone(),
                }),
                _ => None,
            },
        };
        let wait = plan.due.saturating_sub(now);
        if let Some(what) = what.as_ref().filter(|_| wait > Duration::from_millis(50)) {
            // A hung or stalled operation: say when it started.
            let msg = format!(
                "{} {what}: issued, completes at {:.4}",
                self.name,
                plan.due.as_secs_f64()
            );
            self.lock().trace(msg);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let late = pending.late.take();
        let mut s = self.lock();
        s.pump(sim_now().max(plan.due));
        let result = match plan.result {
            Err(e) => Err(e),
            Ok(()) if s.gone || s.incarnation != plan.incarnation => Err(os_err(EIO)),
            Ok(()) => Ok(match op {
                OpKind::Read => Some(s.read(range.start, (range.end - range.start) as usize)),
                OpKind::Sync => {
                    s.sync(plan.write_seq);
                    None
                }
                _ => {
                    if let Some(l) = late {
                        s.apply(&l.effect);
                    }
                    None
                }
            }),
        };
        if let Some(what) = what {
            let outcome = match &result {
                Ok(Some(d)) if op == OpKind::Read => {
                    format!("ok {}", describe_data(d, range.start, s.data_offset))
                }
                Ok(_) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            };
            s.trace(format!("{} {what}: {outcome}", self.name));
        }
        result
    }

    fn allocation_now(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let s = self.lock();
        let end = offset + len;
        let mut runs: Vec<Allocation> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let sector = pos / SECTOR;
            let next = ((sector + 1) * SECTOR).min(end);
            let allocated = s.visible(sector).is_some();
            match runs.last_mut() {
                Some(last) if last.allocated == allocated => last.length += next - pos,
                _ => runs.push(Allocation {
                    offset: pos,
                    length: next - pos,
                    allocated,
                }),
            }
            pos = next;
        }
        runs
    }
}

/// An open handle on a [`SimDisk`], as a file descriptor is: once the disk
/// is replaced (blank), operations through a handle opened before fail.
pub struct SimFile {
    disk: Arc<SimDisk>,
    incarnation: u64,
}

impl SimDisk {
    /// Open a handle on the disk as it is now.
    pub fn open(self: &Arc<Self>) -> Arc<SimFile> {
        Arc::new(SimFile {
            disk: self.clone(),
            incarnation: self.lock().incarnation,
        })
    }
}

impl IoFile for SimFile {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let r = self
                .disk
                .run(
                    self.incarnation,
                    OpKind::Read,
                    offset..offset + len as u64,
                    None,
                )
                .await?;
            Ok(r.unwrap_or_default())
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let range = offset..offset + data.len() as u64;
            self.disk
                .run(
                    self.incarnation,
                    OpKind::Write,
                    range,
                    Some(Effect::Write(offset, data)),
                )
                .await
                .map(|_| ())
        })
    }

    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.disk
                .run(self.incarnation, OpKind::Sync, 0..0, None)
                .await
                .map(|_| ())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.disk
                .run(
                    self.incarnation,
                    OpKind::Punch,
                    offset..offset + len,
                    Some(Effect::Punch(offset, len)),
                )
                .await
                .map(|_| ())
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.disk
                .run(
                    self.incarnation,
                    OpKind::Zero,
                    offset..offset + len,
                    Some(Effect::Zero(offset, len)),
                )
                .await
                .map(|_| ())
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Allocation>>> {
        Box::pin(async move {
            self.disk
                .run(
                    self.incarnation,
                    OpKind::Allocation,
                    offset..offset + len,
                    None,
                )
                .await?;
            Ok(self.disk.allocation_now(offset, len))
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.disk.lock().len)
    }
}
