//! Long volume jobs: resync after a crash, catch-up of a re-added replica,
//! full rebuild of a new one, and scrub — all throttled and reporting progress.
//!
//! Every copy holds the region's stripe lock exclusively while it reads the
//! source and writes the target, so a client write can never land between the
//! two and be overwritten by older data.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

// tokio's clock: the real one in the daemon, the simulated one under ditto-sim.
use tokio::time::Instant;

use bytes::Bytes;
use uuid::Uuid;

use crate::backend::{now_unix, BackendError, ReplicaBackend};
use crate::events::EventKind;
use crate::volume::{short, EngineError, Member, ReplicaState, Volume};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Copy dirty regions between in-sync replicas after an unclean shutdown.
    Resync,
    /// Copy the regions a re-added replica missed (from the dirty map).
    CatchUp,
    /// Copy every allocated region to a new replica.
    Rebuild,
    /// Compare replicas region by region.
    Scrub,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Resync => "resync",
            JobKind::CatchUp => "catch_up",
            JobKind::Rebuild => "rebuild",
            JobKind::Scrub => "scrub",
        }
    }
}

/// Progress of the running (or last) job, for status.
#[derive(Debug, Clone, PartialEq)]
pub struct JobProgress {
    pub kind: JobKind,
    /// Target replica (resync/catch-up/rebuild).
    pub replica: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started_unix: u64,
    pub elapsed_secs: f64,
    /// Average rate since the start, bytes/s.
    pub rate_bytes_per_sec: u64,
    /// Estimated seconds left at the current rate; never negative, None when unknown.
    pub eta_secs: Option<u64>,
    pub finished: bool,
    pub error: Option<String>,
}

/// Result of the last scrub.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrubReport {
    pub started_unix: u64,
    pub duration_secs: f64,
    pub bytes: u64,
    /// Byte offsets of the regions whose replicas differ.
    pub mismatched_regions: Vec<u64>,
    pub repaired: u64,
    pub repair: bool,
    pub source: Option<String>,
    pub finished: bool,
    pub error: Option<String>,
}

/// Regions still to be resynced after a crash, and the replica to read them
/// from (replaced by another in-sync replica if it fails).
pub struct ResyncRedirect {
    source: std::sync::Mutex<Uuid>,
    pending: Vec<AtomicU8>,
}

impl ResyncRedirect {
    fn new(source: Uuid, regions: &[u64], total: u64) -> Self {
        let pending: Vec<AtomicU8> = (0..total.div_ceil(8)).map(|_| AtomicU8::new(0)).collect();
        for r in regions {
            if let Some(b) = pending.get((r / 8) as usize) {
                b.fetch_or(1 << (r % 8), Ordering::SeqCst);
            }
        }
        ResyncRedirect {
            source: std::sync::Mutex::new(source),
            pending,
        }
    }

    pub fn source(&self) -> Uuid {
        match self.source.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        }
    }

    pub(crate) fn set_source(&self, id: Uuid) {
        match self.source.lock() {
            Ok(mut s) => *s = id,
            Err(p) => *p.into_inner() = id,
        }
    }

    pub fn pending(&self, r: u64) -> bool {
        self.pending
            .get((r / 8) as usize)
            .is_some_and(|b| b.load(Ordering::SeqCst) & (1 << (r % 8)) != 0)
    }

    fn done(&self, r: u64) {
        if let Some(b) = self.pending.get((r / 8) as usize) {
            b.fetch_and(!(1 << (r % 8)), Ordering::SeqCst);
        }
    }
}

/// Paces a job between the min rate (clients busy) and the max rate (clients idle).
/// Regions a copy job keeps in flight: enough that the source's reads and
/// the target's writes overlap (a strictly serial copy ran at 0.4x of a raw
/// sequential copy, see BENCHMARKS.md), bounded to ~8 MiB of buffers.
fn copy_window(region_size: u64) -> usize {
    (8u64 << 20)
        .checked_div(region_size)
        .unwrap_or(1)
        .clamp(1, 8) as usize
}

struct Pacer {
    start: Instant,
    budget_secs: f64,
}

impl Pacer {
    fn new() -> Self {
        Pacer {
            start: Instant::now(),
            budget_secs: 0.0,
        }
    }

    async fn account(&mut self, v: &Volume, bytes: u64) {
        let busy = v.idle_ms() < 200;
        let rate = if busy {
            v.options.resync_min_rate
        } else {
            v.options.resync_max_rate
        }
        .max(1);
        self.budget_secs += bytes as f64 / rate as f64;
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.budget_secs > elapsed {
            // In slices, so a stop does not wait for a slow job's pause.
            let until =
                Instant::now() + Duration::from_secs_f64((self.budget_secs - elapsed).min(5.0));
            while !v.is_closed() && Instant::now() < until {
                tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(50))).await;
            }
        } else if elapsed - self.budget_secs > 1.0 {
            // Do not bank more than a second of unused budget (no burst after a slow phase).
            self.budget_secs = elapsed - 1.0;
        }
    }
}

struct Tracker {
    kind: JobKind,
    replica: Option<String>,
    total: u64,
    done: u64,
    started: Instant,
    started_unix: u64,
    last_event: Instant,
    last_decile: u64,
    /// The volume's skipped-bytes count when the job began (`resync_checksums`).
    skipped_at_start: u64,
}

impl Tracker {
    fn new(v: &Volume, kind: JobKind, replica: Option<String>, total: u64) -> Self {
        let t = Tracker {
            kind,
            replica,
            total,
            done: 0,
            started: Instant::now(),
            started_unix: now_unix(),
            last_event: Instant::now(),
            last_decile: 0,
            skipped_at_start: v.skipped_bytes(),
        };
        t.publish(v, false, None);
        t
    }

    fn progress(&self, finished: bool, error: Option<String>) -> JobProgress {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            (self.done as f64 / elapsed) as u64
        } else {
            0
        };
        let left = self.total.saturating_sub(self.done);
        JobProgress {
            kind: self.kind,
            replica: self.replica.clone(),
            done_bytes: self.done,
            total_bytes: self.total,
            started_unix: self.started_unix,
            elapsed_secs: elapsed,
            rate_bytes_per_sec: rate,
            eta_secs: if finished {
                Some(0)
            } else {
                left.checked_div(rate)
            },
            finished,
            error,
        }
    }

    fn publish(&self, v: &Volume, finished: bool, error: Option<String>) {
        if let Ok(mut j) = v.job.lock() {
            *j = Some(self.progress(finished, error));
        }
    }

    fn add(&mut self, v: &Volume, bytes: u64, progress_kind: EventKind) {
        self.done += bytes;
        self.publish(v, false, None);
        let decile = (self.done * 10).checked_div(self.total).unwrap_or(10);
        if decile > self.last_decile || self.last_event.elapsed() > Duration::from_secs(10) {
            self.last_decile = decile;
            self.last_event = Instant::now();
            let p = self.progress(false, None);
            v.emit_progress(
                progress_kind,
                self.replica.clone(),
                format!(
                    "{} {}% ({} of {} bytes, {} MiB/s, {} left)",
                    self.kind.as_str(),
                    (self.done * 100).checked_div(self.total).unwrap_or(100),
                    self.done,
                    self.total,
                    p.rate_bytes_per_sec >> 20,
                    p.eta_secs.map_or("unknown".into(), |s| format!("{s}s"))
                ),
                Some((self.done, self.total)),
            );
        }
    }
}

impl Volume {
    /// Show a job as queued right away, so `status` and `volume wait` never
    /// see the previous job's result while the new one waits for its turn.
    pub(crate) fn queue_job(&self, kind: JobKind, replica: Option<String>) {
        if let Ok(mut j) = self.job.lock() {
            *j = Some(JobProgress {
                kind,
                replica,
                done_bytes: 0,
                total_bytes: 0,
                started_unix: now_unix(),
                elapsed_secs: 0.0,
                rate_bytes_per_sec: 0,
                eta_secs: None,
                finished: false,
                error: None,
            });
        }
    }

    /// Copy one region from `source` to `targets` under its stripe lock.
    /// Holes on the source are deallocated on the targets too: a target may
    /// hold old data there (a reused device, a discarded split-brain side, an
    /// interrupted catch-up), and a hole must read back as zeroes everywhere.
    /// Returns bytes of data copied.
    async fn copy_region(
        &self,
        region: u64,
        source: &Member,
        targets: &[Arc<Member>],
    ) -> Result<u64, CopyError> {
        let range = self.dirty.region_range(region);
        let _lock = self.lock_region(region).await;
        if source.state() != ReplicaState::InSync {
            return Err(CopyError::SourceLeft);
        }
        // A write given up at a timeout may still land on the source; what
        // is read before it lands would differ from the source after.
        if source.abandoned_ops() > 0 && !source.drain(self.options.io_timeout).await {
            return Err(CopyError::Source(BackendError::Abandoned {
                location: source.backend.location().to_string(),
                pending: source.abandoned_ops(),
            }));
        }
        let (start, len) = (range.start, range.end - range.start);
        let runs = self
            .timed(
                source,
                move |b| async move { b.allocation(start, len).await },
            )
            .await
            .map_err(CopyError::Source)?;
        let mut copied = 0;
        let mut skipped = 0;
        for run in runs {
            let data = if run.allocated {
                Some(
                    self.timed(source, move |b| async move {
                        b.read(run.offset, run.length as usize).await
                    })
                    .await
                    .map_err(CopyError::Source)?,
                )
            } else {
                None
            };
            let (mut sent, mut held_already) = (false, false);
            for t in targets {
                if t.state() != ReplicaState::InSync && t.state() != ReplicaState::Rebuilding {
                    continue;
                }
                // Under the region's lock no write lands meanwhile, so what
                // the target holds now is what it keeps.
                if let (true, Some(d)) = (self.options.resync_checksums, data.clone()) {
                    let held = self
                        .timed(t, move |b| async move { b.holds(run.offset, d).await })
                        .await
                        .map_err(|e| CopyError::Target(t.id, e))?;
                    if held {
                        held_already = true;
                        continue;
                    }
                }
                sent = true;
                let data = data.clone();
                let r = self
                    .timed_write(t, move |b| async move {
                        match data {
                            Some(d) => b.write(run.offset, d).await,
                            None => b.discard(run.offset, run.length).await,
                        }
                    })
                    .await;
                if let Err(e) = r {
                    return Err(CopyError::Target(t.id, e));
                }
            }
            if data.is_some() {
                if held_already && !sent {
                    skipped += run.length;
                } else {
                    copied += run.length;
                }
            }
        }
        self.copied_bytes.fetch_add(copied, Ordering::Relaxed);
        self.skipped_bytes.fetch_add(skipped, Ordering::Relaxed);
        Ok(copied)
    }

    /// The replica to copy `region` from: while a post-crash resync has
    /// not reached it, only the resync source holds the version reads see.
    fn pick_source(&self, region: u64, exclude: &[Uuid]) -> Option<Arc<Member>> {
        let in_sync = self.in_sync();
        let redirected = self
            .redirect
            .read()
            .ok()
            .and_then(|r| r.as_ref().filter(|r| r.pending(region)).map(|r| r.source()));
        if let Some(source) = redirected {
            return in_sync.into_iter().find(|m| m.id == source);
        }
        in_sync.into_iter().find(|m| !exclude.contains(&m.id))
    }

    /// After an unclean shutdown: make the in-sync replicas equal again in
    /// the dirty regions, reading those from one source meanwhile.
    /// Before the volume serves anything after an unclean shutdown: route
    /// reads of dirty regions to one source until they are copied. Returns
    /// false when there is nothing to resync.
    pub(crate) fn prepare_resync(&self) -> bool {
        let regions = self.dirty.dirty_regions();
        let in_sync = self.in_sync();
        let Some(source) = in_sync.first() else {
            return false;
        };
        if in_sync.len() < 2 || regions.is_empty() {
            return false;
        }
        let redirect = Arc::new(ResyncRedirect::new(
            source.id,
            &regions,
            self.dirty.regions(),
        ));
        if let Ok(mut r) = self.redirect.write() {
            *r = Some(redirect);
        }
        self.queue_job(JobKind::Resync, None);
        true
    }

    pub(crate) async fn resync_after_crash(self: Arc<Self>) {
        let _job = self.job_lock.lock().await;
        // Queued behind a close: the replicas are closed, touch nothing.
        if self.is_closed() {
            return;
        }
        let Some(redirect) = self.redirect.read().ok().and_then(|r| r.clone()) else {
            return;
        };
        let regions: Vec<u64> = (0..self.dirty.regions())
            .filter(|r| redirect.pending(*r))
            .collect();
        let total = regions.len() as u64 * self.dirty.region_size();
        self.emit(
            EventKind::ResyncStarted,
            None,
            format!(
                "unclean shutdown: resyncing {} dirty regions ({total} bytes) from {}",
                regions.len(),
                self.member(redirect.source())
                    .map_or_else(|| short(redirect.source()), |m| m.label.clone())
            ),
        );
        let mut tracker = Tracker::new(&self, JobKind::Resync, None, total);
        let mut pacer = Pacer::new();
        let mut error = None;
        for r in regions {
            if self.is_closed() {
                error = Some("stopped; it resumes when the volume starts again".to_string());
                break;
            }
            match self.resync_region(r, &redirect).await {
                Ok(()) => redirect.done(r),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            let len = self.dirty.region_size();
            tracker.add(&self, len, EventKind::ResyncProgress);
            pacer.account(&self, len).await;
        }
        if error.is_none() {
            if let Ok(mut r) = self.redirect.write() {
                *r = None;
            }
        }
        tracker.publish(&self, true, error.clone());
        self.emit(
            EventKind::ResyncFinished,
            None,
            match &error {
                None => format!(
                    "resync finished: {} bytes in {:.1}s",
                    tracker.done,
                    tracker.started.elapsed().as_secs_f64()
                ),
                Some(e) => format!("resync did not finish: {e}"),
            },
        );
    }

    /// Before a read of regions a post-crash resync has not reached, copy
    /// them now. What the read returns is then on every in-sync replica: if
    /// the source fails later, its successor cannot hand out an older
    /// version of what a client has already seen. If the copy cannot be
    /// made, the read still goes to the source (see `redirect_source`).
    pub(crate) async fn resync_before_read(&self, offset: u64, len: u64) {
        let Some(redirect) = self.redirect.read().ok().and_then(|r| r.clone()) else {
            return;
        };
        for r in self.dirty.regions_of(offset, len) {
            if redirect.pending(r) && self.resync_region(r, &redirect).await.is_ok() {
                redirect.done(r);
            }
        }
    }

    /// Copy one region from the resync source to every other in-sync
    /// replica. A failed target is failed out and the region copied again
    /// to the rest; a failed source is replaced (see
    /// `Volume::redirect_after_failure`) and the region copied from the new
    /// one. Done when fewer than two in-sync replicas are left.
    async fn resync_region(&self, region: u64, redirect: &ResyncRedirect) -> Result<(), String> {
        loop {
            // Copied meanwhile by a read (`resync_before_read`) or the job.
            if !redirect.pending(region) {
                return Ok(());
            }
            let Some(source) = self
                .member(redirect.source())
                .filter(|m| m.state() == ReplicaState::InSync)
            else {
                return Err("the resync source left and no other in-sync replica took over".into());
            };
            let targets: Vec<Arc<Member>> = self
                .in_sync()
                .into_iter()
                .filter(|m| m.id != source.id)
                .collect();
            if targets.is_empty() {
                // One replica left: nothing to copy, but a copy to it from a
                // source that failed since may still be writing the region;
                // it ends before anyone reads the region from this one.
                drop(self.lock_region(region).await);
                return Ok(());
            }
            match self.copy_region(region, &source, &targets).await {
                Ok(_) => return Ok(()),
                Err(CopyError::Target(id, e)) => {
                    let Some(m) = self.member(id) else {
                        return Err(format!("a resync target vanished: {e}"));
                    };
                    let _ = self
                        .fail_member(&m, format!("resync write failed: {e}"))
                        .await;
                    if m.state() == ReplicaState::InSync {
                        return Err(format!("a resync target could not be failed out: {e}"));
                    }
                }
                Err(CopyError::Source(e)) => {
                    let _ = self
                        .fail_member(&source, format!("resync read failed: {e}"))
                        .await;
                    if source.state() == ReplicaState::InSync {
                        return Err(format!("reading the resync source failed: {e}"));
                    }
                }
                Err(CopyError::SourceLeft) => {}
            }
        }
    }

    /// Bring a replica that left back: copy only the regions written since
    /// it left when its generation proves the dirty map covers the gap,
    /// otherwise rebuild it fully. Runs in the background; returns once started.
    /// `force_full` (the operator chose another replica in a split brain)
    /// skips the divergence check and always rebuilds fully.
    pub async fn readd(
        self: &Arc<Self>,
        id: Uuid,
        backend: Arc<dyn ReplicaBackend>,
        force_full: bool,
    ) -> Result<ReaddPlan, EngineError> {
        self.refuse_if_closed()?;
        let _reconfigure = self.reconfigure.lock().await;
        let member = self.member(id).ok_or_else(|| EngineError::Refused {
            volume: self.name().to_string(),
            why: format!(
                "replica {} is not a member; add a new one with `ditto replica add`",
                short(id)
            ),
        })?;
        match member.state() {
            ReplicaState::InSync | ReplicaState::Rebuilding => {
                return Err(EngineError::Refused {
                    volume: self.name().to_string(),
                    why: format!(
                        "replica {} is already {}",
                        short(id),
                        member.state().as_str()
                    ),
                })
            }
            _ => {}
        }
        // Writes given up at a timeout may still land on the disk; re-admitted
        // now, one could land over a newer write (the kernel still holds it).
        if member.abandoned_ops() > 0 {
            return Err(EngineError::Refused {
                volume: self.name().to_string(),
                why: format!(
                    "replica {} still has {} operation(s) in flight from before it was failed (its disk hung); re-adding it now could let them land over newer data. Wait until the disk answers or is gone, then retry",
                    short(id),
                    member.abandoned_ops()
                ),
            });
        }
        let sb = backend.superblock();
        if sb.volume_uuid != self.uuid() || sb.replica_uuid != id {
            return Err(EngineError::ReplicaMismatch {
                volume: self.name().to_string(),
                replica: backend.location().to_string(),
                why: "its superblock names another volume or replica".into(),
            });
        }
        // It went on without the current replicas: a split brain, never
        // merged silently. (Not one stopped mid-rebuild or stale by its own
        // record: it never served as current; it is rebuilt below.)
        if !force_full
            && crate::volume::could_be_current(&sb)
            && self.in_sync().iter().any(|m| {
                sb.replica_set
                    .iter()
                    .any(|e| e.replica == m.id && e.state != ditto_format::MemberState::InSync)
            })
            && sb.generation >= member_since(&member)
        {
            return Err(EngineError::SplitBrain {
                volume: self.name().to_string(),
                a: backend.location().to_string(),
                b: self
                    .in_sync()
                    .first()
                    .map(|m| m.backend.location().to_string())
                    .unwrap_or_default(),
            });
        }
        let since = member_since(&member);
        // A replica whose rebuild did not finish holds a cursor: the dirty
        // map never covered what it lacks, so it is rebuilt (from the cursor).
        // A replica of an older primary's epoch that moved on after it left
        // holds writes no dirty map here covers.
        let went_on_under_older_primary = sb.epoch < self.options.epoch && sb.generation >= since;
        let covered = !force_full
            && !went_on_under_older_primary
            && sb.rebuild_cursor.is_none()
            && sb.generation + 1 >= since
            && sb.generation <= self.generation()
            && since > 0;
        let resume_at = match sb.rebuild_cursor {
            Some(cursor) if !force_full => cursor,
            _ => 0,
        };
        let plan = if covered {
            ReaddPlan::CatchUp {
                regions: self.dirty.dirty_count(),
            }
        } else {
            ReaddPlan::FullRebuild
        };
        let fresh = Arc::new(
            Member::new(id, member.label.clone(), backend).in_domain(member.domain.clone()),
        );
        if !covered {
            self.mark_full_rebuild(&fresh).await?;
        }
        self.replace_member(fresh.clone(), ReplicaState::Rebuilding)
            .await?;
        self.queue_job(
            if covered {
                JobKind::CatchUp
            } else {
                JobKind::Rebuild
            },
            Some(fresh.backend.location().to_string()),
        );
        let me = self.clone();
        tokio::spawn(async move {
            let r = if covered {
                me.clone().catch_up(fresh).await
            } else {
                me.clone().rebuild(fresh, resume_at).await
            };
            if let Err(e) = r {
                tracing::warn!(volume = %me.name(), error = %e, "re-add did not finish");
            }
        });
        Ok(plan)
    }

    /// Add a new replica (already created and formatted for this volume) and
    /// rebuild it in the background; it joins the in-sync set when complete.
    pub async fn add_replica(self: &Arc<Self>, member: Member) -> Result<(), EngineError> {
        self.refuse_if_closed()?;
        let _reconfigure = self.reconfigure.lock().await;
        if self.member(member.id).is_some() {
            return Err(EngineError::Refused {
                volume: self.name().to_string(),
                why: format!("replica {} is already a member", short(member.id)),
            });
        }
        let member = Arc::new(member);
        let location = member.backend.location().to_string();
        self.mark_full_rebuild(&member).await?;
        {
            let m = member.clone();
            let list = self.member_list();
            let mut new_list = (*list).clone();
            new_list.push(m.clone());
            let added = self
                .change_membership(|g| {
                    m.set_state(ReplicaState::Rebuilding, g, Some("rebuilding".into()));
                    self.set_member_list(new_list);
                })
                .await;
            if let Err(e) = added {
                self.restore_member(m.id, None).await;
                return Err(e);
            }
        }
        self.emit(
            EventKind::ReplicaAdded,
            Some(location),
            format!("replica on {} added; rebuilding", member.label),
        );
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.clone().rebuild(member, 0).await {
                tracing::warn!(volume = %me.name(), error = %e, "rebuild did not finish");
            }
        });
        Ok(())
    }

    /// Record on the target, before it joins as rebuilding, that it needs a
    /// full rebuild (cursor 0). A restart then resumes the right job: a
    /// target without a cursor is a catch-up from the dirty map.
    async fn mark_full_rebuild(&self, target: &Member) -> Result<(), EngineError> {
        let mut sb = target.backend.superblock();
        sb.rebuild_cursor = Some(sb.rebuild_cursor.unwrap_or(0));
        sb.clean = false;
        Ok(self
            .timed_write(target, move |b| async move { b.write_superblock(sb).await })
            .await?)
    }

    fn refuse_if_closed(&self) -> Result<(), EngineError> {
        if self.is_closed() {
            return Err(EngineError::Closed {
                volume: self.name().to_string(),
            });
        }
        Ok(())
    }

    async fn replace_member(
        &self,
        fresh: Arc<Member>,
        state: ReplicaState,
    ) -> Result<(), EngineError> {
        let list = self.member_list();
        let new_list: Vec<Arc<Member>> = list
            .iter()
            .map(|m| {
                if m.id == fresh.id {
                    fresh.clone()
                } else {
                    m.clone()
                }
            })
            .collect();
        let old = self.member(fresh.id);
        let replaced = self
            .change_membership(|g| {
                fresh.set_state(state, g, Some("catching up".into()));
                self.set_member_list(new_list);
            })
            .await;
        if replaced.is_err() {
            self.restore_member(fresh.id, old).await;
        }
        replaced
    }

    /// Undo a membership change that could not be recorded: put back the
    /// member `id` was before (or drop it if it is new). The record on the
    /// replicas still says that; the next one written says it again.
    async fn restore_member(&self, id: Uuid, old: Option<Arc<Member>>) {
        let _guard = self.membership.lock().await;
        let list: Vec<Arc<Member>> = self
            .member_list()
            .iter()
            .filter_map(|m| match (&old, m.id == id) {
                (_, false) => Some(m.clone()),
                (Some(o), true) => Some(o.clone()),
                (None, true) => None,
            })
            .collect();
        self.set_member_list(list);
    }

    /// Take a replica out on purpose (`ditto replica fail`).
    pub async fn fail_replica(&self, id: Uuid, reason: &str) -> Result<(), EngineError> {
        let m = self.member_unless_last(id, "failing it would stop all I/O")?;
        self.fail_member(&m, reason.to_string()).await
    }

    /// The member `id`, unless it is the last in-sync one (`why` says what
    /// taking it away would do).
    fn member_unless_last(&self, id: Uuid, why: &str) -> Result<Arc<Member>, EngineError> {
        let refused = |why: String| EngineError::Refused {
            volume: self.name().to_string(),
            why,
        };
        let m = self
            .member(id)
            .ok_or_else(|| refused(format!("no replica {}", short(id))))?;
        if m.state() == ReplicaState::InSync && self.in_sync().len() == 1 {
            return Err(refused(format!("it is the last in-sync replica; {why}")));
        }
        Ok(m)
    }

    /// Remove a replica from the volume for good (`ditto replica remove`).
    pub async fn remove_replica(&self, id: Uuid) -> Result<Arc<Member>, EngineError> {
        let _reconfigure = self.reconfigure.lock().await;
        let m = self.member_unless_last(id, "add another first")?;
        if m.state() == ReplicaState::InSync || m.state() == ReplicaState::Rebuilding {
            self.fail_member(&m, "removed by the operator".into())
                .await?;
        }
        let list = self.member_list();
        let new_list: Vec<Arc<Member>> = list.iter().filter(|x| x.id != id).cloned().collect();
        self.change_membership(|_| self.set_member_list(new_list))
            .await?;
        self.emit(
            EventKind::ReplicaRemoved,
            Some(m.backend.location().to_string()),
            format!("replica on {} removed", m.label),
        );
        Ok(m)
    }

    pub(crate) async fn catch_up(self: Arc<Self>, target: Arc<Member>) -> Result<(), EngineError> {
        let _job = self.job_lock.lock().await;
        // Queued behind a close: the replicas are closed cleanly, touch nothing.
        if self.is_closed() {
            return Ok(());
        }
        let regions = self.dirty.dirty_regions();
        let total: u64 = regions
            .iter()
            .map(|r| {
                let x = self.dirty.region_range(*r);
                x.end - x.start
            })
            .sum();
        let location = target.backend.location().to_string();
        self.emit(
            EventKind::ResyncStarted,
            Some(location.clone()),
            format!(
                "catching up replica on {}: {} dirty regions ({total} bytes)",
                target.label,
                regions.len()
            ),
        );
        let mut tracker = Tracker::new(&self, JobKind::CatchUp, Some(location.clone()), total);
        let result = self
            .copy_all(
                &target,
                regions.into_iter(),
                &mut tracker,
                EventKind::ResyncProgress,
                None,
            )
            .await;
        self.finish_copy(target, tracker, result, EventKind::ResyncFinished)
            .await
    }

    /// Full rebuild, copying only allocated data: the regions from `cursor`
    /// (bytes) on, and the dirty ones below it (written while the target
    /// was away, or unacknowledged at a crash).
    pub(crate) async fn rebuild(
        self: Arc<Self>,
        target: Arc<Member>,
        cursor: u64,
    ) -> Result<(), EngineError> {
        let _job = self.job_lock.lock().await;
        // Queued behind a close: the replicas are closed, touch nothing.
        if self.is_closed() {
            return Ok(());
        }
        let location = target.backend.location().to_string();
        let rs = self.dirty.region_size();
        let first = (cursor / rs).min(self.dirty.regions());
        let Some(source) = self.pick_source(first, &[target.id]) else {
            return Err(EngineError::NoReplicas {
                volume: self.name().to_string(),
            });
        };
        let below: Vec<u64> = self
            .dirty
            .dirty_regions()
            .into_iter()
            .filter(|r| *r < first)
            .collect();
        let (start, len) = (first * rs, self.size() - (first * rs).min(self.size()));
        let total = match self
            .timed(
                &source,
                move |b| async move { b.allocation(start, len).await },
            )
            .await
        {
            Ok(runs) => runs.iter().filter(|r| r.allocated).map(|r| r.length).sum(),
            Err(_) => len,
        } + below.len() as u64 * rs;
        self.emit(
            EventKind::RebuildStarted,
            Some(location.clone()),
            format!(
                "rebuilding replica on {} from {}: {total} allocated bytes{}",
                target.label,
                source.label,
                if first > 0 {
                    format!(", resuming at byte {}", first * rs)
                } else {
                    String::new()
                }
            ),
        );
        // Seed the target's superblock so a restart resumes instead of
        // starting over. It names the target as rebuilding, and its cursor
        // keeps it from ever being taken as current or caught up.
        let mut sb = source.backend.superblock();
        sb.replica_uuid = target.id;
        sb.clean = false;
        sb.rebuild_cursor = Some(first * rs);
        let _ = self
            .timed_write(
                &target,
                move |b| async move { b.write_superblock(sb).await },
            )
            .await;
        let mut tracker = Tracker::new(&self, JobKind::Rebuild, Some(location), total);
        let result = self
            .copy_all(
                &target,
                below.into_iter().chain(first..self.dirty.regions()),
                &mut tracker,
                EventKind::RebuildProgress,
                Some(first),
            )
            .await;
        self.finish_copy(target, tracker, result, EventKind::RebuildFinished)
            .await
    }

    /// Copies `regions` to `target`, a few regions at a time (see
    /// [`copy_window`]) so reading the source and writing the target overlap.
    /// Results are taken in region order. A rebuild (`checkpoint_from`: the
    /// first region of its cursor range) records its cursor now and then,
    /// after flushing the target, so the cursor never vouches for a region
    /// that is not copied and durable.
    async fn copy_all(
        &self,
        target: &Arc<Member>,
        regions: impl Iterator<Item = u64>,
        tracker: &mut Tracker,
        progress: EventKind,
        checkpoint_from: Option<u64>,
    ) -> Result<(), String> {
        use futures::stream::StreamExt;
        let mut pacer = Pacer::new();
        let mut last_checkpoint = Instant::now();
        let rs = self.dirty.region_size();
        let mut copies = futures::stream::iter(regions)
            .map(|r| async move { (r, self.copy_region_to(r, target).await) })
            .buffered(copy_window(rs));
        while let Some((r, outcome)) = copies.next().await {
            let copied = outcome?;
            // A rebuild's total is the allocated bytes, a catch-up's the
            // dirty regions (holes included): count in the same unit.
            let done = match checkpoint_from {
                Some(_) => copied,
                None => {
                    let range = self.dirty.region_range(r);
                    range.end - range.start
                }
            };
            tracker.add(self, done, progress);
            pacer.account(self, copied.max(4096)).await;
            let due = last_checkpoint.elapsed() > Duration::from_secs(2);
            if checkpoint_from.is_some_and(|first| due && r >= first) {
                last_checkpoint = Instant::now();
                if self
                    .timed(target, |b| async move { b.flush().await })
                    .await
                    .is_ok()
                {
                    let mut sb = target.backend.superblock();
                    sb.rebuild_cursor = Some((r + 1) * rs);
                    let _ = self
                        .timed_write(target, move |b| async move { b.write_superblock(sb).await })
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Copies one region to `target` from an in-sync replica. A source that
    /// fails to read is failed out and the region is copied again from the
    /// next one: skipping it would leave the target stale there while it
    /// joins as in sync.
    async fn copy_region_to(&self, region: u64, target: &Arc<Member>) -> Result<u64, String> {
        loop {
            if self.is_closed() {
                return Err("stopped; it resumes when the volume starts again".into());
            }
            if target.state() != ReplicaState::Rebuilding {
                return Err(format!("target is now {}", target.state().as_str()));
            }
            let Some(source) = self.pick_source(region, &[target.id]) else {
                return Err("no in-sync source left".into());
            };
            match self
                .copy_region(region, &source, std::slice::from_ref(target))
                .await
            {
                // Failed meanwhile (a client write to it erred): the copy
                // skipped it, so the region is not on it.
                Ok(_) if target.state() != ReplicaState::Rebuilding => {
                    return Err(format!("target is now {}", target.state().as_str()));
                }
                Ok(copied) => return Ok(copied),
                Err(CopyError::Target(_, e)) => {
                    let _ = self
                        .fail_member(target, format!("write failed during copy: {e}"))
                        .await;
                    return Err(format!("target failed: {e}"));
                }
                Err(CopyError::Source(e)) => {
                    let _ = self
                        .fail_member(&source, format!("read failed during copy: {e}"))
                        .await;
                    if source.state() == ReplicaState::InSync {
                        return Err(format!("the last in-sync replica cannot be read: {e}"));
                    }
                }
                Err(CopyError::SourceLeft) => {}
            }
        }
    }

    /// End a catch-up or rebuild: join the target to the in-sync set if its
    /// copy completed, and publish the outcome either way (a job left
    /// unfinished would be shown as running forever).
    async fn finish_copy(
        &self,
        target: Arc<Member>,
        tracker: Tracker,
        result: Result<(), String>,
        done: EventKind,
    ) -> Result<(), EngineError> {
        let location = target.backend.location().to_string();
        let joined = match result {
            Ok(()) => self.join(&target).await,
            // Not stopped, just unable to go on (e.g. the last source cannot
            // be read): nothing would ever finish the target, so it leaves
            // the set; `replica readd` resumes it.
            Err(e) if !self.is_closed() && target.state() == ReplicaState::Rebuilding => {
                let _ = self
                    .fail_member(
                        &target,
                        format!("its {} could not finish: {e}", tracker.kind.as_str()),
                    )
                    .await;
                Err(e)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = joined {
            tracker.publish(self, true, Some(e.clone()));
            self.emit(
                done,
                Some(location),
                format!(
                    "{} of replica on {} did not finish: {e}",
                    tracker.kind.as_str(),
                    target.label
                ),
            );
            return Ok(());
        }
        tracker.publish(self, true, None);
        let skipped = self.skipped_bytes() - tracker.skipped_at_start;
        self.emit(
            done,
            Some(location),
            format!(
                "{} of replica on {} finished: {} bytes in {:.1}s{}; {} of {} replicas in sync",
                tracker.kind.as_str(),
                target.label,
                tracker.done,
                tracker.started.elapsed().as_secs_f64(),
                if skipped > 0 {
                    format!(" ({skipped} more bytes found there already by checksum, not sent)")
                } else {
                    String::new()
                },
                self.in_sync().len(),
                self.member_list().len()
            ),
        );
        Ok(())
    }

    /// Make a copied target durable, seed its dirty map and count it in
    /// sync. The map's persist lock is held until it does, so a bit set
    /// meanwhile is written to it too, not only to the old members. A
    /// target that cannot take the flush or the map is failed out.
    async fn join(&self, target: &Member) -> Result<(), String> {
        if let Err(e) = self.timed(target, |b| async move { b.flush().await }).await {
            let why = format!("flushing it at the end of its copy failed: {e}");
            let _ = self.fail_member(target, why.clone()).await;
            return Err(why);
        }
        let _persist = self.dirty.persist.lock().await;
        let map = self.dirty.encoded();
        if let Err(e) = self
            .timed_write(
                target,
                move |b| async move { b.write_dirty_map(0, map).await },
            )
            .await
        {
            let why = format!("seeding its dirty map failed: {e}");
            let _ = self.fail_member(target, why.clone()).await;
            return Err(why);
        }
        match self.promote(target).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("target is now {}", target.state().as_str())),
            Err(e) => Err(format!("its joining could not be recorded: {e}")),
        }
    }

    /// Compare every in-sync replica region by region; with `repair`, rewrite
    /// differing regions from `source` (or the first in-sync replica).
    pub async fn scrub(
        self: &Arc<Self>,
        repair: bool,
        source: Option<Uuid>,
    ) -> Result<(), EngineError> {
        let members = self.in_sync();
        if members.len() < 2 {
            return Err(EngineError::Refused {
                volume: self.name().to_string(),
                why: "scrub needs at least two in-sync replicas".into(),
            });
        }
        if let Some(s) = source {
            if !members.iter().any(|m| m.id == s) {
                return Err(EngineError::Refused {
                    volume: self.name().to_string(),
                    why: format!("repair source {} is not an in-sync replica", short(s)),
                });
            }
        }
        if self.job_lock.try_lock().is_err() {
            return Err(EngineError::Refused { volume: self.name().to_string(), why: "another job (resync, rebuild or scrub) is running; wait for it with `ditto volume wait`".into() });
        }
        self.queue_job(JobKind::Scrub, None);
        let me = self.clone();
        tokio::spawn(async move { me.run_scrub(repair, source).await });
        Ok(())
    }

    async fn run_scrub(self: Arc<Self>, repair: bool, source: Option<Uuid>) {
        let _job = self.job_lock.lock().await;
        // Queued behind a close: the replicas are closed cleanly, touch nothing.
        if self.is_closed() {
            return Default::default();
        }
        let started_unix = now_unix();
        let started = Instant::now();
        let mut report = ScrubReport {
            started_unix,
            duration_secs: 0.0,
            bytes: 0,
            mismatched_regions: Vec::new(),
            repaired: 0,
            repair,
            source: None,
            finished: false,
            error: None,
        };
        self.emit(
            EventKind::ScrubStarted,
            None,
            format!("scrub started{}", if repair { " (repair)" } else { "" }),
        );
        let mut tracker = Tracker::new(
            &self,
            JobKind::Scrub,
            None,
            self.size() * self.in_sync().len() as u64,
        );
        let mut pacer = Pacer::new();
        for r in 0..self.dirty.regions() {
            if self.is_closed() {
                report.error = Some("stopped".into());
                break;
            }
            let range = self.dirty.region_range(r);
            let len = (range.end - range.start) as usize;
            let _lock = self.lock_region(r).await;
            // The members as they are once the region is ours: a write that
            // held it may have failed one out meanwhile (its copy is stale
            // and must be neither compared nor repaired from).
            let members = self.in_sync();
            if members.len() < 2 {
                report.error = Some("fewer than two in-sync replicas left".into());
                break;
            }
            let mut sums = Vec::new();
            let mut datas: Vec<Option<Bytes>> = Vec::new();
            for m in &members {
                let start = range.start;
                match self
                    .timed(m, move |b| async move { b.read(start, len).await })
                    .await
                {
                    Ok(d) => {
                        sums.push(Some(crc32c::crc32c(&d)));
                        datas.push(Some(d));
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.name(), error = %e, "scrub read failed");
                        sums.push(None);
                        datas.push(None);
                    }
                }
            }
            report.bytes += (len * members.len()) as u64;
            let differs = sums.windows(2).any(|w| w[0] != w[1]);
            if differs {
                report.mismatched_regions.push(range.start);
                self.emit(
                    EventKind::ScrubMismatch,
                    None,
                    format!(
                        "replicas differ in region at offset {} (+{len})",
                        range.start
                    ),
                );
                if repair {
                    let src_idx = source
                        .and_then(|s| members.iter().position(|m| m.id == s))
                        .unwrap_or(0);
                    // Still in sync now: a read may have outlived its member.
                    let src_ok = members
                        .get(src_idx)
                        .is_some_and(|m| m.state() == ReplicaState::InSync);
                    if let (true, Some(Some(good))) = (src_ok, datas.get(src_idx)) {
                        report.source = Some(members[src_idx].backend.location().to_string());
                        for (i, m) in members.iter().enumerate() {
                            if i != src_idx
                                && sums[i] != sums[src_idx]
                                && m.state() == ReplicaState::InSync
                            {
                                let (start, good) = (range.start, good.clone());
                                match self
                                    .timed_write(
                                        m,
                                        move |b| async move { b.write(start, good).await },
                                    )
                                    .await
                                {
                                    Ok(()) => report.repaired += 1,
                                    Err(e) => {
                                        drop(_lock);
                                        let _ = self
                                            .fail_member(
                                                m,
                                                format!("scrub repair write failed: {e}"),
                                            )
                                            .await;
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            tracker.add(
                &self,
                (len * members.len()) as u64,
                EventKind::ScrubProgress,
            );
            pacer.account(&self, (len * members.len()) as u64).await;
            report.duration_secs = started.elapsed().as_secs_f64();
            if let Ok(mut s) = self.last_scrub.lock() {
                *s = Some(report.clone());
            }
        }
        report.finished = report.error.is_none();
        report.duration_secs = started.elapsed().as_secs_f64();
        tracker.publish(&self, true, report.error.clone());
        self.emit(
            EventKind::ScrubFinished,
            None,
            format!(
                "scrub {}: {} bytes in {:.1}s, {} mismatched regions, {} repaired",
                if report.finished {
                    "finished"
                } else {
                    "stopped"
                },
                report.bytes,
                report.duration_secs,
                report.mismatched_regions.len(),
                report.repaired
            ),
        );
        if let Ok(mut s) = self.last_scrub.lock() {
            *s = Some(report);
        }
    }
}

/// Plan chosen for a re-added replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaddPlan {
    /// Copy only the dirty regions.
    CatchUp { regions: u64 },
    /// The dirty map does not cover its absence: copy everything allocated.
    FullRebuild,
}

fn member_since(m: &Member) -> u64 {
    m.since_generation()
}

enum CopyError {
    Source(BackendError),
    /// The source left the in-sync set while the copy waited for the
    /// region: it may lack writes made since, so it is not copied from.
    SourceLeft,
    Target(Uuid, BackendError),
}
