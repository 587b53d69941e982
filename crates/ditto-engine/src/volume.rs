//! The mirror: one volume over several replicas.
//!
//! Writes fan out to every in-sync (and rebuilding) replica and complete only
//! when all of them did; a replica that fails is taken out of the in-sync set,
//! and the new generation is recorded on the survivors *before* the write is
//! acknowledged. Before the first write into a region, its dirty-map bit is
//! made durable. Reads go to one in-sync replica chosen by
//! [`crate::read_policy`], and fall back to the others on error. Long jobs
//! (resync, rebuild, scrub) live in [`crate::jobs`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ditto_format::{Layout, MemberState, ReplicaSetEntry, Superblock};
use futures::future::join_all;
use uuid::Uuid;

use crate::backend::{BackendError, ReplicaBackend};
use crate::dirty::DirtyMap;
use crate::events::{Event, EventKind, SharedSink};
use crate::io::Allocation;
use crate::jobs::{JobProgress, ResyncRedirect, ScrubReport};
use crate::read_policy;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {volume}: no in-sync replica is left; I/O is refused so nothing pretends to succeed. Check `ditto status {volume}`")]
    NoReplicas { volume: String },
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
        self.state.store(state as u8, Ordering::Release);
        self.since.store(since, Ordering::Release);
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
            reason: self.reason.lock().ok().and_then(|r| r.clone()),
            generation: sb.generation,
            data_offset: sb.layout.data_offset,
            pending: self.pending.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
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
    /// Dirty bits are cleared once the volume has had no write for this long.
    pub dirty_clear_delay: Duration,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_timeout: Duration::from_secs(30),
            resync_min_rate: 10 << 20,
            resync_max_rate: 1 << 30,
            dirty_clear_delay: Duration::from_secs(5),
        }
    }
}

const STRIPES: usize = 64;

/// A mirrored volume.
pub struct Volume {
    name: String,
    uuid: Uuid,
    size: u64,
    pub(crate) layout: Layout,
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    generation: AtomicU64,
    /// Serialises membership changes (and the superblock writes recording them).
    membership: tokio::sync::Mutex<()>,
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
    pub(crate) job: Mutex<Option<JobProgress>>,
    pub(crate) last_scrub: Mutex<Option<ScrubReport>>,
    /// Bytes copied by resync and rebuild since the volume started.
    pub(crate) copied_bytes: AtomicU64,
    pub(crate) closed: AtomicBool,
}

fn self_in_sync(sb: &Superblock) -> bool {
    sb.replica_set.is_empty() || is_in_sync(sb, sb.replica_uuid)
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
        let present: Vec<&Member> = members.iter().filter(|m| m.backend.is_present()).collect();
        let mut generation = 0;
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
                if excludes(&sa, b.id) && excludes(&sbb, a.id) {
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
        // Current: newest generation, in sync by its own record, and not
        // excluded by another current replica.
        let candidates: Vec<Superblock> = present
            .iter()
            .map(|m| m.backend.superblock())
            .filter(|sb| sb.generation == generation && self_in_sync(sb))
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
        let Some(view) = current.first().cloned() else {
            return Err(EngineError::Refused {
                volume: name,
                why: "no replica is current (every replica present is stale or being rebuilt)"
                    .into(),
            });
        };
        let mut stale_events = Vec::new();
        for m in &members {
            let since = view
                .replica_set
                .iter()
                .find(|e| e.replica == m.id)
                .map_or(generation, |e| u64::from(e.since_generation));
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
            job: Mutex::new(None),
            last_scrub: Mutex::new(None),
            copied_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        for (replica, message) in stale_events {
            volume.emit(EventKind::StaleReplicaRefused, Some(replica), message);
        }
        let unclean = volume.assemble(&view).await?;
        volume.clone().start_background(unclean);
        Ok(volume)
    }

    /// Load the dirty map, record the membership, announce the start.
    async fn assemble(&self, view: &Superblock) -> Result<bool, EngineError> {
        let _guard = self.membership.lock().await;
        let mut unclean = false;
        for m in self.with_state(&[ReplicaState::InSync]) {
            let sb = m.backend.superblock();
            unclean |= !sb.clean;
            match self.timed(&m, m.backend.read_dirty_map()).await {
                Ok(map) => self.dirty.load(&map),
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
        let changed = self.member_list().iter().any(|m| {
            (m.state() == ReplicaState::InSync) != is_in_sync(view, m.id)
                && !view.replica_set.is_empty()
        });
        if changed {
            let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            for m in self.member_list().iter() {
                if (m.state() == ReplicaState::InSync) != is_in_sync(view, m.id) {
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
                    let Some(cursor) = m.backend.superblock().rebuild_cursor else {
                        let _ = v.clone().catch_up(m).await;
                        continue;
                    };
                    // A crash may have left unacknowledged writes below the cursor.
                    let first_dirty = v
                        .dirty
                        .dirty_regions()
                        .first()
                        .map_or(u64::MAX, |r| r * v.dirty.region_size());
                    let _ = v.clone().rebuild(m, cursor.min(first_dirty)).await;
                }
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(v) = weak.upgrade() else { return };
                if v.closed.load(Ordering::Acquire) {
                    return;
                }
                v.maybe_clear_dirty_map().await;
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

    pub(crate) fn in_sync(&self) -> Vec<Arc<Member>> {
        self.with_state(&[ReplicaState::InSync])
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

    pub(crate) async fn timed<T>(
        &self,
        member: &Member,
        fut: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.options.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout {
                location: member.backend.location().to_string(),
                seconds: self.options.io_timeout.as_secs(),
            }),
        }
    }

    fn stripe_set(&self, offset: u64, len: u64) -> Vec<usize> {
        let mut s: Vec<usize> = self
            .dirty
            .regions_of(offset, len)
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

    /// Make the dirty bits of `[offset, offset+len)` durable on every in-sync replica.
    async fn mark_dirty(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let regions = self.dirty.regions_of(offset, len);
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
                    self.timed(m, m.backend.write_dirty_map(first, data))
                        .await?;
                }
                Ok::<(), BackendError>(())
            }
        });
        let results = join_all(writes).await;
        for (m, r) in members.iter().zip(results) {
            if let Err(e) = r {
                self.fail_member(m, format!("cannot record the dirty map: {e}"))
                    .await?;
            }
        }
        if self.in_sync().is_empty() {
            return Err(self.no_replicas());
        }
        self.dirty.commit(&newly);
        Ok(())
    }

    /// Run `op` on every in-sync and rebuilding replica; fail out those that
    /// error. Succeeds when at least one in-sync replica completed and the
    /// failures are durably recorded.
    async fn fan_out<'a, F, Fut>(&'a self, op: F) -> Result<(), EngineError>
    where
        F: Fn(Arc<Member>) -> Fut,
        Fut: std::future::Future<Output = Result<(), BackendError>> + 'a,
    {
        let members = self.with_state(&[ReplicaState::InSync, ReplicaState::Rebuilding]);
        if !members.iter().any(|m| m.state() == ReplicaState::InSync) {
            return Err(self.no_replicas());
        }
        let results = join_all(members.iter().map(|m| op(m.clone()))).await;
        for (m, r) in members.iter().zip(results) {
            if let Err(e) = r {
                m.errors.fetch_add(1, Ordering::Relaxed);
                self.fail_member(m, e.to_string()).await?;
            }
        }
        if self.in_sync().is_empty() {
            return Err(self.no_replicas());
        }
        Ok(())
    }

    /// Take a member out of the set and record the new generation on the
    /// survivors. Returns only when that record is durable (or no survivor is left).
    pub async fn fail_member(&self, member: &Member, reason: String) -> Result<(), EngineError> {
        let _guard = self.membership.lock().await;
        let was = member.state();
        if was != ReplicaState::InSync && was != ReplicaState::Rebuilding {
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

    /// Write the current generation and replica set to every in-sync member;
    /// a member that cannot record it is failed too (and the loop repeats).
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
                sb.clean = clean;
                sb.replica_set = set.clone();
                sb.rebuild_cursor = None;
                async move { self.timed(m, m.backend.write_superblock(sb)).await }
            });
            let results = join_all(writes).await;
            let mut failed_any = false;
            for (m, r) in members.iter().zip(results) {
                if let Err(e) = r {
                    tracing::error!(volume = %self.name, replica = %m.backend.location(), error = %e, "cannot record membership");
                    let g = self.generation() + 1;
                    m.set_state(
                        ReplicaState::Failed,
                        g,
                        Some(format!("cannot record membership: {e}")),
                    );
                    self.emit(
                        EventKind::ReplicaFailed,
                        Some(m.backend.location().to_string()),
                        format!("replica failed while recording membership: {e}"),
                    );
                    failed_any = true;
                }
            }
            if !failed_any {
                return Ok(());
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
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

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        self.touch(false);
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
            let r = self.timed(&member, member.backend.read(offset, len)).await;
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
                        self.repair_after_read_error(&errored, offset, &data).await;
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
            return members.iter().find(|m| m.id == redirect.source).cloned();
        }
        None
    }

    /// After a read error was answered from another replica, write the good
    /// data back over the bad region (as md does); a replica that cannot take
    /// it is failed out.
    async fn repair_after_read_error(&self, bad: &[Uuid], offset: u64, data: &Bytes) {
        let _stripes = self.lock_stripes(offset, data.len() as u64).await;
        for m in self.in_sync().into_iter().filter(|m| bad.contains(&m.id)) {
            let r = self.timed(&m, m.backend.write(offset, data.clone())).await;
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

    /// Common prologue of every modifying request: range check, stripe locks, dirty bits.
    async fn begin_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<tokio::sync::RwLockReadGuard<'_, ()>>, EngineError> {
        self.check_range(offset, len)?;
        self.touch(true);
        let guards = self.lock_stripes(offset, len).await;
        self.mark_dirty(offset, len).await?;
        Ok(guards)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let _stripes = self.begin_write(offset, data.len() as u64).await?;
        self.fan_out(|m| {
            let data = data.clone();
            async move {
                self.timed(&m, async {
                    m.backend.write(offset, data).await?;
                    if fua {
                        m.backend.flush().await?;
                    }
                    m.writes.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
                .await
            }
        })
        .await
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.fan_out(|m| async move { self.timed(&m, m.backend.flush()).await })
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
        let _stripes = self.begin_write(offset, len).await?;
        self.fan_out(|m| async move {
            self.timed(&m, async {
                if may_deallocate {
                    m.backend.discard(offset, len).await?;
                } else {
                    m.backend.write_zeroes(offset, len).await?;
                }
                if fua {
                    m.backend.flush().await?;
                }
                Ok(())
            })
            .await
        })
        .await
    }

    /// Allocation of a range, from one in-sync replica.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Allocation>, EngineError> {
        self.check_range(offset, len)?;
        let members = self.in_sync();
        let member = read_policy::choose(&members, offset).ok_or_else(|| self.no_replicas())?;
        Ok(self
            .timed(&member, member.backend.allocation(offset, len))
            .await?)
    }

    /// Clear the dirty map once every member is in sync and writes have been
    /// idle for `dirty_clear_delay` (md clears bits a few seconds after a
    /// region is in sync everywhere). Never while any member is missing,
    /// failed, stale or rebuilding: their catch-up depends on these bits.
    pub(crate) async fn maybe_clear_dirty_map(&self) {
        let idle = self
            .now_ms()
            .saturating_sub(self.last_write_ms.load(Ordering::Relaxed));
        if self.dirty.dirty_count() == 0
            || idle < self.options.dirty_clear_delay.as_millis() as u64
            || !self.fully_redundant()
        {
            return;
        }
        let Ok(_job) = self.job_lock.try_lock() else {
            return;
        };
        if let Err(e) = self.clear_dirty_map().await {
            tracing::warn!(volume = %self.name, error = %e, "could not clear the dirty map");
        }
    }

    async fn clear_dirty_map(&self) -> Result<(), EngineError> {
        let mut guards = Vec::with_capacity(STRIPES);
        for s in &self.stripes {
            guards.push(s.write().await);
        }
        let _persist = self.dirty.persist.lock().await;
        if !self.fully_redundant() {
            return Ok(());
        }
        // Every write so far is complete; make it durable everywhere before forgetting it.
        self.fan_out(|m| async move { self.timed(&m, m.backend.flush()).await })
            .await?;
        let blocks = self.dirty.clearing_blocks();
        for m in self.in_sync() {
            for (first, data) in &blocks {
                if let Err(e) = self
                    .timed(&m, m.backend.write_dirty_map(*first, data.clone()))
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
        self.dirty.clear();
        tracing::debug!(volume = %self.name, "dirty map cleared");
        Ok(())
    }

    /// Write the whole in-memory map to every in-sync replica (with the map's
    /// persist lock held), failing out those that cannot take it.
    async fn rewrite_dirty_map(&self) -> Result<(), EngineError> {
        let map = self.dirty.encoded();
        for m in self.in_sync() {
            if let Err(e) = self
                .timed(&m, m.backend.write_dirty_map(0, map.clone()))
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

    /// Flush everything and mark the in-sync replicas clean: the next start
    /// knows they are equal and needs no resync. The dirty map is kept while
    /// any member is out of sync, so it can still catch up later.
    pub async fn close(&self) -> Result<(), EngineError> {
        self.closed.store(true, Ordering::Release);
        let _job = self.job_lock.lock().await;
        if self.fully_redundant() && self.dirty.dirty_count() > 0 {
            self.clear_dirty_map().await?;
        } else {
            self.flush().await?;
        }
        let _guard = self.membership.lock().await;
        self.persist_membership(true).await
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
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
