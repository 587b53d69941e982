//! The write-intent dirty map: which regions may differ between replicas.
//!
//! A region's bit is made durable on the in-sync replicas *before* the first
//! write into it is issued; bits are cleared only when every member of the
//! volume is in sync and idle (see `Volume::maybe_clear_dirty_map`). Callers
//! that find their bits already durable pay one atomic load per region.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use bytes::Bytes;
use ditto_format::{decode_map_block, encode_map_block, Layout, MAP_BYTES_PER_BLOCK};

/// An encoded map block and its index in the map area.
pub type MapBlock = (u64, Bytes);

pub struct DirtyMap {
    layout: Layout,
    /// Bit `r % 8` of byte `r / 8` is region `r`; byte `b` lives in map block `b / MAP_BYTES_PER_BLOCK`.
    durable: Vec<AtomicU8>,
    /// Serialises persisting; a holder persists every bit requested so far (group commit).
    pub(crate) persist: tokio::sync::Mutex<()>,
    requested: Vec<AtomicU8>,
    /// When each region was last written, in 10 ms ticks since the volume
    /// started (wraps after 497 days; only decides when a bit is cleared).
    last_write: Vec<AtomicU32>,
}

impl DirtyMap {
    pub fn new(layout: Layout) -> Self {
        let bytes = layout.regions().div_ceil(8) as usize;
        DirtyMap {
            layout,
            durable: (0..bytes).map(|_| AtomicU8::new(0)).collect(),
            persist: tokio::sync::Mutex::new(()),
            requested: (0..bytes).map(|_| AtomicU8::new(0)).collect(),
            last_write: (0..layout.regions()).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Note a write into `regions` at `now_ms`.
    pub fn touch(&self, regions: Range<u64>, now_ms: u64) {
        let tick = (now_ms / 10) as u32;
        for r in regions {
            if let Some(t) = self.last_write.get(r as usize) {
                t.store(tick, Ordering::Relaxed);
            }
        }
    }

    /// When region `r` was last written (ms since the volume started).
    pub fn last_write_ms(&self, r: u64) -> u64 {
        self.last_write
            .get(r as usize)
            .map_or(0, |t| u64::from(t.load(Ordering::Relaxed)) * 10)
    }

    pub fn region_size(&self) -> u64 {
        u64::from(self.layout.region_size)
    }

    pub fn regions(&self) -> u64 {
        self.layout.regions()
    }

    /// Regions touched by `[offset, offset+len)`.
    pub fn regions_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let rs = self.region_size();
        (offset / rs)..(offset + len).div_ceil(rs)
    }

    /// Byte range of region `r` inside the volume.
    pub fn region_range(&self, r: u64) -> Range<u64> {
        let start = r * self.region_size();
        start..(start + self.region_size()).min(self.layout.volume_size)
    }

    fn bit(v: &[AtomicU8], r: u64) -> bool {
        v.get((r / 8) as usize)
            .is_some_and(|b| b.load(Ordering::SeqCst) & (1 << (r % 8)) != 0)
    }

    pub fn is_dirty(&self, r: u64) -> bool {
        Self::bit(&self.durable, r)
    }

    pub fn all_durable(&self, regions: Range<u64>) -> bool {
        regions.into_iter().all(|r| self.is_dirty(r))
    }

    /// Ask for the bits of `regions`; returns false if persisting is needed.
    pub fn request(&self, regions: Range<u64>) -> bool {
        let mut all = true;
        for r in regions {
            if !self.is_dirty(r) {
                all = false;
                if let Some(b) = self.requested.get((r / 8) as usize) {
                    b.fetch_or(1 << (r % 8), Ordering::SeqCst);
                }
            }
        }
        all
    }

    /// Blocks to write so that every requested bit becomes durable: returns
    /// (first block, encoded blocks) runs, and the bytes they make durable.
    /// Call with `persist` held; then `commit` after the writes succeeded.
    pub fn pending_blocks(&self) -> (Vec<MapBlock>, Vec<(usize, u8)>) {
        let mut newly: Vec<(usize, u8)> = Vec::new();
        for (i, req) in self.requested.iter().enumerate() {
            let want = req.load(Ordering::SeqCst);
            if want & !self.durable[i].load(Ordering::SeqCst) != 0 {
                newly.push((i, want));
            }
        }
        let mut blocks: Vec<u64> = newly
            .iter()
            .map(|(i, _)| (*i / MAP_BYTES_PER_BLOCK) as u64)
            .collect();
        blocks.dedup();
        let runs = blocks
            .into_iter()
            .map(|blk| {
                let start = blk as usize * MAP_BYTES_PER_BLOCK;
                let end = (start + MAP_BYTES_PER_BLOCK).min(self.durable.len());
                let bits: Vec<u8> = (start..end)
                    .map(|i| {
                        let extra = newly.iter().find(|(j, _)| *j == i).map_or(0, |(_, w)| *w);
                        self.durable[i].load(Ordering::SeqCst) | extra
                    })
                    .collect();
                (blk, Bytes::from(encode_map_block(&bits)))
            })
            .collect();
        (runs, newly)
    }

    /// Record bits as durable after their blocks were written.
    pub fn commit(&self, newly: &[(usize, u8)]) {
        for (i, bits) in newly {
            self.durable[*i].fetch_or(*bits, Ordering::SeqCst);
        }
    }

    /// Load from replicas' on-disk maps (OR of all of them).
    pub fn load(&self, map_area: &[u8]) {
        for (blk, chunk) in map_area
            .chunks(ditto_format::SLOT_SIZE as usize)
            .enumerate()
        {
            let bits = decode_map_block(chunk);
            let start = blk * MAP_BYTES_PER_BLOCK;
            for (k, b) in bits.iter().enumerate() {
                if let Some(slot) = self.durable.get(start + k) {
                    slot.fetch_or(*b, Ordering::SeqCst);
                    self.requested[start + k].fetch_or(*b, Ordering::SeqCst);
                }
            }
        }
        // Bits past the last region (a corrupt block reads as all ones) mean nothing.
        self.mask_tail();
    }

    fn mask_tail(&self) {
        let regions = self.regions();
        if !regions.is_multiple_of(8) {
            if let Some(last) = self.durable.last() {
                let keep = (1u8 << (regions % 8)) - 1;
                last.fetch_and(keep, Ordering::SeqCst);
                if let Some(r) = self.requested.last() {
                    r.fetch_and(keep, Ordering::SeqCst);
                }
            }
        }
    }

    /// Set regions dirty in memory only (e.g. a whole volume to rebuild).
    pub fn dirty_regions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, b) in self.durable.iter().enumerate() {
            let v = b.load(Ordering::SeqCst);
            if v != 0 {
                for bit in 0..8 {
                    if v & (1 << bit) != 0 {
                        out.push(i as u64 * 8 + bit);
                    }
                }
            }
        }
        out
    }

    pub fn dirty_count(&self) -> u64 {
        self.durable
            .iter()
            .map(|b| u64::from(b.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// The map blocks holding `regions`, encoded with those bits cleared
    /// (every other durable bit kept). Call with `persist` held and no
    /// writer in those regions, then `clear_regions` after writing them.
    pub fn blocks_without(&self, regions: &[u64]) -> Vec<MapBlock> {
        let mut blocks: Vec<usize> = regions
            .iter()
            .map(|r| (*r / 8) as usize / MAP_BYTES_PER_BLOCK)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        blocks
            .into_iter()
            .map(|blk| {
                let start = blk * MAP_BYTES_PER_BLOCK;
                let end = (start + MAP_BYTES_PER_BLOCK).min(self.durable.len());
                let mut bits: Vec<u8> = self.durable[start..end]
                    .iter()
                    .map(|b| b.load(Ordering::SeqCst))
                    .collect();
                for r in regions {
                    let byte = (*r / 8) as usize;
                    if (start..end).contains(&byte) {
                        bits[byte - start] &= !(1 << (r % 8));
                    }
                }
                (blk as u64, Bytes::from(encode_map_block(&bits)))
            })
            .collect()
    }

    /// Forget `regions` in memory, after `blocks_without` reached the disks.
    pub fn clear_regions(&self, regions: &[u64]) {
        for r in regions {
            let (byte, bit) = ((*r / 8) as usize, 1u8 << (r % 8));
            if let (Some(d), Some(q)) = (self.durable.get(byte), self.requested.get(byte)) {
                d.fetch_and(!bit, Ordering::SeqCst);
                q.fetch_and(!bit, Ordering::SeqCst);
            }
        }
    }

    /// The whole map encoded (to seed a replica that just joined).
    pub fn encoded(&self) -> Bytes {
        let bytes: Vec<u8> = self
            .durable
            .iter()
            .map(|b| b.load(Ordering::SeqCst))
            .collect();
        let mut out = Vec::with_capacity(self.layout.dirty_map_len as usize);
        for blk in 0..self.layout.map_blocks() as usize {
            let start = (blk * MAP_BYTES_PER_BLOCK).min(bytes.len());
            let end = (start + MAP_BYTES_PER_BLOCK).min(bytes.len());
            out.extend_from_slice(&encode_map_block(&bytes[start..end]));
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_commit_load_roundtrip() {
        let layout = Layout::new(100 << 20, 1 << 20).unwrap();
        let m = DirtyMap::new(layout);
        assert_eq!(m.regions_of(0, 0), 0..0);
        assert_eq!(m.regions_of(4096, 1), 0..1);
        assert_eq!(m.regions_of((1 << 20) - 1, 2), 0..2);
        assert!(!m.request(3..5));
        let (blocks, newly) = m.pending_blocks();
        assert_eq!(blocks.len(), 1);
        assert!(!m.all_durable(3..5));
        m.commit(&newly);
        assert!(m.all_durable(3..5));
        assert!(m.request(3..5));
        assert_eq!(m.dirty_regions(), vec![3, 4]);
        let other = DirtyMap::new(layout);
        other.load(&m.encoded());
        assert_eq!(other.dirty_regions(), vec![3, 4]);
        let blocks = m.blocks_without(&[3]);
        assert_eq!(blocks.len(), 1);
        let after = DirtyMap::new(layout);
        after.load(&blocks[0].1);
        assert_eq!(after.dirty_regions(), vec![4], "only region 3 is cleared");
        m.clear_regions(&[3, 4]);
        assert_eq!(m.dirty_count(), 0);
    }

    #[test]
    fn corrupt_block_means_everything_dirty() {
        let layout = Layout::new(20 << 20, 1 << 20).unwrap();
        let m = DirtyMap::new(layout);
        let mut enc = m.encoded().to_vec();
        enc[0] = 1; // breaks the checksum of an otherwise-written block
        enc[4095] ^= 0xff;
        m.load(&enc);
        assert_eq!(m.dirty_count(), 20);
    }
}
