//! The records the control plane stores: pools, volumes and their replicas.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the record encoding in the store; bumped on incompatible change.
pub const RECORD_VERSION: u32 = 1;

/// What a pool is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// A directory on a mounted filesystem; replicas are sparse files in it.
    Directory,
    /// A whole block device or partition; holds one replica.
    Device,
    /// A remote NBD export (`path` holds its URI); holds one replica.
    Nbd,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Directory => "directory",
            PoolKind::Device => "device",
            PoolKind::Nbd => "nbd",
        }
    }

    /// Device and NBD pools are one disk each: one replica fills them.
    pub fn single_replica(self) -> bool {
        !matches!(self, PoolKind::Directory)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRecord {
    pub version: u32,
    pub name: String,
    pub uuid: Uuid,
    pub kind: PoolKind,
    /// The directory, the device path, or the NBD URI.
    pub path: PathBuf,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    pub id: Uuid,
    /// The pool (`NODE:POOL` for a replica on another node).
    pub pool: String,
    /// The file, device or URI (`peer://ADDR/UUID` on another node).
    pub path: PathBuf,
    /// The node holding it when it is not this one (`[nodes.NAME]` in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A replica this node holds for a primary on another node (store table
/// `held_replicas`, keyed by replica uuid): served over the peer protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldReplicaRecord {
    pub version: u32,
    pub volume: Uuid,
    pub replica: Uuid,
    pub volume_name: String,
    pub pool: String,
    pub path: PathBuf,
    /// The primary this replica follows: the node that created it, or the
    /// one that took the volume over later at a newer epoch. Only its
    /// sessions are served.
    pub primary: String,
    pub created_unix: u64,
    /// The primary's epoch (see [`VolumeRecord::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// Every replica of the volume, as its primary last announced them:
    /// where a promote finds them when that primary is gone.
    #[serde(default)]
    pub members: Vec<HeldMember>,
    /// The volume's diskless tiebreaker, as its primary last announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiebreaker: Option<String>,
}

/// This node is a volume's diskless tiebreaker (store table `witnesses`,
/// keyed by volume uuid): the primary it follows and the membership that
/// primary last recorded here. No data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessRecord {
    pub version: u32,
    pub volume: Uuid,
    pub volume_name: String,
    pub primary: String,
    pub epoch: u64,
    /// The recorded membership: its epoch, generation and in-sync replicas.
    pub record_epoch: u64,
    pub generation: u64,
    pub in_sync: Vec<Uuid>,
    pub created_unix: u64,
    pub updated_unix: u64,
}

/// A node added with `ditto node add` (store table `nodes`, keyed by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub version: u32,
    pub name: String,
    /// Its peer address, HOST:PORT.
    pub address: String,
    pub added_unix: u64,
}

/// One replica of a volume, as a node holding another of its replicas knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldMember {
    pub replica: Uuid,
    pub node: String,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub version: u32,
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    pub region_size: u32,
    pub replicas: Vec<ReplicaRecord>,
    pub created_unix: u64,
    /// Bumped by every promote of the volume (planned or forced). Replicas
    /// on other nodes follow the primary with the newest epoch and refuse
    /// the others; a primary told of a newer epoch stops serving.
    #[serde(default)]
    pub epoch: u64,
    /// A node that holds no data and only votes in the volume's quorum
    /// (`volume create --tiebreaker NODE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiebreaker: Option<String>,
}

/// The membership a volume last recorded (generation and in-sync replicas),
/// kept by the node so a replica that returns alone can be judged stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipRecord {
    pub version: u32,
    pub volume: Uuid,
    pub generation: u64,
    pub in_sync: Vec<Uuid>,
    pub updated_unix: u64,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
