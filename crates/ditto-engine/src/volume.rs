//! The mirror: one volume over several replicas.
//!
//! Writes fan out to every in-sync replica and complete only when all of them
//! did; a replica that fails is taken out of the in-sync set, and the new
//! generation is recorded on the survivors *before* the write is acknowledged.
//! Reads go to one replica chosen by [`crate::read_policy`], and fall back to
//! the others on error.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ditto_format::{MemberState, ReplicaSetEntry, Superblock};
use futures::future::join_all;
use uuid::Uuid;

use crate::backend::{BackendError, ReplicaBackend};
use crate::io::Allocation;
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
    #[error("volume {volume}: split brain between replicas {a} and {b}: each went on without the other; choose the one to keep (see `ditto status {volume}`)")]
    SplitBrain {
        volume: String,
        a: String,
        b: String,
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
}

impl ReplicaState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => ReplicaState::InSync,
            1 => ReplicaState::Failed,
            _ => ReplicaState::Stale,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in_sync",
            ReplicaState::Failed => "failed",
            ReplicaState::Stale => "stale",
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
        Member {
            id,
            label: label.into(),
            backend,
            state: AtomicU8::new(ReplicaState::InSync as u8),
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

    fn set_state(&self, state: ReplicaState, reason: Option<String>) {
        self.state.store(state as u8, Ordering::Release);
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
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// A mirrored volume.
pub struct Volume {
    name: String,
    uuid: Uuid,
    size: u64,
    members: Vec<Arc<Member>>,
    generation: AtomicU64,
    /// Serialises membership changes (and the superblock writes recording them).
    membership: tokio::sync::Mutex<()>,
    options: VolumeOptions,
}

fn is_in_sync(sb: &Superblock, id: Uuid) -> bool {
    sb.replica_set
        .iter()
        .any(|e| e.replica == id && e.state == MemberState::InSync)
}

fn excludes(sb: &Superblock, id: Uuid) -> bool {
    sb.replica_set
        .iter()
        .any(|e| e.replica == id && e.state != MemberState::InSync)
}

impl Volume {
    /// Assemble a volume from opened replicas. The generation decides who is
    /// current: older replicas are stale and never served from; two replicas
    /// that each excluded the other are a split brain and the volume refuses
    /// to start. Records the assembled membership (and an unclean-shutdown
    /// marker) on every in-sync replica before returning.
    pub async fn open(
        name: impl Into<String>,
        uuid: Uuid,
        size: u64,
        members: Vec<Member>,
        options: VolumeOptions,
    ) -> Result<Self, EngineError> {
        let name = name.into();
        let mut generation = 0;
        for m in &members {
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
        // Split brain: two replicas that each recorded the other as out of the set.
        for (i, a) in members.iter().enumerate() {
            for b in &members[i + 1..] {
                let (sa, sbb) = (a.backend.superblock(), b.backend.superblock());
                if excludes(&sa, b.id) && excludes(&sbb, a.id) {
                    return Err(EngineError::SplitBrain {
                        volume: name.clone(),
                        a: a.backend.location().to_string(),
                        b: b.backend.location().to_string(),
                    });
                }
            }
        }
        let current: Vec<Superblock> = members
            .iter()
            .map(|m| m.backend.superblock())
            .filter(|sb| sb.generation == generation)
            .collect();
        for m in &members {
            let sb = m.backend.superblock();
            if sb.generation < generation {
                m.set_state(
                    ReplicaState::Stale,
                    Some(format!(
                        "generation {} is older than the volume's {generation}",
                        sb.generation
                    )),
                );
            } else if current
                .iter()
                .any(|c| c.replica_set.iter().any(|e| e.replica == m.id) && !is_in_sync(c, m.id))
            {
                m.set_state(
                    ReplicaState::Failed,
                    Some("recorded as failed by the current replicas".into()),
                );
            }
        }
        let volume = Volume {
            name,
            uuid,
            size,
            members: members.into_iter().map(Arc::new).collect(),
            generation: AtomicU64::new(generation),
            membership: tokio::sync::Mutex::new(()),
            options,
        };
        {
            let _guard = volume.membership.lock().await;
            let changed = volume.members.iter().any(|m| {
                let recorded = volume
                    .members
                    .iter()
                    .find(|c| c.state() == ReplicaState::InSync)
                    .map(|c| c.backend.superblock());
                recorded
                    .is_none_or(|sb| is_in_sync(&sb, m.id) != (m.state() == ReplicaState::InSync))
            });
            if changed {
                volume.generation.fetch_add(1, Ordering::AcqRel);
            }
            volume.persist_membership(false).await?;
        }
        Ok(volume)
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

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        self.members.iter().map(|m| m.status()).collect()
    }

    fn in_sync(&self) -> Vec<Arc<Member>> {
        self.members
            .iter()
            .filter(|m| m.state() == ReplicaState::InSync)
            .cloned()
            .collect()
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

    async fn timed<T>(
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

    /// Run `op` on every in-sync replica; fail out those that error. Succeeds
    /// when at least one replica completed and the failures are recorded.
    async fn fan_out<'a, F, Fut>(&'a self, op: F) -> Result<(), EngineError>
    where
        F: Fn(Arc<Member>) -> Fut,
        Fut: std::future::Future<Output = Result<(), BackendError>> + 'a,
    {
        let members = self.in_sync();
        if members.is_empty() {
            return Err(self.no_replicas());
        }
        let results = join_all(members.iter().map(|m| op(m.clone()))).await;
        let mut ok = 0;
        for (m, r) in members.iter().zip(results) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    m.errors.fetch_add(1, Ordering::Relaxed);
                    self.fail_member(m, e.to_string()).await?;
                }
            }
        }
        if ok == 0 || self.in_sync().is_empty() {
            return Err(self.no_replicas());
        }
        Ok(())
    }

    /// Take a member out of the in-sync set and record the new generation on
    /// the survivors. Returns only when that record is durable (or no
    /// survivor is left).
    pub async fn fail_member(&self, member: &Member, reason: String) -> Result<(), EngineError> {
        let _guard = self.membership.lock().await;
        if member.state() != ReplicaState::InSync {
            return Ok(());
        }
        tracing::error!(volume = %self.name, replica = %member.backend.location(), %reason, "replica failed, removing it from the in-sync set");
        member.set_state(ReplicaState::Failed, Some(reason));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.persist_membership(false).await
    }

    /// Write the current generation and replica set to every in-sync member;
    /// a member that cannot record it is failed too (and the loop repeats).
    async fn persist_membership(&self, clean: bool) -> Result<(), EngineError> {
        loop {
            let members = self.in_sync();
            if members.is_empty() {
                return Err(self.no_replicas());
            }
            let generation = self.generation();
            let set: Vec<ReplicaSetEntry> = self
                .members
                .iter()
                .map(|m| ReplicaSetEntry {
                    replica: m.id,
                    state: if m.state() == ReplicaState::InSync {
                        MemberState::InSync
                    } else {
                        MemberState::Failed
                    },
                    since_generation: u32::try_from(generation).unwrap_or(u32::MAX),
                })
                .collect();
            let writes = members.iter().map(|m| {
                let mut sb = m.backend.superblock();
                sb.generation = generation;
                sb.clean = clean;
                sb.replica_set = set.clone();
                async move { self.timed(m, m.backend.write_superblock(sb)).await }
            });
            let results = join_all(writes).await;
            let mut failed_any = false;
            for (m, r) in members.iter().zip(results) {
                if let Err(e) = r {
                    tracing::error!(volume = %self.name, replica = %m.backend.location(), error = %e, "cannot record membership");
                    m.set_state(ReplicaState::Failed, Some(e.to_string()));
                    failed_any = true;
                }
            }
            if !failed_any {
                return Ok(());
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        let mut tried: Vec<Uuid> = Vec::new();
        let mut last_err = None;
        loop {
            let members: Vec<Arc<Member>> = self
                .in_sync()
                .into_iter()
                .filter(|m| !tried.contains(&m.id))
                .collect();
            let Some(member) = read_policy::choose(&members, offset) else {
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
                    if !tried.is_empty() {
                        self.repair_after_read_error(&tried, offset, &data).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    member.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, replica = %member.backend.location(), error = %e, "read failed, trying another replica");
                    tried.push(member.id);
                    last_err = Some(e);
                }
            }
        }
    }

    /// After a read error was answered from another replica, write the good
    /// data back over the bad region (as md does); a replica that cannot take
    /// it is failed out.
    async fn repair_after_read_error(&self, bad: &[Uuid], offset: u64, data: &Bytes) {
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
                tracing::info!(volume = %self.name, replica = %m.backend.location(), offset, "rewrote region after a read error");
            }
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, data.len() as u64)?;
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
        self.check_range(offset, len)?;
        self.fan_out(|m| async move {
            self.timed(&m, async {
                m.backend.discard(offset, len).await?;
                if fua {
                    m.backend.flush().await?;
                }
                Ok(())
            })
            .await
        })
        .await
    }

    /// Zero a range; `may_deallocate` lets replicas punch holes (stays sparse).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_deallocate: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
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

    /// Flush everything and mark the in-sync replicas clean: the next start
    /// knows they are equal and need no resync.
    pub async fn close(&self) -> Result<(), EngineError> {
        self.flush().await?;
        let _guard = self.membership.lock().await;
        self.persist_membership(true).await
    }
}
