//! Replicas on real NBD exports served by nbdkit, with faults injected by its error and delay filters.
//!
//! Needs the `nbdkit` binary (Debian package nbdkit). Servers listen on Unix
//! sockets in a temporary directory (no port races) and are killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ditto_engine::nbd_file::{open_nbd, NbdFile};
use ditto_engine::{
    FileReplica, IoFile, LogSink, Member, ReplicaBackend, ReplicaState, ThreadPoolEngine, Volume,
    VolumeOptions,
};
use ditto_format::{Layout, Superblock, DEFAULT_REGION_SIZE};
use uuid::Uuid;

const SIZE: u64 = 16 << 20;

/// One nbdkit process serving on a Unix socket.
struct Nbdkit {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Nbdkit {
    /// Runs `nbdkit -f --unix SOCK ARGS...` and waits until it accepts connections.
    fn start(sock: &Path, args: &[&str]) -> Nbdkit {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "--unix"])
            .arg(sock)
            .args(args);
        Nbdkit::spawn(cmd, "nbdkit", sock)
    }

    /// Runs a server command that will listen on `sock`; `package` is the
    /// Debian package to name if the program is missing.
    fn spawn(mut cmd: Command, package: &str, sock: &Path) -> Nbdkit {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Err(e) = Command::new(&program).arg("--version").output() {
            panic!("cannot run {program} ({e}); install the Debian package {package} (apt-get install {package})");
        }
        // A socket left by a killed server would make bind fail.
        let _ = std::fs::remove_file(sock);
        let log = sock.with_extension("log");
        let stderr = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let mut k = Nbdkit {
            child,
            sock: sock.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = k.child.try_wait() {
                panic!(
                    "{program} {args:?} exited with {status}: {}",
                    std::fs::read_to_string(&k.log).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(&k.sock).is_ok() {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not listen on {} within 10 s",
                k.sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a disk that hangs
    /// with its connection still open, then answers again.
    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to nbdkit");
        if sig == libc::SIGSTOP {
            // Delivery is asynchronous: a thread still running could answer
            // one more request. Wait until every thread is stopped.
            let all_stopped = || {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .map(|tasks| {
                        tasks.filter_map(|t| t.ok()).all(|t| {
                            std::fs::read_to_string(t.path().join("stat"))
                                .ok()
                                .and_then(|st| {
                                    st.rsplit(')')
                                        .next()
                                        .map(|r| r.trim_start().starts_with('T'))
                                })
                                .unwrap_or(true)
                        })
                    })
                    .unwrap_or(true)
            };
            for _ in 0..200 {
                if all_stopped() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("nbdkit did not stop within 1 s of SIGSTOP");
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for tests: clear dirty bits quickly, copy at full speed.
fn fast_options() -> VolumeOptions {
    VolumeOptions {
        dirty_clear_delay: Duration::from_millis(100),
        resync_min_rate: 1 << 30,
        ..VolumeOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 16) as u8)
        .collect()
}

/// A volume mirrored on a local file (member 0) and an NBD export (member 1).
struct Mirror {
    _dir: tempfile::TempDir,
    vol_id: Uuid,
    ids: [Uuid; 2],
    layout: Layout,
    file_path: PathBuf,
    nbd: Arc<NbdFile>,
    uri: String,
}

impl Mirror {
    async fn create(dir: tempfile::TempDir, uri: &str) -> Mirror {
        let vol_id = Uuid::new_v4();
        let ids = [Uuid::new_v4(), Uuid::new_v4()];
        let layout = Layout::new(SIZE, DEFAULT_REGION_SIZE).unwrap();
        let file_path = dir.path().join("local");
        FileReplica::create(&ThreadPoolEngine, &file_path, vol_id, ids[0], layout)
            .await
            .unwrap();
        let nbd = NbdFile::open(uri).await.unwrap();
        FileReplica::format_on(
            nbd.clone() as Arc<dyn IoFile>,
            uri.to_string(),
            vol_id,
            ids[1],
            layout,
        )
        .await
        .unwrap();
        Mirror {
            _dir: dir,
            vol_id,
            ids,
            layout,
            file_path,
            nbd,
            uri: uri.to_string(),
        }
    }

    async fn nbd_backend(&self) -> Arc<dyn ReplicaBackend> {
        FileReplica::open_on(
            self.nbd.clone() as Arc<dyn IoFile>,
            self.uri.clone(),
            self.vol_id,
        )
        .await
        .unwrap()
    }

    async fn open(&self, options: VolumeOptions) -> Arc<Volume> {
        let local = FileReplica::open(&ThreadPoolEngine, &self.file_path, self.vol_id)
            .await
            .unwrap();
        let members = vec![
            Member::new(self.ids[0], "local", local as Arc<dyn ReplicaBackend>),
            Member::new(self.ids[1], "nbd", self.nbd_backend().await),
        ];
        Volume::open("v", self.vol_id, SIZE, members, options, Arc::new(LogSink))
            .await
            .unwrap()
    }

    fn local_data(&self) -> Vec<u8> {
        let all = std::fs::read(&self.file_path).unwrap();
        let sb = Superblock::decode_slots(&all).unwrap();
        all[sb.layout.data_offset as usize..][..SIZE as usize].to_vec()
    }

    /// Through a connection of its own: the mirror's may have been lost.
    async fn nbd_data(&self) -> Vec<u8> {
        NbdFile::open(&self.uri)
            .await
            .unwrap()
            .read_at(self.layout.data_offset, SIZE as usize)
            .await
            .unwrap()
            .to_vec()
    }

    async fn assert_equal(&self) {
        let (a, b) = (self.local_data(), self.nbd_data().await);
        assert!(a == b, "mirrors differ");
    }
}

/// Wait (bounded) until the volume's job has finished.
async fn wait_job(v: &Volume) -> ditto_engine::JobProgress {
    for _ in 0..400 {
        if let Some(j) = v.job() {
            if j.finished {
                return j;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job did not finish in 20 s: {:?}", v.job());
}

async fn wait_clean(v: &Volume) {
    for _ in 0..200 {
        if v.dirty_regions() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dirty map not cleared: {} regions", v.dirty_regions());
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}

#[tokio::test]
async fn nbd_file_reads_writes_and_zeroes_on_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let kit = Nbdkit::start(&dir.path().join("s"), &["memory", "64M"]);
    let f = within(10, open_nbd(&kit.uri())).await.unwrap();
    assert_eq!(f.len().unwrap(), 64 << 20);
    // 40 MiB: more than one 32 MiB request each way.
    let big = pattern(40 << 20, 5);
    within(30, f.write_at(4096, Bytes::from(big.clone())))
        .await
        .unwrap();
    within(10, f.sync_data()).await.unwrap();
    let back = within(30, f.read_at(4096, big.len())).await.unwrap();
    assert!(back[..] == big[..], "40 MiB read back differs");
    within(10, f.zero_range(8192, 1 << 20)).await.unwrap();
    within(10, f.punch_hole(4 << 20, 3 << 20)).await.unwrap();
    let back = f.read_at(0, 8 << 20).await.unwrap();
    assert!(back[8192..8192 + (1 << 20)].iter().all(|&b| b == 0));
    assert!(back[4 << 20..7 << 20].iter().all(|&b| b == 0));
    assert_eq!(back[7 << 20], big[(7 << 20) - 4096]);
    let map = f.allocation(0, 64 << 20).await.unwrap();
    assert_eq!(map.len(), 1);
    assert!(map[0].allocated && map[0].length == 64 << 20);
    // Past the end is refused, not sent.
    let e = f.read_at(64 << 20, 1).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

#[tokio::test]
async fn volume_mirrors_onto_nbd_replica() {
    let dir = tempfile::tempdir().unwrap();
    let kit = Nbdkit::start(&dir.path().join("s"), &["memory", "64M"]);
    let m = within(10, Mirror::create(dir, &kit.uri())).await;
    let v = within(10, m.open(fast_options())).await;
    assert!(v.fully_redundant());
    let data = pattern(3 << 20, 9);
    within(10, v.write(4096, Bytes::from(data.clone()), false))
        .await
        .unwrap();
    within(10, v.write(SIZE - 512, Bytes::from(vec![7u8; 512]), true))
        .await
        .unwrap();
    within(10, v.write_zeroes(8192, 8192, false, false))
        .await
        .unwrap();
    within(10, v.discard(1 << 20, 1 << 20, false))
        .await
        .unwrap();
    within(10, v.flush()).await.unwrap();
    // back[i] is volume byte 4096 + i.
    let back = within(10, v.read(4096, data.len())).await.unwrap();
    let zero = |r: std::ops::Range<usize>| back[r].iter().all(|&b| b == 0);
    let (mib, z0, z1) = (1usize << 20, 8192 - 4096, 16384 - 4096);
    assert!(back[..z0] == data[..z0]);
    assert!(zero(z0..z1), "write_zeroes range");
    assert!(back[z1..mib - 4096] == data[z1..mib - 4096]);
    assert!(zero(mib - 4096..2 * mib - 4096), "discarded range");
    assert!(back[2 * mib - 4096..] == data[2 * mib - 4096..]);
    assert!(v.members().iter().all(|s| s.state == ReplicaState::InSync));
    within(10, v.close()).await.unwrap();
    m.assert_equal().await;
    let local = m.local_data();
    assert_eq!(&local[(SIZE - 512) as usize..], &[7u8; 512][..]);
    assert!(local[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert_eq!(
        &local[(2 << 20)..(3 << 20)],
        &data[(2 << 20) - 4096..(3 << 20) - 4096]
    );
}

#[tokio::test]
async fn error_filter_fails_the_replica_and_readd_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("trigger");
    let error_file = format!("error-file={}", trigger.display());
    let kit = Nbdkit::start(
        &dir.path().join("s"),
        &[
            "--filter=error",
            "memory",
            "64M",
            "error-rate=100%",
            &error_file,
        ],
    );
    let m = within(10, Mirror::create(dir, &kit.uri())).await;
    let v = within(10, m.open(fast_options())).await;
    within(10, v.write(0, Bytes::from(vec![1u8; 8 << 20]), false))
        .await
        .unwrap();
    within(15, wait_clean(&v)).await;

    // Every request to the export now fails with EIO.
    std::fs::write(&trigger, b"").unwrap();
    let gen0 = v.generation();
    within(10, v.write(2 << 20, Bytes::from(vec![2u8; 4096]), false))
        .await
        .expect("the local replica took the write");
    let st = v.members();
    assert_eq!(st[0].state, ReplicaState::InSync);
    assert_eq!(st[1].state, ReplicaState::Failed, "{st:?}");
    let reason = st[1].reason.clone().unwrap_or_default();
    assert!(reason.contains("EIO"), "{reason}");
    assert!(v.generation() > gen0);
    within(10, v.write(9 << 20, Bytes::from(vec![3u8; 2 << 20]), false))
        .await
        .unwrap();
    assert_eq!(
        &within(10, v.read(2 << 20, 4096)).await.unwrap()[..],
        &[2u8; 4096][..]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(v.dirty_regions(), 3, "bits are kept while a replica is out");

    // The disk is healthy again: re-add, copying only what changed.
    std::fs::remove_file(&trigger).unwrap();
    let backend = within(10, m.nbd_backend()).await;
    let plan = within(10, v.readd(m.ids[1], backend, false)).await.unwrap();
    assert_eq!(plan, ditto_engine::ReaddPlan::CatchUp { regions: 3 });
    let job = within(30, wait_job(&v)).await;
    assert_eq!(job.error, None);
    assert_eq!(
        v.copied_bytes(),
        3 << 20,
        "three 1 MiB regions copied, not the 8 MiB written before"
    );
    assert!(v.fully_redundant());
    within(10, v.close()).await.unwrap();
    m.assert_equal().await;
    assert!(
        m.nbd.is_connected(),
        "errors alone do not drop the connection"
    );
}

/// A 64 MiB backing file for nbdkit's file plugin, which survives restarts.
fn backing_file(dir: &Path) -> String {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    format!("file={}", path.display())
}

async fn wait_disconnected(nbd: &NbdFile) {
    for _ in 0..200 {
        if !nbd.is_connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the client did not notice the server going away");
}

#[tokio::test]
async fn hanging_replica_is_failed_out_within_io_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let file = backing_file(dir.path());
    let kit = Nbdkit::start(&sock, &["file", &file]);
    let m = within(10, Mirror::create(dir, &kit.uri())).await;
    let options = VolumeOptions {
        io_timeout: Duration::from_secs(1),
        dirty_clear_delay: Duration::from_secs(3600),
        ..fast_options()
    };
    let v = within(10, m.open(options)).await;
    within(10, v.write(0, Bytes::from(vec![1u8; 1 << 20]), false))
        .await
        .unwrap();

    // The server stops answering (its connection stays open), as a hung
    // disk does; the volume must not wait for it longer than io_timeout.
    kit.signal(libc::SIGSTOP);
    let start = Instant::now();
    let write = within(10, v.write(0, Bytes::from(vec![2u8; 4096]), false)).await;
    let took = start.elapsed();
    kit.signal(libc::SIGCONT);
    write.expect("the local replica took the write");
    assert!(
        took < Duration::from_millis(2900),
        "write took {took:?}; the hanging replica should be failed out after 1 s"
    );
    let st = v.members();
    assert_eq!(st[0].state, ReplicaState::InSync);
    assert_eq!(st[1].state, ReplicaState::Failed, "{st:?}");
    let reason = st[1].reason.clone().unwrap_or_default();
    assert!(reason.contains("did not answer"), "{reason}");
    assert_eq!(
        &within(10, v.read(0, 4096)).await.unwrap()[..],
        &[2u8; 4096][..]
    );
}

#[tokio::test]
async fn disk_that_comes_back_is_readded_on_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let file = backing_file(dir.path());
    let mut kit = Nbdkit::start(&sock, &["file", &file]);
    let m = within(10, Mirror::create(dir, &kit.uri())).await;
    let v = within(10, m.open(fast_options())).await;
    within(10, v.write(0, Bytes::from(vec![1u8; 4 << 20]), false))
        .await
        .unwrap();
    within(15, wait_clean(&v)).await;

    // The server goes away: the next write fails the replica out (the
    // reconnect attempt is refused), and the volume carries on.
    kit.kill();
    within(10, v.write(1 << 20, Bytes::from(vec![4u8; 8192]), false))
        .await
        .unwrap();
    assert_eq!(v.members()[1].state, ReplicaState::Failed);
    let reason = v.members()[1].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("was lost") && reason.contains("ditto replica readd"),
        "{reason}"
    );
    // Still gone: connecting again fails clearly.
    let e = within(10, NbdFile::open(&m.uri))
        .await
        .err()
        .expect("server is down");
    assert!(e.to_string().contains("cannot connect"), "{e}");

    // It comes back with its data. The old connection never resumes; a new
    // one reads the superblock, and the re-add copies the one region written
    // meanwhile.
    let _kit = Nbdkit::start(&sock, &["file", &file]);
    let e = within(10, m.nbd.read_at(0, 4096))
        .await
        .expect_err("a lost connection is never resumed");
    assert!(e.to_string().contains("was lost"), "{e}");
    let fresh = within(10, NbdFile::open(&m.uri)).await.unwrap();
    let backend = within(10, FileReplica::open_on(fresh, m.uri.clone(), m.vol_id))
        .await
        .unwrap();
    let plan = within(10, v.readd(m.ids[1], backend, false)).await.unwrap();
    assert_eq!(plan, ditto_engine::ReaddPlan::CatchUp { regions: 1 });
    let job = within(30, wait_job(&v)).await;
    assert_eq!(job.error, None);
    assert_eq!(v.copied_bytes(), 1 << 20);
    assert!(v.fully_redundant());
    within(10, v.close()).await.unwrap();
    m.assert_equal().await;
}

/// Issue 9, item 3: the server behind an NBD replica restarts blank (nbdkit's
/// memory plugin, like a host that lost its cache). The replica must not
/// resume on the new connection: it is failed out, nothing reads zeroes, and
/// re-adding the blank export is refused because it holds no superblock.
#[tokio::test]
async fn export_restarted_blank_is_failed_out_and_refused_on_readd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mut kit = Nbdkit::start(&sock, &["memory", "64M"]);
    let m = within(10, Mirror::create(dir, &kit.uri())).await;
    let v = within(10, m.open(fast_options())).await;
    let data = pattern(4 << 20, 9);
    within(10, v.write(0, Bytes::from(data.clone()), false))
        .await
        .unwrap();
    within(10, v.flush()).await.unwrap();
    within(15, wait_clean(&v)).await;

    kit.kill();
    within(5, wait_disconnected(&m.nbd)).await;
    let _blank = Nbdkit::start(&sock, &["memory", "64M"]);

    // Reads, whichever replica they go to, return the data (never zeroes).
    for round in 0..8 {
        for at in (0..4u64 << 20).step_by(1 << 20) {
            let back = within(10, v.read(at, 1 << 20)).await.unwrap();
            assert!(
                back[..] == data[at as usize..at as usize + (1 << 20)],
                "round {round}: read at {at} differs from what was written"
            );
        }
    }
    // A write and a flush succeed on the local replica only: the NBD one
    // is failed out, with the reason and the way back.
    within(10, v.write(5 << 20, Bytes::from(vec![6u8; 8192]), false))
        .await
        .unwrap();
    within(10, v.flush()).await.unwrap();
    let st = v.members();
    assert_eq!(st[0].state, ReplicaState::InSync, "{st:?}");
    assert_eq!(st[1].state, ReplicaState::Failed, "{st:?}");
    assert!(!v.fully_redundant());
    let reason = st[1].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("was lost") && reason.contains("ditto replica readd"),
        "{reason}"
    );
    // The old connection stays dead, even though a server answers again.
    let e = within(10, m.nbd.read_at(0, 4096)).await.unwrap_err();
    assert!(e.to_string().contains("was lost"), "{e}");

    // Re-adding opens a new connection and checks the superblock: the blank
    // export has none, so it is refused and nothing changes.
    let fresh = within(10, NbdFile::open(&m.uri)).await.unwrap();
    let e = within(10, FileReplica::open_on(fresh, m.uri.clone(), m.vol_id))
        .await
        .err()
        .expect("a blank export is not this replica");
    assert!(e.to_string().contains("superblock"), "{e}");
    assert_eq!(v.members()[1].state, ReplicaState::Failed);
    let back = within(10, v.read(5 << 20, 8192)).await.unwrap();
    assert!(back.iter().all(|&b| b == 6));
}

#[tokio::test]
async fn nbd_file_works_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = dir.path().join("q");
    // qemu-nbd serves one client at a time unless told otherwise; the
    // refused-export check below needs a second connection.
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "--persistent",
        "--shared=4",
        "-x",
        "disk",
        "-k",
    ])
    .arg(&sock)
    .arg(&img);
    let _qemu = Nbdkit::spawn(cmd, "qemu-utils", &sock);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let f = within(10, open_nbd(&uri)).await.unwrap();
    assert_eq!(f.len().unwrap(), 64 << 20);
    // qemu-nbd advertises a 32 MiB maximum and refuses more: 40 MiB is split.
    let big = pattern(40 << 20, 11);
    within(30, f.write_at(1 << 20, Bytes::from(big.clone())))
        .await
        .unwrap();
    within(10, f.sync_data()).await.unwrap();
    within(10, f.zero_range(1 << 20, 4096)).await.unwrap();
    within(10, f.punch_hole(2 << 20, 1 << 20)).await.unwrap();
    let back = within(30, f.read_at(1 << 20, big.len())).await.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..1 << 20] == big[4096..1 << 20]);
    assert!(back[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(back[2 << 20..] == big[2 << 20..], "read back differs");
    // What qemu-nbd wrote to its file is what was read back.
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[1 << 20..(1 << 20) + big.len()] == back[..]);
    // An unknown export name is refused during negotiation.
    let e = within(
        10,
        open_nbd(&format!("nbd+unix:///nope?socket={}", sock.display())),
    )
    .await
    .err()
    .expect("unknown export");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}
