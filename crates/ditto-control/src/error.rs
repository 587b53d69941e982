//! Control-plane errors: each says what was wrong and which command fixes it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid {kind} name {name:?}: {why}")]
    InvalidName {
        kind: &'static str,
        name: String,
        why: String,
    },
    #[error("invalid size {input:?}: {why} (examples: 64M, 10G, 1TiB, 1048576)")]
    InvalidSize { input: String, why: String },
    #[error("pool {0:?} already exists; see `ditto pool list`")]
    PoolExists(String),
    #[error(
        "volume {0:?} already exists; see `ditto volume list`, or `ditto volume delete {0}` first"
    )]
    VolumeExists(String),
    #[error("pool path {0} does not exist; create the directory first (mkdir -p {0})")]
    PoolPathMissing(PathBuf),
    #[error("pool path {0} is not a directory; give a directory on the disk to use")]
    PoolPathNotDirectory(PathBuf),
    #[error("pool path {path} is not writable: {why}")]
    PoolPathNotWritable { path: PathBuf, why: String },
    #[error("pool path {path} is already used by pool {pool:?}")]
    PoolPathInUse { path: PathBuf, pool: String },
    #[error("pool {0:?} does not exist; see `ditto pool list` or create it with `ditto pool create {0} --path DIR`")]
    PoolNotFound(String),
    #[error("volume {0:?} does not exist; see `ditto volume list`")]
    VolumeNotFound(String),
    #[error("{asked} replicas asked but only {usable} pools can take one ({why}); add pools with `ditto pool create NAME --path DIR` or ask for fewer with --replicas")]
    NotEnoughPools {
        asked: usize,
        usable: usize,
        why: String,
    },
    #[error("the same pool {0:?} is named twice: each replica needs its own pool (its own failure domain)")]
    DuplicatePool(String),
    #[error("pool {pool:?} has {free} bytes free for new volumes, the volume needs {need}; free space or choose another pool")]
    NoSpace { pool: String, need: u64, free: u64 },
    #[error("pool {pool:?} still holds replicas of volumes {volumes:?}; delete them first")]
    PoolInUse { pool: String, volumes: Vec<String> },
    #[error("volume {name:?} has {clients} connected client(s); disconnect them or use --force")]
    VolumeBusy { name: String, clients: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("config file {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("state store: {0}")]
    Store(String),
    #[error("{0}")]
    Engine(String),
}

impl ControlError {
    /// A stable machine-readable code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::InvalidName { .. } => "invalid_name",
            ControlError::InvalidSize { .. } => "invalid_size",
            ControlError::PoolExists(_) => "pool_exists",
            ControlError::VolumeExists(_) => "volume_exists",
            ControlError::PoolPathMissing(_) => "pool_path_missing",
            ControlError::PoolPathNotDirectory(_) => "pool_path_not_directory",
            ControlError::PoolPathNotWritable { .. } => "pool_path_not_writable",
            ControlError::PoolPathInUse { .. } => "pool_path_in_use",
            ControlError::PoolNotFound(_) => "pool_not_found",
            ControlError::VolumeNotFound(_) => "volume_not_found",
            ControlError::NotEnoughPools { .. } => "not_enough_pools",
            ControlError::DuplicatePool(_) => "duplicate_pool",
            ControlError::NoSpace { .. } => "no_space",
            ControlError::PoolInUse { .. } => "pool_in_use",
            ControlError::VolumeBusy { .. } => "volume_busy",
            ControlError::InvalidRequest(_) => "invalid_request",
            ControlError::Config { .. } => "config",
            ControlError::Store(_) => "store",
            ControlError::Engine(_) => "engine",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::PoolNotFound(_) | ControlError::VolumeNotFound(_) => 404,
            ControlError::PoolExists(_)
            | ControlError::VolumeExists(_)
            | ControlError::PoolInUse { .. }
            | ControlError::PoolPathInUse { .. }
            | ControlError::VolumeBusy { .. } => 409,
            ControlError::NoSpace { .. } => 507,
            ControlError::Store(_) | ControlError::Engine(_) => 500,
            _ => 400,
        }
    }
}
