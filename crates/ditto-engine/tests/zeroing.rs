//! Zeroing where the filesystem cannot punch holes: ramfs has no fallocate
//! at all, so PUNCH_HOLE and ZERO_RANGE both fail with EOPNOTSUPP, as on vfat.
//! Discard and write-zeroes must still zero (falling back to writing
//! zeroes), never fail the replica, and `fast_zero` must say it is not fast.
//! Needs root to mount ramfs and tmpfs; skipped with a printed reason otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::io::IoEngine;
use ditto_engine::uring::UringEngine;
use ditto_engine::{
    FileReplica, LogSink, Member, ReplicaState, ThreadPoolEngine, Volume, VolumeOptions,
};
use ditto_format::{Layout, DEFAULT_REGION_SIZE};
use uuid::Uuid;

/// A filesystem mounted on a temporary directory, unmounted when dropped.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(fstype: &str) -> Option<Mount> {
        // SAFETY: geteuid has no preconditions and only reads process state.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: not root: mounting {fstype} needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", fstype, fstype])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Mount { dir }),
            other => {
                eprintln!("SKIPPED: cannot mount {fstype}: {other:?}");
                None
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn engines() -> Vec<Arc<dyn IoEngine>> {
    let mut engines: Vec<Arc<dyn IoEngine>> = vec![Arc::new(ThreadPoolEngine)];
    let uring = UringEngine::new();
    match uring.unavailable() {
        None => engines.push(Arc::new(uring)),
        Some(why) => eprintln!("io_uring engine not tested here: {why}"),
    }
    engines
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn sized(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// On ramfs, punch_hole and zero_range zero the range by writing zeroes
/// (both engines), the bytes around it are untouched, and the file says
/// zeroing is not fast; on tmpfs, which punches holes, it says it is.
#[tokio::test]
async fn punch_hole_without_support_writes_zeroes_and_is_not_fast() {
    let Some(ramfs) = Mount::new("ramfs") else {
        return;
    };
    let Some(tmpfs) = Mount::new("tmpfs") else {
        return;
    };
    const LEN: u64 = 4 << 20;
    for engine in engines() {
        let name = engine.name();
        let path = ramfs.path(name);
        let f = engine.open(&path, true).unwrap();
        sized(&path, LEN);
        let data = pattern(LEN as usize, 3);
        f.write_at(0, Bytes::from(data.clone())).await.unwrap();
        assert!(!f.fast_zero(), "{name}: ramfs cannot punch holes");

        f.punch_hole(4096, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("{name}: punch_hole on ramfs must fall back: {e}"));
        f.zero_range(3 << 20, 12288)
            .await
            .unwrap_or_else(|e| panic!("{name}: zero_range on ramfs must fall back: {e}"));
        f.sync_data().await.unwrap();
        let back = f.read_at(0, LEN as usize).await.unwrap();
        let mut want = data;
        want[4096..4096 + (1 << 20)].fill(0);
        want[3 << 20..(3 << 20) + 12288].fill(0);
        assert!(back == want[..], "{name}: data after zeroing on ramfs");
        // Through another descriptor too: the zeroes reached the file.
        assert!(
            std::fs::read(&path).unwrap() == want,
            "{name}: file contents"
        );
        assert!(!f.fast_zero(), "{name}");

        let path = tmpfs.path(name);
        let f = engine.open(&path, true).unwrap();
        sized(&path, LEN);
        assert!(f.fast_zero(), "{name}: tmpfs punches holes");
        f.write_at(0, Bytes::from(vec![9u8; 8192])).await.unwrap();
        f.punch_hole(0, 4096).await.unwrap();
        let back = f.read_at(0, 8192).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "{name}");
        assert!(back[4096..].iter().all(|&b| b == 9), "{name}");
        assert!(f.fast_zero(), "{name}");
    }
}

/// A mirror whose replicas live on ramfs: TRIM and WRITE_ZEROES (which may
/// deallocate) used to fail every replica with EOPNOTSUPP and so take the
/// volume down. They must zero the range on both, keep both in sync, and
/// the volume must say zeroing is not fast.
#[tokio::test]
async fn discard_on_a_filesystem_without_hole_punching_keeps_the_replicas() {
    let Some(ramfs) = Mount::new("ramfs") else {
        return;
    };
    const SIZE: u64 = 8 << 20;
    let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
    let vol = Uuid::new_v4();
    let ids = [Uuid::new_v4(), Uuid::new_v4()];
    let engine = ditto_engine::io::engine_by_name("auto").unwrap();
    let mut members = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let path = ramfs.path(&format!("r{i}"));
        let r = FileReplica::create(engine.as_ref(), &path, vol, *id, layout)
            .await
            .unwrap();
        members.push(Member::new(*id, format!("p{i}"), r));
    }
    let options = VolumeOptions {
        io_timeout: Duration::from_secs(10),
        ..VolumeOptions::default()
    };
    let v = Volume::open("z", vol, SIZE, members, options, Arc::new(LogSink))
        .await
        .unwrap();
    let data = pattern(4 << 20, 7);
    v.write(0, Bytes::from(data.clone()), false).await.unwrap();
    v.discard(1 << 20, 1 << 20, false)
        .await
        .expect("TRIM on ramfs zeroes instead of failing");
    v.write_zeroes(3 << 20, 65536, true, true)
        .await
        .expect("WRITE_ZEROES that may deallocate zeroes instead of failing");
    let states: Vec<ReplicaState> = v.members().iter().map(|m| m.state).collect();
    assert_eq!(states, [ReplicaState::InSync, ReplicaState::InSync]);
    assert!(!v.fast_zero(), "no replica can punch holes: not fast");
    let mut want = data;
    want[1 << 20..2 << 20].fill(0);
    want[3 << 20..(3 << 20) + 65536].fill(0);
    // Every replica holds the zeroes: read each file's data area.
    for i in 0..2 {
        let file = std::fs::read(ramfs.path(&format!("r{i}"))).unwrap();
        let at = layout.data_offset as usize;
        assert!(
            file[at..at + want.len()] == want[..],
            "replica {i} data after TRIM and WRITE_ZEROES"
        );
    }
    for _ in 0..4 {
        let back = v.read(0, want.len()).await.unwrap();
        assert!(back == want[..], "volume data after TRIM and WRITE_ZEROES");
    }
    v.close().await.unwrap();
}
