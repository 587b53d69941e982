//! This node among its peers: replicas on other nodes, reconnecting them, and handing a volume over (promote).

use super::*;

/// How a node takes a volume over from its primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// The primary hands it over (this node's replica in sync).
    Planned,
    /// Without the primary, which does not answer (`promote --force`).
    Force,
    /// The primary hands it over although this node's replica diverged: a
    /// split brain resolved in this node's favour.
    KeepThisSide,
}

impl Node {
    pub fn dialer(&self) -> &crate::peers::Dialer {
        &self.dialer
    }

    pub fn set_held(&self, held: Arc<crate::peers::HeldReplicas>) {
        let _ = self.held.set(held);
    }

    /// Node `to` takes volume `volume` over (its `volume promote`): stop
    /// being its primary, and hold this node's replicas of it for `to`.
    /// Only when `to`'s replica is in sync, so nothing acknowledged is lost,
    /// unless `discard`: the operator resolved a split brain in `to`'s
    /// favour, and this node's writes since the split are given up.
    /// Returns the replicas now held for `to`, and every replica of the volume.
    pub async fn demote_to(
        self: &Arc<Self>,
        to: &str,
        volume: Uuid,
        discard: bool,
    ) -> Result<(Vec<HeldReplicaRecord>, ditto_peer::wire::PrimaryClaim), String> {
        let me = self.config.node_name.clone();
        let err = |e: ControlError| e.to_string();
        let _guard = self.ops.lock().await;
        let record = self
            .store
            .volumes()
            .map_err(err)?
            .into_iter()
            .find(|v| v.uuid == volume);
        let Some(record) = record else {
            // Handed over already (a retried promote): say what is held for it.
            let held: Vec<HeldReplicaRecord> = self
                .store
                .held_replicas()
                .map_err(err)?
                .into_iter()
                .filter(|h| h.volume == volume && h.primary == to)
                .collect();
            let Some(first) = held.first() else {
                return Err(format!(
                    "node {me} is not the primary of volume {volume} and holds none of its replicas for {to}"
                ));
            };
            let claim = ditto_peer::wire::PrimaryClaim {
                volume,
                epoch: first.epoch,
                members: crate::peers::member_refs(&first.members),
                tiebreaker: first.tiebreaker.clone(),
            };
            return Ok((Vec::new(), claim));
        };
        let name = record.name.clone();
        // No start of it begins while its replicas are handed over.
        let _slot = self.assembly_slot(&name).await;
        let volume_rt = self.running(&name).map_err(err)?;
        let Some(target) = record
            .replicas
            .iter()
            .find(|r| r.node.as_deref() == Some(to))
        else {
            return Err(format!("node {to} holds no replica of volume {name}"));
        };
        let state = volume_rt
            .members()
            .iter()
            .find(|m| m.id == target.id)
            .map(|m| m.state);
        if state != Some(ReplicaState::InSync) && !discard {
            return Err(format!(
                "node {to}'s replica of {name} is not in sync ({}); taking over now would lose writes. Wait for it (`ditto volume wait {name}` on {me}) and retry",
                state.map_or("unknown", |s| s.as_str())
            ));
        }
        if let Some(r) = record
            .replicas
            .iter()
            .find(|r| r.node.is_none() && self.pool_kind(&r.pool) == PoolKind::Nbd)
        {
            return Err(format!(
                "replica {} of {name} is on an NBD pool, which this node cannot hold for another",
                r.pool
            ));
        }
        if volume_rt.abandoned_ops() > 0 {
            return Err(format!(
                "volume {name} still has operations in flight on a hung disk; retry once they complete"
            ));
        }
        let clients = self.clients_of(&name).len();
        if clients > 0 {
            return Err(format!(
                "volume {name} has {clients} connected NBD client(s) on node {me}; disconnect them first (after the switch-over they reach it on node {to})"
            ));
        }
        self.set_runtime(
            &name,
            Some(VolumeRuntime::Stopped(format!("handing over to node {to}"))),
        );
        if let Some(server) = self.nbd.get() {
            server.disconnect_export(&name);
        }
        if let Err(e) = volume_rt.close().await {
            // The instance is closed either way: start it again (it
            // connects afresh and decides from the superblocks) rather
            // than leave it stopped "handing over" for good. Found by the
            // cluster simulator (seed 59 of `--seeds 100`).
            let why = format!("volume {name} could not be closed cleanly: {e}; not handed over");
            self.keep_draining(&name, &volume_rt);
            self.spawn_restart(&name, format!("{why}; started again"));
            return Err(why);
        }
        let members = self.member_refs(&record);
        let held = self.hand_over(&record, to, record.epoch, &members)?;
        self.emit(
            EventKind::VolumeStopped,
            &name,
            format!(
                "handed over to node {to}, its new primary; this node holds its replica(s) for it"
            ),
        );
        let claim = ditto_peer::wire::PrimaryClaim {
            volume,
            epoch: record.epoch,
            members,
            tiebreaker: record.tiebreaker.clone(),
        };
        Ok((held, claim))
    }

    /// Every replica of a volume as the peer protocol names them.
    pub(super) fn member_refs(&self, record: &VolumeRecord) -> Vec<ditto_peer::wire::MemberRef> {
        let me = &self.config.node_name;
        record
            .replicas
            .iter()
            .map(|r| match &r.node {
                Some(node) => ditto_peer::wire::MemberRef {
                    replica: r.id,
                    node: node.clone(),
                    pool: r
                        .pool
                        .split_once(':')
                        .map_or(r.pool.clone(), |(_, p)| p.to_string()),
                },
                None => ditto_peer::wire::MemberRef {
                    replica: r.id,
                    node: me.clone(),
                    pool: r.pool.clone(),
                },
            })
            .collect()
    }

    /// Stop being the primary of `record` (its volume already closed or
    /// never started): hold this node's replicas of it for node `to` at
    /// `epoch`, and forget the volume. Returns the held records.
    fn hand_over(
        &self,
        record: &VolumeRecord,
        to: &str,
        epoch: u64,
        members: &[ditto_peer::wire::MemberRef],
    ) -> Result<Vec<HeldReplicaRecord>, String> {
        let err = |e: ControlError| e.to_string();
        let mut held = Vec::new();
        for r in record.replicas.iter().filter(|r| r.node.is_none()) {
            let h = HeldReplicaRecord {
                version: RECORD_VERSION,
                volume: record.uuid,
                replica: r.id,
                volume_name: record.name.clone(),
                pool: r.pool.clone(),
                path: r.path.clone(),
                primary: to.to_string(),
                created_unix: now_unix(),
                epoch,
                members: crate::peers::held_members(members),
                tiebreaker: record.tiebreaker.clone(),
            };
            self.store.insert_held_replica(&h).map_err(err)?;
            held.push(h);
        }
        self.store.delete_volume(&record.name).map_err(err)?;
        let _ = self.store.delete_membership(record.uuid);
        self.set_runtime(&record.name, None);
        if let Ok(mut s) = self.superseded_seen.lock() {
            s.remove(&record.uuid);
        }
        if let Ok(mut s) = self.split_brains.lock() {
            for r in &record.replicas {
                s.remove(&r.id);
            }
        }
        Ok(held)
    }

    /// The epoch of `volume` when this node is its primary.
    pub fn primary_epoch(&self, volume: Uuid) -> Option<u64> {
        self.store
            .volumes()
            .ok()?
            .into_iter()
            .find(|v| v.uuid == volume)
            .map(|v| v.epoch)
    }

    /// Node `by` took `volume` over at `epoch`, newer than this node's: a
    /// forced promote while this node was away or cut off. Stop serving it
    /// (writes made here since are a split brain the new primary reports,
    /// never merged) and hold this node's replicas for `by`.
    pub async fn become_secondary(
        &self,
        volume: Uuid,
        by: &str,
        epoch: u64,
        members: Vec<ditto_peer::wire::MemberRef>,
    ) -> Result<Vec<HeldReplicaRecord>, String> {
        let _guard = self.ops.lock().await;
        let Some(record) = self
            .store
            .volumes()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|v| v.uuid == volume)
        else {
            return Ok(Vec::new()); // handed over already
        };
        // A start of this volume in progress opens this node's replicas
        // through handles of its own: it ends (and is closed below) before
        // they are served to the new primary, and none starts meanwhile.
        // (The cluster simulator's seed 649 with a tiebreaker lost a write
        // to such an instance, published after the step-down.)
        let _slot = self.assembly_slot(&record.name).await;
        if epoch <= record.epoch {
            return Err(format!(
                "node {by}'s epoch {epoch} is not newer than this node's {}",
                record.epoch
            ));
        }
        let name = record.name.clone();
        let why = format!("superseded: node {by} took {name} over at epoch {epoch}");
        // Taken before the runtime is replaced: the instance is closed (its
        // requests finished) before its replicas serve another primary. It
        // was read after the replacement, so it was never closed.
        let running = match self.runtime(&name).as_deref() {
            Some(VolumeRuntime::Running(v)) => Some(v.clone()),
            _ => None,
        };
        self.set_runtime(&name, Some(VolumeRuntime::Stopped(why.clone())));
        if let Some(server) = self.nbd.get() {
            server.disconnect_export(&name);
        }
        if let Some(v) = running {
            let _ = v.close().await;
            self.keep_draining(&name, &v);
        }
        let members = if members.is_empty() {
            self.member_refs(&record)
        } else {
            members
        };
        let held = self.hand_over(&record, by, epoch, &members)?;
        self.emit(
            EventKind::Superseded,
            &name,
            format!(
                "{why} (this node was its primary at epoch {}): this node stopped serving it and holds its replica(s) for node {by}, which catches them up, or reports a split brain if both sides took writes",
                record.epoch
            ),
        );
        Ok(held)
    }

    /// A replica's node answered that another node is the primary: remember
    /// it, so the volume is handed over rather than started or re-added.
    pub(super) fn note_superseded(&self, volume: Uuid, by: String, epoch: u64) {
        // A node answering with this node's own newer claim is no other primary.
        if by == self.config.node_name {
            return;
        }
        if let Ok(mut s) = self.superseded_seen.lock() {
            let newer = s.get(&volume).is_none_or(|(_, e)| *e < epoch);
            if newer {
                s.insert(volume, (by, epoch));
            }
        }
    }

    /// Whether a newer primary of `record` was seen, and which.
    pub(super) fn superseded_by(&self, record: &VolumeRecord) -> Option<(String, u64)> {
        let seen = self
            .superseded_seen
            .lock()
            .ok()?
            .get(&record.uuid)
            .cloned()?;
        if seen.1 > record.epoch {
            return Some(seen);
        }
        tracing::debug!(volume = %record.name, other = %seen.0, epoch = seen.1, mine = record.epoch, "a node follows an older primary; it is told of this one");
        None
    }

    /// Hand `record` over to the newer primary that was seen, in the
    /// background (the caller may hold the control lock), and serve the
    /// replicas then held for it.
    pub(super) fn spawn_become_secondary(
        self: &Arc<Self>,
        record: &VolumeRecord,
        by: String,
        epoch: u64,
    ) {
        if self.record(&record.name).map_or(true, |r| r.epoch >= epoch) {
            return; // handed over already, or promoted here since
        }
        self.set_runtime(
            &record.name,
            Some(VolumeRuntime::Stopped(format!(
                "superseded: node {by} took {} over at epoch {epoch}; handing it over",
                record.name
            ))),
        );
        let node = self.clone();
        let volume = record.uuid;
        tokio::spawn(async move {
            match node.become_secondary(volume, &by, epoch, Vec::new()).await {
                Ok(held) => {
                    // The peer server may still be starting.
                    for _ in 0..100 {
                        if let Some(h) = node.held.get() {
                            h.serve_handed_over(held).await;
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tracing::warn!(volume = %volume, "no peer server: the replicas held for the new primary are served after a restart with peer_listen set");
                }
                Err(e) => {
                    tracing::error!(volume = %volume, error = %e, "could not hand the volume over to its new primary")
                }
            }
        });
    }

    /// Tell every node holding a replica of `record` that this node is its
    /// primary at the record's epoch, with its current replicas. Best
    /// effort: a node that misses it learns at the next claim; one that
    /// follows a newer primary is noted (`note_superseded`).
    pub(super) async fn announce_primary(&self, record: &VolumeRecord) {
        let claim = self.claim_of(record, record.epoch);
        for node in claim_nodes(record) {
            match self.send_claim(node, &claim).await {
                Some(Err(ditto_peer::client::ConnectError::Superseded {
                    node: by, epoch, ..
                })) => {
                    self.note_superseded(record.uuid, by, epoch);
                }
                Some(Err(e)) => {
                    tracing::debug!(node, error = %e, "primary claim not delivered; the node learns at the next one")
                }
                _ => {}
            }
        }
    }

    /// This node's claim to be the primary of `record` at `epoch`.
    pub(super) fn claim_of(
        &self,
        record: &VolumeRecord,
        epoch: u64,
    ) -> ditto_peer::wire::PrimaryClaim {
        ditto_peer::wire::PrimaryClaim {
            volume: record.uuid,
            epoch,
            members: self.member_refs(record),
            tiebreaker: record.tiebreaker.clone(),
        }
    }

    /// Send `claim` to node `node`; None when the node is not known here.
    pub(super) async fn send_claim(
        &self,
        node: &str,
        claim: &ditto_peer::wire::PrimaryClaim,
    ) -> Option<Result<Option<ditto_engine::VoteRecord>, ditto_peer::client::ConnectError>> {
        let (addr, dial) = self.dialer.dial(node).ok()?;
        Some(ditto_peer::client::claim_primary(&addr, &dial, claim, Duration::from_secs(3)).await)
    }

    /// `ditto volume promote NAME` on a node holding a replica of it: the
    /// primary hands the volume over (only with this node's replica in
    /// sync), and this node serves it from then on. With `force`, when the
    /// primary does not answer, this node takes the volume over without it
    /// (the operator's override): the other nodes holding replicas follow
    /// this node's newer epoch and refuse the old primary from then on.
    pub async fn promote(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<VolumeInfo, ControlError> {
        self.take_over(
            name,
            if force {
                Takeover::Force
            } else {
                Takeover::Planned
            },
        )
        .await
    }

    async fn take_over(
        self: &Arc<Self>,
        name: &str,
        how: Takeover,
    ) -> Result<VolumeInfo, ControlError> {
        validate::name("volume", name)?;
        if self.record(name).is_ok() {
            return Err(ControlError::InvalidRequest(format!(
                "volume {name:?} is already primary on this node"
            )));
        }
        let held_all: Vec<HeldReplicaRecord> = self
            .store
            .held_replicas()?
            .into_iter()
            .filter(|h| h.volume_name == name)
            .collect();
        let Some(held) = held_all.iter().max_by_key(|h| h.epoch).cloned() else {
            return Err(ControlError::InvalidRequest(format!(
                "this node holds no replica of volume {name:?}, so it cannot become its primary"
            )));
        };
        let mut force = how == Takeover::Force;
        let discard = how == Takeover::KeepThisSide;
        let quorum = self.config.quorum_for(name).is_some();
        let mut tiebreaker = held.tiebreaker.clone();
        let (members, old_epoch) = if force {
            (
                self.force_takeover(name, &held, &held_all).await?,
                held.epoch,
            )
        } else {
            let (addr, dial) = self
                .dialer
                .dial(&held.primary)
                .map_err(ControlError::InvalidRequest)?;
            match ditto_peer::client::demote(&addr, &dial, held.volume, discard, crate::peers::PEER_TIMEOUT).await {
                Ok(handed) => {
                    tiebreaker = handed.tiebreaker.or(tiebreaker);
                    (handed.members, handed.epoch.max(held.epoch))
                }
                // With quorum, a majority of the nodes proves what is
                // current: the primary's consent is not needed.
                // (Any failure to talk to it counts; an explicit refusal, such
                // as "not in sync", does not.)
                Err(e)
                    if quorum
                        && how == Takeover::Planned
                        && !matches!(
                            e,
                            ditto_peer::client::ConnectError::Refused { .. }
                                | ditto_peer::client::ConnectError::Superseded { .. }
                        ) =>
                {
                    force = true;
                    (self.force_takeover(name, &held, &held_all).await?, held.epoch)
                }
                Err(e) => {
                    return Err(ControlError::Engine(format!(
                        "node {} (the primary of {name}) did not hand it over: {e}. Without it this node's replica cannot be proven current; if node {} is dead, `ditto volume promote {name} --force` takes it over without it (writes it acknowledged after its last contact with this node are lost)",
                        held.primary, held.primary
                    )))
                }
            }
        };
        let epoch = old_epoch + 1;
        let own = FileReplica::open(self.engine.as_ref(), &held.path, held.volume)
            .await
            .map_err(engine_err)?;
        let layout = own.superblock().layout;
        drop(own);
        let _guard = self.ops.lock().await;
        let me = self.config.node_name.clone();
        let mut replicas: Vec<ReplicaRecord> = held_all
            .iter()
            .map(|h| ReplicaRecord {
                id: h.replica,
                pool: h.pool.clone(),
                path: h.path.clone(),
                node: None,
            })
            .collect();
        for m in &members {
            if replicas.iter().any(|r| r.id == m.replica) {
                continue;
            }
            if m.node == me {
                tracing::warn!(volume = %name, replica = %m.replica, "a replica listed on this node is not held here; left out");
                continue;
            }
            let addr = self
                .dialer
                .dial(&m.node)
                .map(|(a, _)| a)
                .unwrap_or_default();
            replicas.push(ReplicaRecord {
                id: m.replica,
                pool: format!("{}:{}", m.node, m.pool),
                path: PathBuf::from(format!("peer://{addr}/{}", m.replica)),
                node: Some(m.node.clone()),
            });
        }
        let record = VolumeRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            uuid: held.volume,
            size: layout.volume_size,
            region_size: layout.region_size,
            replicas,
            created_unix: now_unix(),
            epoch,
            tiebreaker,
        };
        // Nobody else may write these replicas now: they are this node's volume.
        for h in &held_all {
            if let Some(registry) = self.held.get() {
                registry.release(h.volume, h.replica).await;
            }
            self.store.delete_held_replica(h.replica)?;
        }
        self.store.insert_volume(&record)?;
        let (members, _missing) = self.open_members(&record).await;
        // Keeping this side: every other node's replica is the losing side.
        let discarded: Vec<Uuid> = if discard {
            record
                .replicas
                .iter()
                .filter(|r| r.node.is_some())
                .map(|r| r.id)
                .collect()
        } else {
            Vec::new()
        };
        let opened = self
            .assemble_with(&record, members, false, discarded.clone())
            .await;
        // With quorum the start took an epoch of its own: announce that one.
        let record = match self.record(name) {
            Ok(r) if r.uuid == record.uuid => r,
            _ => record,
        };
        let epoch = record.epoch;
        self.announce_primary(&record).await;
        if !opened {
            let why = match self.runtime(name).as_deref() {
                Some(VolumeRuntime::Starting(w) | VolumeRuntime::Stopped(w)) => w.clone(),
                _ => "it is being started".to_string(),
            };
            let (kind, how) = if force && !quorum {
                (
                    EventKind::ForcedPromote,
                    "by force (the operator's override)",
                )
            } else {
                (EventKind::StartRefused, "as asked")
            };
            self.emit(
                kind,
                name,
                format!("this node took {name} over {how} at epoch {epoch} from node {}, but does not serve it yet: {why}", held.primary),
            );
            return self.volume_info(&record);
        }
        if discard {
            self.rebuild_discarded(&record, &discarded).await;
            self.emit(
                EventKind::SplitBrainResolved,
                name,
                format!(
                    "split brain resolved by the operator: keeping node {me}'s side of {name}; node {}'s replicas are rebuilt from it in full (its writes since the split are discarded)",
                    held.primary
                ),
            );
        } else if force && quorum {
            self.emit(
                EventKind::VolumeStarted,
                name,
                format!(
                    "promoted with quorum: node {} did not answer, and a majority of {name}'s nodes took part, so this node is its primary at epoch {epoch}; node {} is fenced and caught up when it returns",
                    held.primary, held.primary
                ),
            );
        } else if force {
            self.emit(
                EventKind::ForcedPromote,
                name,
                format!(
                    "promoted by force (the operator's override): this node is the primary of {name} at epoch {epoch}; node {} did not answer and is fenced: the replicas refuse it, and when it returns it stops serving {name} and is caught up from here",
                    held.primary
                ),
            );
        } else {
            self.emit(
                EventKind::VolumeStarted,
                name,
                format!(
                    "promoted: this node is the primary of {name} at epoch {epoch} (node {} handed it over)",
                    held.primary
                ),
            );
        }
        self.volume_info(&record)
    }

    /// `ditto volume demote NAME --to NODE` on the primary: node `to`, which
    /// holds an in-sync replica, takes the volume over by a planned promote
    /// (it asks this node to hand over, with the same checks).
    pub async fn demote(&self, name: &str, to: &str) -> Result<(), ControlError> {
        let record = self.record(name)?;
        if !record
            .replicas
            .iter()
            .any(|r| r.node.as_deref() == Some(to))
        {
            return Err(ControlError::InvalidRequest(format!(
                "node {to} holds no replica of {name}; its replicas are on {}",
                record
                    .replicas
                    .iter()
                    .map(|r| r
                        .node
                        .clone()
                        .unwrap_or_else(|| self.config.node_name.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (addr, dial) = self.dialer.dial(to).map_err(ControlError::InvalidRequest)?;
        ditto_peer::client::take_over(&addr, &dial, record.uuid, crate::peers::PEER_TIMEOUT * 3)
            .await
            .map_err(|e| ControlError::Engine(format!("node {to} did not take {name} over: {e}")))
    }

    /// Rebuild in full the replicas of the losing side of a split brain.
    async fn rebuild_discarded(&self, record: &VolumeRecord, discarded: &[Uuid]) {
        let Ok(volume) = self.running(&record.name) else {
            return;
        };
        for r in record.replicas.iter().filter(|r| discarded.contains(&r.id)) {
            if let Ok(mut s) = self.split_brains.lock() {
                s.remove(&r.id);
            }
            match self.open_replica(record, r).await {
                Ok(b) => {
                    if let Err(e) = volume.readd(r.id, b, true).await {
                        tracing::warn!(volume = %record.name, replica = %r.pool, error = %e, "cannot rebuild a discarded replica; the reconnect loop retries");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %record.name, replica = %r.pool, error = %e, "discarded replica unreachable; the reconnect loop retries")
                }
            }
        }
    }

    /// `ditto volume resolve NAME --keep NODE` across nodes. On the primary
    /// with `keep` = this node: the replicas in a split brain are rebuilt
    /// from this side in full. On a node holding a diverged replica with
    /// `keep` = this node: the primary hands the volume over without its
    /// replicas in sync, and they are rebuilt from this side.
    pub async fn resolve_between_nodes(
        self: &Arc<Self>,
        name: &str,
        keep: &str,
    ) -> Result<VolumeInfo, ControlError> {
        let me = self.config.node_name.clone();
        if keep != me {
            let runs_here = self.record(name).is_ok();
            return Err(ControlError::InvalidRequest(format!(
                "run `ditto volume resolve {name} --keep {keep}` on node {keep}: the kept side resolves it (this node, {me}, {} and its writes since the split would be discarded)",
                if runs_here { "is the volume's primary" } else { "holds a replica of it" }
            )));
        }
        if self.record(name).is_err() {
            return self.take_over(name, Takeover::KeepThisSide).await;
        }
        let record = self.record(name)?;
        let split: Vec<Uuid> = record
            .replicas
            .iter()
            .filter(|r| self.split_brain_of(r.id).is_some())
            .map(|r| r.id)
            .collect();
        if split.is_empty() {
            return Err(ControlError::InvalidRequest(format!(
                "volume {name} has no replica in a split brain on this node (`ditto status {name}`)"
            )));
        }
        let _guard = self.ops.lock().await;
        self.rebuild_discarded(&record, &split).await;
        self.emit(
            EventKind::SplitBrainResolved,
            name,
            format!("split brain resolved by the operator: keeping node {me}'s side of {name}; the other side's replicas are rebuilt from it in full (its writes since the split are discarded)"),
        );
        self.volume_info(&record)
    }

    /// `promote --force`: only when the primary does not answer (a planned
    /// switch-over loses nothing, so it is used whenever it can be). Every
    /// other node holding a replica is told of the new epoch before this
    /// node writes, so none serves the old primary again. Returns the
    /// volume's replicas as last announced.
    async fn force_takeover(
        &self,
        name: &str,
        held: &HeldReplicaRecord,
        held_all: &[HeldReplicaRecord],
    ) -> Result<Vec<ditto_peer::wire::MemberRef>, ControlError> {
        let me = self.config.node_name.clone();
        if let Ok((addr, dial)) = self.dialer.dial(&held.primary) {
            if ditto_peer::client::ping(&addr, &dial, Duration::from_secs(3))
                .await
                .is_ok()
            {
                return Err(ControlError::InvalidRequest(format!(
                    "node {} (the primary of {name}) answers: run `ditto volume promote {name}` without --force, a planned switch-over that loses nothing",
                    held.primary
                )));
            }
        }
        let mut members = crate::peers::member_refs(&held.members);
        for h in held_all {
            if !members.iter().any(|m| m.replica == h.replica) {
                members.push(ditto_peer::wire::MemberRef {
                    replica: h.replica,
                    node: me.clone(),
                    pool: h.pool.clone(),
                });
            }
        }
        // Replicas the primary never announced: its own (a primary made
        // before announcements existed). They are on the old primary.
        if let Ok(own) = FileReplica::open(self.engine.as_ref(), &held.path, held.volume).await {
            for e in own.superblock().replica_set {
                if !members.iter().any(|m| m.replica == e.replica) {
                    members.push(ditto_peer::wire::MemberRef {
                        replica: e.replica,
                        node: held.primary.clone(),
                        pool: "unknown".into(),
                    });
                }
            }
        }
        let claim = ditto_peer::wire::PrimaryClaim {
            volume: held.volume,
            epoch: held.epoch + 1,
            members: members.clone(),
            tiebreaker: held.tiebreaker.clone(),
        };
        // The tiebreaker votes, and must follow this node from now on.
        let voters: std::collections::BTreeSet<&str> = members
            .iter()
            .map(|m| m.node.as_str())
            .chain(held.tiebreaker.as_deref())
            .collect();
        let nodes: Vec<&str> = voters
            .iter()
            .copied()
            .filter(|n| *n != me && *n != held.primary)
            .collect();
        // With quorum, a majority of the volume's nodes must answer before
        // any is told: the replicas they hold prove what is current (every
        // acknowledged write is on a majority), and a minority may not write.
        if self.config.quorum_for(name).is_some() {
            let mut reached = vec![me.clone()];
            for node in &nodes {
                if let Ok((addr, dial)) = self.dialer.dial(node) {
                    if ditto_peer::client::ping(&addr, &dial, Duration::from_secs(3))
                        .await
                        .is_ok()
                    {
                        reached.push(node.to_string());
                    }
                }
            }
            let need = voters.len() / 2 + 1;
            if reached.len() < need {
                return Err(ControlError::InvalidRequest(format!(
                    "no quorum: this node reaches {} of the {} nodes of {name} ({}), {need} needed (quorum = \"majority\"); not promoted. Reconnect the nodes and retry",
                    reached.len(),
                    voters.len(),
                    reached.join(", ")
                )));
            }
        }
        if let Some(why) = self.proven_stale_here(name, held, held_all).await {
            return Err(ControlError::InvalidRequest(why));
        }
        for node in nodes {
            match self.send_claim(node, &claim).await {
                None | Some(Ok(_)) => {}
                Some(Err(ditto_peer::client::ConnectError::Superseded { why, .. })) => {
                    return Err(ControlError::InvalidRequest(format!(
                        "node {node} refused this node's takeover of {name}: {why}; not promoted"
                    )));
                }
                Some(Err(e)) => {
                    tracing::warn!(volume = %name, node, error = %e, "node holding a replica did not hear of the takeover; it is told when it answers")
                }
            }
        }
        tracing::warn!(volume = %name, old_primary = %held.primary, epoch = held.epoch + 1, "promoted by force (operator's override)");
        Ok(members)
    }

    /// Why a takeover here would start from replicas the volume's
    /// tiebreaker proves stale (the old primary acknowledged writes they
    /// lack, with the tiebreaker's vote), or None. Asked before the claim:
    /// a claim makes the tiebreaker follow this node, and the old primary
    /// would lose its vote for a start that cannot serve. (The engine
    /// refuses such a start anyway; this says so up front.)
    async fn proven_stale_here(
        &self,
        name: &str,
        held: &HeldReplicaRecord,
        held_all: &[HeldReplicaRecord],
    ) -> Option<String> {
        let tiebreaker = held.tiebreaker.as_deref()?;
        let query = ditto_peer::wire::WitnessOp::Query;
        let record = self
            .ask_witness(tiebreaker, held.volume, name, held.epoch, query)
            .await
            .ok()??;
        let mut here = Vec::new();
        for h in held_all {
            let sb = FileReplica::open(self.engine.as_ref(), &h.path, h.volume)
                .await
                .ok()?
                .superblock();
            if record.vouches_for(&sb) {
                return None;
            }
            here.push(format!(
                "{} at epoch {} generation {}",
                &h.replica.simple().to_string()[..8],
                sb.epoch,
                sb.generation
            ));
        }
        let listed: Vec<String> = record
            .in_sync
            .iter()
            .map(|id| id.simple().to_string()[..8].to_string())
            .collect();
        Some(format!(
            "not promoted: tiebreaker {tiebreaker} recorded epoch {} generation {} with only replica(s) {} in sync, and this node's ({}) are older and not among them: node {} acknowledged writes this node lacks. Bring node {} back (it catches this node up), then promote if you still want to switch",
            record.epoch,
            record.generation,
            listed.join(", "),
            here.join(", "),
            held.primary,
            held.primary
        ))
    }

    /// Create one replica of `volume` in pool `pool` of node `node`, and
    /// connect to it.
    pub(super) async fn create_remote_replica(
        &self,
        node: &str,
        pool: &str,
        volume_name: &str,
        volume_uuid: Uuid,
        layout: Layout,
    ) -> Result<(ReplicaRecord, Arc<dyn ReplicaBackend>), ControlError> {
        let id = Uuid::new_v4();
        let (addr, dial) = self
            .dialer
            .dial(node)
            .map_err(ControlError::InvalidRequest)?;
        let req = ditto_peer::wire::CreateReplica {
            volume: volume_uuid,
            replica: id,
            size: layout.volume_size,
            region_size: layout.region_size,
            pool: pool.to_string(),
            volume_name: volume_name.to_string(),
        };
        let remote_err = |e: ditto_peer::client::ConnectError| {
            ControlError::Engine(format!("creating a replica on node {node}: {e}"))
        };
        ditto_peer::client::create_replica(&addr, &dial, &req, crate::peers::PEER_TIMEOUT)
            .await
            .map_err(remote_err)?;
        let backend = ditto_peer::RemoteReplica::connect(
            &addr,
            &dial,
            volume_uuid,
            id,
            crate::peers::PEER_TIMEOUT,
        )
        .await
        .map_err(remote_err)?;
        let location = backend.location().to_string();
        Ok((
            ReplicaRecord {
                id,
                pool: format!("{node}:{pool}"),
                path: PathBuf::from(location),
                node: Some(node.to_string()),
            },
            backend,
        ))
    }

    /// Every `peer_reconnect_secs`, try the replicas on other nodes that are
    /// out (their node died or was cut off) and re-add those that answer:
    /// the engine then catches each up by its dirty map, or rebuilds it when
    /// the generations say so. Replicas failed on purpose are left alone.
    pub(super) fn spawn_peer_reconnect(self: Arc<Self>) {
        let every = self.config.peer_reconnect_secs;
        if every == 0 {
            return;
        }
        let weak = Arc::downgrade(&self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                let Some(node) = weak.upgrade() else { return };
                node.reconnect_peers().await;
            }
        });
    }

    pub(super) async fn reconnect_peers(self: &Arc<Self>) {
        for (name, rt) in self.runtimes() {
            let VolumeRuntime::Running(volume) = rt.as_ref() else {
                continue;
            };
            let Ok(record) = self.record(&name) else {
                continue;
            };
            // The tiebreaker's heartbeat: wins a lost vote back, or loses it
            // when the tiebreaker follows another primary now.
            volume.refresh_tiebreaker().await;
            // Every in-sync replica is gone through this instance: nothing
            // can be re-added to it (a re-add records itself on an in-sync
            // replica). A new instance connects afresh.
            if let Some(why) = volume.stranded() {
                self.restart_stranded(&name, volume, why).await;
                continue;
            }
            // Replicas on other nodes that are out, and a replica on this
            // node found stale at a start (the volume moved on at another
            // node while this one was away); one that failed here (its
            // disk) waits for the operator.
            let replicated = record.replicas.iter().any(|r| r.node.is_some());
            let out: Vec<(Uuid, ReplicaState)> = volume
                .members()
                .iter()
                .filter(|m| m.awaits_readd())
                .map(|m| (m.id, m.state))
                .collect();
            for r in record.replicas.iter().filter(|r| {
                out.iter().any(|(id, state)| {
                    *id == r.id
                        && (r.node.is_some() || (replicated && *state == ReplicaState::Stale))
                })
            }) {
                if self
                    .failed_on_purpose
                    .lock()
                    .is_ok_and(|s| s.contains(&r.id))
                    || self.split_brain_of(r.id).is_some()
                {
                    continue;
                }
                // Connect first (it may take PEER_TIMEOUT), then re-add under
                // the control lock, as `replica readd` does.
                let backend = match self.open_replica(&record, r).await {
                    Ok(b) => b,
                    Err(_) => {
                        if self.settle_primaries(&record).await {
                            break; // handed over: nothing more to re-add
                        }
                        continue; // still away; try again next round
                    }
                };
                let _guard = self.ops.lock().await;
                match volume.readd(r.id, backend, false).await {
                    Ok(plan) => {
                        tracing::info!(volume = %name, replica = %r.pool, ?plan, "replica on another node is back; re-added");
                        drop(_guard);
                        self.announce_primary(&record).await;
                    }
                    // With quorum the returning side had no majority, so it
                    // acknowledged nothing of its own: it is rebuilt.
                    Err(ditto_engine::EngineError::SplitBrain { .. })
                        if self.config.quorum_for(&name).is_some() =>
                    {
                        let rebuilt = match self.open_replica(&record, r).await {
                            Ok(b) => volume.readd(r.id, b, true).await.map(|_| ()),
                            Err(e) => Err(ditto_engine::EngineError::Backend(e)),
                        };
                        let msg = format!(
                            "the replica on node {} took writes on its own while cut off, without quorum, so none was acknowledged: it is rebuilt from this side ({})",
                            r.node.as_deref().unwrap_or(&self.config.node_name),
                            match &rebuilt {
                                Ok(()) => "started".to_string(),
                                Err(e) => format!("not started: {e}; retried"),
                            }
                        );
                        self.emit(EventKind::SplitBrainResolved, &name, msg);
                    }
                    Err(ditto_engine::EngineError::SplitBrain { .. }) => {
                        let why = format!(
                            "split brain: the replica on node {} took writes of its own after it was cut off from this node (both sides acted as primary); it is not merged. Keep this side with `ditto volume resolve {name} --keep {}` (its writes are discarded), or the other side with `ditto volume resolve {name} --keep {}` on node {}",
                            r.node.as_deref().unwrap_or(&self.config.node_name),
                            self.config.node_name,
                            r.node.as_deref().unwrap_or(&self.config.node_name),
                            r.node.as_deref().unwrap_or(&self.config.node_name),
                        );
                        if let Ok(mut s) = self.split_brains.lock() {
                            s.insert(r.id, why.clone());
                        }
                        self.emit(EventKind::SplitBrain, &name, why);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, replica = %r.pool, error = %e, "replica on another node answers but cannot be re-added")
                    }
                }
            }
        }
    }

    /// Close an instance that lost every in-sync replica and start the
    /// volume again. Found by the cluster simulator (seed 92 of `--seeds 100`).
    async fn restart_stranded(self: &Arc<Self>, name: &str, volume: &Arc<Volume>, why: String) {
        let _guard = self.ops.lock().await;
        tracing::warn!(volume = %name, %why, "volume stranded; starting it again");
        if let Some(server) = self.nbd.get() {
            server.disconnect_export(name);
        }
        self.set_runtime(name, Some(VolumeRuntime::Starting(why.clone())));
        let _ = volume.close().await;
        self.keep_draining(name, volume);
        let why = format!("{why}; started again to connect afresh");
        self.emit(EventKind::VolumeStopped, name, why.clone());
        self.spawn_restart(name, why);
    }

    /// A replica's node refused this node as primary: hand the volume over
    /// when that node's primary has a newer epoch (true), or tell it of
    /// this node's newer one, so the old primary there steps down.
    async fn settle_primaries(self: &Arc<Self>, record: &VolumeRecord) -> bool {
        if let Some((by, epoch)) = self.superseded_by(record) {
            self.spawn_become_secondary(record, by, epoch);
            return true;
        }
        let older = self
            .superseded_seen
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&record.uuid));
        if older.is_some() {
            self.announce_primary(record).await;
        }
        false
    }

    /// Why replica `id` is in a split brain, if it is.
    pub(super) fn split_brain_of(&self, id: Uuid) -> Option<String> {
        self.split_brains.lock().ok()?.get(&id).cloned()
    }
}

impl Node {
    /// `ditto node add NAME --address HOST:PORT`: only a node that answers
    /// at that address under that name (with TLS, proved by its
    /// certificate) is recorded; anything else changes nothing.
    pub async fn add_node(
        &self,
        req: crate::api_types::AddNode,
    ) -> Result<crate::api_types::PeerNodeInfo, ControlError> {
        validate::node_name(&req.name).map_err(ControlError::InvalidRequest)?;
        let me = &self.config.node_name;
        if &req.name == me {
            return Err(ControlError::InvalidRequest(format!(
                "{:?} is this node's own name (node_name); add the other nodes",
                req.name
            )));
        }
        if let Some(in_config) = self.dialer.in_config(&req.name) {
            let (addr, _) = self
                .dialer
                .dial(&req.name)
                .map_err(ControlError::InvalidRequest)?;
            return Err(ControlError::InvalidRequest(format!(
                "node {:?} is known already, at {addr} ({}); node names are unique",
                req.name,
                if in_config {
                    "from the config's [nodes]"
                } else {
                    "added before; `ditto node remove` it first to change its address"
                }
            )));
        }
        let port_ok = req.address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(ControlError::InvalidRequest(format!(
                "address {:?} is not HOST:PORT (the node's peer_listen, e.g. 192.0.2.2:10811)",
                req.address
            )));
        }
        let dial = self.dialer.dial_as(&req.name);
        let pong = ditto_peer::client::ping(&req.address, &dial, Duration::from_secs(5))
            .await
            .map_err(|e| {
                ControlError::InvalidRequest(format!(
                    "node {:?} at {} does not answer: {e}; nothing was added",
                    req.name, req.address
                ))
            })?;
        if pong.node != req.name {
            return Err(ControlError::InvalidRequest(format!(
                "the node at {} says it is node {:?}, not {:?}; check the address; nothing was added",
                req.address, pong.node, req.name
            )));
        }
        self.store.insert_node(&ditto_control::model::NodeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            address: req.address.clone(),
            added_unix: now_unix(),
        })?;
        self.dialer.add(&req.name, &req.address);
        tracing::info!(node = %req.name, address = %req.address, "node added");
        Ok(crate::api_types::PeerNodeInfo {
            name: req.name,
            address: req.address,
            connected: true,
            rtt_ms: Some(pong.rtt.as_secs_f64() * 1000.0),
            protocol: Some(pong.version),
            error: None,
            source: "added".into(),
        })
    }

    /// `ditto node remove NAME`: a node added with `node add` that holds no
    /// replica of this node's volumes, and is no primary of replicas here.
    pub async fn remove_node(&self, name: &str) -> Result<(), ControlError> {
        match self.dialer.in_config(name) {
            None => {
                return Err(ControlError::InvalidRequest(format!(
                    "node {name:?} is not known here (`ditto node list`)"
                )))
            }
            Some(true) => {
                return Err(ControlError::InvalidRequest(format!(
                    "node {name:?} is listed in the config's [nodes]; remove it there and restart the daemon"
                )))
            }
            Some(false) => {}
        }
        let _guard = self.ops.lock().await;
        let using: Vec<String> = self
            .store
            .volumes()?
            .into_iter()
            .filter(|v| v.replicas.iter().any(|r| r.node.as_deref() == Some(name)))
            .map(|v| v.name)
            .collect();
        if !using.is_empty() {
            return Err(ControlError::InvalidRequest(format!(
                "node {name:?} holds replicas of {}; move them first (`ditto replica remove`)",
                using.join(", ")
            )));
        }
        let judged: Vec<String> = self
            .store
            .volumes()?
            .into_iter()
            .filter(|v| v.tiebreaker.as_deref() == Some(name))
            .map(|v| v.name)
            .collect();
        if !judged.is_empty() {
            return Err(ControlError::InvalidRequest(format!(
                "node {name:?} is the tiebreaker of {}; a volume keeps its tiebreaker until it is deleted",
                judged.join(", ")
            )));
        }
        let following: Vec<String> = self
            .store
            .held_replicas()?
            .into_iter()
            .filter(|h| h.primary == name)
            .map(|h| h.volume_name)
            .collect();
        if !following.is_empty() {
            return Err(ControlError::InvalidRequest(format!(
                "node {name:?} is the primary of {}, whose replicas this node holds",
                following.join(", ")
            )));
        }
        self.store.delete_node(name)?;
        self.dialer.remove(name);
        tracing::info!(node = %name, "node removed");
        Ok(())
    }
}

/// The nodes a primary claim of `record` goes to: those holding its
/// replicas, and its tiebreaker.
pub(super) fn claim_nodes(record: &VolumeRecord) -> std::collections::BTreeSet<&str> {
    let mut nodes = replica_nodes(record);
    nodes.extend(record.tiebreaker.as_deref());
    nodes
}

/// The other nodes holding replicas of `record`, each once.
pub(super) fn replica_nodes(record: &VolumeRecord) -> std::collections::BTreeSet<&str> {
    record
        .replicas
        .iter()
        .filter_map(|r| r.node.as_deref())
        .collect()
}
