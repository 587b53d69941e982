//! Disk I/O engines: how bytes reach a file or device, behind one trait.
//!
//! The volume engine and the replica backends only see [`IoFile`]; an engine
//! (thread pool today, io_uring next) is chosen when a replica is opened, the
//! way Firecracker selects its block file engine.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::BoxFuture;

/// One run of allocation state inside a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

/// An open file or block device that an engine performs I/O on.
#[allow(clippy::len_without_is_empty)] // a replica is never empty; len() is its size
pub trait IoFile: Send + Sync + 'static {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>>;
    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>>;
    /// Make every completed write durable (fdatasync).
    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>>;
    /// Deallocate a range; it reads back as zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>>;
    /// Zero a range, keeping it allocated.
    fn zero_range(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>>;
    /// Allocation map of `[offset, offset+len)`, as runs covering the range.
    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Allocation>>>;
    fn len(&self) -> io::Result<u64>;
    /// True when [`IoFile::punch_hole`] is a metadata operation here, so
    /// zeroing by deallocation is fast (NBD_CMD_FLAG_FAST_ZERO). False when
    /// it would fall back to writing zeroes, or when nobody knows.
    fn fast_zero(&self) -> bool {
        false
    }
}

/// Opens files for one kind of I/O engine.
pub trait IoEngine: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>>;
}

/// The engine called `name` ("auto", "threadpool" or "io_uring"), if this
/// build has it. "auto" is io_uring where the kernel lets this process set up
/// a ring (containers and hardened kernels often forbid it), else the thread
/// pool; the fallback is logged with its reason so a slower node is explained.
pub fn engine_by_name(name: &str) -> Option<std::sync::Arc<dyn IoEngine>> {
    match name {
        "threadpool" => Some(std::sync::Arc::new(ThreadPoolEngine)),
        "io_uring" => Some(std::sync::Arc::new(crate::uring::UringEngine::new())),
        "auto" => {
            let uring = crate::uring::UringEngine::new();
            match uring.unavailable() {
                None => Some(std::sync::Arc::new(uring)),
                Some(why) => {
                    tracing::warn!("io_engine = \"auto\" falls back to the thread pool: {why}");
                    Some(std::sync::Arc::new(ThreadPoolEngine))
                }
            }
        }
        _ => None,
    }
}

/// Blocking syscalls run on tokio's blocking thread pool. Portable and simple;
/// the baseline the faster engines are measured against.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadPoolEngine;

impl IoEngine for ThreadPoolEngine {
    fn name(&self) -> &'static str {
        "threadpool"
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let punch = probe_punch_hole(&file);
        Ok(Arc::new(ThreadPoolFile {
            file: Arc::new(file),
            punch: Arc::new(AtomicU8::new(punch as u8)),
        }))
    }
}

struct ThreadPoolFile {
    file: Arc<File>,
    /// What is known of hole punching on this file ([`Punch`]); learnt at
    /// open and again from the first EOPNOTSUPP.
    punch: Arc<AtomicU8>,
}

/// Whether `FALLOC_FL_PUNCH_HOLE` works on a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Punch {
    /// Not known yet: tried, and learnt from the first refusal.
    Unknown = 0,
    Works = 1,
    /// The filesystem or device cannot (EOPNOTSUPP): zeroing falls back to
    /// FALLOC_FL_ZERO_RANGE, then to writing zeroes.
    Unsupported = 2,
}

impl Punch {
    fn from_u8(v: u8) -> Punch {
        match v {
            1 => Punch::Works,
            2 => Punch::Unsupported,
            _ => Punch::Unknown,
        }
    }
}

/// Finds out whether hole punching works without touching any data. A
/// regular file is punched past its end with KEEP_SIZE (nothing lives there;
/// filesystems check the mode before the range). A block device punches by
/// write-zeroes offload without fallback (`blkdev_fallocate`), which it has
/// when its queue's `write_zeroes_max_bytes` is not 0.
fn probe_punch_hole(file: &File) -> Punch {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = file.metadata() else {
        return Punch::Unknown;
    };
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let dev = format!("/sys/dev/block/{major}:{minor}");
        // A partition's queue is its disk's.
        for queue in [format!("{dev}/queue"), format!("{dev}/../queue")] {
            if let Ok(v) = std::fs::read_to_string(format!("{queue}/write_zeroes_max_bytes")) {
                return match v.trim().parse::<u64>() {
                    Ok(0) => Punch::Unsupported,
                    Ok(_) => Punch::Works,
                    Err(_) => Punch::Unknown,
                };
            }
        }
        return Punch::Unknown;
    }
    if !meta.is_file() {
        return Punch::Unknown;
    }
    let past_end = meta.len().div_ceil(4096) * 4096;
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        past_end,
        4096,
    ) {
        Ok(()) => Punch::Works,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Punch::Unsupported,
        Err(_) => Punch::Unknown,
    }
}

/// Zeroes a range keeping it allocated: FALLOC_FL_ZERO_RANGE, or, where the
/// filesystem lacks it, writing the zeroes.
fn zero_range_or_write(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeroes(file, offset, len),
        other => other,
    }
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = CHUNK.min(offset + len - pos) as usize;
        file.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Deallocates a range so it reads back as zeroes; where hole punching is
/// unsupported (EOPNOTSUPP: vfat, some devices), zeroes it instead, and
/// remembers that in `punch` so [`IoFile::fast_zero`] stops claiming speed.
fn punch_or_zero(file: &File, punch: &AtomicU8, offset: u64, len: u64) -> io::Result<()> {
    if Punch::from_u8(punch.load(Ordering::Relaxed)) != Punch::Unsupported {
        match fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if punch.swap(Punch::Unsupported as u8, Ordering::Relaxed)
                    != Punch::Unsupported as u8
                {
                    tracing::warn!(
                        "hole punching is not supported here ({e}); discard and write-zeroes \
                         fall back to zeroing, and NBD fast-zero requests are refused"
                    );
                }
            }
            Ok(()) => {
                let _ = punch.compare_exchange(
                    Punch::Unknown as u8,
                    Punch::Works as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    zero_range_or_write(file, offset, len)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("I/O task failed: {e}"))),
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`
    // and stays open for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads its integer arguments on a valid fd owned by `file`.
    // SEEK_DATA/SEEK_HOLE do not move any position other threads rely on:
    // all data I/O uses pread/pwrite with explicit offsets.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Allocation runs from SEEK_DATA / SEEK_HOLE. Filesystems without them report
/// everything allocated, which is always safe (copies just get less sparse).
fn allocation_map(file: &File, offset: u64, len: u64) -> io::Result<Vec<Allocation>> {
    let end = offset + len;
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(pos),
            Err(e) => return Err(e),
        };
        let data_start = data.unwrap_or(end).min(end);
        if data_start > pos {
            runs.push(Allocation {
                offset: pos,
                length: data_start - pos,
                allocated: false,
            });
            pos = data_start;
            continue;
        }
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(end),
            Err(e) => return Err(e),
        };
        let hole_start = hole.unwrap_or(end).min(end).max(pos + 1);
        runs.push(Allocation {
            offset: pos,
            length: hole_start - pos,
            allocated: true,
        });
        pos = hole_start;
    }
    Ok(runs)
}

impl IoFile for ThreadPoolFile {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            let mut buf = BytesMut::zeroed(len);
            let mut done = 0;
            while done < len {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    // Past the end of the file reads as zeroes, as a sparse tail does.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(buf.freeze())
        }))
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        let file = self.file.clone();
        Box::pin(blocking(move || file.write_all_at(&data, offset)))
    }

    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>> {
        let file = self.file.clone();
        Box::pin(blocking(move || file.sync_data()))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        let file = self.file.clone();
        let punch = self.punch.clone();
        Box::pin(blocking(move || punch_or_zero(&file, &punch, offset, len)))
    }

    fn zero_range(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        let file = self.file.clone();
        Box::pin(blocking(move || zero_range_or_write(&file, offset, len)))
    }

    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Allocation>>> {
        let file = self.file.clone();
        Box::pin(blocking(move || allocation_map(&file, offset, len)))
    }

    fn len(&self) -> io::Result<u64> {
        file_len(&self.file)
    }

    fn fast_zero(&self) -> bool {
        Punch::from_u8(self.punch.load(Ordering::Relaxed)) == Punch::Works
    }
}

/// The size of a regular file or a block device. Every engine takes a
/// replica's length from here: a block device's metadata length is 0, so
/// its size is where it ends (SEEK_END; every data I/O uses explicit
/// offsets, so moving the descriptor's position disturbs nothing).
pub(crate) fn file_len(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        return f.seek(std::io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_punch_and_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = ThreadPoolEngine.open(&path, true).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        f.write_at(1 << 20, Bytes::from(vec![7u8; 1 << 20]))
            .await
            .unwrap();
        f.sync_data().await.unwrap();
        let back = f.read_at(1 << 20, 4096).await.unwrap();
        assert!(back.iter().all(|&b| b == 7));
        let map = f.allocation(0, 8 << 20).await.unwrap();
        assert_eq!(map.iter().map(|a| a.length).sum::<u64>(), 8 << 20);
        assert!(map
            .iter()
            .any(|a| a.allocated && a.offset <= 1 << 20 && a.offset + a.length >= 2 << 20));
        assert!(
            !map[0].allocated,
            "start of a sparse file is a hole: {map:?}"
        );
        f.punch_hole(1 << 20, 1 << 20).await.unwrap();
        let back = f.read_at(1 << 20, 4096).await.unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let map = f.allocation(0, 8 << 20).await.unwrap();
        assert!(map.iter().all(|a| !a.allocated), "{map:?}");
        f.write_at(0, Bytes::from(vec![1u8; 8192])).await.unwrap();
        f.zero_range(0, 8192).await.unwrap();
        assert!(f.read_at(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn engine_names_resolve_and_auto_always_yields_an_engine() {
        assert_eq!(engine_by_name("threadpool").unwrap().name(), "threadpool");
        assert_eq!(engine_by_name("io_uring").unwrap().name(), "io_uring");
        let auto = engine_by_name("auto").expect("auto always picks an engine");
        let expected = if crate::uring::UringEngine::new().unavailable().is_none() {
            "io_uring"
        } else {
            "threadpool"
        };
        assert_eq!(auto.name(), expected);
        assert!(engine_by_name("aio").is_none());
    }
}
