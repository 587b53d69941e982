//! REST API request and response bodies, shared by the daemon and the CLI.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Bytes, or a string such as "1G".
    pub size: SizeInput,
    /// Number of replicas, placed on distinct pools (default 2).
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Explicit pools, one replica each (instead of `replicas`).
    #[serde(default)]
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeInput {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: Uuid,
    pub kind: String,
    pub path: String,
    pub total_bytes: u64,
    /// Free for new volumes (filesystem free space minus what existing replicas may still use).
    pub free_bytes: u64,
    pub fs_free_bytes: u64,
    pub reserved_bytes: u64,
    pub replicas: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: Uuid,
    pub pool: String,
    pub path: String,
    /// in_sync, failed, stale or missing.
    pub state: String,
    pub reason: Option<String>,
    pub generation: Option<u64>,
    pub data_offset: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: String,
    pub connected_at_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    /// healthy (every replica in sync), degraded (serving with fewer), failed
    /// (no replica left) or stopped (refused to start; see `reason`).
    pub state: String,
    pub reason: Option<String>,
    pub generation: u64,
    pub export: String,
    pub replicas: Vec<ReplicaInfo>,
    pub clients: Vec<ClientInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub node: NodeInfo,
    pub volumes: Vec<VolumeInfo>,
    pub pools: Vec<PoolInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub version: String,
    pub data_dir: String,
    pub nbd: String,
    pub api: String,
    pub io_engine: String,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
    pub code: String,
}

/// What the daemon writes to `DATA_DIR/daemon.json` once it listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonAddresses {
    pub api: String,
    pub nbd: String,
    pub pid: u32,
}
