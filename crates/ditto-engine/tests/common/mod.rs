//! Shared harness for the engine's integration tests: replica files in a
//! temporary directory, and a backend wrapper that injects faults, pauses
//! chosen operations and completes "hung" writes late, as a kernel does.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::{
    Allocation, BackendError, BoxFuture, EngineError, FileReplica, LogSink, Member, ReplicaBackend,
    ThreadPoolEngine, Volume, VolumeOptions,
};
use ditto_format::{Layout, Superblock};
use tokio::sync::Notify;
use uuid::Uuid;

pub const SIZE: u64 = 16 << 20;
pub const REGION: u32 = 1 << 20;

/// What a replica did, in order (for ordering assertions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(u64, usize),
    Flush,
    Superblock { cursor: Option<u64> },
    DirtyMap,
}

/// A pause point: operations of one kind wait here while it is closed.
#[derive(Default)]
pub struct Gate {
    closed: AtomicBool,
    /// Operations currently waiting at the gate.
    pub waiting: AtomicU64,
    opened: Notify,
}

impl Gate {
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }
    async fn pass(&self) {
        while self.closed.load(Ordering::SeqCst) {
            let notified = self.opened.notified();
            if !self.closed.load(Ordering::SeqCst) {
                break;
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            notified.await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Delegates to a real replica file; every knob is off by default.
pub struct Faulty {
    pub inner: Arc<FileReplica>,
    /// Every operation fails.
    pub broken: AtomicBool,
    /// Data and allocation reads fail.
    pub reads_broken: AtomicBool,
    /// The next N data reads fail (then reads work again).
    pub read_failures: AtomicI64,
    /// Data writes fail once this many more have succeeded (negative: never).
    pub writes_before_failure: AtomicI64,
    /// The next N data writes fail with this errno (0: EIO).
    pub write_failures: AtomicI64,
    pub write_errno: AtomicI64,
    /// A data write sleeps this long (ms) before it lands. The sleep runs in
    /// its own task: a caller that gives up does not stop the write, which
    /// lands late, as a write the kernel already holds does.
    pub write_delay_ms: AtomicU64,
    pub superblock_gate: Gate,
    /// The next N superblock writes fail.
    pub superblock_failures: AtomicI64,
    /// The next N flushes fail.
    pub flush_failures: AtomicI64,
    /// With `pause_next_write` set, the next data write waits here (alone).
    pub held_write: Gate,
    pub pause_next_write: AtomicBool,
    pub dirty_map_gate: Gate,
    pub log: Mutex<Vec<Op>>,
}

fn injected(location: &str, what: &str, errno: i32) -> BackendError {
    BackendError::Io {
        op: "injected",
        location: location.to_string(),
        source: if errno == 0 {
            std::io::Error::other(format!("injected {what} fault"))
        } else {
            std::io::Error::from_raw_os_error(errno)
        },
    }
}

impl Faulty {
    pub fn new(inner: Arc<FileReplica>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            broken: AtomicBool::new(false),
            reads_broken: AtomicBool::new(false),
            read_failures: AtomicI64::new(0),
            writes_before_failure: AtomicI64::new(-1),
            write_failures: AtomicI64::new(0),
            write_errno: AtomicI64::new(0),
            write_delay_ms: AtomicU64::new(0),
            superblock_gate: Gate::default(),
            superblock_failures: AtomicI64::new(0),
            flush_failures: AtomicI64::new(0),
            held_write: Gate::default(),
            pause_next_write: AtomicBool::new(false),
            dirty_map_gate: Gate::default(),
            log: Mutex::new(Vec::new()),
        })
    }

    fn record(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }

    fn check(&self, what: &str) -> Result<(), BackendError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(injected(self.inner.location(), what, 0));
        }
        Ok(())
    }

    fn check_read(&self) -> Result<(), BackendError> {
        self.check("read")?;
        if self.reads_broken.load(Ordering::SeqCst)
            || self.read_failures.fetch_sub(1, Ordering::SeqCst) > 0
        {
            return Err(injected(self.inner.location(), "read", 0));
        }
        Ok(())
    }

    fn check_write(&self) -> Result<(), BackendError> {
        self.check("write")?;
        if self.write_failures.fetch_sub(1, Ordering::SeqCst) > 0 {
            let errno = self.write_errno.load(Ordering::SeqCst) as i32;
            return Err(injected(self.inner.location(), "write", errno));
        }
        let left = self.writes_before_failure.load(Ordering::SeqCst);
        if left == 0 {
            return Err(injected(self.inner.location(), "write", 0));
        }
        if left > 0 {
            self.writes_before_failure.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl ReplicaBackend for Faulty {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn superblock(&self) -> Superblock {
        self.inner.superblock()
    }
    fn write_superblock(&self, sb: Superblock) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.superblock_gate.pass().await;
            self.check("superblock")?;
            if self.superblock_failures.fetch_sub(1, Ordering::SeqCst) > 0 {
                return Err(injected(self.inner.location(), "superblock", 0));
            }
            self.record(Op::Superblock {
                cursor: sb.rebuild_cursor,
            });
            self.inner.write_superblock(sb).await
        })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            self.check_read()?;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            if self.pause_next_write.swap(false, Ordering::SeqCst) {
                self.held_write.close();
                self.held_write.pass().await;
            }
            self.check_write()?;
            let delay = self.write_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                let inner = self.inner.clone();
                let len = data.len();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    inner.write(offset, data).await
                });
                let r = task
                    .await
                    .map_err(|e| injected(self.inner.location(), &e.to_string(), 0))?;
                self.record(Op::Write(offset, len));
                return r;
            }
            self.record(Op::Write(offset, data.len()));
            self.inner.write(offset, data).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.check("flush")?;
            if self.flush_failures.load(Ordering::SeqCst) > 0 {
                self.flush_failures.fetch_sub(1, Ordering::SeqCst);
                return Err(injected(self.inner.location(), "flush", 0));
            }
            self.record(Op::Flush);
            self.inner.flush().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.check_write()?;
            self.inner.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.check_write()?;
            self.inner.write_zeroes(offset, len).await
        })
    }
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Allocation>, BackendError>> {
        Box::pin(async move {
            if self.reads_broken.load(Ordering::SeqCst) {
                return Err(injected(self.inner.location(), "allocation", 0));
            }
            self.check("allocation")?;
            self.inner.allocation(offset, len).await
        })
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn read_dirty_map(&self) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            self.check("read dirty map")?;
            self.inner.read_dirty_map().await
        })
    }
    fn write_dirty_map(
        &self,
        first: u64,
        blocks: Bytes,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.dirty_map_gate.pass().await;
            self.check("dirty map")?;
            self.record(Op::DirtyMap);
            self.inner.write_dirty_map(first, blocks).await
        })
    }
}

/// Replica files of one volume in a temporary directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub vol_id: Uuid,
    pub ids: Vec<Uuid>,
    pub paths: Vec<PathBuf>,
}

pub fn layout() -> Layout {
    Layout::new(SIZE, REGION).unwrap()
}

impl Fixture {
    pub async fn new(n: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture {
            dir,
            vol_id: Uuid::new_v4(),
            ids: Vec::new(),
            paths: Vec::new(),
        };
        for _ in 0..n {
            f.create_replica().await;
        }
        f
    }

    /// A new formatted replica file (not yet a member of any volume).
    pub async fn create_replica(&mut self) -> (Uuid, Arc<FileReplica>) {
        let id = Uuid::new_v4();
        let path = self.dir.path().join(format!("r{}", self.ids.len()));
        let r = FileReplica::create(&ThreadPoolEngine, &path, self.vol_id, id, layout())
            .await
            .unwrap();
        self.ids.push(id);
        self.paths.push(path);
        (id, r)
    }

    pub async fn backend(&self, i: usize) -> Arc<FileReplica> {
        FileReplica::open(&ThreadPoolEngine, &self.paths[i], self.vol_id)
            .await
            .unwrap()
    }

    pub async fn faulty(&self, i: usize) -> Arc<Faulty> {
        Faulty::new(self.backend(i).await)
    }

    /// Open replicas `which` (all when None) as faulty backends.
    pub async fn open(
        &self,
        options: VolumeOptions,
    ) -> (Result<Arc<Volume>, EngineError>, Vec<Arc<Faulty>>) {
        let mut members = Vec::new();
        let mut faults = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            let f = self.faulty(i).await;
            faults.push(f.clone());
            members.push(Member::new(
                *id,
                format!("pool{i}"),
                f as Arc<dyn ReplicaBackend>,
            ));
        }
        let v = Volume::open("v", self.vol_id, SIZE, members, options, Arc::new(LogSink)).await;
        (v, faults)
    }

    /// Open with only the replicas in `present`; the others are missing.
    pub async fn open_present(
        &self,
        present: &[usize],
        options: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        let mut members = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            let backend: Arc<dyn ReplicaBackend> = if present.contains(&i) {
                self.backend(i).await
            } else {
                Arc::new(ditto_engine::MissingReplica::new(
                    "gone",
                    "disk missing",
                    self.vol_id,
                    *id,
                    layout(),
                ))
            };
            members.push(Member::new(*id, format!("pool{i}"), backend));
        }
        Volume::open("v", self.vol_id, SIZE, members, options, Arc::new(LogSink)).await
    }

    /// [`Self::open_present`] with each replica on a node of its own
    /// (failure domain `n{i}`), as quorum counts them.
    pub async fn open_on_nodes(
        &self,
        present: &[usize],
        options: VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        let mut members = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            let backend: Arc<dyn ReplicaBackend> = if present.contains(&i) {
                self.backend(i).await
            } else {
                Arc::new(ditto_engine::MissingReplica::new(
                    "gone",
                    "node unreachable",
                    self.vol_id,
                    *id,
                    layout(),
                ))
            };
            members
                .push(Member::new(*id, format!("n{i}:pool"), backend).in_domain(format!("n{i}")));
        }
        Volume::open("v", self.vol_id, SIZE, members, options, Arc::new(LogSink)).await
    }

    pub fn data_area(&self, i: usize) -> Vec<u8> {
        data_area(&self.paths[i])
    }

    pub fn superblock(&self, i: usize) -> Superblock {
        Superblock::decode_slots(&std::fs::read(&self.paths[i]).unwrap()).unwrap()
    }

    /// Overwrite bytes of replica `i`'s data area behind the engine's back.
    pub fn scribble(&self, i: usize, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let off = self.superblock(i).layout.data_offset;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.paths[i])
            .unwrap();
        file.write_all_at(data, off + offset).unwrap();
    }

    /// Dirty bits on replica `i`'s disk (first map block).
    pub fn map_bits(&self, i: usize) -> Vec<u8> {
        let all = std::fs::read(&self.paths[i]).unwrap();
        let sb = Superblock::decode_slots(&all).unwrap();
        let off = sb.layout.dirty_map_offset as usize;
        ditto_format::decode_map_block(&all[off..off + 4096])
    }
}

/// Asserts replicas `a` and `b` hold the same data, naming the first difference.
pub fn assert_same_data(f: &Fixture, a: usize, b: usize, what: &str) {
    let (x, y) = (f.data_area(a), f.data_area(b));
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{what}: replicas {a} and {b} differ at byte {at} ({:#x} vs {:#x})",
            x[at], y[at]
        );
    }
    assert_eq!(x.len(), y.len(), "{what}: data areas differ in length");
}

pub fn data_area(path: &Path) -> Vec<u8> {
    let all = std::fs::read(path).unwrap();
    let sb = Superblock::decode_slots(&all).unwrap();
    all[sb.layout.data_offset as usize..].to_vec()
}

/// Options for tests: dirty bits kept (a crash leaves them), copies at full speed.
pub fn options() -> VolumeOptions {
    VolumeOptions {
        dirty_clear_delay: Duration::from_secs(3600),
        resync_min_rate: 1 << 30,
        ..VolumeOptions::default()
    }
}

/// Wait (bounded) until no job is queued or running.
pub async fn wait_idle(v: &Volume) {
    for _ in 0..400 {
        if v.job().is_none_or(|j| j.finished) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if v.job().is_none_or(|j| j.finished) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job did not finish in 20 s: {:?}", v.job());
}

/// Wait (bounded) until `cond` holds.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

pub fn block(fill: u8) -> Bytes {
    Bytes::from(vec![fill; 4096])
}
