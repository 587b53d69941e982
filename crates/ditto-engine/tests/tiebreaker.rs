//! The diskless tiebreaker: two data nodes and a voter that holds only a
//! record of the membership. Its vote carries acknowledgements while it
//! holds the current generation; a start that counts it trusts only the
//! replicas its record vouches for.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use ditto_engine::{
    BoxFuture, EngineError, Member, NoQuorum, ReplicaBackend, Tiebreaker, Volume, VolumeOptions,
    VoteRecord, Voter,
};

/// A voter in memory, as the tiebreaker node's witness record would hold it.
#[derive(Default)]
struct MemoryVoter {
    held: Mutex<Option<VoteRecord>>,
    refuse: AtomicBool,
    /// Each record takes this long (a slow link to the tiebreaker).
    delay_ms: std::sync::atomic::AtomicU64,
}

impl Voter for MemoryVoter {
    fn domain(&self) -> &str {
        "t"
    }
    fn record(&self, record: VoteRecord) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let delay = self.delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            if self.refuse.load(Ordering::SeqCst) {
                return Err("cut off".into());
            }
            *self.held.lock().unwrap() = Some(record);
            Ok(())
        })
    }
}

impl MemoryVoter {
    fn held(&self) -> VoteRecord {
        self.held.lock().unwrap().clone().unwrap_or_default()
    }
}

/// Replicas on nodes a and b (those in `present`; the others missing),
/// with voter `t` that took the start's claim holding `claimed`.
async fn open(
    f: &Fixture,
    present: &[usize],
    voter: &Arc<MemoryVoter>,
    claimed: Option<VoteRecord>,
    epoch: u64,
) -> Result<Arc<Volume>, EngineError> {
    let options = VolumeOptions { epoch, ..options() };
    open_with(f, present, voter.clone(), claimed, options).await
}

/// [`open`] with any voter and options (quorum on, erroring without it).
async fn open_with(
    f: &Fixture,
    present: &[usize],
    voter: Arc<dyn Voter>,
    claimed: Option<VoteRecord>,
    options: VolumeOptions,
) -> Result<Arc<Volume>, EngineError> {
    let mut members = Vec::new();
    for (i, node) in ["a", "b"].iter().enumerate() {
        let backend: Arc<dyn ReplicaBackend> = if present.contains(&i) {
            f.backend(i).await
        } else {
            Arc::new(ditto_engine::MissingReplica::new(
                "gone",
                "node down",
                f.vol_id,
                f.ids[i],
                layout(),
            ))
        };
        members.push(Member::new(f.ids[i], format!("{node}:p0"), backend).in_domain(*node));
    }
    Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        VolumeOptions {
            quorum: Some(NoQuorum::Error),
            tiebreaker: Some(Tiebreaker { voter, claimed }),
            ..options
        },
        Arc::new(ditto_engine::LogSink),
    )
    .await
}

#[tokio::test]
async fn with_the_tiebreaker_one_data_node_goes_on_and_without_it_stops() {
    let f = Fixture::new(2).await;
    let t = Arc::new(MemoryVoter::default());
    let v = open(&f, &[0, 1], &t, Some(VoteRecord::default()), 1)
        .await
        .unwrap();
    assert_eq!(v.quorum_state(), Some((3, 3, 2)));
    v.write(0, block(1), false).await.unwrap();
    // Node b dies: a and the tiebreaker are a majority, and the tiebreaker
    // holds the new membership (only a in sync) before the next ack.
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    v.write(0, block(2), false).await.unwrap();
    let held = t.held();
    assert_eq!(held.in_sync, vec![f.ids[0]]);
    assert_eq!(held.generation, v.generation());
    assert_eq!(held.epoch, 1);
    // Now the tiebreaker is cut off too: the next membership change cannot
    // be recorded there, so a alone is no majority.
    t.refuse.store(true, Ordering::SeqCst);
    v.refresh_tiebreaker().await;
    assert!(!v.tiebreaker_votes());
    match v.write(0, block(3), false).await {
        Err(EngineError::NoQuorum {
            have: 1, need: 2, ..
        }) => {}
        other => panic!("a write on one node without the tiebreaker was acknowledged: {other:?}"),
    }
    // It answers again: the heartbeat wins the vote back.
    t.refuse.store(false, Ordering::SeqCst);
    v.refresh_tiebreaker().await;
    assert!(v.tiebreaker_votes());
    v.write(0, block(4), false).await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), block(4));
}

#[tokio::test]
async fn a_membership_change_the_tiebreaker_missed_takes_its_vote() {
    let f = Fixture::new(2).await;
    let t = Arc::new(MemoryVoter::default());
    let v = open(&f, &[0, 1], &t, Some(VoteRecord::default()), 1)
        .await
        .unwrap();
    v.write(0, block(1), false).await.unwrap();
    // The tiebreaker is unreachable, but both data nodes are in sync: a
    // majority without it.
    t.refuse.store(true, Ordering::SeqCst);
    v.refresh_tiebreaker().await;
    v.write(0, block(2), false).await.unwrap();
    // b fails: the change cannot reach the tiebreaker, so nothing more is
    // acknowledged on a alone (the tiebreaker's record still says b is in
    // sync, and b could be started from it).
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    assert!(matches!(
        v.write(0, block(3), false).await,
        Err(EngineError::NoQuorum { .. })
    ));
    assert!(t.held().in_sync.contains(&f.ids[1]) || t.held() == VoteRecord::default());
}

#[tokio::test]
async fn a_start_trusts_only_the_replicas_the_tiebreaker_vouches_for() {
    let f = Fixture::new(2).await;
    let t = Arc::new(MemoryVoter::default());
    let v = open(&f, &[0, 1], &t, Some(VoteRecord::default()), 1)
        .await
        .unwrap();
    v.write(0, block(1), false).await.unwrap();
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    // Acknowledged on a alone, with the tiebreaker's vote.
    v.write(0, block(2), true).await.unwrap();
    v.close().await.unwrap();
    let record = t.held();
    assert_eq!(record.in_sync, vec![f.ids[0]]);

    // Node a is gone; b and the tiebreaker are a majority, but b's replica
    // missed the write: the start is refused, naming the replica to wait for.
    match open(&f, &[1], &t, Some(record.clone()), 2).await {
        Err(EngineError::Refused { why, .. }) => {
            assert!(why.contains("tiebreaker t"), "{why}");
            assert!(why.contains("not among them"), "{why}");
        }
        Err(e) => panic!("expected a refusal naming the tiebreaker, got {e}"),
        Ok(_) => panic!("started from a replica that missed an acknowledged write"),
    }
    // Without the tiebreaker's claim, b alone is no majority at all.
    assert!(matches!(
        open(&f, &[1], &t, None, 2).await,
        Err(EngineError::NoQuorum { .. })
    ));
    // Node a returns: a is current, b is caught up, the write is there.
    let v = open(&f, &[0, 1], &t, Some(record), 3).await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), block(2));
    assert!(!v.fully_redundant(), "b missed a write and must be stale");
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    wait_idle(&v).await;
    assert!(v.fully_redundant());
}

#[tokio::test]
async fn a_start_from_a_replica_the_tiebreaker_lists_goes_on_without_the_other() {
    let f = Fixture::new(2).await;
    let t = Arc::new(MemoryVoter::default());
    let v = open(&f, &[0, 1], &t, Some(VoteRecord::default()), 1)
        .await
        .unwrap();
    v.write(0, block(1), true).await.unwrap();
    v.close().await.unwrap();
    // Node a dies; b and the tiebreaker take over: b was in sync in the
    // tiebreaker's record, so it holds every acknowledged write.
    let record = t.held();
    assert!(record.in_sync.contains(&f.ids[1]));
    let v = open(&f, &[1], &t, Some(record), 2).await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), block(1));
    v.write(4096, block(2), false).await.unwrap();
    assert_eq!(t.held().in_sync, vec![f.ids[1]]);
    assert_eq!(t.held().epoch, 2);
}

/// While a membership change is being recorded at the tiebreaker, a
/// volume left with one data node keeps its vote for requests that do not
/// depend on that change. Counting the vote only at the newest generation
/// in memory refused them with "no quorum" for the recording's round trip
/// (found by the tiebreaker test in two_nodes.rs showing "not voting" on a
/// healthy volume; the simulator acknowledged 9% more writes after).
#[tokio::test]
async fn a_membership_change_being_recorded_does_not_refuse_io() {
    let f = Fixture::new(2).await;
    let t = Arc::new(MemoryVoter::default());
    let v = open(&f, &[0, 1], &t, Some(VoteRecord::default()), 1)
        .await
        .unwrap();
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // b returns; recording its re-add at the tiebreaker takes 500 ms.
    t.delay_ms.store(500, Ordering::SeqCst);
    let readd = {
        let (v, b, id) = (v.clone(), f.backend(1).await, f.ids[1]);
        tokio::spawn(async move { v.readd(id, b, false).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    v.write(4096, block(2), false)
        .await
        .expect("a write while the re-add is recorded at the tiebreaker");
    readd.await.unwrap().unwrap();
    t.delay_ms.store(0, Ordering::SeqCst);
    wait_idle(&v).await;
    assert!(v.tiebreaker_votes());
    assert_eq!(v.read(4096, 4096).await.unwrap(), block(2));
}

/// A voter whose first record hangs until released (a tiebreaker cut off
/// mid-heartbeat); later records are taken at once.
#[derive(Default)]
struct HangingVoter {
    calls: std::sync::atomic::AtomicUsize,
    release: tokio::sync::Notify,
}

impl Voter for HangingVoter {
    fn domain(&self) -> &str {
        "t"
    }
    fn record(&self, _record: VoteRecord) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
                self.release.notified().await;
            }
            Ok(())
        })
    }
}

/// The heartbeat's round trip to the tiebreaker does not hold the
/// membership lock: a replica failure meanwhile is handled at once. (It
/// waited for the heartbeat's timeout, `io_timeout`, every second while
/// the tiebreaker was cut off.)
#[tokio::test]
async fn a_hanging_heartbeat_does_not_hold_up_failure_handling() {
    let f = Fixture::new(2).await;
    let t = Arc::new(HangingVoter::default());
    let options = VolumeOptions {
        epoch: 1,
        io_timeout: std::time::Duration::from_secs(60),
        ..options()
    };
    let v = open_with(&f, &[0, 1], t.clone(), Some(VoteRecord::default()), options)
        .await
        .unwrap();
    // The open recorded once; the heartbeat's record (the second) hangs.
    let heartbeat = {
        let v = v.clone();
        tokio::spawn(async move { v.refresh_tiebreaker().await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        v.fail_replica(f.ids[1], "node b cut off"),
    )
    .await
    .expect("the failure waited for the hanging heartbeat")
    .unwrap();
    v.write(0, block(1), false).await.unwrap();
    t.release.notify_one();
    heartbeat.await.unwrap();
    assert!(
        v.tiebreaker_votes(),
        "a late heartbeat took the newer vote away"
    );
}
