//! Opening replicas and starting and stopping volumes, under the degraded-start policy.

use super::*;

/// What a start of a volume with quorum got from claiming its epoch.
pub(super) enum StartClaim {
    /// A majority of the nodes took the claim: start at this record's new
    /// (recorded) epoch with these members.
    Claimed(VolumeRecord, Vec<Member>, Option<ditto_engine::Tiebreaker>),
    /// Another node claimed an epoch as new or newer: this node follows it (why).
    Superseded(String),
    /// Too few nodes took the claim (why): the start is retried.
    NoMajority(String),
}

/// A volume's slot in `Node::assembling`: while held, no start of it runs
/// (a start holds it from its state check to publishing the instance; a
/// hand-over holds it so none starts meanwhile).
pub(super) struct AssemblySlot<'a> {
    node: &'a Node,
    name: String,
}

impl Drop for AssemblySlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.node.assembling.lock() {
            busy.remove(&self.name);
        }
    }
}

impl Node {
    /// Take volume `name`'s slot now, or None when a start holds it.
    fn try_assembly_slot(&self, name: &str) -> Option<AssemblySlot<'_>> {
        let mut busy = self.assembling.lock().ok()?;
        busy.insert(name.to_string()).then(|| AssemblySlot {
            node: self,
            name: name.to_string(),
        })
    }

    /// Take volume `name`'s slot, waiting for a start in progress to end.
    pub(super) async fn assembly_slot(&self, name: &str) -> AssemblySlot<'_> {
        loop {
            if let Some(slot) = self.try_assembly_slot(name) {
                return slot;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The engine's view of `record`'s tiebreaker: how to reach it, and
    /// what it held when it took this start's claim (None: it did not).
    pub(super) fn tiebreaker_for(
        &self,
        record: &VolumeRecord,
        claimed: Option<ditto_engine::VoteRecord>,
    ) -> Option<ditto_engine::Tiebreaker> {
        let node = record.tiebreaker.as_ref()?;
        let (addr, dial) = match self.dialer.dial(node) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(volume = %record.name, tiebreaker = %node, error = %e, "the tiebreaker is not a known node; it does not vote");
                (String::new(), self.dialer.dial_as(node))
            }
        };
        Some(ditto_engine::Tiebreaker {
            voter: Arc::new(ditto_peer::client::RemoteVoter {
                node: node.clone(),
                addr,
                dial,
                volume: record.uuid,
                volume_name: record.name.clone(),
                timeout: Duration::from_secs(3),
            }),
            claimed,
        })
    }

    pub(super) fn pool_kind(&self, pool: &str) -> PoolKind {
        self.store
            .pools()
            .ok()
            .and_then(|ps| ps.into_iter().find(|p| p.name == pool))
            .map_or(PoolKind::Directory, |p| p.kind)
    }

    /// Open the file, device or remote export a replica lives on.
    pub(super) async fn open_io(
        &self,
        kind: PoolKind,
        location: &Path,
    ) -> Result<Arc<dyn IoFile>, std::io::Error> {
        match kind {
            PoolKind::Directory | PoolKind::Device => self.engine.open(location, false),
            PoolKind::Nbd => open_remote(&location.to_string_lossy()).await,
        }
    }

    pub(super) async fn open_replica(
        &self,
        record: &VolumeRecord,
        r: &ReplicaRecord,
    ) -> Result<Arc<dyn ReplicaBackend>, BackendError> {
        let location = r.path.display().to_string();
        if let Some(node) = &r.node {
            let io_err = |why: String| BackendError::Io {
                op: "connect",
                location: location.clone(),
                source: std::io::Error::other(why),
            };
            let (addr, dial) = self.dialer.dial(node).map_err(io_err)?;
            let remote = ditto_peer::RemoteReplica::connect(
                &addr,
                &dial,
                record.uuid,
                r.id,
                crate::peers::PEER_TIMEOUT,
            )
            .await
            .map_err(|e| {
                if let ditto_peer::client::ConnectError::Superseded { node, epoch, .. } = &e {
                    self.note_superseded(record.uuid, node.clone(), *epoch);
                }
                io_err(e.to_string())
            })?;
            return Ok(remote);
        }
        let file = self
            .open_io(self.pool_kind(&r.pool), &r.path)
            .await
            .map_err(|source| BackendError::Io {
                op: "open",
                location: location.clone(),
                source,
            })?;
        Ok(FileReplica::open_on(file, location, record.uuid).await?)
    }

    /// A volume member for replica `r`, in its node's failure domain.
    pub(super) fn member(&self, r: &ReplicaRecord, backend: Arc<dyn ReplicaBackend>) -> Member {
        let node = r
            .node
            .clone()
            .unwrap_or_else(|| self.config.node_name.clone());
        Member::new(r.id, r.pool.clone(), backend).in_domain(node)
    }

    /// The engine options of volume `name` (its quorum setting).
    pub(super) fn options_for(&self, name: &str) -> VolumeOptions {
        use ditto_control::config::OnNoQuorum;
        VolumeOptions {
            quorum: self.config.quorum_for(name).map(|q| match q {
                OnNoQuorum::Suspend => ditto_engine::NoQuorum::Suspend,
                OnNoQuorum::Error => ditto_engine::NoQuorum::Error,
            }),
            ..self.volume_options.clone()
        }
    }

    /// With quorum on, whether the replicas opened span a majority of the
    /// volume's nodes; a minority must not start (its own start would
    /// record the others as failed, and it may not write anyway).
    /// `tiebreaker_votes`: whether the volume's tiebreaker (if it has one)
    /// counts as reached (it took the claim, or is judged at the claim).
    pub(super) fn quorum_reachable(
        &self,
        record: &VolumeRecord,
        members: &[Member],
        tiebreaker_votes: bool,
    ) -> Result<(), String> {
        if self.config.quorum_for(&record.name).is_none() {
            return Ok(());
        }
        let mut all: std::collections::BTreeSet<&str> =
            members.iter().map(|m| m.domain.as_str()).collect();
        let mut present: std::collections::BTreeSet<&str> = members
            .iter()
            .filter(|m| m.backend.is_present())
            .map(|m| m.domain.as_str())
            .collect();
        if let Some(t) = record.tiebreaker.as_deref() {
            all.insert(t);
            if tiebreaker_votes {
                present.insert(t);
            }
        }
        let need = all.len() / 2 + 1;
        if present.len() >= need {
            return Ok(());
        }
        Err(format!(
            "no quorum: replicas reachable on {} of {} nodes ({}), {need} needed; waiting for the others (quorum = \"majority\")",
            present.len(),
            all.len(),
            present.iter().copied().collect::<Vec<_>>().join(", ")
        ))
    }

    /// Open every replica; those that cannot be opened become placeholders.
    pub(super) async fn open_members(&self, record: &VolumeRecord) -> (Vec<Member>, Vec<String>) {
        let mut members = Vec::new();
        let mut missing = Vec::new();
        for r in &record.replicas {
            let backend = match self.open_replica(record, r).await {
                Ok(b) => b,
                Err(e) => {
                    missing.push(format!("{} ({e})", r.pool));
                    match placeholder(record, r, e.to_string()) {
                        Some(p) => p,
                        None => continue,
                    }
                }
            };
            members.push(self.member(r, backend));
        }
        (members, missing)
    }

    /// Assemble the engine volume of a stored record from its members.
    /// `accept_stale`: the operator accepts starting from replicas older
    /// than the node's membership record (`--force-stale`, `resolve --keep`).
    pub(super) async fn open_record(
        &self,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
        discard: Vec<Uuid>,
        tiebreaker: Option<ditto_engine::Tiebreaker>,
    ) -> Result<Arc<Volume>, ditto_engine::EngineError> {
        Volume::open(
            &record.name,
            record.uuid,
            record.size,
            members,
            VolumeOptions {
                accept_stale,
                discard,
                epoch: record.epoch,
                tiebreaker,
                ..self.options_for(&record.name)
            },
            self.events.clone(),
        )
        .await
    }

    /// Assemble a volume and publish it (or record why it is stopped).
    pub(super) async fn assemble(
        self: &Arc<Self>,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
    ) -> bool {
        self.assemble_with(record, members, accept_stale, Vec::new())
            .await
    }

    /// [`Self::assemble`], discarding the data of replicas `discard`.
    pub(super) async fn assemble_with(
        self: &Arc<Self>,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
        discard: Vec<Uuid>,
    ) -> bool {
        // One instance per volume: a background start (waiting for missing
        // replicas) may meet an operator's start, a promote or a hand-over.
        let running = matches!(
            self.runtime(&record.name).as_deref(),
            Some(VolumeRuntime::Running(_))
        );
        let slot = (!running)
            .then(|| self.try_assembly_slot(&record.name))
            .flatten();
        let Some(_slot) = slot else {
            tracing::debug!(volume = %record.name, "already running, being started or handed over; this start is dropped");
            return false;
        };
        self.assemble_once(record, members, accept_stale, discard)
            .await
    }

    async fn assemble_once(
        self: &Arc<Self>,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
        discard: Vec<Uuid>,
    ) -> bool {
        // The record may have changed while the caller waited (a promote
        // elsewhere handed it over, a promote here gave it a new epoch).
        let record = &match self.record(&record.name) {
            Ok(r) if r.uuid == record.uuid => r,
            _ => {
                tracing::debug!(volume = %record.name, "record gone or replaced; not started");
                return false;
            }
        };
        // Another node took the volume over while this one was away: it
        // must not start (a degraded start would take writes nobody else
        // sees); it becomes that node's secondary instead.
        if let Some((by, epoch)) = self.superseded_by(record) {
            drop(members);
            self.spawn_become_secondary(record, by, epoch);
            return false;
        }
        let quorum = self.config.quorum_for(&record.name).is_some();
        let claimed;
        let (record, members, tiebreaker) = if quorum {
            match self.claim_start(record, members).await {
                StartClaim::Claimed(r, m, t) => {
                    claimed = r;
                    (&claimed, m, t)
                }
                StartClaim::Superseded(why) => {
                    self.set_runtime(&record.name, Some(VolumeRuntime::Stopped(why)));
                    return false;
                }
                StartClaim::NoMajority(why) => {
                    self.spawn_restart(&record.name, why);
                    return false;
                }
            }
        } else {
            (record, members, self.tiebreaker_for(record, None))
        };
        let absent: Vec<String> = members
            .iter()
            .filter(|m| !m.backend.is_present())
            .map(|m| m.domain.clone())
            .collect();
        let opened = self
            .open_record(record, members, accept_stale, discard, tiebreaker)
            .await;
        match opened {
            // Handed over while it opened (a claim at a newer epoch came
            // in): this instance must not serve.
            Ok(v) if !matches!(self.record(&record.name), Ok(r) if r.uuid == record.uuid) => {
                tracing::warn!(volume = %record.name, "superseded while it started; this instance is closed");
                let _ = v.close().await;
                self.keep_draining(&record.name, &v);
                false
            }
            Ok(v) => {
                tracing::info!(volume = %record.name, generation = v.generation(), "volume started");
                self.set_runtime(&record.name, Some(VolumeRuntime::Running(v)));
                true
            }
            // With quorum, a start that finds no current replica among those
            // present waits for the absent ones (the newest copy may be on a
            // node cut off now) instead of stopping for good: a takeover by a
            // majority whose own replica was half rebuilt by another node's
            // primary would otherwise never serve, with every node
            // following it (three_nodes_under_random_partitions: 4 of 20 runs).
            Err(e)
                if quorum
                    && !absent.is_empty()
                    && !matches!(e, ditto_engine::EngineError::SplitBrain { .. }) =>
            {
                let why = format!(
                    "not started yet: {e}; the replica(s) on {} may hold newer data, so it starts when they answer",
                    absent.join(", ")
                );
                let repeated = matches!(
                    self.runtime(&record.name).as_deref(),
                    Some(VolumeRuntime::Starting(w)) if *w == why
                );
                if !repeated {
                    self.emit(EventKind::StartRefused, &record.name, why.clone());
                }
                self.spawn_restart(&record.name, why);
                false
            }
            Err(e) => {
                let why = e.to_string();
                self.emit(
                    EventKind::StartRefused,
                    &record.name,
                    format!("not started: {why}"),
                );
                self.set_runtime(&record.name, Some(VolumeRuntime::Stopped(why)));
                false
            }
        }
    }

    /// With quorum, every start of a volume takes an epoch of its own,
    /// newer than any its replicas were assembled at, and claims it at
    /// every node holding a replica. Only a majority of the nodes taking
    /// the claim lets it start (then no other start can take that epoch),
    /// so the superblocks of one epoch are one assembly's: one line of
    /// generations, in which the newer generation is the newer copy
    /// (decision table rows 11 and 12). The new epoch is recorded before
    /// the volume opens, so a later start takes a newer one still.
    pub(super) async fn claim_start(
        self: &Arc<Self>,
        record: &VolumeRecord,
        members: Vec<Member>,
    ) -> StartClaim {
        let me = self.config.node_name.clone();
        let assembled_at = members
            .iter()
            .filter(|m| m.backend.is_present())
            .map(|m| m.backend.superblock().epoch)
            .max()
            .unwrap_or(0);
        // Newer than the last start recorded here too: a start whose open
        // failed may have written superblocks at its epoch on a replica
        // absent now. (A claim that found no majority opened nothing, and
        // its retry takes the same epoch.)
        let epoch = record.epoch.max(assembled_at) + 1;
        let claim = self.claim_of(record, epoch);
        let mut declined = std::collections::BTreeMap::new();
        let mut witnessed = None;
        for node in super::peering::claim_nodes(record) {
            match self.send_claim(node, &claim).await {
                Some(Ok(held)) => {
                    if record.tiebreaker.as_deref() == Some(node) {
                        witnessed = Some(held.unwrap_or_default());
                    }
                }
                Some(Err(ditto_peer::client::ConnectError::Superseded {
                    node: by,
                    epoch: theirs,
                    ..
                })) if by != me && theirs >= epoch => {
                    self.note_superseded(record.uuid, by.clone(), theirs);
                    self.spawn_become_secondary(record, by.clone(), theirs);
                    return StartClaim::Superseded(format!(
                        "not started: node {node} follows node {by} as the primary of {} at epoch {theirs}, not older than this start's {epoch}; this node becomes its secondary",
                        record.name
                    ));
                }
                Some(Err(e)) => {
                    declined.insert(node.to_string(), e.to_string());
                }
                None => {
                    declined.insert(node.to_string(), "not a known node".to_string());
                }
            }
        }
        // A node that did not take the claim lends no replica to this start;
        // one that took it and refused the connection before (it followed
        // an older primary) is connected again.
        let mut kept = Vec::with_capacity(members.len());
        for m in members {
            let remote = record
                .replicas
                .iter()
                .find(|r| r.id == m.id && r.node.is_some());
            let replaced = match (remote, declined.get(&m.domain)) {
                (Some(r), Some(why)) => placeholder(
                    record,
                    r,
                    format!(
                        "node {} did not take this start's epoch {epoch}: {why}",
                        m.domain
                    ),
                ),
                (Some(r), None) if !m.backend.is_present() => {
                    self.open_replica(record, r).await.ok()
                }
                _ => None,
            };
            kept.push(match (remote, replaced) {
                (Some(r), Some(backend)) => self.member(r, backend),
                _ => m,
            });
        }
        if let Err(why) = self.quorum_reachable(record, &kept, witnessed.is_some()) {
            return StartClaim::NoMajority(format!(
                "{why}; this start's epoch {epoch} was not taken by a majority, retried"
            ));
        }
        let mut started = record.clone();
        started.epoch = epoch;
        if let Err(e) = self.store.update_volume(&started) {
            return StartClaim::NoMajority(format!(
                "the new epoch {epoch} could not be recorded ({e}); retried"
            ));
        }
        let tiebreaker = self.tiebreaker_for(&started, witnessed);
        StartClaim::Claimed(started, kept, tiebreaker)
    }

    /// Start volume `name` again in a second (a start that found no
    /// majority, an instance that lost every in-sync replica, a handover
    /// whose close failed), unless the operator or another node changed
    /// its state meanwhile.
    pub(super) fn spawn_restart(self: &Arc<Self>, name: &str, why: String) {
        self.set_runtime(name, Some(VolumeRuntime::Starting(why.clone())));
        let node = Arc::downgrade(self);
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(node) = node.upgrade() else { return };
            let pending = matches!(
                node.runtime(&name).as_deref(),
                Some(VolumeRuntime::Starting(w)) if *w == why
            );
            // It was serving or taken over already: the degraded-start
            // wait is for a daemon's boot, and the engine refuses whatever
            // is not proven current.
            if pending {
                node.start_with_policy(name, Some(true), Some(0), false)
                    .await;
            }
        });
    }

    /// Start a volume under the degraded-start policy: wait up to the
    /// configured time for missing replicas, then start degraded or refuse.
    /// `degraded` (from `volume start --degraded/--no-degraded`) wins over
    /// the daemon's override, which wins over the config file.
    pub(super) async fn start_with_policy(
        self: Arc<Self>,
        name: String,
        degraded: Option<bool>,
        wait: Option<u64>,
        force_stale: bool,
    ) -> bool {
        let Ok(record) = self.record(&name) else {
            return false;
        };
        if let Some(pending) = self.still_draining(&name) {
            let why = format!(
                "the previous instance of {name} still has {pending} disk operation(s) given up at a timeout in flight; starting now could let them land over new writes. Wait until the hung disk answers (or fails) and run `ditto volume start {name}` again"
            );
            self.emit(EventKind::StartRefused, &name, why.clone());
            self.set_runtime(&name, Some(VolumeRuntime::Stopped(why)));
            return false;
        }
        let wait_secs = wait.unwrap_or_else(|| self.config.degraded_wait_for(&name));
        let allow = degraded
            .or(self.degraded_override)
            .unwrap_or_else(|| self.config.start_degraded_for(&name));
        let deadline = Instant::now() + Duration::from_secs(wait_secs);
        loop {
            // Handed over or replaced meanwhile: this start has nothing to do.
            let record = match self.record(&name) {
                Ok(r) if r.uuid == record.uuid => r,
                _ => return false,
            };
            if matches!(
                self.runtime(&name).as_deref(),
                Some(VolumeRuntime::Running(_))
            ) {
                return false;
            }
            let (members, missing) = self.open_members(&record).await;
            if missing.is_empty() {
                return self.assemble(&record, members, force_stale).await;
            }
            // Without quorum it waits for the other nodes whatever the
            // degraded policy (or hands over once they say it was superseded).
            if let Err(why) = self.quorum_reachable(&record, &members, true) {
                if let Some((by, epoch)) = self.superseded_by(&record) {
                    self.spawn_become_secondary(&record, by, epoch);
                    return false;
                }
                self.set_runtime(&name, Some(VolumeRuntime::Starting(why)));
                drop(members);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if allow {
                    tracing::warn!(volume = %name, missing = ?missing, "starting degraded by policy");
                    return self.assemble(&record, members, force_stale).await;
                }
                let why = format!(
                    "replica(s) missing: {}. Not started degraded (policy: start_degraded = false). Bring the disk back and run `ditto volume start {name}`, or start without it: `ditto volume start {name} --degraded`",
                    missing.join(", ")
                );
                self.emit(EventKind::StartRefused, &name, why.clone());
                self.set_runtime(&name, Some(VolumeRuntime::Stopped(why)));
                return false;
            }
            self.set_runtime(
                &name,
                Some(VolumeRuntime::Starting(format!(
                    "waiting {}s more for replica(s): {}; then {}",
                    left.as_secs(),
                    missing.join(", "),
                    if allow {
                        "starting degraded"
                    } else {
                        "refusing to start degraded"
                    }
                ))),
            );
            tokio::time::sleep(Duration::from_millis(500).min(left)).await;
        }
    }

    /// Remember a closed instance of `name` while operations given up at a
    /// timeout may still land on its disks (a new start waits for them).
    pub(super) fn keep_draining(&self, name: &str, closed: &Arc<Volume>) {
        if closed.abandoned_ops() > 0 {
            if let Ok(mut d) = self.draining.lock() {
                d.insert(name.to_string(), closed.clone());
            }
        }
    }

    /// Operations still pending on the stopped instance of `name`, if any.
    pub(super) fn still_draining(&self, name: &str) -> Option<usize> {
        let mut d = self.draining.lock().ok()?;
        let pending = d.get(name).map_or(0, |v| v.abandoned_ops());
        if pending == 0 {
            d.remove(name);
            return None;
        }
        Some(pending)
    }

    pub(super) fn refuse_if_running(&self, name: &str, why: &str) -> Result<(), ControlError> {
        match self.runtime(name).as_deref() {
            Some(VolumeRuntime::Running(_)) => Err(ControlError::InvalidRequest(format!(
                "volume {name:?} is running: {why}"
            ))),
            _ => Ok(()),
        }
    }

    /// `ditto volume start NAME [--degraded|--no-degraded]`.
    pub async fn start_volume(
        self: &Arc<Self>,
        name: &str,
        degraded: Option<bool>,
        force_stale: bool,
    ) -> Result<VolumeInfo, ControlError> {
        let record = self.record(name)?;
        self.refuse_if_running(name, "it is already running")?;
        let _guard = self.ops.lock().await;
        self.clone()
            .start_with_policy(name.to_string(), degraded, Some(0), force_stale)
            .await;
        self.volume_info(&record)
    }

    /// `ditto volume stop NAME [--force]`: unpublish and close cleanly.
    pub async fn stop_volume(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let v = self.running(name)?;
        let _guard = self.ops.lock().await;
        let clients = self.clients_of(name).len();
        if clients > 0 && !force {
            return Err(ControlError::VolumeBusy {
                name: name.to_string(),
                clients,
            });
        }
        self.set_runtime(
            name,
            Some(VolumeRuntime::Stopped(format!(
                "stopped by the operator; `ditto volume start {name}` serves it again"
            ))),
        );
        if let Some(server) = self.nbd.get() {
            server.disconnect_export(name);
        }
        let closed = v.close().await;
        self.keep_draining(name, &v);
        closed.map_err(engine_err)?;
        self.emit(
            EventKind::VolumeStopped,
            name,
            "stopped by the operator".into(),
        );
        Ok(())
    }
}

/// A stand-in for replica `r` of `record` that cannot lend its data (why);
/// None when the record's layout is invalid.
fn placeholder(
    record: &VolumeRecord,
    r: &ReplicaRecord,
    why: String,
) -> Option<Arc<dyn ReplicaBackend>> {
    let layout = layout_of(record).ok()?;
    Some(Arc::new(MissingReplica::new(
        r.path.display().to_string(),
        why,
        record.uuid,
        r.id,
        layout,
    )))
}
