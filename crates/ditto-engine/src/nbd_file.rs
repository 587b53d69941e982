//! [`IoFile`] over a remote NBD export, so a replica can live on another machine's disk.
//!
//! The export is given by URI (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`) and served by anything that speaks NBD:
//! qemu-nbd, nbdkit, nbd-server, another ditto. A request in flight when the
//! connection drops fails (the volume then fails the replica out); the next
//! operation reconnects once, so a disk that comes back can be re-added
//! without restarting the daemon. See docs/nbd-client.md.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ditto_nbd::client::{Client, ClientError};
use futures::{StreamExt, TryStreamExt};

use crate::io::{Allocation, IoFile};
use crate::BoxFuture;

/// Largest zero buffer written when the server cannot zero by itself.
const ZERO_CHUNK: u64 = 1 << 20;
/// Zero buffers in flight at once on that path.
const ZERO_PARALLEL: usize = 8;

/// Opens the export at `uri` as an [`IoFile`].
pub async fn open_nbd(uri: &str) -> io::Result<Arc<dyn IoFile>> {
    let file: Arc<dyn IoFile> = NbdFile::open(uri).await?;
    Ok(file)
}

/// One remote export, reconnecting on demand.
pub struct NbdFile {
    uri: String,
    /// Export size when first opened; a reconnect must find the same.
    size: u64,
    current: Mutex<Arc<Client>>,
    /// Serialises reconnect attempts; holds the last failed attempt's error.
    reconnect: tokio::sync::Mutex<Option<String>>,
    /// Reconnect attempts started, so callers queued behind a failed
    /// attempt share its result instead of each trying again.
    attempts: AtomicU64,
    reconnects: AtomicU64,
}

/// Connects and checks that the export can hold a replica.
async fn connect_checked(uri: &str, expect_size: Option<u64>) -> io::Result<Client> {
    let client = Client::connect(uri).await?;
    let info = client.info();
    if info.read_only() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("NBD export {uri} is read-only; a replica must be writable (drop --read-only from qemu-nbd, or the readonly option from nbdkit)"),
        ));
    }
    if !info.can_flush() {
        // NBD cannot tell a server without FLUSH that writes through from
        // one that caches: refuse rather than promise durability we lack.
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("NBD export {uri} does not support FLUSH, so writes to it could not be made durable; export it with flush support (qemu-nbd and nbdkit's file and memory plugins have it)"),
        ));
    }
    if let Some(size) = expect_size {
        if info.size != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("NBD export {uri} came back with {} bytes instead of {size}; refusing it: is it still the same disk?", info.size),
            ));
        }
    }
    Ok(client)
}

impl NbdFile {
    /// Connects to `uri`; refuses read-only exports and those without FLUSH.
    pub async fn open(uri: &str) -> io::Result<Arc<NbdFile>> {
        let client = connect_checked(uri, None).await?;
        Ok(Arc::new(NbdFile {
            uri: uri.to_string(),
            size: client.size(),
            current: Mutex::new(Arc::new(client)),
            reconnect: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Successful reconnects since opening.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// True while the current connection is usable (no reconnect needed).
    pub fn is_connected(&self) -> bool {
        !self.current_client().is_closed()
    }

    fn current_client(&self) -> Arc<Client> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The live connection, reconnecting once if the last one was lost.
    async fn client(&self) -> io::Result<Arc<Client>> {
        let c = self.current_client();
        let Some(lost) = c.closed_reason() else {
            return Ok(c);
        };
        let seen = self.attempts.load(Ordering::Acquire);
        let mut last_error = self.reconnect.lock().await;
        let c = self.current_client();
        if !c.is_closed() {
            return Ok(c);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = last_error.as_ref() {
                // Someone tried while we waited and failed: share that answer.
                return Err(io::Error::new(io::ErrorKind::NotConnected, e.clone()));
            }
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
        match connect_checked(&self.uri, Some(self.size)).await {
            Ok(new) => {
                let new = Arc::new(new);
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
                *last_error = None;
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(uri = %self.uri, after = %lost, "reconnected to NBD export");
                Ok(new)
            }
            Err(e) => {
                let msg = format!(
                    "connection to NBD export {} was lost ({lost}) and reconnecting failed: {e}",
                    self.uri
                );
                *last_error = Some(msg.clone());
                Err(io::Error::new(e.kind(), msg))
            }
        }
    }

    async fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        let c = self.client().await?;
        if c.info().can_write_zeroes() {
            return Ok(c.write_zeroes(offset, len, keep_allocated).await?);
        }
        Ok(write_zero_buffers(&c, offset, len).await?)
    }
}

/// Zeroes by writing zero-filled buffers (one shared buffer, a few in flight).
async fn write_zero_buffers(c: &Client, offset: u64, len: u64) -> Result<(), ClientError> {
    if len == 0 {
        return Ok(());
    }
    let chunk = ZERO_CHUNK.min(u64::from(c.max_payload())).min(len);
    let zeroes = Bytes::from(vec![0u8; chunk as usize]);
    let end = offset + len;
    let ranges = std::iter::successors(Some(offset), move |&p| Some(p + chunk))
        .take_while(move |&p| p < end)
        .map(move |p| (p, chunk.min(end - p)));
    futures::stream::iter(ranges)
        .map(|(p, n)| c.write(p, zeroes.slice(..n as usize), false))
        .buffer_unordered(ZERO_PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

impl IoFile for NbdFile {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move { Ok(self.client().await?.read(offset, len).await?) })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { Ok(self.client().await?.write(offset, data, false).await?) })
    }

    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { Ok(self.client().await?.flush().await?) })
    }

    /// WRITE_ZEROES without NO_HOLE: the server may deallocate, and the range
    /// reads back as zeroes. Not TRIM: after a TRIM the contents are
    /// undefined (proto.md), and mirrors must read back identical.
    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.zero(offset, len, false))
    }

    fn zero_range(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.zero(offset, len, true))
    }

    /// Everything is reported allocated (no BLOCK_STATUS): always safe,
    /// copies from this replica are just not sparse.
    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Allocation>>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(Vec::new());
            }
            Ok(vec![Allocation {
                offset,
                length: len,
                allocated: true,
            }])
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}
