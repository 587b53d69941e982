//! The replica superblock: identity, layout and generation, in two checksummed slots.
//!
//! Two slots are written alternately, each with a sequence number, so that a
//! torn write of one slot leaves the other intact: the reader takes the valid
//! slot with the highest sequence number.

use uuid::Uuid;

use crate::layout::{Layout, SLOT_SIZE};

pub const MAGIC: [u8; 8] = *b"DITTOREP";
/// Major format version; a reader refuses any other value.
pub const FORMAT_VERSION: u32 = 1;
/// Features a reader may ignore.
pub const COMPAT_KNOWN: u64 = 0;
/// Features a reader may ignore if it only reads.
pub const RO_COMPAT_KNOWN: u64 = RO_COMPAT_EPOCH;
/// The superblock carries the primary's epoch (bytes 156..164). A writer
/// that does not know it would reset it to 0 and so make the replica look
/// older than it is; a reader may ignore it.
pub const RO_COMPAT_EPOCH: u64 = 1;
/// Features a reader must understand to touch the replica at all.
pub const INCOMPAT_KNOWN: u64 = 0;
/// Most members a replica set can record.
pub const MAX_REPLICA_SET: usize = 32;

const HEADER_LEN: usize = 192;
const ENTRY_LEN: usize = 24;
const CRC_OFFSET: usize = SLOT_SIZE as usize - 4;
const FLAG_CLEAN: u32 = 1;

/// What a replica believed about one member of its replica set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    InSync = 1,
    Failed = 2,
    Rebuilding = 3,
}

impl MemberState {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(MemberState::InSync),
            2 => Some(MemberState::Failed),
            3 => Some(MemberState::Rebuilding),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaSetEntry {
    pub replica: Uuid,
    pub state: MemberState,
    /// Generation at which this member last changed state.
    pub since_generation: u32,
}

/// The decoded superblock of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub compat: u64,
    pub ro_compat: u64,
    pub incompat: u64,
    /// Bumped on every write; picks the newer of the two slots.
    pub sequence: u64,
    pub volume_uuid: Uuid,
    pub replica_uuid: Uuid,
    pub layout: Layout,
    pub generation: u64,
    /// The promote epoch of the primary that wrote this superblock (0 for
    /// replicas never driven across nodes). Orders superblocks before the
    /// generation does: a newer primary's generations supersede an older
    /// one's, even a numerically higher one it made while cut off.
    pub epoch: u64,
    /// True when the volume was closed cleanly (all writes flushed, mirrors equal).
    pub clean: bool,
    pub created_unix: u64,
    pub updated_unix: u64,
    pub replica_set: Vec<ReplicaSetEntry>,
    /// While this replica is being rebuilt: bytes of the volume copied so far
    /// (a rebuild resumes here after a restart). `None` when not rebuilding.
    pub rebuild_cursor: Option<u64>,
}

/// Why a superblock could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no ditto superblock found (bad magic in both slots): this is not a ditto replica, or its first 8 KiB were overwritten; it is refused and left untouched")]
    NotAReplica,
    #[error("both superblock slots are corrupt (checksum mismatch): the replica is refused; rebuild it from a healthy replica with `ditto replica add`")]
    Corrupt,
    #[error("replica format version {0} is not supported by this ditto (it knows version {FORMAT_VERSION}); upgrade ditto to open it")]
    UnsupportedVersion(u32),
    #[error(
        "replica uses incompatible features {0:#x} unknown to this ditto; upgrade ditto to open it"
    )]
    UnknownIncompatFeatures(u64),
    #[error("replica belongs to volume {found}, not {expected}; check the replica path")]
    WrongVolume { expected: Uuid, found: Uuid },
    #[error("invalid superblock: {0}")]
    Invalid(String),
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn get_uuid(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(a)
}

impl Superblock {
    /// Which of two superblocks of one volume is newer: epoch first, then generation.
    pub fn order_key(&self) -> (u64, u64) {
        (self.epoch, self.generation)
    }

    /// A fresh superblock for a new replica (sequence 0, generation 1, clean).
    pub fn new(volume_uuid: Uuid, replica_uuid: Uuid, layout: Layout, now_unix: u64) -> Self {
        Superblock {
            compat: 0,
            ro_compat: 0,
            incompat: 0,
            sequence: 0,
            volume_uuid,
            replica_uuid,
            layout,
            generation: 1,
            epoch: 0,
            clean: true,
            created_unix: now_unix,
            updated_unix: now_unix,
            replica_set: Vec::new(),
            rebuild_cursor: None,
        }
    }

    /// Which slot (0 or 1) the next write goes to: never the one holding the
    /// current copy, so a torn write leaves it intact.
    pub fn next_slot(&self) -> u64 {
        (self.sequence + 1) % 2
    }

    /// Encode into one slot of exactly `SLOT_SIZE` bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.replica_set.len() > MAX_REPLICA_SET {
            return Err(FormatError::Invalid(format!(
                "replica set has {} members, at most {MAX_REPLICA_SET} fit",
                self.replica_set.len()
            )));
        }
        let mut b = vec![0u8; SLOT_SIZE as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.compat.to_le_bytes());
        let ro_compat = if self.epoch != 0 {
            self.ro_compat | RO_COMPAT_EPOCH
        } else {
            self.ro_compat & !RO_COMPAT_EPOCH
        };
        b[24..32].copy_from_slice(&ro_compat.to_le_bytes());
        b[32..40].copy_from_slice(&self.incompat.to_le_bytes());
        b[40..48].copy_from_slice(&self.sequence.to_le_bytes());
        b[48..64].copy_from_slice(self.volume_uuid.as_bytes());
        b[64..80].copy_from_slice(self.replica_uuid.as_bytes());
        b[80..88].copy_from_slice(&self.layout.volume_size.to_le_bytes());
        b[88..96].copy_from_slice(&self.layout.data_offset.to_le_bytes());
        b[96..104].copy_from_slice(&self.layout.dirty_map_offset.to_le_bytes());
        b[104..112].copy_from_slice(&self.layout.dirty_map_len.to_le_bytes());
        b[112..116].copy_from_slice(&self.layout.region_size.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[116..120].copy_from_slice(&flags.to_le_bytes());
        b[120..128].copy_from_slice(&self.generation.to_le_bytes());
        b[128..136].copy_from_slice(&self.created_unix.to_le_bytes());
        b[136..144].copy_from_slice(&self.updated_unix.to_le_bytes());
        b[144..148].copy_from_slice(&(self.replica_set.len() as u32).to_le_bytes());
        b[148..156].copy_from_slice(&self.rebuild_cursor.unwrap_or(u64::MAX).to_le_bytes());
        b[156..164].copy_from_slice(&self.epoch.to_le_bytes());
        for (i, e) in self.replica_set.iter().enumerate() {
            let at = HEADER_LEN + i * ENTRY_LEN;
            b[at..at + 16].copy_from_slice(e.replica.as_bytes());
            b[at + 16..at + 20].copy_from_slice(&(e.state as u32).to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&e.since_generation.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decode one slot. Checks magic, checksum, version, features and layout.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < SLOT_SIZE as usize {
            return Err(FormatError::Invalid(format!(
                "superblock slot is {} bytes, expected {SLOT_SIZE}",
                b.len()
            )));
        }
        if b[0..8] != MAGIC {
            return Err(FormatError::NotAReplica);
        }
        let crc = get_u32(b, CRC_OFFSET);
        if crc != crc32c::crc32c(&b[..CRC_OFFSET]) {
            return Err(FormatError::Corrupt);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let incompat = get_u64(b, 32);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(FormatError::UnknownIncompatFeatures(
                incompat & !INCOMPAT_KNOWN,
            ));
        }
        let volume_size = get_u64(b, 80);
        let region_size = get_u32(b, 112);
        let layout = Layout::new(volume_size, region_size)?;
        let stored = Layout {
            volume_size,
            region_size,
            dirty_map_offset: get_u64(b, 96),
            dirty_map_len: get_u64(b, 104),
            data_offset: get_u64(b, 88),
        };
        // A layout this version would not compute is refused rather than guessed at.
        if stored != layout {
            return Err(FormatError::Invalid(format!(
                "stored layout {stored:?} does not match the computed one {layout:?}"
            )));
        }
        let count = get_u32(b, 144) as usize;
        if count > MAX_REPLICA_SET {
            return Err(FormatError::Invalid(format!(
                "replica set count {count} exceeds {MAX_REPLICA_SET}"
            )));
        }
        let mut replica_set = Vec::with_capacity(count);
        for i in 0..count {
            let at = HEADER_LEN + i * ENTRY_LEN;
            let state_raw = get_u32(b, at + 16);
            let state = MemberState::from_u32(state_raw)
                .ok_or_else(|| FormatError::Invalid(format!("unknown member state {state_raw}")))?;
            replica_set.push(ReplicaSetEntry {
                replica: get_uuid(b, at),
                state,
                since_generation: get_u32(b, at + 20),
            });
        }
        Ok(Superblock {
            compat: get_u64(b, 16),
            ro_compat: get_u64(b, 24),
            incompat,
            sequence: get_u64(b, 40),
            volume_uuid: get_uuid(b, 48),
            replica_uuid: get_uuid(b, 64),
            layout,
            generation: get_u64(b, 120),
            epoch: if get_u64(b, 24) & RO_COMPAT_EPOCH != 0 {
                get_u64(b, 156)
            } else {
                0
            },
            clean: get_u32(b, 116) & FLAG_CLEAN != 0,
            created_unix: get_u64(b, 128),
            updated_unix: get_u64(b, 136),
            replica_set,
            rebuild_cursor: Some(get_u64(b, 148)).filter(|&c| c != u64::MAX),
        })
    }

    /// Pick the current superblock from the two slots (`both` = the first
    /// `2 * SLOT_SIZE` bytes of the replica). One valid slot is enough; a slot
    /// with an unsupported version or features makes the whole replica refused,
    /// since it may be the newer one.
    pub fn decode_slots(both: &[u8]) -> Result<Self, FormatError> {
        let s = SLOT_SIZE as usize;
        if both.len() < 2 * s {
            return Err(FormatError::NotAReplica);
        }
        let a = Self::decode(&both[..s]);
        let b = Self::decode(&both[s..2 * s]);
        for r in [&a, &b] {
            if let Err(
                e @ (FormatError::UnsupportedVersion(_) | FormatError::UnknownIncompatFeatures(_)),
            ) = r
            {
                return Err(e.clone());
            }
        }
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(FormatError::NotAReplica), Err(FormatError::NotAReplica)) => {
                Err(FormatError::NotAReplica)
            }
            (Err(ea), Err(eb)) => Err(match (ea, eb) {
                (FormatError::Invalid(m), _) | (_, FormatError::Invalid(m)) => {
                    FormatError::Invalid(m)
                }
                _ => FormatError::Corrupt,
            }),
        }
    }

    /// Check that this replica belongs to the expected volume.
    pub fn check_volume(&self, expected: Uuid) -> Result<(), FormatError> {
        if self.volume_uuid != expected {
            return Err(FormatError::WrongVolume {
                expected,
                found: self.volume_uuid,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_round_trips_and_is_zero_in_older_superblocks() {
        let mut sb = Superblock::new(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Layout::new(1 << 30, 1 << 20).unwrap(),
            7,
        );
        sb.epoch = 5;
        let enc = sb.encode().unwrap();
        let back = Superblock::decode(&enc).unwrap();
        assert_eq!(back.epoch, 5);
        assert_ne!(back.ro_compat & RO_COMPAT_EPOCH, 0);
        sb.epoch = 0;
        let old = sb.encode().unwrap();
        assert_eq!(
            &old[156..164],
            &[0u8; 8],
            "no epoch written before epochs existed"
        );
        let back = Superblock::decode(&old).unwrap();
        assert_eq!((back.epoch, back.ro_compat), (0, 0));
        assert!(back.order_key() < (1, 0));
    }
    use crate::layout::DEFAULT_REGION_SIZE;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        let layout = Layout::new(1 << 30, DEFAULT_REGION_SIZE).unwrap();
        let mut sb = Superblock::new(Uuid::new_v4(), Uuid::new_v4(), layout, 1_700_000_000);
        sb.replica_set = vec![
            ReplicaSetEntry {
                replica: sb.replica_uuid,
                state: MemberState::InSync,
                since_generation: 1,
            },
            ReplicaSetEntry {
                replica: Uuid::new_v4(),
                state: MemberState::Failed,
                since_generation: 2,
            },
        ];
        sb.generation = 7;
        sb.sequence = 3;
        sb.clean = false;
        sb.rebuild_cursor = Some(12 << 20);
        sb
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        let enc = sb.encode().unwrap();
        assert_eq!(enc.len(), SLOT_SIZE as usize);
        assert_eq!(Superblock::decode(&enc).unwrap(), sb);
    }

    #[test]
    fn newer_slot_wins_and_torn_slot_is_ignored() {
        let mut sb = sample();
        let old = sb.encode().unwrap();
        sb.sequence += 1;
        sb.generation += 1;
        let new = sb.encode().unwrap();
        let mut both = [old.clone(), new.clone()].concat();
        assert_eq!(
            Superblock::decode_slots(&both).unwrap().generation,
            sb.generation
        );
        // Tear the newer slot: the older one is used.
        both[SLOT_SIZE as usize + 100] ^= 0xff;
        assert_eq!(
            Superblock::decode_slots(&both).unwrap().generation,
            sb.generation - 1
        );
    }

    #[test]
    fn garbage_is_not_a_replica() {
        let zeros = vec![0u8; 2 * SLOT_SIZE as usize];
        assert_eq!(
            Superblock::decode_slots(&zeros),
            Err(FormatError::NotAReplica)
        );
    }

    #[test]
    fn both_slots_corrupt_is_refused() {
        let mut enc = sample().encode().unwrap();
        enc[50] ^= 1;
        let both = [enc.clone(), enc].concat();
        assert_eq!(Superblock::decode_slots(&both), Err(FormatError::Corrupt));
    }

    #[test]
    fn unknown_version_and_features_are_refused() {
        let mut enc = sample().encode().unwrap();
        enc[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&enc[..CRC_OFFSET]);
        enc[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        let good = sample().encode().unwrap();
        let both = [good.clone(), enc].concat();
        assert_eq!(
            Superblock::decode_slots(&both),
            Err(FormatError::UnsupportedVersion(2))
        );

        let mut sb = sample();
        sb.incompat = 1 << 40;
        let enc = sb.encode().unwrap();
        assert!(matches!(
            Superblock::decode(&enc),
            Err(FormatError::UnknownIncompatFeatures(_))
        ));
    }

    #[test]
    fn wrong_volume_is_refused() {
        let sb = sample();
        assert!(sb.check_volume(sb.volume_uuid).is_ok());
        assert!(matches!(
            sb.check_volume(Uuid::new_v4()),
            Err(FormatError::WrongVolume { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let _ = Superblock::decode_slots(&bytes);
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(byte in 0usize..4096, bit in 0u8..8) {
            let mut enc = sample().encode().unwrap();
            enc[byte] ^= 1 << bit;
            prop_assert!(Superblock::decode(&enc).is_err());
        }
    }
}
