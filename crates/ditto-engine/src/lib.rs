//! Volume engine: mirrors a volume over replica backends.
//!
//! Data path inside the engine: [`volume::Volume`] (fan-out, read balancing,
//! failure handling) → [`backend::ReplicaBackend`] (one copy, its metadata) →
//! [`io::IoEngine`] (how bytes reach the disk).

use std::future::Future;
use std::pin::Pin;

pub mod backend;
pub mod dirty;
pub mod events;
pub mod io;
pub mod jobs;
pub mod membership;
pub mod nbd_file;
pub mod read_policy;
pub mod uring;
pub mod volume;
pub mod voter;

pub use backend::{BackendError, FileReplica, MissingReplica, ReplicaBackend};
pub use events::{Event, EventKind, EventSink, LogSink, SharedSink};
pub use io::{Allocation, IoEngine, IoFile, ThreadPoolEngine};
pub use jobs::{JobKind, JobProgress, ReaddPlan, ScrubReport};
pub use membership::{KnownMembership, MembershipLog, MembershipLogRef};
pub use volume::{
    EngineError, Member, MemberStatus, NoQuorum, ReplicaState, Volume, VolumeOptions,
};

pub use voter::{Tiebreaker, VoteRecord, Voter};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
