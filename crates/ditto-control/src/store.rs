//! The node's embedded transactional state store (redb), in the data directory.
//!
//! redb gives atomic, checksummed, crash-safe commits without a server; each
//! record is a versioned JSON document keyed by name (layout in docs/store.md).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::error::ControlError;
use crate::model::{
    HeldReplicaRecord, MembershipRecord, NodeRecord, PoolRecord, VolumeRecord, WitnessRecord,
    RECORD_VERSION,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Keyed by volume uuid: a name reused after a delete never inherits a record.
const MEMBERSHIP: TableDefinition<&str, &[u8]> = TableDefinition::new("membership");
/// Replicas held for primaries on other nodes, keyed by replica uuid.
/// Added without a schema bump: an older ditto never opens it.
const HELD: TableDefinition<&str, &[u8]> = TableDefinition::new("held_replicas");
/// Nodes added with `ditto node add` (beside the config's `[nodes]`).
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Volumes this node is the diskless tiebreaker of, keyed by volume uuid.
/// Added without a schema bump, as `held_replicas`.
const WITNESSES: TableDefinition<&str, &[u8]> = TableDefinition::new("witnesses");
const SCHEMA_KEY: &str = "schema_version";
/// Version of the store's table layout.
pub const SCHEMA_VERSION: u64 = 1;

pub struct Store {
    db: Database,
}

fn store_err(e: impl std::fmt::Display) -> ControlError {
    ControlError::Store(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(v).map_err(store_err)
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ControlError::Store(format!("record {table}/{key} is unreadable: {e}")))
}

impl Store {
    /// Open (or create) the store at `path`, refusing a schema it does not know.
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        let db = Database::create(path)
            .map_err(|e| ControlError::Store(format!("cannot open {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            let found = meta.get(SCHEMA_KEY).map_err(store_err)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION).map_err(store_err)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(ControlError::Store(format!(
                    "{} has schema version {v}, this ditto knows {SCHEMA_VERSION}; upgrade ditto",
                    path.display()
                )))
                }
            }
            tx.open_table(POOLS).map_err(store_err)?;
            tx.open_table(VOLUMES).map_err(store_err)?;
            tx.open_table(MEMBERSHIP).map_err(store_err)?;
            tx.open_table(HELD).map_err(store_err)?;
            tx.open_table(NODES).map_err(store_err)?;
            tx.open_table(WITNESSES).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok(Store { db })
    }

    fn list<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, ControlError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(def).map_err(store_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            out.push(decode(&def.to_string(), k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn pools(&self) -> Result<Vec<PoolRecord>, ControlError> {
        let pools: Vec<PoolRecord> = self.list(POOLS)?;
        check_versions(pools.iter().map(|p| (p.name.as_str(), p.version)))?;
        Ok(pools)
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, ControlError> {
        let volumes: Vec<VolumeRecord> = self.list(VOLUMES)?;
        check_versions(volumes.iter().map(|v| (v.name.as_str(), v.version)))?;
        Ok(volumes)
    }

    /// Insert a pool; fails if the name exists (checked inside the transaction).
    pub fn insert_pool(&self, pool: &PoolRecord) -> Result<(), ControlError> {
        self.insert_new(POOLS, &pool.name, encode(pool)?, || {
            ControlError::PoolExists(pool.name.clone())
        })
    }

    pub fn insert_volume(&self, volume: &VolumeRecord) -> Result<(), ControlError> {
        self.insert_new(VOLUMES, &volume.name, encode(volume)?, || {
            ControlError::VolumeExists(volume.name.clone())
        })
    }

    fn insert_new(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: Vec<u8>,
        exists: impl Fn() -> ControlError,
    ) -> Result<(), ControlError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(def).map_err(store_err)?;
            if table.get(key).map_err(store_err)?.is_some() {
                return Err(exists());
            }
            table.insert(key, value.as_slice()).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Replace an existing volume record (replica added or removed).
    pub fn update_volume(&self, volume: &VolumeRecord) -> Result<(), ControlError> {
        let value = encode(volume)?;
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(VOLUMES).map_err(store_err)?;
            if table
                .get(volume.name.as_str())
                .map_err(store_err)?
                .is_none()
            {
                return Err(ControlError::VolumeNotFound(volume.name.clone()));
            }
            table
                .insert(volume.name.as_str(), value.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// The membership record of volume `uuid`, if one was written.
    pub fn membership(&self, uuid: Uuid) -> Result<Option<MembershipRecord>, ControlError> {
        let key = uuid.to_string();
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(MEMBERSHIP).map_err(store_err)?;
        let Some(v) = table.get(key.as_str()).map_err(store_err)? else {
            return Ok(None);
        };
        let record: MembershipRecord = decode("membership", &key, v.value())?;
        check_versions(std::iter::once((key.as_str(), record.version)))?;
        Ok(Some(record))
    }

    /// Replace the membership record of its volume (durable on return).
    pub fn set_membership(&self, record: &MembershipRecord) -> Result<(), ControlError> {
        let (key, value) = (record.volume.to_string(), encode(record)?);
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(MEMBERSHIP).map_err(store_err)?;
            table
                .insert(key.as_str(), value.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    pub fn delete_membership(&self, uuid: Uuid) -> Result<bool, ControlError> {
        self.delete(MEMBERSHIP, &uuid.to_string())
    }

    /// Replicas this node holds for primaries elsewhere.
    pub fn held_replicas(&self) -> Result<Vec<HeldReplicaRecord>, ControlError> {
        self.list(HELD)
    }

    pub fn delete_held_replica(&self, replica: Uuid) -> Result<bool, ControlError> {
        self.delete(HELD, &replica.to_string())
    }

    pub fn insert_held_replica(&self, r: &HeldReplicaRecord) -> Result<(), ControlError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(HELD).map_err(store_err)?;
            let key = r.replica.to_string();
            if t.get(key.as_str()).map_err(store_err)?.is_some() {
                return Err(ControlError::InvalidRequest(format!(
                    "replica {} is held here already",
                    r.replica
                )));
            }
            t.insert(key.as_str(), encode(r)?.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        let nodes: Vec<NodeRecord> = self.list(NODES)?;
        check_versions(nodes.iter().map(|n| (n.name.as_str(), n.version)))?;
        Ok(nodes)
    }

    /// Record a node; fails if the name exists.
    pub fn insert_node(&self, node: &NodeRecord) -> Result<(), ControlError> {
        self.insert_new(NODES, &node.name, encode(node)?, || {
            ControlError::InvalidRequest(format!(
                "node {:?} is known already; `ditto node remove {}` first to change its address",
                node.name, node.name
            ))
        })
    }

    pub fn delete_node(&self, name: &str) -> Result<bool, ControlError> {
        self.delete(NODES, name)
    }

    /// Replace a held replica's record (its primary, epoch or member list changed).
    pub fn update_held_replica(&self, r: &HeldReplicaRecord) -> Result<(), ControlError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(HELD).map_err(store_err)?;
            let key = r.replica.to_string();
            if t.get(key.as_str()).map_err(store_err)?.is_none() {
                return Err(ControlError::InvalidRequest(format!(
                    "replica {} is not held here",
                    r.replica
                )));
            }
            t.insert(key.as_str(), encode(r)?.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Volumes this node is the tiebreaker of.
    pub fn witnesses(&self) -> Result<Vec<WitnessRecord>, ControlError> {
        let w: Vec<WitnessRecord> = self.list(WITNESSES)?;
        check_versions(w.iter().map(|w| (w.volume_name.as_str(), w.version)))?;
        Ok(w)
    }

    /// Record a new witness; fails if this node is the volume's already.
    pub fn insert_witness(&self, w: &WitnessRecord) -> Result<(), ControlError> {
        self.insert_new(WITNESSES, &w.volume.to_string(), encode(w)?, || {
            ControlError::InvalidRequest(format!(
                "this node is the tiebreaker of volume {} already",
                w.volume_name
            ))
        })
    }

    /// Replace a witness record (durable on return).
    pub fn update_witness(&self, w: &WitnessRecord) -> Result<(), ControlError> {
        let (key, value) = (w.volume.to_string(), encode(w)?);
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(WITNESSES).map_err(store_err)?;
            table
                .insert(key.as_str(), value.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    pub fn delete_witness(&self, volume: Uuid) -> Result<bool, ControlError> {
        self.delete(WITNESSES, &volume.to_string())
    }

    pub fn delete_pool(&self, name: &str) -> Result<bool, ControlError> {
        self.delete(POOLS, name)
    }

    pub fn delete_volume(&self, name: &str) -> Result<bool, ControlError> {
        self.delete(VOLUMES, name)
    }

    fn delete(&self, def: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, ControlError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        let existed = {
            let mut table = tx.open_table(def).map_err(store_err)?;
            let removed = table.remove(key).map_err(store_err)?;
            removed.is_some()
        };
        tx.commit().map_err(store_err)?;
        Ok(existed)
    }
}

fn check_versions<'a>(records: impl Iterator<Item = (&'a str, u32)>) -> Result<(), ControlError> {
    for (name, version) in records {
        if version != RECORD_VERSION {
            return Err(ControlError::Store(format!(
                "record {name:?} has version {version}, this ditto knows {RECORD_VERSION}; upgrade ditto"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{now_unix, PoolKind, ReplicaRecord};

    #[test]
    fn records_from_before_epochs_decode_with_epoch_zero() {
        let volume = r#"{"version":1,"name":"v","uuid":"00000000-0000-0000-0000-000000000001","size":1048576,"region_size":65536,"replicas":[],"created_unix":1}"#;
        let v: VolumeRecord = decode("volumes", "v", volume.as_bytes()).unwrap();
        assert_eq!(v.epoch, 0);
        let held = r#"{"version":1,"volume":"00000000-0000-0000-0000-000000000001","replica":"00000000-0000-0000-0000-000000000002","volume_name":"v","pool":"p","path":"/x","primary":"a","created_unix":1}"#;
        let h: HeldReplicaRecord = decode("held_replicas", "r", held.as_bytes()).unwrap();
        assert_eq!((h.epoch, h.members.len()), (0, 0));
        // Unknown fields stay errors.
        let bad = volume.replace("\"created_unix\":1", "\"created_unix\":1,\"x\":2");
        assert!(decode::<VolumeRecord>("volumes", "v", bad.as_bytes()).is_err());
    }

    #[test]
    fn survives_reopen_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let pool = PoolRecord {
            version: RECORD_VERSION,
            name: "p1".into(),
            uuid: Uuid::new_v4(),
            kind: PoolKind::Directory,
            path: dir.path().to_path_buf(),
            created_unix: now_unix(),
        };
        let vol = VolumeRecord {
            version: RECORD_VERSION,
            name: "v".into(),
            uuid: Uuid::new_v4(),
            size: 1 << 30,
            region_size: 1 << 20,
            replicas: vec![ReplicaRecord {
                id: Uuid::new_v4(),
                pool: "p1".into(),
                path: dir.path().join("r"),
                node: None,
            }],
            created_unix: now_unix(),
            epoch: 1,
            tiebreaker: Some("c".into()),
        };
        {
            let s = Store::open(&path).unwrap();
            s.insert_pool(&pool).unwrap();
            s.insert_volume(&vol).unwrap();
            assert!(matches!(
                s.insert_pool(&pool),
                Err(ControlError::PoolExists(_))
            ));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.pools().unwrap(), vec![pool]);
        assert_eq!(s.volumes().unwrap(), vec![vol.clone()]);
        assert!(s.delete_volume("v").unwrap());
        assert!(!s.delete_volume("v").unwrap());
        assert!(s.volumes().unwrap().is_empty());
        let m = MembershipRecord {
            version: RECORD_VERSION,
            volume: vol.uuid,
            generation: 7,
            in_sync: vec![vol.replicas[0].id],
            updated_unix: now_unix(),
        };
        assert_eq!(s.membership(vol.uuid).unwrap(), None);
        s.set_membership(&m).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.membership(vol.uuid).unwrap(), Some(m));
        assert!(s.delete_membership(vol.uuid).unwrap());
    }

    #[test]
    fn witness_records_are_kept_replaced_and_deleted() {
        use crate::model::WitnessRecord;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let mut w = WitnessRecord {
            version: RECORD_VERSION,
            volume: Uuid::new_v4(),
            volume_name: "vm1".into(),
            primary: "a".into(),
            epoch: 1,
            record_epoch: 1,
            generation: 0,
            in_sync: Vec::new(),
            created_unix: now_unix(),
            updated_unix: now_unix(),
        };
        store.insert_witness(&w).unwrap();
        let again = store.insert_witness(&w).unwrap_err().to_string();
        assert!(
            again.contains("tiebreaker of volume vm1 already"),
            "{again}"
        );
        w.primary = "b".into();
        w.generation = 7;
        w.in_sync = vec![Uuid::new_v4()];
        store.update_witness(&w).unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        assert_eq!(store.witnesses().unwrap(), vec![w.clone()]);
        assert!(store.delete_witness(w.volume).unwrap());
        assert!(store.witnesses().unwrap().is_empty());
    }
}
