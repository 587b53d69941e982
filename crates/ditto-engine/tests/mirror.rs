//! Mirror behaviour over real replica files, with injected backend faults.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use common::{data_area, Faulty, Fixture, SIZE};
use ditto_engine::{
    EngineError, FileReplica, LogSink, Member, ReplicaBackend, ReplicaState, ThreadPoolEngine,
    Volume, VolumeOptions,
};
use ditto_format::{Layout, Superblock, DEFAULT_REGION_SIZE};
use uuid::Uuid;

async fn create(n: usize) -> Fixture {
    Fixture::new(n).await
}

async fn open_faulty(f: &Fixture) -> (Arc<Volume>, Vec<Arc<Faulty>>) {
    let (v, faults) = f.open(VolumeOptions::default()).await;
    (v.unwrap(), faults)
}

async fn open_plain(f: &Fixture) -> Result<Arc<Volume>, EngineError> {
    open_with(f, fast_options()).await
}

/// Options for tests: clear dirty bits quickly, copy at full speed.
fn fast_options() -> VolumeOptions {
    VolumeOptions {
        dirty_clear_delay: std::time::Duration::from_millis(200),
        resync_min_rate: 1 << 30,
        ..VolumeOptions::default()
    }
}

async fn open_with(f: &Fixture, options: VolumeOptions) -> Result<Arc<Volume>, EngineError> {
    f.open(options).await.0
}

#[tokio::test]
async fn writes_reach_every_replica_and_read_back() {
    let f = create(2).await;
    let v = open_plain(&f).await.unwrap();
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    v.write(4096, Bytes::from(pattern.clone()), false)
        .await
        .unwrap();
    v.write(SIZE - 512, Bytes::from(vec![9u8; 512]), true)
        .await
        .unwrap();
    v.flush().await.unwrap();
    assert_eq!(&v.read(4096, 1 << 20).await.unwrap()[..], &pattern[..]);
    v.close().await.unwrap();
    let (a, b) = (data_area(&f.paths[0]), data_area(&f.paths[1]));
    assert_eq!(a, b, "mirrors differ");
    assert_eq!(&a[4096..4096 + (1 << 20)], &pattern[..]);
    assert_eq!(&a[(SIZE - 512) as usize..], &[9u8; 512][..]);
}

#[tokio::test]
async fn out_of_range_is_refused() {
    let f = create(1).await;
    let v = open_plain(&f).await.unwrap();
    assert!(matches!(
        v.write(SIZE - 1, Bytes::from_static(b"ab"), false).await,
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read(u64::MAX, 2).await,
        Err(EngineError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn failed_replica_is_removed_and_generation_recorded_before_ack() {
    let f = create(2).await;
    let (v, faults) = open_faulty(&f).await;
    let gen0 = v.generation();
    faults[1].broken.store(true, Ordering::SeqCst);
    v.write(0, Bytes::from(vec![5u8; 8192]), false)
        .await
        .expect("one replica left: the write succeeds");
    let st = v.members();
    assert_eq!(st[1].state, ReplicaState::Failed);
    assert_eq!(st[0].state, ReplicaState::InSync);
    assert!(v.generation() > gen0);
    // Durable on the survivor before the ack: read the superblock from disk.
    let head = std::fs::read(&f.paths[0]).unwrap();
    let sb = Superblock::decode_slots(&head).unwrap();
    assert_eq!(sb.generation, v.generation());
    assert_eq!(&v.read(0, 8192).await.unwrap()[..], &[5u8; 8192][..]);
    // Last replica fails: I/O errors, nothing pretends to succeed.
    faults[0].broken.store(true, Ordering::SeqCst);
    assert!(v
        .write(0, Bytes::from(vec![6u8; 4096]), false)
        .await
        .is_err());
    drop(v);
    // On reopen the failed replica is stale and never served.
    faults[0].broken.store(false, Ordering::SeqCst);
    let v = open_plain(&f).await.unwrap();
    let st = v.members();
    assert_eq!(st[0].state, ReplicaState::InSync);
    assert_ne!(st[1].state, ReplicaState::InSync, "{st:?}");
    for _ in 0..20 {
        assert_eq!(&v.read(0, 8192).await.unwrap()[..], &[5u8; 8192][..]);
    }
}

#[tokio::test]
async fn read_error_falls_back_to_other_replica() {
    let f = create(2).await;
    let (v, faults) = open_faulty(&f).await;
    v.write(0, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    faults[0].broken.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(&v.read(0, 4096).await.unwrap()[..], &[3u8; 4096][..]);
    }
}

#[tokio::test]
async fn split_brain_is_refused() {
    let f = create(2).await;
    // Each side goes on alone: open with one broken, write, then the other.
    {
        let (v, faults) = open_faulty(&f).await;
        faults[1].broken.store(true, Ordering::SeqCst);
        v.write(0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
    }
    {
        // Replica 1 alone, as if replica 0's disk had vanished.
        let inner = FileReplica::open(&ThreadPoolEngine, &f.paths[1], f.vol_id)
            .await
            .unwrap();
        let mut sb = inner.superblock();
        sb.generation += 5;
        for e in &mut sb.replica_set {
            if e.replica == f.ids[0] {
                e.state = ditto_format::MemberState::Failed;
            }
        }
        inner.write_superblock(sb).await.unwrap();
    }
    match open_plain(&f).await {
        Err(EngineError::SplitBrain { .. }) => {}
        Err(e) => panic!("expected split brain, got {e}"),
        Ok(_) => panic!("expected split brain, volume opened"),
    }
}

#[tokio::test]
async fn discard_keeps_replicas_sparse() {
    let f = create(2).await;
    let v = open_plain(&f).await.unwrap();
    v.write(0, Bytes::from(vec![1u8; 2 << 20]), false)
        .await
        .unwrap();
    let before = v.allocation(0, SIZE).await.unwrap();
    assert!(before.iter().any(|a| a.allocated));
    v.discard(0, 2 << 20, false).await.unwrap();
    let after = v.allocation(0, SIZE).await.unwrap();
    assert!(after.iter().all(|a| !a.allocated), "{after:?}");
    assert!(
        v.fast_zero(),
        "holes can be punched here, so zeroing is fast (NBD FAST_ZERO)"
    );
    assert!(v.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    v.write(0, Bytes::from(vec![1u8; 8192]), false)
        .await
        .unwrap();
    v.write_zeroes(0, 8192, false, true).await.unwrap();
    assert!(v.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn read_policy_spreads_concurrent_reads() {
    let f = create(2).await;
    let v = open_plain(&f).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            v.read((i * 7919 % 4000) * 4096, 4096).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = v.members();
    assert!(
        st[0].reads > 0 && st[1].reads > 0,
        "reads not spread: {} / {}",
        st[0].reads,
        st[1].reads
    );
}

#[tokio::test]
async fn foreign_replica_is_refused_without_writing() {
    let f = create(1).await;
    let before = std::fs::read(&f.paths[0]).unwrap();
    let err = FileReplica::open(&ThreadPoolEngine, &f.paths[0], Uuid::new_v4())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("belongs to volume"), "{err}");
    let junk = f.paths[0].with_extension("junk");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let err = FileReplica::open(&ThreadPoolEngine, &junk, f.vol_id)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a ditto replica"), "{err}");
    assert_eq!(std::fs::read(&f.paths[0]).unwrap(), before);
}

/// Wait (bounded) until the volume's job has finished.
async fn wait_job(v: &Volume) -> ditto_engine::JobProgress {
    for _ in 0..200 {
        if let Some(j) = v.job() {
            if j.finished {
                return j;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("job did not finish in 10 s: {:?}", v.job());
}

fn map_bits_on_disk(path: &Path) -> Vec<u8> {
    let all = std::fs::read(path).unwrap();
    let sb = Superblock::decode_slots(&all).unwrap();
    let off = sb.layout.dirty_map_offset as usize;
    ditto_format::decode_map_block(&all[off..off + 4096])
}

#[tokio::test]
async fn dirty_bit_is_on_disk_before_write_and_cleared_when_idle() {
    let f = create(2).await;
    let v = open_plain(&f).await.unwrap();
    v.write(3 << 20, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    for p in &f.paths {
        assert_eq!(
            map_bits_on_disk(p)[0],
            1 << 3,
            "region 3 dirty on {}",
            p.display()
        );
    }
    assert_eq!(v.dirty_regions(), 1);
    for _ in 0..100 {
        if v.dirty_regions() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(v.dirty_regions(), 0, "map not cleared after idle");
    for p in &f.paths {
        assert_eq!(map_bits_on_disk(p)[0], 0);
    }
}

#[tokio::test]
async fn unclean_shutdown_resyncs_only_dirty_regions() {
    let f = create(2).await;
    {
        let v = open_with(
            &f,
            VolumeOptions {
                dirty_clear_delay: std::time::Duration::from_secs(3600),
                ..fast_options()
            },
        )
        .await
        .unwrap();
        v.write(0, Bytes::from(vec![7u8; 1 << 20]), false)
            .await
            .unwrap();
        v.write(5 << 20, Bytes::from(vec![8u8; 1 << 20]), false)
            .await
            .unwrap();
        v.flush().await.unwrap();
        // Crash: no close. Simulate a write that reached only replica 0 in dirty region 5.
    }
    let sb = Superblock::decode_slots(&std::fs::read(&f.paths[0]).unwrap()).unwrap();
    assert!(!sb.clean);
    let off = sb.layout.data_offset;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.paths[0])
            .unwrap();
        file.write_all_at(&[9u8; 4096], off + (5 << 20)).unwrap();
    }
    assert_ne!(data_area(&f.paths[0]), data_area(&f.paths[1]));
    let v = open_plain(&f).await.unwrap();
    let job = wait_job(&v).await;
    assert_eq!(job.kind, ditto_engine::JobKind::Resync);
    assert_eq!(job.error, None);
    assert_eq!(
        v.copied_bytes(),
        2 << 20,
        "only the two dirty regions are copied"
    );
    v.close().await.unwrap();
    assert_eq!(data_area(&f.paths[0]), data_area(&f.paths[1]));
}

#[tokio::test]
async fn readd_copies_only_regions_written_while_away() {
    let f = create(2).await;
    let v = open_with(
        &f,
        VolumeOptions {
            dirty_clear_delay: std::time::Duration::from_millis(100),
            ..fast_options()
        },
    )
    .await
    .unwrap();
    v.write(0, Bytes::from(vec![1u8; 8 << 20]), false)
        .await
        .unwrap();
    // Let the map clear: everything is in sync.
    for _ in 0..100 {
        if v.dirty_regions() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(v.dirty_regions(), 0);
    v.fail_replica(f.ids[1], "maintenance").await.unwrap();
    v.write(2 << 20, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    v.write(9 << 20, Bytes::from(vec![3u8; 2 << 20]), false)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(v.dirty_regions(), 3, "bits are kept while a replica is out");
    let backend = FileReplica::open(&ThreadPoolEngine, &f.paths[1], f.vol_id)
        .await
        .unwrap();
    let plan = v.readd(f.ids[1], backend, false).await.unwrap();
    assert_eq!(plan, ditto_engine::ReaddPlan::CatchUp { regions: 3 });
    let job = wait_job(&v).await;
    assert_eq!(job.error, None);
    assert_eq!(
        v.copied_bytes(),
        3 << 20,
        "three 1 MiB regions copied, not the 8 MiB written before"
    );
    assert!(v.fully_redundant());
    v.close().await.unwrap();
    assert_eq!(data_area(&f.paths[0]), data_area(&f.paths[1]));
}

#[tokio::test]
async fn added_replica_is_rebuilt_sparse_and_joins() {
    let f = create(1).await;
    let v = open_plain(&f).await.unwrap();
    v.write(4 << 20, Bytes::from(vec![5u8; 2 << 20]), false)
        .await
        .unwrap();
    let new_id = Uuid::new_v4();
    let new_path = f.paths[0].with_file_name("added");
    let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
    let backend = FileReplica::create(&ThreadPoolEngine, &new_path, f.vol_id, new_id, layout)
        .await
        .unwrap();
    v.add_replica(Member::new(
        new_id,
        "pool2",
        backend as Arc<dyn ReplicaBackend>,
    ))
    .await
    .unwrap();
    let job = wait_job(&v).await;
    assert_eq!(job.kind, ditto_engine::JobKind::Rebuild);
    assert_eq!(job.total_bytes, 2 << 20, "only allocated data counts");
    assert_eq!(v.copied_bytes(), 2 << 20);
    assert!(v.fully_redundant());
    v.close().await.unwrap();
    assert_eq!(data_area(&f.paths[0]), data_area(&new_path));
    let gen = v.generation();
    drop(v);
    let mut fixture = f;
    fixture.ids.push(new_id);
    fixture.paths.push(new_path);
    let v = open_plain(&fixture).await.unwrap();
    assert!(v.fully_redundant());
    assert!(v.generation() >= gen);
}

#[tokio::test]
async fn scrub_finds_and_repairs_mismatches() {
    let f = create(2).await;
    let v = open_plain(&f).await.unwrap();
    v.write(0, Bytes::from(vec![4u8; 4 << 20]), false)
        .await
        .unwrap();
    v.flush().await.unwrap();
    let off = Superblock::decode_slots(&std::fs::read(&f.paths[1]).unwrap())
        .unwrap()
        .layout
        .data_offset;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.paths[1])
            .unwrap();
        file.write_all_at(&[0xeeu8; 512], off + (2 << 20) + 100)
            .unwrap();
    }
    v.scrub(false, None).await.unwrap();
    wait_job(&v).await;
    let report = v.last_scrub().unwrap();
    assert!(report.finished);
    assert_eq!(report.mismatched_regions, vec![2 << 20]);
    assert_eq!(report.repaired, 0);
    v.scrub(true, Some(f.ids[0])).await.unwrap();
    wait_job(&v).await;
    assert_eq!(v.last_scrub().unwrap().repaired, 1);
    v.scrub(false, None).await.unwrap();
    wait_job(&v).await;
    assert!(v.last_scrub().unwrap().mismatched_regions.is_empty());
    v.close().await.unwrap();
    assert_eq!(data_area(&f.paths[0]), data_area(&f.paths[1]));
}

#[tokio::test]
async fn missing_replica_starts_degraded_and_is_recorded() {
    let f = create(2).await;
    drop(open_plain(&f).await.unwrap());
    let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
    let present = FileReplica::open(&ThreadPoolEngine, &f.paths[0], f.vol_id)
        .await
        .unwrap();
    let missing =
        ditto_engine::MissingReplica::new("gone", "no such file", f.vol_id, f.ids[1], layout);
    let members = vec![
        Member::new(f.ids[0], "a", present as Arc<dyn ReplicaBackend>),
        Member::new(f.ids[1], "b", Arc::new(missing) as Arc<dyn ReplicaBackend>),
    ];
    let v = Volume::open(
        "v",
        f.vol_id,
        SIZE,
        members,
        fast_options(),
        Arc::new(LogSink),
    )
    .await
    .unwrap();
    assert_eq!(v.members()[1].state, ReplicaState::Missing);
    v.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    drop(v);
    // The missing one comes back: it is stale, never served from.
    let v = open_plain(&f).await.unwrap();
    assert_eq!(
        v.members()[1].state,
        ReplicaState::Stale,
        "{:?}",
        v.members()[1]
    );
    for _ in 0..10 {
        assert_eq!(&v.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
    }
}

/// A rebuild whose source fails to read fails that source out and copies
/// the same region from the next in-sync replica: the new replica must not
/// join with any region missing.
#[tokio::test]
async fn rebuild_source_failing_midway_switches_source_without_skipping() {
    let f = create(2).await;
    let (v, faults) = open_faulty(&f).await;
    let pattern: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    // Regions 0..3 hold data, region 8 too.
    v.write(0, Bytes::from(pattern.clone()), false)
        .await
        .unwrap();
    v.write(8 << 20, Bytes::from(vec![7u8; 4096]), false)
        .await
        .unwrap();
    // The rebuild's first source cannot read; its writes (membership
    // records) still work, so it is in sync when the rebuild starts.
    faults[0].reads_broken.store(true, Ordering::SeqCst);
    let new_id = Uuid::new_v4();
    let new_path = f.paths[0].with_file_name("added");
    let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
    let backend = FileReplica::create(&ThreadPoolEngine, &new_path, f.vol_id, new_id, layout)
        .await
        .unwrap();
    v.add_replica(Member::new(
        new_id,
        "pool3",
        backend as Arc<dyn ReplicaBackend>,
    ))
    .await
    .unwrap();
    let job = wait_job(&v).await;
    assert_eq!(job.kind, ditto_engine::JobKind::Rebuild);
    let states: Vec<ReplicaState> = v.members().iter().map(|m| m.state).collect();
    assert_eq!(
        states,
        vec![
            ReplicaState::Failed,
            ReplicaState::InSync,
            ReplicaState::InSync
        ],
        "the broken source is out, the new replica joined"
    );
    v.close().await.unwrap();
    let survivor = data_area(&f.paths[1]);
    let added = data_area(&new_path);
    assert_eq!(&added[..pattern.len()], &pattern[..], "region data copied");
    assert!(added[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 7));
    assert_eq!(survivor, added);
}
