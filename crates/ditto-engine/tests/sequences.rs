//! Regression tests for the event orders of issue 9 that lost acknowledged
//! writes or let a replica holding wrong data count as in sync. Each test is
//! named after its sequence number and fails on the engine before the fix.
//! The same sequences run as scenarios in `ditto-sim`.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ditto_engine::{EngineError, Member, ReaddPlan, ReplicaBackend, ReplicaState, VolumeOptions};

fn states(v: &ditto_engine::Volume) -> Vec<ReplicaState> {
    v.members().iter().map(|m| m.state).collect()
}

/// 1. A rebuild that was interrupted must be resumed or redone on re-add,
/// never "caught up" from a dirty map that never covered it.
#[tokio::test]
async fn seq01_readd_after_interrupted_rebuild_rebuilds() {
    let mut f = Fixture::new(1).await;
    let (v, _) = f
        .open(VolumeOptions {
            dirty_clear_delay: Duration::from_millis(100),
            ..options()
        })
        .await;
    let v = v.unwrap();
    let pattern: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 241) as u8).collect();
    v.write(0, Bytes::from(pattern.clone()), false)
        .await
        .unwrap();
    wait_for("the dirty map to clear", || v.dirty_regions() == 0).await;
    let (id, backend) = f.create_replica().await;
    let target = Faulty::new(backend);
    // The target fails after a few region writes.
    target.writes_before_failure.store(3, Ordering::SeqCst);
    v.add_replica(Member::new(
        id,
        "new",
        target.clone() as Arc<dyn ReplicaBackend>,
    ))
    .await
    .unwrap();
    wait_idle(&v).await;
    assert_eq!(states(&v)[1], ReplicaState::Failed, "rebuild target failed");
    let plan = v.readd(id, f.backend(1).await, false).await.unwrap();
    assert_eq!(
        plan,
        ReaddPlan::FullRebuild,
        "an unfinished rebuild is redone"
    );
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert!(
        f.data_area(1)[..pattern.len()] == pattern[..],
        "the re-added replica lacks data written before it was added"
    );
    assert_same_data(&f, 0, 1, "after the rebuild");
}

/// 2. A write that skipped a replica failed in memory must not be
/// acknowledged before that failure is recorded on the survivors.
#[tokio::test]
async fn seq02_no_ack_before_failure_is_durable() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // The survivor's membership record hangs; the other replica fails.
    faults[0].superblock_gate.close();
    faults[1].broken.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(2), false).await }
    });
    wait_for("the failure to start recording", || {
        faults[0].superblock_gate.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    let second = tokio::spawn({
        let v = v.clone();
        async move { v.write(4096, block(3), false).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a write was acknowledged while the failure of a replica it skipped was not yet durable"
    );
    faults[0].superblock_gate.open();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    let sb = f.superblock(0);
    assert_eq!(sb.generation, v.generation());
}

/// 4. Stopping a volume while its post-crash resync is pending must not
/// mark it clean: the next start resyncs what is left.
#[tokio::test]
async fn seq04_stop_during_resync_keeps_divergence() {
    let f = Fixture::new(2).await;
    {
        let (v, _) = f.open(options()).await;
        let v = v.unwrap();
        for r in [2u64, 5, 6, 7] {
            v.write(r << 20, block(r as u8), false).await.unwrap();
        }
        v.flush().await.unwrap();
        // Crash: no close.
    }
    // Writes in flight at the crash reached one replica only.
    for r in [2u64, 5, 6, 7] {
        f.scribble(0, (r << 20) + 8192, &[0xaa; 4096]);
    }
    let slow = VolumeOptions {
        resync_min_rate: 1,
        resync_max_rate: 1,
        ..options()
    };
    let (v, _) = f.open(slow).await;
    let v = v.unwrap();
    v.close().await.unwrap();
    drop(v);
    let (v, _) = f.open(options()).await;
    let v = v.unwrap();
    wait_idle(&v).await;
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "replicas differ after a stop during resync");
}

/// 5. When the resync source fails, the remaining replicas are still
/// reconciled from a new source.
#[tokio::test]
async fn seq05_resync_source_failure_reconciles_the_rest() {
    let f = Fixture::new(3).await;
    {
        let (v, _) = f.open(options()).await;
        let v = v.unwrap();
        v.write(5 << 20, block(5), false).await.unwrap();
        v.flush().await.unwrap();
    }
    // Each replica holds a different in-flight write in region 5.
    for i in 0..3 {
        f.scribble(i, (5 << 20) + 4096, &[0x10 + i as u8; 4096]);
    }
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    // The first in-sync replica is the source; it cannot read.
    faults[0].reads_broken.store(true, Ordering::SeqCst);
    wait_idle(&v).await;
    faults[0].reads_broken.store(false, Ordering::SeqCst);
    if states(&v)[0] != ReplicaState::InSync {
        v.readd(f.ids[0], f.backend(0).await, false).await.unwrap();
        wait_idle(&v).await;
    }
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 1, 2, "replicas 1 and 2 differ");
    assert_same_data(&f, 0, 1, "replicas 0 and 1 differ");
}

/// 6. `close` waits for requests in flight and refuses new ones.
#[tokio::test]
async fn seq06_close_stops_io() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    faults[1].write_delay_ms.store(400, Ordering::SeqCst);
    let inflight = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(2), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    v.close().await.unwrap();
    assert!(
        inflight.is_finished(),
        "close returned while a write was still running"
    );
    inflight.await.unwrap().unwrap();
    let late = v.write(8192, block(3), false).await;
    assert!(late.is_err(), "a write after close was accepted: {late:?}");
    assert!(
        v.read(0, 4096).await.is_err(),
        "a read after close was served"
    );
    assert_eq!(&f.data_area(1)[..4096], &block(2)[..]);
    assert!(f.superblock(0).clean && f.superblock(1).clean);
}

/// 8. A read-error repair must not write old data over a newer
/// acknowledged write to the same block.
#[tokio::test]
async fn seq08_read_repair_does_not_overwrite_newer_write() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // Idle reads go to the first replica: its next read fails, the read is
    // answered from replica 1, and the repair's write to replica 0 pauses.
    faults[0].read_failures.store(1, Ordering::SeqCst);
    faults[0].pause_next_write.store(true, Ordering::SeqCst);
    let reader = tokio::spawn({
        let v = v.clone();
        async move {
            for _ in 0..16 {
                v.read(0, 4096).await.unwrap();
            }
        }
    });
    wait_for("the repair to pause", || {
        faults[0].held_write.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    let writer = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(2), false).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    faults[0].held_write.open();
    writer.await.unwrap().unwrap();
    reader.await.unwrap();
    v.close().await.unwrap();
    assert_eq!(&f.data_area(1)[..4096], &block(2)[..]);
    assert_eq!(
        &f.data_area(0)[..4096],
        &block(2)[..],
        "the repair wrote old data over an acknowledged write"
    );
}

/// 9. A transient error on the last in-sync replica fails that request
/// only; the replica stays and the volume keeps serving.
#[tokio::test]
async fn seq09_last_leg_error_keeps_the_replica() {
    let f = Fixture::new(1).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    faults[0].write_failures.store(1, Ordering::SeqCst);
    faults[0]
        .write_errno
        .store(i64::from(libc::ENOSPC), Ordering::SeqCst);
    let failed = v.write(4096, block(2), false).await;
    assert!(failed.is_err(), "the failed write is reported");
    assert_eq!(states(&v), vec![ReplicaState::InSync]);
    assert_eq!(&v.read(0, 4096).await.unwrap()[..], &block(1)[..]);
    v.write(8192, block(3), false).await.unwrap();
    assert_eq!(&v.read(8192, 4096).await.unwrap()[..], &block(3)[..]);
    let m = &v.members()[0];
    assert!(
        m.reason.as_deref().is_some_and(|r| r.contains("last")),
        "status says what happened: {m:?}"
    );
}

/// 10. The rebuild cursor is written only after the data below it is flushed.
#[tokio::test]
async fn seq10_rebuild_flushes_before_checkpoint() {
    let mut f = Fixture::new(1).await;
    // Slow enough (2 MiB/s, 6 s) that the rebuild checkpoints its cursor.
    let (v, _) = f
        .open(VolumeOptions {
            resync_min_rate: 2 << 20,
            resync_max_rate: 2 << 20,
            ..options()
        })
        .await;
    let v = v.unwrap();
    v.write(0, Bytes::from(vec![7u8; 12 << 20]), false)
        .await
        .unwrap();
    let (id, backend) = f.create_replica().await;
    let target = Faulty::new(backend);
    v.add_replica(Member::new(
        id,
        "new",
        target.clone() as Arc<dyn ReplicaBackend>,
    ))
    .await
    .unwrap();
    wait_idle(&v).await;
    assert!(v.fully_redundant());
    let ops = target.ops();
    let mut unflushed = false;
    let mut checkpoints = 0;
    for op in &ops {
        match op {
            Op::Write(..) => unflushed = true,
            Op::Flush => unflushed = false,
            Op::Superblock { cursor: Some(c) } if *c > 0 => {
                checkpoints += 1;
                assert!(
                    !unflushed,
                    "cursor {c} persisted before the data it vouches for: {ops:?}"
                );
            }
            _ => {}
        }
    }
    assert!(checkpoints > 0, "no checkpoint happened: {ops:?}");
}

/// 13. A write abandoned at the timeout must not land on a replica after it
/// was re-admitted.
#[tokio::test]
async fn seq13_abandoned_write_cannot_land_after_readd() {
    let f = Fixture::new(2).await;
    let (v, faults) = f
        .open(VolumeOptions {
            io_timeout: Duration::from_millis(300),
            ..options()
        })
        .await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // Replica 1 hangs: its write lands 1.5 s later, long after the timeout.
    faults[1].write_delay_ms.store(1500, Ordering::SeqCst);
    v.write(0, block(2), false).await.unwrap();
    assert_eq!(states(&v)[1], ReplicaState::Failed);
    faults[1].write_delay_ms.store(0, Ordering::SeqCst);
    // Re-add as soon as the engine allows it.
    let mut accepted = false;
    for _ in 0..100 {
        match v.readd(f.ids[1], faults[1].clone(), false).await {
            Ok(_) => {
                accepted = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(accepted, "re-add never accepted");
    wait_idle(&v).await;
    v.write(0, block(3), false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    v.close().await.unwrap();
    assert_eq!(&f.data_area(0)[..4096], &block(3)[..]);
    assert_eq!(
        &f.data_area(1)[..4096],
        &block(3)[..],
        "a late write landed over newer data on the re-added replica"
    );
}

/// 14. Dirty bits set while a rebuilt replica joins reach it too.
#[tokio::test]
async fn seq14_bits_set_while_joining_reach_the_new_member() {
    let mut f = Fixture::new(1).await;
    let (v, _) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    let (id, backend) = f.create_replica().await;
    let target = Faulty::new(backend);
    // finish_copy's map write to the new member pauses.
    target.dirty_map_gate.close();
    v.add_replica(Member::new(
        id,
        "new",
        target.clone() as Arc<dyn ReplicaBackend>,
    ))
    .await
    .unwrap();
    wait_for("the join to pause", || {
        target.dirty_map_gate.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    let writer = tokio::spawn({
        let v = v.clone();
        async move { v.write(9 << 20, block(9), false).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    target.dirty_map_gate.open();
    writer.await.unwrap().unwrap();
    wait_idle(&v).await;
    assert!(v.fully_redundant());
    assert_eq!(
        f.map_bits(1)[1] & 0b10,
        0b10,
        "region 9's bit is missing on the new member: {:?}",
        &f.map_bits(1)[..2]
    );
}

/// 16. Dirty bits clear per region: a trickle of writes to one region does
/// not keep every other region dirty.
#[tokio::test]
async fn seq16_dirty_bits_clear_per_region() {
    let f = Fixture::new(2).await;
    let (v, _) = f
        .open(VolumeOptions {
            dirty_clear_delay: Duration::from_millis(300),
            ..options()
        })
        .await;
    let v = v.unwrap();
    for r in 0..8u64 {
        v.write(r << 20, block(r as u8), false).await.unwrap();
    }
    assert_eq!(v.dirty_regions(), 8);
    for i in 0..30u8 {
        v.write(0, block(i), false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        v.dirty_regions() <= 1,
        "{} regions still dirty under a trickle to one region",
        v.dirty_regions()
    );
    assert_eq!(f.map_bits(1)[0] & 0xfe, 0, "cleared on disk too");
}

/// 16b. The crash-resync work is bounded by the hot set, not by history.
#[tokio::test]
async fn seq16_hot_set_bounds_dirty_regions() {
    let f = Fixture::new(2).await;
    let (v, _) = f
        .open(VolumeOptions {
            hot_set_regions: 4,
            ..options()
        })
        .await;
    let v = v.unwrap();
    for r in 0..12u64 {
        v.write(r << 20, block(r as u8), false).await.unwrap();
    }
    wait_for("the hot set to shrink", || v.dirty_regions() <= 4).await;
    assert_eq!(v.hot_set_limit(), 4);
}

/// A stopped volume answers with an error that says it is stopped.
#[tokio::test]
async fn closed_volume_refuses_io_with_a_clear_error() {
    let f = Fixture::new(1).await;
    let (v, _) = f.open(options()).await;
    let v = v.unwrap();
    v.close().await.unwrap();
    match v.write(0, block(1), false).await {
        Err(e @ EngineError::Closed { .. }) => {
            assert!(e.to_string().contains("stopped"), "{e}")
        }
        other => panic!("expected Closed, got {other:?}"),
    }
}

/// The node's membership record, in memory.
#[derive(Default)]
struct MemLog(
    std::sync::Mutex<std::collections::HashMap<uuid::Uuid, ditto_engine::KnownMembership>>,
);

impl ditto_engine::MembershipLog for MemLog {
    fn last(&self, volume: uuid::Uuid) -> Option<ditto_engine::KnownMembership> {
        self.0.lock().unwrap().get(&volume).cloned()
    }
    fn record(
        &self,
        volume: uuid::Uuid,
        m: ditto_engine::KnownMembership,
    ) -> ditto_engine::BoxFuture<'_, Result<(), String>> {
        self.0.lock().unwrap().insert(volume, m);
        Box::pin(async { Ok(()) })
    }
}

/// 7. A replica that was failed out and returns alone is stale even though
/// its own superblock never learnt it: it is refused unless forced.
#[tokio::test]
async fn seq07_lone_stale_replica_is_refused() {
    let f = Fixture::new(2).await;
    let log = Arc::new(MemLog::default());
    let with_log = |accept_stale| VolumeOptions {
        membership_log: Some(ditto_engine::MembershipLogRef(log.clone())),
        accept_stale,
        ..options()
    };
    {
        let (v, _) = f.open(with_log(false)).await;
        let v = v.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.fail_replica(f.ids[1], "maintenance").await.unwrap();
        v.write(0, block(2), true).await.unwrap();
        v.close().await.unwrap();
    }
    // Next start: only the stale replica is present (degraded start allowed).
    let open_lone = |options| async {
        let missing =
            ditto_engine::MissingReplica::new("gone", "disk missing", f.vol_id, f.ids[0], layout());
        let members = vec![
            Member::new(f.ids[0], "a", Arc::new(missing) as Arc<dyn ReplicaBackend>),
            Member::new(f.ids[1], "b", f.backend(1).await as Arc<dyn ReplicaBackend>),
        ];
        ditto_engine::Volume::open(
            "v",
            f.vol_id,
            SIZE,
            members,
            options,
            Arc::new(ditto_engine::LogSink),
        )
        .await
    };
    match open_lone(with_log(false)).await {
        Err(e @ EngineError::StaleOnly { .. }) => {
            assert!(e.to_string().contains("--force-stale"), "{e}")
        }
        Err(e) => panic!("expected a stale refusal, got {e}"),
        Ok(v) => panic!(
            "a lone stale replica started and serves {:?}",
            &v.read(0, 4).await.unwrap()[..]
        ),
    }
    // The operator accepts the loss: it starts, past the recorded generation.
    let known = log.0.lock().unwrap().get(&f.vol_id).cloned().unwrap();
    let v = open_lone(with_log(true)).await.unwrap();
    assert!(v.generation() > known.generation);
    assert_eq!(&v.read(0, 4096).await.unwrap()[..], &block(1)[..]);
    v.close().await.unwrap();
    drop(v);
    // When the replica it lost to returns, that is a split brain, not a merge.
    match f.open(with_log(false)).await.0 {
        Err(EngineError::SplitBrain { .. }) => {}
        Err(e) => panic!("expected split brain, got {e}"),
        Ok(_) => panic!("the two sides were merged silently"),
    }
}

/// 6b. A write given up at the timeout still lands when the disk wakes:
/// `close` waits for it (for another `io_timeout`), so nothing lands on the
/// files after it returns, and says when some is still pending.
#[tokio::test]
async fn seq06_close_waits_for_abandoned_writes() {
    let f = Fixture::new(2).await;
    let (v, faults) = f
        .open(VolumeOptions {
            io_timeout: Duration::from_millis(300),
            ..options()
        })
        .await;
    let v = v.unwrap();
    faults[1].write_delay_ms.store(500, Ordering::SeqCst);
    v.write(0, block(7), false).await.unwrap();
    assert_eq!(states(&v)[1], ReplicaState::Failed);
    v.close().await.unwrap();
    let at_close = f.data_area(1)[..4096].to_vec();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        f.data_area(1)[..4096] == at_close[..],
        "a write landed on a replica after close returned"
    );
    assert_eq!(v.abandoned_ops(), 0);

    // The last replica hangs longer: its write fails (the replica is kept),
    // close returns without waiting forever, and says what is pending.
    let (v, faults) = f
        .open(VolumeOptions {
            io_timeout: Duration::from_millis(200),
            ..options()
        })
        .await;
    let v = v.unwrap();
    faults[0].write_delay_ms.store(1500, Ordering::SeqCst);
    assert!(v.write(8192, block(8), false).await.is_err());
    let _ = v.close().await;
    assert_eq!(v.abandoned_ops(), 1, "the hung write is still pending");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.abandoned_ops(), 0);
}

/// Found by ditto-sim (seed 87): a catch-up target that fails on a client
/// write while its last region is being copied must not be counted in sync
/// when the copy ends: it missed that write.
#[tokio::test]
async fn sim87_target_failed_during_copy_is_not_promoted() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(3 << 20, block(3), false).await.unwrap();
    // The catch-up's copy to replica 1 pauses.
    faults[1].pause_next_write.store(true, Ordering::SeqCst);
    v.readd(f.ids[1], faults[1].clone(), false).await.unwrap();
    wait_for("the copy to pause", || {
        faults[1].held_write.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    // A client write fails on the target: it is failed out.
    faults[1].write_failures.store(1, Ordering::SeqCst);
    v.write(5 << 20, block(5), false).await.unwrap();
    assert_eq!(states(&v)[1], ReplicaState::Failed);
    faults[1].held_write.open();
    wait_idle(&v).await;
    assert_eq!(
        states(&v)[1],
        ReplicaState::Failed,
        "a replica that missed an acknowledged write was counted in sync"
    );
    assert!(!v.fully_redundant());
}

/// Found by ditto-sim (seed 209): a re-add whose membership change cannot
/// be recorded (the last in-sync replica fails its superblock write) must
/// fail cleanly, leaving no replica "rebuilding" with no job to finish it.
#[tokio::test]
async fn sim209_readd_that_cannot_be_recorded_is_undone() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(3 << 20, block(3), false).await.unwrap();
    faults[0].superblock_failures.store(1, Ordering::SeqCst);
    assert!(v.readd(f.ids[1], f.backend(1).await, false).await.is_err());
    assert_eq!(states(&v), vec![ReplicaState::InSync, ReplicaState::Failed]);
    assert!(
        v.job().is_none_or(|j| j.finished),
        "a job is left queued: {:?}",
        v.job()
    );
    // The disk records again: the re-add goes through.
    tokio::time::sleep(Duration::from_millis(600)).await;
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the re-add");
}

/// Found by ditto-sim (seed 174): a copy must not read a region from a
/// source that still has a write abandoned at the timeout in flight: that
/// write lands afterwards, and the source and the copy differ for good.
#[tokio::test]
async fn sim174_copy_waits_for_writes_abandoned_on_its_source() {
    let f = Fixture::new(2).await;
    let (v, faults) = f
        .open(VolumeOptions {
            io_timeout: Duration::from_millis(500),
            ..options()
        })
        .await;
    let v = v.unwrap();
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(3 << 20, block(1), false).await.unwrap();
    // The last replica hangs on the next write: it fails for the client at
    // the timeout and lands 800 ms after it started. The re-add comes while
    // it hangs, so the catch-up's copy of that region waits for its stripe
    // and would read the region just before the late write lands.
    faults[0].write_delay_ms.store(800, Ordering::SeqCst);
    let hung = tokio::spawn({
        let v = v.clone();
        async move { v.write(3 << 20, block(2), false).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults[0].write_delay_ms.store(0, Ordering::SeqCst);
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    assert!(hung.await.unwrap().is_err(), "the hung write fails");
    assert_eq!(states(&v)[0], ReplicaState::InSync, "the last leg is kept");
    wait_idle(&v).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(
        &f,
        0,
        1,
        "after the catch-up from a source with a late write",
    );
}

/// Found by ditto-sim (seed 251): a target that cannot take its dirty map
/// at the end of its copy is failed out and the job ends with the error;
/// it was left "rebuilding" with a job shown running forever.
#[tokio::test]
async fn sim251_target_that_cannot_join_is_failed_and_the_job_ends() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(3 << 20, block(3), false).await.unwrap();
    // The catch-up's only map write to the target (when it joins) fails.
    faults[1].dirty_map_gate.close();
    v.readd(f.ids[1], faults[1].clone(), false).await.unwrap();
    wait_for("the join", || {
        faults[1].dirty_map_gate.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    faults[1].broken.store(true, Ordering::SeqCst);
    faults[1].dirty_map_gate.open();
    wait_idle(&v).await;
    let job = v.job().unwrap();
    assert!(job.finished && job.error.is_some(), "{job:?}");
    assert_eq!(states(&v)[1], ReplicaState::Failed);
}

/// Found by ditto-sim (seed 60): a rebuild that cannot go on (its only
/// source cannot be read) leaves the target failed, with the reason and
/// the way to resume, not "rebuilding" with no job to finish it.
#[tokio::test]
async fn sim60_rebuild_that_cannot_go_on_fails_its_target() {
    let mut f = Fixture::new(1).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, Bytes::from(vec![1u8; 4 << 20]), false)
        .await
        .unwrap();
    faults[0].reads_broken.store(true, Ordering::SeqCst);
    let (id, backend) = f.create_replica().await;
    v.add_replica(Member::new(id, "new", backend as Arc<dyn ReplicaBackend>))
        .await
        .unwrap();
    wait_idle(&v).await;
    assert_eq!(states(&v), vec![ReplicaState::InSync, ReplicaState::Failed]);
    let m = &v.members()[1];
    assert!(
        m.reason.as_deref().is_some_and(|r| r.contains("readd")),
        "{m:?}"
    );
    // The source reads again: a re-add resumes the rebuild and finishes it.
    faults[0].reads_broken.store(false, Ordering::SeqCst);
    assert_eq!(
        v.readd(id, f.backend(1).await, false).await.unwrap(),
        ReaddPlan::FullRebuild
    );
    wait_idle(&v).await;
    assert!(v.fully_redundant());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the resumed rebuild");
}

/// Found by ditto-sim (seed 393): after a crash, a read of a region the
/// resync has not reached returned the source's version; the source then
/// failed, and the next read returned another replica's older version. A
/// read never goes back once a client has seen a version.
#[tokio::test]
async fn sim393_reads_never_go_back_when_the_resync_source_fails() {
    let f = Fixture::new(3).await;
    {
        let (v, _) = f.open(options()).await;
        let v = v.unwrap();
        v.write(2 << 20, block(2), false).await.unwrap();
        v.write(5 << 20, block(5), false).await.unwrap();
        v.flush().await.unwrap();
    }
    // Writes in flight at the crash left a different version on each replica.
    for i in 0..3 {
        f.scribble(i, 5 << 20, &[0x10 + i as u8; 4096]);
    }
    let (v, _) = f
        .open(VolumeOptions {
            resync_min_rate: 1,
            resync_max_rate: 1,
            ..options()
        })
        .await;
    let v = v.unwrap();
    let seen = v.read(5 << 20, 4096).await.unwrap();
    let source = v
        .members()
        .iter()
        .position(|m| m.state == ReplicaState::InSync)
        .unwrap();
    v.fail_replica(f.ids[source], "the resync source fails")
        .await
        .unwrap();
    let again = v.read(5 << 20, 4096).await.unwrap();
    assert_eq!(
        again[0], seen[0],
        "a read returned {:#x} after {:#x} was seen",
        again[0], seen[0]
    );
    v.close().await.unwrap();
}

/// Found by ditto-sim (seeds 897, 102): a copy picks its source, then waits
/// for the region; if the source fails meanwhile (a client write it missed
/// holds the region), it must not be copied from: its stale data would
/// overwrite that acknowledged write on the target.
#[tokio::test]
async fn sim897_copy_never_reads_a_source_that_left_while_it_waited() {
    let f = Fixture::new(3).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.fail_replica(f.ids[2], "maintenance").await.unwrap();
    v.write(3 << 20, block(1), false).await.unwrap();
    // W: fails on replica 0, pauses on replica 1 (holding the region).
    faults[0].write_failures.store(1, Ordering::SeqCst);
    faults[1].pause_next_write.store(true, Ordering::SeqCst);
    let w = tokio::spawn({
        let v = v.clone();
        async move { v.write(3 << 20, block(2), false).await }
    });
    wait_for("W to pause", || {
        faults[1].held_write.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    // The catch-up of replica 2 picks replica 0 and waits for the region.
    v.readd(f.ids[2], f.backend(2).await, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults[1].held_write.open();
    w.await.unwrap().unwrap();
    wait_idle(&v).await;
    assert_eq!(
        states(&v),
        vec![
            ReplicaState::Failed,
            ReplicaState::InSync,
            ReplicaState::InSync
        ]
    );
    v.close().await.unwrap();
    assert_eq!(
        f.data_area(2)[3 << 20],
        2,
        "the caught-up replica lacks an acknowledged write"
    );
    assert_same_data(&f, 1, 2, "in-sync replicas after the catch-up");
}

/// Found by ditto-sim (seed 1326): the post-crash resync was copying a
/// region from its source to the last other replica when the source
/// failed; a read of that region was then served from that replica before
/// the copy ended, and the next read returned the copied (other) version.
#[tokio::test]
async fn sim1326_reads_wait_for_a_copy_in_progress_from_a_failed_source() {
    let f = Fixture::new(2).await;
    {
        let (v, _) = f.open(options()).await;
        let v = v.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.flush().await.unwrap();
    }
    f.scribble(0, 0, &[0xa0; 4096]);
    f.scribble(1, 0, &[0xb1; 4096]);
    let (v, faults) = {
        // The resync's copy to replica 1 pauses; replica 0 is the source.
        let mut members = Vec::new();
        let mut faults = Vec::new();
        for (i, id) in f.ids.iter().enumerate() {
            let b = f.faulty(i).await;
            if i == 1 {
                b.pause_next_write.store(true, Ordering::SeqCst);
            }
            faults.push(b.clone());
            members.push(Member::new(
                *id,
                format!("pool{i}"),
                b as Arc<dyn ReplicaBackend>,
            ));
        }
        let v = ditto_engine::Volume::open(
            "v",
            f.vol_id,
            SIZE,
            members,
            options(),
            Arc::new(ditto_engine::LogSink),
        )
        .await
        .unwrap();
        (v, faults)
    };
    wait_for("the copy to pause", || {
        faults[1].held_write.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    v.fail_replica(f.ids[0], "the resync source fails")
        .await
        .unwrap();
    let first = tokio::spawn({
        let v = v.clone();
        async move { v.read(0, 4096).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    faults[1].held_write.open();
    let first = first.await.unwrap().unwrap();
    wait_idle(&v).await;
    let again = v.read(0, 4096).await.unwrap();
    assert_eq!(
        again[0], first[0],
        "a read returned {:#x} after {:#x} was seen",
        again[0], first[0]
    );
}

/// Found by ditto-sim (the scenario `fresh_volume_degraded_first_start`,
/// seeds 58, 148, 176 of an earlier workload): a volume's first start with
/// replica A missing leaves A at generation 1, which is the generation the
/// node records (nothing bumps it: A was never in sync with anything). The
/// record listed only B, yet it vouched for A alone because A sat *at* the
/// recorded generation, and A started the volume on zeroes.
#[tokio::test]
async fn sim_fresh_replica_at_the_recorded_generation_is_not_vouched_for() {
    let f = Fixture::new(2).await;
    let log = Arc::new(MemLog::default());
    let with_log = || VolumeOptions {
        membership_log: Some(ditto_engine::MembershipLogRef(log.clone())),
        ..options()
    };
    {
        let v = f.open_present(&[1], with_log()).await.unwrap();
        v.write(0, block(7), true).await.unwrap();
        v.close().await.unwrap();
    }
    match f.open_present(&[0], with_log()).await {
        Err(EngineError::StaleOnly { .. }) => {}
        Err(e) => panic!("expected a stale refusal, got {e}"),
        Ok(v) => panic!(
            "a replica that never held the data started the volume: {:?}",
            &v.read(0, 4).await.unwrap()[..]
        ),
    }
    // Both present: B's data wins and A is brought up to date.
    let (v, _) = f.open(with_log()).await;
    let v = v.unwrap();
    assert_eq!(&v.read(0, 4096).await.unwrap()[..], &block(7)[..]);
    v.close().await.unwrap();
}

/// Found by ditto-sim (seed 1975): a replica failed during its catch-up
/// keeps its old generation, yet holds the client writes it took while
/// catching up. After a forced start from a replica that left before those
/// writes, re-adding it planned a catch-up by the forced copy's dirty map,
/// which does not cover them: the two "in sync" replicas then differed.
#[tokio::test]
async fn sim1975_after_a_forced_start_the_others_are_rebuilt_in_full() {
    let f = Fixture::new(3).await;
    let log = Arc::new(MemLog::default());
    let with_log = |accept_stale| VolumeOptions {
        membership_log: Some(ditto_engine::MembershipLogRef(log.clone())),
        accept_stale,
        ..options()
    };
    {
        let (v, _) = f.open(with_log(false)).await;
        let v = v.unwrap();
        v.fail_replica(f.ids[0], "maintenance").await.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.fail_replica(f.ids[1], "maintenance").await.unwrap();
        // Replica 0 catches up from 2; its first copy write pauses, while a
        // client write to another region reaches it.
        let a = f.faulty(0).await;
        a.pause_next_write.store(true, Ordering::SeqCst);
        v.readd(f.ids[0], a.clone(), false).await.unwrap();
        wait_for("the copy to pause", || {
            a.held_write.waiting.load(Ordering::SeqCst) > 0
        })
        .await;
        v.write(3 << 20, block(2), true).await.unwrap();
        v.fail_replica(f.ids[0], "maintenance").await.unwrap();
        a.held_write.open();
        wait_idle(&v).await;
        v.close().await.unwrap();
    }
    assert_eq!(f.data_area(0)[3 << 20], 2, "replica 0 took the write");
    // Replica 2 is gone for good: the operator starts from replica 1.
    let v = f.open_present(&[0, 1], with_log(true)).await.unwrap();
    assert_eq!(&v.read(3 << 20, 4096).await.unwrap()[..], &block(0)[..]);
    let plan = v.readd(f.ids[0], f.backend(0).await, false).await.unwrap();
    assert!(
        matches!(plan, ReaddPlan::FullRebuild),
        "re-add after a forced start planned {plan:?}"
    );
    wait_idle(&v).await;
    assert!(states(&v)[..2].iter().all(|s| *s == ReplicaState::InSync));
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "in-sync replicas after the forced start");
}

/// Found by ditto-sim (seed 1955): two re-adds of one replica whose disk was
/// slow both passed the "already rebuilding?" check before either replaced
/// the member. Neither could be recorded (the survivor's superblock write
/// failed) and each undid its change; the second put back the first one's
/// member, left rebuilding with no job for good. Re-adds are serialised.
#[tokio::test]
async fn sim1955_concurrent_readds_of_one_replica_are_serialised() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // The returning disk is slow to take its superblock (each re-add opens
    // it anew).
    let (back1, back2) = (f.faulty(1).await, f.faulty(1).await);
    back1.superblock_gate.close();
    back2.superblock_gate.close();
    let id = f.ids[1];
    let readd = move |v: Arc<ditto_engine::Volume>, b: Arc<Faulty>| {
        tokio::spawn(async move { v.readd(id, b, true).await })
    };
    let first = readd(v.clone(), back1.clone());
    wait_for("the first re-add to wait on the disk", || {
        back1.superblock_gate.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    let second = readd(v.clone(), back2.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Neither membership change can be recorded on the survivor, and the
    // first one's attempt waits there while the second takes its turn.
    faults[0].superblock_failures.store(2, Ordering::SeqCst);
    faults[0].superblock_gate.close();
    back1.superblock_gate.open();
    wait_for("the first re-add to record its change", || {
        faults[0].superblock_gate.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    back2.superblock_gate.open();
    tokio::time::sleep(Duration::from_millis(50)).await;
    faults[0].superblock_gate.open();
    let (a, b) = (first.await.unwrap(), second.await.unwrap());
    assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(v.job().is_none_or(|j| j.finished));
    assert_ne!(
        states(&v)[1],
        ReplicaState::Rebuilding,
        "left rebuilding with no job"
    );
    // The operator retries: it rebuilds and joins.
    v.readd(f.ids[1], f.backend(1).await, true).await.unwrap();
    wait_idle(&v).await;
    assert_eq!(states(&v)[1], ReplicaState::InSync);
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the re-add");
}

/// Sim seed 416 of the `--quorum` campaign: a close (or a sweep) found the
/// volume fully reconciled, flushed every replica to clear the dirty bits,
/// and one replica's flush failed, failing it out. The bits were cleared
/// on the others anyway, though the failed replica may lack those writes
/// (unflushed, then lost): its later catch-up skipped the region and it
/// counted in sync without an acknowledged write.
#[tokio::test]
async fn sim416_a_replica_failed_by_the_clearing_flush_keeps_its_bits() {
    let f = Fixture::new(2).await;
    let (v, faults) = f.open(options()).await;
    let v = v.unwrap();
    v.write(0, block(7), false).await.unwrap();
    faults[1].flush_failures.store(1, Ordering::SeqCst);
    v.close().await.unwrap();
    assert_eq!(
        v.members()[1].state,
        ReplicaState::Failed,
        "the replica whose flush failed is out"
    );
    let bits = f.map_bits(0);
    assert!(
        bits.first().is_some_and(|b| b & 1 == 1),
        "region 0's bit was cleared on the survivor though replica 1 may lack its write: {:?}",
        &bits[..4]
    );
    // Replica 1 lost the unflushed write; its catch-up must copy region 0.
    f.scribble(1, 0, &[0u8; 4096]);
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    assert_ne!(v.members()[1].state, ReplicaState::InSync);
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the catch-up");
}

/// Sim seed 4995 of the `--quorum` campaign: at a start the volume loads
/// the union of its in-sync replicas' dirty maps and counts those bits as
/// durable, so later writes into those regions write no bit. A replica
/// whose own map lacked one (a clear that reached it and not the others
/// before a crash) then held no bit for a region written since; left alone
/// later, its map skipped that region in another replica's catch-up.
/// Every in-sync replica now gets the union at start.
#[tokio::test]
async fn sim4995_every_replica_carries_the_dirty_bits_the_volume_counts_durable() {
    let f = Fixture::new(2).await;
    {
        let v = f.open_present(&[0, 1], options()).await.unwrap();
        v.write(0, block(1), false).await.unwrap();
        // A crash: no close, the bits stay on both.
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Replica 1's map lost the bit (a clear that reached only it).
    let empty = ditto_format::encode_map_block(&[0u8; 8]);
    let mut area = Vec::new();
    for _ in 0..layout().map_blocks() {
        area.extend_from_slice(&empty);
    }
    f.backend(1)
        .await
        .write_dirty_map(0, Bytes::from(area))
        .await
        .unwrap();
    assert_eq!(
        f.map_bits(1)[0] & 1,
        0,
        "set-up: replica 1's map lacks region 0"
    );
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    assert_eq!(
        f.map_bits(1)[0] & 1,
        1,
        "replica 1 must carry region 0's bit the volume counts durable"
    );
    // Written again (no bit written: it is set), then replica 0 leaves.
    v.write(0, block(2), false).await.unwrap();
    v.fail_replica(f.ids[0], "test").await.unwrap();
    v.close().await.unwrap();
    // Replica 1 alone catches replica 0 up: region 0 must be copied.
    let v = f.open_present(&[1], options()).await.unwrap();
    v.readd(f.ids[0], f.backend(0).await, false).await.unwrap();
    wait_idle(&v).await;
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the catch-up from replica 1's map");
}

/// Sim seed 9804: a scrub with repair picked its replicas before waiting
/// for the region; a client write holding the region failed one of them
/// out (its disk hung) and was acknowledged by the other. The scrub then
/// compared the failed replica's stale copy with the good one and
/// "repaired" the good one from it: the acknowledged write was gone.
/// The scrub now takes the members once the region is its own, and repairs
/// only from and to replicas still in sync.
#[tokio::test]
async fn sim9804_scrub_never_repairs_from_a_replica_failed_while_it_waited() {
    let f = Fixture::new(2).await;
    let (v, faults) = f
        .open(VolumeOptions {
            io_timeout: Duration::from_millis(300),
            ..options()
        })
        .await;
    let v = v.unwrap();
    v.write(0, block(1), false).await.unwrap();
    // Replica 0 (the scrub's default repair source) hangs on the next write.
    faults[0].write_delay_ms.store(1500, Ordering::SeqCst);
    let write = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(9), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    v.scrub(true, None).await.unwrap();
    write.await.unwrap().unwrap();
    wait_idle(&v).await;
    assert_eq!(v.members()[0].state, ReplicaState::Failed);
    assert_eq!(
        v.read(0, 4096).await.unwrap(),
        block(9),
        "the acknowledged write was overwritten by the scrub's repair"
    );
}
