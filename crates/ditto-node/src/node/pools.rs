//! Pools: creating, deleting and accounting for the room their replicas take.

use super::*;

impl Node {
    pub(super) fn pool_usages(
        &self,
        pools: &[PoolRecord],
        volumes: &[VolumeRecord],
    ) -> Vec<PoolUsage> {
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
                epoch: h.epoch,
                tiebreaker: None,
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
}
