//! On-disk replica format: the superblock and the layout of a replica's metadata area.
//!
//! A replica (a file or a device) starts with a metadata area and then the
//! volume's data. The byte layout is documented in `docs/replica-format.md`;
//! this crate is the only code that encodes or decodes it.

mod dirty_map;
mod layout;
mod superblock;

pub use dirty_map::{decode_map_block, encode_map_block, MAP_BITS_PER_BLOCK, MAP_BYTES_PER_BLOCK};
pub use layout::{Layout, DEFAULT_REGION_SIZE, DIRTY_MAP_OFFSET, METADATA_ALIGN, SLOT_SIZE};
pub use superblock::{
    FormatError, MemberState, ReplicaSetEntry, Superblock, COMPAT_KNOWN, FORMAT_VERSION,
    INCOMPAT_KNOWN, MAGIC, MAX_REPLICA_SET, RO_COMPAT_KNOWN,
};
