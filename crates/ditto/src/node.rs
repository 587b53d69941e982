//! The running node: turns stored records into live volumes and applies control operations.
//!
//! Control operations (create, delete, replica changes) are serialised by one
//! lock and are all-or-nothing: a failure removes whatever it had created.
//! Volume start follows the degraded-start policy: a volume whose replicas
//! are not all present waits for them, then starts degraded or stays stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ditto_control::model::{
    now_unix, HeldReplicaRecord, MembershipRecord, PoolKind, RECORD_VERSION,
};
use ditto_control::placement::{self, PoolUsage};
use ditto_control::{
    validate, ControlError, DaemonConfig, PoolRecord, ReplicaRecord, Store, VolumeRecord,
};
use ditto_engine::{
    BackendError, BoxFuture, Event, EventKind, FileReplica, IoEngine, IoFile, JobProgress,
    KnownMembership, Member, MembershipLog, MembershipLogRef, MissingReplica, ReaddPlan,
    ReplicaBackend, ReplicaState, ScrubReport, SharedSink, Volume, VolumeOptions,
};
use ditto_format::{Layout, DEFAULT_REGION_SIZE};
use uuid::Uuid;

use crate::api_types::{
    ClientInfo, CreatePool, CreateVolume, JobInfo, NodeInfo, PoolInfo, ReplicaInfo, ScrubInfo,
    SizeInput, StatusInfo, VolumeInfo,
};

/// A volume as the node holds it.
pub enum VolumeRuntime {
    Running(Arc<Volume>),
    /// Waiting at start for missing replicas (the message says for what and how long).
    Starting(String),
    /// Not serving, with the reason and the command that changes that.
    Stopped(String),
}

pub struct Node {
    store: Arc<Store>,
    engine: Arc<dyn IoEngine>,
    volumes: RwLock<BTreeMap<String, Arc<VolumeRuntime>>>,
    /// Serialises control operations.
    ops: tokio::sync::Mutex<()>,
    nbd: OnceLock<Arc<ditto_nbd::Server>>,
    pub data_dir: PathBuf,
    pub nbd_addr: OnceLock<String>,
    pub api_addr: OnceLock<String>,
    volume_options: VolumeOptions,
    events: SharedSink,
    config: DaemonConfig,
    /// `ditto daemon --degraded/--no-degraded`: wins over the config for this start.
    degraded_override: Option<bool>,
    /// Stopped volumes whose disks still hold operations given up at a
    /// timeout: a new instance must not write these files before they land.
    draining: std::sync::Mutex<BTreeMap<String, Arc<Volume>>>,
    /// How replicas on other nodes (`[nodes.NAME]`) are reached.
    dialer: crate::peers::Dialer,
    /// Replicas the operator failed on purpose (`replica fail`): never
    /// re-added by the reconnect loop, only by `replica readd`.
    failed_on_purpose: std::sync::Mutex<std::collections::BTreeSet<Uuid>>,
    /// The replicas this node holds for other nodes (set when the peer
    /// server starts): a promote takes its own out of them.
    held: OnceLock<Arc<crate::peers::HeldReplicas>>,
}

fn layout_of(v: &VolumeRecord) -> Result<Layout, ControlError> {
    Layout::new(v.size, v.region_size).map_err(|e| ControlError::InvalidRequest(e.to_string()))
}

fn engine_err(e: impl std::fmt::Display) -> ControlError {
    ControlError::Engine(e.to_string())
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Node {
    /// Open the store and start every stored volume: those with all
    /// replicas present at once, the others in the background under the
    /// degraded-start policy.
    pub async fn start(
        data_dir: &Path,
        engine: Arc<dyn IoEngine>,
        config: DaemonConfig,
        degraded_override: Option<bool>,
        events: SharedSink,
    ) -> Result<Arc<Self>, ControlError> {
        let store = Arc::new(Store::open(&data_dir.join("state.redb"))?);
        let tls = crate::peers::peer_tls(&config).map_err(|e| ControlError::Config {
            path: data_dir.to_path_buf(),
            message: format!("[tls]: {e:#}"),
        })?;
        let dialer = crate::peers::Dialer::new(&config, tls);
        let membership_log = MembershipLogRef(Arc::new(StoreMembershipLog(store.clone())));
        let (resync_min_rate, resync_max_rate) = config.resync_rates();
        let node = Arc::new(Node {
            store,
            engine,
            volumes: RwLock::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
            nbd: OnceLock::new(),
            data_dir: data_dir.to_path_buf(),
            nbd_addr: OnceLock::new(),
            api_addr: OnceLock::new(),
            volume_options: VolumeOptions {
                io_timeout: Duration::from_secs(config.io_timeout_secs),
                resync_min_rate,
                resync_max_rate,
                hot_set_regions: config.dirty_hot_set_regions,
                dirty_clear_delay: Duration::from_millis(config.dirty_clear_delay_ms),
                membership_log: Some(membership_log),
                ..VolumeOptions::default()
            },
            events,
            config,
            degraded_override,
            draining: std::sync::Mutex::new(BTreeMap::new()),
            dialer,
            failed_on_purpose: std::sync::Mutex::new(Default::default()),
            held: OnceLock::new(),
        });
        for record in node.store.volumes()? {
            let (members, missing) = node.open_members(&record).await;
            if missing.is_empty() {
                node.assemble(&record, members, false).await;
            } else {
                node.set_runtime(
                    &record.name,
                    Some(VolumeRuntime::Starting("waiting for replicas".into())),
                );
                let n = node.clone();
                tokio::spawn(
                    async move { n.start_with_policy(record.name, None, None, false).await },
                );
            }
        }
        node.clone().spawn_scrub_schedule();
        node.clone().spawn_peer_reconnect();
        Ok(node)
    }

    pub fn set_nbd_server(&self, server: Arc<ditto_nbd::Server>) {
        let _ = self.nbd.set(server);
    }

    fn emit(&self, kind: EventKind, volume: &str, message: String) {
        self.events.emit(Event {
            kind,
            volume: volume.to_string(),
            replica: None,
            message,
            progress: None,
        });
    }

    fn set_runtime(&self, name: &str, runtime: Option<VolumeRuntime>) {
        let mut map = match self.volumes.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match runtime {
            Some(r) => map.insert(name.to_string(), Arc::new(r)),
            None => map.remove(name),
        };
    }

    pub fn runtime(&self, name: &str) -> Option<Arc<VolumeRuntime>> {
        lock_read(&self.volumes).get(name).cloned()
    }

    fn runtimes(&self) -> Vec<(String, Arc<VolumeRuntime>)> {
        lock_read(&self.volumes)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn record(&self, name: &str) -> Result<VolumeRecord, ControlError> {
        self.store
            .volumes()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ControlError::VolumeNotFound(name.to_string()))
    }

    fn running(&self, name: &str) -> Result<Arc<Volume>, ControlError> {
        self.record(name)?;
        match self.runtime(name).as_deref() {
            Some(VolumeRuntime::Running(v)) => Ok(v.clone()),
            Some(VolumeRuntime::Starting(why)) => Err(ControlError::InvalidRequest(format!(
                "volume {name:?} is starting ({why})"
            ))),
            Some(VolumeRuntime::Stopped(why)) => Err(ControlError::InvalidRequest(format!(
                "volume {name:?} is stopped ({why}); start it with `ditto volume start {name}`"
            ))),
            None => Err(ControlError::VolumeNotFound(name.to_string())),
        }
    }

    fn pool_kind(&self, pool: &str) -> PoolKind {
        self.store
            .pools()
            .ok()
            .and_then(|ps| ps.into_iter().find(|p| p.name == pool))
            .map_or(PoolKind::Directory, |p| p.kind)
    }

    /// Open the file, device or remote export a replica lives on.
    async fn open_io(
        &self,
        kind: PoolKind,
        location: &Path,
    ) -> Result<Arc<dyn IoFile>, std::io::Error> {
        match kind {
            PoolKind::Directory | PoolKind::Device => self.engine.open(location, false),
            PoolKind::Nbd => open_remote(&location.to_string_lossy()).await,
        }
    }

    /// The node's store (shared with the replicas it holds for peers).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn dialer(&self) -> &crate::peers::Dialer {
        &self.dialer
    }

    async fn open_replica(
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
            .map_err(|e| io_err(e.to_string()))?;
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

    /// Open every replica; those that cannot be opened become placeholders.
    async fn open_members(&self, record: &VolumeRecord) -> (Vec<Member>, Vec<String>) {
        let mut members = Vec::new();
        let mut missing = Vec::new();
        let layout = layout_of(record).ok();
        for r in &record.replicas {
            let backend: Arc<dyn ReplicaBackend> =
                match (self.open_replica(record, r).await, layout) {
                    (Ok(b), _) => b,
                    (Err(e), Some(layout)) => {
                        missing.push(format!("{} ({e})", r.pool));
                        Arc::new(MissingReplica::new(
                            r.path.display().to_string(),
                            e.to_string(),
                            record.uuid,
                            r.id,
                            layout,
                        ))
                    }
                    (Err(e), None) => {
                        missing.push(format!("{} ({e})", r.pool));
                        continue;
                    }
                };
            members.push(Member::new(r.id, r.pool.clone(), backend));
        }
        (members, missing)
    }

    /// Assemble the engine volume of a stored record from its members.
    /// `accept_stale`: the operator accepts starting from replicas older
    /// than the node's membership record (`--force-stale`, `resolve --keep`).
    async fn open_record(
        &self,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
    ) -> Result<Arc<Volume>, ditto_engine::EngineError> {
        Volume::open(
            &record.name,
            record.uuid,
            record.size,
            members,
            VolumeOptions {
                accept_stale,
                ..self.volume_options.clone()
            },
            self.events.clone(),
        )
        .await
    }

    /// Assemble a volume and publish it (or record why it is stopped).
    async fn assemble(
        &self,
        record: &VolumeRecord,
        members: Vec<Member>,
        accept_stale: bool,
    ) -> bool {
        let opened = self.open_record(record, members, accept_stale).await;
        match opened {
            Ok(v) => {
                tracing::info!(volume = %record.name, generation = v.generation(), "volume started");
                self.set_runtime(&record.name, Some(VolumeRuntime::Running(v)));
                true
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

    /// Start a volume under the degraded-start policy: wait up to the
    /// configured time for missing replicas, then start degraded or refuse.
    /// `degraded` (from `volume start --degraded/--no-degraded`) wins over
    /// the daemon's override, which wins over the config file.
    async fn start_with_policy(
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
            let (members, missing) = self.open_members(&record).await;
            if missing.is_empty() {
                return self.assemble(&record, members, force_stale).await;
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

    /// Operations still pending on the stopped instance of `name`, if any.
    fn still_draining(&self, name: &str) -> Option<usize> {
        let mut d = self.draining.lock().ok()?;
        let pending = d.get(name).map_or(0, |v| v.abandoned_ops());
        if pending == 0 {
            d.remove(name);
            return None;
        }
        Some(pending)
    }

    fn refuse_if_running(&self, name: &str, why: &str) -> Result<(), ControlError> {
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
        if v.abandoned_ops() > 0 {
            if let Ok(mut d) = self.draining.lock() {
                d.insert(name.to_string(), v.clone());
            }
        }
        closed.map_err(engine_err)?;
        self.emit(
            EventKind::VolumeStopped,
            name,
            "stopped by the operator".into(),
        );
        Ok(())
    }

    fn pool_usages(&self, pools: &[PoolRecord], volumes: &[VolumeRecord]) -> Vec<PoolUsage> {
        // Replicas held for other nodes take room too: each counts as a
        // one-replica volume the size of its (sparse) file.
        let mut volumes = volumes.to_vec();
        for h in self.store.held_replicas().unwrap_or_default() {
            let size = std::fs::metadata(&h.path).map_or(0, |m| m.len());
            volumes.push(VolumeRecord {
                version: RECORD_VERSION,
                name: format!("{} (held for {})", h.volume_name, h.primary),
                uuid: h.volume,
                size,
                region_size: 0,
                replicas: vec![ReplicaRecord {
                    id: h.replica,
                    pool: h.pool,
                    path: h.path,
                    node: None,
                }],
                created_unix: h.created_unix,
            });
        }
        let volumes = volumes.as_slice();
        pools
            .iter()
            .map(|p| {
                let device_size = match p.kind {
                    PoolKind::Directory => None,
                    PoolKind::Device => self.engine.open(&p.path, false).and_then(|f| f.len()).ok(),
                    // Remote size is learnt when the pool is created and kept in the uuid-less cache below.
                    PoolKind::Nbd => remote_size_cache(&p.path.to_string_lossy()),
                };
                placement::usage(
                    p,
                    volumes,
                    // A held replica (region_size 0) is its file's length.
                    |v| layout_of(v).map(|l| l.replica_len()).unwrap_or(v.size),
                    device_size,
                )
            })
            .collect()
    }

    pub async fn create_pool(&self, req: CreatePool) -> Result<PoolInfo, ControlError> {
        validate::name("pool", &req.name)?;
        let (kind, path) =
            match (&req.path, &req.device, &req.nbd) {
                (Some(p), None, None) => {
                    let path = PathBuf::from(p);
                    validate::pool_path(&path)?;
                    (
                        PoolKind::Directory,
                        std::fs::canonicalize(&path)
                            .map_err(|_| ControlError::PoolPathMissing(path))?,
                    )
                }
                (None, Some(d), None) => {
                    let path = PathBuf::from(d);
                    let meta = std::fs::metadata(&path)
                        .map_err(|_| ControlError::PoolPathMissing(path.clone()))?;
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_block_device() {
                        return Err(ControlError::InvalidRequest(format!(
                            "{} is not a block device; use --path for a directory",
                            path.display()
                        )));
                    }
                    self.engine.open(&path, false).map_err(|e| {
                        ControlError::PoolPathNotWritable {
                            path: path.clone(),
                            why: e.to_string(),
                        }
                    })?;
                    (PoolKind::Device, path)
                }
                (None, None, Some(uri)) => {
                    let file = open_remote(uri).await.map_err(|e| {
                        ControlError::InvalidRequest(format!(
                            "cannot open NBD export {uri}: {e}; check that it is served"
                        ))
                    })?;
                    remember_remote_size(uri, file.len().unwrap_or(0));
                    (PoolKind::Nbd, PathBuf::from(uri))
                }
                _ => return Err(ControlError::InvalidRequest(
                    "give exactly one of --path DIR, --device /dev/... or --nbd nbd://HOST/EXPORT"
                        .into(),
                )),
            };
        let _guard = self.ops.lock().await;
        let pools = self.store.pools()?;
        if pools.iter().any(|p| p.name == req.name) {
            return Err(ControlError::PoolExists(req.name));
        }
        if let Some(p) = pools.iter().find(|p| p.path == path) {
            return Err(ControlError::PoolPathInUse {
                path,
                pool: p.name.clone(),
            });
        }
        let record = PoolRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            uuid: Uuid::new_v4(),
            kind,
            path,
            created_unix: now_unix(),
        };
        self.store.insert_pool(&record)?;
        tracing::info!(pool = %record.name, path = %record.path.display(), kind = kind.as_str(), "pool created");
        let usage = self.pool_usages(std::slice::from_ref(&record), &self.store.volumes()?);
        Ok(pool_info(&record, &usage[0]))
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), ControlError> {
        let _guard = self.ops.lock().await;
        if !self.store.pools()?.iter().any(|p| p.name == name) {
            return Err(ControlError::PoolNotFound(name.to_string()));
        }
        let users: Vec<String> = self
            .store
            .volumes()?
            .into_iter()
            .filter(|v| v.replicas.iter().any(|r| r.pool == name))
            .map(|v| v.name)
            .collect();
        let held: Vec<String> = self
            .store
            .held_replicas()?
            .into_iter()
            .filter(|h| h.pool == name)
            .map(|h| format!("{} (replica held for node {})", h.volume_name, h.primary))
            .collect();
        if !users.is_empty() || !held.is_empty() {
            return Err(ControlError::PoolInUse {
                pool: name.to_string(),
                volumes: users.into_iter().chain(held).collect(),
            });
        }
        self.store.delete_pool(name)?;
        Ok(())
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

    /// Bytes a new replica may still take in pool `name` (reservations of
    /// every replica there, held ones included, subtracted).
    pub fn pool_free_bytes(&self, name: &str) -> u64 {
        let Ok(pools) = self.store.pools() else {
            return 0;
        };
        let Some(pool) = pools.iter().find(|p| p.name == name) else {
            return 0;
        };
        let volumes = self.store.volumes().unwrap_or_default();
        self.pool_usages(std::slice::from_ref(pool), &volumes)
            .first()
            .map_or(0, |u| u.free_bytes)
    }

    pub fn pools(&self) -> Result<Vec<PoolInfo>, ControlError> {
        let pools = self.store.pools()?;
        let usages = self.pool_usages(&pools, &self.store.volumes()?);
        Ok(pools
            .iter()
            .zip(&usages)
            .map(|(p, u)| pool_info(p, u))
            .collect())
    }

    /// Create one replica of `volume` in `pool`: a new sparse file in a
    /// directory pool, or a freshly formatted device or remote export.
    async fn create_replica(
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

    /// Create one replica of `volume` in pool `pool` of node `node`, and
    /// connect to it.
    async fn create_remote_replica(
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

    /// Remove a replica's storage: delete the file of a directory pool; leave
    /// devices and remote exports as they are (their superblock names the old volume).
    fn discard_replica(&self, r: &ReplicaRecord, volume: Uuid) {
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

    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeInfo, ControlError> {
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
        };
        let members = created
            .iter()
            .map(|(r, b)| Member::new(r.id, r.pool.clone(), b.clone() as Arc<dyn ReplicaBackend>))
            .collect();
        let volume = match Volume::open(
            &record.name,
            uuid,
            size,
            members,
            self.volume_options.clone(),
            self.events.clone(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                cleanup(&created);
                return Err(engine_err(e));
            }
        };
        if let Err(e) = self.store.insert_volume(&record) {
            let _ = volume.close().await;
            cleanup(&created);
            return Err(e);
        }
        tracing::info!(volume = %record.name, size, pools = ?chosen, "volume created");
        self.set_runtime(&record.name, Some(VolumeRuntime::Running(volume)));
        self.volume_info(&record)
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
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Find a replica of a volume by id prefix (≥ 4 hex digits), pool name or path.
    fn find_replica(
        &self,
        record: &VolumeRecord,
        key: &str,
    ) -> Result<ReplicaRecord, ControlError> {
        let matches: Vec<&ReplicaRecord> = record
            .replicas
            .iter()
            .filter(|r| {
                r.pool == key
                    || r.path.to_string_lossy() == key
                    || (key.len() >= 4
                        && r.id
                            .simple()
                            .to_string()
                            .starts_with(&key.to_ascii_lowercase()))
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ControlError::InvalidRequest(format!(
                "volume {:?} has no replica {key:?}; its replicas: {}",
                record.name,
                record
                    .replicas
                    .iter()
                    .map(|r| format!("{} (pool {})", &r.id.simple().to_string()[..8], r.pool))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Err(ControlError::InvalidRequest(format!(
                "{key:?} matches several replicas; give more of the id"
            ))),
        }
    }

    /// `ditto replica add VOLUME --pool POOL`: a new replica, rebuilt while serving.
    pub async fn add_replica(
        &self,
        name: &str,
        pool_name: &str,
    ) -> Result<VolumeInfo, ControlError> {
        let volume = self.running(name)?;
        let _guard = self.ops.lock().await;
        let mut record = self.record(name)?;
        if record.replicas.iter().any(|r| r.pool == pool_name) {
            return Err(ControlError::InvalidRequest(format!(
                "volume {name:?} already has a replica in pool {pool_name:?}: each replica needs its own pool"
            )));
        }
        let layout = layout_of(&record)?;
        let (replica, backend) = match pool_name.split_once(':') {
            // A pool on another node: created (and its room checked) there.
            Some((node, pool)) => {
                validate::node_name(node).map_err(ControlError::InvalidRequest)?;
                validate::name("pool", pool)?;
                if record
                    .replicas
                    .iter()
                    .any(|r| r.node.as_deref() == Some(node))
                {
                    return Err(ControlError::InvalidRequest(format!(
                        "volume {name:?} already has a replica on node {node}: a second copy on one machine does not survive its loss"
                    )));
                }
                self.create_remote_replica(node, pool, name, record.uuid, layout)
                    .await?
            }
            None => {
                let pools = self.store.pools()?;
                let pool = pools
                    .iter()
                    .find(|p| p.name == pool_name)
                    .ok_or_else(|| ControlError::PoolNotFound(pool_name.into()))?;
                let usage = self.pool_usages(std::slice::from_ref(pool), &self.store.volumes()?);
                if usage[0].free_bytes < layout.replica_len() {
                    return Err(ControlError::NoSpace {
                        pool: pool_name.into(),
                        need: layout.replica_len(),
                        free: usage[0].free_bytes,
                    });
                }
                self.create_replica(pool, name, record.uuid, layout).await?
            }
        };
        record.replicas.push(replica.clone());
        if let Err(e) = self.store.update_volume(&record) {
            self.discard_replica(&replica, record.uuid);
            return Err(e);
        }
        let member = Member::new(replica.id, pool_name, backend as Arc<dyn ReplicaBackend>);
        if let Err(e) = volume.add_replica(member).await {
            record.replicas.retain(|r| r.id != replica.id);
            let _ = self.store.update_volume(&record);
            self.discard_replica(&replica, record.uuid);
            return Err(engine_err(e));
        }
        self.volume_info(&record)
    }

    /// `ditto replica readd VOLUME REPLICA`: bring back a failed, stale or missing replica.
    pub async fn readd_replica(&self, name: &str, key: &str) -> Result<ReaddPlan, ControlError> {
        let volume = self.running(name)?;
        let _guard = self.ops.lock().await;
        let record = self.record(name)?;
        let replica = self.find_replica(&record, key)?;
        let backend = self.open_replica(&record, &replica).await.map_err(|e| {
            ControlError::Engine(format!("{e}; if the replica is lost for good, `ditto replica remove {name} {key}` and `ditto replica add`"))
        })?;
        if let Ok(mut set) = self.failed_on_purpose.lock() {
            set.remove(&replica.id);
        }
        volume
            .readd(replica.id, backend as Arc<dyn ReplicaBackend>, false)
            .await
            .map_err(engine_err)
    }

    /// `ditto replica fail VOLUME REPLICA`: take a replica out on purpose.
    pub async fn fail_replica(&self, name: &str, key: &str) -> Result<(), ControlError> {
        let volume = self.running(name)?;
        let record = self.record(name)?;
        let replica = self.find_replica(&record, key)?;
        volume
            .fail_replica(replica.id, "failed by the operator")
            .await
            .map_err(engine_err)?;
        if let Ok(mut set) = self.failed_on_purpose.lock() {
            set.insert(replica.id);
        }
        Ok(())
    }

    /// `ditto replica remove VOLUME REPLICA`: drop a replica from the volume.
    /// A replica file is kept (renamed `.removed`) so nothing is destroyed by a typo.
    pub async fn remove_replica(&self, name: &str, key: &str) -> Result<(), ControlError> {
        let volume = self.running(name)?;
        let _guard = self.ops.lock().await;
        let mut record = self.record(name)?;
        let replica = self.find_replica(&record, key)?;
        if volume.members().iter().any(|m| m.id == replica.id) {
            volume
                .remove_replica(replica.id)
                .await
                .map_err(engine_err)?;
        }
        record.replicas.retain(|r| r.id != replica.id);
        self.store.update_volume(&record)?;
        if self.pool_kind(&replica.pool) == PoolKind::Directory {
            let _ = std::fs::rename(&replica.path, replica.path.with_extension("removed"));
        }
        Ok(())
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

    /// `ditto volume resolve VOLUME --keep REPLICA`: end a split brain. The
    /// kept replica serves; every other one is rebuilt from it in full.
    pub async fn resolve(
        self: &Arc<Self>,
        name: &str,
        keep: &str,
    ) -> Result<VolumeInfo, ControlError> {
        let record = self.record(name)?;
        self.refuse_if_running(name, "resolve is for a volume stopped by a split brain")?;
        let _guard = self.ops.lock().await;
        let kept = self.find_replica(&record, keep)?;
        let layout = layout_of(&record)?;
        let backend = self
            .open_replica(&record, &kept)
            .await
            .map_err(engine_err)?;
        let mut members = vec![Member::new(
            kept.id,
            kept.pool.clone(),
            backend as Arc<dyn ReplicaBackend>,
        )];
        let others: Vec<&ReplicaRecord> =
            record.replicas.iter().filter(|r| r.id != kept.id).collect();
        for r in &others {
            let placeholder = MissingReplica::new(
                r.path.display().to_string(),
                "discarded by `volume resolve`",
                record.uuid,
                r.id,
                layout,
            );
            members.push(Member::new(
                r.id,
                r.pool.clone(),
                Arc::new(placeholder) as Arc<dyn ReplicaBackend>,
            ));
        }
        // The operator chose the side to keep: that is the override.
        let volume = self
            .open_record(&record, members, true)
            .await
            .map_err(engine_err)?;
        self.set_runtime(name, Some(VolumeRuntime::Running(volume.clone())));
        self.events.emit(Event {
            kind: EventKind::SplitBrainResolved,
            volume: name.to_string(),
            replica: Some(kept.path.display().to_string()),
            message: format!("split brain resolved by the operator: keeping the replica on {}; the others are rebuilt from it", kept.pool),
            progress: None,
        });
        for r in others {
            match self.open_replica(&record, r).await {
                Ok(b) => {
                    if let Err(e) = volume.readd(r.id, b as Arc<dyn ReplicaBackend>, true).await {
                        tracing::warn!(volume = %name, replica = %r.path.display(), error = %e, "cannot rebuild discarded replica");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, replica = %r.path.display(), error = %e, "discarded replica unavailable")
                }
            }
        }
        self.volume_info(&record)
    }

    fn clients_of(&self, name: &str) -> Vec<ClientInfo> {
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

    fn volume_info(&self, record: &VolumeRecord) -> Result<VolumeInfo, ControlError> {
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
            actions: Vec::new(),
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
                            state: m.state.as_str().to_string(),
                            reason: m.reason.clone(),
                            generation: Some(m.generation),
                            data_offset: Some(m.data_offset),
                            reads: m.reads,
                            writes: m.writes,
                            errors: m.errors,
                        },
                        None => unknown_replica(r, "not part of the running volume"),
                    })
                    .collect();
                let in_sync = members
                    .iter()
                    .filter(|m| m.state == ReplicaState::InSync)
                    .count();
                info.state = if in_sync == 0 {
                    "failed"
                } else if in_sync < record.replicas.len() {
                    "degraded"
                } else {
                    "healthy"
                }
                .into();
                info.generation = v.generation();
                info.job = v.job().map(job_info);
                info.last_scrub = v.last_scrub().map(scrub_info);
                info.dirty_regions = v.dirty_regions();
                info.hot_set_regions = v.hot_set_limit();
                info.copied_bytes = v.copied_bytes();
                for m in &members {
                    let id = &m.id.simple().to_string()[..8];
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
        let volumes = match volume {
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
        })
    }

    /// Every `peer_reconnect_secs`, try the replicas on other nodes that are
    /// out (their node died or was cut off) and re-add those that answer:
    /// the engine then catches each up by its dirty map, or rebuilds it when
    /// the generations say so. Replicas failed on purpose are left alone.
    fn spawn_peer_reconnect(self: Arc<Self>) {
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

    async fn reconnect_peers(&self) {
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

    /// Scrub volumes on the configured schedule (`scrub_interval_hours`).
    fn spawn_scrub_schedule(self: Arc<Self>) {
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

    /// Flush every running volume and mark its replicas clean.
    pub async fn shutdown(&self) {
        for (name, rt) in self.runtimes() {
            if let VolumeRuntime::Running(v) = rt.as_ref() {
                match v.close().await {
                    Ok(()) => tracing::info!(volume = %name, "volume closed cleanly"),
                    Err(e) => {
                        tracing::error!(volume = %name, error = %e, "volume not closed cleanly")
                    }
                }
            }
        }
    }
}

/// The node's store as the engine's membership log.
struct StoreMembershipLog(Arc<Store>);

impl MembershipLog for StoreMembershipLog {
    fn last(&self, volume: Uuid) -> Option<KnownMembership> {
        match self.0.membership(volume) {
            Ok(r) => r.map(|r| KnownMembership {
                generation: r.generation,
                in_sync: r.in_sync,
            }),
            Err(e) => {
                tracing::error!(%volume, error = %e, "cannot read the membership record");
                None
            }
        }
    }

    fn record(
        &self,
        volume: Uuid,
        membership: KnownMembership,
    ) -> BoxFuture<'_, Result<(), String>> {
        let store = self.0.clone();
        Box::pin(async move {
            let record = MembershipRecord {
                version: RECORD_VERSION,
                volume,
                generation: membership.generation,
                in_sync: membership.in_sync,
                updated_unix: now_unix(),
            };
            // redb commits with an fsync: keep it off the I/O threads.
            tokio::task::spawn_blocking(move || store.set_membership(&record))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }
}

/// Open a remote NBD export as an I/O file.
async fn open_remote(uri: &str) -> Result<Arc<dyn IoFile>, std::io::Error> {
    let file = ditto_engine::nbd_file::open_nbd(uri).await?;
    remember_remote_size(uri, file.len().unwrap_or(0));
    Ok(file)
}

static REMOTE_SIZES: std::sync::Mutex<BTreeMap<String, u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// NBD pool sizes, learnt when a pool is created or a replica opened, so
/// listing pools never waits on the network.
fn remember_remote_size(uri: &str, size: u64) {
    if let Ok(mut m) = REMOTE_SIZES.lock() {
        m.insert(uri.to_string(), size);
    }
}

fn remote_size_cache(uri: &str) -> Option<u64> {
    REMOTE_SIZES.lock().ok().and_then(|m| m.get(uri).copied())
}

fn unknown_replica(r: &ReplicaRecord, why: &str) -> ReplicaInfo {
    ReplicaInfo {
        id: r.id,
        pool: r.pool.clone(),
        path: r.path.display().to_string(),
        state: "unknown".into(),
        reason: Some(why.into()),
        generation: None,
        data_offset: None,
        reads: 0,
        writes: 0,
        errors: 0,
    }
}

fn job_info(j: JobProgress) -> JobInfo {
    JobInfo {
        kind: j.kind.as_str().into(),
        replica: j.replica,
        done_bytes: j.done_bytes,
        total_bytes: j.total_bytes,
        percent: if j.total_bytes > 0 {
            (j.done_bytes as f64 * 100.0 / j.total_bytes as f64).min(100.0)
        } else if j.finished {
            100.0
        } else {
            0.0
        },
        rate_bytes_per_sec: j.rate_bytes_per_sec,
        eta_secs: j.eta_secs,
        elapsed_secs: j.elapsed_secs,
        started_unix: j.started_unix,
        finished: j.finished,
        error: j.error,
    }
}

fn scrub_info(s: ScrubReport) -> ScrubInfo {
    ScrubInfo {
        started_unix: s.started_unix,
        duration_secs: s.duration_secs,
        bytes: s.bytes,
        mismatches: s.mismatched_regions.len() as u64,
        mismatched_offsets: s.mismatched_regions.into_iter().take(100).collect(),
        repaired: s.repaired,
        repair: s.repair,
        finished: s.finished,
        error: s.error,
    }
}

fn pool_info(p: &PoolRecord, u: &PoolUsage) -> PoolInfo {
    PoolInfo {
        name: p.name.clone(),
        uuid: p.uuid,
        kind: p.kind.as_str().into(),
        path: p.path.display().to_string(),
        total_bytes: u.total_bytes,
        free_bytes: u.free_bytes,
        fs_free_bytes: u.fs_free_bytes,
        reserved_bytes: u.reserved_bytes,
        replicas: u.replicas,
    }
}

/// The NBD server's view of the node: each running volume is an export.
pub struct Registry(pub std::sync::Weak<Node>);

impl ditto_nbd::ExportRegistry for Registry {
    fn open(&self, name: &str) -> Option<Arc<dyn ditto_nbd::Export>> {
        let node = self.0.upgrade()?;
        match node.runtime(name)?.as_ref() {
            VolumeRuntime::Running(v) => Some(Arc::new(crate::export::VolumeExport(v.clone()))),
            _ => None,
        }
    }

    fn list(&self) -> Vec<ditto_nbd::ExportListing> {
        let Some(node) = self.0.upgrade() else {
            return Vec::new();
        };
        node.runtimes()
            .into_iter()
            .filter_map(|(name, rt)| match rt.as_ref() {
                VolumeRuntime::Running(v) => Some(ditto_nbd::ExportListing {
                    name,
                    description: format!("ditto volume, {} replicas", v.members().len()),
                }),
                _ => None,
            })
            .collect()
    }
}
