//! On-disk dirty map blocks: 4 KiB, each holding region bits and a checksum.
//!
//! A block that fails its checksum is read as "every region dirty": a damaged
//! map can only cause extra resync, never a skipped one.

use crate::layout::SLOT_SIZE;

/// Bytes of bits in one map block (the last 4 bytes are the CRC32C).
pub const MAP_BYTES_PER_BLOCK: usize = SLOT_SIZE as usize - 4;
/// Regions covered by one map block.
pub const MAP_BITS_PER_BLOCK: u64 = (MAP_BYTES_PER_BLOCK * 8) as u64;

/// Encode one block from its bit bytes (`bits.len() <= MAP_BYTES_PER_BLOCK`).
pub fn encode_map_block(bits: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_SIZE as usize];
    let n = bits.len().min(MAP_BYTES_PER_BLOCK);
    b[..n].copy_from_slice(&bits[..n]);
    let crc = crc32c::crc32c(&b[..MAP_BYTES_PER_BLOCK]);
    b[MAP_BYTES_PER_BLOCK..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decode one block into its bit bytes. An all-zero block (never written, as
/// in a fresh sparse replica) is an empty map; a block whose checksum fails
/// decodes as all ones.
pub fn decode_map_block(block: &[u8]) -> Vec<u8> {
    if block.len() < SLOT_SIZE as usize {
        return vec![0xff; MAP_BYTES_PER_BLOCK];
    }
    if block.iter().all(|&b| b == 0) {
        return vec![0; MAP_BYTES_PER_BLOCK];
    }
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&block[MAP_BYTES_PER_BLOCK..SLOT_SIZE as usize]);
    if u32::from_le_bytes(stored) != crc32c::crc32c(&block[..MAP_BYTES_PER_BLOCK]) {
        return vec![0xff; MAP_BYTES_PER_BLOCK];
    }
    block[..MAP_BYTES_PER_BLOCK].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_zero_and_corrupt() {
        let mut bits = vec![0u8; MAP_BYTES_PER_BLOCK];
        bits[0] = 0b1010;
        bits[4091] = 0x80;
        let block = encode_map_block(&bits);
        assert_eq!(decode_map_block(&block), bits);
        assert!(decode_map_block(&[0u8; 4096]).iter().all(|&b| b == 0));
        let mut bad = block.clone();
        bad[10] ^= 1;
        assert!(decode_map_block(&bad).iter().all(|&b| b == 0xff));
        // A cleared map is written with its checksum, not as zeroes, and still decodes empty.
        assert!(decode_map_block(&encode_map_block(&[]))
            .iter()
            .all(|&b| b == 0));
    }
}
