//! Replica backends: one copy of a volume, addressed in volume offsets.
//!
//! A backend hides where the copy lives (a file in a directory pool, a block
//! device, later a remote node) and owns its metadata area. The volume engine
//! only sees [`ReplicaBackend`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ditto_format::{FormatError, Layout, Superblock, SLOT_SIZE};
use uuid::Uuid;

use crate::io::{Allocation, IoEngine, IoFile};
use crate::BoxFuture;

/// Why a replica backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op} on replica {location} failed: {source}")]
    Io {
        op: &'static str,
        location: String,
        #[source]
        source: io::Error,
    },
    #[error("replica {location} refused: {source}")]
    Format {
        location: String,
        #[source]
        source: FormatError,
    },
    #[error("replica {location} is {actual} bytes, too small for its layout ({needed} bytes); it was truncated or is the wrong file")]
    TooSmall {
        location: String,
        actual: u64,
        needed: u64,
    },
    #[error("replica {location} did not answer within {seconds} s")]
    Timeout { location: String, seconds: u64 },
    #[error("replica {location} still holds {pending} operation(s) given up at an earlier timeout; nothing more is written to it until they complete, so a late write cannot land over a newer one")]
    Abandoned { location: String, pending: usize },
}

/// One copy of a volume. Offsets are volume offsets (the data area starts at 0).
pub trait ReplicaBackend: Send + Sync + 'static {
    /// Path or URI, for messages and status.
    fn location(&self) -> &str;
    /// The superblock as last read or written.
    fn superblock(&self) -> Superblock;
    /// Write `sb` durably into the slot not holding the current copy.
    fn write_superblock(&self, sb: Superblock) -> BoxFuture<'_, Result<(), BackendError>>;
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, BackendError>>;
    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<(), BackendError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>>;
    /// Deallocate; the range reads back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>>;
    /// Zero, keeping the range allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>>;
    /// Allocation runs covering `[offset, offset+len)`, in volume offsets.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Allocation>, BackendError>>;
    /// The whole on-disk dirty map area (`layout.dirty_map_len` bytes).
    fn read_dirty_map(&self) -> BoxFuture<'_, Result<Bytes, BackendError>>;
    /// Write encoded map blocks starting at map block `first_block`, durably.
    fn write_dirty_map(
        &self,
        first_block: u64,
        blocks: Bytes,
    ) -> BoxFuture<'_, Result<(), BackendError>>;
    /// True when `discard` (and so WRITE_ZEROES that may deallocate) is a
    /// metadata operation on this replica, never a fall back to writing
    /// zeroes: NBD fast-zero requests are honoured only then. A file replica
    /// answers its [`crate::IoFile::fast_zero`]; the default claims nothing.
    fn fast_zero(&self) -> bool {
        false
    }
    /// Whether this replica holds `data` at `offset` already, found out
    /// without sending the data (a replica on another node compares
    /// digests, DRBD's csums-alg); false when it cannot tell that cheaply.
    /// A resync with `resync_checksums` skips the write then.
    fn holds(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<bool, BackendError>> {
        let _ = (offset, data);
        Box::pin(async { Ok(false) })
    }
    /// Why the replica is unavailable, for a placeholder standing in for one
    /// that could not be opened; None for a real replica.
    fn unavailable(&self) -> Option<String> {
        None
    }
    fn is_present(&self) -> bool {
        self.unavailable().is_none()
    }
    /// Why this replica can never serve again through this backend (a
    /// remote replica whose connection is gone: it is never resumed); None
    /// while it may. A fresh backend (a re-add, a new start) can reach it.
    fn lost(&self) -> Option<String> {
        None
    }
}

/// Stands in for a replica that could not be opened (disk gone, file
/// missing), so the volume can record it as failed and show why.
pub struct MissingReplica {
    location: String,
    why: String,
    superblock: Superblock,
}

impl MissingReplica {
    pub fn new(
        location: impl Into<String>,
        why: impl Into<String>,
        volume_uuid: Uuid,
        replica_uuid: Uuid,
        layout: Layout,
    ) -> Self {
        let mut superblock = Superblock::new(volume_uuid, replica_uuid, layout, 0);
        superblock.generation = 0;
        MissingReplica {
            location: location.into(),
            why: why.into(),
            superblock,
        }
    }

    fn gone<T: Send + 'static>(&self) -> BoxFuture<'_, Result<T, BackendError>> {
        Box::pin(async move {
            Err(BackendError::Io {
                op: "access",
                location: self.location.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, self.why.clone()),
            })
        })
    }
}

impl ReplicaBackend for MissingReplica {
    fn location(&self) -> &str {
        &self.location
    }
    fn superblock(&self) -> Superblock {
        self.superblock.clone()
    }
    fn write_superblock(&self, _sb: Superblock) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn read(&self, _offset: u64, _len: usize) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        self.gone()
    }
    fn write(&self, _offset: u64, _data: Bytes) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn discard(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn allocation(
        &self,
        _offset: u64,
        _len: u64,
    ) -> BoxFuture<'_, Result<Vec<Allocation>, BackendError>> {
        self.gone()
    }
    fn read_dirty_map(&self) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        self.gone()
    }
    fn write_dirty_map(
        &self,
        _first_block: u64,
        _blocks: Bytes,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        self.gone()
    }
    fn unavailable(&self) -> Option<String> {
        Some(self.why.clone())
    }
}

/// A replica stored in a regular file (directory pool) or a block device.
pub struct FileReplica {
    location: String,
    file: Arc<dyn IoFile>,
    data_offset: u64,
    superblock: Mutex<Superblock>,
    /// Serialises superblock writes so slots alternate strictly.
    sb_write: tokio::sync::Mutex<()>,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl FileReplica {
    /// Create a new sparse replica file at `path` (which must not exist).
    pub async fn create(
        engine: &dyn IoEngine,
        path: &Path,
        volume_uuid: Uuid,
        replica_uuid: Uuid,
        layout: Layout,
    ) -> Result<Arc<Self>, BackendError> {
        let location = path.display().to_string();
        let io_err = |op, source| BackendError::Io {
            op,
            location: location.clone(),
            source,
        };
        let file = engine.open(path, true).map_err(|e| io_err("create", e))?;
        let created = async {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(layout.replica_len()))
                .map_err(|e| io_err("resize", e))?;
            Self::format_on(file, location.clone(), volume_uuid, replica_uuid, layout).await
        }
        .await;
        if created.is_err() {
            // Leave nothing half-created behind.
            let _ = std::fs::remove_file(path);
        }
        created
    }

    /// Write a fresh superblock onto an already open file, device or remote
    /// export that is large enough. Refuses one that already holds a ditto
    /// replica: formatting over another volume's copy must never happen by accident.
    pub async fn format_on(
        file: Arc<dyn IoFile>,
        location: String,
        volume_uuid: Uuid,
        replica_uuid: Uuid,
        layout: Layout,
    ) -> Result<Arc<Self>, BackendError> {
        let io_err = |op, source| BackendError::Io {
            op,
            location: location.clone(),
            source,
        };
        let actual = file.len().map_err(|e| io_err("stat", e))?;
        if actual < layout.replica_len() {
            return Err(BackendError::TooSmall {
                location,
                actual,
                needed: layout.replica_len(),
            });
        }
        let head = file
            .read_at(0, 2 * SLOT_SIZE as usize)
            .await
            .map_err(|e| io_err("read", e))?;
        if let Ok(existing) = Superblock::decode_slots(&head) {
            if existing.replica_uuid != replica_uuid {
                return Err(BackendError::Format {
                    location,
                    source: FormatError::Invalid(format!(
                        "it already holds replica {} of volume {}; remove that volume first (or wipe the first 8 KiB by hand if it is truly unused)",
                        existing.replica_uuid, existing.volume_uuid
                    )),
                });
            }
        }
        let sb = Superblock::new(volume_uuid, replica_uuid, layout, now_unix());
        let slot = sb.encode().map_err(|source| BackendError::Format {
            location: location.clone(),
            source,
        })?;
        // Slot 1 is zeroed so an older superblock there can never win.
        let mut both = slot;
        both.extend_from_slice(&vec![0u8; SLOT_SIZE as usize]);
        file.write_at(0, Bytes::from(both))
            .await
            .map_err(|e| io_err("write superblock", e))?;
        // A fresh dirty map: stale bits from an earlier life would only cost resync time, but clear them anyway.
        if layout.dirty_map_len > 0 {
            file.write_at(
                layout.dirty_map_offset,
                Bytes::from(vec![0u8; layout.dirty_map_len as usize]),
            )
            .await
            .map_err(|e| io_err("clear dirty map", e))?;
        }
        file.sync_data().await.map_err(|e| io_err("sync", e))?;
        Ok(Arc::new(FileReplica {
            location,
            file,
            data_offset: layout.data_offset,
            superblock: Mutex::new(sb),
            sb_write: tokio::sync::Mutex::new(()),
        }))
    }

    /// Open an existing replica, refusing it (without writing) unless its
    /// superblock is valid and belongs to `volume_uuid`.
    pub async fn open(
        engine: &dyn IoEngine,
        path: &Path,
        volume_uuid: Uuid,
    ) -> Result<Arc<Self>, BackendError> {
        let location = path.display().to_string();
        let file = engine
            .open(path, false)
            .map_err(|source| BackendError::Io {
                op: "open",
                location: location.clone(),
                source,
            })?;
        Self::open_on(file, location, volume_uuid).await
    }

    /// Open a replica on an already open file, device or remote export.
    pub async fn open_on(
        file: Arc<dyn IoFile>,
        location: String,
        volume_uuid: Uuid,
    ) -> Result<Arc<Self>, BackendError> {
        let io_err = |op, source| BackendError::Io {
            op,
            location: location.clone(),
            source,
        };
        let head = file
            .read_at(0, 2 * SLOT_SIZE as usize)
            .await
            .map_err(|e| io_err("read superblock", e))?;
        let fmt_err = |source| BackendError::Format {
            location: location.clone(),
            source,
        };
        let sb = Superblock::decode_slots(&head).map_err(fmt_err)?;
        sb.check_volume(volume_uuid).map_err(fmt_err)?;
        let actual = file.len().map_err(|e| io_err("stat", e))?;
        let needed = sb.layout.replica_len();
        if actual < needed {
            return Err(BackendError::TooSmall {
                location,
                actual,
                needed,
            });
        }
        Ok(Arc::new(FileReplica {
            location,
            file,
            data_offset: sb.layout.data_offset,
            superblock: Mutex::new(sb),
            sb_write: tokio::sync::Mutex::new(()),
        }))
    }

    /// The replica file this backend uses.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.location)
    }

    fn io_err(&self, op: &'static str) -> impl Fn(io::Error) -> BackendError + '_ {
        move |source| BackendError::Io {
            op,
            location: self.location.clone(),
            source,
        }
    }
}

impl ReplicaBackend for FileReplica {
    fn location(&self) -> &str {
        &self.location
    }

    fn superblock(&self) -> Superblock {
        match self.superblock.lock() {
            Ok(sb) => sb.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write_superblock(&self, mut sb: Superblock) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let _serial = self.sb_write.lock().await;
            let current = self.superblock();
            sb.sequence = current.sequence + 1;
            sb.updated_unix = now_unix();
            let slot = sb.encode().map_err(|source| BackendError::Format {
                location: self.location.clone(),
                source,
            })?;
            let at = (sb.sequence % 2) * SLOT_SIZE;
            self.file
                .write_at(at, Bytes::from(slot))
                .await
                .map_err(self.io_err("write superblock"))?;
            self.file
                .sync_data()
                .await
                .map_err(self.io_err("sync superblock"))?;
            match self.superblock.lock() {
                Ok(mut g) => *g = sb,
                Err(poisoned) => *poisoned.into_inner() = sb,
            }
            Ok(())
        })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            self.file
                .read_at(self.data_offset + offset, len)
                .await
                .map_err(self.io_err("read"))
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.file
                .write_at(self.data_offset + offset, data)
                .await
                .map_err(self.io_err("write"))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.file.sync_data().await.map_err(self.io_err("flush")) })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let at = self.data_offset + offset;
            match self.file.punch_hole(at, len).await {
                // A file that cannot punch holes still zeroes: a discard
                // promises zeroes, and one unsupported TRIM must not fail
                // the replica out.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => self
                    .file
                    .zero_range(at, len)
                    .await
                    .map_err(self.io_err("discard (zeroing)")),
                other => other.map_err(self.io_err("discard")),
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.file
                .zero_range(self.data_offset + offset, len)
                .await
                .map_err(self.io_err("write zeroes"))
        })
    }

    fn read_dirty_map(&self) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            let layout = self.superblock().layout;
            self.file
                .read_at(layout.dirty_map_offset, layout.dirty_map_len as usize)
                .await
                .map_err(self.io_err("read dirty map"))
        })
    }

    fn write_dirty_map(
        &self,
        first_block: u64,
        blocks: Bytes,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let layout = self.superblock().layout;
            let at = first_block * SLOT_SIZE;
            if at + blocks.len() as u64 > layout.dirty_map_len {
                return Err(BackendError::Io {
                    op: "write dirty map",
                    location: self.location.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "map write past the map area",
                    ),
                });
            }
            self.file
                .write_at(layout.dirty_map_offset + at, blocks)
                .await
                .map_err(self.io_err("write dirty map"))?;
            self.file
                .sync_data()
                .await
                .map_err(self.io_err("sync dirty map"))
        })
    }

    fn fast_zero(&self) -> bool {
        self.file.fast_zero()
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Allocation>, BackendError>> {
        Box::pin(async move {
            let runs = self
                .file
                .allocation(self.data_offset + offset, len)
                .await
                .map_err(self.io_err("map allocation"))?;
            Ok(runs
                .into_iter()
                .map(|a| Allocation {
                    offset: a.offset - self.data_offset,
                    ..a
                })
                .collect())
        })
    }
}
