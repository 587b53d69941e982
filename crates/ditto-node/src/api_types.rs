//! REST API request and response bodies, shared by the daemon and the CLI.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    pub name: String,
    /// A directory (one per disk): replicas are sparse files in it.
    #[serde(default)]
    pub path: Option<String>,
    /// A block device or partition: holds one replica.
    #[serde(default)]
    pub device: Option<String>,
    /// A remote NBD export URI: holds one replica.
    #[serde(default)]
    pub nbd: Option<String>,
}

/// `POST /v1/volumes/{name}/promote`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteVolume {
    /// Take over without the current primary, which does not answer (the
    /// operator's override; not needed with quorum).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/volumes/{name}/demote`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoteVolume {
    /// The node that takes the volume over (it holds an in-sync replica).
    pub to: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVolume {
    /// Start even with replicas missing (true) or never (false); absent: the config decides.
    #[serde(default)]
    pub degraded: Option<bool>,
    /// Start even if the only replicas present are stale by the node's
    /// membership record, losing the writes they missed.
    #[serde(default)]
    pub force_stale: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopVolume {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubRequest {
    #[serde(default)]
    pub repair: bool,
    /// Replica (id prefix or pool) whose data wins in a repair.
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Replica (id prefix or pool) to keep; the others are rebuilt from it.
    pub keep: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddReplica {
    pub pool: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRef {
    /// Replica id prefix (as `ditto status` shows it), pool name or path.
    pub replica: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReaddResult {
    /// "catch_up" (only regions written while it was away) or "full_rebuild".
    pub plan: String,
    pub dirty_regions: Option<u64>,
}

/// Progress of a resync, catch-up, rebuild or scrub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    pub kind: String,
    pub replica: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub elapsed_secs: f64,
    pub started_unix: u64,
    pub finished: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScrubInfo {
    pub started_unix: u64,
    pub duration_secs: f64,
    pub bytes: u64,
    pub mismatches: u64,
    /// Byte offsets of (up to 100) mismatched regions.
    pub mismatched_offsets: Vec<u64>,
    pub repaired: u64,
    pub repair: bool,
    pub finished: bool,
    pub error: Option<String>,
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
    /// One replica on each of these nodes, in its pool with the most room
    /// (instead of `pools` or `replicas`). Left out when empty, so a newer
    /// CLI still talks to an older daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Dirty-map region size, e.g. "1M" (power of two, 4 KiB to 1 GiB; default 1 MiB).
    #[serde(default)]
    pub region_size: Option<String>,
    /// A node without a replica that votes in the volume's majority quorum
    /// (DRBD's diskless tiebreaker). Left out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiebreaker: Option<String>,
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
    /// in_sync, rebuilding, failed, stale, missing, or unknown (volume not running).
    pub state: String,
    pub reason: Option<String>,
    pub generation: Option<u64>,
    pub data_offset: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    /// When it entered its state (Unix seconds): a failed replica on a dead
    /// node has been unreachable since then.
    #[serde(default)]
    pub state_since_unix: Option<u64>,
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
    /// (no replica left), starting (waiting for replicas) or stopped (see `reason`).
    pub state: String,
    pub reason: Option<String>,
    pub generation: u64,
    pub export: String,
    pub replicas: Vec<ReplicaInfo>,
    pub clients: Vec<ClientInfo>,
    /// The running or last resync/catch-up/rebuild/scrub.
    pub job: Option<JobInfo>,
    pub last_scrub: Option<ScrubInfo>,
    /// Regions that may differ between replicas (write-intent map).
    pub dirty_regions: u64,
    /// Most regions kept dirty while every replica is in sync (the hot set):
    /// what a crash resync copies at most. While a replica is out, every
    /// region written since it left stays dirty for its catch-up.
    #[serde(default)]
    pub hot_set_regions: u64,
    /// Region size of the dirty map, bytes.
    #[serde(default)]
    pub region_size: u64,
    /// Bytes copied by resync and rebuild since the volume started.
    pub copied_bytes: u64,
    /// Bytes a resync found on its target already and did not send
    /// (`resync_checksums`), since the volume started.
    #[serde(default)]
    pub skipped_bytes: u64,
    /// Commands that would fix what is wrong, if anything.
    pub actions: Vec<String>,
    /// Promotes so far (the primary's epoch; 0 for volumes from before epochs).
    #[serde(default)]
    pub epoch: u64,
    /// With quorum on: "majority: 2 of 3 nodes in sync (2 needed)", or "lost: …".
    #[serde(default)]
    pub quorum: Option<String>,
    /// The volume's diskless tiebreaker and whether it votes now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiebreaker: Option<TiebreakerInfo>,
}

/// A volume's diskless tiebreaker, as its primary sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TiebreakerInfo {
    pub node: String,
    /// It holds the current generation, so its vote counts.
    pub votes: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub node: NodeInfo,
    pub volumes: Vec<VolumeInfo>,
    pub pools: Vec<PoolInfo>,
    /// Replicas this node holds for volumes whose primary is another node.
    #[serde(default)]
    pub held: Vec<HeldInfo>,
    /// Volumes this node is the diskless tiebreaker of (no data here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiebreaker_of: Vec<WitnessInfo>,
}

/// A volume this node votes for without holding data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WitnessInfo {
    pub volume: String,
    /// The primary it follows, and that primary's epoch.
    pub primary: String,
    pub epoch: u64,
    /// The membership that primary last recorded here.
    pub generation: u64,
    pub in_sync: Vec<Uuid>,
    pub updated_unix: u64,
}

/// A replica held here for another node (this node is its secondary).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldInfo {
    pub volume: String,
    pub replica: Uuid,
    pub pool: String,
    pub path: String,
    /// The node that created it: the volume's primary, which serves it over NBD.
    pub primary: String,
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
    /// The peer protocol address (`peer_listen`), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// A node this node knows (`[nodes.NAME]`), as found just now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerNodeInfo {
    pub name: String,
    pub address: String,
    /// It answered, and proved its name when TLS is on.
    pub connected: bool,
    /// Round trip of one request, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Peer protocol version agreed.
    pub protocol: Option<u16>,
    /// Why not, when not connected.
    pub error: Option<String>,
    /// "config" (`[nodes.NAME]`) or "added" (`ditto node add`).
    #[serde(default)]
    pub source: String,
}

/// `POST /v1/nodes`: `ditto node add NAME --address HOST:PORT`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    pub name: String,
    pub address: String,
}

/// "12 s ago", "5 min ago", "3 h ago" for a unix time.
pub fn ago(unix: u64) -> String {
    let secs = ditto_control::model::now_unix().saturating_sub(unix);
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}
