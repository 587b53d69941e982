//! The peer protocol's frames: one fixed 56-byte header (versioned and
//! checksummed) and a bounded, checksummed payload. Byte layout:
//! `docs/peer-protocol.md`. Parsing never trusts a length before the header
//! checksum has passed, and never allocates more than the negotiated bound.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DTPF";
/// The frame format and protocol version this build speaks.
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 56;
/// Largest payload accepted, and largest read requested: bounds the memory
/// one frame can make a peer allocate.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Feature bits this build knows (none yet: every v1 peer is the same).
/// Feature bit: the replica answers [`Kind::Digest`] (resync checksums).
pub const FEATURE_DIGEST: u64 = 1 << 0;
/// Feature bit: the node can be a volume's diskless tiebreaker
/// ([`Kind::Witness`], the tiebreaker in [`PrimaryClaim`], a
/// [`encode_vote_record`] in a claim's Ok reply).
pub const FEATURE_WITNESS: u64 = 1 << 1;
pub const KNOWN_FEATURES: u64 = FEATURE_DIGEST | FEATURE_WITNESS;
/// Longest node name in a hello.
pub const MAX_NAME: usize = 255;

/// Frame kinds. Requests go from the primary to the replica's node; the
/// node answers each with one [`Kind::Reply`] carrying the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Read = 3,
    Write = 4,
    Flush = 5,
    Discard = 6,
    WriteZeroes = 7,
    Allocation = 8,
    ReadDirtyMap = 9,
    WriteDirtyMap = 10,
    WriteSuperblock = 11,
    Reply = 12,
    /// The sender closes the connection; the payload says why.
    Goodbye = 13,
    /// On a control session (hello for the nil replica): create a replica
    /// in one of the node's pools ([`CreateReplica`]).
    CreateReplica = 14,
    /// On a control session: delete a replica this node holds for the
    /// sender (payload: volume uuid, replica uuid).
    DeleteReplica = 15,
    /// On a control session: answered at once with an empty Ok reply (round
    /// trip time, liveness).
    Ping = 16,
    /// On a control session: the sender (a node holding an in-sync replica)
    /// takes the volume over; the receiver stops being its primary and holds
    /// its replicas for the sender. Payload: volume uuid. Reply: the
    /// volume's replicas ([`encode_members`]).
    Demote = 17,
    /// On a control session: the sender is the primary of a volume at an
    /// epoch, with these replicas ([`PrimaryClaim`]). A node holding replicas
    /// of it follows the claim when its epoch is newer (a forced promote
    /// took the volume over) or when it comes from the primary it follows;
    /// otherwise it answers [`Status::Superseded`].
    Primary = 18,
    /// On a control session: the node's pools that can hold a replica for
    /// another node, with their room ([`encode_pools`]); for `--nodes`.
    ListPools = 19,
    /// On a control session: the sender, the volume's primary, asks the
    /// receiver (which holds an in-sync replica) to take it over now, by a
    /// planned promote (the receiver sends Demote back). Payload: volume
    /// uuid, nil uuid (as DeleteReplica). For `volume demote --to`.
    TakeOver = 20,
    /// With [`FEATURE_DIGEST`]: the SHA-256 of the replica's `arg` bytes at
    /// `offset` (a 32-byte reply), so a resync can skip a region the target
    /// holds already without sending it (DRBD's csums-alg).
    Digest = 21,
    /// With [`FEATURE_WITNESS`], on a control session: the receiver is the
    /// volume's diskless tiebreaker. `arg` is a [`WitnessOp`]; payload a
    /// [`WitnessRequest`]. Reply Ok, [`Status::Superseded`] (the witness
    /// follows another primary), or Invalid.
    Witness = 22,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloOk,
            3 => Read,
            4 => Write,
            5 => Flush,
            6 => Discard,
            7 => WriteZeroes,
            8 => Allocation,
            9 => ReadDirtyMap,
            10 => WriteDirtyMap,
            11 => WriteSuperblock,
            12 => Reply,
            13 => Goodbye,
            14 => CreateReplica,
            15 => DeleteReplica,
            16 => Ping,
            17 => Demote,
            18 => Primary,
            19 => ListPools,
            20 => TakeOver,
            21 => Digest,
            22 => Witness,
            _ => return None,
        })
    }
}

/// Status of a [`Kind::Reply`] (its `arg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    Ok = 0,
    /// The replica's disk failed the operation (EIO).
    Io = 1,
    NoSpace = 2,
    Unsupported = 3,
    /// The request's generation is older than the replica's: another primary
    /// took over. Never retried.
    Fenced = 4,
    /// The request is malformed or out of range.
    Invalid = 5,
    /// The replica's disk did not answer in time.
    Timeout = 6,
    /// The hello named a replica this node does not serve.
    UnknownReplica = 7,
    /// The hello asked for a version or feature this node does not speak.
    Version = 8,
    /// The peer's certificate does not prove the node name it claims, or
    /// that node is unknown here.
    Unauthorized = 9,
    /// Another node is the volume's primary at a newer or equal epoch; the
    /// payload is a [`Superseded`]. The sender must stop acting as primary.
    Superseded = 10,
}

impl Status {
    pub fn from_u64(v: u64) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => Io,
            2 => NoSpace,
            3 => Unsupported,
            4 => Fenced,
            5 => Invalid,
            6 => Timeout,
            7 => UnknownReplica,
            8 => Version,
            9 => Unauthorized,
            10 => Superseded,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a ditto peer (bad magic {0:02x?}); is the address a peer port (default 10811) of a ditto daemon?")]
    Magic([u8; 4]),
    #[error("peer speaks frame version {got}, this node speaks {ours}; upgrade the older daemon")]
    Version { got: u16, ours: u16 },
    #[error("corrupt frame header (checksum {got:#010x}, computed {computed:#010x}); the link or the peer is damaging data")]
    HeaderChecksum { got: u32, computed: u32 },
    #[error("corrupt frame payload (checksum {got:#010x}, computed {computed:#010x}); the link or the peer is damaging data")]
    PayloadChecksum { got: u32, computed: u32 },
    #[error("unknown frame kind {0}; the peer runs a newer protocol than it negotiated")]
    UnknownKind(u16),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

/// One frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    /// Per-kind flags (none defined in version 1; must be 0).
    pub flags: u32,
    pub id: u64,
    pub offset: u64,
    /// Length for ranged requests, status for replies.
    pub arg: u64,
    /// The sender's generation, for fencing (requests) or the replica's
    /// (replies).
    pub generation: u64,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, id: u64) -> Frame {
        Frame {
            kind,
            flags: 0,
            id,
            offset: 0,
            arg: 0,
            generation: 0,
            payload: Bytes::new(),
        }
    }

    pub fn reply(id: u64, generation: u64, status: Status, payload: Bytes) -> Frame {
        Frame {
            arg: status as u64,
            generation,
            payload,
            ..Frame::new(Kind::Reply, id)
        }
    }

    pub fn encode_header(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        let len = self.payload.len() as u64;
        if len > u64::from(MAX_PAYLOAD) {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.flags.to_le_bytes());
        h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.id.to_le_bytes());
        h[24..32].copy_from_slice(&self.offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.arg.to_le_bytes());
        h[40..48].copy_from_slice(&self.generation.to_le_bytes());
        h[48..52].copy_from_slice(&crc32c::crc32c(&self.payload).to_le_bytes());
        let crc = crc32c::crc32c(&h[..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        Ok(h)
    }

    /// Header and payload, as sent.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.encode_header()?);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Decode one whole frame from `b` (header then exactly its payload).
    pub fn decode(b: &[u8], max_payload: u32) -> Result<Frame, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Malformed {
                what: "frame",
                why: format!(
                    "{} bytes, shorter than the {HEADER_LEN}-byte header",
                    b.len()
                ),
            });
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&b[..HEADER_LEN]);
        let head = Header::decode(&h, max_payload)?;
        let payload = &b[HEADER_LEN..];
        if payload.len() as u64 != u64::from(head.payload_len) {
            return Err(FrameError::Malformed {
                what: "frame",
                why: format!(
                    "{} payload bytes, the header says {}",
                    payload.len(),
                    head.payload_len
                ),
            });
        }
        head.finish(Bytes::copy_from_slice(payload))
    }

    /// Read one frame; `max_payload` bounds what it may allocate.
    pub async fn read_from<R: AsyncRead + Unpin>(
        r: &mut R,
        max_payload: u32,
    ) -> Result<Frame, FrameError> {
        Self::read_head(r, max_payload).await?.read_payload(r).await
    }

    /// Read and check a header only, so the caller can reserve memory for
    /// the payload (or the read it asks for) before anything is allocated.
    pub async fn read_head<R: AsyncRead + Unpin>(
        r: &mut R,
        max_payload: u32,
    ) -> Result<FrameHead, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h).await?;
        Ok(FrameHead(Header::decode(&h, max_payload)?))
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), FrameError> {
        w.write_all(&self.encode_header()?).await?;
        if !self.payload.is_empty() {
            w.write_all(&self.payload).await?;
        }
        Ok(())
    }
}

/// A frame header whose checksum and bounds passed, awaiting its payload.
pub struct FrameHead(Header);

impl FrameHead {
    pub fn kind(&self) -> Kind {
        self.0.kind
    }
    pub fn payload_len(&self) -> u32 {
        self.0.payload_len
    }
    /// Length for ranged requests.
    pub fn arg(&self) -> u64 {
        self.0.arg
    }
    /// Read the payload (exactly `payload_len` bytes) and check its checksum.
    pub async fn read_payload<R: AsyncRead + Unpin>(self, r: &mut R) -> Result<Frame, FrameError> {
        let mut payload = BytesMut::zeroed(self.0.payload_len as usize);
        r.read_exact(&mut payload).await?;
        self.0.finish(payload.freeze())
    }
}

struct Header {
    kind: Kind,
    flags: u32,
    payload_len: u32,
    id: u64,
    offset: u64,
    arg: u64,
    generation: u64,
    payload_crc: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    fn decode(h: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, FrameError> {
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = u16_at(h, 4);
        if version != VERSION {
            return Err(FrameError::Version {
                got: version,
                ours: VERSION,
            });
        }
        let got = u32_at(h, 52);
        let computed = crc32c::crc32c(&h[..52]);
        if got != computed {
            return Err(FrameError::HeaderChecksum { got, computed });
        }
        let kind_raw = u16_at(h, 6);
        let kind = Kind::from_u16(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
        let flags = u32_at(h, 8);
        if flags != 0 {
            return Err(FrameError::Malformed {
                what: "frame header",
                why: format!("flags {flags:#x} set; version 1 defines none"),
            });
        }
        let payload_len = u32_at(h, 12);
        if payload_len > max_payload.min(MAX_PAYLOAD) {
            return Err(FrameError::TooLarge {
                len: u64::from(payload_len),
                max: max_payload.min(MAX_PAYLOAD),
            });
        }
        Ok(Header {
            kind,
            flags,
            payload_len,
            id: u64_at(h, 16),
            offset: u64_at(h, 24),
            arg: u64_at(h, 32),
            generation: u64_at(h, 40),
            payload_crc: u32_at(h, 48),
        })
    }

    fn finish(self, payload: Bytes) -> Result<Frame, FrameError> {
        let computed = crc32c::crc32c(&payload);
        if computed != self.payload_crc {
            return Err(FrameError::PayloadChecksum {
                got: self.payload_crc,
                computed,
            });
        }
        Ok(Frame {
            kind: self.kind,
            flags: self.flags,
            id: self.id,
            offset: self.offset,
            arg: self.arg,
            generation: self.generation,
            payload,
        })
    }
}

/// The primary's first frame: who it is and which replica it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub features: u64,
    pub required_features: u64,
    pub volume: Uuid,
    pub replica: Uuid,
    /// The connecting node's name (for logs and, later, authorisation).
    pub node: String,
}

pub const HELLO_FIXED: usize = 58;

impl Hello {
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        if self.node.len() > MAX_NAME {
            return Err(FrameError::Malformed {
                what: "hello",
                why: format!(
                    "node name of {} bytes (at most {MAX_NAME})",
                    self.node.len()
                ),
            });
        }
        let mut b = Vec::with_capacity(HELLO_FIXED + self.node.len());
        b.extend_from_slice(&self.min_version.to_le_bytes());
        b.extend_from_slice(&self.max_version.to_le_bytes());
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&self.required_features.to_le_bytes());
        b.extend_from_slice(self.volume.as_bytes());
        b.extend_from_slice(self.replica.as_bytes());
        b.extend_from_slice(&(self.node.len() as u16).to_le_bytes());
        b.extend_from_slice(self.node.as_bytes());
        Ok(Bytes::from(b))
    }

    pub fn decode(b: &[u8]) -> Result<Hello, FrameError> {
        let bad = |why: String| FrameError::Malformed { what: "hello", why };
        if b.len() < HELLO_FIXED {
            return Err(bad(format!(
                "{} bytes, at least {HELLO_FIXED} expected",
                b.len()
            )));
        }
        let name_len = u16_at(b, 56) as usize;
        if name_len > MAX_NAME || b.len() != HELLO_FIXED + name_len {
            return Err(bad(format!(
                "node name of {name_len} bytes in a {}-byte hello",
                b.len()
            )));
        }
        let node = std::str::from_utf8(&b[HELLO_FIXED..])
            .map_err(|_| bad("node name is not UTF-8".into()))?
            .to_string();
        let uuid_at = |at: usize| {
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[at..at + 16]);
            Uuid::from_bytes(u)
        };
        Ok(Hello {
            min_version: u16_at(b, 0),
            max_version: u16_at(b, 2),
            features: u64_at(b, 8),
            required_features: u64_at(b, 16),
            volume: uuid_at(24),
            replica: uuid_at(40),
            node,
        })
    }
}

/// The replica node's answer to a hello: the agreed version and features,
/// and the replica's superblock (one encoded 4 KiB slot, own checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u16,
    pub features: u64,
    pub superblock: Bytes,
}

impl HelloOk {
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::with_capacity(16 + self.superblock.len());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&[0u8; 6]);
        b.extend_from_slice(&self.features.to_le_bytes());
        b.extend_from_slice(&self.superblock);
        Bytes::from(b)
    }

    pub fn decode(b: &Bytes) -> Result<HelloOk, FrameError> {
        if b.len() < 16 {
            return Err(FrameError::Malformed {
                what: "hello reply",
                why: format!("{} bytes, at least 16 expected", b.len()),
            });
        }
        Ok(HelloOk {
            version: u16_at(b, 0),
            features: u64_at(b, 8),
            superblock: b.slice(16..),
        })
    }
}

/// Payload of [`Kind::CreateReplica`]: which replica of which volume, its
/// size and region size, the pool on the receiving node, and the volume's
/// name (for the file name and status there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateReplica {
    pub volume: Uuid,
    pub replica: Uuid,
    pub size: u64,
    pub region_size: u32,
    pub pool: String,
    pub volume_name: String,
}

impl CreateReplica {
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        for (what, s) in [("pool", &self.pool), ("volume name", &self.volume_name)] {
            if s.len() > MAX_NAME {
                return Err(FrameError::Malformed {
                    what: "create replica",
                    why: format!("{what} of {} bytes (at most {MAX_NAME})", s.len()),
                });
            }
        }
        let mut b = Vec::with_capacity(48 + self.pool.len() + self.volume_name.len());
        b.extend_from_slice(self.volume.as_bytes());
        b.extend_from_slice(self.replica.as_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.region_size.to_le_bytes());
        b.extend_from_slice(&(self.pool.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.volume_name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.pool.as_bytes());
        b.extend_from_slice(self.volume_name.as_bytes());
        Ok(Bytes::from(b))
    }

    pub fn decode(b: &[u8]) -> Result<CreateReplica, FrameError> {
        let bad = |why: String| FrameError::Malformed {
            what: "create replica",
            why,
        };
        if b.len() < 48 {
            return Err(bad(format!("{} bytes, at least 48 expected", b.len())));
        }
        let (pool_len, name_len) = (u16_at(b, 44) as usize, u16_at(b, 46) as usize);
        if pool_len > MAX_NAME || name_len > MAX_NAME || b.len() != 48 + pool_len + name_len {
            return Err(bad(format!(
                "names of {pool_len} and {name_len} bytes in a {}-byte request",
                b.len()
            )));
        }
        let text = |r: std::ops::Range<usize>| {
            std::str::from_utf8(&b[r])
                .map(str::to_string)
                .map_err(|_| bad("a name is not UTF-8".into()))
        };
        let uuid_at = |at: usize| {
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[at..at + 16]);
            Uuid::from_bytes(u)
        };
        Ok(CreateReplica {
            volume: uuid_at(0),
            replica: uuid_at(16),
            size: u64_at(b, 32),
            region_size: u32_at(b, 40),
            pool: text(48..48 + pool_len)?,
            volume_name: text(48 + pool_len..48 + pool_len + name_len)?,
        })
    }
}

/// Payload of [`Kind::DeleteReplica`]: volume uuid then replica uuid.
pub fn encode_replica_ref(volume: Uuid, replica: Uuid) -> Bytes {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(volume.as_bytes());
    b.extend_from_slice(replica.as_bytes());
    Bytes::from(b)
}

pub fn decode_replica_ref(b: &[u8]) -> Result<(Uuid, Uuid), FrameError> {
    if b.len() != 32 {
        return Err(FrameError::Malformed {
            what: "replica reference",
            why: format!("{} bytes, 32 expected", b.len()),
        });
    }
    let mut v = [0u8; 16];
    let mut r = [0u8; 16];
    v.copy_from_slice(&b[..16]);
    r.copy_from_slice(&b[16..]);
    Ok((Uuid::from_bytes(v), Uuid::from_bytes(r)))
}

/// A volume's replica as a demote reply lists it: which node holds it, in
/// which of its pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    pub replica: Uuid,
    pub node: String,
    pub pool: String,
}

/// count u16, then per member: uuid (16), node length u16, node, pool length u16, pool.
pub fn encode_members(members: &[MemberRef]) -> Bytes {
    let mut b = Vec::new();
    b.extend_from_slice(&(members.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for m in members.iter().take(u16::MAX as usize) {
        b.extend_from_slice(m.replica.as_bytes());
        put_name(&mut b, &m.node);
        put_name(&mut b, &m.pool);
    }
    Bytes::from(b)
}

pub fn decode_members(b: &[u8]) -> Result<Vec<MemberRef>, FrameError> {
    let (members, used) = decode_members_prefix(b)?;
    if used != b.len() {
        return Err(FrameError::Malformed {
            what: "member list",
            why: "trailing bytes".into(),
        });
    }
    Ok(members)
}

/// A member list at the start of `b`, and the bytes it took.
fn decode_members_prefix(b: &[u8]) -> Result<(Vec<MemberRef>, usize), FrameError> {
    let bad = |why: &str| FrameError::Malformed {
        what: "member list",
        why: why.into(),
    };
    if b.len() < 2 {
        return Err(bad("shorter than its count"));
    }
    let count = u16_at(b, 0) as usize;
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..count {
        if b.len() < at + 16 {
            return Err(bad("truncated"));
        }
        let mut u = [0u8; 16];
        u.copy_from_slice(&b[at..at + 16]);
        at += 16;
        let (node, used) = take_name(&b[at..], "member list")?;
        at += used;
        let (pool, used) = take_name(&b[at..], "member list")?;
        at += used;
        out.push(MemberRef {
            replica: Uuid::from_bytes(u),
            node,
            pool,
        });
    }
    Ok((out, at))
}

/// Flag in a [`Kind::Demote`] request's `arg`: the sender keeps its own
/// data (the operator resolved a split brain in its favour); the receiver
/// hands over although the sender's replica is not in sync, and its own
/// replicas are rebuilt from the sender's.
pub const DEMOTE_DISCARD: u64 = 1;

/// Payload of [`Kind::Primary`]: volume uuid (16), epoch u64, the member
/// list as [`encode_members`] writes it, then (with [`FEATURE_WITNESS`],
/// only when the volume has one) the tiebreaker's node name: length u16,
/// name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryClaim {
    pub volume: Uuid,
    /// Bumped by every promote; the newest epoch's primary is the only one
    /// a replica serves.
    pub epoch: u64,
    pub members: Vec<MemberRef>,
    /// The node that votes in the volume's quorum without data.
    pub tiebreaker: Option<String>,
}

impl PrimaryClaim {
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::new();
        b.extend_from_slice(self.volume.as_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&encode_members(&self.members));
        if let Some(t) = &self.tiebreaker {
            put_name(&mut b, t);
        }
        Bytes::from(b)
    }

    pub fn decode(b: &[u8]) -> Result<PrimaryClaim, FrameError> {
        if b.len() < 24 {
            return Err(FrameError::Malformed {
                what: "primary claim",
                why: format!("{} bytes, at least 24 expected", b.len()),
            });
        }
        let mut v = [0u8; 16];
        v.copy_from_slice(&b[..16]);
        let (members, used) = decode_members_prefix(&b[24..])?;
        let rest = &b[24 + used..];
        let tiebreaker = if rest.is_empty() {
            None
        } else {
            let (name, used) = take_name(rest, "primary claim's tiebreaker")?;
            if used != rest.len() {
                return Err(FrameError::Malformed {
                    what: "primary claim",
                    why: "trailing bytes after the tiebreaker".into(),
                });
            }
            Some(name)
        };
        Ok(PrimaryClaim {
            volume: Uuid::from_bytes(v),
            epoch: u64_at(b, 16),
            members,
            tiebreaker,
        })
    }
}

/// A name as the witness and claim payloads carry it: length u16, UTF-8
/// (at most [`MAX_NAME`] bytes; longer ones are cut at a char boundary).
fn put_name(b: &mut Vec<u8>, name: &str) {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    b.extend_from_slice(&(end as u16).to_le_bytes());
    b.extend_from_slice(&name.as_bytes()[..end]);
}

/// A name [`put_name`] wrote at the start of `b`, and the bytes it took.
fn take_name(b: &[u8], what: &'static str) -> Result<(String, usize), FrameError> {
    let bad = |why: &str| FrameError::Malformed {
        what,
        why: why.into(),
    };
    if b.len() < 2 {
        return Err(bad("shorter than a name's length"));
    }
    let len = u16_at(b, 0) as usize;
    if len > MAX_NAME || b.len() < 2 + len {
        return Err(bad("a name runs past the end"));
    }
    let name = std::str::from_utf8(&b[2..2 + len]).map_err(|_| bad("a name is not UTF-8"))?;
    Ok((name.to_string(), 2 + len))
}

/// Most replicas a vote record lists (a volume has a handful).
pub const MAX_VOTE_MEMBERS: usize = 64;

/// A vote record ([`ditto_engine::VoteRecord`]): epoch u64, generation
/// u64, count u16, then that many replica uuids (16 each). The Ok reply of
/// a [`Kind::Primary`] claim from the volume's tiebreaker carries the one
/// it held before the claim; other nodes reply with no payload.
pub fn encode_vote_record(r: &ditto_engine::VoteRecord) -> Bytes {
    let mut b = Vec::with_capacity(18 + 16 * r.in_sync.len());
    put_vote_record(&mut b, r);
    Bytes::from(b)
}

fn put_vote_record(b: &mut Vec<u8>, r: &ditto_engine::VoteRecord) {
    let n = r.in_sync.len().min(MAX_VOTE_MEMBERS);
    b.extend_from_slice(&r.epoch.to_le_bytes());
    b.extend_from_slice(&r.generation.to_le_bytes());
    b.extend_from_slice(&(n as u16).to_le_bytes());
    for id in &r.in_sync[..n] {
        b.extend_from_slice(id.as_bytes());
    }
}

/// A vote record at the start of `b`, and the bytes it took.
fn take_vote_record(b: &[u8]) -> Result<(ditto_engine::VoteRecord, usize), FrameError> {
    let bad = |why: String| FrameError::Malformed {
        what: "vote record",
        why,
    };
    if b.len() < 18 {
        return Err(bad(format!("{} bytes, at least 18 expected", b.len())));
    }
    let n = u16_at(b, 16) as usize;
    if n > MAX_VOTE_MEMBERS {
        return Err(bad(format!(
            "{n} replicas, at most {MAX_VOTE_MEMBERS} allowed"
        )));
    }
    let end = 18 + 16 * n;
    if b.len() < end {
        return Err(bad("the replica list runs past the end".into()));
    }
    let in_sync = b[18..end]
        .chunks_exact(16)
        .map(|c| {
            let mut u = [0u8; 16];
            u.copy_from_slice(c);
            Uuid::from_bytes(u)
        })
        .collect();
    Ok((
        ditto_engine::VoteRecord {
            epoch: u64_at(b, 0),
            generation: u64_at(b, 8),
            in_sync,
        },
        end,
    ))
}

pub fn decode_vote_record(b: &[u8]) -> Result<ditto_engine::VoteRecord, FrameError> {
    let (r, used) = take_vote_record(b)?;
    if used != b.len() {
        return Err(FrameError::Malformed {
            what: "vote record",
            why: "trailing bytes".into(),
        });
    }
    Ok(r)
}

/// What a [`Kind::Witness`] request asks (its `arg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum WitnessOp {
    /// Become the volume's tiebreaker, following the sender at the epoch.
    Create = 1,
    /// Record the membership (the sender's heartbeat and every change).
    Record = 2,
    /// Stop being the volume's tiebreaker (the volume was deleted).
    Delete = 3,
    /// Answer with the vote record held (nothing changes): a promote asks
    /// before it claims, to refuse a takeover from a replica proven stale.
    Query = 4,
}

impl WitnessOp {
    pub fn from_u64(v: u64) -> Option<WitnessOp> {
        Some(match v {
            1 => WitnessOp::Create,
            2 => WitnessOp::Record,
            3 => WitnessOp::Delete,
            4 => WitnessOp::Query,
            _ => return None,
        })
    }
}

/// Payload of [`Kind::Witness`]: volume uuid (16), the vote record
/// ([`encode_vote_record`]), then the volume's name (length u16, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessRequest {
    pub volume: Uuid,
    pub volume_name: String,
    pub record: ditto_engine::VoteRecord,
}

impl WitnessRequest {
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::new();
        b.extend_from_slice(self.volume.as_bytes());
        put_vote_record(&mut b, &self.record);
        put_name(&mut b, &self.volume_name);
        Bytes::from(b)
    }

    pub fn decode(b: &[u8]) -> Result<WitnessRequest, FrameError> {
        if b.len() < 16 {
            return Err(FrameError::Malformed {
                what: "witness request",
                why: format!("{} bytes, at least 16 expected", b.len()),
            });
        }
        let mut v = [0u8; 16];
        v.copy_from_slice(&b[..16]);
        let (record, used) = take_vote_record(&b[16..])?;
        let (volume_name, named) = take_name(&b[16 + used..], "witness request")?;
        if 16 + used + named != b.len() {
            return Err(FrameError::Malformed {
                what: "witness request",
                why: "trailing bytes".into(),
            });
        }
        Ok(WitnessRequest {
            volume: Uuid::from_bytes(v),
            volume_name,
            record,
        })
    }
}

/// Payload of a [`Status::Superseded`] reply: epoch u64, node name length
/// u16, node name, then the explanation (UTF-8) to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    /// The node that is the volume's primary.
    pub node: String,
    /// Its epoch.
    pub epoch: u64,
    pub why: String,
}

impl Superseded {
    pub fn encode(&self) -> Bytes {
        let node = &self.node.as_bytes()[..self.node.len().min(MAX_NAME)];
        let mut b = Vec::with_capacity(10 + node.len() + self.why.len());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&(node.len() as u16).to_le_bytes());
        b.extend_from_slice(node);
        b.extend_from_slice(self.why.as_bytes());
        Bytes::from(b)
    }

    pub fn decode(b: &[u8]) -> Result<Superseded, FrameError> {
        let bad = |why: &str| FrameError::Malformed {
            what: "superseded reply",
            why: why.into(),
        };
        if b.len() < 10 {
            return Err(bad("shorter than its header"));
        }
        let len = u16_at(b, 8) as usize;
        if len > MAX_NAME || b.len() < 10 + len {
            return Err(bad("the node name runs past the end"));
        }
        let text = |r: &[u8]| {
            std::str::from_utf8(r)
                .map(str::to_string)
                .map_err(|_| bad("not UTF-8"))
        };
        Ok(Superseded {
            epoch: u64_at(b, 0),
            node: text(&b[10..10 + len])?,
            why: text(&b[10 + len..])?,
        })
    }
}

/// A pool as [`Kind::ListPools`] answers: its name and the bytes a new
/// replica may take in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRoom {
    pub pool: String,
    pub free: u64,
}

/// count u16, then per pool: name length u16, name, free bytes u64.
pub fn encode_pools(pools: &[PoolRoom]) -> Bytes {
    let mut b = Vec::new();
    b.extend_from_slice(&(pools.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for p in pools.iter().take(u16::MAX as usize) {
        let name = &p.pool.as_bytes()[..p.pool.len().min(MAX_NAME)];
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&p.free.to_le_bytes());
    }
    Bytes::from(b)
}

pub fn decode_pools(b: &[u8]) -> Result<Vec<PoolRoom>, FrameError> {
    let bad = |why: &str| FrameError::Malformed {
        what: "pool list",
        why: why.into(),
    };
    if b.len() < 2 {
        return Err(bad("shorter than its count"));
    }
    let count = u16_at(b, 0) as usize;
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..count {
        if b.len() < at + 2 {
            return Err(bad("truncated"));
        }
        let len = u16_at(b, at) as usize;
        at += 2;
        if len > MAX_NAME || b.len() < at + len + 8 {
            return Err(bad("a pool runs past the end"));
        }
        let pool = std::str::from_utf8(&b[at..at + len])
            .map_err(|_| bad("a name is not UTF-8"))?
            .to_string();
        at += len;
        out.push(PoolRoom {
            pool,
            free: u64_at(b, at),
        });
        at += 8;
    }
    if at != b.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Allocation runs in a reply: 24 bytes each (offset, length, allocated).
pub fn encode_runs(runs: &[ditto_engine::Allocation]) -> Bytes {
    let mut b = Vec::with_capacity(runs.len() * 24);
    for r in runs {
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.length.to_le_bytes());
        b.extend_from_slice(&u64::from(r.allocated).to_le_bytes());
    }
    Bytes::from(b)
}

pub fn decode_runs(b: &[u8]) -> Result<Vec<ditto_engine::Allocation>, FrameError> {
    if !b.len().is_multiple_of(24) {
        return Err(FrameError::Malformed {
            what: "allocation reply",
            why: format!("{} bytes is not a whole number of 24-byte runs", b.len()),
        });
    }
    Ok(b.chunks_exact(24)
        .map(|c| ditto_engine::Allocation {
            offset: u64_at(c, 0),
            length: u64_at(c, 8),
            allocated: u64_at(c, 16) != 0,
        })
        .collect())
}

/// The digest [`Kind::Digest`] answers: SHA-256 of `data` (32 bytes). A
/// cryptographic hash, so no client can write two blocks that a resync
/// would take for equal.
pub fn digest(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witness_requests_and_vote_records_round_trip_and_refuse_damage() {
        let req = WitnessRequest {
            volume: Uuid::from_u128(5),
            volume_name: "vm1".into(),
            record: ditto_engine::VoteRecord {
                epoch: 4,
                generation: 17,
                in_sync: vec![Uuid::from_u128(1), Uuid::from_u128(2)],
            },
        };
        let enc = req.encode();
        assert_eq!(WitnessRequest::decode(&enc).unwrap(), req);
        for cut in 0..enc.len() {
            assert!(WitnessRequest::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = enc.to_vec();
        longer.push(0);
        assert!(WitnessRequest::decode(&longer).is_err());
        let vote = encode_vote_record(&req.record);
        assert_eq!(decode_vote_record(&vote).unwrap(), req.record);
        // A count past the bound is refused before anything is allocated.
        let mut many = vote.to_vec();
        many[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(decode_vote_record(&many).is_err());
        assert_eq!(WitnessOp::from_u64(2), Some(WitnessOp::Record));
        assert_eq!(WitnessOp::from_u64(4), Some(WitnessOp::Query));
        assert_eq!(WitnessOp::from_u64(9), None);
        assert_eq!(Kind::from_u16(22), Some(Kind::Witness));
    }

    #[test]
    fn primary_claims_and_superseded_replies_round_trip() {
        let claim = PrimaryClaim {
            volume: Uuid::from_u128(7),
            epoch: 3,
            members: vec![MemberRef {
                replica: Uuid::from_u128(1),
                node: "a".into(),
                pool: "p0".into(),
            }],
            tiebreaker: None,
        };
        assert_eq!(PrimaryClaim::decode(&claim.encode()).unwrap(), claim);
        let with_tiebreaker = PrimaryClaim {
            tiebreaker: Some("c".into()),
            ..claim.clone()
        };
        let enc = with_tiebreaker.encode();
        assert_eq!(PrimaryClaim::decode(&enc).unwrap(), with_tiebreaker);
        for cut in 24..enc.len() {
            if cut != claim.encode().len() {
                assert!(PrimaryClaim::decode(&enc[..cut]).is_err(), "cut at {cut}");
            }
        }
        let s = Superseded {
            node: "b".into(),
            epoch: 9,
            why: "node b took it over".into(),
        };
        assert_eq!(Superseded::decode(&s.encode()).unwrap(), s);
        let enc = s.encode();
        for cut in 0..10 {
            assert!(Superseded::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        assert!(PrimaryClaim::decode(&claim.encode()[..23]).is_err());
        let pools = vec![
            PoolRoom {
                pool: "disk1".into(),
                free: 5 << 30,
            },
            PoolRoom {
                pool: "p".into(),
                free: 0,
            },
        ];
        let enc = encode_pools(&pools);
        assert_eq!(decode_pools(&enc).unwrap(), pools);
        for cut in 0..enc.len() {
            assert!(decode_pools(&enc[..cut]).is_err(), "cut at {cut}");
        }
        assert!(PrimaryClaim::decode(&claim.encode()[..30]).is_err());
    }

    #[test]
    fn frame_round_trips() {
        let f = Frame {
            offset: 4096,
            arg: 7,
            generation: 12,
            payload: Bytes::from_static(b"hello"),
            ..Frame::new(Kind::Write, 99)
        };
        let b = f.encode().unwrap();
        assert_eq!(b.len(), HEADER_LEN + 5);
        assert_eq!(Frame::decode(&b, MAX_PAYLOAD).unwrap(), f);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let f = Frame {
            payload: Bytes::from_static(b"abc"),
            ..Frame::new(Kind::Write, 1)
        };
        let b = f.encode().unwrap();
        for bit in 0..b.len() * 8 {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Frame::decode(&c, MAX_PAYLOAD).is_err(), "bit {bit} passed");
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let mut h = Frame::new(Kind::Write, 1).encode_header().unwrap();
        h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&h[..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Frame::decode(&h, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn other_version_names_both() {
        let mut h = Frame::new(Kind::Hello, 1).encode_header().unwrap();
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        let e = Frame::decode(&h, MAX_PAYLOAD).unwrap_err().to_string();
        assert!(e.contains('2') && e.contains('1'), "{e}");
    }

    #[test]
    fn members_round_trip() {
        let m = vec![
            MemberRef {
                replica: Uuid::from_u128(1),
                node: "a".into(),
                pool: "p0".into(),
            },
            MemberRef {
                replica: Uuid::from_u128(2),
                node: "b".into(),
                pool: "disk1".into(),
            },
        ];
        let b = encode_members(&m);
        assert_eq!(decode_members(&b).unwrap(), m);
        assert!(decode_members(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn create_replica_round_trips() {
        let c = CreateReplica {
            volume: Uuid::from_u128(3),
            replica: Uuid::from_u128(4),
            size: 1 << 30,
            region_size: 1 << 20,
            pool: "disk1".into(),
            volume_name: "vm1".into(),
        };
        let b = c.encode().unwrap();
        assert_eq!(CreateReplica::decode(&b).unwrap(), c);
        assert!(CreateReplica::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn hello_round_trips_and_rejects_bad_names() {
        let h = Hello {
            min_version: 1,
            max_version: 1,
            features: 0,
            required_features: 0,
            volume: Uuid::from_u128(1),
            replica: Uuid::from_u128(2),
            node: "node-a".into(),
        };
        let b = h.encode().unwrap();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let mut c = b.to_vec();
        c[56] = 200; // name length beyond the bytes present
        assert!(Hello::decode(&c).is_err());
        assert!(Hello::decode(&b[..10]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(0u8..=255, 0..200)) {
            let _ = Frame::decode(&b, 1 << 16);
            let _ = Hello::decode(&b);
            let _ = CreateReplica::decode(&b);
            let _ = decode_members(&b);
            let _ = decode_runs(&b);
        }
    }
}
