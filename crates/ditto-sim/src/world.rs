//! The simulated world: one turmoil host ("node") runs the volume engine on
//! [`SimDisk`]s; the driver outside it steps simulated time, hands it
//! requests, collects replies and runs the checker after every step.
//!
//! Requests go to the node through shared memory rather than a simulated
//! socket: the node's dispatcher runs each one as its own task (as the NBD
//! server does), after a per-request jitter so arrival order varies. A crash
//! is `Sim::crash` + `bounce`: every engine task dies with the host's
//! runtime, which is exactly what a daemon crash is, while the disks (held
//! by the driver) survive and resolve their unflushed writes.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ditto_engine::{
    BoxFuture, EngineError, Event as EngineEvent, EventSink, FileReplica, IoFile, JobProgress,
    KnownMembership, Member, MemberStatus, MembershipLog, MembershipLogRef, MissingReplica,
    ReplicaBackend, ReplicaState, Volume, VolumeOptions,
};
use ditto_format::Layout;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::disk::{CrashMode, FaultRule, SimDisk};
use crate::model::{decode, fill, Model, Value, BLOCK};
use crate::rng::SimRng;

/// Sizes and timeouts of one simulated volume.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub volume_size: u64,
    pub region_size: u32,
    pub io_timeout: Duration,
    /// Simulated time per step (the driver looks at the world between steps).
    pub tick: Duration,
    /// A settle that does not reach idle within this is a liveness violation.
    pub settle_limit: Duration,
    /// Which checks raise violations.
    pub checks: Checks,
    /// Record a readable log of events and outcomes (for a failing seed).
    pub verbose: bool,
    /// Let the workload's starts pick throttled resync rates (the default).
    pub throttle: bool,
    /// Let the workload's starts pick a `dirty_clear_delay` of 0..2 s and
    /// sometimes a small hot set (the default); without it every start uses
    /// a zero delay and the default hot set.
    pub vary_dirty: bool,
    /// Play the node's membership record (its redb store, durable once
    /// `record` returns, surviving crashes) and pass it to every open (the
    /// default). Off only to show issue 9 item 7 on an engine without it.
    pub membership_log: bool,
    /// The checker's rule before: a read that returned a write still in
    /// flight settles it (reads overlapping it may not go back). Too strict
    /// for a mirror; kept to tell such reports apart.
    pub strict_reads: bool,
    /// Majority quorum with each replica on its own node (failure domain):
    /// every start is a takeover at a new epoch by a node without the
    /// membership record (so `membership_log` is off), refused by the node
    /// when the disks present are no majority; I/O without quorum fails.
    /// Acknowledged writes must survive any majority taking over.
    pub quorum: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            volume_size: 8 << 20,
            region_size: 64 << 10,
            io_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(1),
            settle_limit: Duration::from_secs(600),
            checks: Checks::default(),
            verbose: false,
            throttle: true,
            vary_dirty: true,
            membership_log: true,
            strict_reads: false,
            quorum: false,
        }
    }
}

/// The invariants the checker holds (see the crate docs for the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// (1) A durable (or, without a crash, any) acknowledged write reads back.
    LostWrite,
    /// (2) A read returns what some write could legitimately have left.
    BadRead,
    /// A block holds bytes no write produced (torn, misplaced, corrupt).
    Garbage,
    /// (3) In-sync replicas of an idle, fully redundant volume are identical.
    Diverged,
    /// (4) An in-sync replica holds only legitimate data.
    StaleInSync,
    /// (5) No EIO while an in-sync replica holds the data and had no fault.
    NeedlessEio,
    /// (5) The last in-sync replica is never failed out (md never fails its last leg).
    LastLeg,
    /// Requests and jobs finish.
    Liveness,
    /// The engine panicked.
    Panic,
}

impl Check {
    pub const ALL: [Check; 9] = [
        Check::LostWrite,
        Check::BadRead,
        Check::Garbage,
        Check::Diverged,
        Check::StaleInSync,
        Check::NeedlessEio,
        Check::LastLeg,
        Check::Liveness,
        Check::Panic,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::LostWrite => "lost-write",
            Check::BadRead => "bad-read",
            Check::Garbage => "garbage",
            Check::Diverged => "diverged",
            Check::StaleInSync => "stale-in-sync",
            Check::NeedlessEio => "needless-eio",
            Check::LastLeg => "last-leg",
            Check::Liveness => "liveness",
            Check::Panic => "panic",
        }
    }

    pub fn from_name(s: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Which checks are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks(u16);

impl Default for Checks {
    fn default() -> Self {
        Checks(u16::MAX)
    }
}

impl Checks {
    pub fn on(self, c: Check) -> bool {
        self.0 & (1 << c as u16) != 0
    }
    pub fn without(self, c: Check) -> Checks {
        Checks(self.0 & !(1 << c as u16))
    }
}

/// An invariant broken, where and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: Check,
    /// Index of the trace event being run (or last run) when it was found.
    pub event: usize,
    pub at: Duration,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at event {} (t={:.3}s): {}",
            self.check.name(),
            self.event,
            self.at.as_secs_f64(),
            self.message
        )
    }
}

/// Resync pacing of a start (the engine reads its rates at open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    Unlimited,
    Fast,
    Slow,
}

impl Rate {
    fn bytes_per_sec(self) -> u64 {
        match self {
            Rate::Unlimited => u64::MAX,
            Rate::Fast => 256 << 20,
            Rate::Slow => 16 << 20,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Rate::Unlimited => "unlimited",
            Rate::Fast => "fast",
            Rate::Slow => "slow",
        }
    }
}

/// One thing that happens to the world: client I/O, an operator command, a fault.
/// Block numbers are 4 KiB client blocks; slots name replicas in creation order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    Read {
        block: u32,
        n: u16,
    },
    Write {
        block: u32,
        n: u16,
        fua: bool,
    },
    Flush,
    /// NBD TRIM: deallocate (reads back as zeroes in ditto).
    Trim {
        block: u32,
        n: u16,
    },
    /// NBD WRITE_ZEROES; `punch` (no NO_HOLE flag) lets replicas deallocate.
    Zeroes {
        block: u32,
        n: u16,
        punch: bool,
        fua: bool,
    },
    /// Wait until nothing is in flight and no job runs, then compare replicas.
    Settle,
    /// Read every block back through the volume.
    Verify,
    Crash {
        mode: CrashMode,
    },
    /// Start the node's volume with the `absent` slots' disks unplugged,
    /// resync rate `rate`, `dirty_clear_delay` of `clear_ms` and a hot set
    /// of `hot` regions (0: the engine's default). `force` is the
    /// operator's `--force-stale`: the node starts without it, and only if
    /// that is refused as stale-only, starts again accepting the loss.
    Start {
        absent: u32,
        rate: Rate,
        clear_ms: u32,
        hot: u16,
        force: bool,
    },
    /// `ditto volume resolve --keep SLOT` on the stopped volume: start from
    /// `keep` alone (accepting it whatever its age), then rebuild every
    /// other replica from it in full. Engine options are the last start's.
    Resolve {
        keep: u8,
    },
    Stop,
    Fail {
        slot: u8,
    },
    Readd {
        slot: u8,
    },
    /// A new replica on a fresh disk.
    Add,
    Remove {
        slot: u8,
    },
    Scrub {
        repair: bool,
        source: Option<u8>,
    },
    Fault {
        slot: u8,
        rule: FaultRule,
    },
    Stall {
        slot: u8,
        ms: u32,
    },
    Gone {
        slot: u8,
    },
    Back {
        slot: u8,
    },
    Blank {
        slot: u8,
    },
    NoPunch {
        slot: u8,
    },
    Heal {
        slot: u8,
    },
    /// Advance simulated time.
    Sleep {
        ms: u32,
    },
}

impl Event {
    /// A plain start with the `absent` slots' disks unplugged.
    pub fn start(absent: u32) -> Event {
        Event::Start {
            absent,
            rate: Rate::Unlimited,
            clear_ms: 0,
            hot: 0,
            force: false,
        }
    }
}

/// An event in a trace: run `after` steps after the previous one; the node
/// starts serving it `jitter_us` after it arrives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Step {
    pub after: u32,
    pub jitter_us: u32,
    pub event: Event,
}

/// Where the node's volume stands, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Down,
    Starting,
    Running,
    Stopping,
}

/// A replica slot: one disk and whether the node's record lists it.
pub struct Slot {
    pub uuid: Uuid,
    pub label: String,
    pub disk: Arc<SimDisk>,
    pub in_record: bool,
    /// Disk incarnation when the node last opened it: if the disk was
    /// replaced since, the engine's handle is dead and its replica holds nothing.
    pub opened: u64,
}

impl Slot {
    /// Can the engine's handle on this replica still reach its disk?
    pub fn reachable(&self) -> bool {
        self.disk.incarnation() == self.opened && !self.disk.is_gone()
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Client requests completed (successfully or not).
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub io_errors: u64,
    pub crashes: u64,
    pub starts: u64,
    pub start_refusals: u64,
    /// Of the refusals: `StaleOnly` (no present replica vouched for by the node's record).
    pub stale_refusals: u64,
    /// Of the refusals: split brain.
    pub split_brain_refusals: u64,
    /// Forced starts (`accept_stale`) and resolves that took effect.
    pub forced: u64,
    pub settles: u64,
    pub replica_checks: u64,
    pub late_landed: u64,
    pub sim_nanos: u128,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.ops += o.ops;
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.io_errors += o.io_errors;
        self.crashes += o.crashes;
        self.starts += o.starts;
        self.start_refusals += o.start_refusals;
        self.stale_refusals += o.stale_refusals;
        self.split_brain_refusals += o.split_brain_refusals;
        self.forced += o.forced;
        self.settles += o.settles;
        self.replica_checks += o.replica_checks;
        self.late_landed += o.late_landed;
        self.sim_nanos += o.sim_nanos;
    }
}

/// FNV-1a: a stable hash of what happened, for the replay test.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[derive(Clone)]
struct MemberSpec {
    id: Uuid,
    label: String,
    disk: Option<Arc<SimDisk>>,
}

enum Req {
    Format {
        id: Uuid,
        disk: Arc<SimDisk>,
    },
    Start {
        members: Vec<MemberSpec>,
        options: VolumeOptions,
        /// Start again with `accept_stale` if refused as stale-only.
        force: bool,
    },
    Resolve {
        keep: Uuid,
        members: Vec<MemberSpec>,
        options: VolumeOptions,
    },
    Stop,
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Zeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Fail {
        id: Uuid,
    },
    Readd {
        id: Uuid,
        disk: Arc<SimDisk>,
    },
    Add {
        id: Uuid,
        label: String,
        disk: Arc<SimDisk>,
    },
    Remove {
        id: Uuid,
    },
    Scrub {
        repair: bool,
        source: Option<Uuid>,
    },
}

enum Reply {
    Done(String),
    Data(Bytes),
    Err(String),
    /// A start refused: why, and the message.
    Refused(Refusal, String),
}

/// Why a start was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `EngineError::StaleOnly`: no replica present is vouched for by the node's record.
    StaleOnly,
    /// `EngineError::SplitBrain`: two replicas present each went on without the other.
    SplitBrain,
    /// The node's own: the stopped instance still has operations in flight.
    Draining,
    /// Anything else (no current replica, none can be opened, ...).
    Other,
}

/// The node's membership record (`MembershipLog`), as its redb store keeps
/// it: outside the node's runtime, so it survives crashes; a record is
/// durable once `record` returns (after a short simulated commit; a crash
/// during it loses it).
pub struct SimLog {
    last: Mutex<Option<KnownMembership>>,
    rng: Mutex<SimRng>,
}

impl SimLog {
    pub fn new(seed: u64) -> Self {
        SimLog {
            last: Mutex::new(None),
            rng: Mutex::new(SimRng::stream(seed, "membership-log")),
        }
    }

    pub fn get(&self) -> Option<KnownMembership> {
        lock(&self.last).clone()
    }
}

impl MembershipLog for SimLog {
    fn last(&self, _volume: Uuid) -> Option<KnownMembership> {
        self.get()
    }

    fn record(
        &self,
        _volume: Uuid,
        membership: KnownMembership,
    ) -> BoxFuture<'_, Result<(), String>> {
        let commit = Duration::from_micros(lock(&self.rng).range(20, 300));
        Box::pin(async move {
            tokio::time::sleep(commit).await;
            *lock(&self.last) = Some(membership);
            Ok(())
        })
    }
}

/// What the driver and the node share. Lives outside the node's runtime, so it survives crashes.
struct Link {
    requests: Mutex<VecDeque<(u64, Duration, Req)>>,
    notify: Notify,
    completions: Mutex<Vec<(u64, Reply)>>,
    volume: Mutex<Option<Arc<Volume>>>,
    /// The stopped instance, while operations it gave up at a timeout are
    /// still in flight: the node refuses to start a new one on the same
    /// disks until they end (`Node::still_draining`).
    draining: Mutex<Option<Arc<Volume>>>,
    /// Replicas the node has recorded as members since the driver last
    /// looked: `replica add` records the new replica once it is formatted,
    /// before the engine adds it (`Node::add_replica`).
    recorded: Mutex<Vec<Uuid>>,
    events: Mutex<Vec<String>>,
    record_events: bool,
    spec: VolumeSpec,
    log: Option<Arc<SimLog>>,
}

#[derive(Clone)]
struct VolumeSpec {
    name: String,
    uuid: Uuid,
    size: u64,
    layout: Layout,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Link {
    fn volume(&self) -> Option<Arc<Volume>> {
        lock(&self.volume).clone()
    }
}

struct Sink(Arc<Link>);

impl EventSink for Sink {
    fn emit(&self, e: EngineEvent) {
        if self.0.record_events {
            let replica = e.replica.map(|r| format!(" {r}")).unwrap_or_default();
            lock(&self.0.events).push(format!("{}{replica}: {}", e.kind.as_str(), e.message));
        }
    }
}

/// The node's software: takes requests and runs each as its own task.
async fn node_main(link: Arc<Link>) -> turmoil::Result {
    loop {
        let batch: Vec<_> = lock(&link.requests).drain(..).collect();
        if batch.is_empty() {
            link.notify.notified().await;
            continue;
        }
        for (id, delay, req) in batch {
            let link = link.clone();
            tokio::task::spawn_local(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let reply = serve(&link, req).await;
                lock(&link.completions).push((id, reply));
            });
        }
    }
}

fn done() -> Reply {
    Reply::Done(String::new())
}

fn status<E: fmt::Display>(r: Result<(), E>) -> Reply {
    match r {
        Ok(()) => done(),
        Err(e) => Reply::Err(e.to_string()),
    }
}

fn refused(e: EngineError) -> Reply {
    let kind = match e {
        EngineError::StaleOnly { .. } => Refusal::StaleOnly,
        EngineError::SplitBrain { .. } => Refusal::SplitBrain,
        _ => Refusal::Other,
    };
    Reply::Refused(kind, e.to_string())
}

/// Open the replicas (a disk absent or unreadable is a `MissingReplica`)
/// and the volume on them, with the node's membership log.
async fn open_volume(
    link: &Arc<Link>,
    members: &[MemberSpec],
    options: VolumeOptions,
    accept_stale: bool,
) -> Result<Arc<Volume>, EngineError> {
    let spec = &link.spec;
    let mut list = Vec::new();
    for m in members {
        let backend: Arc<dyn ReplicaBackend> = match &m.disk {
            Some(disk) => {
                let name = disk.name().to_string();
                match FileReplica::open_on(disk.open() as Arc<dyn IoFile>, name.clone(), spec.uuid)
                    .await
                {
                    Ok(b) => b,
                    Err(e) => Arc::new(MissingReplica::new(
                        name,
                        e.to_string(),
                        spec.uuid,
                        m.id,
                        spec.layout,
                    )),
                }
            }
            None => Arc::new(MissingReplica::new(
                m.label.clone(),
                "disk not present at start",
                spec.uuid,
                m.id,
                spec.layout,
            )),
        };
        // Each replica its own node; the domain matters only with quorum.
        list.push(Member::new(m.id, m.label.clone(), backend).in_domain(m.label.clone()));
    }
    let options = VolumeOptions {
        membership_log: link
            .log
            .clone()
            .map(|l| MembershipLogRef(l as Arc<dyn MembershipLog>)),
        accept_stale,
        ..options
    };
    let sink = Arc::new(Sink(link.clone()));
    Volume::open(spec.name.clone(), spec.uuid, spec.size, list, options, sink).await
}

async fn serve(link: &Arc<Link>, req: Req) -> Reply {
    let spec = &link.spec;
    let running = link.volume();
    let vol = match (&req, running) {
        (Req::Format { id, disk }, _) => {
            let file = disk.open() as Arc<dyn IoFile>;
            let r =
                FileReplica::format_on(file, disk.name().to_string(), spec.uuid, *id, spec.layout)
                    .await;
            return status(r.map(|_| ()));
        }
        (Req::Start { .. } | Req::Resolve { .. }, Some(_)) => {
            return Reply::Err("already running".into())
        }
        (Req::Start { .. } | Req::Resolve { .. }, None) => {
            let pending = {
                let mut d = lock(&link.draining);
                let pending = d.as_ref().map_or(0, |v| v.abandoned_ops());
                if pending == 0 {
                    *d = None;
                }
                pending
            };
            if pending > 0 {
                return Reply::Refused(
                    Refusal::Draining,
                    format!("the previous instance still has {pending} disk operation(s) given up at a timeout in flight; starting now could let them land over new writes"),
                );
            }
            None
        }
        (_, None) => return Reply::Err("volume not running".into()),
        (_, Some(v)) => Some(v),
    };
    match (req, vol) {
        (
            Req::Start {
                members,
                options,
                force,
            },
            _,
        ) => {
            // The node does not start a volume on a minority of its nodes.
            let present = members.iter().filter(|m| m.disk.is_some()).count();
            if options.quorum.is_some() && present < members.len() / 2 + 1 {
                return Reply::Err(format!(
                    "no quorum: {present} of {} replicas present",
                    members.len()
                ));
            }
            let mut r = open_volume(link, &members, options.clone(), false).await;
            let mut forced = false;
            if force && matches!(r, Err(EngineError::StaleOnly { .. })) {
                // The operator read the refusal and forces it: `--force-stale`.
                r = open_volume(link, &members, options, true).await;
                forced = true;
            }
            match r {
                Ok(v) => {
                    *lock(&link.volume) = Some(v);
                    Reply::Done(if forced {
                        "forced".into()
                    } else {
                        String::new()
                    })
                }
                Err(e) => refused(e),
            }
        }
        (
            Req::Resolve {
                keep,
                members,
                options,
            },
            _,
        ) => {
            // Like `Node::resolve`: the kept replica alone, the others
            // discarded (placeholders), then each rebuilt from it in full.
            let alone: Vec<MemberSpec> = members
                .iter()
                .map(|m| MemberSpec {
                    disk: if m.id == keep { m.disk.clone() } else { None },
                    ..m.clone()
                })
                .collect();
            let v = match open_volume(link, &alone, options, true).await {
                Ok(v) => v,
                Err(e) => return refused(e),
            };
            *lock(&link.volume) = Some(v.clone());
            let mut notes = Vec::new();
            for m in members.iter().filter(|m| m.id != keep) {
                let Some(disk) = &m.disk else { continue };
                let name = disk.name().to_string();
                let r = match FileReplica::open_on(disk.open() as Arc<dyn IoFile>, name, spec.uuid)
                    .await
                {
                    Ok(b) => v
                        .readd(m.id, b, true)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = r {
                    notes.push(format!("{}: {e}", m.label));
                }
            }
            Reply::Done(format!(
                "resolved{}",
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                }
            ))
        }
        (_, None) => Reply::Err("volume not running".into()),
        (Req::Stop, Some(v)) => {
            let r = v.close().await;
            if v.abandoned_ops() > 0 {
                *lock(&link.draining) = Some(v.clone());
            }
            let mut g = lock(&link.volume);
            if g.as_ref().is_some_and(|x| Arc::ptr_eq(x, &v)) {
                *g = None;
            }
            status(r)
        }
        (Req::Read { offset, len }, Some(v)) => match v.read(offset, len).await {
            Ok(d) => Reply::Data(d),
            Err(e) => Reply::Err(e.to_string()),
        },
        (Req::Write { offset, data, fua }, Some(v)) => status(v.write(offset, data, fua).await),
        (Req::Flush, Some(v)) => status(v.flush().await),
        (
            Req::Zeroes {
                offset,
                len,
                punch,
                fua,
            },
            Some(v),
        ) => status(v.write_zeroes(offset, len, punch, fua).await),
        (Req::Trim { offset, len }, Some(v)) => status(v.discard(offset, len, false).await),
        (Req::Fail { id }, Some(v)) => status(v.fail_replica(id, "failed by the operator").await),
        (Req::Readd { id, disk }, Some(v)) => {
            let name = disk.name().to_string();
            match FileReplica::open_on(disk.open() as Arc<dyn IoFile>, name, spec.uuid).await {
                Ok(b) => match v.readd(id, b, false).await {
                    Ok(plan) => Reply::Done(format!("{plan:?}")),
                    Err(e) => Reply::Err(e.to_string()),
                },
                Err(e) => Reply::Err(e.to_string()),
            }
        }
        (Req::Add { id, label, disk }, Some(v)) => {
            let name = disk.name().to_string();
            match FileReplica::format_on(
                disk.open() as Arc<dyn IoFile>,
                name,
                spec.uuid,
                id,
                spec.layout,
            )
            .await
            {
                Ok(b) => {
                    lock(&link.recorded).push(id);
                    status(
                        v.add_replica(Member::new(id, label.clone(), b).in_domain(label))
                            .await,
                    )
                }
                Err(e) => Reply::Err(e.to_string()),
            }
        }
        (Req::Remove { id }, Some(v)) => status(v.remove_replica(id).await.map(|_| ())),
        (Req::Scrub { repair, source }, Some(v)) => status(v.scrub(repair, source).await),
        (Req::Format { .. }, _) => Reply::Err("unreachable".into()),
    }
}

/// What each present slot's disk holds, per block (or why it is garbage).
type Snapshot = Vec<(usize, Vec<Result<Value, String>>)>;

/// A request the node has not answered yet.
enum Waiting {
    Read {
        first: u64,
        n: u64,
        floors: Vec<u64>,
        /// Slots in sync when the read was issued, with their disks' fault counts.
        in_sync: Vec<(usize, u64)>,
    },
    Modify {
        first: u64,
        n: u64,
        fua: bool,
    },
    Flush {
        cover: u64,
    },
    Start {
        /// Per block, what each present slot's disk held when a start that
        /// may be forced (or a resolve) was issued: a forced start is a
        /// data-loss event, after which the register holds only that.
        snapshot: Option<Snapshot>,
    },
    Stop {
        cover: u64,
    },
    Add {
        slot: usize,
    },
    Remove {
        slot: usize,
    },
    Control,
    Format,
}

struct InFlight {
    issued: Duration,
    what: Waiting,
    event: usize,
}

thread_local! {
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_sim = PANICS.with(|p| {
                p.borrow_mut().push(info.to_string());
                turmoil::in_simulation()
            });
            // Engine panics are reported as violations; the driver's own
            // (a failing test, a bug here) print as usual.
            if !in_sim {
                previous(info);
            }
        }));
    });
}

/// Panics caught on this thread since last asked.
pub(crate) fn take_panics() -> Vec<String> {
    PANICS.with(|p| p.borrow_mut().drain(..).collect())
}

/// The simulated world of one seed.
pub struct World {
    sim: turmoil::Sim<'static>,
    link: Arc<Link>,
    pub cfg: SimConfig,
    seed: u64,
    pub slots: Vec<Slot>,
    pub model: Model,
    busy: Vec<u16>,
    inflight: BTreeMap<u64, InFlight>,
    deferred: VecDeque<(Step, usize)>,
    next_id: u64,
    pub node: NodeState,
    crash_rng: SimRng,
    event_index: usize,
    hash: Fnv,
    pub stats: Stats,
    violation: Option<Violation>,
    /// Readable log of what happened (with `cfg.verbose`).
    pub log: Vec<String>,
    /// Why the last start was refused, until a start succeeds.
    pub refused: Option<(Refusal, String)>,
    /// The node's membership record (with `cfg.membership_log`).
    pub membership_log: Option<Arc<SimLog>>,
    /// Slots cut off by a forced start (or a resolve): they went on without
    /// the replicas the volume now runs on, so they must never be counted in
    /// sync again except by a rebuild (a start with them is a split brain).
    pub other_side: Vec<usize>,
    /// Engine options of the last start (a resolve reuses them).
    last_start: (Rate, u32, u16),

    last_members: Vec<MemberStatus>,
    /// Slots in sync when last seen running.
    pub known_current: Vec<usize>,
    steps: u64,
    /// Replies of recent requests, for scripted scenarios.
    replies: BTreeMap<u64, Result<String, String>>,
    last_request: u64,
    disk_log: Arc<Mutex<Vec<String>>>,
}

const NODE: &str = "node";

impl World {
    /// A volume on `replicas` freshly formatted disks, not started yet.
    pub fn new(seed: u64, cfg: SimConfig, replicas: usize) -> Result<World, Violation> {
        install_panic_hook();
        PANICS.with(|p| p.borrow_mut().clear());
        let layout = Layout::new(cfg.volume_size, cfg.region_size).map_err(|e| Violation {
            check: Check::Liveness,
            event: 0,
            at: Duration::ZERO,
            message: format!("bad layout: {e}"),
        })?;
        let spec = VolumeSpec {
            name: "simvol".into(),
            uuid: Uuid::from_u64_pair(seed, 0x5eed),
            size: cfg.volume_size,
            layout,
        };
        let link = Arc::new(Link {
            requests: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            completions: Mutex::new(Vec::new()),
            volume: Mutex::new(None),
            draining: Mutex::new(None),
            recorded: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            record_events: cfg.verbose,
            spec,
            log: (cfg.membership_log && !cfg.quorum).then(|| Arc::new(SimLog::new(seed))),
        });
        let mut sim = turmoil::Builder::new()
            .tick_duration(cfg.tick)
            .simulation_duration(Duration::from_secs(1 << 40))
            .rng_seed(seed)
            .build();
        let node_link = link.clone();
        sim.host(NODE, move || node_main(node_link.clone()));
        let membership_log = link.log.clone();
        let blocks = cfg.volume_size / BLOCK;
        let mut w = World {
            sim,
            link,
            cfg,
            seed,
            slots: Vec::new(),
            model: Model::new(blocks),
            busy: vec![0; blocks as usize],
            inflight: BTreeMap::new(),
            deferred: VecDeque::new(),
            next_id: 1,
            node: NodeState::Down,
            crash_rng: SimRng::stream(seed, "crash"),
            event_index: 0,
            hash: Fnv::default(),
            stats: Stats::default(),
            violation: None,
            log: Vec::new(),
            refused: None,
            last_members: Vec::new(),
            known_current: Vec::new(),
            membership_log: None,
            other_side: Vec::new(),
            last_start: (Rate::Unlimited, 0, 0),
            steps: 0,
            replies: BTreeMap::new(),
            last_request: 0,
            disk_log: Arc::new(Mutex::new(Vec::new())),
        };
        w.membership_log = membership_log;
        w.model.strict_reads = w.cfg.strict_reads;
        for _ in 0..replicas {
            let slot = w.new_slot();
            let disk = w.slots[slot].disk.clone();
            let id = w.slots[slot].uuid;
            w.slots[slot].in_record = true;
            w.send(Req::Format { id, disk }, Waiting::Format, Duration::ZERO);
        }
        w.settle_quietly()?;
        Ok(w)
    }

    fn new_slot(&mut self) -> usize {
        let i = self.slots.len();
        let layout = self.link.spec.layout;
        let disk = SimDisk::new(format!("disk{i}"), layout.replica_len(), self.seed);
        if self.cfg.verbose {
            disk.set_trace(self.disk_log.clone(), layout.data_offset);
        }
        self.slots.push(Slot {
            uuid: Uuid::from_u64_pair(self.seed, 1 + i as u64),
            label: format!("pool{i}"),
            disk,
            in_record: false,
            opened: 0,
        });
        i
    }

    pub fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    pub fn layout(&self) -> Layout {
        self.link.spec.layout
    }

    pub fn blocks(&self) -> u64 {
        self.model.blocks()
    }

    /// The running volume (for status queries only: never drive it from outside the node).
    pub fn volume(&self) -> Option<Arc<Volume>> {
        self.link.volume()
    }

    /// Member status as of the last step.
    pub fn members(&self) -> &[MemberStatus] {
        &self.last_members
    }

    pub fn slot_of(&self, id: Uuid) -> Option<usize> {
        self.slots.iter().position(|s| s.uuid == id)
    }

    /// State of `slot`'s replica in the running volume.
    pub fn state_of(&self, slot: usize) -> Option<ReplicaState> {
        let id = self.slots.get(slot)?.uuid;
        self.last_members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.state)
    }

    pub fn in_sync_slots(&self) -> Vec<usize> {
        self.last_members
            .iter()
            .filter(|m| m.state == ReplicaState::InSync)
            .filter_map(|m| self.slot_of(m.id))
            .collect()
    }

    pub fn job(&self) -> Option<JobProgress> {
        self.volume().and_then(|v| v.job())
    }

    pub fn io_in_flight(&self) -> usize {
        self.inflight
            .values()
            .filter(|f| {
                matches!(
                    f.what,
                    Waiting::Read { .. } | Waiting::Modify { .. } | Waiting::Flush { .. }
                )
            })
            .count()
            + self.deferred.len()
    }

    pub fn requests_in_flight(&self) -> usize {
        self.inflight.len() + self.deferred.len()
    }

    /// Is any block of `[first, first+n)` being modified by a request in flight?
    pub fn busy(&self, first: u64, n: u64) -> bool {
        (first..first + n).any(|b| self.busy[b as usize] > 0)
    }

    pub fn trace_hash(&self) -> u64 {
        self.hash.finish()
    }

    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    pub fn events_run(&self) -> usize {
        self.event_index
    }

    fn note(&mut self, text: impl FnOnce() -> String) {
        if self.cfg.verbose {
            let t = self.now().as_secs_f64();
            self.log.push(format!("{t:10.4}  {}", text()));
        }
    }

    fn fail(&mut self, check: Check, message: String) {
        if self.violation.is_none() && self.cfg.checks.on(check) {
            let v = Violation {
                check,
                event: self.event_index.saturating_sub(1),
                at: self.now(),
                message,
            };
            self.note(|| format!("VIOLATION {v}"));
            self.violation = Some(v);
        }
    }

    fn result(&self) -> Result<(), Violation> {
        match &self.violation {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    fn send(&mut self, req: Req, what: Waiting, jitter: Duration) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.last_request = id;
        self.inflight.insert(
            id,
            InFlight {
                issued: self.now(),
                what,
                event: self.event_index.saturating_sub(1),
            },
        );
        lock(&self.link.requests).push_back((id, jitter, req));
        self.link.notify.notify_one();
        id
    }

    /// Run one event of a trace (after its `after` steps have run).
    pub fn apply(&mut self, step: &Step) -> Result<(), Violation> {
        self.event_index += 1;
        self.stats.events += 1;
        step.hash(&mut self.hash);
        let index = self.event_index - 1;
        self.note(|| format!("#{index} {}", crate::trace::format_step(step)));
        self.run_event(step, index);
        self.result()
    }

    fn slot_ok(&self, slot: u8) -> Option<usize> {
        let s = usize::from(slot);
        (s < self.slots.len()).then_some(s)
    }

    fn io_allowed(&self) -> bool {
        matches!(self.node, NodeState::Running | NodeState::Stopping)
    }

    fn run_event(&mut self, step: &Step, index: usize) {
        let jitter = Duration::from_micros(u64::from(step.jitter_us));
        let blocks = self.blocks();
        let clamp = |block: u32, n: u16| {
            let first = u64::from(block).min(blocks - 1);
            let n = u64::from(n).clamp(1, blocks - first);
            (first, n)
        };
        match &step.event {
            Event::Read { block, n } => {
                if !self.io_allowed() {
                    return;
                }
                let (first, n) = clamp(*block, *n);
                let floors = self.model.floors(first, n);
                let in_sync = self
                    .in_sync_slots()
                    .into_iter()
                    .map(|s| (s, self.slots[s].disk.stats().faults))
                    .collect();
                self.send(
                    Req::Read {
                        offset: first * BLOCK,
                        len: (n * BLOCK) as usize,
                    },
                    Waiting::Read {
                        first,
                        n,
                        floors,
                        in_sync,
                    },
                    jitter,
                );
            }
            Event::Write { block, n, .. }
            | Event::Trim { block, n }
            | Event::Zeroes { block, n, .. } => {
                if !self.io_allowed() {
                    return;
                }
                let (first, n) = clamp(*block, *n);
                if self.busy(first, n) {
                    // Never two modifying requests over one block at once (no
                    // file system does that): wait for the one in flight.
                    self.deferred.push_back((step.clone(), index));
                    return;
                }
                self.issue_modify(&step.event, first, n, jitter);
            }
            Event::Flush => {
                if !self.io_allowed() {
                    return;
                }
                let cover = self.model.flush_cover();
                self.send(Req::Flush, Waiting::Flush { cover }, jitter);
            }
            Event::Settle => {
                let _ = self.settle();
            }
            Event::Verify => {
                if self.node != NodeState::Running {
                    return;
                }
                let mut b = 0;
                while b < blocks {
                    let n = 16.min(blocks - b);
                    let e = Step {
                        after: 0,
                        jitter_us: 0,
                        event: Event::Read {
                            block: b as u32,
                            n: n as u16,
                        },
                    };
                    self.run_event(&e, index);
                    b += n;
                }
            }
            Event::Crash { mode } => self.crash(*mode),
            Event::Start {
                absent,
                rate,
                clear_ms,
                hot,
                force,
            } => {
                if self.node != NodeState::Down {
                    return;
                }
                self.last_start = (*rate, *clear_ms, *hot);
                self.note_log();
                let members = self.member_specs(|i, s| absent & (1 << i) == 0 && !s.disk.is_gone());
                let options = self.options(*rate, *clear_ms, *hot);
                let snapshot = force.then(|| self.snapshot(&members));
                self.node = NodeState::Starting;
                self.send(
                    Req::Start {
                        members,
                        options,
                        force: *force,
                    },
                    Waiting::Start { snapshot },
                    jitter,
                );
            }
            Event::Resolve { keep } => {
                let Some(k) = self.slot_ok(*keep) else { return };
                if self.node != NodeState::Down || !self.slots[k].in_record {
                    return;
                }
                self.note_log();
                let members = self.member_specs(|_, s| !s.disk.is_gone());
                let (rate, clear_ms, hot) = self.last_start;
                let options = self.options(rate, clear_ms, hot);
                let keep = self.slots[k].uuid;
                let snapshot: Vec<_> = self
                    .snapshot(&members)
                    .into_iter()
                    .filter(|(s, _)| *s == k)
                    .collect();
                self.node = NodeState::Starting;
                self.send(
                    Req::Resolve {
                        keep,
                        members,
                        options,
                    },
                    Waiting::Start {
                        snapshot: Some(snapshot),
                    },
                    jitter,
                );
            }
            Event::Stop => {
                if self.node != NodeState::Running {
                    return;
                }
                self.node = NodeState::Stopping;
                let cover = self.model.flush_cover();
                self.send(Req::Stop, Waiting::Stop { cover }, jitter);
            }
            Event::Fail { slot } => {
                if let (Some(s), true) = (self.slot_ok(*slot), self.node == NodeState::Running) {
                    let id = self.slots[s].uuid;
                    self.send(Req::Fail { id }, Waiting::Control, jitter);
                }
            }
            Event::Readd { slot } => {
                if let (Some(s), true) = (self.slot_ok(*slot), self.node == NodeState::Running) {
                    let (id, disk) = (self.slots[s].uuid, self.slots[s].disk.clone());
                    self.slots[s].opened = disk.incarnation();
                    self.send(Req::Readd { id, disk }, Waiting::Control, jitter);
                }
            }
            Event::Add => {
                if self.node != NodeState::Running {
                    return;
                }
                // Recorded by the node once formatted (see `Link::recorded`).
                let s = self.new_slot();
                let (id, label, disk) = (
                    self.slots[s].uuid,
                    self.slots[s].label.clone(),
                    self.slots[s].disk.clone(),
                );
                self.send(
                    Req::Add { id, label, disk },
                    Waiting::Add { slot: s },
                    jitter,
                );
            }
            Event::Remove { slot } => {
                if let (Some(s), true) = (self.slot_ok(*slot), self.node == NodeState::Running) {
                    if self.slots[s].in_record {
                        let id = self.slots[s].uuid;
                        self.send(Req::Remove { id }, Waiting::Remove { slot: s }, jitter);
                    }
                }
            }
            Event::Scrub { repair, source } => {
                if self.node != NodeState::Running {
                    return;
                }
                let source = source
                    .and_then(|s| self.slot_ok(s))
                    .map(|s| self.slots[s].uuid);
                self.send(
                    Req::Scrub {
                        repair: *repair,
                        source,
                    },
                    Waiting::Control,
                    jitter,
                );
            }
            Event::Fault { slot, rule } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.add_fault(rule.clone());
                }
            }
            Event::Stall { slot, ms } => {
                if let Some(s) = self.slot_ok(*slot) {
                    let until = self.now() + Duration::from_millis(u64::from(*ms));
                    self.slots[s].disk.stall_until(until);
                }
            }
            Event::Gone { slot } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.set_gone(true);
                }
            }
            Event::Back { slot } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.set_gone(false);
                }
            }
            Event::Blank { slot } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.replace_blank();
                }
            }
            Event::NoPunch { slot } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.set_punch_supported(false);
                }
            }
            Event::Heal { slot } => {
                if let Some(s) = self.slot_ok(*slot) {
                    self.slots[s].disk.clear_faults();
                }
            }
            Event::Sleep { ms } => {
                let until = self.now() + Duration::from_millis(u64::from(*ms));
                while self.now() < until && self.violation.is_none() {
                    self.step_once();
                }
            }
        }
    }

    fn note_log(&mut self) {
        if self.cfg.verbose {
            let record = self.membership_log.as_ref().and_then(|l| l.get());
            let text = match record {
                None => "none".to_string(),
                Some(k) => {
                    let slots: Vec<String> = k
                        .in_sync
                        .iter()
                        .map(|id| self.slot_of(*id).map_or("?".into(), |s| format!("disk{s}")))
                        .collect();
                    format!("generation {} in sync [{}]", k.generation, slots.join(", "))
                }
            };
            self.note(|| format!("  node's membership record: {text}"));
        }
    }

    /// The recorded members, each with its disk if `present` says so;
    /// marks the disks opened now.
    fn member_specs(&mut self, present: impl Fn(usize, &Slot) -> bool) -> Vec<MemberSpec> {
        for s in self.slots.iter_mut() {
            s.opened = s.disk.incarnation();
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.in_record)
            .map(|(i, s)| MemberSpec {
                id: s.uuid,
                label: s.label.clone(),
                disk: present(i, s).then(|| s.disk.clone()),
            })
            .collect()
    }

    fn options(&self, rate: Rate, clear_ms: u32, hot: u16) -> VolumeOptions {
        let r = rate.bytes_per_sec();
        let defaults = VolumeOptions::default();
        VolumeOptions {
            quorum: self.cfg.quorum.then_some(ditto_engine::NoQuorum::Error),
            // Every start a new primary (a takeover) with quorum.
            epoch: if self.cfg.quorum {
                self.stats.starts + 1
            } else {
                0
            },
            io_timeout: self.cfg.io_timeout,
            resync_min_rate: r,
            resync_max_rate: r,
            dirty_clear_delay: Duration::from_millis(u64::from(clear_ms)),
            hot_set_regions: if hot == 0 {
                defaults.hot_set_regions
            } else {
                u64::from(hot)
            },
            ..defaults
        }
    }

    /// What each present member's disk holds, per block.
    fn snapshot(&self, members: &[MemberSpec]) -> Snapshot {
        let data_offset = self.layout().data_offset;
        members
            .iter()
            .filter(|m| m.disk.is_some())
            .filter_map(|m| self.slot_of(m.id))
            .map(|s| {
                let disk = &self.slots[s].disk;
                let values = (0..self.blocks())
                    .map(|b| decode(&disk.peek(data_offset + b * BLOCK, BLOCK as usize), b))
                    .collect();
                (s, values)
            })
            .collect()
    }

    /// A forced start or a resolve took effect: the volume now holds what
    /// the replicas it started in sync held, whatever was acknowledged
    /// since they left (the operator accepted that loss). The register is
    /// reset to those contents, and the replicas left out are the other
    /// side of a split brain from now on.
    fn data_loss(&mut self, snapshot: Snapshot) {
        self.stats.forced += 1;
        let in_sync = self.in_sync_slots();
        let kept: Vec<_> = snapshot
            .into_iter()
            .filter(|(s, _)| in_sync.contains(s))
            .collect();
        for b in 0..self.blocks() {
            let mut values = Vec::new();
            for (s, v) in &kept {
                match &v[b as usize] {
                    Ok(v) => {
                        if !values.contains(v) {
                            values.push(*v);
                        }
                    }
                    Err(e) => {
                        let msg = format!(
                            "{} block {b} at a forced start: {e}",
                            self.slots[*s].disk.name()
                        );
                        self.fail(Check::Garbage, msg);
                        return;
                    }
                }
            }
            self.model.reset(b, &values);
        }
        self.other_side = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.in_record
                    && !matches!(
                        self.state_of(*i),
                        Some(ReplicaState::InSync | ReplicaState::Rebuilding)
                    )
            })
            .map(|(i, _)| i)
            .collect();
        let msg = format!(
            "  data-loss event: the volume now holds what slot(s) {:?} held; other side: {:?}",
            kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            self.other_side
        );
        self.note(|| msg);
    }

    fn issue_modify(&mut self, event: &Event, first: u64, n: u64, jitter: Duration) {
        let (offset, len) = (first * BLOCK, n * BLOCK);
        let (req, zero, fua) = match event {
            Event::Write { fua, .. } => {
                let id = self.next_id;
                let mut data = BytesMut::zeroed(len as usize);
                fill(&mut data, id, first);
                (
                    Req::Write {
                        offset,
                        data: data.freeze(),
                        fua: *fua,
                    },
                    false,
                    *fua,
                )
            }
            Event::Trim { .. } => (Req::Trim { offset, len }, true, false),
            Event::Zeroes { punch, fua, .. } => (
                Req::Zeroes {
                    offset,
                    len,
                    punch: *punch,
                    fua: *fua,
                },
                true,
                *fua,
            ),
            _ => return,
        };
        let op = self.next_id;
        self.model.issue(op, first, n, zero);
        for b in first..first + n {
            self.busy[b as usize] += 1;
        }
        self.send(req, Waiting::Modify { first, n, fua }, jitter);
    }

    /// Run `event` now (no wait, no jitter); returns the id of the request
    /// it sent, if it sent one.
    pub fn go(&mut self, event: Event) -> Result<Option<u64>, Violation> {
        let before = self.last_request;
        self.apply(&Step {
            after: 0,
            jitter_us: 0,
            event,
        })?;
        Ok((self.last_request != before).then_some(self.last_request))
    }

    /// Step until request `id` has its reply (or `limit` of simulated time passed).
    pub fn wait(&mut self, id: u64, limit: Duration) -> Result<Result<String, String>, Violation> {
        let until = self.now() + limit;
        while self.inflight.contains_key(&id) {
            if self.now() > until {
                return Ok(Err(format!("request #{id} still in flight")));
            }
            self.step()?;
        }
        Ok(self
            .replies
            .get(&id)
            .cloned()
            .unwrap_or_else(|| Err(format!("request #{id} got no reply (crash?)"))))
    }

    /// Run `event` and wait for its reply (up to a minute of simulated time).
    pub fn run(&mut self, event: Event) -> Result<Result<String, String>, Violation> {
        match self.go(event)? {
            Some(id) => self.wait(id, Duration::from_secs(60)),
            None => Ok(Ok(String::new())),
        }
    }

    /// Step for `ms` of simulated time.
    pub fn sleep(&mut self, ms: u64) -> Result<(), Violation> {
        let until = self.now() + Duration::from_millis(ms);
        while self.now() < until {
            self.step()?;
        }
        Ok(())
    }

    /// Step until `cond` holds (or `limit` of simulated time passed); whether it held.
    pub fn until(
        &mut self,
        limit: Duration,
        mut cond: impl FnMut(&World) -> bool,
    ) -> Result<bool, Violation> {
        let until = self.now() + limit;
        while !cond(self) {
            if self.now() > until {
                return Ok(false);
            }
            self.step()?;
        }
        Ok(true)
    }

    /// Advance one tick and check what came back.
    pub fn step(&mut self) -> Result<(), Violation> {
        self.step_once();
        self.result()
    }

    fn step_once(&mut self) {
        self.steps += 1;
        if let Err(e) = self.sim.step() {
            self.fail(Check::Panic, format!("the node's software failed: {e}"));
        }
        let now = self.now();
        for s in &self.slots {
            s.disk.pump(now);
        }
        let panics: Vec<String> = PANICS.with(|p| p.borrow_mut().drain(..).collect());
        if let Some(p) = panics.into_iter().next() {
            self.fail(Check::Panic, format!("engine panicked: {p}"));
        }
        self.last_members = self.volume().map(|v| v.members()).unwrap_or_default();
        if self.node == NodeState::Running {
            let current: Vec<usize> = self
                .in_sync_slots()
                .into_iter()
                .filter(|s| self.slots[*s].in_record)
                .collect();
            if !current.is_empty() {
                self.known_current = current;
            }
        }
        let recorded: Vec<Uuid> = lock(&self.link.recorded).drain(..).collect();
        for id in recorded {
            if let Some(s) = self.slot_of(id) {
                self.slots[s].in_record = true;
            }
        }
        let done: Vec<(u64, Reply)> = lock(&self.link.completions).drain(..).collect();
        for (id, reply) in done {
            self.complete(id, reply);
        }
        if self.node == NodeState::Running && !self.other_side.is_empty() {
            // Rebuilt (re-added in full) since: on the volume's side now.
            let states: Vec<Option<ReplicaState>> =
                self.other_side.iter().map(|s| self.state_of(*s)).collect();
            let mut i = 0;
            self.other_side.retain(|_| {
                i += 1;
                states[i - 1] != Some(ReplicaState::InSync)
            });
        }
        if !self.deferred.is_empty() {
            self.issue_deferred();
        }
        if self.node == NodeState::Running
            && !self.last_members.is_empty()
            && !self
                .last_members
                .iter()
                .any(|m| m.state == ReplicaState::InSync)
        {
            let states: Vec<String> = self
                .last_members
                .iter()
                .map(|m| {
                    format!(
                        "{} {}: {}",
                        m.location,
                        m.state.as_str(),
                        m.reason.clone().unwrap_or_default()
                    )
                })
                .collect();
            self.fail(
                Check::LastLeg,
                format!("no replica is in sync any more: {}", states.join("; ")),
            );
        }
        if self.steps.is_multiple_of(1024) {
            self.check_stuck();
        }
        if self.cfg.verbose {
            let events: Vec<String> = lock(&self.link.events).drain(..).collect();
            for e in events {
                self.note(|| format!("   engine: {e}"));
            }
            let disk: Vec<String> = lock(&self.disk_log).drain(..).collect();
            self.log.extend(disk);
        }
    }

    fn check_stuck(&mut self) {
        let limit = self.cfg.settle_limit;
        let now = self.now();
        if let Some((id, f)) = self
            .inflight
            .iter()
            .find(|(_, f)| now.saturating_sub(f.issued) > limit)
        {
            let msg = format!(
                "request #{id} (event {}) has not completed after {:.0}s",
                f.event,
                limit.as_secs_f64()
            );
            self.fail(Check::Liveness, msg);
        }
    }

    fn issue_deferred(&mut self) {
        let mut keep = VecDeque::new();
        while let Some((step, index)) = self.deferred.pop_front() {
            let (block, n) = match step.event {
                Event::Write { block, n, .. }
                | Event::Trim { block, n }
                | Event::Zeroes { block, n, .. } => (block, n),
                _ => continue,
            };
            let first = u64::from(block).min(self.blocks() - 1);
            let n = u64::from(n).clamp(1, self.blocks() - first);
            // Later requests over the same blocks keep their order behind it.
            if self.busy(first, n)
                || keep
                    .iter()
                    .any(|(s, _): &(Step, usize)| overlaps(&s.event, first, n))
            {
                keep.push_back((step, index));
            } else if self.io_allowed() {
                let jitter = Duration::from_micros(u64::from(step.jitter_us));
                self.issue_modify(&step.event, first, n, jitter);
            }
        }
        self.deferred = keep;
    }

    fn complete(&mut self, id: u64, reply: Reply) {
        let Some(f) = self.inflight.remove(&id) else {
            return;
        };
        let (reply, refusal) = match reply {
            Reply::Refused(kind, msg) => (Reply::Err(msg), Some(kind)),
            r => (r, None),
        };
        let ok = !matches!(reply, Reply::Err(_));
        self.replies.insert(
            id,
            match &reply {
                Reply::Done(s) => Ok(s.clone()),
                Reply::Data(_) => Ok(String::new()),
                Reply::Err(e) | Reply::Refused(_, e) => Err(e.clone()),
            },
        );
        if self.replies.len() > 4096 {
            self.replies.pop_first();
        }
        id.hash(&mut self.hash);
        ok.hash(&mut self.hash);
        self.note(|| {
            let what = match &reply {
                Reply::Done(s) if s.is_empty() => "ok".to_string(),
                Reply::Done(s) => format!("ok: {s}"),
                Reply::Data(_) => "data".to_string(),
                Reply::Err(e) | Reply::Refused(_, e) => format!("error: {e}"),
            };
            format!("  reply to request #{id} (event {}): {what}", f.event)
        });
        match f.what {
            Waiting::Read {
                first,
                n,
                floors,
                in_sync,
            } => {
                self.stats.ops += 1;
                self.stats.reads += 1;
                match reply {
                    Reply::Data(data) => self.check_read(first, n, &floors, &data),
                    Reply::Err(e) | Reply::Refused(_, e) => {
                        self.stats.io_errors += 1;
                        self.check_read_error(first, n, &in_sync, &e);
                    }
                    Reply::Done(_) => {}
                }
            }
            Waiting::Modify { first, n, fua } => {
                self.stats.ops += 1;
                self.stats.writes += 1;
                if !ok {
                    self.stats.io_errors += 1;
                }
                self.model.complete(id, first, n, ok, fua);
                for b in first..first + n {
                    self.busy[b as usize] = self.busy[b as usize].saturating_sub(1);
                }
            }
            Waiting::Flush { cover } => {
                self.stats.ops += 1;
                self.stats.flushes += 1;
                if ok {
                    self.model.flushed(cover);
                } else {
                    self.stats.io_errors += 1;
                }
            }
            Waiting::Start { snapshot } => {
                self.stats.starts += 1;
                if ok {
                    self.node = NodeState::Running;
                    self.refused = None;
                    self.last_members = self.volume().map(|v| v.members()).unwrap_or_default();
                    let forced = matches!(&reply, Reply::Done(s) if s.starts_with("forced") || s.starts_with("resolved"));
                    match snapshot {
                        Some(snapshot) if forced => self.data_loss(snapshot),
                        _ => self.check_other_side(),
                    }
                } else {
                    self.stats.start_refusals += 1;
                    let kind = refusal.unwrap_or(Refusal::Other);
                    match kind {
                        Refusal::StaleOnly => self.stats.stale_refusals += 1,
                        Refusal::SplitBrain => self.stats.split_brain_refusals += 1,
                        Refusal::Draining | Refusal::Other => {}
                    }
                    self.node = NodeState::Down;
                    if let Reply::Err(e) = reply {
                        self.refused = Some((kind, e));
                    }
                }
            }
            Waiting::Stop { cover } => {
                // A clean stop makes writes durable only where its flush
                // went: with quorum, on a minority that is no promise a
                // takeover by the others keeps (no client flush succeeded).
                let majority = !self.cfg.quorum || {
                    let n = self.last_members.len();
                    let in_sync = self
                        .last_members
                        .iter()
                        .filter(|m| m.state == ReplicaState::InSync)
                        .count();
                    in_sync > n / 2
                };
                if ok && majority {
                    self.model.flushed(cover);
                }
                self.node = NodeState::Down;
                self.last_members.clear();
            }
            Waiting::Add { slot } => {
                if !ok {
                    self.slots[slot].in_record = false;
                }
            }
            Waiting::Remove { slot } => {
                if ok {
                    self.other_side.retain(|s| *s != slot);
                    self.slots[slot].in_record = false;
                }
            }
            Waiting::Control | Waiting::Format => {}
        }
    }

    /// After a forced start, the replicas it left out went on without the
    /// ones it started from: a later start may refuse them (split brain) or
    /// leave them stale, never count them in sync (that merges the sides).
    fn check_other_side(&mut self) {
        let merged: Vec<usize> = self
            .other_side
            .iter()
            .copied()
            .filter(|s| self.state_of(*s) == Some(ReplicaState::InSync))
            .collect();
        if let Some(&s) = merged.first() {
            let msg = format!(
                "{} was left out by a forced start (it went on without the replicas started from), yet a later start counted it in sync: the split brain was merged instead of refused",
                self.slots[s].disk.name()
            );
            self.fail(Check::StaleInSync, msg);
        }
    }

    fn check_read(&mut self, first: u64, n: u64, floors: &[u64], data: &Bytes) {
        for i in 0..n {
            let b = first + i;
            let at = (i * BLOCK) as usize;
            let Some(bytes) = data.get(at..at + BLOCK as usize) else {
                self.fail(Check::BadRead, format!("read of block {b} came back short"));
                return;
            };
            let value = match decode(bytes, b) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(Check::Garbage, format!("read of block {b}: {e}"));
                    return;
                }
            };
            value.hash(&mut self.hash);
            let floor = floors[i as usize];
            if !self.model.check(b, floor, value, true) {
                // Data that was there once came back: a write was lost.
                let lost = self.model.allowed(b, 0).any(|v| v.value == value);
                let check = if lost {
                    Check::LostWrite
                } else {
                    Check::BadRead
                };
                let detail = self.model.describe(b, floor);
                self.fail(
                    check,
                    format!("read of block {b} returned {value}; it may hold only the newer of: {detail}"),
                );
                return;
            }
        }
    }

    fn check_read_error(&mut self, first: u64, n: u64, in_sync: &[(usize, u64)], err: &str) {
        if self.cfg.quorum && err.contains("no quorum") {
            return; // refused by policy: the other side may have taken over
        }
        let now_in_sync = self.in_sync_slots();
        for &(slot, faults) in in_sync {
            let disk = &self.slots[slot].disk;
            if !now_in_sync.contains(&slot)
                || disk.stats().faults != faults
                || !self.slots[slot].reachable()
            {
                continue;
            }
            let legit = (first..first + n).all(|b| {
                let off = self.layout().data_offset + b * BLOCK;
                decode(&disk.peek(off, BLOCK as usize), b).is_ok_and(|v| {
                    self.model
                        .allowed(b, self.model.floor(b))
                        .any(|x| x.value == v)
                })
            });
            if legit {
                let msg = format!(
                    "read of blocks {first}..{} failed ({err}) while {} was in sync, held the data and had no fault",
                    first + n,
                    disk.name()
                );
                self.fail(Check::NeedlessEio, msg);
                return;
            }
        }
    }

    /// The node crashed (power loss): every task dies, disks resolve unflushed writes.
    pub fn crash(&mut self, mode: CrashMode) {
        self.stats.crashes += 1;
        self.sim.crash(NODE);
        *lock(&self.link.volume) = None;
        *lock(&self.link.draining) = None;
        lock(&self.link.requests).clear();
        lock(&self.link.completions).clear();
        self.inflight.clear();
        self.deferred.clear();
        self.busy.iter_mut().for_each(|b| *b = 0);
        for s in &self.slots {
            s.disk.crash(&mut self.crash_rng, mode);
        }
        self.model.crash();
        self.node = NodeState::Down;
        self.last_members.clear();
        self.sim.bounce(NODE);
    }

    /// No job runs or is about to: a rebuilding member without a finished
    /// (failed) job is one whose job has not published itself yet.
    fn job_idle(&self) -> bool {
        let rebuilding = self
            .last_members
            .iter()
            .any(|m| m.state == ReplicaState::Rebuilding);
        match self.job() {
            None => !rebuilding,
            Some(j) => j.finished && (!rebuilding || j.error.is_some()),
        }
    }

    /// Is the world quiet: nothing in flight, no job running?
    pub fn idle(&self) -> bool {
        self.inflight.is_empty()
            && self.deferred.is_empty()
            && (self.node != NodeState::Running || self.job_idle())
    }

    fn settle_quietly(&mut self) -> Result<(), Violation> {
        let start = self.now();
        while !self.idle() {
            if self.now() - start > self.cfg.settle_limit {
                self.stuck_message(start);
                break;
            }
            self.step_once();
            self.result()?;
        }
        self.result()
    }

    fn stuck_message(&mut self, start: Duration) {
        let waiting: Vec<String> = self
            .inflight
            .iter()
            .take(5)
            .map(|(id, f)| format!("#{id} from event {}", f.event))
            .collect();
        let job = self.job();
        let rebuilding: Vec<&str> = self
            .last_members
            .iter()
            .filter(|m| m.state == ReplicaState::Rebuilding)
            .map(|m| m.location.as_str())
            .collect();
        let msg = format!(
            "not idle {:.0}s after event {}: requests in flight [{}], job {}, rebuilding [{}]",
            (self.now() - start).as_secs_f64(),
            self.event_index.saturating_sub(1),
            waiting.join(", "),
            job.map_or("none".to_string(), |j| format!(
                "{} {}/{} bytes {}{}",
                j.kind.as_str(),
                j.done_bytes,
                j.total_bytes,
                if j.finished { "finished" } else { "unfinished" },
                j.error.map(|e| format!(" ({e})")).unwrap_or_default()
            )),
            rebuilding.join(", ")
        );
        self.fail(Check::Liveness, msg);
    }

    /// Wait until idle, then check the replicas (3) and (4).
    pub fn settle(&mut self) -> Result<(), Violation> {
        self.stats.settles += 1;
        self.settle_quietly()?;
        if self.node == NodeState::Running {
            self.check_replicas();
        }
        if self.inflight.is_empty() {
            self.model.prune();
        }
        self.result()
    }

    /// Checks (3) and (4) on the running volume, which must be idle.
    pub fn check_replicas(&mut self) {
        let Some(vol) = self.volume() else { return };
        self.stats.replica_checks += 1;
        let members = vol.members();
        // A replica whose disk was replaced under it answers nothing (EIO):
        // it cannot serve stale data, so only reachable ones are judged.
        let in_sync: Vec<usize> = members
            .iter()
            .filter(|m| m.state == ReplicaState::InSync)
            .filter_map(|m| self.slot_of(m.id))
            .filter(|s| self.slots[*s].disk.incarnation() == self.slots[*s].opened)
            .collect();
        let data_offset = self.layout().data_offset;
        for &s in &in_sync {
            let disk = self.slots[s].disk.clone();
            for b in 0..self.blocks() {
                let bytes = disk.peek(data_offset + b * BLOCK, BLOCK as usize);
                let value = match decode(&bytes, b) {
                    Ok(v) => v,
                    Err(e) => {
                        self.fail(
                            Check::StaleInSync,
                            format!("in-sync replica {} block {b}: {e}", disk.name()),
                        );
                        return;
                    }
                };
                let floor = self.model.floor(b);
                if !self.model.check(b, floor, value, false) {
                    let detail = self.model.describe(b, floor);
                    self.fail(
                        Check::StaleInSync,
                        format!(
                            "in-sync replica {} holds {value} in block {b}; it may hold only the newer of: {detail}",
                            disk.name()
                        ),
                    );
                    return;
                }
            }
        }
        if vol.fully_redundant() && in_sync.len() > 1 {
            let a = self.slots[in_sync[0]].disk.clone();
            for &s in &in_sync[1..] {
                let b = self.slots[s].disk.clone();
                if !a.same_content(&b, data_offset, self.cfg.volume_size) {
                    let first = (0..self.blocks())
                        .find(|blk| {
                            let off = data_offset + blk * BLOCK;
                            !a.same_content(&b, off, BLOCK)
                        })
                        .unwrap_or(0);
                    let va = decode(&a.peek(data_offset + first * BLOCK, BLOCK as usize), first);
                    let vb = decode(&b.peek(data_offset + first * BLOCK, BLOCK as usize), first);
                    self.fail(
                        Check::Diverged,
                        format!(
                            "volume is fully redundant and idle, but in-sync replicas {} and {} differ, first at block {first} ({} vs {})",
                            a.name(),
                            b.name(),
                            show(&va),
                            show(&vb)
                        ),
                    );
                    return;
                }
            }
        }
    }

    /// Finish the run: sim time and late landings into the stats.
    pub fn finish(&mut self) -> Stats {
        self.stats.sim_nanos = self.now().as_nanos();
        self.stats.late_landed = self.slots.iter().map(|s| s.disk.stats().late_landed).sum();
        self.stats
    }
}

fn show(v: &Result<Value, String>) -> String {
    match v {
        Ok(v) => v.to_string(),
        Err(e) => e.clone(),
    }
}

fn overlaps(e: &Event, first: u64, n: u64) -> bool {
    match e {
        Event::Write { block, n: m, .. }
        | Event::Trim { block, n: m }
        | Event::Zeroes { block, n: m, .. } => {
            let b = u64::from(*block);
            b < first + n && first < b + u64::from(*m)
        }
        _ => false,
    }
}
