//! Where things live inside a replica: superblock slots, dirty map, data area.

use crate::superblock::FormatError;

/// Each superblock slot is one 4 KiB block so it can be written with direct I/O
/// and never shares a sector with anything else.
pub const SLOT_SIZE: u64 = 4096;
/// The dirty map starts right after the two superblock slots.
pub const DIRTY_MAP_OFFSET: u64 = 2 * SLOT_SIZE;
/// The data area starts on a 1 MiB boundary: aligned for direct I/O on any
/// sector size and for the erase blocks and stripes under it.
pub const METADATA_ALIGN: u64 = 1 << 20;
/// Dirty-map region size: 1 MiB. Small enough that a resync after a crash or a
/// re-add copies little more than what was written (DRBD resyncs 4 MiB
/// activity-log extents, md 64 MiB bitmap chunks); large enough that the map of a
/// 16 TiB volume is 2 MiB and that random writes rarely dirty a new region.
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;

/// The computed layout of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub volume_size: u64,
    pub region_size: u32,
    pub dirty_map_offset: u64,
    /// Bytes reserved for the dirty map (a whole number of 4 KiB blocks).
    pub dirty_map_len: u64,
    pub data_offset: u64,
}

impl Layout {
    /// Layout for a volume of `volume_size` bytes with the given region size.
    pub fn new(volume_size: u64, region_size: u32) -> Result<Self, FormatError> {
        if volume_size == 0 {
            return Err(FormatError::Invalid("volume size is 0".into()));
        }
        if !region_size.is_power_of_two() || region_size < 4096 {
            return Err(FormatError::Invalid(format!(
                "region size {region_size} must be a power of two of at least 4096"
            )));
        }
        let regions = volume_size.div_ceil(u64::from(region_size));
        let dirty_map_len = regions.div_ceil(crate::dirty_map::MAP_BITS_PER_BLOCK) * SLOT_SIZE;
        let data_offset =
            (DIRTY_MAP_OFFSET + dirty_map_len).div_ceil(METADATA_ALIGN) * METADATA_ALIGN;
        Ok(Layout {
            volume_size,
            region_size,
            dirty_map_offset: DIRTY_MAP_OFFSET,
            dirty_map_len,
            data_offset,
        })
    }

    /// Number of dirty-map regions covering the volume.
    pub fn regions(&self) -> u64 {
        self.volume_size.div_ceil(u64::from(self.region_size))
    }

    /// Map block holding region `region`'s bit, and the bit's index inside it.
    pub fn map_position(&self, region: u64) -> (u64, u64) {
        let per = crate::dirty_map::MAP_BITS_PER_BLOCK;
        (region / per, region % per)
    }

    /// Number of 4 KiB blocks in the dirty map.
    pub fn map_blocks(&self) -> u64 {
        self.dirty_map_len / SLOT_SIZE
    }

    /// Total bytes a replica occupies (metadata plus data).
    pub fn replica_len(&self) -> u64 {
        self.data_offset + self.volume_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gib_volume_has_one_mib_metadata() {
        let l = Layout::new(1 << 30, DEFAULT_REGION_SIZE).unwrap();
        assert_eq!(l.regions(), 1024);
        assert_eq!(l.dirty_map_len, 4096);
        assert_eq!(l.data_offset, 1 << 20);
        assert_eq!(l.replica_len(), (1 << 30) + (1 << 20));
    }

    #[test]
    fn large_volume_map_fits_before_data() {
        let size = 16u64 << 40;
        let l = Layout::new(size, 64 * 1024).unwrap();
        assert!(l.dirty_map_offset + l.dirty_map_len <= l.data_offset);
        assert_eq!(l.data_offset % METADATA_ALIGN, 0);
        assert!(l.map_blocks() * crate::dirty_map::MAP_BITS_PER_BLOCK >= l.regions());
    }

    #[test]
    fn bad_region_sizes_are_refused() {
        assert!(Layout::new(1 << 20, 1000).is_err());
        assert!(Layout::new(1 << 20, 2048).is_err());
        assert!(Layout::new(0, 4096).is_err());
    }
}
