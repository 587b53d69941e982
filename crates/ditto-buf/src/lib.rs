//! Page-aligned, pooled I/O buffers, so data can go from the socket to an O_DIRECT disk write without a copy.
//!
//! O_DIRECT needs the memory, not only the offset and length, aligned to the
//! device's logical block size. The NBD server reads WRITE payloads into
//! these buffers and the io_uring engine hands them to the kernel as they
//! are; a payload in ordinary heap memory would be copied once per replica.
//!
//! Freed buffers are kept for reuse by power-of-two size class (up to
//! [`POOL_BYTES`] in all): a fresh large allocation is an mmap whose pages
//! fault in and are zeroed on first touch and are unmapped on free, which for
//! 1 MiB requests cost more CPU than the I/O itself (see BENCHMARKS.md).

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes};

/// Alignment of every buffer: suits every logical block size in use (512 B, 4 KiB).
pub const ALIGN: usize = 4096;

/// Smallest pooled size is 2^12 = 4 KiB, largest 2^22 = 4 MiB.
const POOL_MIN_SHIFT: u32 = 12;
const POOL_CLASSES: usize = 11;
/// Most memory the pool keeps for reuse (it counts in the daemon's RSS).
pub const POOL_BYTES: usize = 16 << 20;

/// Whether `data` starts at an [`ALIGN`]-aligned address.
pub fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr() as usize & (ALIGN - 1) == 0
}

/// Heap memory aligned to [`ALIGN`], not initialised until filled.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Bytes asked for.
    len: usize,
    /// Bytes allocated (a pool size class, or `len`).
    cap: usize,
}

// SAFETY: a uniquely owned heap allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

/// Freed buffers by size class. Addresses are kept as integers.
struct Pool {
    free: [Vec<usize>; POOL_CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; POOL_CLASSES],
    bytes: 0,
});

fn pool() -> MutexGuard<'static, Pool> {
    // Each critical section is one push or pop: never left inconsistent.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pool class and its size for a request of `len` bytes, if pooled.
fn size_class(len: usize) -> Option<(usize, usize)> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(POOL_MIN_SHIFT);
    let class = (shift - POOL_MIN_SHIFT) as usize;
    (class < POOL_CLASSES).then_some((class, 1 << shift))
}

impl AlignedBuf {
    fn layout(cap: usize) -> io::Result<Layout> {
        Layout::from_size_align(cap.max(1), ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }

    /// A buffer of `len` bytes, from the pool if one of its class is free.
    pub fn new(len: usize) -> io::Result<Self> {
        let class = size_class(len);
        if let Some((c, cap)) = class {
            let reused = {
                let mut p = pool();
                let addr = p.free[c].pop();
                if addr.is_some() {
                    p.bytes -= cap;
                }
                addr
            };
            if let Some(ptr) = reused.and_then(|a| NonNull::new(a as *mut u8)) {
                return Ok(AlignedBuf { ptr, len, cap });
            }
        }
        let cap = class.map_or(len, |(_, cap)| cap);
        let layout = Self::layout(cap)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Ok(AlignedBuf { ptr, len, cap })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the buffer, for the kernel (or a copy) to fill.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Declares every byte written.
    ///
    /// # Safety
    /// All `len` bytes must have been initialised (by the kernel or a copy).
    pub unsafe fn assume_filled(self) -> Filled {
        Filled(self)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some((c, cap)) = size_class(self.len) {
            let mut p = pool();
            if cap == self.cap && p.bytes + cap <= POOL_BYTES {
                p.free[c].push(self.ptr.as_ptr() as usize);
                p.bytes += cap;
                return;
            }
        }
        if let Ok(layout) = Self::layout(self.cap) {
            // SAFETY: allocated in `new` with this same layout (size `cap`,
            // alignment ALIGN), here or by an earlier owner.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// An aligned buffer every byte of which is initialised.
pub struct Filled(AlignedBuf);

impl Filled {
    /// An aligned copy of `data`.
    pub fn copy_of(data: &[u8]) -> io::Result<Self> {
        let mut buf = AlignedBuf::new(data.len())?;
        // SAFETY: `buf` has room for data.len() bytes and is a fresh
        // allocation, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_mut_ptr(), data.len()) };
        Ok(Filled(buf))
    }

    /// Shares the buffer as `Bytes`; it returns to the pool when the last clone drops.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: a `Filled` is only made once all `len` bytes are written.
        unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr(), self.0.len) }
    }
}

/// An aligned buffer being filled front to back, e.g. by
/// `tokio::io::AsyncReadExt::read_buf`, which writes no byte twice and never
/// zeroes the memory first.
pub struct Filling {
    buf: AlignedBuf,
    filled: usize,
}

impl Filling {
    pub fn new(len: usize) -> io::Result<Self> {
        Ok(Filling {
            buf: AlignedBuf::new(len)?,
            filled: 0,
        })
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.buf.len
    }

    /// The contents, once every byte is filled.
    pub fn into_bytes(self) -> Option<Bytes> {
        // SAFETY: every byte below `filled` was written through `chunk_mut`
        // and declared by `advance_mut`; `filled == len` means all of them.
        self.is_full()
            .then(|| unsafe { self.buf.assume_filled() }.into_bytes())
    }
}

// SAFETY: `chunk_mut` hands out only the unfilled tail, `advance_mut` counts
// what was written into it and never past the end, so bytes below `filled`
// are exactly the initialised ones.
unsafe impl BufMut for Filling {
    fn remaining_mut(&self) -> usize {
        self.buf.len - self.filled
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.remaining_mut(), "advance past the buffer's end");
        self.filled += cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        let rest = self.buf.len - self.filled;
        // SAFETY: `filled <= len <= cap`, so the range lies inside the
        // allocation, which `self` owns mutably for the slice's lifetime.
        unsafe { UninitSlice::from_raw_parts_mut(self.buf.as_mut_ptr().add(self.filled), rest) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_classes() {
        assert_eq!(size_class(1), Some((0, 4096)));
        assert_eq!(size_class(4096), Some((0, 4096)));
        assert_eq!(size_class(4097), Some((1, 8192)));
        assert_eq!(size_class(1 << 20), Some((8, 1 << 20)));
        assert_eq!(size_class(4 << 20), Some((10, 4 << 20)));
        assert_eq!(size_class((4 << 20) + 1), None);
        // Reused or fresh, a buffer is aligned and as large as asked.
        for len in [1, 4096, 5000, 1 << 20, 5 << 20] {
            let mut b = AlignedBuf::new(len).unwrap();
            assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
            assert!(b.cap >= len);
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn filling_gives_exactly_what_was_put() {
        let mut f = Filling::new(10_000).unwrap();
        assert!(Filling::new(4).unwrap().into_bytes().is_none());
        let pattern: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in pattern.chunks(3000) {
            assert!(!f.is_full());
            f.put_slice(chunk);
        }
        let b = f.into_bytes().expect("full");
        assert!(is_aligned(&b));
        assert_eq!(&b[..], &pattern[..]);
        let c = Filled::copy_of(&pattern).unwrap().into_bytes();
        assert!(is_aligned(&c));
        assert_eq!(c, b);
    }

    #[tokio::test]
    async fn fills_from_an_async_reader() {
        use tokio::io::AsyncReadExt;
        let data: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut reader = &data[..];
        let mut f = Filling::new(data.len()).unwrap();
        while !f.is_full() {
            assert!(reader.read_buf(&mut f).await.unwrap() > 0);
        }
        assert_eq!(&f.into_bytes().unwrap()[..], &data[..]);
    }
}
