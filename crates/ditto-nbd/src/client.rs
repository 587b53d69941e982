//! Async NBD client: connects to an export by URI and runs many requests at once over one connection.
//!
//! Used to keep a replica on a remote NBD export (qemu-nbd, nbdkit,
//! nbd-server). Negotiation is fixed newstyle with `NBD_OPT_GO` (falling back
//! to `NBD_OPT_EXPORT_NAME`) and simple replies only; see docs/nbd-client.md.
//!
//! One connection carries many requests: callers hand finished request
//! messages to a writer task, and a reader task matches each simple reply to
//! its request by handle. Simple replies carry no length, so the reader keeps
//! every handle's expected READ length; it never reads more than was asked.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::proto::*;

/// The IANA port for NBD, used when an `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// Time [`Client::connect`] allows for connecting and negotiating.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a disconnect waits for the server to answer what is in flight
/// and close, before the socket is dropped anyway.
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// Largest READ/WRITE payload sent when the server advertises no (or a
/// larger) maximum block size: proto.md tells clients to stay within 32 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Requests one connection keeps in flight; more wait for a slot.
pub const MAX_IN_FLIGHT: usize = 256;

/// Option replies longer than this are refused: every reply this client asks
/// for (INFO items, error messages) is far smaller.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Second magic of the oldstyle handshake, recognised only to explain the refusal.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
const NBD_ENOMEM: u32 = 12;
const NBD_EOVERFLOW: u32 = 75;
/// Buffer sizes of the socket reader and writer.
const IO_BUFFER: usize = 256 * 1024;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// Export name (percent-decoded); empty selects the server's default export.
    pub export: String,
}

impl FromStr for NbdUri {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl NbdUri {
    /// Parses strictly: anything this client would have to ignore or guess
    /// (user names, TLS, unknown query parameters, fragments) is refused.
    pub fn parse(uri: &str) -> Result<NbdUri, ClientError> {
        let bad = |why: String| ClientError::BadUri {
            uri: uri.to_string(),
            why,
        };
        if uri.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad(
                "it contains spaces or control characters; percent-encode them".into(),
            ));
        }
        if uri.contains('#') {
            return Err(bad("fragments (#...) are not allowed".into()));
        }
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad("it has no scheme".into()))?;
        let scheme = scheme.to_ascii_lowercase();
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path, "export name").map_err(bad)?;
        if export.len() > MAX_STRING_LEN {
            return Err(bad(format!(
                "the export name is {} bytes; NBD allows at most {MAX_STRING_LEN}",
                export.len()
            )));
        }
        let params = parse_query(query).map_err(bad)?;
        let endpoint = match scheme.as_str() {
            "nbd" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(format!("nbd:// takes no query parameters (got {k:?})")));
                }
                let (host, port) = parse_authority(authority).map_err(bad)?;
                Endpoint::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(format!(
                        "nbd+unix:// takes no host (got {authority:?}); write three slashes: nbd+unix:///EXPORT?socket=PATH"
                    )));
                }
                let mut socket = None;
                for (k, v) in params {
                    match k.as_str() {
                        "socket" => socket = Some(v),
                        other => {
                            return Err(bad(format!(
                                "unknown query parameter {other:?} (only socket= is supported)"
                            )))
                        }
                    }
                }
                match socket {
                    Some(p) if !p.is_empty() => Endpoint::Unix {
                        path: PathBuf::from(p),
                    },
                    _ => return Err(bad("nbd+unix:// needs ?socket=PATH".into())),
                }
            }
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(bad(
                    "TLS (nbds) is not supported; use nbd:// or nbd+unix:// over a trusted network"
                        .into(),
                ))
            }
            "nbd+vsock" => return Err(bad("vsock transport is not supported".into())),
            other => return Err(bad(format!("unknown scheme {other:?}"))),
        };
        Ok(NbdUri { endpoint, export })
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in the {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8"))?;
    if decoded.contains('\0') {
        return Err(format!("the {what} contains NUL"));
    }
    Ok(decoded)
}

fn parse_query(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for part in q.split('&') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("query part {part:?} is not KEY=VALUE"))?;
        let k = percent_decode(k, "query")?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("query parameter {k:?} is given twice"));
        }
        out.push((k, percent_decode(v, "query")?));
    }
    Ok(out)
}

fn parse_authority(a: &str) -> Result<(String, u16), String> {
    if a.is_empty() {
        return Err("it names no host".into());
    }
    if a.contains('@') {
        return Err("user names (user@host) are not supported".into());
    }
    let (host, port) = if let Some(inner) = a.strip_prefix('[') {
        let (h, rest) = inner
            .split_once(']')
            .ok_or_else(|| "unclosed [ in the host".to_string())?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{h:?} is not an IPv6 address"));
        }
        let port = match rest {
            "" => None,
            r => Some(
                r.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {r:?} after the IPv6 address"))?,
            ),
        };
        (h.to_string(), port)
    } else {
        let (h, port) = match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err("IPv6 addresses must be in brackets: nbd://[::1]:10809/EXPORT".into());
        }
        if h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("{h:?} is not a valid host name or address"));
        }
        (h.to_string(), port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.chars().all(|c| c.is_ascii_digit()) => n,
            _ => return Err(format!("port {p:?} is not a number from 1 to 65535")),
        },
    };
    Ok((host, port))
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad NBD URI {uri:?}: {why}; expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")]
    BadUri { uri: String, why: String },
    #[error("cannot connect to NBD server {endpoint}: {source}; check that the server is running and listening there")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD server {endpoint} did not complete the handshake within {seconds} s; is it overloaded, or not an NBD server?")]
    ConnectTimeout { endpoint: String, seconds: u64 },
    #[error("NBD handshake with {endpoint} failed: {why}")]
    Handshake { endpoint: String, why: String },
    #[error("NBD server {endpoint} refused export {export:?}: {why}")]
    Refused {
        endpoint: String,
        export: String,
        /// The option reply type (`NBD_REP_ERR_*`), 0 when the server just closed.
        reply: u32,
        why: String,
    },
    #[error("connection to NBD server {endpoint} lost: {reason}; requests in flight failed, connect again to continue")]
    ConnectionLost { endpoint: String, reason: String },
    #[error("NBD server {endpoint} failed {op} of {len} bytes at offset {offset}: {}", errno_text(*errno))]
    Server {
        endpoint: String,
        op: &'static str,
        offset: u64,
        len: u64,
        /// The NBD error value from the reply.
        errno: u32,
    },
    #[error("{op} of {len} bytes at offset {offset} is outside the {size}-byte export")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op} of {len} bytes at offset {offset} is not aligned to the export's minimum block size of {min_block} bytes")]
    Misaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        min_block: u32,
    },
    #[error("NBD server {endpoint} does not support {what}")]
    Unsupported {
        endpoint: String,
        what: &'static str,
    },
}

/// Name and meaning of an NBD error value, for messages.
pub fn errno_text(errno: u32) -> String {
    let name = match errno {
        NBD_EPERM => "EPERM (operation not permitted)",
        NBD_EIO => "EIO (I/O error)",
        NBD_ENOMEM => "ENOMEM (out of memory)",
        NBD_EINVAL => "EINVAL (invalid argument)",
        NBD_ENOSPC => "ENOSPC (no space left on device)",
        NBD_EOVERFLOW => "EOVERFLOW (value too large)",
        NBD_ENOTSUP => "ENOTSUP (not supported)",
        NBD_ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        other => return format!("unknown NBD error value {other}"),
    };
    name.to_string()
}

/// The `io::ErrorKind` an NBD error value stands for.
pub fn errno_kind(errno: u32) -> io::ErrorKind {
    match errno {
        NBD_EPERM => io::ErrorKind::PermissionDenied,
        NBD_ENOMEM => io::ErrorKind::OutOfMemory,
        NBD_EINVAL | NBD_EOVERFLOW => io::ErrorKind::InvalidInput,
        NBD_ENOSPC => io::ErrorKind::StorageFull,
        NBD_ENOTSUP => io::ErrorKind::Unsupported,
        NBD_ESHUTDOWN => io::ErrorKind::ConnectionAborted,
        // EIO and values proto.md does not define: a plain I/O error.
        _ => io::ErrorKind::Other,
    }
}

impl ClientError {
    /// The closest `io::ErrorKind`, used when converting into `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ClientError::BadUri { .. } => io::ErrorKind::InvalidInput,
            ClientError::Connect { source, .. } => source.kind(),
            ClientError::ConnectTimeout { .. } => io::ErrorKind::TimedOut,
            ClientError::Handshake { .. } => io::ErrorKind::InvalidData,
            ClientError::Refused { reply, .. } => match *reply {
                NBD_REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
                NBD_REP_ERR_POLICY | NBD_REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
                NBD_REP_ERR_SHUTDOWN => io::ErrorKind::ConnectionAborted,
                _ => io::ErrorKind::Other,
            },
            ClientError::ConnectionLost { .. } => io::ErrorKind::ConnectionAborted,
            ClientError::Server { errno, .. } => errno_kind(*errno),
            ClientError::OutOfRange { .. } | ClientError::Misaligned { .. } => {
                io::ErrorKind::InvalidInput
            }
            ClientError::Unsupported { .. } => io::ErrorKind::Unsupported,
        }
    }

    /// The NBD error value the server answered with, for [`ClientError::Server`].
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// What negotiation learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub export: String,
    pub size: u64,
    /// Transmission flags as sent (`NBD_FLAG_*`).
    pub flags: u16,
    /// None when the server sent no `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<BlockSize>,
    /// False when the server did not know `NBD_OPT_GO` and
    /// `NBD_OPT_EXPORT_NAME` was used instead.
    pub used_go: bool,
}

impl ExportInfo {
    /// A flag counts only if `NBD_FLAG_HAS_FLAGS` is set: without it the
    /// field carries no meaning.
    fn has(&self, flag: u16) -> bool {
        self.flags & NBD_FLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(NBD_FLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.has(NBD_FLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.has(NBD_FLAG_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.has(NBD_FLAG_SEND_TRIM)
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.has(NBD_FLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.has(NBD_FLAG_CAN_MULTI_CONN)
    }
}

/// How one request ended, as the reader task reports it.
enum Failure {
    Errno(u32),
    Lost(String),
}

type ReplyResult = Result<Bytes, Failure>;

struct Pending {
    /// Payload bytes that follow a successful reply (READ only).
    read_len: u32,
    reply: oneshot::Sender<ReplyResult>,
    _slot: OwnedSemaphorePermit,
}

struct State {
    /// Set once the connection is unusable; every request fails with it.
    dead: Option<String>,
    /// Set once a disconnect began: no new requests, in-flight ones finish.
    closing: Option<String>,
    pending: HashMap<u64, Pending>,
}

struct Shared {
    endpoint: String,
    state: Mutex<State>,
    /// Becomes true when the connection is torn down; stops both tasks.
    closed: watch::Sender<bool>,
    to_writer: mpsc::UnboundedSender<Outgoing>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a panic in
        // one holder must not take the connection down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails everything in flight with `reason`.
    fn fail_all(&self, reason: String) {
        let drained = {
            let mut st = self.state();
            if st.dead.is_none() {
                tracing::debug!(endpoint = %self.endpoint, %reason, in_flight = st.pending.len(), "NBD connection closed");
                st.dead = Some(reason.clone());
            }
            std::mem::take(&mut st.pending)
        };
        for (_, p) in drained {
            let _ = p.reply.send(Err(Failure::Lost(reason.clone())));
        }
        self.closed.send_replace(true);
    }

    /// Starts a soft disconnect (NBD_CMD_DISC after everything queued).
    /// False if the connection was already closing or dead.
    fn begin_close(&self, reason: &str) -> bool {
        let mut st = self.state();
        if st.dead.is_some() || st.closing.is_some() {
            return false;
        }
        st.closing = Some(reason.to_string());
        // Queued under the state lock, so no request can be queued after it.
        let _ = self.to_writer.send(Outgoing::Disconnect);
        true
    }
}

enum Outgoing {
    Request {
        header: [u8; REQUEST_HEADER_LEN],
        payload: Bytes,
    },
    Disconnect,
}

fn request_header(
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// `[offset, offset+len)` cut into pieces of at most `chunk` bytes.
fn pieces(offset: u64, len: u64, chunk: u32) -> impl Iterator<Item = (u64, u32)> {
    let chunk = u64::from(chunk.max(1));
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let n = chunk.min(end - pos);
        let piece = (pos, n as u32);
        pos += n;
        Some(piece)
    })
}

/// One connection to one NBD export. Cheap to share behind `Arc`; every
/// method may be called concurrently.
pub struct Client {
    info: ExportInfo,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    next_handle: AtomicU64,
    /// Largest READ/WRITE (and TRIM/WRITE_ZEROES) length sent in one request.
    max_payload: u32,
    min_block: u32,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.shared.endpoint)
            .field("info", &self.info)
            .field("closed", &self.closed_reason())
            .finish()
    }
}

impl Client {
    /// Connects to `uri` and negotiates, within [`CONNECT_TIMEOUT`].
    pub async fn connect(uri: &str) -> Result<Client, ClientError> {
        Self::connect_timeout(uri, CONNECT_TIMEOUT).await
    }

    /// Like [`Client::connect`], with another time limit for connecting and negotiating.
    pub async fn connect_timeout(uri: &str, limit: Duration) -> Result<Client, ClientError> {
        let parsed = NbdUri::parse(uri)?;
        let endpoint = parsed.endpoint.to_string();
        match tokio::time::timeout(limit, Self::connect_parsed(&parsed)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::ConnectTimeout {
                endpoint,
                seconds: limit.as_secs(),
            }),
        }
    }

    async fn connect_parsed(uri: &NbdUri) -> Result<Client, ClientError> {
        let endpoint = uri.endpoint.to_string();
        let connect_err = |source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_err)?;
                // Requests are latency-bound; never wait for Nagle.
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                Self::handshake(s, &uri.export, endpoint.clone()).await
            }
            Endpoint::Unix { path } => {
                let s = UnixStream::connect(path).await.map_err(connect_err)?;
                Self::handshake(s, &uri.export, endpoint.clone()).await
            }
        }
    }

    /// Negotiates export `export` on an already connected stream and starts
    /// the transmission phase. `endpoint` names the server in messages.
    /// No time limit: wrap it in one (as [`Client::connect`] does).
    pub async fn handshake<S>(
        mut stream: S,
        export: &str,
        endpoint: impl Into<String>,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let endpoint = endpoint.into();
        let info = negotiate(&mut stream, export, &endpoint).await?;
        let (min_block, max) = match info.block_size {
            Some(b) => (b.min, b.max),
            None => (1, DEFAULT_MAX_PAYLOAD),
        };
        let capped = max.min(DEFAULT_MAX_PAYLOAD);
        // min_block is a power of two no larger than max (checked in negotiate).
        let max_payload = (capped - capped % min_block).max(min_block);
        let (r, w) = tokio::io::split(stream);
        let (to_writer, from_clients) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            endpoint,
            state: Mutex::new(State {
                dead: None,
                closing: None,
                pending: HashMap::new(),
            }),
            closed,
            to_writer,
        });
        tokio::spawn(writer_task(w, from_clients, shared.clone()));
        tokio::spawn(reader_task(r, shared.clone()));
        Ok(Client {
            info,
            shared,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            next_handle: AtomicU64::new(1),
            max_payload,
            min_block,
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The server, as named in messages (`host:port` or `unix:PATH`).
    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// Largest length sent in one request; longer operations are split.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// True once the connection is lost or a disconnect began; every new
    /// request then fails.
    pub fn is_closed(&self) -> bool {
        self.closed_reason().is_some()
    }

    /// Why the connection is unusable, if it is.
    pub fn closed_reason(&self) -> Option<String> {
        let st = self.shared.state();
        st.closing.clone().or_else(|| st.dead.clone())
    }

    fn lost(&self, reason: impl Into<String>) -> ClientError {
        ClientError::ConnectionLost {
            endpoint: self.shared.endpoint.clone(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, what: &'static str) -> ClientError {
        ClientError::Unsupported {
            endpoint: self.shared.endpoint.clone(),
            what,
        }
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), ClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => {}
            _ => {
                return Err(ClientError::OutOfRange {
                    op,
                    offset,
                    len,
                    size: self.info.size,
                })
            }
        }
        let m = u64::from(self.min_block);
        if !offset.is_multiple_of(m) || !len.is_multiple_of(m) {
            return Err(ClientError::Misaligned {
                op,
                offset,
                len,
                min_block: self.min_block,
            });
        }
        Ok(())
    }

    /// Sends one request and waits for its reply. Dropping the future after
    /// the request was queued is safe: the request still goes out whole and
    /// its reply is read and discarded.
    async fn request(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Bytes,
    ) -> Result<Bytes, ClientError> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.lost("the client is closed"))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state();
            if let Some(reason) = st.closing.as_ref().or(st.dead.as_ref()) {
                return Err(self.lost(reason.clone()));
            }
            let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
            let read_len = if kind == NBD_CMD_READ { length } else { 0 };
            st.pending.insert(
                handle,
                Pending {
                    read_len,
                    reply: tx,
                    _slot: slot,
                },
            );
            // Queued under the state lock: a disconnect cannot slip in
            // between registering the handle and queuing the request.
            let header = request_header(flags, kind, handle, offset, length);
            if self
                .shared
                .to_writer
                .send(Outgoing::Request { header, payload })
                .is_err()
            {
                st.pending.remove(&handle);
                return Err(self.lost("the connection writer stopped"));
            }
        }
        match rx.await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(Failure::Errno(errno))) => Err(ClientError::Server {
                endpoint: self.shared.endpoint.clone(),
                op,
                offset,
                len: u64::from(length),
                errno,
            }),
            Ok(Err(Failure::Lost(reason))) => Err(self.lost(reason)),
            Err(_) => Err(self.lost("the connection closed")),
        }
    }

    /// Reads `len` bytes at `offset`, split into requests of at most
    /// [`Client::max_payload`] bytes that run concurrently.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, ClientError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.check("read", offset, len as u64)?;
        let parts: Vec<_> = pieces(offset, len as u64, self.max_payload).collect();
        if let [(o, n)] = parts[..] {
            return self
                .request("read", NBD_CMD_READ, 0, o, n, Bytes::new())
                .await;
        }
        let got = try_join_all(
            parts
                .iter()
                .map(|&(o, n)| self.request("read", NBD_CMD_READ, 0, o, n, Bytes::new())),
        )
        .await?;
        let mut out = BytesMut::with_capacity(len);
        for b in got {
            out.extend_from_slice(&b);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this
    /// returns: NBD_CMD_FLAG_FUA if the server offers it, else a FLUSH after.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(()) };
        }
        self.check("write", offset, data.len() as u64)?;
        let native_fua = fua && self.info.can_fua();
        if fua && !native_fua && !self.info.can_flush() {
            return Err(self.unsupported("FUA or FLUSH, so a write cannot be made durable"));
        }
        let flags = if native_fua { NBD_CMD_FLAG_FUA } else { 0 };
        try_join_all(
            pieces(offset, data.len() as u64, self.max_payload).map(|(o, n)| {
                let start = (o - offset) as usize;
                let part = data.slice(start..start + n as usize);
                self.request("write", NBD_CMD_WRITE, flags, o, n, part)
            }),
        )
        .await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every completed write durable (NBD_CMD_FLUSH).
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.info.can_flush() {
            return Err(self.unsupported("FLUSH (NBD_FLAG_SEND_FLUSH is not set)"));
        }
        self.request("flush", NBD_CMD_FLUSH, 0, 0, 0, Bytes::new())
            .await
            .map(|_| ())
    }

    /// Tells the server the range is unused (NBD_CMD_TRIM). Its contents are
    /// undefined afterwards: use [`Client::write_zeroes`] to get zeroes.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.info.can_trim() {
            return Err(self.unsupported("TRIM (NBD_FLAG_SEND_TRIM is not set)"));
        }
        self.ranged("trim", NBD_CMD_TRIM, 0, offset, len).await
    }

    /// Zeroes the range (NBD_CMD_WRITE_ZEROES). With `no_hole` the server
    /// must keep it allocated; otherwise it may deallocate it.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        if !self.info.can_write_zeroes() {
            return Err(self.unsupported("WRITE_ZEROES (NBD_FLAG_SEND_WRITE_ZEROES is not set)"));
        }
        let flags = if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.ranged("write zeroes", NBD_CMD_WRITE_ZEROES, flags, offset, len)
            .await
    }

    /// A payload-less command over a range, split like READ/WRITE: proto.md
    /// lets servers refuse lengths above the maximum block size.
    async fn ranged(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        if len == 0 {
            return Ok(());
        }
        self.check(op, offset, len)?;
        try_join_all(
            pieces(offset, len, self.max_payload)
                .map(|(o, n)| self.request(op, kind, flags, o, n, Bytes::new())),
        )
        .await?;
        Ok(())
    }

    /// Soft disconnect: refuses new requests, sends NBD_CMD_DISC after
    /// those already queued, and waits (at most [`DISCONNECT_GRACE`] plus a
    /// little) for the server to answer what is in flight and close.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        self.shared.begin_close("the client disconnected");
        let mut closed = self.shared.closed.subscribe();
        let wait = closed.wait_for(|c| *c);
        if tokio::time::timeout(DISCONNECT_GRACE + Duration::from_secs(1), wait)
            .await
            .is_err()
        {
            self.shared
                .fail_all("the server did not close the connection after NBD_CMD_DISC".into());
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Soft disconnect in the background. The writer bounds its wait for
        // the server, but it may itself be stuck sending to a server that
        // stopped reading: tear the connection down after a grace period anyway.
        if self.shared.begin_close("the client was dropped") {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                rt.spawn(async move {
                    let mut closed = shared.closed.subscribe();
                    let wait = closed.wait_for(|c| *c);
                    if tokio::time::timeout(DISCONNECT_GRACE, wait).await.is_err() {
                        shared.fail_all("the client was dropped".into());
                    }
                });
            }
        }
    }
}

/// Sends queued requests, batching those that are ready into one flush.
async fn writer_task<W>(w: W, mut queue: mpsc::UnboundedReceiver<Outgoing>, shared: Arc<Shared>)
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(IO_BUFFER, w);
    let mut closed = shared.closed.subscribe();
    let outcome = tokio::select! {
        r = send_all(&mut w, &mut queue) => r,
        _ = closed.wait_for(|c| *c) => return,
    };
    match outcome {
        Ok(true) => {
            // DISC sent: the server answers what is in flight, then closes;
            // the reader notices. Do not wait for a server that never does.
            let _ = tokio::time::timeout(DISCONNECT_GRACE, closed.wait_for(|c| *c)).await;
            let _ = w.shutdown().await;
            shared.fail_all("the connection was closed after NBD_CMD_DISC".into());
        }
        Ok(false) => shared.fail_all("the client was dropped".into()),
        Err(e) => shared.fail_all(format!("sending a request failed: {e}")),
    }
}

/// Ok(true) once NBD_CMD_DISC went out; Ok(false) if the queue closed.
async fn send_all<W>(
    w: &mut BufWriter<W>,
    queue: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
{
    while let Some(mut msg) = queue.recv().await {
        loop {
            match msg {
                Outgoing::Request { header, payload } => {
                    w.write_all(&header).await?;
                    if !payload.is_empty() {
                        w.write_all(&payload).await?;
                    }
                }
                Outgoing::Disconnect => {
                    w.write_all(&request_header(0, NBD_CMD_DISC, 0, 0, 0))
                        .await?;
                    w.flush().await?;
                    return Ok(true);
                }
            }
            match queue.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        w.flush().await?;
    }
    Ok(false)
}

/// Reads replies until the connection ends, then fails whatever is left.
async fn reader_task<R>(r: R, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
{
    let mut r = BufReader::with_capacity(IO_BUFFER, r);
    let mut closed = shared.closed.subscribe();
    let reason = tokio::select! {
        reason = read_replies(&mut r, &shared) => reason,
        _ = closed.wait_for(|c| *c) => return,
    };
    shared.fail_all(reason);
}

/// Returns why it stopped; never panics on what the server sends.
async fn read_replies<R>(r: &mut R, shared: &Shared) -> String
where
    R: AsyncRead + Unpin,
{
    let eof_or = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "the server closed the connection".to_string()
        } else {
            format!("receiving a reply failed: {e}")
        }
    };
    let mut head = [0u8; SIMPLE_REPLY_LEN];
    loop {
        if let Err(e) = r.read_exact(&mut head).await {
            return eof_or(e);
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return if magic == NBD_STRUCTURED_REPLY_MAGIC {
                "the server sent a structured reply, which was never negotiated (protocol violation)"
                    .to_string()
            } else {
                format!(
                    "bad reply magic {magic:#010x} (protocol violation, or the stream lost sync)"
                )
            };
        }
        let error = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let mut h = [0u8; 8];
        h.copy_from_slice(&head[8..16]);
        let handle = u64::from_be_bytes(h);
        let Some(p) = shared.state().pending.remove(&handle) else {
            // A READ's data might follow; there is no way to know how much.
            return format!(
                "the server replied to unknown handle {handle:#x} (protocol violation)"
            );
        };
        let result = if error != 0 {
            if error == NBD_ESHUTDOWN {
                // proto.md: on ESHUTDOWN the client must disconnect softly.
                shared.begin_close("the server is shutting down (ESHUTDOWN)");
            }
            Err(Failure::Errno(error))
        } else if p.read_len > 0 {
            // Exactly what was asked: a READ never exceeds max_payload.
            let mut buf = BytesMut::zeroed(p.read_len as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                let reason = eof_or(e);
                let _ = p.reply.send(Err(Failure::Lost(reason.clone())));
                return reason;
            }
            Ok(buf.freeze())
        } else {
            Ok(Bytes::new())
        };
        // The caller may have given up (timeout); its reply is dropped.
        let _ = p.reply.send(result);
    }
}

async fn send_option<S>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut msg = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await?;
    s.flush().await
}

/// One option reply: (option, reply type, data).
async fn read_option_reply<S>(s: &mut S) -> Result<(u32, u32, Vec<u8>), String>
where
    S: AsyncRead + Unpin,
{
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .await
        .map_err(|e| handshake_io("reading an option reply", e))?;
    let mut m = [0u8; 8];
    m.copy_from_slice(&h[0..8]);
    let magic = u64::from_be_bytes(m);
    if magic != REPLY_MAGIC {
        return Err(format!("bad option reply magic {magic:#x}"));
    }
    let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    if len > MAX_OPTION_REPLY {
        return Err(format!(
            "option reply of {len} bytes is larger than the {MAX_OPTION_REPLY} this client accepts"
        ));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(|e| handshake_io("reading option reply data", e))?;
    Ok((option, kind, data))
}

fn handshake_io(what: &str, e: io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("the server closed the connection while {what}")
    } else {
        format!("{what}: {e}")
    }
}

fn check_block_size(min: u32, preferred: u32, max: u32) -> Result<BlockSize, String> {
    if !min.is_power_of_two() || min > 65536 {
        return Err(format!(
            "advertised minimum block size {min} is not a power of two up to 64 KiB"
        ));
    }
    if max < min {
        return Err(format!(
            "advertised maximum block size {max} is below the minimum {min}"
        ));
    }
    Ok(BlockSize {
        min,
        preferred,
        max,
    })
}

/// Fixed newstyle negotiation up to the transmission phase.
async fn negotiate<S>(s: &mut S, export: &str, endpoint: &str) -> Result<ExportInfo, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs = |why: String| ClientError::Handshake {
        endpoint: endpoint.to_string(),
        why,
    };
    if export.len() > MAX_STRING_LEN || export.contains('\0') {
        return Err(hs(format!(
            "export name is not a valid NBD string (at most {MAX_STRING_LEN} bytes, no NUL)"
        )));
    }
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet)
        .await
        .map_err(|e| hs(handshake_io("reading the greeting", e)))?;
    let mut m = [0u8; 8];
    m.copy_from_slice(&greet[0..8]);
    if u64::from_be_bytes(m) != NBDMAGIC {
        return Err(hs(
            "the peer is not an NBD server (no NBDMAGIC greeting)".into()
        ));
    }
    m.copy_from_slice(&greet[8..16]);
    match u64::from_be_bytes(m) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(hs(
                "the server uses oldstyle negotiation, which is not supported; run it in newstyle mode (the default of qemu-nbd and nbdkit)"
                    .into(),
            ))
        }
        other => return Err(hs(format!("unknown handshake magic {other:#x}"))),
    }
    let server_flags = u16::from_be_bytes([greet[16], greet[17]]);
    if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs(
            "the server does not offer fixed newstyle negotiation".into()
        ));
    }
    let no_zeroes = server_flags & NBD_FLAG_NO_ZEROES != 0;
    let client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
    let send_err = |e| hs(format!("sending to the server failed: {e}"));
    s.write_all(&client_flags.to_be_bytes())
        .await
        .map_err(send_err)?;

    // NBD_OPT_GO: name, then one information request (block sizes); asking
    // for it promises the server we honour its block size constraints.
    let mut go = Vec::with_capacity(export.len() + 8);
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, NBD_OPT_GO, &go).await.map_err(send_err)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block_size = None;
    let mut replies = 0usize;
    loop {
        let (option, kind, data) = read_option_reply(s).await.map_err(hs)?;
        replies += 1;
        if option != NBD_OPT_GO {
            return Err(hs(format!(
                "the server answered option {option} while NBD_OPT_GO was pending"
            )));
        }
        if replies > 1024 {
            return Err(hs("the server sent over 1024 replies to NBD_OPT_GO".into()));
        }
        match kind {
            NBD_REP_INFO => {
                if data.len() < 2 {
                    return Err(hs("NBD_REP_INFO without an information type".into()));
                }
                match u16::from_be_bytes([data[0], data[1]]) {
                    NBD_INFO_EXPORT => {
                        if data.len() != 12 {
                            return Err(hs(format!(
                                "NBD_INFO_EXPORT is {} bytes, expected 12",
                                data.len()
                            )));
                        }
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&data[2..10]);
                        export_info = Some((
                            u64::from_be_bytes(b),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        if data.len() != 14 {
                            return Err(hs(format!(
                                "NBD_INFO_BLOCK_SIZE is {} bytes, expected 14",
                                data.len()
                            )));
                        }
                        let at = |i: usize| {
                            u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]])
                        };
                        block_size = Some(check_block_size(at(2), at(6), at(10)).map_err(hs)?);
                    }
                    // Name, description and future items are not needed.
                    _ => {}
                }
            }
            NBD_REP_ACK => {
                let Some((size, flags)) = export_info else {
                    return Err(hs(
                        "the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT".into(),
                    ));
                };
                return Ok(ExportInfo {
                    export: export.to_string(),
                    size,
                    flags,
                    block_size,
                    used_go: true,
                });
            }
            NBD_REP_ERR_UNSUP if export_info.is_none() => {
                return export_name_fallback(s, export, endpoint, no_zeroes).await;
            }
            k if k & (1 << 31) != 0 => {
                // Soft disconnect as proto.md asks; the reply is not awaited.
                let _ = send_option(s, NBD_OPT_ABORT, &[]).await;
                let message = wire_message(&String::from_utf8_lossy(&data), 512);
                let why = match k {
                    NBD_REP_ERR_UNKNOWN => {
                        "no such export; check the name (`nbdinfo --list` shows the exports)"
                            .to_string()
                    }
                    NBD_REP_ERR_POLICY => "refused by server policy".to_string(),
                    NBD_REP_ERR_TLS_REQD => {
                        "the server requires TLS, which this client does not support".to_string()
                    }
                    NBD_REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
                    NBD_REP_ERR_BLOCK_SIZE_REQD => {
                        "the server requires block size negotiation".to_string()
                    }
                    NBD_REP_ERR_INVALID => "the server called the request invalid".to_string(),
                    other => format!("error reply {other:#x}"),
                };
                let why = if message.is_empty() {
                    why
                } else {
                    format!("{why} (server says: {message})")
                };
                return Err(ClientError::Refused {
                    endpoint: endpoint.to_string(),
                    export: export.to_string(),
                    reply: k,
                    why,
                });
            }
            other => {
                return Err(hs(format!(
                    "unexpected reply type {other:#x} to NBD_OPT_GO"
                )))
            }
        }
    }
}

/// The old way into transmission, for servers without NBD_OPT_GO. A server
/// that does not like the name can only close the connection.
async fn export_name_fallback<S>(
    s: &mut S,
    export: &str,
    endpoint: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs = |why: String| ClientError::Handshake {
        endpoint: endpoint.to_string(),
        why,
    };
    send_option(s, NBD_OPT_EXPORT_NAME, export.as_bytes())
        .await
        .map_err(|e| hs(format!("sending to the server failed: {e}")))?;
    let mut b = [0u8; 10];
    if let Err(e) = s.read_exact(&mut b).await {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Err(ClientError::Refused {
                endpoint: endpoint.to_string(),
                export: export.to_string(),
                reply: 0,
                why: "the server closed the connection after NBD_OPT_EXPORT_NAME: no such export, or not allowed".into(),
            });
        }
        return Err(hs(format!("reading the export size: {e}")));
    }
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad)
            .await
            .map_err(|e| hs(handshake_io("reading the reserved zeroes", e)))?;
    }
    let mut sz = [0u8; 8];
    sz.copy_from_slice(&b[0..8]);
    Ok(ExportInfo {
        export: export.to_string(),
        size: u64::from_be_bytes(sz),
        flags: u16::from_be_bytes([b[8], b[9]]),
        block_size: None,
        used_go: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_uris() {
        let u = NbdUri::parse("nbd://example.com/disk%20one").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "example.com".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "disk one");
        let u = NbdUri::parse("nbd://[::1]:1234/").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "");
        assert_eq!(u.endpoint.to_string(), "[::1]:1234");
        let u = NbdUri::parse("nbd://10.0.0.1:10810").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///e?socket=/run/x%3Fy.sock").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Unix {
                path: "/run/x?y.sock".into()
            }
        );
        assert_eq!(u.export, "e");
        // A path of "//x" names export "/x", as the NBD URI spec says.
        assert_eq!(NbdUri::parse("nbd://h//x").unwrap().export, "/x");
    }

    #[test]
    fn refuses_bad_uris_with_reasons() {
        for (uri, needle) in [
            ("", "no scheme"),
            ("nbd:/x", "no scheme"),
            ("http://h/x", "unknown scheme"),
            ("nbds://h/x", "TLS"),
            ("nbd://", "no host"),
            ("nbd://user@h/x", "user names"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:70000/x", "port"),
            ("nbd://h:/x", "port"),
            ("nbd://h:+80/x", "port"),
            ("nbd://::1/x", "brackets"),
            ("nbd://[zz]/x", "IPv6"),
            ("nbd://h/x?tls=on", "no query"),
            ("nbd://h/x#frag", "fragment"),
            ("nbd://h/a%2", "percent"),
            ("nbd://h/a%00", "NUL"),
            ("nbd://h/a%ff", "UTF-8"),
            ("nbd://h w/x", "spaces"),
            ("nbd://h!/x", "host"),
            ("nbd+unix:///x", "socket"),
            ("nbd+unix:///x?socket=", "socket"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbd+unix:///x?socket=/s&foo=1", "unknown query"),
            ("nbd+unix:///x?socket=/s&socket=/t", "twice"),
            ("nbd+unix:///x?socket", "KEY=VALUE"),
        ] {
            match NbdUri::parse(uri) {
                Err(e @ ClientError::BadUri { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(needle), "{uri:?}: {msg}");
                    assert!(msg.contains("expected nbd://"), "{msg}");
                }
                other => panic!("{uri:?} accepted: {other:?}"),
            }
        }
        let long = format!("nbd://h/{}", "a".repeat(MAX_STRING_LEN + 1));
        assert!(NbdUri::parse(&long).is_err());
    }

    #[test]
    fn pieces_cover_range_exactly() {
        let v: Vec<_> = pieces(10, 25, 10).collect();
        assert_eq!(v, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
    }

    #[test]
    fn errno_kinds() {
        assert_eq!(errno_kind(NBD_ENOSPC), io::ErrorKind::StorageFull);
        assert_eq!(errno_kind(NBD_EPERM), io::ErrorKind::PermissionDenied);
        assert_eq!(errno_kind(NBD_EINVAL), io::ErrorKind::InvalidInput);
        assert_eq!(errno_kind(NBD_ENOTSUP), io::ErrorKind::Unsupported);
        assert_eq!(errno_kind(NBD_EIO), io::ErrorKind::Other);
        assert_eq!(errno_kind(9999), io::ErrorKind::Other);
        assert!(errno_text(9999).contains("9999"));
    }
}
