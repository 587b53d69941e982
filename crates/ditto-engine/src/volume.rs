//! The mirror: one volume over several replicas.
//!
//! Writes fan out to every in-sync (and rebuilding) replica and complete only
//! when all of them did; a replica that fails is taken out of the in-sync set,
//! and the new generation is recorded on the survivors *before* the write is
//! acknowledged. Before the first write into a region, its dirty-map bit is
//! made durable. Reads go to one in-sync replica chosen by
//! [`crate::read_policy`], and fall back to the others on error. Long jobs
//! (resync, rebuild, scrub) live in [`crate::jobs`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

// tokio's clock: the real one in the daemon, the simulated one under ditto-sim.
use tokio::time::Instant;

use bytes::Bytes;
use ditto_format::{Layout, MemberState, ReplicaSetEntry, Superblock};
use futures::future::join_all;
use uuid::Uuid;

use crate::backend::{BackendError, ReplicaBackend};
use crate::dirty::DirtyMap;
use crate::events::{Event, EventKind, SharedSink};
use crate::io::Allocation;
use crate::jobs::{JobProgress, ResyncRedirect, ScrubReport};
use crate::membership::{KnownMembership, MembershipLogRef};
use crate::read_policy;
use crate::voter::{Tiebreaker, VoteRecord};

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {volume}: no in-sync replica is left; I/O is refused so nothing pretends to succeed. Check `ditto status {volume}`")]
    NoReplicas { volume: String },
    #[error("volume {volume}: no quorum ({have} of {voters} nodes in sync, {need} needed): I/O is refused so that the nodes on the other side of a partition can take over without a split brain. Reconnect the nodes, or see `ditto status {volume}`")]
    NoQuorum {
        volume: String,
        have: usize,
        need: usize,
        voters: usize,
    },
    #[error("volume {volume}: request [{offset}, +{len}) is outside the volume ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("volume {volume}: replica {replica} does not match: {why}")]
    ReplicaMismatch {
        volume: String,
        replica: String,
        why: String,
    },
    #[error("volume {volume}: split brain between replicas {a} and {b}: each went on without the other. Choose the one to keep with `ditto volume resolve {volume} --keep REPLICA`; the other is rebuilt from it")]
    SplitBrain {
        volume: String,
        a: String,
        b: String,
    },
    #[error("volume {volume}: {why}")]
    Refused { volume: String, why: String },
    #[error("volume {volume}: the replicas present ({present}) are stale: this node recorded generation {known_generation} with {missing} in sync, and they hold writes the present ones never saw. Bring one of those back and start again; if they are lost for good, `ditto volume start {volume} --force-stale` starts from the stale copy and loses the writes made after it left")]
    StaleOnly {
        volume: String,
        present: String,
        known_generation: u64,
        missing: String,
    },
    #[error("volume {volume} is stopped: it takes no I/O; start it again with `ditto volume start {volume}`")]
    Closed { volume: String },
    #[error("volume {volume}: the membership change at generation {generation} could not be recorded on any in-sync replica within {seconds} s, so the request is not acknowledged; check `ditto status {volume}` and the disks")]
    MembershipNotDurable {
        volume: String,
        generation: u64,
        seconds: u64,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Where a replica stands in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Has every acknowledged write; served from and written to.
    InSync = 0,
    /// Failed while serving; out of the set until re-added.
    Failed = 1,
    /// Found at start with an older generation: never served from.
    Stale = 2,
    /// Being resynced or rebuilt: written to, never read from.
    Rebuilding = 3,
    /// Could not be opened (disk or file gone).
    Missing = 4,
}

impl ReplicaState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => ReplicaState::InSync,
            1 => ReplicaState::Failed,
            3 => ReplicaState::Rebuilding,
            4 => ReplicaState::Missing,
            _ => ReplicaState::Stale,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in_sync",
            ReplicaState::Failed => "failed",
            ReplicaState::Stale => "stale",
            ReplicaState::Rebuilding => "rebuilding",
            ReplicaState::Missing => "missing",
        }
    }
}

/// One replica as the volume engine tracks it.
pub struct Member {
    pub id: Uuid,
    /// The pool (or node) the replica lives in, for status and messages.
    pub label: String,
    pub backend: Arc<dyn ReplicaBackend>,
    state: AtomicU8,
    /// Generation at which the state last changed.
    pub(crate) since: AtomicU64,
    pub(crate) pending: AtomicUsize,
    /// Where the last read on this replica ended: keeps sequential streams on one replica.
    pub(crate) next_offset: AtomicU64,
    reason: Mutex<Option<String>>,
    pub(crate) reads: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    /// Operations given up at `io_timeout` that the disk may still carry
    /// out (a write the kernel holds lands whenever the disk wakes).
    abandoned: Arc<AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
    /// The failure domain (node) the replica lives in; quorum counts
    /// domains, not replicas. Empty: this node.
    pub domain: String,
    changed_unix: AtomicU64,
}

/// A snapshot of a member's state for status.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub id: Uuid,
    pub label: String,
    pub location: String,
    pub state: ReplicaState,
    pub reason: Option<String>,
    pub generation: u64,
    pub data_offset: u64,
    pub pending: usize,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    /// Wall-clock time (Unix seconds) of its last state change, for status
    /// ("unreachable since"); never used for a decision.
    pub state_since_unix: u64,
}

impl MemberStatus {
    /// Out of the volume (failed, missing or stale) with nothing of it still
    /// in flight: a re-add may bring it back now.
    pub fn awaits_readd(&self) -> bool {
        matches!(
            self.state,
            ReplicaState::Failed | ReplicaState::Missing | ReplicaState::Stale
        ) && self.pending == 0
    }
}

fn wall_clock_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Member {
    pub fn new(id: Uuid, label: impl Into<String>, backend: Arc<dyn ReplicaBackend>) -> Self {
        let state = if backend.is_present() {
            ReplicaState::InSync
        } else {
            ReplicaState::Missing
        };
        Member {
            id,
            label: label.into(),
            backend,
            state: AtomicU8::new(state as u8),
            since: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            next_offset: AtomicU64::new(u64::MAX),
            reason: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            abandoned: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(tokio::sync::Notify::new()),
            domain: String::new(),
            changed_unix: AtomicU64::new(wall_clock_unix()),
        }
    }

    /// The same member, living in failure domain (node) `domain`.
    pub fn in_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    /// Operations abandoned at the timeout that have not completed yet.
    pub fn abandoned_ops(&self) -> usize {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Keep polling an operation the caller gave up on, so that its
    /// completion is known: until then nothing may be written after it.
    fn abandon<T: Send + 'static>(&self, op: std::pin::Pin<Box<dyn Future<Output = T> + Send>>) {
        self.abandoned.fetch_add(1, Ordering::AcqRel);
        let (abandoned, drained) = (self.abandoned.clone(), self.drained.clone());
        tokio::spawn(async move {
            let _ = op.await;
            if abandoned.fetch_sub(1, Ordering::AcqRel) == 1 {
                drained.notify_waiters();
            }
        });
    }

    /// Wait up to `limit` for abandoned operations to complete.
    pub(crate) async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.abandoned_ops() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.abandoned_ops() == 0;
            }
        }
    }

    pub fn state(&self) -> ReplicaState {
        ReplicaState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Generation at which the state last changed.
    pub fn since_generation(&self) -> u64 {
        self.since.load(Ordering::Acquire)
    }

    pub(crate) fn set_state(&self, state: ReplicaState, since: u64, reason: Option<String>) {
        if self.state() != state {
            self.changed_unix
                .store(wall_clock_unix(), Ordering::Relaxed);
        }
        self.state.store(state as u8, Ordering::Release);
        self.since.store(since, Ordering::Release);
        self.set_reason(reason);
    }

    fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    fn set_reason(&self, reason: Option<String>) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
    }

    fn status(&self) -> MemberStatus {
        let sb = self.backend.superblock();
        MemberStatus {
            id: self.id,
            label: self.label.clone(),
            location: self.backend.location().to_string(),
            state: self.state(),
            reason: self.reason(),
            generation: sb.generation,
            data_offset: sb.layout.data_offset,
            pending: self.pending.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            state_since_unix: self.changed_unix.load(Ordering::Relaxed),
        }
    }
}

/// Tunables of one volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// A replica that does not complete an operation in this time is failed
    /// out: a hanging disk is the common case, not a dead one.
    pub io_timeout: Duration,
    /// Resync/rebuild rate while clients are doing I/O (bytes/s).
    pub resync_min_rate: u64,
    /// Resync/rebuild rate when clients are idle (bytes/s).
    pub resync_max_rate: u64,
    /// A region's dirty bit is cleared once that region has had no write
    /// for this long (and every member is in sync).
    pub dirty_clear_delay: Duration,
    /// A catch-up or rebuild asks each target whether it holds a run
    /// already ([`ReplicaBackend::holds`]: a digest over the network) and
    /// skips the write when it does (DRBD's csums-alg). Off by default: it
    /// costs a read on the target and a round trip per run, and pays only
    /// when the link is slower than the disks.
    pub resync_checksums: bool,
    /// Most regions kept dirty while the volume is fully redundant (the
    /// hot set, like DRBD's activity log): beyond it the least recently
    /// written regions are flushed and cleared early. A crash resync copies
    /// at most this many regions (plus those written since the last sweep).
    pub hot_set_regions: u64,
    /// The node's record of this volume's membership: judges a replica that
    /// returns alone, and is updated on every membership change.
    pub membership_log: Option<MembershipLogRef>,
    /// Start even if the only replicas present are older than the node's
    /// record (the operator accepts losing the writes they missed).
    pub accept_stale: bool,
    /// Replicas whose data the operator discards (the losing side of a
    /// split brain, `volume resolve --keep`): never current, left out of
    /// the split-brain check, and stale until rebuilt in full.
    pub discard: Vec<Uuid>,
    /// Majority quorum over failure domains: I/O only while the in-sync
    /// replicas span more than half of the volume's domains. None: off.
    pub quorum: Option<NoQuorum>,
    /// The primary's promote epoch, written into every superblock.
    pub epoch: u64,
    /// A diskless voter in the quorum (`volume create --tiebreaker`).
    pub tiebreaker: Option<Tiebreaker>,
}

/// What a volume does without quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoQuorum {
    /// New requests wait until quorum returns (or the volume closes);
    /// requests in flight when it was lost fail.
    Suspend,
    /// Requests fail at once.
    Error,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_timeout: Duration::from_secs(30),
            resync_min_rate: 10 << 20,
            resync_max_rate: 1 << 30,
            dirty_clear_delay: Duration::from_secs(5),
            resync_checksums: false,
            hot_set_regions: 4096,
            membership_log: None,
            accept_stale: false,
            discard: Vec::new(),
            quorum: None,
            epoch: 0,
            tiebreaker: None,
        }
    }
}

const STRIPES: usize = 64;

/// A member's `since` generation when it is not known which writes it holds
/// (it was away at a forced start): a re-add rebuilds it in full (or refuses
/// it as a split brain), never catches it up by a dirty map.
pub(crate) const SINCE_UNKNOWN: u64 = 0;

/// A mirrored volume.
pub struct Volume {
    name: String,
    uuid: Uuid,
    size: u64,
    pub(crate) layout: Layout,
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    generation: AtomicU64,
    /// Serialises membership changes (and the superblock writes recording them).
    pub(crate) membership: tokio::sync::Mutex<()>,
    pub(crate) options: VolumeOptions,
    pub(crate) events: SharedSink,
    pub(crate) dirty: DirtyMap,
    /// Region-striped locks: writes hold their regions' stripes shared; a
    /// resync copying a region, or clearing the dirty map, holds them exclusive.
    stripes: Vec<tokio::sync::RwLock<()>>,
    /// While resyncing after an unclean shutdown: reads of regions not yet
    /// copied go to the resync source.
    pub(crate) redirect: RwLock<Option<Arc<ResyncRedirect>>>,
    epoch: Instant,
    last_write_ms: AtomicU64,
    pub(crate) last_io_ms: AtomicU64,
    /// One long job (resync, rebuild, scrub) at a time.
    pub(crate) job_lock: tokio::sync::Mutex<()>,
    /// Serialises the operator's replica changes (add, re-add, remove), each
    /// from its state check to its recorded membership: two re-adds of one
    /// replica would otherwise both pass the check while its disk is slow.
    pub(crate) reconfigure: tokio::sync::Mutex<()>,
    pub(crate) job: Mutex<Option<JobProgress>>,
    pub(crate) last_scrub: Mutex<Option<ScrubReport>>,
    /// Bytes copied by resync and rebuild since the volume started.
    pub(crate) copied_bytes: AtomicU64,
    /// Bytes a resync found on its target already and did not send.
    pub(crate) skipped_bytes: AtomicU64,
    pub(crate) closed: AtomicBool,
    /// Client requests hold it shared; `close` takes it exclusively, so it
    /// returns only once no request is running, and none starts after.
    io_gate: tokio::sync::RwLock<()>,
    /// Newest generation recorded on the in-sync replicas. A request that
    /// ran against a newer membership (one that skipped a replica failed in
    /// memory) waits for it before it is acknowledged.
    durable_generation: AtomicU64,
    durable_changed: tokio::sync::Notify,
    last_record_retry_ms: AtomicU64,
    /// Wakes the dirty-map sweeper early when the hot set overflows.
    pub(crate) sweep: tokio::sync::Notify,
    /// The generation the tiebreaker last recorded (0: none, or its vote
    /// was lost since): it votes while this is the current generation.
    tiebreaker_generation: AtomicU64,
}

fn self_in_sync(sb: &Superblock) -> bool {
    sb.replica_set.is_empty() || is_in_sync(sb, sb.replica_uuid)
}

/// In sync by its own record and not in the middle of a rebuild: a replica
/// that may have served as current.
pub(crate) fn could_be_current(sb: &Superblock) -> bool {
    self_in_sync(sb) && sb.rebuild_cursor.is_none()
}

fn is_in_sync(sb: &Superblock, id: Uuid) -> bool {
    sb.replica_set
        .iter()
        .any(|e| e.replica == id && e.state == MemberState::InSync)
}

fn recorded(sb: &Superblock, id: Uuid) -> Option<MemberState> {
    sb.replica_set
        .iter()
        .find(|e| e.replica == id)
        .map(|e| e.state)
}

fn volume_discards(options: &VolumeOptions, id: Uuid) -> bool {
    options.discard.contains(&id)
}

fn excludes(sb: &Superblock, id: Uuid) -> bool {
    matches!(recorded(sb, id), Some(s) if s != MemberState::InSync)
}

impl Volume {
    /// Assemble a volume from its replicas (missing ones as
    /// [`crate::backend::MissingReplica`]). The generation decides who is
    /// current: older replicas are stale and never served from; two replicas
    /// that each excluded the other are a split brain and the volume refuses
    /// to start. Records the assembled membership on every in-sync replica
    /// before returning, then resumes any resync or rebuild in the background.
    pub async fn open(
        name: impl Into<String>,
        uuid: Uuid,
        size: u64,
        members: Vec<Member>,
        options: VolumeOptions,
        events: SharedSink,
    ) -> Result<Arc<Self>, EngineError> {
        let name = name.into();
        let present: Vec<&Member> = members
            .iter()
            .filter(|m| m.backend.is_present() && !options.discard.contains(&m.id))
            .collect();
        // The volume goes on past every generation present (a replica's node
        // refuses requests older than its superblock); who is current is
        // decided by epoch first, then generation.
        let mut generation = 0;
        let mut newest = (0, 0);
        for m in &present {
            let sb = m.backend.superblock();
            let mismatch = |why: String| EngineError::ReplicaMismatch {
                volume: name.clone(),
                replica: m.backend.location().to_string(),
                why,
            };
            if sb.volume_uuid != uuid {
                return Err(mismatch(format!("it belongs to volume {}", sb.volume_uuid)));
            }
            if sb.replica_uuid != m.id {
                return Err(mismatch(format!(
                    "its replica id is {}, expected {}",
                    sb.replica_uuid, m.id
                )));
            }
            if sb.layout.volume_size != size {
                return Err(mismatch(format!(
                    "its size is {} bytes, expected {size}",
                    sb.layout.volume_size
                )));
            }
            generation = generation.max(sb.generation);
            newest = newest.max(sb.order_key());
        }
        // With quorum, a minority of the volume's nodes must not start: it
        // may lack writes a majority acknowledged, and its own start would
        // record the others as failed.
        if options.quorum.is_some() {
            let mut all: std::collections::BTreeSet<&str> =
                members.iter().map(|m| m.domain.as_str()).collect();
            let mut here: std::collections::BTreeSet<&str> = members
                .iter()
                .filter(|m| m.backend.is_present())
                .map(|m| m.domain.as_str())
                .collect();
            // The tiebreaker votes for the start when it took its claim.
            if let Some(t) = &options.tiebreaker {
                all.insert(t.voter.domain());
                if t.claimed.is_some() {
                    here.insert(t.voter.domain());
                }
            }
            let need = all.len() / 2 + 1;
            if here.len() < need {
                return Err(EngineError::NoQuorum {
                    volume: name,
                    have: here.len(),
                    need,
                    voters: all.len(),
                });
            }
        }
        // With quorum, every start takes an epoch of its own, claimed by a
        // majority of the nodes (so no other start can take it): then the
        // superblocks of one epoch are one assembly's, one line of
        // generations, and the newer generation is the newer copy. A start
        // at an epoch some present replica was already assembled at would
        // break that (it could be a second line at one epoch), so it is
        // refused. Replicas never assembled (fresh) carry no history.
        if options.quorum.is_some() {
            let reused = present
                .iter()
                .map(|m| m.backend.superblock())
                .find(|sb| !sb.replica_set.is_empty() && sb.epoch >= options.epoch);
            if let Some(sb) = reused {
                return Err(EngineError::Refused {
                    volume: name,
                    why: format!(
                        "with quorum every start takes a new epoch, claimed by a majority of the nodes, but replica {} was already assembled at epoch {} and this start is at epoch {}; the node must claim a newer epoch before it starts the volume (a bug in the caller: report it)",
                        short(sb.replica_uuid),
                        sb.epoch,
                        options.epoch
                    ),
                });
            }
        }
        let Some(layout) = present.first().map(|m| m.backend.superblock().layout) else {
            return Err(EngineError::Refused {
                volume: name,
                why: "none of its replicas can be opened".into(),
            });
        };
        for (i, a) in present.iter().enumerate() {
            for b in &present[i + 1..] {
                let (sa, sbb) = (a.backend.superblock(), b.backend.superblock());
                // Across epochs the newer primary's record wins: the older
                // side is stale, found again (split brain or rebuild) at its re-add.
                // Only replicas that could each have been current (in sync
                // by their own record, no rebuild half done) can have gone on
                // without each other: one stopped mid-rebuild is stale.
                // With quorum one epoch is one assembly (above): its
                // generations form one line, so of two replicas that each
                // exclude the other the newer generation is current and the
                // other merely left earlier (found by the cluster simulator:
                // such starts were refused and the nodes never converged).
                if sa.epoch == sbb.epoch
                    && options.quorum.is_none()
                    && could_be_current(&sa)
                    && could_be_current(&sbb)
                    && excludes(&sa, b.id)
                    && excludes(&sbb, a.id)
                {
                    let e = EngineError::SplitBrain {
                        volume: name.clone(),
                        a: a.backend.location().to_string(),
                        b: b.backend.location().to_string(),
                    };
                    events.emit(Event {
                        kind: EventKind::SplitBrain,
                        volume: name.clone(),
                        replica: None,
                        message: e.to_string(),
                        progress: None,
                    });
                    return Err(e);
                }
            }
        }
        // Current: newest generation, in sync by its own record, not in the
        // middle of a rebuild, and not excluded by another current replica.
        let candidates: Vec<Superblock> = present
            .iter()
            .map(|m| m.backend.superblock())
            .filter(|sb| sb.order_key() == newest && could_be_current(sb))
            .collect();
        let current: Vec<Superblock> = candidates
            .iter()
            .filter(|sb| {
                !candidates
                    .iter()
                    .any(|o| o.replica_uuid != sb.replica_uuid && excludes(o, sb.replica_uuid))
            })
            .cloned()
            .collect();
        // The tiebreaker's record judges them too: its vote may have
        // carried acknowledgements that a replica present here missed (the
        // replica was failed out on a primary absent now).
        let witnessed = options
            .tiebreaker
            .as_ref()
            .and_then(|t| Some((t.voter.domain().to_string(), t.claimed.clone()?)));
        let current = match &witnessed {
            Some((node, record)) if !current.is_empty() => {
                let vouched: Vec<Superblock> = current
                    .iter()
                    .filter(|sb| record.vouches_for(sb))
                    .cloned()
                    .collect();
                if vouched.is_empty() && !options.accept_stale {
                    return Err(EngineError::Refused {
                        volume: name,
                        why: format!(
                            "no replica present is proven current: tiebreaker {node} recorded epoch {} generation {} with only replica(s) {} in sync, and the replicas present ({}) are older and not among them; it starts when a replica in that set answers",
                            record.epoch,
                            record.generation,
                            record
                                .in_sync
                                .iter()
                                .map(|id| short(*id))
                                .collect::<Vec<_>>()
                                .join(", "),
                            current
                                .iter()
                                .map(|sb| format!(
                                    "{} at epoch {} generation {}",
                                    short(sb.replica_uuid),
                                    sb.epoch,
                                    sb.generation
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                if vouched.is_empty() {
                    current
                } else {
                    vouched
                }
            }
            _ => current,
        };
        // The node's record judges replicas whose own superblocks cannot
        // know they were failed out (they were gone when it happened).
        let known = options.membership_log.as_ref().and_then(|l| l.0.last(uuid));
        let mut current = current;
        let mut forced_past = None;
        if let Some(known) = &known {
            let vouched: Vec<Superblock> = current
                .iter()
                .filter(|sb| known.vouches_for(sb.replica_uuid, sb.generation))
                .cloned()
                .collect();
            if vouched.is_empty() && !current.is_empty() {
                if !options.accept_stale {
                    let e = EngineError::StaleOnly {
                        volume: name.clone(),
                        present: current
                            .iter()
                            .map(|sb| {
                                format!(
                                    "{} at generation {}",
                                    short(sb.replica_uuid),
                                    sb.generation
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                        known_generation: known.generation,
                        missing: known
                            .in_sync
                            .iter()
                            .map(|id| short(*id))
                            .collect::<Vec<_>>()
                            .join(", "),
                    };
                    events.emit(Event {
                        kind: EventKind::StaleReplicaRefused,
                        volume: name.clone(),
                        replica: None,
                        message: e.to_string(),
                        progress: None,
                    });
                    return Err(e);
                }
                // Forced: go on from the stale copy, at a generation past the
                // record, so the replicas it lost to are told apart later.
                forced_past = Some(known.generation);
            } else {
                current = vouched;
            }
        }
        let Some(view) = current.first().cloned() else {
            return Err(EngineError::Refused {
                volume: name,
                why: "no replica is current (every replica present is stale or being rebuilt)"
                    .into(),
            });
        };
        // Past every discarded replica's generation too: a replica's node
        // refuses requests older than its superblock.
        let discarded_max = members
            .iter()
            .filter(|m| m.backend.is_present() && options.discard.contains(&m.id))
            .map(|m| m.backend.superblock().generation)
            .max()
            .unwrap_or(0);
        let generation = forced_past
            .map_or(generation, |g| generation.max(g))
            .max(discarded_max);
        let mut stale_events = Vec::new();
        for m in &members {
            let since = view
                .replica_set
                .iter()
                .find(|e| e.replica == m.id)
                .map_or(generation, |e| u64::from(e.since_generation));
            // After a forced start the others may hold writes the stale copy
            // never saw, some not even under a newer generation (a catch-up
            // target takes client writes at its old one), so no dirty map
            // covers them: they are rebuilt in full or refused as a split brain.
            let since = if (forced_past.is_some() || options.discard.contains(&m.id))
                && !current.iter().any(|c| c.replica_uuid == m.id)
            {
                SINCE_UNKNOWN
            } else {
                since
            };
            if !m.backend.is_present() {
                m.set_state(
                    ReplicaState::Missing,
                    since,
                    Some(format!("cannot be opened: {}", missing_reason(m))),
                );
                continue;
            }
            let sb = m.backend.superblock();
            if current.iter().any(|c| c.replica_uuid == m.id) {
                m.set_state(ReplicaState::InSync, since, None);
            } else if recorded(&view, m.id) == Some(MemberState::Rebuilding) {
                m.set_state(
                    ReplicaState::Rebuilding,
                    since,
                    Some("rebuild resumes".into()),
                );
            } else if volume_discards(&options, m.id) {
                m.set_state(
                    ReplicaState::Stale,
                    since,
                    Some("discarded by the operator (`volume resolve --keep`): rebuilt in full from the kept side".into()),
                );
            } else {
                let why = format!(
                    "stale: generation {} is older than the volume's {generation}; it is not served from. Re-add it with `ditto replica readd {name} {}`",
                    sb.generation,
                    short(m.id)
                );
                stale_events.push((m.backend.location().to_string(), why.clone()));
                m.set_state(ReplicaState::Stale, since, Some(why));
            }
        }
        let volume = Arc::new(Volume {
            name,
            uuid,
            size,
            layout,
            members: RwLock::new(Arc::new(members.into_iter().map(Arc::new).collect())),
            generation: AtomicU64::new(generation),
            membership: tokio::sync::Mutex::new(()),
            options,
            events,
            dirty: DirtyMap::new(layout),
            stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            redirect: RwLock::new(None),
            epoch: Instant::now(),
            last_write_ms: AtomicU64::new(0),
            last_io_ms: AtomicU64::new(0),
            job_lock: tokio::sync::Mutex::new(()),
            reconfigure: tokio::sync::Mutex::new(()),
            job: Mutex::new(None),
            last_scrub: Mutex::new(None),
            copied_bytes: AtomicU64::new(0),
            skipped_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            io_gate: tokio::sync::RwLock::new(()),
            durable_generation: AtomicU64::new(0),
            durable_changed: tokio::sync::Notify::new(),
            last_record_retry_ms: AtomicU64::new(0),
            sweep: tokio::sync::Notify::new(),
            tiebreaker_generation: AtomicU64::new(0),
        });
        for (replica, message) in stale_events {
            volume.emit(EventKind::StaleReplicaRefused, Some(replica), message);
        }
        if let Some(past) = forced_past {
            volume.generation.store(past + 1, Ordering::Release);
            volume.emit(
                EventKind::StaleReplicaRefused,
                None,
                format!("started from stale replica(s) by the operator's --force-stale: writes made after generation {} are lost", view.generation),
            );
        }
        let unclean = volume.assemble(&view).await?;
        volume.clone().start_background(unclean);
        Ok(volume)
    }

    /// Load the dirty map, record the membership, announce the start.
    async fn assemble(&self, view: &Superblock) -> Result<bool, EngineError> {
        let _guard = self.membership.lock().await;
        let mut unclean = false;
        let mut maps = Vec::new();
        for m in self.with_state(&[ReplicaState::InSync]) {
            let sb = m.backend.superblock();
            unclean |= !sb.clean;
            match self
                .timed(&m, |b| async move { b.read_dirty_map().await })
                .await
            {
                Ok(map) => {
                    self.dirty.load(&map);
                    maps.push((m, map));
                }
                Err(e) => {
                    let since = self.generation();
                    m.set_state(
                        ReplicaState::Failed,
                        since,
                        Some(format!("cannot read its dirty map: {e}")),
                    );
                }
            }
        }
        // The volume now counts the union of the maps as durable, so later
        // writes into those regions write no bit: every in-sync replica must
        // hold all of it, or one left alone later would miss a region.
        let union = self.dirty.encoded();
        for (m, map) in maps {
            if map.starts_with(&union) {
                continue;
            }
            let blocks = union.clone();
            if let Err(e) = self
                .timed_write(
                    &m,
                    move |b| async move { b.write_dirty_map(0, blocks).await },
                )
                .await
            {
                let since = self.generation();
                m.set_state(
                    ReplicaState::Failed,
                    since,
                    Some(format!("cannot write the volume's dirty map: {e}")),
                );
            }
        }
        let changed = self.member_list().iter().any(|m| {
            (m.state() == ReplicaState::InSync) != is_in_sync(view, m.id)
                && !view.replica_set.is_empty()
        });
        if changed {
            let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            for m in self.member_list().iter() {
                if (m.state() == ReplicaState::InSync) != is_in_sync(view, m.id)
                    && m.since_generation() != SINCE_UNKNOWN
                {
                    m.since.store(g, Ordering::Release);
                }
            }
        }
        self.persist_membership(false).await?;
        let total = self.member_list().len();
        let in_sync = self.in_sync().len();
        self.emit(
            EventKind::VolumeStarted,
            None,
            format!(
                "started with {in_sync} of {total} replicas in sync at generation {}",
                self.generation()
            ),
        );
        if in_sync < total {
            self.emit(
                EventKind::DegradedStart,
                None,
                format!("started DEGRADED: {in_sync} of {total} replicas in sync; see `ditto status {}`", self.name),
            );
        }
        Ok(unclean)
    }

    fn start_background(self: Arc<Self>, unclean: bool) {
        let rebuilding = self.with_state(&[ReplicaState::Rebuilding]);
        let resync = unclean && self.prepare_resync();
        let weak = Arc::downgrade(&self);
        tokio::spawn(async move {
            if let Some(v) = weak.upgrade() {
                if resync {
                    v.clone().resync_after_crash().await;
                }
                for m in rebuilding {
                    // A full rebuild always records a cursor before it starts;
                    // without one this was a catch-up, and the dirty map (never
                    // cleared while a member is rebuilding) still covers it.
                    match m.backend.superblock().rebuild_cursor {
                        Some(cursor) => {
                            let _ = v.clone().rebuild(m, cursor).await;
                        }
                        None => {
                            let _ = v.clone().catch_up(m).await;
                        }
                    }
                }
            }
            let tick = weak.upgrade().map_or(Duration::from_millis(500), |v| {
                (v.options.dirty_clear_delay / 2)
                    .clamp(Duration::from_millis(20), Duration::from_millis(500))
            });
            loop {
                // Held for one tick at most: dropping the last other
                // reference still frees the volume at the end of the tick.
                let Some(v) = weak.upgrade() else { return };
                {
                    let woken = v.sweep.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    // biased: no random branch choice, so the simulator replays exactly.
                    tokio::select! {
                        biased;
                        _ = tokio::time::sleep(tick) => {}
                        _ = woken => {}
                    }
                }
                if v.closed.load(Ordering::Acquire) {
                    return;
                }
                v.retry_membership_record().await;
                v.sweep_dirty_map().await;
            }
        });
    }

    pub(crate) fn emit(&self, kind: EventKind, replica: Option<String>, message: String) {
        self.emit_progress(kind, replica, message, None);
    }

    pub(crate) fn emit_progress(
        &self,
        kind: EventKind,
        replica: Option<String>,
        message: String,
        progress: Option<(u64, u64)>,
    ) {
        self.events.emit(Event {
            kind,
            volume: self.name.clone(),
            replica,
            message,
            progress,
        });
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        self.member_list().iter().map(|m| m.status()).collect()
    }

    /// Regions currently marked dirty.
    pub fn dirty_regions(&self) -> u64 {
        self.dirty.dirty_count()
    }

    /// Bytes copied by resync and rebuild since the volume started.
    /// Bytes resyncs found on their targets already (`resync_checksums`).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes.load(Ordering::Relaxed)
    }

    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }

    /// The running (or last finished) resync/rebuild/scrub job.
    pub fn job(&self) -> Option<JobProgress> {
        self.job.lock().ok().and_then(|j| j.clone())
    }

    pub fn last_scrub(&self) -> Option<ScrubReport> {
        self.last_scrub.lock().ok().and_then(|s| s.clone())
    }

    pub(crate) fn member_list(&self) -> Arc<Vec<Arc<Member>>> {
        match self.members.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn set_member_list(&self, list: Vec<Arc<Member>>) {
        match self.members.write() {
            Ok(mut m) => *m = Arc::new(list),
            Err(p) => *p.into_inner() = Arc::new(list),
        }
    }

    pub(crate) fn member(&self, id: Uuid) -> Option<Arc<Member>> {
        self.member_list().iter().find(|m| m.id == id).cloned()
    }

    pub(crate) fn with_state(&self, states: &[ReplicaState]) -> Vec<Arc<Member>> {
        self.member_list()
            .iter()
            .filter(|m| states.contains(&m.state()))
            .cloned()
            .collect()
    }

    /// (domains with an in-sync replica, domains in all, needed), when quorum is on.
    pub fn quorum_state(&self) -> Option<(usize, usize, usize)> {
        self.options.quorum?;
        // Checked after every write: counted in place, without allocating
        // (a volume has a handful of members).
        let members = self.member_list();
        let (mut live, mut voters) = (0, 0);
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|p| p.domain == m.domain) {
                continue; // its domain is counted already
            }
            voters += 1;
            if members
                .iter()
                .any(|p| p.domain == m.domain && p.state() == ReplicaState::InSync)
            {
                live += 1;
            }
        }
        if self.options.tiebreaker.is_some() {
            voters += 1;
            if self.tiebreaker_votes() {
                live += 1;
            }
        }
        Some((live, voters, voters / 2 + 1))
    }

    fn check_quorum(&self) -> Result<(), EngineError> {
        match self.quorum_state() {
            Some((have, voters, need)) if have < need => Err(EngineError::NoQuorum {
                volume: self.name.clone(),
                have,
                need,
                voters,
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn in_sync(&self) -> Vec<Arc<Member>> {
        self.with_state(&[ReplicaState::InSync])
    }

    /// Why this instance can make no progress: every in-sync replica's
    /// backend is lost for good (the last one is kept in service rather
    /// than failed, and a re-add must record itself on an in-sync replica,
    /// so nothing moves again). The node closes it and starts the volume
    /// again, which connects afresh and decides from the superblocks.
    /// Found by the cluster simulator (seed 92 of `--seeds 100`).
    pub fn stranded(&self) -> Option<String> {
        let in_sync = self.in_sync();
        let mut why = Vec::new();
        for m in &in_sync {
            why.push(format!("{}: {}", m.label, m.backend.lost()?));
        }
        (!why.is_empty()).then(|| {
            format!(
                "every in-sync replica is unreachable through this instance ({})",
                why.join("; ")
            )
        })
    }

    /// True when every member is in sync (nothing to catch up for anyone).
    pub fn fully_redundant(&self) -> bool {
        self.member_list()
            .iter()
            .all(|m| m.state() == ReplicaState::InSync)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn no_replicas(&self) -> EngineError {
        EngineError::NoReplicas {
            volume: self.name.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self, write: bool) {
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if write {
            self.last_write_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the last client I/O.
    pub(crate) fn idle_ms(&self) -> u64 {
        self.now_ms()
            .saturating_sub(self.last_io_ms.load(Ordering::Relaxed))
    }

    /// Run one backend operation under `io_timeout`. One that outlives it
    /// fails for the caller but is kept running to its end (see
    /// [`Member::abandon`]): the disk may still carry it out.
    pub(crate) async fn timed<T, Fut>(
        &self,
        member: &Member,
        op: impl FnOnce(Arc<dyn ReplicaBackend>) -> Fut,
    ) -> Result<T, BackendError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, BackendError>> + Send + 'static,
    {
        let mut fut: std::pin::Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send>> =
            Box::pin(op(member.backend.clone()));
        match tokio::time::timeout(self.options.io_timeout, &mut fut).await {
            Ok(r) => r,
            Err(_) => {
                member.abandon(fut);
                Err(BackendError::Timeout {
                    location: member.backend.location().to_string(),
                    seconds: self.options.io_timeout.as_secs(),
                })
            }
        }
    }

    /// [`Self::timed`] for operations that change a replica: they first
    /// wait for the operations abandoned on it to complete, so a late write
    /// can never land after, and over, a newer one.
    pub(crate) async fn timed_write<T, Fut>(
        &self,
        member: &Member,
        op: impl FnOnce(Arc<dyn ReplicaBackend>) -> Fut,
    ) -> Result<T, BackendError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, BackendError>> + Send + 'static,
    {
        if member.abandoned_ops() > 0 && !member.drain(self.options.io_timeout).await {
            return Err(BackendError::Abandoned {
                location: member.backend.location().to_string(),
                pending: member.abandoned_ops(),
            });
        }
        self.timed(member, op).await
    }

    fn stripe_set(&self, offset: u64, len: u64) -> Vec<usize> {
        self.stripes_of(self.dirty.regions_of(offset, len))
    }

    fn stripes_of(&self, regions: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut s: Vec<usize> = regions
            .into_iter()
            .map(|r| (r % STRIPES as u64) as usize)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    pub(crate) async fn lock_region(&self, region: u64) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.stripes[(region % STRIPES as u64) as usize]
            .write()
            .await
    }

    /// Hold `stripes` (sorted, so lockers never deadlock) exclusively: no
    /// write into their regions is running or can start.
    async fn lock_stripes_exclusive(
        &self,
        stripes: &[usize],
    ) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[*s].write().await);
        }
        guards
    }

    /// Make the dirty bits of `[offset, offset+len)` durable on every in-sync replica.
    async fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let regions = self.dirty.regions_of(offset, len);
        self.dirty.touch(regions.clone(), self.now_ms());
        if self.dirty.request(regions.clone()) {
            return Ok(());
        }
        let _persist = self.dirty.persist.lock().await;
        if self.dirty.all_durable(regions) {
            return Ok(());
        }
        let (blocks, newly) = self.dirty.pending_blocks();
        let members = self.in_sync();
        let writes = members.iter().map(|m| {
            let blocks = blocks.clone();
            async move {
                for (first, data) in blocks {
                    self.timed_write(
                        m,
                        move |b| async move { b.write_dirty_map(first, data).await },
                    )
                    .await?;
                }
                Ok::<(), BackendError>(())
            }
        });
        let results = join_all(writes).await;
        self.settle(&members, results, "cannot record the dirty map")
            .await?;
        self.dirty.commit(&newly);
        if self.dirty.dirty_count() > self.options.hot_set_regions {
            self.sweep.notify_one();
        }
        Ok(())
    }

    /// Run `op` on every in-sync and rebuilding replica, then [`Self::settle`]
    /// the results. Succeeds when an in-sync replica completed it and the
    /// membership it ran against is durable.
    async fn fan_out<'a, F, Fut>(&'a self, what: &str, op: F) -> Result<(), EngineError>
    where
        F: Fn(Arc<Member>) -> Fut,
        Fut: Future<Output = Result<(), BackendError>> + 'a,
    {
        let members = self.with_state(&[ReplicaState::InSync, ReplicaState::Rebuilding]);
        if !members.iter().any(|m| m.state() == ReplicaState::InSync) {
            return Err(self.no_replicas());
        }
        // Read after the states: a member this request skips because it was
        // failed in memory bumped the generation before its state changed.
        let generation = self.generation();
        let results = join_all(members.iter().map(|m| op(m.clone()))).await;
        self.settle(&members, results, what).await?;
        self.await_durable(generation).await
    }

    /// After one operation ran on `members`: fail out those that erred (the
    /// last in-sync one is kept, see [`Self::fail_member`]). It succeeded if
    /// a member still in sync completed it. Otherwise the request gets the
    /// error, and rebuilding members that took it are failed too: their copy
    /// of the range now differs from the replica kept in service.
    async fn settle(
        &self,
        members: &[Arc<Member>],
        results: Vec<Result<(), BackendError>>,
        what: &str,
    ) -> Result<(), EngineError> {
        let mut first_error = None;
        let mut completed = Vec::new();
        for (m, r) in members.iter().zip(results) {
            match r {
                Ok(()) => completed.push(m.clone()),
                Err(e) => {
                    m.errors.fetch_add(1, Ordering::Relaxed);
                    self.fail_member(m, format!("{what}: {e}")).await?;
                    first_error.get_or_insert(e);
                }
            }
        }
        if completed.iter().any(|m| m.state() == ReplicaState::InSync) {
            return Ok(());
        }
        for m in completed {
            self.fail_member(
                &m,
                "it took a write that the last in-sync replica failed, so that region must be copied again".into(),
            )
            .await?;
        }
        Err(first_error
            .map(EngineError::Backend)
            .unwrap_or_else(|| self.no_replicas()))
    }

    /// Wait until `generation` is recorded on the in-sync replicas.
    async fn await_durable(&self, generation: u64) -> Result<(), EngineError> {
        if self.durable_generation.load(Ordering::Acquire) >= generation {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.options.io_timeout;
        loop {
            let changed = self.durable_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.durable_generation.load(Ordering::Acquire) >= generation {
                return Ok(());
            }
            if self.in_sync().is_empty() {
                return Err(self.no_replicas());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(EngineError::MembershipNotDurable {
                    volume: self.name.clone(),
                    generation,
                    seconds: self.options.io_timeout.as_secs(),
                });
            }
        }
    }

    /// Take a member out of the set and record the new generation on the
    /// survivors. Returns only when that record is durable. The last in-sync
    /// member is never failed (md never fails its last leg either): it stays
    /// in service, the error goes to the request, and status and events say so.
    pub async fn fail_member(&self, member: &Member, reason: String) -> Result<(), EngineError> {
        let _guard = self.membership.lock().await;
        let was = member.state();
        if was != ReplicaState::InSync && was != ReplicaState::Rebuilding {
            return Ok(());
        }
        if was == ReplicaState::InSync && self.in_sync().len() == 1 {
            self.keep_last_leg(member, &reason);
            return Ok(());
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        member.set_state(
            ReplicaState::Failed,
            generation,
            Some(format!(
                "{reason}; re-add it with `ditto replica readd {} {}` once the disk is back",
                self.name,
                short(member.id)
            )),
        );
        self.redirect_after_failure(member.id);
        self.emit(
            EventKind::ReplicaFailed,
            Some(member.backend.location().to_string()),
            format!(
                "replica on {} failed and left the volume ({reason}); {} of {} replicas in sync",
                member.label,
                self.in_sync().len(),
                self.member_list().len()
            ),
        );
        // A rebuilding member was never counted in sync, but the survivors
        // still record that it failed.
        self.persist_membership(false).await
    }

    /// The last in-sync replica erred: keep it, and say so.
    fn keep_last_leg(&self, member: &Member, reason: &str) {
        let why = format!(
            "last in-sync replica: {reason}; kept in service (failing it would stop all I/O), the request got the error"
        );
        // The same error again (a disk that keeps failing) is one event.
        if member.reason().as_deref() == Some(why.as_str()) {
            return;
        }
        tracing::error!(volume = %self.name, replica = %member.backend.location(), "{why}");
        member.set_reason(Some(why.clone()));
        self.emit(
            EventKind::LastReplicaError,
            Some(member.backend.location().to_string()),
            format!(
                "{why}. Check the disk; give the volume another replica with `ditto replica add {} --pool POOL` or `ditto replica readd`",
                self.name
            ),
        );
    }

    /// A resync source that failed is replaced by another in-sync replica,
    /// so reads of regions not yet resynced and the resync itself keep
    /// using one source. With one in-sync replica left it is the truth: the
    /// resync then only waits, region by region, for a copy in progress to
    /// end (the dirty map still covers the failed ones for their catch-up).
    fn redirect_after_failure(&self, failed: Uuid) {
        let Ok(guard) = self.redirect.read() else {
            return;
        };
        let Some(redirect) = guard.as_ref() else {
            return;
        };
        if redirect.source() == failed {
            if let Some(next) = self.in_sync().first() {
                redirect.set_source(next.id);
            }
        }
    }

    /// Write the current generation and replica set to every in-sync member;
    /// a member that cannot record it is failed too (and the loop repeats).
    /// When none can, the first is kept (the last leg) and the error returned.
    pub(crate) async fn persist_membership(&self, clean: bool) -> Result<(), EngineError> {
        loop {
            let members = self.in_sync();
            if members.is_empty() {
                return Err(self.no_replicas());
            }
            let generation = self.generation();
            let set: Vec<ReplicaSetEntry> = self
                .member_list()
                .iter()
                .map(|m| ReplicaSetEntry {
                    replica: m.id,
                    state: match m.state() {
                        ReplicaState::InSync => MemberState::InSync,
                        ReplicaState::Rebuilding => MemberState::Rebuilding,
                        _ => MemberState::Failed,
                    },
                    since_generation: u32::try_from(m.since.load(Ordering::Acquire))
                        .unwrap_or(u32::MAX),
                })
                .collect();
            let writes = members.iter().map(|m| {
                let mut sb = m.backend.superblock();
                sb.generation = generation;
                sb.epoch = sb.epoch.max(self.options.epoch);
                sb.clean = clean;
                sb.replica_set = set.clone();
                sb.rebuild_cursor = None;
                async move {
                    self.timed_write(m, move |b| async move { b.write_superblock(sb).await })
                        .await
                }
            });
            let results = join_all(writes).await;
            let mut recorded = false;
            let mut failed = Vec::new();
            for (m, r) in members.iter().zip(results) {
                match r {
                    Ok(()) => recorded = true,
                    Err(e) => failed.push((m.clone(), e)),
                }
            }
            if failed.is_empty() {
                self.record_membership(generation, &members).await;
                self.record_at_tiebreaker(generation, &members).await;
                self.durable_generation
                    .fetch_max(generation, Ordering::AcqRel);
                self.durable_changed.notify_waiters();
                return Ok(());
            }
            let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let mut keep = None;
            for (m, e) in failed {
                tracing::error!(volume = %self.name, replica = %m.backend.location(), error = %e, "cannot record membership");
                if !recorded && keep.is_none() {
                    keep = Some((m, e));
                    continue;
                }
                m.set_state(
                    ReplicaState::Failed,
                    g,
                    Some(format!("cannot record membership: {e}")),
                );
                self.redirect_after_failure(m.id);
                self.emit(
                    EventKind::ReplicaFailed,
                    Some(m.backend.location().to_string()),
                    format!("replica failed while recording membership: {e}"),
                );
            }
            if let Some((m, e)) = keep {
                // Not durable anywhere: requests wait for it and fail after
                // `io_timeout`; the background tick records it again.
                self.keep_last_leg(&m, &format!("cannot record membership: {e}"));
                return Err(EngineError::Backend(e));
            }
        }
    }

    /// Record the membership at the tiebreaker (if any), before the
    /// generation counts as durable: its vote then counts for requests at
    /// this generation. A voter that does not take it loses its vote.
    async fn record_at_tiebreaker(&self, generation: u64, in_sync: &[Arc<Member>]) {
        let Some(t) = &self.options.tiebreaker else {
            return;
        };
        let record = VoteRecord {
            epoch: self.options.epoch,
            generation,
            in_sync: in_sync.iter().map(|m| m.id).collect(),
        };
        let result = tokio::time::timeout(self.options.io_timeout, t.voter.record(record)).await;
        self.take_vote_result(t, generation, result);
    }

    /// What a record at the tiebreaker of `generation` answered: it votes
    /// from now on, or it lost its vote.
    fn take_vote_result(
        &self,
        t: &Tiebreaker,
        generation: u64,
        result: Result<Result<(), String>, tokio::time::error::Elapsed>,
    ) {
        match result {
            Ok(Ok(())) => {
                if self
                    .tiebreaker_generation
                    .swap(generation, Ordering::AcqRel)
                    == 0
                {
                    self.emit(
                        EventKind::TiebreakerVote,
                        None,
                        format!(
                            "tiebreaker {} recorded generation {generation} and votes",
                            t.voter.domain()
                        ),
                    );
                }
            }
            Ok(Err(why)) => self.lose_tiebreaker_vote(t.voter.domain(), &why),
            Err(_) => self.lose_tiebreaker_vote(
                t.voter.domain(),
                &format!("no answer within {:?}", self.options.io_timeout),
            ),
        }
    }

    fn lose_tiebreaker_vote(&self, node: &str, why: &str) {
        if self.tiebreaker_generation.swap(0, Ordering::AcqRel) != 0 {
            self.emit(
                EventKind::TiebreakerVote,
                None,
                format!("tiebreaker {node} did not record the membership ({why}); it does not vote until it does"),
            );
        }
    }

    /// Whether the tiebreaker's vote counts now: it holds the newest
    /// durable generation. (Not the newest in memory: while a change is
    /// being recorded, requests that depend on it wait for it to be
    /// durable, and its recording at the tiebreaker comes first, so the
    /// vote they see is for that change or lost; the others ran on the
    /// members of the older generation, which the tiebreaker holds. With
    /// the newest in memory, every change on one data node refused I/O
    /// for its recording's round trip.)
    pub fn tiebreaker_votes(&self) -> bool {
        let recorded = self.tiebreaker_generation.load(Ordering::Acquire);
        recorded != 0 && recorded >= self.durable_generation.load(Ordering::Acquire)
    }

    /// The tiebreaker's node, when the volume has one.
    pub fn tiebreaker(&self) -> Option<&str> {
        self.options.tiebreaker.as_ref().map(|t| t.voter.domain())
    }

    /// Record the current membership at the tiebreaker again: the node's
    /// heartbeat (every second or so). It wins a lost vote back once the
    /// tiebreaker answers, and loses it when the tiebreaker follows another
    /// primary now. Serialised with membership changes.
    pub async fn refresh_tiebreaker(&self) {
        let Some(t) = &self.options.tiebreaker else {
            return;
        };
        if self.is_closed() {
            return;
        }
        // The round trip runs outside the membership lock: a tiebreaker cut
        // off would otherwise hold every failure handling up for its timeout.
        let record = {
            let _guard = self.membership.lock().await;
            let generation = self.generation();
            if self.durable_generation.load(Ordering::Acquire) != generation {
                return; // a change is being recorded; it records there itself
            }
            VoteRecord {
                epoch: self.options.epoch,
                generation,
                in_sync: self.in_sync().iter().map(|m| m.id).collect(),
            }
        };
        let generation = record.generation;
        let result = tokio::time::timeout(self.options.io_timeout, t.voter.record(record)).await;
        let _guard = self.membership.lock().await;
        if self.generation() != generation {
            return; // a newer change recorded itself meanwhile (or lost the vote)
        }
        self.take_vote_result(t, generation, result);
    }

    /// Tell the node's log (if any) which replicas are in sync at `generation`.
    /// A log that cannot record it is reported, not fatal: the replicas'
    /// superblocks stay the authority, the log only judges a lone returner.
    async fn record_membership(&self, generation: u64, in_sync: &[Arc<Member>]) {
        let Some(log) = &self.options.membership_log else {
            return;
        };
        let known = KnownMembership {
            generation,
            in_sync: in_sync.iter().map(|m| m.id).collect(),
        };
        if let Err(e) = log.0.record(self.uuid, known).await {
            tracing::error!(volume = %self.name, error = %e, "cannot record the membership in the node's store; a replica returning alone could not be judged stale");
        }
    }

    /// A membership change that no replica could record is retried.
    async fn retry_membership_record(&self) {
        if self.durable_generation.load(Ordering::Acquire) >= self.generation() {
            return;
        }
        // At most once a second: each try may wait `io_timeout` on a disk.
        let now = self.now_ms();
        if now.saturating_sub(self.last_record_retry_ms.load(Ordering::Relaxed)) < 1000 {
            return;
        }
        self.last_record_retry_ms.store(now, Ordering::Relaxed);
        let _guard = self.membership.lock().await;
        if self.durable_generation.load(Ordering::Acquire) >= self.generation() {
            return;
        }
        if let Err(e) = self.persist_membership(false).await {
            tracing::warn!(volume = %self.name, error = %e, "membership still not recorded");
        }
    }

    /// Change membership under the membership lock, then record it with a new generation.
    pub(crate) async fn change_membership(
        &self,
        change: impl FnOnce(u64),
    ) -> Result<(), EngineError> {
        let _guard = self.membership.lock().await;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        change(generation);
        self.persist_membership(false).await
    }

    /// Count a rebuilt member as in sync, unless it failed (or was replaced)
    /// meanwhile: checked under the membership lock, where failures happen.
    pub(crate) async fn promote(&self, target: &Member) -> Result<bool, EngineError> {
        let _guard = self.membership.lock().await;
        let current = self
            .member(target.id)
            .is_some_and(|m| std::ptr::eq(Arc::as_ptr(&m), target));
        if !current || target.state() != ReplicaState::Rebuilding {
            return Ok(false);
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        target.set_state(ReplicaState::InSync, generation, None);
        self.persist_membership(false).await?;
        Ok(true)
    }

    /// Admit a client request unless the volume is closed; `close` waits
    /// for every admitted request.
    async fn enter_io(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, EngineError> {
        // Waits (suspend) outside the gate, so a close is never held up.
        while let Err(e) = self.check_quorum() {
            if self.is_closed() || self.options.quorum != Some(NoQuorum::Suspend) {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let guard = self.io_gate.read().await;
        if self.is_closed() {
            return Err(EngineError::Closed {
                volume: self.name.clone(),
            });
        }
        Ok(guard)
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        let _io = self.enter_io().await?;
        self.touch(false);
        self.resync_before_read(offset, len as u64).await;
        let mut tried: Vec<Uuid> = Vec::new();
        let mut hung: Vec<Arc<Member>> = Vec::new();
        let mut last_err = None;
        loop {
            let members: Vec<Arc<Member>> = self
                .in_sync()
                .into_iter()
                .filter(|m| !tried.contains(&m.id))
                .collect();
            let redirected = self.redirect_source(offset, len as u64, &members);
            let Some(member) = redirected.or_else(|| read_policy::choose(&members, offset)) else {
                return Err(last_err
                    .map(EngineError::Backend)
                    .unwrap_or_else(|| self.no_replicas()));
            };
            member.pending.fetch_add(1, Ordering::AcqRel);
            let r = self
                .timed(&member, move |b| async move { b.read(offset, len).await })
                .await;
            member.pending.fetch_sub(1, Ordering::AcqRel);
            member
                .next_offset
                .store(offset + len as u64, Ordering::Release);
            match r {
                Ok(data) => {
                    member.reads.fetch_add(1, Ordering::Relaxed);
                    // A replica that hangs is failed out (it would stall every
                    // read sent to it); one that returned an error is repaired
                    // in place, as md does.
                    for h in &hung {
                        let _ = self
                            .fail_member(
                                h,
                                format!(
                                    "reads did not answer within {} s",
                                    self.options.io_timeout.as_secs()
                                ),
                            )
                            .await;
                    }
                    let errored: Vec<Uuid> = tried
                        .iter()
                        .filter(|id| !hung.iter().any(|h| h.id == **id))
                        .copied()
                        .collect();
                    if !errored.is_empty() {
                        self.repair_after_read_error(&errored, offset, len).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    member.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, replica = %member.backend.location(), error = %e, "read failed, trying another replica");
                    tried.push(member.id);
                    if matches!(e, BackendError::Timeout { .. }) {
                        hung.push(member.clone());
                    }
                    last_err = Some(e);
                }
            }
        }
    }

    /// During a resync after a crash, regions not yet copied are read from the source only.
    fn redirect_source(
        &self,
        offset: u64,
        len: u64,
        members: &[Arc<Member>],
    ) -> Option<Arc<Member>> {
        let guard = self.redirect.read().ok()?;
        let redirect = guard.as_ref()?;
        if self
            .dirty
            .regions_of(offset, len)
            .any(|r| redirect.pending(r))
        {
            let source = redirect.source();
            return members.iter().find(|m| m.id == source).cloned();
        }
        None
    }

    /// After a read error was answered from another replica, write the good
    /// data back over the bad range (as md does); a replica that cannot take
    /// it is failed out. The range is held exclusively and read again: a
    /// client write may have landed since the read, and must not be undone.
    async fn repair_after_read_error(&self, bad: &[Uuid], offset: u64, len: usize) {
        let stripes = self.stripe_set(offset, len as u64);
        let _locks = self.lock_stripes_exclusive(&stripes).await;
        let mut good = None;
        for m in self.in_sync().into_iter().filter(|m| !bad.contains(&m.id)) {
            if let Ok(data) = self
                .timed(&m, move |b| async move { b.read(offset, len).await })
                .await
            {
                good = Some(data);
                break;
            }
        }
        let Some(data) = good else {
            return;
        };
        for m in self.in_sync().into_iter().filter(|m| bad.contains(&m.id)) {
            let data = data.clone();
            let r = self
                .timed_write(&m, move |b| async move { b.write(offset, data).await })
                .await;
            if let Err(e) = r {
                let _ = self
                    .fail_member(
                        &m,
                        format!("read error, and rewriting the region failed: {e}"),
                    )
                    .await;
            } else {
                self.emit(
                    EventKind::ReadErrorRepaired,
                    Some(m.backend.location().to_string()),
                    format!(
                        "read error at offset {offset} answered from another replica and rewritten"
                    ),
                );
            }
        }
    }

    async fn lock_stripes(
        &self,
        offset: u64,
        len: u64,
    ) -> Vec<tokio::sync::RwLockReadGuard<'_, ()>> {
        let mut guards = Vec::new();
        for s in self.stripe_set(offset, len) {
            guards.push(self.stripes[s].read().await);
        }
        guards
    }

    /// Common prologue of every modifying request: range check, admission,
    /// stripe locks, dirty bits.
    async fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuards<'_>, EngineError> {
        self.check_range(offset, len)?;
        let io = self.enter_io().await?;
        self.touch(true);
        let stripes = self.lock_stripes(offset, len).await;
        self.mark_dirty(offset, len).await?;
        Ok(WriteGuards {
            _io: io,
            _stripes: stripes,
        })
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let _guards = self.begin_write(offset, data.len() as u64).await?;
        self.fan_out("write failed", |m| {
            let data = data.clone();
            async move {
                self.timed_write(&m, move |b| async move {
                    b.write(offset, data).await?;
                    if fua {
                        b.flush().await?;
                    }
                    Ok(())
                })
                .await?;
                m.writes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
        // Not acknowledged if it reached only a minority: the other side
        // of the partition may take the volume over without it.
        self.check_quorum()
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        let _io = self.enter_io().await?;
        self.flush_all().await?;
        self.check_quorum()
    }

    /// Flush every in-sync and rebuilding replica.
    async fn flush_all(&self) -> Result<(), EngineError> {
        self.fan_out("flush failed", |m| async move {
            self.timed(&m, |b| async move { b.flush().await }).await
        })
        .await
    }

    /// Deallocate a range on every replica (it reads back as zeroes).
    pub async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.write_zeroes(offset, len, true, fua).await
    }

    /// Zero a range; `may_deallocate` lets replicas punch holes (stays sparse).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_deallocate: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        let _guards = self.begin_write(offset, len).await?;
        self.fan_out("zeroing failed", |m| async move {
            self.timed_write(&m, move |b| async move {
                if may_deallocate {
                    b.discard(offset, len).await?;
                } else {
                    b.write_zeroes(offset, len).await?;
                }
                if fua {
                    b.flush().await?;
                }
                Ok(())
            })
            .await
        })
        .await?;
        self.check_quorum()
    }

    /// Allocation of a range, from one in-sync replica.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, EngineError> {
        self.check_range(offset, len)?;
        let _io = self.enter_io().await?;
        let members = self.in_sync();
        let member = read_policy::choose(&members, offset).ok_or_else(|| self.no_replicas())?;
        Ok(self
            .timed(
                &member,
                move |b| async move { b.allocation(offset, len).await },
            )
            .await?)
    }

    /// True when zeroing by deallocation is a metadata operation on every
    /// replica a write goes to (in sync or rebuilding), so a WRITE_ZEROES
    /// that may deallocate is fast (NBD_CMD_FLAG_FAST_ZERO). False if any of
    /// them would fall back to writing zeroes, or when there is none.
    pub fn fast_zero(&self) -> bool {
        let members = self.with_state(&[ReplicaState::InSync, ReplicaState::Rebuilding]);
        !members.is_empty() && members.iter().all(|m| m.backend.fast_zero())
    }

    /// True when every member is in sync and no post-crash resync is pending:
    /// only then may dirty bits be forgotten.
    pub fn fully_reconciled(&self) -> bool {
        self.fully_redundant() && !self.resync_pending()
    }

    /// Regions may still differ between in-sync replicas after a crash.
    pub fn resync_pending(&self) -> bool {
        self.redirect.read().map_or(true, |r| r.is_some())
    }

    /// Most regions the sweeper lets stay dirty (see `VolumeOptions::hot_set_regions`).
    pub fn hot_set_limit(&self) -> u64 {
        self.options.hot_set_regions
    }

    /// Clear the bits of regions idle for `dirty_clear_delay`, and of the
    /// least recently written ones beyond the hot set, once every member is
    /// in sync and reconciled (md clears a bitmap chunk once it is idle and
    /// in sync everywhere; DRBD bounds its activity log the same way).
    pub(crate) async fn sweep_dirty_map(&self) {
        if self.dirty.dirty_count() == 0 || !self.fully_reconciled() {
            return;
        }
        let now = self.now_ms();
        let delay = self.options.dirty_clear_delay.as_millis() as u64;
        let mut dirty: Vec<(u64, u64)> = self
            .dirty
            .dirty_regions()
            .into_iter()
            .map(|r| (self.dirty.last_write_ms(r), r))
            .collect();
        dirty.sort_unstable();
        let over = (dirty.len() as u64).saturating_sub(self.options.hot_set_regions);
        let regions: Vec<u64> = dirty
            .iter()
            .enumerate()
            .filter(|(i, (last, _))| (*i as u64) < over || now.saturating_sub(*last) >= delay)
            .map(|(_, (_, r))| *r)
            .collect();
        if regions.is_empty() {
            return;
        }
        let Ok(_job) = self.job_lock.try_lock() else {
            return;
        };
        if let Err(e) = self.clear_regions(&regions).await {
            tracing::warn!(volume = %self.name, error = %e, "could not clear dirty bits");
        }
    }

    /// Flush every replica, then clear the bits of `regions` on every
    /// in-sync replica and in memory. Holds the regions' stripes, so no
    /// write into them runs meanwhile.
    async fn clear_regions(&self, regions: &[u64]) -> Result<(), EngineError> {
        let stripes = self.stripes_of(regions.iter().copied());
        let _locks = self.lock_stripes_exclusive(&stripes).await;
        let _persist = self.dirty.persist.lock().await;
        if !self.fully_reconciled() {
            return Ok(());
        }
        // Every write into these regions has completed; make them durable
        // everywhere before forgetting that they may differ.
        self.flush_all().await?;
        // A replica whose flush failed was failed out by it, and may lack
        // those writes: it needs every bit to catch up later.
        if !self.fully_reconciled() {
            return Ok(());
        }
        let blocks = self.dirty.blocks_without(regions);
        for m in self.in_sync() {
            for (first, data) in &blocks {
                let (first, data) = (*first, data.clone());
                if let Err(e) = self
                    .timed_write(
                        &m,
                        move |b| async move { b.write_dirty_map(first, data).await },
                    )
                    .await
                {
                    self.fail_member(&m, format!("cannot clear the dirty map: {e}"))
                        .await?;
                    // Replicas already cleared must carry the map again: the
                    // failed one needs every bit to catch up later.
                    self.rewrite_dirty_map().await?;
                    return Ok(());
                }
            }
        }
        self.dirty.clear_regions(regions);
        tracing::debug!(volume = %self.name, regions = regions.len(), "dirty bits cleared");
        Ok(())
    }

    /// Write the whole in-memory map to every in-sync replica (with the map's
    /// persist lock held), failing out those that cannot take it.
    async fn rewrite_dirty_map(&self) -> Result<(), EngineError> {
        let map = self.dirty.encoded();
        for m in self.in_sync() {
            let map = map.clone();
            if let Err(e) = self
                .timed_write(&m, move |b| async move { b.write_dirty_map(0, map).await })
                .await
            {
                self.fail_member(&m, format!("cannot restore the dirty map: {e}"))
                    .await?;
            }
        }
        if self.in_sync().is_empty() {
            return Err(self.no_replicas());
        }
        Ok(())
    }

    /// Stop taking I/O, wait for requests and jobs in flight, flush, and
    /// mark the in-sync replicas clean: the next start knows they are equal
    /// and needs no resync. The dirty map is kept while any member is out
    /// of sync, so it can still catch up later; and while a post-crash
    /// resync is unfinished the replicas are not clean, so it runs again.
    pub async fn close(&self) -> Result<(), EngineError> {
        self.closed.store(true, Ordering::Release);
        self.sweep.notify_waiters();
        let _quiesced = self.io_gate.write().await;
        let _job = self.job_lock.lock().await;
        if self.fully_reconciled() && self.dirty.dirty_count() > 0 {
            self.clear_regions(&self.dirty.dirty_regions()).await?;
        } else {
            self.flush_all().await?;
        }
        let _guard = self.membership.lock().await;
        let recorded = self.persist_membership(!self.resync_pending()).await;
        // Operations given up at a timeout may still land; give them the
        // same time again, so a new instance on these files starts after
        // them (the node refuses to start one while any is pending).
        for m in self.member_list().iter() {
            m.drain(self.options.io_timeout).await;
        }
        recorded
    }

    /// Operations given up at a timeout, on any member, not yet completed.
    pub fn abandoned_ops(&self) -> usize {
        self.member_list().iter().map(|m| m.abandoned_ops()).sum()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// What a modifying request holds while it runs.
struct WriteGuards<'a> {
    _io: tokio::sync::RwLockReadGuard<'a, ()>,
    _stripes: Vec<tokio::sync::RwLockReadGuard<'a, ()>>,
}

/// First 8 hex digits of a replica id, as the CLI shows it.
pub fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

fn missing_reason(m: &Member) -> String {
    m.backend
        .unavailable()
        .unwrap_or_else(|| m.backend.location().to_string())
}
