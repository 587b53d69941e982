//! In-memory [`Export`] and [`ExportRegistry`] with hole tracking, for tests, examples and benchmarks.
//!
//! Allocation is tracked per [`MemExport::BLOCK`]-sized block: writes allocate
//! the blocks they touch, TRIM and WRITE_ZEROES (unless NO_HOLE) punch the
//! blocks they fully cover. It also checks the server's promise that every
//! call is in range, and can inject errors and latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use crate::{BoxFuture, Export, ExportError, ExportListing, ExportRegistry, Extent};

struct Inner {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

/// A RAM-backed export. Cheap to share through `Arc`.
pub struct MemExport {
    size: u64,
    inner: Mutex<Inner>,
    read_only: bool,
    fast_zero: bool,
    /// Each call sleeps `jitter_ms - (offset / 4096 % jitter_ms)` ms when set,
    /// so requests complete out of order.
    jitter_ms: u64,
    fail_next: Mutex<Option<ExportError>>,
    out_of_range_calls: AtomicU64,
    calls: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Decrements the in-flight counter when a call ends, however it ends.
struct InFlight<'a>(&'a MemExport);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemExport {
    /// Granularity of hole tracking.
    pub const BLOCK: u64 = 4096;

    /// A zero-filled, fully unallocated export of `size` bytes.
    pub fn new(size: u64) -> MemExport {
        let blocks = size.div_ceil(Self::BLOCK) as usize;
        MemExport {
            size,
            inner: Mutex::new(Inner {
                data: vec![0; size as usize],
                allocated: vec![false; blocks],
            }),
            read_only: false,
            fast_zero: false,
            jitter_ms: 0,
            fail_next: Mutex::new(None),
            out_of_range_calls: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    pub fn fast_zero(mut self, fz: bool) -> Self {
        self.fast_zero = fz;
        self
    }

    pub fn jitter_ms(mut self, ms: u64) -> Self {
        self.jitter_ms = ms;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Overwrites contents directly (not through NBD), marking blocks
    /// allocated. Panics if the range is outside the export: test helper.
    pub fn fill(&self, offset: u64, bytes: &[u8]) {
        let mut g = self.lock();
        let start = offset as usize;
        g.data[start..start + bytes.len()].copy_from_slice(bytes);
        Self::mark(&mut g, offset, bytes.len() as u64, true);
    }

    /// Makes the next export call fail with `e`.
    pub fn fail_next(&self, e: ExportError) {
        *self.fail_next.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Calls the server made with a range beyond the export (must stay 0).
    pub fn out_of_range_calls(&self) -> u64 {
        self.out_of_range_calls.load(Ordering::SeqCst)
    }

    /// Total export calls.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Most calls that were ever running at the same time.
    pub fn max_concurrent_calls(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Marks blocks of `[offset, offset+len)`: `alloc` marks touched blocks
    /// allocated; otherwise fully covered blocks become holes.
    fn mark(g: &mut Inner, offset: u64, len: u64, alloc: bool) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        if alloc {
            let first = offset / Self::BLOCK;
            let last = (end - 1) / Self::BLOCK;
            for b in first..=last {
                g.allocated[b as usize] = true;
            }
        } else {
            let first = offset.div_ceil(Self::BLOCK);
            // A final partial block counts as covered when the range reaches
            // the end of the export.
            let last_excl = if end == g.data.len() as u64 {
                end.div_ceil(Self::BLOCK)
            } else {
                end / Self::BLOCK
            };
            for b in first..last_excl {
                g.allocated[b as usize] = false;
            }
        }
    }

    /// Common prologue of every call: accounting, range check, injected
    /// failure and latency.
    async fn enter(&self, offset: u64, len: u64) -> Result<InFlight<'_>, ExportError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let guard = InFlight(self);
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            self.out_of_range_calls.fetch_add(1, Ordering::SeqCst);
            return Err(ExportError::Invalid("out of range".into()));
        }
        if self.jitter_ms > 0 {
            let ms = self.jitter_ms - (offset / 4096) % self.jitter_ms;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(e) = self
            .fail_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        Ok(guard)
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        // One shared buffer with no cache: a flush anywhere covers everything.
        true
    }
    fn can_fast_zero(&self) -> bool {
        self.fast_zero
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        Box::pin(async move {
            let _g = self.enter(offset, u64::from(len)).await?;
            let g = self.lock();
            let s = offset as usize;
            Ok(Bytes::copy_from_slice(&g.data[s..s + len as usize]))
        })
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        _fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let _g = self.enter(offset, data.len() as u64).await?;
            if self.read_only {
                return Err(ExportError::ReadOnly);
            }
            let mut g = self.lock();
            let s = offset as usize;
            g.data[s..s + data.len()].copy_from_slice(&data);
            Self::mark(&mut g, offset, data.len() as u64, true);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let _g = self.enter(0, 0).await?;
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u32, _fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let _g = self.enter(offset, u64::from(len)).await?;
            if self.read_only {
                return Err(ExportError::ReadOnly);
            }
            let mut g = self.lock();
            let s = offset as usize;
            g.data[s..s + len as usize].fill(0);
            Self::mark(&mut g, offset, u64::from(len), false);
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let _g = self.enter(offset, u64::from(len)).await?;
            if self.read_only {
                return Err(ExportError::ReadOnly);
            }
            if fast_only && !self.fast_zero {
                return Err(ExportError::NotSupported("zeroing is not fast".into()));
            }
            let mut g = self.lock();
            let s = offset as usize;
            g.data[s..s + len as usize].fill(0);
            Self::mark(&mut g, offset, u64::from(len), !may_trim);
            Ok(())
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        Box::pin(async move {
            let _g = self.enter(offset, u64::from(len)).await?;
            let g = self.lock();
            let end = offset + u64::from(len);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let b = pos / Self::BLOCK;
                let block_end = ((b + 1) * Self::BLOCK).min(end);
                let hole = !g.allocated[b as usize];
                match out.last_mut() {
                    Some(last) if last.hole == hole => last.length += block_end - pos,
                    _ => out.push(Extent {
                        length: block_end - pos,
                        hole,
                        zero: hole,
                    }),
                }
                pos = block_end;
            }
            Ok(out)
        })
    }
}

/// Export and description, by name.
type Entries = BTreeMap<String, (Arc<dyn Export>, String)>;

/// A fixed set of named exports.
#[derive(Default)]
pub struct MemRegistry {
    exports: Mutex<Entries>,
}

impl MemRegistry {
    pub fn new() -> MemRegistry {
        MemRegistry::default()
    }

    /// Adds (or replaces) export `name`.
    pub fn insert(&self, name: &str, description: &str, export: Arc<dyn Export>) {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (export, description.to_string()));
    }

    pub fn remove(&self, name: &str) {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

impl ExportRegistry for MemRegistry {
    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|(e, _)| e.clone())
    }

    fn list(&self) -> Vec<ExportListing> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, (_, description))| ExportListing {
                name: name.clone(),
                description: description.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holes_follow_writes_and_trims() {
        let e = MemExport::new(5 * 4096 + 100);
        e.write(4096, Bytes::from(vec![1u8; 8192]), false)
            .await
            .unwrap();
        e.trim(5000, 4000, false).await.unwrap(); // covers no whole block
        let st = e.block_status(0, 5 * 4096 + 100).await.unwrap();
        let summary: Vec<(u64, bool)> = st.iter().map(|x| (x.length, x.hole)).collect();
        assert_eq!(
            summary,
            vec![(4096, true), (8192, false), (3 * 4096 + 100 - 4096, true)]
        );
        e.trim(4096, 4096, false).await.unwrap();
        let st = e.block_status(0, 3 * 4096).await.unwrap();
        let summary: Vec<(u64, bool)> = st.iter().map(|x| (x.length, x.hole)).collect();
        assert_eq!(summary, vec![(8192, true), (4096, false)]);
        // Trimmed bytes read as zero.
        assert_eq!(e.read(5000, 10).await.unwrap(), Bytes::from(vec![0u8; 10]));
        assert_eq!(e.out_of_range_calls(), 0);
        assert!(e.read(5 * 4096, 101).await.is_err());
        assert_eq!(e.out_of_range_calls(), 1);
    }
}
