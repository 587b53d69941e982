//! io_uring disk I/O engine: reads, writes and fdatasync go through one shared io_uring.
//!
//! How it works, and why:
//! - The task that wants I/O pushes a submission entry under a short lock and
//!   calls `io_uring_enter` itself, once per batch: the first entry of a
//!   batch steps back to the end of the run queue (no system call) so that
//!   runnable tasks and sibling futures (the replicas of one mirrored write)
//!   add theirs, and one enter submits them all. Reads served from the page cache complete
//!   inside that call, so the same task reaps them at once: no hop to another
//!   thread and no wake-up, which is where the thread-pool engine spends its
//!   time (see BENCHMARKS.md).
//! - Completions that come later (disk reads, writes the kernel hands to its
//!   own workers) are reaped by a task that waits on the ring's file
//!   descriptor through tokio's reactor, so no extra thread sleeps on the ring.
//! - An operation owns its buffer and a clone of the file handle from
//!   submission until its completion entry is reaped, whatever happens to the
//!   future that asked for it (a timed-out or dropped future leaves the
//!   operation running to completion in the ring's table).
//! - Aligned requests (4 KiB offsets and lengths: what guests and qemu send)
//!   use an O_DIRECT descriptor, like qemu's `cache=none`; anything else, and
//!   fdatasync, uses a page-cache descriptor of the same file.
//! - Punch hole, zero range, SEEK_DATA/SEEK_HOLE and the length are rare and
//!   stay on the thread-pool engine.
//!
//! Where io_uring cannot be set up (old kernel, seccomp, `kernel.io_uring_disabled`),
//! the engine still exists but every `open` fails with the reason and the way
//! out (`--io-engine threadpool`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use ditto_buf::{AlignedBuf, Filled};

use crate::io::{Allocation, IoEngine, IoFile, ThreadPoolEngine};
use crate::BoxFuture;

/// Submission queue size. Operations in flight are bounded by it, so the
/// completion queue (twice as large) can never overflow.
const RING_ENTRIES: u32 = 256;

/// Requests whose offset and length are multiples of this go to the O_DIRECT
/// descriptor, from memory aligned to it: the page cache is bypassed as
/// qemu's `cache=none` does, so a replica costs no host memory, a write error
/// shows on that write (not at a later fsync), and small writes skip the
/// buffered write path (whose cost grows with the page-cache folio size).
/// 4 KiB suits every logical block size in use (512 B, 4 KiB).
const DIRECT_ALIGN: usize = ditto_buf::ALIGN;

/// How often the reaper looks at the ring without a wake-up while operations
/// are in flight (a safety net; see the reaper).
const STALL_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Operations older than this are reported by the reaper's periodic look.
const STALL_REPORT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest length one read or write entry asks for; longer requests continue
/// in further entries (Linux caps one transfer just below 2 GiB anyway).
const MAX_CHUNK: usize = 1 << 30;

/// The io_uring engine. Cheap to share: files opened by it share its ring.
pub struct UringEngine {
    ring: Result<Arc<Ring>, String>,
}

impl UringEngine {
    /// Sets up the ring. Never fails: if io_uring is unusable here the engine
    /// remembers why and refuses to open files (see [`UringEngine::unavailable`]).
    pub fn new() -> Self {
        UringEngine {
            ring: Ring::new(RING_ENTRIES).map(Arc::new).map_err(|e| {
                format!(
                    "the io_uring I/O engine is not available on this system ({e}); \
                     use --io-engine threadpool (or io_engine = \"threadpool\" in the config)"
                )
            }),
        }
    }

    /// Why this engine cannot be used, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.ring.as_ref().err().map(String::as_str)
    }
}

impl Default for UringEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let ring = match &self.ring {
            Ok(r) => r.clone(),
            Err(why) => return Err(io::Error::new(io::ErrorKind::Unsupported, why.clone())),
        };
        // The thread-pool engine creates the file (create_new) and serves the
        // rare metadata-like calls; the ring gets its own descriptors of the
        // same file, opened right after.
        let slow = ThreadPoolEngine.open(path, create)?;
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
        };
        let buffered = Arc::new(open(0)?);
        let direct = match open(libc::O_DIRECT) {
            Ok(f) if direct_io_works(&f) => Some(Arc::new(f)),
            Ok(_) => None,
            // Filesystems without O_DIRECT (EINVAL) keep the page cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(e),
        };
        Ok(Arc::new(UringFile {
            ring,
            direct,
            buffered,
            slow,
        }))
    }
}

/// Whether an aligned O_DIRECT read is accepted on `file` (some filesystems
/// open with O_DIRECT but refuse the I/O).
fn direct_io_works(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(mut buf) = AlignedBuf::new(DIRECT_ALIGN) else {
        return false;
    };
    // SAFETY: the slice covers exactly the buffer's allocation; the bytes are
    // not read by us, only overwritten by the kernel.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), DIRECT_ALIGN) };
    slice.fill(0);
    file.read_at(slice, 0).is_ok()
}

/// A file whose reads, writes and syncs go through the ring.
struct UringFile {
    ring: Arc<Ring>,
    /// O_DIRECT descriptor for aligned requests, if the filesystem has it.
    direct: Option<Arc<File>>,
    /// Page-cache descriptor: unaligned requests, continuations, fsync.
    buffered: Arc<File>,
    slow: Arc<dyn IoFile>,
}

impl UringFile {
    /// The descriptor for a request, and the one to continue on if the
    /// direct one transfers less than asked or refuses the request.
    fn route(&self, offset: u64, len: usize) -> (Arc<File>, Option<Arc<File>>) {
        match &self.direct {
            Some(d) if (offset as usize | len) & (DIRECT_ALIGN - 1) == 0 => {
                (d.clone(), Some(self.buffered.clone()))
            }
            _ => (self.buffered.clone(), None),
        }
    }
}

impl IoFile for UringFile {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(Bytes::new());
            }
            let (file, fallback) = self.route(offset, len);
            let buf = AlignedBuf::new(len)?;
            match self
                .ring
                .run(file, fallback, Kind::Read { buf }, offset)
                .await?
            {
                Done::Read(data) => Ok(data),
                Done::Unit => Err(io::Error::other(
                    "io_uring engine: read completed as a non-read",
                )),
            }
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if data.is_empty() {
                return Ok(());
            }
            let (file, fallback) = self.route(offset, data.len());
            let kind = if fallback.is_some() && !ditto_buf::is_aligned(&data) {
                // O_DIRECT needs aligned memory too; copying 4 KiB costs far
                // less than the page-cache write path it replaces.
                Kind::WriteAligned {
                    data: Filled::copy_of(&data)?,
                }
            } else {
                Kind::Write { data }
            };
            self.ring
                .run(file, fallback, kind, offset)
                .await
                .map(|_| ())
        })
    }

    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.ring
                .run(self.buffered.clone(), None, Kind::Fsync, 0)
                .await
                .map(|_| ())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        self.slow.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        self.slow.zero_range(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Allocation>>> {
        self.slow.allocation(offset, len)
    }

    fn len(&self) -> io::Result<u64> {
        crate::io::file_len(&self.buffered)
    }

    fn fast_zero(&self) -> bool {
        self.slow.fast_zero()
    }
}

/// What an operation does, with the memory the kernel reads or writes.
enum Kind {
    /// Filled by the kernel from the start; `Op::done` bytes so far.
    Read {
        buf: AlignedBuf,
    },
    Write {
        data: Bytes,
    },
    WriteAligned {
        data: Filled,
    },
    Fsync,
}

enum Done {
    Read(Bytes),
    Unit,
}

/// An operation between submission and reaping. Owns everything the kernel
/// may touch: the buffer and (through `file`) the descriptor.
struct Op {
    file: Arc<File>,
    /// Where to continue if `file` (O_DIRECT) transfers less than asked or
    /// refuses the request: the page-cache descriptor of the same file.
    fallback: Option<Arc<File>>,
    kind: Kind,
    offset: u64,
    /// Bytes transferred so far (short reads and writes continue).
    done: usize,
    /// When it was submitted, to report operations the kernel sits on.
    started: std::time::Instant,
    reply: oneshot::Sender<io::Result<Done>>,
    _slot: OwnedSemaphorePermit,
}

impl Op {
    /// The submission entry for what is left of this operation.
    fn entry(&mut self, user_data: u64) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let at = self.offset + self.done as u64;
        let done = self.done;
        let entry = match &mut self.kind {
            Kind::Read { buf } => {
                let n = (buf.len() - done).min(MAX_CHUNK) as u32;
                // In bounds: done < len whenever an entry is built.
                let ptr = buf.as_mut_ptr().wrapping_add(done);
                opcode::Read::new(fd, ptr, n).offset(at).build()
            }
            Kind::Write { data } => write_entry(fd, &data[done..], at),
            Kind::WriteAligned { data } => write_entry(fd, &data.as_ref()[done..], at),
            Kind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(user_data)
    }

    /// Continue on the page-cache descriptor, if this op was a direct one.
    fn fall_back(&mut self) -> bool {
        match self.fallback.take() {
            Some(f) => {
                self.file = f;
                true
            }
            None => false,
        }
    }

    /// Applies a completion result: `None` if the operation continues,
    /// otherwise its outcome.
    fn advance(&mut self, res: i32) -> Option<io::Result<Done>> {
        if res < 0 {
            return match -res {
                // Transient: the same entry is simply submitted again.
                libc::EINTR | libc::EAGAIN => None,
                // O_DIRECT refused this request (alignment rules stricter
                // than ours): the page cache takes it.
                libc::EINVAL if self.fall_back() => None,
                errno => Some(Err(io::Error::from_raw_os_error(errno))),
            };
        }
        let n = res as usize;
        let len = match &self.kind {
            Kind::Read { buf } => buf.len(),
            Kind::Write { data } => data.len(),
            Kind::WriteAligned { data } => data.as_ref().len(),
            Kind::Fsync => return Some(Ok(Done::Unit)),
        };
        self.done += n;
        if self.done >= len {
            return Some(self.finish());
        }
        if n == 0 {
            return Some(match self.kind {
                // End of file: the rest reads as zeroes, as a sparse tail
                // does (same as the thread-pool engine).
                Kind::Read { .. } => self.finish(),
                _ => Err(io::ErrorKind::WriteZero.into()),
            });
        }
        // Short transfer: continue with the rest, on the page-cache
        // descriptor if this was a direct one (the rest may be unaligned).
        self.fall_back();
        None
    }

    /// The outcome of a completed operation.
    fn finish(&mut self) -> io::Result<Done> {
        match std::mem::replace(&mut self.kind, Kind::Fsync) {
            Kind::Read { mut buf } => {
                let len = buf.len();
                let done = self.done.min(len);
                // SAFETY: `done <= len`, so the range is inside the buffer;
                // bytes before `done` were written by the kernel, the rest
                // are zeroed here, so the whole buffer is initialised.
                let filled = unsafe {
                    std::ptr::write_bytes(buf.as_mut_ptr().add(done), 0, len - done);
                    buf.assume_filled()
                };
                Ok(Done::Read(filled.into_bytes()))
            }
            _ => Ok(Done::Unit),
        }
    }
}

fn write_entry(fd: types::Fd, rest: &[u8], at: u64) -> squeue::Entry {
    let n = rest.len().min(MAX_CHUNK) as u32;
    opcode::Write::new(fd, rest.as_ptr(), n).offset(at).build()
}

/// Operations in flight, indexed by their `user_data`.
#[derive(Default)]
struct Table {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
}

impl Table {
    /// Reserves an index, so an entry can be built with its user_data
    /// before the operation moves into the table.
    fn reserve(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.ops.push(None);
                self.ops.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.ops.get_mut(i)?.take()?;
        self.free.push(i);
        Some(op)
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
    }
}

/// Completes on its second poll, after waking its own task on the first:
/// the task goes to the back of the run queue, behind the tasks already
/// woken, and the rest of the current poll pass goes on. Unlike
/// `tokio::task::yield_now`, which waits for the reactor to be polled, it
/// costs no system call.
#[derive(Default)]
struct StepBack(bool);

impl std::future::Future for StepBack {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// A batch leader's submit, done when it goes out of scope: operations
/// queued behind the leader rely on it, so it must happen even if the
/// leader's future is dropped while stepping back.
struct SubmitOnDrop<'a>(&'a Ring);

impl Drop for SubmitOnDrop<'_> {
    fn drop(&mut self) {
        self.0.submit();
    }
}

struct Ring {
    uring: IoUring,
    /// The table, and the right to touch the submission and completion queues.
    table: Mutex<Table>,
    /// Entries pushed since the last io_uring_enter (0: nothing to submit).
    queued: AtomicUsize,
    /// Completions that named no operation: a bug if ever non-zero.
    strays: AtomicUsize,
    /// io_uring_enter calls made to submit (tests check batching with it).
    enters: AtomicUsize,
    /// One permit per operation in flight (see [`RING_ENTRIES`]).
    slots: Arc<Semaphore>,
    /// Whether a reaper task is running (it clears this when its runtime drops it).
    reaper: AtomicBool,
    /// Serialises starting a reaper.
    reaper_start: Mutex<()>,
}

/// The ring's descriptor as the reaper registers it with tokio's reactor.
/// Holding the ring keeps the descriptor open for as long as it is registered.
struct RingFd(Arc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.uring.as_raw_fd()
    }
}

/// What the reaper task owns.
struct Reaper(AsyncFd<RingFd>);

impl Drop for Reaper {
    fn drop(&mut self) {
        // The task ended or was dropped with its runtime: the next operation
        // starts a new one.
        self.0.get_ref().0.reaper.store(false, Ordering::Release);
    }
}

impl Ring {
    fn new(entries: u32) -> io::Result<Ring> {
        let uring = IoUring::builder().build(entries)?;
        let mut probe = io_uring::Probe::new();
        uring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring has no IORING_OP_{name}"),
                ));
            }
        }
        Ok(Ring {
            uring,
            table: Mutex::new(Table::default()),
            queued: AtomicUsize::new(0),
            strays: AtomicUsize::new(0),
            enters: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(entries as usize)),
            reaper: AtomicBool::new(false),
            reaper_start: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent before anything
        // that could panic, so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits one operation and waits for its outcome.
    async fn run(
        self: &Arc<Self>,
        file: Arc<File>,
        fallback: Option<Arc<File>>,
        kind: Kind,
        offset: u64,
    ) -> io::Result<Done> {
        self.ensure_reaper()?;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("io_uring engine is shut down"))?;
        let (reply, outcome) = oneshot::channel();
        let mut op = Op {
            file,
            fallback,
            kind,
            offset,
            done: 0,
            started: std::time::Instant::now(),
            reply,
            _slot: slot,
        };
        let queued_before = {
            let mut table = self.lock();
            let id = table.reserve();
            let entry = op.entry(id as u64);
            table.ops[id] = Some(op);
            match self.push(&entry) {
                Ok(before) => before,
                Err(e) => {
                    if let Some(op) = table.remove(id) {
                        drop(table);
                        drop(op);
                    }
                    return Err(e);
                }
            }
        };
        // One io_uring_enter per batch, so the block layer kicks the device
        // once per batch (on a virtual disk each kick is a VM exit): the
        // first operation of a batch steps back once, letting the tasks that
        // are already runnable (a client at queue depth N keeps N going) and
        // the sibling operations polled in the same pass (the replicas of one
        // mirrored write) queue theirs, then submits them all. Operations
        // queued behind it leave the submission to it.
        if queued_before == 0 {
            let _submit = SubmitOnDrop(self);
            StepBack::default().await;
        }
        self.reap();
        match outcome.await {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("io_uring engine dropped an operation")),
        }
    }

    /// Queues an entry. The caller holds the table lock, which is what makes
    /// this the only submission queue view in existence.
    /// Returns how many entries were queued and not yet submitted before this one.
    fn push(&self, entry: &squeue::Entry) -> io::Result<usize> {
        for _ in 0..2 {
            // SAFETY: (1) the table lock is held by the caller, so no other
            // SubmissionQueue exists. (2) The entry points at memory owned by
            // an `Op` that is in the table under this entry's user_data: the
            // buffer (an AlignedBuf or Bytes, whose heap memory does not move
            // when the Op moves) and the descriptor (the Op's Arc<File>) stay
            // alive until `reap` has taken the completion for it.
            let pushed = unsafe { self.uring.submission_shared().push(entry) };
            if pushed.is_ok() {
                return Ok(self.queued.fetch_add(1, Ordering::AcqRel));
            }
            // Full: hand the queued entries to the kernel to make room. They
            // are submitted now, so nobody is owed a submit for them.
            self.enters.fetch_add(1, Ordering::Relaxed);
            self.uring.submitter().submit()?;
            self.queued.store(0, Ordering::Release);
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    /// Hands queued entries to the kernel. Errors are transient here (EBUSY,
    /// EAGAIN, EINTR): the entries stay queued and the next submit or the
    /// reaper passes them on.
    fn submit(&self) {
        // Another task's submit may have taken our entries along already.
        if self.queued.swap(0, Ordering::AcqRel) == 0 {
            return;
        }
        self.enter();
    }

    fn enter(&self) {
        self.enters.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.uring.submitter().submit() {
            tracing::debug!(error = %e, "io_uring submit deferred");
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes every completion off the ring and answers the finished operations.
    fn reap(&self) {
        let mut finished: Vec<(Op, io::Result<Done>)> = Vec::new();
        let mut again = false;
        {
            let mut table = self.lock();
            loop {
                let mut cqes = [(0u64, 0i32); 32];
                let mut n = 0;
                {
                    // SAFETY: the table lock is held, so no other
                    // CompletionQueue exists.
                    let cq = unsafe { self.uring.completion_shared() };
                    for cqe in cq.take(cqes.len()) {
                        cqes[n] = (cqe.user_data(), cqe.result());
                        n += 1;
                    }
                }
                if n == 0 {
                    break;
                }
                for &(id, res) in &cqes[..n] {
                    let id = id as usize;
                    let Some(Some(op)) = table.ops.get_mut(id) else {
                        // Never expected: every entry's user_data names a live op.
                        self.strays.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(user_data = id, "io_uring completion for no operation");
                        continue;
                    };
                    match op.advance(res) {
                        None => {
                            let entry = op.entry(id as u64);
                            match self.push(&entry) {
                                Ok(_) => again = true,
                                Err(e) => {
                                    if let Some(op) = table.remove(id) {
                                        finished.push((op, Err(e)));
                                    }
                                }
                            }
                        }
                        Some(outcome) => {
                            if let Some(op) = table.remove(id) {
                                finished.push((op, outcome));
                            }
                        }
                    }
                }
            }
        }
        if again {
            self.submit();
        }
        // Outside the lock: waking a task may run it right here.
        for (op, outcome) in finished {
            let Op { reply, .. } = op;
            let _ = reply.send(outcome);
        }
    }

    /// Starts the task that reaps completions arriving after submission, in
    /// the current tokio runtime, unless one is running.
    fn ensure_reaper(self: &Arc<Self>) -> io::Result<()> {
        if self.reaper.load(Ordering::Acquire) {
            return Ok(());
        }
        let _starting = self.reaper_start.lock().unwrap_or_else(|e| e.into_inner());
        if self.reaper.load(Ordering::Acquire) {
            return Ok(());
        }
        let no_runtime = |e: &dyn std::fmt::Display| {
            io::Error::other(format!(
                "the io_uring engine must be used inside a tokio runtime with I/O enabled: {e}"
            ))
        };
        let handle = tokio::runtime::Handle::try_current().map_err(|e| no_runtime(&e))?;
        let _enter = handle.enter();
        // SAFETY: `RingFd` owns an Arc of the ring, so the descriptor it
        // returns stays open, and is the same one, for as long as the AsyncFd
        // holding it lives (the ring closes it only when dropped).
        let fd =
            unsafe { AsyncFd::register_with_interest(RingFd(self.clone()), Interest::READABLE) }
                .map_err(|e| no_runtime(&e.into_parts().1))?;
        self.reaper.store(true, Ordering::Release);
        let reaper = Reaper(fd);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(STALL_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut ticks = 0u64;
            loop {
                let ring = &reaper.0.get_ref().0;
                tokio::select! {
                    ready = reaper.0.readable() => match ready {
                        // Clear first, then drain: a completion posted after
                        // the drain raises readiness again instead of being missed.
                        Ok(mut ready) => ready.clear_ready(),
                        Err(e) => {
                            tracing::error!(error = %e, "io_uring reaper cannot wait on the ring");
                            return;
                        }
                    },
                    // Look at the ring now and then even without a wake-up:
                    // should a notification ever be lost, an operation is late
                    // by this much instead of hanging until the volume's I/O
                    // timeout fails the replica.
                    _ = tick.tick() => {
                        // Once a second is enough for a report.
                        ticks = (ticks + 1) % 10;
                        if ticks == 0 {
                            ring.report_stalls();
                        }
                    }
                }
                ring.reap();
                ring.submit_pending();
            }
        });
        Ok(())
    }

    /// Logs operations in flight for longer than [`STALL_REPORT`], with what
    /// the ring holds: completions waiting unreaped would mean a lost
    /// wake-up here; none means the kernel (or the disk) has not finished.
    fn report_stalls(&self) {
        let table = self.lock();
        let mut slow = 0;
        let mut oldest = std::time::Duration::ZERO;
        for op in table.ops.iter().flatten() {
            let age = op.started.elapsed();
            if age >= STALL_REPORT {
                slow += 1;
                oldest = oldest.max(age);
            }
        }
        if slow > 0 {
            let (cq, sq) = self.queue_lengths(&table);
            tracing::warn!(
                slow,
                oldest_ms = oldest.as_millis() as u64,
                unreaped_completions = cq,
                unsubmitted_entries = sq,
                in_flight = table.in_flight(),
                "io_uring operations are taking long"
            );
        }
    }

    /// Submits entries left queued by a submit that failed transiently.
    fn submit_pending(&self) {
        let pending = {
            let table = self.lock();
            self.queue_lengths(&table).1 > 0
        };
        if pending {
            // Everything queued goes in now: nobody is owed a submit for it,
            // so a batch leader about to submit skips its (empty) enter.
            self.queued.store(0, Ordering::Release);
            self.enter();
        }
    }

    /// (unreaped completions, unsubmitted entries). Takes the guard to prove
    /// the table lock is held; the queue views are locals, so they are gone
    /// before the caller can release the lock. (A view dropped after the
    /// guard, as a temporary in a block's tail expression is, stores its
    /// stale tail outside the lock: the kernel then sees the tail behind its
    /// head and re-submits old entries.)
    fn queue_lengths(&self, _locked: &MutexGuard<'_, Table>) -> (usize, usize) {
        // SAFETY: the table lock is held (the guard), so no other queue view
        // exists; both views are only read and are dropped before returning.
        let cq = unsafe { self.uring.completion_shared() };
        // SAFETY: as above.
        let sq = unsafe { self.uring.submission_shared() };
        let lengths = (cq.len(), sq.len());
        drop(sq);
        drop(cq);
        lengths
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Only reachable once every file, the engine and the reaper are gone.
        // Operations can still be in flight if their futures were dropped:
        // their buffers and descriptors must outlive the kernel's use, which
        // closing the ring does not wait for, so they are leaked, not freed.
        let table = std::mem::take(&mut *self.lock());
        if table.in_flight() > 0 {
            tracing::warn!(
                in_flight = table.in_flight(),
                "io_uring ring dropped with operations in flight; leaking their buffers"
            );
            std::mem::forget(table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn engine() -> UringEngine {
        let e = UringEngine::new();
        if let Some(why) = e.unavailable() {
            panic!("io_uring is required for these tests: {why}");
        }
        e
    }

    fn sized_file(dir: &tempfile::TempDir, len: u64) -> (std::path::PathBuf, Arc<dyn IoFile>) {
        sized_file_on(&engine(), dir, "f", len)
    }

    /// A new file `name` of `len` bytes opened on `engine` (files of one
    /// engine share its ring).
    fn sized_file_on(
        engine: &UringEngine,
        dir: &tempfile::TempDir,
        name: &str,
        len: u64,
    ) -> (std::path::PathBuf, Arc<dyn IoFile>) {
        let path = dir.path().join(name);
        let f = engine.open(&path, true).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
        (path, f)
    }

    #[tokio::test]
    async fn write_read_sync_punch_and_map() {
        let dir = tempfile::tempdir().unwrap();
        let (path, f) = sized_file(&dir, 8 << 20);
        f.write_at(1 << 20, Bytes::from(vec![7u8; 1 << 20]))
            .await
            .unwrap();
        f.sync_data().await.unwrap();
        let back = f.read_at(1 << 20, 1 << 20).await.unwrap();
        assert_eq!(back.len(), 1 << 20);
        assert!(back.iter().all(|&b| b == 7));
        // Another descriptor sees the bytes: they went to the file.
        let other = std::fs::read(&path).unwrap();
        assert!(other[1 << 20..2 << 20].iter().all(|&b| b == 7));
        assert!(other[..1 << 20].iter().all(|&b| b == 0));
        f.punch_hole(1 << 20, 1 << 20).await.unwrap();
        assert!(f
            .read_at(1 << 20, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        let map = f.allocation(0, 8 << 20).await.unwrap();
        assert!(map.iter().all(|a| !a.allocated), "{map:?}");
        f.write_at(0, Bytes::from(vec![1u8; 8192])).await.unwrap();
        f.zero_range(0, 8192).await.unwrap();
        assert!(f.read_at(0, 8192).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(f.len().unwrap(), 8 << 20);
    }

    #[tokio::test]
    async fn read_past_the_end_is_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, f) = sized_file(&dir, 4096);
        f.write_at(0, Bytes::from(vec![9u8; 4096])).await.unwrap();
        let back = f.read_at(2048, 8192).await.unwrap();
        assert_eq!(back.len(), 8192);
        assert!(back[..2048].iter().all(|&b| b == 9));
        assert!(back[2048..].iter().all(|&b| b == 0));
        assert!(f.read_at(0, 0).await.unwrap().is_empty());
    }

    /// Aligned requests take the O_DIRECT descriptor, others the page cache;
    /// each sees what the other wrote.
    #[tokio::test]
    async fn direct_and_buffered_paths_agree() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, f) = sized_file(&dir, 1 << 20);
        // Unaligned (page cache), then read back aligned (O_DIRECT).
        f.write_at(100, Bytes::from(vec![4u8; 1000])).await.unwrap();
        let back = f.read_at(0, 4096).await.unwrap();
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(back[100..1100].iter().all(|&b| b == 4));
        assert!(back[1100..].iter().all(|&b| b == 0));
        // Aligned from unaligned memory (copied), then read back unaligned.
        let src = Bytes::from(vec![6u8; 8192 + 1]).slice(1..);
        f.write_at(8192, src).await.unwrap();
        let back = f.read_at(8192 + 7, 100).await.unwrap();
        assert!(back.iter().all(|&b| b == 6));
        // Aligned memory goes straight to the kernel.
        let aligned = Filled::copy_of(&[8u8; 4096]).unwrap().into_bytes();
        f.write_at(4096, aligned).await.unwrap();
        assert!(f.read_at(4096, 4096).await.unwrap().iter().all(|&b| b == 8));
        f.sync_data().await.unwrap();
    }

    #[test]
    fn direct_io_is_used_where_the_filesystem_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        // Where O_DIRECT opens and reads, the probe must say so.
        if let Ok(f) = direct {
            assert!(direct_io_works(&f));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_ops_land_where_they_should() {
        let dir = tempfile::tempdir().unwrap();
        // More operations than the ring has entries, to exercise the bound.
        const N: usize = 1000;
        let (_path, f) = sized_file(&dir, (N * 4096) as u64);
        let f: Arc<dyn IoFile> = f;
        let mut tasks = Vec::new();
        for i in 0..N {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let block = Bytes::from(vec![(i % 251) as u8; 4096]);
                f.write_at((i * 4096) as u64, block).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        f.sync_data().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..N {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let back = f.read_at((i * 4096) as u64, 4096).await.unwrap();
                assert!(back.iter().all(|&b| b == (i % 251) as u8), "block {i}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// Random 4 KiB reads and writes at queue depth 32 from many tasks for a
    /// while: every operation must complete promptly (a lost completion
    /// wake-up would show as one that takes seconds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sustained_mixed_load_never_stalls() {
        let dir = tempfile::tempdir().unwrap();
        const BLOCKS: u64 = 4096;
        let e = engine();
        let ring = e.ring.as_ref().unwrap().clone();
        let path = dir.path().join("f");
        let f = e.open(&path, true).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(BLOCKS * 4096)
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut ops = 0u64;
                while std::time::Instant::now() < deadline {
                    // xorshift: a cheap, reproducible spread of offsets.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x % BLOCKS) * 4096;
                    let op = async {
                        if x & 1 == 0 {
                            f.write_at(at, Bytes::from(vec![t as u8; 4096])).await
                        } else {
                            f.read_at(at, 4096).await.map(|_| ())
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(5), op).await {
                        Ok(r) => r.unwrap(),
                        Err(_) => panic!("operation {ops} of task {t} stalled for 5 s"),
                    }
                    ops += 1;
                }
                ops
            }));
        }
        // Hammer the path the reaper takes after every wake-up, from another
        // thread, so a queue view escaping the lock would show quickly.
        let hammer = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                while std::time::Instant::now() < deadline {
                    ring.submit_pending();
                }
            })
        };
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        hammer.join().unwrap();
        assert!(total > 0);
        // The reaper's submit_pending and the stall report took queue views
        // all along: the tail must never have gone behind the kernel's head.
        let table = ring.lock();
        let (cq, sq) = ring.queue_lengths(&table);
        assert!(sq <= RING_ENTRIES as usize, "submission queue length {sq}");
        assert!(
            cq <= 2 * RING_ENTRIES as usize,
            "completion queue length {cq}"
        );
        assert_eq!(ring.strays.load(Ordering::Relaxed), 0, "stray completions");
    }

    /// The replicas of one mirrored write are sibling futures of one task
    /// (the volume joins them): they must reach the kernel in one
    /// io_uring_enter, so the device is kicked once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn sibling_operations_share_one_submission() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine();
        let (_, a) = sized_file_on(&e, &dir, "a", 1 << 20);
        let (_, b) = sized_file_on(&e, &dir, "b", 1 << 20);
        // Starts the reaper; then let everything settle.
        a.write_at(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ring = e.ring.as_ref().unwrap().clone();
        for round in 0..4u64 {
            let before = ring.enters.load(Ordering::Relaxed);
            let (ra, rb) = tokio::join!(
                a.write_at(round * 4096, Bytes::from(vec![10 + round as u8; 4096])),
                b.write_at(round * 4096, Bytes::from(vec![20 + round as u8; 4096])),
            );
            ra.unwrap();
            rb.unwrap();
            let enters = ring.enters.load(Ordering::Relaxed) - before;
            assert_eq!(
                enters, 1,
                "round {round}: two sibling writes took {enters} submissions"
            );
        }
        for round in 0..4u64 {
            let got_a = a.read_at(round * 4096, 4096).await.unwrap();
            let got_b = b.read_at(round * 4096, 4096).await.unwrap();
            assert!(
                got_a.iter().all(|&x| x == 10 + round as u8),
                "a round {round}"
            );
            assert!(
                got_b.iter().all(|&x| x == 20 + round as u8),
                "b round {round}"
            );
        }
    }

    /// An operation queued behind a batch's first one leaves the submission
    /// to it; if the first one's future is dropped before submitting, the
    /// drop submits, so the second is not left waiting for the reaper.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn dropping_a_batch_leader_still_submits_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine();
        let (_, f) = sized_file_on(&e, &dir, "f", 1 << 20);
        f.write_at(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ring = e.ring.as_ref().unwrap().clone();
        let unsubmitted = || {
            let table = ring.lock();
            ring.queue_lengths(&table).1
        };
        let mut leader = Box::pin(f.write_at(0, Bytes::from(vec![7u8; 4096])));
        assert!(futures::poll!(&mut leader).is_pending());
        let mut follower = Box::pin(f.write_at(4096, Bytes::from(vec![8u8; 4096])));
        assert!(futures::poll!(&mut follower).is_pending());
        assert_eq!(unsubmitted(), 2, "both wait for the leader's submit");
        drop(leader);
        assert_eq!(unsubmitted(), 0, "the dropped leader submitted the batch");
        follower.await.unwrap();
        assert!(f.read_at(4096, 4096).await.unwrap().iter().all(|&x| x == 8));
    }

    #[tokio::test]
    async fn dropped_futures_do_not_break_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, f) = sized_file(&dir, 64 << 20);
        for i in 0..64u64 {
            // Start big writes and give up on them at once; the ring keeps
            // their buffers until the kernel is done.
            let _ = tokio::time::timeout(
                Duration::from_nanos(1),
                f.write_at(i << 20, Bytes::from(vec![3u8; 1 << 20])),
            )
            .await;
        }
        f.write_at(0, Bytes::from(vec![5u8; 4096])).await.unwrap();
        f.sync_data().await.unwrap();
        assert!(f.read_at(0, 4096).await.unwrap().iter().all(|&b| b == 5));
    }

    /// Errors from the kernel reach the caller as the errno they are.
    #[tokio::test]
    async fn errors_propagate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let ring = match &engine().ring {
            Ok(r) => r.clone(),
            Err(e) => panic!("{e}"),
        };
        // Write through a read-only descriptor.
        let ro = Arc::new(File::open(&path).unwrap());
        let err = ring
            .run(
                ro.clone(),
                None,
                Kind::Write {
                    data: Bytes::from_static(b"x"),
                },
                0,
            )
            .await
            .err()
            .expect("write to a read-only descriptor fails");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        // Read through a write-only descriptor.
        let wo = Arc::new(OpenOptions::new().write(true).open(&path).unwrap());
        let kind = Kind::Read {
            buf: AlignedBuf::new(4096).unwrap(),
        };
        let err = ring.run(wo, None, kind, 0).await.err().expect("read fails");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        // Reading a directory.
        let d = Arc::new(File::open(dir.path()).unwrap());
        let kind = Kind::Read {
            buf: AlignedBuf::new(16).unwrap(),
        };
        let err = ring
            .run(d, None, kind, 0)
            .await
            .err()
            .expect("read of a dir fails");
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR), "{err}");
        // The ring still works afterwards.
        let ok = ring
            .run(
                ro,
                None,
                Kind::Read {
                    buf: AlignedBuf::new(8192).unwrap(),
                },
                0,
            )
            .await
            .unwrap();
        assert!(matches!(ok, Done::Read(b) if b.iter().all(|&x| x == 1)));
    }

    #[tokio::test]
    async fn open_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = engine().open(&dir.path().join("nope"), false);
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let off = UringEngine {
            ring: Err("io_uring is switched off here".into()),
        };
        let err = off.open(&dir.path().join("x"), true).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("switched off"), "{err}");
        assert!(!dir.path().join("x").exists(), "nothing created");
    }

    #[test]
    fn needs_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, f) = {
            let path = dir.path().join("f");
            let f = engine().open(&path, true).unwrap();
            (path, f)
        };
        let err = futures::executor::block_on(f.sync_data()).unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }
}
