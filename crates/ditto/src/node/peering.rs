//! This node among its peers: replicas on other nodes, reconnecting them, and handing a volume over (promote).

use super::*;

impl Node {
    pub fn dialer(&self) -> &crate::peers::Dialer {
        &self.dialer
    }

    pub fn set_held(&self, held: Arc<crate::peers::HeldReplicas>) {
        let _ = self.held.set(held);
    }

    /// Node `to` takes volume `volume` over (its `volume promote`): stop
    /// being its primary, and hold this node's replicas of it for `to`.
    /// Only when `to`'s replica is in sync, so nothing acknowledged is lost.
    /// Returns the replicas now held for `to`, and every replica of the volume.
    pub async fn demote_to(
        &self,
        to: &str,
        volume: Uuid,
    ) -> Result<(Vec<HeldReplicaRecord>, Vec<ditto_peer::wire::MemberRef>), String> {
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
            let held: Vec<_> = self
                .store
                .held_replicas()
                .map_err(err)?
                .into_iter()
                .filter(|h| h.volume == volume && h.primary == to)
                .map(|h| ditto_peer::wire::MemberRef {
                    replica: h.replica,
                    node: me.clone(),
                    pool: h.pool,
                })
                .collect();
            if held.is_empty() {
                return Err(format!(
                    "node {me} is not the primary of volume {volume} and holds none of its replicas for {to}"
                ));
            }
            return Ok((Vec::new(), held));
        };
        let name = record.name.clone();
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
        if state != Some(ReplicaState::InSync) {
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
            return Err(format!(
                "volume {name} could not be closed cleanly: {e}; not handed over"
            ));
        }
        let members = record
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
            .collect();
        let mut held = Vec::new();
        for r in record.replicas.iter().filter(|r| r.node.is_none()) {
            let h = HeldReplicaRecord {
                version: RECORD_VERSION,
                volume,
                replica: r.id,
                volume_name: name.clone(),
                pool: r.pool.clone(),
                path: r.path.clone(),
                primary: to.to_string(),
                created_unix: now_unix(),
            };
            self.store.insert_held_replica(&h).map_err(err)?;
            held.push(h);
        }
        self.store.delete_volume(&name).map_err(err)?;
        let _ = self.store.delete_membership(volume);
        self.set_runtime(&name, None);
        self.emit(
            EventKind::VolumeStopped,
            &name,
            format!(
                "handed over to node {to}, its new primary; this node holds its replica(s) for it"
            ),
        );
        Ok((held, members))
    }

    /// `ditto volume promote NAME` on a node holding a replica of it: the
    /// primary hands the volume over (only with this node's replica in
    /// sync), and this node serves it from then on.
    pub async fn promote(&self, name: &str, force: bool) -> Result<VolumeInfo, ControlError> {
        validate::name("volume", name)?;
        if self.record(name).is_ok() {
            return Err(ControlError::InvalidRequest(format!(
                "volume {name:?} is already primary on this node"
            )));
        }
        let held = self
            .store
            .held_replicas()?
            .into_iter()
            .find(|h| h.volume_name == name)
            .ok_or_else(|| {
                ControlError::InvalidRequest(format!(
                    "this node holds no replica of volume {name:?}, so it cannot become its primary"
                ))
            })?;
        if force {
            return Err(ControlError::InvalidRequest(format!(
                "`--force` (promoting without node {}'s consent) is not available yet: the old primary must be fenced when it returns, and that is not built. Bring node {} back and promote again",
                held.primary, held.primary
            )));
        }
        let (addr, dial) = self
            .dialer
            .dial(&held.primary)
            .map_err(ControlError::InvalidRequest)?;
        let members = ditto_peer::client::demote(&addr, &dial, held.volume, crate::peers::PEER_TIMEOUT)
            .await
            .map_err(|e| {
                ControlError::Engine(format!(
                    "node {} (the primary of {name}) did not hand it over: {e}. Without it this node's replica cannot be proven current",
                    held.primary
                ))
            })?;
        let own = FileReplica::open(self.engine.as_ref(), &held.path, held.volume)
            .await
            .map_err(engine_err)?;
        let layout = own.superblock().layout;
        drop(own);
        let _guard = self.ops.lock().await;
        let mut replicas = Vec::new();
        for m in &members {
            if m.replica == held.replica {
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
        replicas.insert(
            0,
            ReplicaRecord {
                id: held.replica,
                pool: held.pool.clone(),
                path: held.path.clone(),
                node: None,
            },
        );
        let record = VolumeRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            uuid: held.volume,
            size: layout.volume_size,
            region_size: layout.region_size,
            replicas,
            created_unix: now_unix(),
        };
        // Nobody else may write this replica now: it is this node's volume.
        if let Some(h) = self.held.get() {
            h.release(held.volume, held.replica).await;
        }
        self.store.delete_held_replica(held.replica)?;
        self.store.insert_volume(&record)?;
        let (members, _missing) = self.open_members(&record).await;
        self.assemble(&record, members, false).await;
        self.emit(
            EventKind::VolumeStarted,
            name,
            format!(
                "promoted: this node is the primary of {name} now (node {} handed it over)",
                held.primary
            ),
        );
        self.volume_info(&record)
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

    pub(super) async fn reconnect_peers(&self) {
        for (name, rt) in self.runtimes() {
            let VolumeRuntime::Running(volume) = rt.as_ref() else {
                continue;
            };
            let Ok(record) = self.record(&name) else {
                continue;
            };
            let out: Vec<Uuid> = volume
                .members()
                .iter()
                .filter(|m| {
                    matches!(
                        m.state,
                        ReplicaState::Failed | ReplicaState::Missing | ReplicaState::Stale
                    ) && m.pending == 0
                })
                .map(|m| m.id)
                .collect();
            for r in record
                .replicas
                .iter()
                .filter(|r| r.node.is_some() && out.contains(&r.id))
            {
                if self
                    .failed_on_purpose
                    .lock()
                    .is_ok_and(|s| s.contains(&r.id))
                {
                    continue;
                }
                // Connect first (it may take PEER_TIMEOUT), then re-add under
                // the control lock, as `replica readd` does.
                let Ok(backend) = self.open_replica(&record, r).await else {
                    continue; // still away; try again next round
                };
                let _guard = self.ops.lock().await;
                match volume.readd(r.id, backend, false).await {
                    Ok(plan) => {
                        tracing::info!(volume = %name, replica = %r.pool, ?plan, "replica on another node is back; re-added")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, replica = %r.pool, error = %e, "replica on another node answers but cannot be re-added")
                    }
                }
            }
        }
    }
}
