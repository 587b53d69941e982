//! The running node: turns stored records into live volumes and applies control operations.
//!
//! Control operations (create, delete, replica changes) are serialised by one
//! lock and are all-or-nothing: a failure removes whatever it had created.
//! Volume start follows the degraded-start policy: a volume whose replicas
//! are not all present waits for them, then starts degraded or stays stopped.
//!
//! One `Node`, its methods split by job: `lifecycle` (open replicas, start
//! and stop volumes), `pools`, `volumes` (create, delete, scrub, status),
//! `replicas` (add, re-add, fail, remove, resolve) and `peering` (replicas
//! on other nodes, reconnecting them, promote). This file holds the type,
//! its start and shutdown, and the runtime table.

mod lifecycle;
use lifecycle::StartClaim;
mod peering;
mod pools;
mod replicas;
mod volumes;

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
    /// Volumes whose replica nodes answered that another node is their
    /// primary: (that node, its epoch). A newer epoch hands the volume over.
    superseded_seen: std::sync::Mutex<std::collections::HashMap<Uuid, (String, u64)>>,
    /// Replicas on other nodes that refused to be caught up because both
    /// sides took writes: why, until `volume resolve` picks a side.
    split_brains: std::sync::Mutex<std::collections::HashMap<Uuid, String>>,
    /// Volumes being assembled now (at most one instance each).
    assembling: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The node as the held-replica registry sees it (a weak handle: the
/// registry must not keep a stopping node alive).
pub struct NodeHandle(std::sync::Weak<Node>);

impl NodeHandle {
    pub fn new(node: &Arc<Node>) -> NodeHandle {
        NodeHandle(Arc::downgrade(node))
    }
}

impl crate::peers::LocalNode for NodeHandle {
    fn pool_free(&self, pool: &str) -> u64 {
        self.0.upgrade().map_or(0, |n| n.pool_free_bytes(pool))
    }

    fn demote_to(
        &self,
        to: String,
        volume: Uuid,
        discard: bool,
    ) -> BoxFuture<'static, Result<(Vec<HeldReplicaRecord>, ditto_peer::wire::PrimaryClaim), String>>
    {
        let weak = self.0.clone();
        Box::pin(async move {
            match weak.upgrade() {
                Some(n) => n.demote_to(&to, volume, discard).await,
                None => Err("this node is stopping".to_string()),
            }
        })
    }

    fn primary_epoch(&self, volume: Uuid) -> Option<u64> {
        self.0.upgrade()?.primary_epoch(volume)
    }

    fn take_over(&self, from: String, volume: Uuid) -> BoxFuture<'static, Result<(), String>> {
        let weak = self.0.clone();
        Box::pin(async move {
            let Some(n) = weak.upgrade() else {
                return Err("this node is stopping".to_string());
            };
            let name = n
                .store
                .held_replicas()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|h| h.volume == volume && h.primary == from)
                .map(|h| h.volume_name)
                .ok_or_else(|| {
                    format!("this node holds no replica of volume {volume} for node {from}")
                })?;
            n.promote(&name, false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn superseded(
        &self,
        volume: Uuid,
        by: String,
        epoch: u64,
        members: Vec<ditto_peer::wire::MemberRef>,
    ) -> BoxFuture<'static, Result<Vec<HeldReplicaRecord>, String>> {
        let weak = self.0.clone();
        Box::pin(async move {
            match weak.upgrade() {
                Some(n) => n.become_secondary(volume, &by, epoch, members).await,
                None => Err("this node is stopping".to_string()),
            }
        })
    }
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
        let added: Vec<(String, String)> = store
            .nodes()?
            .into_iter()
            .map(|n| (n.name, n.address))
            .collect();
        let dialer = crate::peers::Dialer::new(&config, tls, &added);
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
                resync_checksums: config.resync_checksums,
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
            superseded_seen: Default::default(),
            split_brains: Default::default(),
            assembling: Default::default(),
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

    /// The node's store (shared with the replicas it holds for peers).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
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
        state_since_unix: None,
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
