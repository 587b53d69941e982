//! Placement: how much room each pool has, and which pools take a new volume's replicas.
//!
//! Replica files are sparse, but space is accounted thick: a pool's free space
//! for new volumes is the filesystem's free space minus what existing replicas
//! may still grow into. A volume that fits at creation keeps fitting.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::error::ControlError;
use crate::model::{PoolRecord, VolumeRecord};

/// Space of one pool as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolUsage {
    pub name: String,
    pub total_bytes: u64,
    /// Free on the filesystem right now.
    pub fs_free_bytes: u64,
    /// Promised to existing replicas but not yet written.
    pub reserved_bytes: u64,
    /// What a new volume may still take.
    pub free_bytes: u64,
    pub replicas: usize,
}

/// Total and available bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer,
    // both alive for the duration of the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Compute a pool's usage from the filesystem and the replicas placed in it.
/// `replica_len` gives the full length (metadata + data) of each replica of a
/// volume; `device_size` is the size of a device or NBD pool (None for a directory).
pub fn usage(
    pool: &PoolRecord,
    volumes: &[VolumeRecord],
    replica_len: impl Fn(&VolumeRecord) -> u64,
    device_size: Option<u64>,
) -> PoolUsage {
    let replicas = volumes
        .iter()
        .flat_map(|v| v.replicas.iter())
        .filter(|r| r.pool == pool.name)
        .count();
    if pool.kind.single_replica() {
        let size = device_size.unwrap_or(0);
        let free = if replicas == 0 { size } else { 0 };
        return PoolUsage {
            name: pool.name.clone(),
            total_bytes: size,
            fs_free_bytes: free,
            reserved_bytes: 0,
            free_bytes: free,
            replicas,
        };
    }
    let (total, fs_free) = statvfs(&pool.path).unwrap_or((0, 0));
    let mut reserved = 0u64;
    for v in volumes {
        for r in v.replicas.iter().filter(|r| r.pool == pool.name) {
            let allocated = std::fs::metadata(&r.path)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            reserved += replica_len(v).saturating_sub(allocated);
        }
    }
    PoolUsage {
        name: pool.name.clone(),
        total_bytes: total,
        fs_free_bytes: fs_free,
        reserved_bytes: reserved,
        free_bytes: fs_free.saturating_sub(reserved),
        replicas,
    }
}

/// Choose the pools for a new volume's replicas: the explicit list if given
/// (each must exist, be distinct and have room), else the `count` pools with
/// the most free space. `need` is the full length of one replica.
pub fn place(
    count: usize,
    explicit: &[String],
    pools: &[PoolUsage],
    need: u64,
) -> Result<Vec<String>, ControlError> {
    if !explicit.is_empty() {
        let mut chosen = Vec::new();
        for name in explicit {
            if chosen.contains(name) {
                return Err(ControlError::DuplicatePool(name.clone()));
            }
            let pool = pools
                .iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| ControlError::PoolNotFound(name.clone()))?;
            if pool.free_bytes < need {
                return Err(ControlError::NoSpace {
                    pool: name.clone(),
                    need,
                    free: pool.free_bytes,
                });
            }
            chosen.push(name.clone());
        }
        return Ok(chosen);
    }
    if count == 0 {
        return Err(ControlError::InvalidRequest(
            "a volume needs at least one replica".into(),
        ));
    }
    if pools.len() < count {
        return Err(ControlError::NotEnoughPools {
            asked: count,
            usable: pools.len(),
            why: format!("{} pool(s) exist", pools.len()),
        });
    }
    let mut fitting: Vec<&PoolUsage> = pools.iter().filter(|p| p.free_bytes >= need).collect();
    if fitting.len() < count {
        // Name the pool that comes closest, so the message says what to free.
        let best = pools.iter().max_by_key(|p| p.free_bytes);
        if let (0, Some(best)) = (fitting.len(), best) {
            return Err(ControlError::NoSpace {
                pool: best.name.clone(),
                need,
                free: best.free_bytes,
            });
        }
        return Err(ControlError::NotEnoughPools {
            asked: count,
            usable: fitting.len(),
            why: format!("only {} pool(s) have {need} bytes free", fitting.len()),
        });
    }
    fitting.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.name.cmp(&b.name)));
    Ok(fitting
        .into_iter()
        .take(count)
        .map(|p| p.name.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, free: u64) -> PoolUsage {
        PoolUsage {
            name: name.into(),
            total_bytes: free * 2,
            fs_free_bytes: free,
            reserved_bytes: 0,
            free_bytes: free,
            replicas: 0,
        }
    }

    #[test]
    fn picks_most_free_distinct_pools() {
        let pools = [pool("a", 10), pool("b", 30), pool("c", 20)];
        assert_eq!(place(2, &[], &pools, 5).unwrap(), vec!["b", "c"]);
    }

    #[test]
    fn refuses_too_few_pools_and_no_space() {
        let pools = [pool("a", 10), pool("b", 30)];
        assert!(matches!(
            place(3, &[], &pools, 5),
            Err(ControlError::NotEnoughPools { .. })
        ));
        assert!(matches!(
            place(1, &[], &pools, 100),
            Err(ControlError::NoSpace { .. })
        ));
        assert!(matches!(
            place(2, &[], &pools, 20),
            Err(ControlError::NotEnoughPools { .. })
        ));
        assert!(matches!(
            place(0, &["a".into(), "a".into()], &pools, 1),
            Err(ControlError::DuplicatePool(_))
        ));
        assert!(matches!(
            place(0, &["zz".into()], &pools, 1),
            Err(ControlError::PoolNotFound(_))
        ));
        assert_eq!(place(0, &["a".into()], &pools, 1).unwrap(), vec!["a"]);
    }
}
