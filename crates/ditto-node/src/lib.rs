//! A node's orchestration: turns stored records into live volumes and runs
//! every control operation on them, split by job (volume lifecycle,
//! replicas, peers and failover, pools), with the replicas it holds for
//! other nodes, its event log and its NBD exports. The daemon binary wires
//! it to the REST API and the listeners; the API and the tests share it.

pub mod api_types;
pub mod events;
pub mod export;
pub mod node;
pub mod peers;
