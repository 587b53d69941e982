//! State-change events the engine reports (replica failed, resync progress, ...), and the sink they go to.

use std::sync::Arc;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    VolumeStarted,
    VolumeStopped,
    /// Started with fewer in-sync replicas than it has.
    DegradedStart,
    /// A volume that cannot start (missing replica under a no-degraded policy, split brain, ...).
    StartRefused,
    ReplicaFailed,
    StaleReplicaRefused,
    SplitBrain,
    SplitBrainResolved,
    ReplicaAdded,
    ReplicaRemoved,
    ResyncStarted,
    ResyncProgress,
    ResyncFinished,
    RebuildStarted,
    RebuildProgress,
    RebuildFinished,
    ScrubStarted,
    ScrubProgress,
    ScrubFinished,
    ScrubMismatch,
    ReadErrorRepaired,
    /// The last in-sync replica failed a request: the request got the
    /// error, the replica stays in service (md never fails its last leg).
    LastReplicaError,
    /// The peer server refused a node (another CA, expired or missing
    /// certificate, unknown node, a name its certificate does not prove).
    PeerRefused,
    /// The operator promoted this node without the old primary's consent
    /// (`volume promote --force`).
    ForcedPromote,
    /// This node was the volume's primary, and another node took it over
    /// at a newer epoch: it stopped serving and holds its replicas for the
    /// new primary, which catches them up (or reports a split brain).
    Superseded,
    /// The volume's diskless tiebreaker stopped voting (it did not record
    /// a membership change) or votes again.
    TiebreakerVote,
}

impl EventKind {
    /// Stable snake_case name, used in JSON, logs and for `event_program`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::VolumeStarted => "volume_started",
            EventKind::VolumeStopped => "volume_stopped",
            EventKind::DegradedStart => "degraded_start",
            EventKind::StartRefused => "start_refused",
            EventKind::ReplicaFailed => "replica_failed",
            EventKind::StaleReplicaRefused => "stale_replica_refused",
            EventKind::SplitBrain => "split_brain",
            EventKind::SplitBrainResolved => "split_brain_resolved",
            EventKind::ReplicaAdded => "replica_added",
            EventKind::ReplicaRemoved => "replica_removed",
            EventKind::ResyncStarted => "resync_started",
            EventKind::ResyncProgress => "resync_progress",
            EventKind::ResyncFinished => "resync_finished",
            EventKind::RebuildStarted => "rebuild_started",
            EventKind::RebuildProgress => "rebuild_progress",
            EventKind::RebuildFinished => "rebuild_finished",
            EventKind::ScrubStarted => "scrub_started",
            EventKind::ScrubProgress => "scrub_progress",
            EventKind::ScrubFinished => "scrub_finished",
            EventKind::ScrubMismatch => "scrub_mismatch",
            EventKind::ReadErrorRepaired => "read_error_repaired",
            EventKind::LastReplicaError => "last_replica_error",
            EventKind::PeerRefused => "peer_refused",
            EventKind::ForcedPromote => "forced_promote",
            EventKind::Superseded => "superseded",
            EventKind::TiebreakerVote => "tiebreaker_vote",
        }
    }

    /// Events an administrator must hear about at once (run `event_program`, log at warn/error).
    pub fn is_alarm(self) -> bool {
        matches!(
            self,
            EventKind::DegradedStart
                | EventKind::StartRefused
                | EventKind::ReplicaFailed
                | EventKind::StaleReplicaRefused
                | EventKind::SplitBrain
                | EventKind::ScrubMismatch
                | EventKind::LastReplicaError
                | EventKind::PeerRefused
                | EventKind::ForcedPromote
                | EventKind::Superseded
        )
    }
}

/// One state change of one volume (and, where it applies, one replica).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub volume: String,
    /// Replica location (path or URI), when the event is about one replica.
    pub replica: Option<String>,
    /// Human sentence: what happened and, for alarms, what to do.
    pub message: String,
    /// Bytes done / total for progress events.
    pub progress: Option<(u64, u64)>,
}

/// Where events go. The daemon's sink records, logs and notifies.
pub trait EventSink: Send + Sync + 'static {
    fn emit(&self, event: Event);
}

/// A sink that only logs (tests, tools).
pub struct LogSink;

impl EventSink for LogSink {
    fn emit(&self, e: Event) {
        if e.kind.is_alarm() {
            tracing::warn!(event = e.kind.as_str(), volume = %e.volume, replica = ?e.replica, "{}", e.message);
        } else {
            tracing::info!(event = e.kind.as_str(), volume = %e.volume, replica = ?e.replica, "{}", e.message);
        }
    }
}

pub type SharedSink = Arc<dyn EventSink>;
