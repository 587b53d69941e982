//! NBD protocol server: fixed-newstyle handshake and transmission phase, independent of storage.
//!
//! Written by hand because no crate gets through qemu's and libnbd's default
//! handshake with structured replies and `base:allocation` (see docs/nbd.md).
//! The server knows nothing about volumes: it asks an [`ExportRegistry`] for an
//! [`Export`] by name and turns NBD commands into calls on it.

pub mod client;
mod handshake;
pub mod memory;
pub mod proto;
mod server;
mod transmission;

pub use server::{ClientInfo, NbdStream, NbdTls, Server, ServerConfig};
pub use transmission::CLOSE_GRACE;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an export operation failed; each maps to one NBD error value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    /// Sent to the client as NBD_EIO.
    #[error("I/O error: {0}")]
    Io(String),
    /// Sent to the client as NBD_ENOSPC.
    #[error("no space left")]
    NoSpace,
    /// Sent to the client as NBD_EINVAL.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Sent to the client as NBD_ENOTSUP (e.g. FAST_ZERO that would not be fast).
    #[error("not supported: {0}")]
    NotSupported(String),
    /// Sent to the client as NBD_EPERM.
    #[error("export is read-only")]
    ReadOnly,
    /// Sent to the client as NBD_ESHUTDOWN.
    #[error("export is shutting down")]
    Shutdown,
}

impl ExportError {
    /// The NBD error value this error is sent as (see the variant docs).
    /// The server sends ENOTSUP only for a refused FAST_ZERO, as the protocol
    /// asks, and EINVAL for [`ExportError::NotSupported`] on any other command.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Io(_) => proto::NBD_EIO,
            ExportError::NoSpace => proto::NBD_ENOSPC,
            ExportError::Invalid(_) => proto::NBD_EINVAL,
            ExportError::NotSupported(_) => proto::NBD_ENOTSUP,
            ExportError::ReadOnly => proto::NBD_EPERM,
            ExportError::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }
}

/// One run of a BLOCK_STATUS answer for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// NBD_STATE_HOLE: the range is not allocated.
    pub hole: bool,
    /// NBD_STATE_ZERO: the range reads as zeroes.
    pub zero: bool,
}

/// A block device the server exposes. Offsets and lengths handed to these
/// methods have already been checked against [`Export::size`] by the server.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    /// True only when a FLUSH on one connection covers writes completed on
    /// every other connection (NBD_FLAG_CAN_MULTI_CONN).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// True when WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO is honestly fast.
    fn can_fast_zero(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>>;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), ExportError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>>;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>>;
    /// `may_trim` is false when the client sent NBD_CMD_FLAG_NO_HOLE;
    /// `fast_only` is true for NBD_CMD_FLAG_FAST_ZERO (answer NotSupported if not fast).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
    /// Allocation of `[offset, offset+len)`; the extents must cover at least
    /// the first byte and at most the whole range.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>>;
}

/// One entry of NBD_OPT_LIST.
#[derive(Debug, Clone)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Where the server finds exports by name.
pub trait ExportRegistry: Send + Sync + 'static {
    /// None makes the server answer NBD_REP_ERR_UNKNOWN.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn list(&self) -> Vec<ExportListing>;
    /// Description sent as NBD_INFO_DESCRIPTION when a client asks for it;
    /// by default the one [`ExportRegistry::list`] gives for `name`.
    fn description(&self, name: &str) -> Option<String> {
        self.list()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .filter(|d| !d.is_empty())
    }
}
