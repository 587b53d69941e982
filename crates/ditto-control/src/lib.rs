//! Control plane model: pools, volumes, placement, validation, config and the embedded store.
//!
//! Everything here is plain data and rules; it does no block I/O. The daemon
//! turns these records into running volumes (see `crates/ditto-node/src/node/`).

pub mod config;
pub mod error;
pub mod model;
pub mod placement;
pub mod store;
pub mod validate;

pub use config::DaemonConfig;
pub use error::ControlError;
pub use model::{PoolRecord, ReplicaRecord, VolumeRecord};
pub use store::Store;
