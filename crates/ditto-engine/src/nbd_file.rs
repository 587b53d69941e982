//! [`IoFile`] over a remote NBD export, so a replica can live on another machine's disk.
//!
//! The export is given by URI (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`) and served by anything that speaks NBD:
//! qemu-nbd, nbdkit, nbd-server, another ditto. When the connection drops,
//! the request in flight and every later one fail, so the volume fails the
//! replica out; nothing reconnects behind its back. Re-adding the replica
//! opens a new connection and checks its superblock. See docs/nbd-client.md.

use std::io;
use std::sync::Arc;

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

/// One remote export over one connection. It never reconnects: once the
/// connection is lost, every operation fails (see [`NbdFile::client`]).
pub struct NbdFile {
    uri: String,
    /// Export size when opened.
    size: u64,
    client: Client,
}

/// Connects and checks that the export can hold a replica.
async fn connect_checked(uri: &str) -> io::Result<Client> {
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
    Ok(client)
}

impl NbdFile {
    /// Connects to `uri`; refuses read-only exports and those without FLUSH.
    pub async fn open(uri: &str) -> io::Result<Arc<NbdFile>> {
        let client = connect_checked(uri).await?;
        Ok(Arc::new(NbdFile {
            uri: uri.to_string(),
            size: client.size(),
            client,
        }))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// True while the connection is usable. Once false it stays false: a
    /// lost connection is never resumed by this `NbdFile`.
    pub fn is_connected(&self) -> bool {
        !self.client.is_closed()
    }

    /// The connection, or an error once it was lost. Resuming silently on a
    /// new connection would trust whatever answers there now: a server
    /// restarted blank, or another disk of the same size, would be read as
    /// this replica's data and written to as if it were in sync. So the
    /// replica fails out, and `ditto replica readd` opens a new `NbdFile`,
    /// whose superblock (identity, generation) is checked before it rejoins.
    fn client(&self) -> io::Result<&Client> {
        match self.client.closed_reason() {
            None => Ok(&self.client),
            Some(lost) => Err(self.lost(&lost)),
        }
    }

    fn lost(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "connection to NBD export {} was lost ({why}); the replica is failed out; \
                 `ditto replica readd VOLUME REPLICA` reconnects and verifies its superblock",
                self.uri
            ),
        )
    }

    /// Runs `op` on the connection; an error caused by the connection going
    /// away says so, with the way back.
    async fn run<'a, T, F>(&'a self, op: impl FnOnce(&'a Client) -> F) -> io::Result<T>
    where
        F: std::future::Future<Output = Result<T, ClientError>>,
    {
        let c = self.client()?;
        match op(c).await {
            Ok(v) => Ok(v),
            Err(e) => match c.closed_reason() {
                Some(lost) => Err(self.lost(&lost)),
                None => Err(e.into()),
            },
        }
    }

    async fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        self.run(|c| async move {
            if c.info().can_write_zeroes() {
                c.write_zeroes(offset, len, keep_allocated).await
            } else {
                write_zero_buffers(c, offset, len).await
            }
        })
        .await
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
        Box::pin(self.run(move |c| c.read(offset, len)))
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.run(move |c| c.write(offset, data, false)))
    }

    fn sync_data(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.run(|c| c.flush()))
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
