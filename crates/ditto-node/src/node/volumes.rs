//! Volumes: creating and deleting them with their replicas, scrubbing, and what status shows.

use super::*;

impl Node {
    /// Create one replica of `volume` in `pool`: a new sparse file in a
    /// directory pool, or a freshly formatted device or remote export.
    pub(super) async fn create_replica(
        &self,
        pool: &PoolRecord,
        volume_name: &str,
        volume_uuid: Uuid,
        layout: Layout,
    ) -> Result<(ReplicaRecord, Arc<dyn ReplicaBackend>), ControlError> {
        let id = Uuid::new_v4();
        let (path, backend) = match pool.kind {
            PoolKind::Directory => {
                let path = pool.path.join(format!(
                    "{volume_name}-{}.replica",
                    &id.simple().to_string()[..8]
                ));
                let b =
                    FileReplica::create(self.engine.as_ref(), &path, volume_uuid, id, layout).await;
                (path, b)
            }
            PoolKind::Device | PoolKind::Nbd => {
                let file = self.open_io(pool.kind, &pool.path).await.map_err(|e| {
                    ControlError::Engine(format!(
                        "cannot open pool {:?} at {}: {e}",
                        pool.name,
                        pool.path.display()
                    ))
                })?;
                let b = FileReplica::format_on(
                    file,
                    pool.path.display().to_string(),
                    volume_uuid,
                    id,
                    layout,
                )
                .await;
                (pool.path.clone(), b)
            }
        };
        let backend = backend.map_err(|e| {
            ControlError::Engine(format!("creating replica in pool {:?}: {e}", pool.name))
        })?;
        Ok((
            ReplicaRecord {
                id,
                pool: pool.name.clone(),
                path,
                node: None,
            },
            backend as Arc<dyn ReplicaBackend>,
        ))
    }

    /// Remove a replica's storage: delete the file of a directory pool; leave
    /// devices and remote exports as they are (their superblock names the old volume).
    pub(super) fn discard_replica(&self, r: &ReplicaRecord, volume: Uuid) {
        if let Some(node) = &r.node {
            // Asked of that node in the background: it may be down, and the
            // volume is gone here either way (its copy there is logged).
            let Ok((addr, dial)) = self.dialer.dial(node) else {
                tracing::warn!(node = %node, replica = %r.id, "replica on a node no longer in the config left in place");
                return;
            };
            let (node, id) = (node.clone(), r.id);
            tokio::spawn(async move {
                match ditto_peer::client::delete_replica(
                    &addr,
                    &dial,
                    volume,
                    id,
                    crate::peers::PEER_TIMEOUT,
                )
                .await
                {
                    Ok(()) => {
                        tracing::info!(node = %node, replica = %id, "replica on another node deleted")
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, replica = %id, error = %e, "replica on another node could not be deleted; it stays there (held_replicas in its status)")
                    }
                }
            });
            return;
        }
        if self.pool_kind(&r.pool) == PoolKind::Directory {
            if let Err(e) = std::fs::remove_file(&r.path) {
                tracing::warn!(path = %r.path.display(), error = %e, "could not remove replica file");
            }
        }
    }

    pub async fn create_volume(&self, mut req: CreateVolume) -> Result<VolumeInfo, ControlError> {
        validate::name("volume", &req.name)?;
        let size = match &req.size {
            SizeInput::Bytes(b) => {
                if *b == 0 {
                    return Err(ControlError::InvalidSize {
                        input: "0".into(),
                        why: "a volume cannot be empty".into(),
                    });
                }
                *b
            }
            SizeInput::Text(t) => validate::parse_size(t)?,
        };
        if req.replicas.is_some() && !req.pools.is_empty() {
            return Err(ControlError::InvalidRequest(
                "give either --replicas N or --pool options, not both".into(),
            ));
        }
        let count = req.replicas.unwrap_or(2);
        if req.pools.is_empty() && !(1..=8).contains(&count) {
            return Err(ControlError::InvalidRequest(format!(
                "--replicas {count}: between 1 and 8 replicas"
            )));
        }
        for p in req.pools.iter().filter(|p| !p.contains(':')) {
            validate::name("pool", p)?;
        }
        let region_size = match &req.region_size {
            None => DEFAULT_REGION_SIZE,
            Some(text) => {
                let r = validate::parse_size(text)?;
                if !r.is_power_of_two() || !(4096..=1 << 30).contains(&r) {
                    return Err(ControlError::InvalidSize {
                        input: text.clone(),
                        why: "a region size must be a power of two between 4K and 1G".into(),
                    });
                }
                r as u32
            }
        };
        let layout = Layout::new(size, region_size)
            .map_err(|e| ControlError::InvalidRequest(e.to_string()))?;
        if !req.nodes.is_empty() {
            if req.replicas.is_some() || !req.pools.is_empty() {
                return Err(ControlError::InvalidRequest(
                    "give one of --nodes, --pool or --replicas".into(),
                ));
            }
            req.pools = self
                .place_on_nodes(&req.nodes, layout.replica_len())
                .await?;
        }
        if let Some(t) = &req.tiebreaker {
            self.check_tiebreaker(&req.name, t, &req.pools)?;
        }
        let _guard = self.ops.lock().await;
        let volumes = self.store.volumes()?;
        if volumes.iter().any(|v| v.name == req.name) {
            return Err(ControlError::VolumeExists(req.name));
        }
        let pools = self.store.pools()?;
        let usages = self.pool_usages(&pools, &volumes);
        // `NODE:POOL` is a pool on another node: created there, reached over
        // the peer protocol. The rest are placed here.
        let (remote, local): (Vec<String>, Vec<String>) =
            req.pools.iter().cloned().partition(|p| p.contains(':'));
        let mut remote_pools = Vec::new();
        for spec in &remote {
            let (node, pool) = spec.split_once(':').unwrap_or_default();
            validate::node_name(node).map_err(ControlError::InvalidRequest)?;
            validate::name("pool", pool)?;
            self.dialer
                .dial(node)
                .map_err(ControlError::InvalidRequest)?;
            if remote_pools
                .iter()
                .any(|(n, _): &(String, String)| n == node)
            {
                return Err(ControlError::InvalidRequest(format!(
                    "two replicas on node {node}: a second copy on the same machine does not survive its loss; use another node"
                )));
            }
            remote_pools.push((node.to_string(), pool.to_string()));
        }
        let chosen = if local.is_empty() && !remote.is_empty() {
            Vec::new()
        } else {
            placement::place(count, &local, &usages, layout.replica_len())?
        };

        let uuid = Uuid::new_v4();
        let mut created: Vec<(ReplicaRecord, Arc<dyn ReplicaBackend>)> = Vec::new();
        let cleanup = |created: &[(ReplicaRecord, Arc<dyn ReplicaBackend>)]| {
            for (r, _) in created {
                self.discard_replica(r, uuid);
            }
        };
        for (node, pool) in &remote_pools {
            match self
                .create_remote_replica(node, pool, &req.name, uuid, layout)
                .await
            {
                Ok(c) => created.push(c),
                Err(e) => {
                    cleanup(&created);
                    return Err(e);
                }
            }
        }
        for pool_name in &chosen {
            let Some(pool) = pools.iter().find(|p| &p.name == pool_name) else {
                cleanup(&created);
                return Err(ControlError::PoolNotFound(pool_name.clone()));
            };
            match self.create_replica(pool, &req.name, uuid, layout).await {
                Ok(c) => created.push(c),
                Err(e) => {
                    cleanup(&created);
                    return Err(e);
                }
            }
        }
        let record = VolumeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            uuid,
            size,
            region_size: layout.region_size,
            replicas: created.iter().map(|(r, _)| r.clone()).collect(),
            created_unix: now_unix(),
            epoch: 1,
            tiebreaker: req.tiebreaker.clone(),
        };
        // The tiebreaker follows this node at epoch 1 from the start.
        let mut tiebreaker = None;
        if let Some(t) = &record.tiebreaker {
            if let Err(e) = self
                .tell_witness(&record, t, ditto_peer::wire::WitnessOp::Create)
                .await
            {
                cleanup(&created);
                return Err(ControlError::InvalidRequest(format!(
                    "node {t} did not become the tiebreaker of {}: {e}; nothing was created",
                    record.name
                )));
            }
            tiebreaker = self.tiebreaker_for(&record, Some(ditto_engine::VoteRecord::default()));
        }
        let drop_witness = || async {
            if let Some(t) = &record.tiebreaker {
                let _ = self
                    .tell_witness(&record, t, ditto_peer::wire::WitnessOp::Delete)
                    .await;
            }
        };
        let members = created
            .iter()
            .map(|(r, b)| self.member(r, b.clone() as Arc<dyn ReplicaBackend>))
            .collect();
        let volume = match Volume::open(
            &record.name,
            uuid,
            size,
            members,
            VolumeOptions {
                epoch: 1,
                tiebreaker,
                ..self.options_for(&req.name)
            },
            self.events.clone(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                cleanup(&created);
                drop_witness().await;
                return Err(engine_err(e));
            }
        };
        if let Err(e) = self.store.insert_volume(&record) {
            let _ = volume.close().await;
            cleanup(&created);
            drop_witness().await;
            return Err(e);
        }
        tracing::info!(volume = %record.name, size, pools = ?chosen, "volume created");
        self.set_runtime(&record.name, Some(VolumeRuntime::Running(volume)));
        self.announce_primary(&record).await;
        self.volume_info(&record)
    }

    /// `--nodes a,b`: on each node the pool with the most room that fits a
    /// replica of `need` bytes (asked of the other nodes, `ListPools`).
    async fn place_on_nodes(
        &self,
        nodes: &[String],
        need: u64,
    ) -> Result<Vec<String>, ControlError> {
        let me = &self.config.node_name;
        let mut pools = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            validate::node_name(node).map_err(ControlError::InvalidRequest)?;
            if nodes[..i].contains(node) {
                return Err(ControlError::InvalidRequest(format!(
                    "node {node} is named twice in --nodes: two copies on one machine do not survive its loss"
                )));
            }
            let rooms: Vec<(String, u64)> = if node == me {
                let local = self.store.pools()?;
                let volumes = self.store.volumes()?;
                local
                    .iter()
                    .zip(self.pool_usages(&local, &volumes))
                    .filter(|(p, _)| p.kind == PoolKind::Directory)
                    .map(|(p, u)| (p.name.clone(), u.free_bytes))
                    .collect()
            } else {
                let (addr, dial) = self
                    .dialer
                    .dial(node)
                    .map_err(ControlError::InvalidRequest)?;
                ditto_peer::client::list_pools(&addr, &dial, crate::peers::PEER_TIMEOUT)
                    .await
                    .map_err(|e| {
                        ControlError::Engine(format!("asking node {node} for its pools: {e}"))
                    })?
                    .into_iter()
                    .map(|p| (p.pool, p.free))
                    .collect()
            };
            let Some((pool, free)) = rooms.iter().max_by_key(|(_, free)| *free).cloned() else {
                return Err(ControlError::InvalidRequest(format!(
                    "node {node} has no directory pool; create one there with `ditto pool create`"
                )));
            };
            if free < need {
                return Err(ControlError::InvalidRequest(format!(
                    "node {node} has no pool with room for a replica of {need} bytes (the largest, {pool}, has {free} free)"
                )));
            }
            pools.push(if node == me {
                pool
            } else {
                format!("{node}:{pool}")
            });
        }
        Ok(pools)
    }

    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let _guard = self.ops.lock().await;
        let record = self.record(name)?;
        let clients = self.clients_of(name).len();
        if clients > 0 && !force {
            return Err(ControlError::VolumeBusy {
                name: name.to_string(),
                clients,
            });
        }
        // Unpublish first so no new client can open it, then disconnect the rest.
        let runtime = self.runtime(name);
        self.set_runtime(name, None);
        if let Some(server) = self.nbd.get() {
            server.disconnect_export(name);
        }
        if let Some(VolumeRuntime::Running(v)) = runtime.as_deref() {
            let _ = v.close().await;
        }
        self.store.delete_volume(name)?;
        let _ = self.store.delete_membership(record.uuid);
        for r in &record.replicas {
            self.discard_replica(r, record.uuid);
        }
        if let Some(t) = &record.tiebreaker {
            if let Err(e) = self
                .tell_witness(&record, t, ditto_peer::wire::WitnessOp::Delete)
                .await
            {
                tracing::warn!(volume = %name, tiebreaker = %t, error = %e, "the tiebreaker did not hear of the delete; it keeps a record of the volume (no data)");
            }
        }
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// A tiebreaker must be another known node that holds none of the
    /// volume's replicas, and it votes only with majority quorum.
    fn check_tiebreaker(
        &self,
        name: &str,
        node: &str,
        pools: &[String],
    ) -> Result<(), ControlError> {
        validate::node_name(node).map_err(ControlError::InvalidRequest)?;
        if node == self.config.node_name {
            return Err(ControlError::InvalidRequest(format!(
                "--tiebreaker {node}: this node is {name}'s primary; the tiebreaker must be a third node without a replica"
            )));
        }
        if pools
            .iter()
            .any(|p| p.split_once(':').is_some_and(|(n, _)| n == node))
        {
            return Err(ControlError::InvalidRequest(format!(
                "--tiebreaker {node}: node {node} holds a replica of {name}; the tiebreaker must be a node without one"
            )));
        }
        if self.config.quorum_for(name).is_none() {
            return Err(ControlError::InvalidRequest(format!(
                "--tiebreaker {node}: a tiebreaker votes only with quorum; set `quorum = \"majority\"` in the config (or under [volumes.{name}]) and restart the daemon"
            )));
        }
        self.dialer
            .dial(node)
            .map(|_| ())
            .map_err(ControlError::InvalidRequest)
    }

    /// Create or delete `record`'s witness on node `node`.
    pub(super) async fn tell_witness(
        &self,
        record: &VolumeRecord,
        node: &str,
        op: ditto_peer::wire::WitnessOp,
    ) -> Result<(), String> {
        self.ask_witness(node, record.uuid, &record.name, record.epoch, op)
            .await
            .map(|_| ())
    }

    /// One witness request to node `node` (the tiebreaker of volume
    /// `volume`, at the primary's `epoch`): the vote record it answers with.
    pub(super) async fn ask_witness(
        &self,
        node: &str,
        volume: Uuid,
        volume_name: &str,
        epoch: u64,
        op: ditto_peer::wire::WitnessOp,
    ) -> Result<Option<ditto_engine::VoteRecord>, String> {
        let (addr, dial) = self.dialer.dial(node)?;
        let req = ditto_peer::wire::WitnessRequest {
            volume,
            volume_name: volume_name.to_string(),
            record: ditto_engine::VoteRecord {
                epoch,
                ..Default::default()
            },
        };
        ditto_peer::client::witness(&addr, &dial, op, &req, crate::peers::PEER_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }

    /// `ditto volume scrub VOLUME [--repair] [--source REPLICA]`.
    pub async fn scrub(
        &self,
        name: &str,
        repair: bool,
        source: Option<&str>,
    ) -> Result<(), ControlError> {
        let volume = self.running(name)?;
        let record = self.record(name)?;
        let source = match source {
            Some(key) => Some(self.find_replica(&record, key)?.id),
            None => None,
        };
        volume.scrub(repair, source).await.map_err(engine_err)
    }

    /// Scrub volumes on the configured schedule (`scrub_interval_hours`).
    pub(super) fn spawn_scrub_schedule(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last: BTreeMap<String, Instant> = BTreeMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(node) = weak.upgrade() else { return };
                for (name, rt) in node.runtimes() {
                    let hours = node.config.scrub_interval_for(&name);
                    let VolumeRuntime::Running(v) = rt.as_ref() else {
                        continue;
                    };
                    if hours == 0 {
                        continue;
                    }
                    let since = last.get(&name).copied().unwrap_or(started);
                    if since.elapsed() >= Duration::from_secs(hours * 3600)
                        && v.scrub(false, None).await.is_ok()
                    {
                        last.insert(name, Instant::now());
                    }
                }
            }
        });
    }

    pub(super) fn clients_of(&self, name: &str) -> Vec<ClientInfo> {
        self.nbd
            .get()
            .map(|s| {
                s.clients()
                    .into_iter()
                    .filter(|c| c.export == name)
                    .map(|c| ClientInfo {
                        id: c.id,
                        peer: c.peer,
                        connected_at_unix: c.connected_at_unix,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn volume_info(&self, record: &VolumeRecord) -> Result<VolumeInfo, ControlError> {
        let runtime = self.runtime(&record.name);
        let export = format!(
            "nbd://{}/{}",
            self.nbd_addr
                .get()
                .map(String::as_str)
                .unwrap_or(ditto_control::config::DEFAULT_NBD_LISTEN),
            record.name
        );
        let name = &record.name;
        let mut info = VolumeInfo {
            name: name.clone(),
            uuid: record.uuid,
            size: record.size,
            state: "stopped".into(),
            reason: None,
            generation: 0,
            export,
            replicas: Vec::new(),
            clients: self.clients_of(name),
            job: None,
            last_scrub: None,
            dirty_regions: 0,
            hot_set_regions: self.volume_options.hot_set_regions,
            region_size: u64::from(record.region_size),
            copied_bytes: 0,
            skipped_bytes: 0,
            actions: Vec::new(),
            epoch: record.epoch,
            quorum: None,
            tiebreaker: None,
        };
        match runtime.as_deref() {
            Some(VolumeRuntime::Running(v)) => {
                let members = v.members();
                info.replicas = record
                    .replicas
                    .iter()
                    .map(|r| match members.iter().find(|m| m.id == r.id) {
                        Some(m) => ReplicaInfo {
                            id: r.id,
                            pool: r.pool.clone(),
                            path: r.path.display().to_string(),
                            state: match self.split_brain_of(r.id) {
                                Some(_) => "split-brain".to_string(),
                                None => m.state.as_str().to_string(),
                            },
                            reason: self.split_brain_of(r.id).or_else(|| {
                                // A replica on another node that is out: since when.
                                let out =
                                    matches!(m.state, ReplicaState::Failed | ReplicaState::Missing);
                                match (&r.node, out) {
                                    (Some(node), true) => Some(format!(
                                        "node {node} unreachable or failed since {} ({}): {}",
                                        crate::events::format_time_utc(m.state_since_unix * 1000),
                                        ago(m.state_since_unix),
                                        m.reason.clone().unwrap_or_default()
                                    )),
                                    _ => m.reason.clone(),
                                }
                            }),
                            generation: Some(m.generation),
                            data_offset: Some(m.data_offset),
                            reads: m.reads,
                            writes: m.writes,
                            errors: m.errors,
                            state_since_unix: Some(m.state_since_unix),
                        },
                        None => unknown_replica(r, "not part of the running volume"),
                    })
                    .collect();
                let in_sync = members
                    .iter()
                    .filter(|m| m.state == ReplicaState::InSync)
                    .count();
                // Every in-sync replica's connection gone for good: nothing
                // is served, whatever the member states still say.
                let stranded = v.stranded();
                info.state = if in_sync == 0 || stranded.is_some() {
                    "failed"
                } else if in_sync < record.replicas.len() {
                    "degraded"
                } else {
                    "healthy"
                }
                .into();
                if let Some(why) = stranded {
                    info.reason = Some(why);
                    info.actions.push(format!(
                        "{name} is started again when its replicas' nodes answer (every `peer_reconnect_secs`); `ditto node list` shows which are down"
                    ));
                }
                info.generation = v.generation();
                info.quorum = v.quorum_state().map(|(have, voters, need)| {
                    let word = if have >= need { "majority" } else { "LOST" };
                    let with = match v.tiebreaker() {
                        Some(t) if v.tiebreaker_votes() => format!(", tiebreaker {t} voting"),
                        Some(t) => format!(", tiebreaker {t} not voting"),
                        None => String::new(),
                    };
                    format!("{word}: {have} of {voters} nodes in sync{with} ({need} needed)")
                });
                info.tiebreaker = v.tiebreaker().map(|t| crate::api_types::TiebreakerInfo {
                    node: t.to_string(),
                    votes: v.tiebreaker_votes(),
                });
                if let Some(t) = info.tiebreaker.as_ref().filter(|t| !t.votes) {
                    info.actions.push(format!(
                        "tiebreaker {} holds no record of the current membership, so it does not vote; check it is up and reachable (`ditto node list`); it votes again at its next heartbeat",
                        t.node
                    ));
                }
                if info
                    .quorum
                    .as_deref()
                    .is_some_and(|q| q.starts_with("LOST"))
                {
                    info.actions.push(format!(
                        "no quorum: I/O is {} until a majority of {name}'s nodes is back in sync; reconnect them (`ditto node list`)",
                        match self.config.quorum_for(name) {
                            Some(ditto_control::config::OnNoQuorum::Error) => "refused",
                            _ => "suspended",
                        }
                    ));
                }
                info.job = v.job().map(job_info);
                info.last_scrub = v.last_scrub().map(scrub_info);
                info.dirty_regions = v.dirty_regions();
                info.hot_set_regions = v.hot_set_limit();
                info.copied_bytes = v.copied_bytes();
                info.skipped_bytes = v.skipped_bytes();
                for m in &members {
                    let id = &m.id.simple().to_string()[..8];
                    if let Some(why) = self.split_brain_of(m.id) {
                        info.actions.push(why);
                        continue;
                    }
                    match m.state {
                        ReplicaState::Failed | ReplicaState::Stale | ReplicaState::Missing => info.actions.push(format!(
                            "replica {id} ({}) is {}: when its disk is back, `ditto replica readd {name} {id}`; if it is gone for good, `ditto replica remove {name} {id}` then `ditto replica add {name} --pool POOL`",
                            m.label,
                            m.state.as_str()
                        )),
                        _ => {}
                    }
                }
                if in_sync == 1 && record.replicas.len() == 1 {
                    info.actions.push(format!(
                        "single copy: make it a mirror with `ditto replica add {name} --pool POOL`"
                    ));
                }
            }
            Some(VolumeRuntime::Starting(why)) => {
                info.state = "starting".into();
                info.reason = Some(why.clone());
                info.replicas = record
                    .replicas
                    .iter()
                    .map(|r| unknown_replica(r, "volume starting"))
                    .collect();
            }
            Some(VolumeRuntime::Stopped(why)) => {
                info.reason = Some(why.clone());
                info.replicas = record
                    .replicas
                    .iter()
                    .map(|r| unknown_replica(r, "volume stopped"))
                    .collect();
                if why.contains("split brain") {
                    info.actions.push(format!(
                        "choose the replica to keep: `ditto volume resolve {name} --keep REPLICA`"
                    ));
                } else {
                    info.actions.push(format!("`ditto volume start {name}` (add --degraded to start without missing replicas)"));
                }
            }
            None => info.reason = Some("not loaded".into()),
        }
        Ok(info)
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, ControlError> {
        self.store
            .volumes()?
            .iter()
            .map(|r| self.volume_info(r))
            .collect()
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        self.volume_info(&self.record(name)?)
    }

    pub fn status(&self, volume: Option<&str>) -> Result<StatusInfo, ControlError> {
        let witnessing = |name: &str| {
            self.store
                .witnesses()
                .is_ok_and(|w| w.iter().any(|w| w.volume_name == name))
        };
        let volumes = match volume {
            Some(name) if self.record(name).is_err() && witnessing(name) => Vec::new(),
            Some(name) => vec![self.volume(name)?],
            None => self.volumes()?,
        };
        Ok(StatusInfo {
            node: NodeInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                data_dir: self.data_dir.display().to_string(),
                nbd: self.nbd_addr.get().cloned().unwrap_or_default(),
                api: self.api_addr.get().cloned().unwrap_or_default(),
                io_engine: self.engine.name().into(),
            },
            volumes,
            pools: self.pools()?,
            held: self
                .store
                .held_replicas()?
                .into_iter()
                .filter(|h| volume.is_none_or(|v| v == h.volume_name))
                .map(|h| crate::api_types::HeldInfo {
                    volume: h.volume_name,
                    replica: h.replica,
                    pool: h.pool,
                    path: h.path.display().to_string(),
                    primary: h.primary,
                })
                .collect(),
            tiebreaker_of: self
                .store
                .witnesses()?
                .into_iter()
                .filter(|w| volume.is_none_or(|v| v == w.volume_name))
                .map(|w| crate::api_types::WitnessInfo {
                    volume: w.volume_name,
                    primary: w.primary,
                    epoch: w.epoch,
                    generation: w.generation,
                    in_sync: w.in_sync,
                    updated_unix: w.updated_unix,
                })
                .collect(),
        })
    }
}

use crate::api_types::ago;
