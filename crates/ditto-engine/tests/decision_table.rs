//! The generation decision table of docs/replication.md, one test per row.
//!
//! A replica that comes back (a disk re-added, a node reconnected: both are
//! `Volume::readd`) is compared with the running volume: its superblock
//! (generation, its own view of the members, a rebuild cursor) against the
//! volume's record of it (the generation at which it left). The comparison
//! decides: nothing to copy, a catch-up by dirty map, a full rebuild, a
//! split brain (refused), or not this volume's replica (refused). At start,
//! `Volume::open` decides who is current by the same superblocks.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ditto_engine::{EngineError, ReaddPlan, ReplicaState, VolumeOptions};

const R: u64 = REGION as u64;

fn state(v: &ditto_engine::Volume, i: usize) -> ReplicaState {
    v.members()[i].state
}

/// Row 1: it left and nothing was written since: a catch-up of no regions.
#[tokio::test]
async fn row1_nothing_missed_copies_nothing() {
    let f = Fixture::new(2).await;
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    v.fail_replica(f.ids[1], "test").await.unwrap();
    let plan = v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    assert_eq!(plan, ReaddPlan::CatchUp { regions: 0 });
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    assert_eq!(v.copied_bytes(), 0, "a catch-up of nothing copied data");
}

/// Row 2: it left at generation g and missed writes: the dirty map since g
/// covers them, only those regions are copied.
#[tokio::test]
async fn row2_missed_writes_are_caught_up_by_the_dirty_map() {
    let f = Fixture::new(2).await;
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    v.fail_replica(f.ids[1], "test").await.unwrap();
    v.write(3 * R, block(7), false).await.unwrap();
    let plan = v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    assert_eq!(plan, ReaddPlan::CatchUp { regions: 1 });
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    assert!(
        v.copied_bytes() <= R,
        "copied {} bytes for one region",
        v.copied_bytes()
    );
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the catch-up");
}

/// Row 3: its superblock is older than the moment it left (an old copy of
/// the disk came back): the dirty map does not reach back that far, so it
/// is rebuilt in full.
#[tokio::test]
async fn row3_older_than_when_it_left_is_rebuilt_in_full() {
    let f = Fixture::new(2).await;
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    v.write(0, block(1), false).await.unwrap();
    let old = f.dir.path().join("r1-old");
    std::fs::copy(&f.paths[1], &old).unwrap();
    // Membership changes move the generation on: out, back, out again.
    v.fail_replica(f.ids[1], "test").await.unwrap();
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    wait_idle(&v).await;
    v.write(0, block(2), false).await.unwrap();
    v.fail_replica(f.ids[1], "test").await.unwrap();
    std::fs::copy(&old, &f.paths[1]).unwrap();
    let plan = v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    assert_eq!(plan, ReaddPlan::FullRebuild);
    wait_idle(&v).await;
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the rebuild");
}

/// Row 4: it took writes of its own after the others failed it out (it
/// excludes a current member, at a generation not older than when it
/// left): a split brain, refused and never merged.
#[tokio::test]
async fn row4_went_on_alone_is_a_split_brain() {
    let f = Fixture::new(2).await;
    {
        let v = f.open_present(&[0, 1], options()).await.unwrap();
        v.fail_replica(f.ids[1], "test").await.unwrap();
        v.close().await.unwrap();
    }
    {
        // Replica 1 alone (its own superblock still says in sync).
        let v = f.open_present(&[1], options()).await.unwrap();
        v.write(0, block(9), false).await.unwrap();
        v.close().await.unwrap();
    }
    let v = f.open_present(&[0], options()).await.unwrap();
    let before = f.data_area(1);
    match v.readd(f.ids[1], f.backend(1).await, false).await {
        Err(EngineError::SplitBrain { .. }) => {}
        other => panic!("expected a split brain, got {other:?}"),
    }
    assert_ne!(state(&v, 1), ReplicaState::InSync);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(f.data_area(1) == before, "the refused replica was written");
}

/// Row 5: the operator chose the side to keep (`resolve --keep`, `readd
/// --full`): the other is rebuilt in full whatever its superblock says.
#[tokio::test]
async fn row5_the_operators_choice_rebuilds_in_full() {
    let f = Fixture::new(2).await;
    {
        let v = f.open_present(&[0, 1], options()).await.unwrap();
        v.fail_replica(f.ids[1], "test").await.unwrap();
        v.close().await.unwrap();
    }
    {
        let v = f.open_present(&[1], options()).await.unwrap();
        v.write(0, block(9), false).await.unwrap();
        v.close().await.unwrap();
    }
    let v = f.open_present(&[0], options()).await.unwrap();
    v.write(R, block(4), false).await.unwrap();
    let plan = v.readd(f.ids[1], f.backend(1).await, true).await.unwrap();
    assert_eq!(plan, ReaddPlan::FullRebuild);
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the operator's rebuild");
}

/// Row 6: another volume's or another replica's superblock: refused.
#[tokio::test]
async fn row6_someone_elses_replica_is_refused() {
    let mut f = Fixture::new(2).await;
    let v = f.open_present(&[0, 1], options()).await.unwrap();
    v.fail_replica(f.ids[1], "test").await.unwrap();
    let (_, stranger) = f.create_replica().await;
    match v.readd(f.ids[1], stranger, false).await {
        Err(EngineError::ReplicaMismatch { .. }) => {}
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

/// Open, row 7: the two sides of a split brain found together at start:
/// the volume refuses to start rather than pick one.
#[tokio::test]
async fn row7_both_sides_at_start_refuse_to_start() {
    let f = Fixture::new(2).await;
    for alone in [0, 1] {
        let v = f.open_present(&[alone], options()).await.unwrap();
        v.write(0, block(alone as u8 + 1), false).await.unwrap();
        v.close().await.unwrap();
    }
    match f.open_present(&[0, 1], options()).await {
        Err(EngineError::SplitBrain { .. }) => {}
        other => panic!("expected a split brain, got {:?}", other.map(|_| ())),
    }
}

/// Open, row 8: the same pair with one side discarded by the operator (the
/// losing side of a split brain between nodes): the kept side is current,
/// the other stale until rebuilt in full, and nothing of it is served.
#[tokio::test]
async fn row8_a_discarded_side_is_stale_and_rebuilt_from_the_kept_one() {
    let f = Fixture::new(2).await;
    for alone in [0, 1] {
        let v = f.open_present(&[alone], options()).await.unwrap();
        v.write(0, block(alone as u8 + 1), false).await.unwrap();
        v.close().await.unwrap();
    }
    let v = f
        .open_present(
            &[0, 1],
            VolumeOptions {
                discard: vec![f.ids[1]],
                ..options()
            },
        )
        .await
        .unwrap();
    assert_eq!(state(&v, 0), ReplicaState::InSync);
    assert_eq!(state(&v, 1), ReplicaState::Stale);
    let read = v.read(0, 4096).await.unwrap();
    assert_eq!(
        read,
        Bytes::from(vec![1u8; 4096]),
        "served the discarded side"
    );
    let plan = v.readd(f.ids[1], f.backend(1).await, true).await.unwrap();
    assert_eq!(plan, ReaddPlan::FullRebuild);
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after rebuilding the discarded side");
}

/// Open, row 9: an old primary's replica that went on while cut off, to a
/// generation numerically past the new primary's, meets the new primary's
/// replica (a newer epoch). Epoch orders before generation: the new
/// primary's replica is current, the old one is stale (never served), and
/// its re-add is a split brain, not a catch-up. Before epochs this start
/// was refused as a split brain, and three nodes under random partitions
/// ended with no primary at all.
#[tokio::test]
async fn row9_a_newer_epoch_wins_over_a_higher_generation() {
    let f = Fixture::new(3).await;
    let epoch = |e: u64| VolumeOptions {
        epoch: e,
        ..options()
    };
    {
        let v = f.open_present(&[0, 1, 2], epoch(1)).await.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.fail_replica(f.ids[1], "cut off").await.unwrap();
        // The old primary's side moves its generation on and on.
        for _ in 0..3 {
            v.fail_replica(f.ids[2], "flapping").await.unwrap();
            v.readd(f.ids[2], f.backend(2).await, false).await.unwrap();
            wait_idle(&v).await;
        }
        v.write(0, block(2), false).await.unwrap();
        v.close().await.unwrap();
    }
    {
        // The new primary (epoch 2) starts from replica 1 alone.
        let v = f.open_present(&[1], epoch(2)).await.unwrap();
        v.write(4096, block(3), false).await.unwrap();
        v.close().await.unwrap();
    }
    assert!(
        f.superblock(0).generation > f.superblock(1).generation,
        "the old side's generation is the higher one"
    );
    assert_eq!((f.superblock(0).epoch, f.superblock(1).epoch), (1, 2));
    let v = f.open_present(&[0, 1], epoch(2)).await.unwrap();
    assert_eq!(state(&v, 1), ReplicaState::InSync);
    assert_eq!(state(&v, 0), ReplicaState::Stale);
    assert_eq!(v.read(4096, 4096).await.unwrap(), block(3));
    assert_eq!(
        v.read(0, 4096).await.unwrap(),
        block(1),
        "served the old side"
    );
    assert!(
        v.generation() >= f.superblock(0).generation,
        "the volume's generation must pass every replica's (nodes refuse older requests)"
    );
    match v.readd(f.ids[0], f.backend(0).await, false).await {
        Err(EngineError::SplitBrain { .. }) => {}
        other => panic!("expected a split brain, got {other:?}"),
    }
}

/// Row 10: a replica stopped in the middle of its rebuild, whose superblock
/// (written when the rebuild began) excludes a replica that was itself
/// being rebuilt then and finished since: not a split brain. The half-built
/// one never served as current; it is stale and rebuilt. Before, the start
/// was refused as a split brain and three nodes ended with no primary
/// (cluster simulator, seed 1: the primary crashed during the rebuild).
#[tokio::test]
async fn row10_a_half_rebuilt_replica_is_stale_not_a_split_brain() {
    use ditto_format::MemberState;
    let f = Fixture::new(3).await;
    {
        let v = f.open_present(&[0, 1, 2], options()).await.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.close().await.unwrap();
    }
    let set = |states: [MemberState; 3]| {
        f.ids
            .iter()
            .zip(states)
            .map(|(id, state)| ditto_format::ReplicaSetEntry {
                replica: *id,
                state,
                since_generation: 1,
            })
            .collect::<Vec<_>>()
    };
    use MemberState::{InSync, Rebuilding};
    let generation = f.superblock(0).generation;
    // Replica 2's rebuild began while replica 1 was being rebuilt too...
    let r2 = f.backend(2).await;
    let mut sb = ditto_engine::ReplicaBackend::superblock(r2.as_ref());
    sb.replica_set = set([InSync, Rebuilding, Rebuilding]);
    sb.rebuild_cursor = Some(0);
    sb.generation = generation + 1;
    ditto_engine::ReplicaBackend::write_superblock(r2.as_ref(), sb)
        .await
        .unwrap();
    // ...then replica 1's finished, and the primary crashed.
    for i in [0, 1] {
        let r = f.backend(i).await;
        let mut sb = ditto_engine::ReplicaBackend::superblock(r.as_ref());
        sb.replica_set = set([InSync, InSync, Rebuilding]);
        sb.generation = generation + 2;
        ditto_engine::ReplicaBackend::write_superblock(r.as_ref(), sb)
            .await
            .unwrap();
    }
    let v = f
        .open_present(&[0, 1, 2], options())
        .await
        .expect("a half-rebuilt replica is no split brain");
    assert_eq!(state(&v, 0), ReplicaState::InSync);
    assert_eq!(state(&v, 1), ReplicaState::InSync);
    assert_ne!(state(&v, 2), ReplicaState::InSync);
    wait_idle(&v).await;
    assert!(v.fully_redundant(), "{:?}", v.members());
    v.close().await.unwrap();
    assert_same_data(&f, 0, 2, "after the rebuild");
}

/// Rewrite replica `i`'s superblock: generation, epoch and its view of the
/// three members, as a primary crashing at the wrong moment leaves them.
async fn set_superblock(
    f: &Fixture,
    i: usize,
    generation: u64,
    epoch: u64,
    states: [(ditto_format::MemberState, u32); 3],
) {
    let r = f.backend(i).await;
    let mut sb = ditto_engine::ReplicaBackend::superblock(r.as_ref());
    sb.replica_set = f
        .ids
        .iter()
        .zip(states)
        .map(|(id, (state, since))| ditto_format::ReplicaSetEntry {
            replica: *id,
            state,
            since_generation: since,
        })
        .collect();
    sb.generation = generation;
    sb.epoch = epoch;
    ditto_engine::ReplicaBackend::write_superblock(r.as_ref(), sb)
        .await
        .unwrap();
}

/// Open, row 11: with quorum, every start takes an epoch of its own, so the
/// superblocks of one epoch are one line of generations. Two replicas that
/// each exclude the other at one epoch are then not two sides: the one
/// with the newer generation is current (replica 1 caught up while 0 was
/// out, 0 came back, then 1 failed). Before, the start was refused as a
/// split brain and the nodes never converged (cluster simulator, seed 2).
/// Without quorum the same pair is still refused (row 7): two starts may
/// share an epoch there.
#[tokio::test]
async fn row11_with_quorum_the_newer_generation_of_one_epoch_is_current() {
    use ditto_format::MemberState::{Failed, InSync};
    let f = Fixture::new(3).await;
    let quorum = |epoch: u64| VolumeOptions {
        quorum: Some(ditto_engine::NoQuorum::Error),
        epoch,
        ..options()
    };
    {
        let v = f.open_on_nodes(&[0, 1, 2], quorum(1)).await.unwrap();
        v.write(0, block(1), false).await.unwrap();
        v.close().await.unwrap();
    }
    let g = f.superblock(0).generation;
    // Replica 1 last recorded the line when 0 was out (g+2)...
    set_superblock(&f, 1, g + 2, 1, [(Failed, 1), (InSync, 2), (InSync, 1)]).await;
    // ...replica 0 came back, took a write 1 never saw, and failed 1 out (g+5).
    let r0 = f.backend(0).await;
    ditto_engine::ReplicaBackend::write(r0.as_ref(), 0, block(2))
        .await
        .unwrap();
    drop(r0);
    let since = u32::try_from(g + 5).unwrap();
    set_superblock(&f, 0, g + 5, 1, [(InSync, 4), (Failed, since), (InSync, 1)]).await;
    let no_quorum = VolumeOptions {
        epoch: 2,
        ..options()
    };
    match f.open_on_nodes(&[0, 1], no_quorum).await {
        Err(EngineError::SplitBrain { .. }) => {}
        other => panic!(
            "without quorum: expected a split brain, got {:?}",
            other.map(|_| ())
        ),
    }
    let v = f
        .open_on_nodes(&[0, 1], quorum(2))
        .await
        .expect("one epoch's line: the newer generation starts");
    assert_eq!(state(&v, 0), ReplicaState::InSync);
    assert_ne!(state(&v, 1), ReplicaState::InSync);
    // One node in sync of three: no quorum to serve until 1 is rebuilt.
    let plan = v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    assert_eq!(
        plan,
        ReaddPlan::FullRebuild,
        "it is older than when it left"
    );
    wait_idle(&v).await;
    assert_eq!(state(&v, 1), ReplicaState::InSync);
    assert_eq!(
        v.read(0, 4096).await.unwrap(),
        block(2),
        "served the older copy"
    );
    v.close().await.unwrap();
    assert_same_data(&f, 0, 1, "after the rebuild");
}

/// Open, row 12: with quorum, a start at an epoch a present replica was
/// already assembled at is refused and writes nothing: it could start a
/// second line of generations at one epoch, which row 11 would misread.
#[tokio::test]
async fn row12_with_quorum_a_start_must_take_a_new_epoch() {
    let f = Fixture::new(3).await;
    let quorum = |epoch: u64| VolumeOptions {
        quorum: Some(ditto_engine::NoQuorum::Error),
        epoch,
        ..options()
    };
    {
        let v = f.open_on_nodes(&[0, 1, 2], quorum(3)).await.unwrap();
        v.close().await.unwrap();
    }
    let before = f.superblock(1);
    for epoch in [2, 3] {
        match f.open_on_nodes(&[1, 2], quorum(epoch)).await {
            Err(EngineError::Refused { why, .. }) => {
                assert!(why.contains("new epoch"), "{why}")
            }
            other => panic!(
                "epoch {epoch}: expected a refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    assert_eq!(
        f.superblock(1),
        before,
        "a refused start wrote a superblock"
    );
    let v = f.open_on_nodes(&[1, 2], quorum(4)).await.unwrap();
    assert!(v.fully_redundant() || v.members()[0].state != ReplicaState::InSync);
    v.close().await.unwrap();
}
