//! Majority quorum over failure domains (nodes): a volume acknowledges
//! I/O only while its in-sync replicas span more than half of its domains,
//! so the other side of a partition can take over without a split brain.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ditto_engine::{
    EngineError, Member, NoQuorum, ReplicaBackend, ReplicaState, Volume, VolumeOptions,
};

/// Three replicas, one per node a, b, c.
async fn three_nodes(f: &Fixture, on_loss: NoQuorum) -> Arc<Volume> {
    let mut members = Vec::new();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        members.push(
            Member::new(
                f.ids[i],
                format!("{node}:p0"),
                f.backend(i).await as Arc<dyn ReplicaBackend>,
            )
            .in_domain(*node),
        );
    }
    Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        VolumeOptions {
            quorum: Some(on_loss),
            ..options()
        },
        Arc::new(ditto_engine::LogSink),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn writes_go_on_with_a_majority_and_fail_without_one() {
    let f = Fixture::new(3).await;
    let v = three_nodes(&f, NoQuorum::Error).await;
    v.write(0, block(1), false).await.unwrap();
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    assert_eq!(v.quorum_state(), Some((2, 3, 2)));
    v.write(0, block(2), false).await.unwrap();
    v.fail_replica(f.ids[2], "node c cut off").await.unwrap();
    match v.write(0, block(3), false).await {
        Err(EngineError::NoQuorum {
            have: 1,
            need: 2,
            voters: 3,
            ..
        }) => {}
        other => panic!("expected no quorum, got {other:?}"),
    }
    assert!(matches!(
        v.read(0, 4096).await,
        Err(EngineError::NoQuorum { .. })
    ));
    assert!(matches!(v.flush().await, Err(EngineError::NoQuorum { .. })));
    // Node c back: quorum again, and the volume serves the last acknowledged write.
    v.readd(f.ids[2], f.backend(2).await, false).await.unwrap();
    wait_idle(&v).await;
    assert_eq!(v.members()[2].state, ReplicaState::InSync);
    assert_eq!(v.read(0, 4096).await.unwrap(), block(2));
    v.write(4096, block(4), false).await.unwrap();
}

#[tokio::test]
async fn a_write_in_flight_when_quorum_is_lost_is_not_acknowledged() {
    let f = Fixture::new(3).await;
    let mut members = Vec::new();
    let mut faults = Vec::new();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        let fl = f.faulty(i).await;
        faults.push(fl.clone());
        members.push(
            Member::new(
                f.ids[i],
                format!("{node}:p0"),
                fl as Arc<dyn ReplicaBackend>,
            )
            .in_domain(*node),
        );
    }
    let v = Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        VolumeOptions {
            quorum: Some(NoQuorum::Error),
            ..options()
        },
        Arc::new(ditto_engine::LogSink),
    )
    .await
    .unwrap();
    v.write(0, block(1), false).await.unwrap();
    // b and c fail the next write: only a has it, and a alone is no majority.
    faults[1]
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    faults[2]
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    match v.write(0, block(2), false).await {
        Err(EngineError::NoQuorum { .. }) => {}
        other => panic!("a write on a minority was acknowledged: {other:?}"),
    }
}

#[tokio::test]
async fn suspended_io_waits_for_quorum_and_then_completes() {
    let f = Fixture::new(3).await;
    let v = three_nodes(&f, NoQuorum::Suspend).await;
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    v.fail_replica(f.ids[2], "node c cut off").await.unwrap();
    let waiting = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(5), false).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a write completed without quorum");
    v.readd(f.ids[1], f.backend(1).await, false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the suspended write did not resume with quorum")
        .unwrap()
        .unwrap();
    wait_idle(&v).await;
    assert_eq!(v.read(0, 4096).await.unwrap(), block(5));
    // A close ends the wait of suspended requests instead of hanging.
    v.fail_replica(f.ids[1], "node b cut off").await.unwrap();
    let waiting = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, block(6), false).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(10), v.close())
        .await
        .expect("close hung on a suspended request")
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the suspended write did not end at close")
        .unwrap();
    assert!(r.is_err(), "a suspended write succeeded after close: {r:?}");
}

/// Two replicas on this node and one on node b: two domains, so both are
/// needed (a majority of two), whatever the number of local copies.
#[tokio::test]
async fn quorum_counts_nodes_not_replicas() {
    let f = Fixture::new(3).await;
    let mut members = Vec::new();
    for (i, node) in ["", "", "b"].iter().enumerate() {
        members.push(
            Member::new(
                f.ids[i],
                format!("p{i}"),
                f.backend(i).await as Arc<dyn ReplicaBackend>,
            )
            .in_domain(*node),
        );
    }
    let v = Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        VolumeOptions {
            quorum: Some(NoQuorum::Error),
            ..options()
        },
        Arc::new(ditto_engine::LogSink),
    )
    .await
    .unwrap();
    assert_eq!(v.quorum_state(), Some((2, 2, 2)));
    v.fail_replica(f.ids[2], "node b cut off").await.unwrap();
    assert!(matches!(
        v.write(0, block(1), false).await,
        Err(EngineError::NoQuorum {
            have: 1,
            need: 2,
            voters: 2,
            ..
        })
    ));
}

/// With quorum, a volume does not open on a minority of its nodes (found
/// by the simulator: a minority start took over from a stale copy).
#[tokio::test]
async fn a_minority_of_nodes_does_not_open() {
    let f = Fixture::new(3).await;
    let mut members = Vec::new();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        let backend: Arc<dyn ReplicaBackend> = if i == 0 {
            f.backend(i).await
        } else {
            Arc::new(ditto_engine::MissingReplica::new(
                "gone",
                "node unreachable",
                f.vol_id,
                f.ids[i],
                layout(),
            ))
        };
        members.push(Member::new(f.ids[i], format!("{node}:p0"), backend).in_domain(*node));
    }
    let r = Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        VolumeOptions {
            quorum: Some(NoQuorum::Error),
            ..options()
        },
        Arc::new(ditto_engine::LogSink),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(EngineError::NoQuorum {
                have: 1,
                need: 2,
                voters: 3,
                ..
            })
        ),
        "{:?}",
        r.map(|_| ())
    );
    // Nothing written: a start would have recorded the others as failed.
    let sb = f.superblock(0);
    assert_eq!((sb.generation, sb.replica_set.len()), (1, 0), "{sb:?}");
}
