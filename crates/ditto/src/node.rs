//! The running node: turns stored records into live volumes and applies control operations.
//!
//! Control operations (create, delete) are serialised by one lock and are
//! all-or-nothing: a failure removes whatever it had created.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use ditto_control::model::{now_unix, PoolKind, RECORD_VERSION};
use ditto_control::placement::{self, PoolUsage};
use ditto_control::{validate, ControlError, PoolRecord, ReplicaRecord, Store, VolumeRecord};
use ditto_engine::{
    FileReplica, IoEngine, Member, ReplicaBackend, ReplicaState, SharedSink, Volume, VolumeOptions,
};
use ditto_format::{Layout, DEFAULT_REGION_SIZE};
use uuid::Uuid;

use crate::api_types::{
    ClientInfo, CreatePool, CreateVolume, NodeInfo, PoolInfo, ReplicaInfo, SizeInput, StatusInfo,
    VolumeInfo,
};

/// A volume as the node holds it: running, or stopped with the reason.
pub enum VolumeRuntime {
    Running(Arc<Volume>),
    Stopped(String),
}

pub struct Node {
    store: Store,
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
}

fn layout_of(v: &VolumeRecord) -> Result<Layout, ControlError> {
    Layout::new(v.size, v.region_size).map_err(|e| ControlError::InvalidRequest(e.to_string()))
}

impl Node {
    /// Open the store and start every stored volume.
    pub async fn start(
        data_dir: &Path,
        engine: Arc<dyn IoEngine>,
        volume_options: VolumeOptions,
        events: SharedSink,
    ) -> Result<Arc<Self>, ControlError> {
        let store = Store::open(&data_dir.join("state.redb"))?;
        let node = Arc::new(Node {
            store,
            engine,
            volumes: RwLock::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
            nbd: OnceLock::new(),
            data_dir: data_dir.to_path_buf(),
            nbd_addr: OnceLock::new(),
            api_addr: OnceLock::new(),
            volume_options,
            events,
        });
        for record in node.store.volumes()? {
            let runtime = match node.open_volume(&record).await {
                Ok(v) => {
                    tracing::info!(volume = %record.name, generation = v.generation(), "volume started");
                    VolumeRuntime::Running(v)
                }
                Err(e) => {
                    tracing::error!(volume = %record.name, error = %e, "volume not started");
                    VolumeRuntime::Stopped(e.to_string())
                }
            };
            node.set_runtime(&record.name, Some(runtime));
        }
        Ok(node)
    }

    pub fn set_nbd_server(&self, server: Arc<ditto_nbd::Server>) {
        let _ = self.nbd.set(server);
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
        let map = match self.volumes.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(name).cloned()
    }

    fn runtimes(&self) -> Vec<(String, Arc<VolumeRuntime>)> {
        let map = match self.volumes.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Open every replica of a stored volume and assemble it. Any replica that
    /// cannot be opened keeps the volume stopped: it never starts degraded
    /// behind the operator's back.
    async fn open_volume(&self, record: &VolumeRecord) -> Result<Arc<Volume>, ControlError> {
        let mut members = Vec::new();
        for r in &record.replicas {
            let backend = FileReplica::open(self.engine.as_ref(), &r.path, record.uuid)
                .await
                .map_err(|e| {
                    ControlError::Engine(format!(
                        "{e}; the volume stays stopped until the replica is back"
                    ))
                })?;
            members.push(Member::new(
                r.id,
                r.pool.clone(),
                backend as Arc<dyn ReplicaBackend>,
            ));
        }
        Volume::open(
            &record.name,
            record.uuid,
            record.size,
            members,
            self.volume_options.clone(),
            self.events.clone(),
        )
        .await
        .map_err(|e| ControlError::Engine(e.to_string()))
    }

    fn pool_usages(&self, pools: &[PoolRecord], volumes: &[VolumeRecord]) -> Vec<PoolUsage> {
        pools
            .iter()
            .map(|p| {
                placement::usage(p, volumes, |v| {
                    layout_of(v).map(|l| l.replica_len()).unwrap_or(v.size)
                })
            })
            .collect()
    }

    pub async fn create_pool(&self, req: CreatePool) -> Result<PoolInfo, ControlError> {
        validate::name("pool", &req.name)?;
        let path = PathBuf::from(&req.path);
        validate::pool_path(&path)?;
        let path = std::fs::canonicalize(&path)
            .map_err(|_| ControlError::PoolPathMissing(path.clone()))?;
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
            kind: PoolKind::Directory,
            path,
            created_unix: now_unix(),
        };
        self.store.insert_pool(&record)?;
        tracing::info!(pool = %record.name, path = %record.path.display(), "pool created");
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
        if !users.is_empty() {
            return Err(ControlError::PoolInUse {
                pool: name.to_string(),
                volumes: users,
            });
        }
        self.store.delete_pool(name)?;
        Ok(())
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

    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeInfo, ControlError> {
        validate::name("volume", &req.name)?;
        let size = match &req.size {
            SizeInput::Bytes(0) => return Err(validate::parse_size("0").unwrap_err()),
            SizeInput::Bytes(b) => *b,
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
        for p in &req.pools {
            validate::name("pool", p)?;
        }
        let layout = Layout::new(size, DEFAULT_REGION_SIZE)
            .map_err(|e| ControlError::InvalidRequest(e.to_string()))?;
        let _guard = self.ops.lock().await;
        let volumes = self.store.volumes()?;
        if volumes.iter().any(|v| v.name == req.name) {
            return Err(ControlError::VolumeExists(req.name));
        }
        let pools = self.store.pools()?;
        let usages = self.pool_usages(&pools, &volumes);
        let chosen = placement::place(count, &req.pools, &usages, layout.replica_len())?;

        let uuid = Uuid::new_v4();
        let mut created: Vec<(ReplicaRecord, Arc<FileReplica>)> = Vec::new();
        let cleanup = |created: &[(ReplicaRecord, Arc<FileReplica>)]| {
            for (r, _) in created {
                let _ = std::fs::remove_file(&r.path);
            }
        };
        for pool_name in &chosen {
            let Some(pool) = pools.iter().find(|p| &p.name == pool_name) else {
                cleanup(&created);
                return Err(ControlError::PoolNotFound(pool_name.clone()));
            };
            let id = Uuid::new_v4();
            let path = pool.path.join(format!(
                "{}-{}.replica",
                req.name,
                &id.simple().to_string()[..8]
            ));
            match FileReplica::create(self.engine.as_ref(), &path, uuid, id, layout).await {
                Ok(backend) => created.push((
                    ReplicaRecord {
                        id,
                        pool: pool_name.clone(),
                        path,
                    },
                    backend,
                )),
                Err(e) => {
                    cleanup(&created);
                    return Err(ControlError::Engine(format!(
                        "creating replica in pool {pool_name:?}: {e}"
                    )));
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
                return Err(ControlError::Engine(e.to_string()));
            }
        };
        if let Err(e) = self.store.insert_volume(&record) {
            cleanup(&created);
            return Err(e);
        }
        tracing::info!(volume = %record.name, size, pools = ?chosen, "volume created");
        self.set_runtime(&record.name, Some(VolumeRuntime::Running(volume)));
        self.volume_info(&record)
    }

    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let _guard = self.ops.lock().await;
        let record = self
            .store
            .volumes()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ControlError::VolumeNotFound(name.to_string()))?;
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
        if let Some(rt) = runtime {
            if let VolumeRuntime::Running(v) = rt.as_ref() {
                let _ = v.close().await;
            }
        }
        self.store.delete_volume(name)?;
        for r in &record.replicas {
            if let Err(e) = std::fs::remove_file(&r.path) {
                tracing::warn!(path = %r.path.display(), error = %e, "could not remove replica file");
            }
        }
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
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
        let (state, reason, generation, replicas) = match runtime.as_deref() {
            Some(VolumeRuntime::Running(v)) => {
                let members = v.members();
                let replicas = record
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
                        None => missing_replica(r, "not part of the running volume"),
                    })
                    .collect::<Vec<_>>();
                let in_sync = members
                    .iter()
                    .filter(|m| m.state == ReplicaState::InSync)
                    .count();
                let state = if in_sync == 0 {
                    "failed"
                } else if in_sync < record.replicas.len() {
                    "degraded"
                } else {
                    "healthy"
                };
                (state, None, v.generation(), replicas)
            }
            Some(VolumeRuntime::Stopped(why)) => (
                "stopped",
                Some(why.clone()),
                0,
                record
                    .replicas
                    .iter()
                    .map(|r| missing_replica(r, "volume stopped"))
                    .collect(),
            ),
            None => ("stopped", Some("not loaded".into()), 0, Vec::new()),
        };
        Ok(VolumeInfo {
            name: record.name.clone(),
            uuid: record.uuid,
            size: record.size,
            state: state.into(),
            reason,
            generation,
            export,
            replicas,
            clients: self.clients_of(&record.name),
        })
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, ControlError> {
        self.store
            .volumes()?
            .iter()
            .map(|r| self.volume_info(r))
            .collect()
    }

    pub fn status(&self, volume: Option<&str>) -> Result<StatusInfo, ControlError> {
        let mut volumes = self.volumes()?;
        if let Some(name) = volume {
            volumes.retain(|v| v.name == name);
            if volumes.is_empty() {
                return Err(ControlError::VolumeNotFound(name.to_string()));
            }
        }
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
        })
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

fn missing_replica(r: &ReplicaRecord, why: &str) -> ReplicaInfo {
    ReplicaInfo {
        id: r.id,
        pool: r.pool.clone(),
        path: r.path.display().to_string(),
        state: "missing".into(),
        reason: Some(why.into()),
        generation: None,
        data_offset: None,
        reads: 0,
        writes: 0,
        errors: 0,
    }
}

fn pool_info(p: &PoolRecord, u: &PoolUsage) -> PoolInfo {
    PoolInfo {
        name: p.name.clone(),
        uuid: p.uuid,
        kind: match p.kind {
            PoolKind::Directory => "directory".into(),
        },
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
            VolumeRuntime::Stopped(_) => None,
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
                VolumeRuntime::Stopped(_) => None,
            })
            .collect()
    }
}
