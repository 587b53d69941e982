//! The NBD server: accept loops, per-connection lifecycle, client listing and forced disconnects.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::handshake;
use crate::transmission::{self, End, Session};
use crate::ExportRegistry;

/// Tunables of the server; [`Default`] gives the documented values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest READ/WRITE length accepted, advertised as the maximum block size.
    pub max_payload: u32,
    /// Advertised preferred block size (power of two, at least 512).
    pub preferred_block: u32,
    /// Advertised minimum block size (power of two, at most 64 KiB); requests
    /// not aligned to it get EINVAL.
    pub min_block: u32,
    /// Requests one connection may have in flight at once.
    pub max_in_flight: usize,
    /// Connections open at once (handshaking or transmitting); more are
    /// closed as soon as they are accepted, with a log line.
    pub max_connections: usize,
    /// A connection that has not finished the handshake in this time is
    /// closed, so idle or slow sockets cannot pile up descriptors.
    pub handshake_timeout: Duration,
    /// READ/WRITE payload bytes held by the requests of all connections
    /// together, from the WRITE payload being read (or the READ starting) to
    /// the reply being written. A connection waits for budget before it
    /// reads the next payload: back-pressure, never unbounded memory. At
    /// least `max_payload`.
    pub max_in_flight_bytes_total: usize,
}

/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default [`ServerConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerConfig::max_in_flight_bytes_total`]: 256 MiB.
pub const DEFAULT_IN_FLIGHT_BYTES_TOTAL: usize = 256 * 1024 * 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 * 1024 * 1024,
            preferred_block: 4096,
            min_block: 1,
            max_in_flight: 64,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_in_flight_bytes_total: DEFAULT_IN_FLIGHT_BYTES_TOTAL,
        }
    }
}

/// Upper bound for `max_payload` (and `preferred_block`).
const MAX_PAYLOAD_CAP: u32 = 1 << 30;

impl ServerConfig {
    /// Bends the values into what the protocol allows to advertise (see
    /// "Block size constraints" in the protocol document), so a bad config
    /// cannot make us lie to clients.
    fn sanitized(mut self) -> ServerConfig {
        let d = ServerConfig::default();
        if !self.min_block.is_power_of_two() || self.min_block > 65536 {
            tracing::warn!(min_block = self.min_block, "invalid min_block, using 1");
            self.min_block = 1;
        }
        if !self.preferred_block.is_power_of_two()
            || self.preferred_block < self.min_block.max(512)
            || self.preferred_block > MAX_PAYLOAD_CAP
        {
            let p = d.preferred_block.max(self.min_block);
            tracing::warn!(
                preferred_block = self.preferred_block,
                "invalid preferred_block, using {p}"
            );
            self.preferred_block = p;
        }
        // A read reply chunk carries 8 bytes of offset in a u32 length; keep
        // far below that, and a multiple of min_block at least preferred_block.
        let max = self
            .max_payload
            .clamp(self.preferred_block, MAX_PAYLOAD_CAP);
        self.max_payload = max - max % self.min_block;
        self.max_in_flight = self.max_in_flight.clamp(1, 65536);
        self.max_connections = self.max_connections.max(1);
        if self.handshake_timeout.is_zero() {
            self.handshake_timeout = d.handshake_timeout;
        }
        // Every single payload must fit, or its request would wait forever;
        // the semaphore's own limit caps it from above.
        self.max_in_flight_bytes_total = self
            .max_in_flight_bytes_total
            .clamp(self.max_payload as usize, Semaphore::MAX_PERMITS);
        self
    }

    /// Payload bytes one connection may hold in flight: a quarter of the
    /// total (at most 128 MiB, at least one request of the largest size), so
    /// a few clients that never read their replies cannot pin all of it.
    fn max_in_flight_bytes(&self) -> usize {
        (self.max_in_flight_bytes_total / 4)
            .min(128 * 1024 * 1024)
            .max(self.max_payload as usize)
    }
}

/// A connection in the transmission phase, as reported by [`Server::clients`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Unique per server, in accept order.
    pub id: u64,
    pub export: String,
    /// Peer address (`ip:port`, `unix:...`, or what the caller of
    /// [`Server::serve_connection`] passed).
    pub peer: String,
    /// When the connection was accepted, seconds since the Unix epoch.
    pub connected_at_unix: u64,
}

struct Slot {
    /// Set once the handshake chose an export.
    info: Option<ClientInfo>,
    close: watch::Sender<bool>,
}

struct Conns {
    shutting_down: bool,
    slots: HashMap<u64, Slot>,
}

/// Serves exports from an [`ExportRegistry`] over NBD.
pub struct Server {
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    next_id: AtomicU64,
    conns: Mutex<Conns>,
    shutdown: watch::Sender<bool>,
    /// Connections open now, reserved before their task starts.
    open: AtomicUsize,
    /// Connections refused for `max_connections`, and when that was last logged.
    refused: AtomicU64,
    refused_logged: Mutex<Option<std::time::Instant>>,
    /// The payload byte budget shared by every connection.
    budget: Arc<Semaphore>,
    /// NBD_OPT_STARTTLS, when configured.
    tls: Option<NbdTls>,
}

/// One of the `max_connections`, given back when the connection ends.
struct ConnPermit<'a>(&'a AtomicUsize);

impl Drop for ConnPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a connection from the table however its task ends.
struct SlotGuard<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.server.conns().slots.remove(&self.id);
    }
}

/// Size of the buffered reader in front of each connection: large enough
/// that a burst of small pipelined requests is parsed from one read call.
const READ_BUFFER: usize = 128 * 1024;

/// Something to accept connections from.
trait Acceptor {
    /// Whether NBD_OPT_STARTTLS is offered on this listener (TCP; a Unix
    /// socket is local, and stays plain).
    const TLS: bool;
    type Stream: NbdStream;
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)>;
    /// The lock-free halves of the plain path.
    fn into_split(stream: Self::Stream) -> (Self::Read, Self::Write);
}

impl Acceptor for TcpListener {
    const TLS: bool = true;
    type Stream = tokio::net::TcpStream;
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, addr) = self.accept().await?;
        // Replies are small and latency-bound; never wait for Nagle.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok((stream, addr.to_string()))
    }
    fn into_split(stream: Self::Stream) -> (Self::Read, Self::Write) {
        stream.into_split()
    }
}

impl Acceptor for UnixListener {
    const TLS: bool = false;
    type Stream = tokio::net::UnixStream;
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, addr) = self.accept().await?;
        let peer = match addr.as_pathname() {
            Some(p) => format!("unix:{}", p.display()),
            None => "unix:unnamed".to_string(),
        };
        Ok((stream, peer))
    }
    fn into_split(stream: Self::Stream) -> (Self::Read, Self::Write) {
        stream.into_split()
    }
}

/// Accept errors that say nothing about the listener itself (a peer that
/// gave up, or running out of descriptors/memory for a moment).
fn transient_accept_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut | OutOfMemory
    ) || matches!(
        e.raw_os_error(),
        // ENFILE, EMFILE, ENOBUFS, ENOMEM on Linux.
        Some(23) | Some(24) | Some(105) | Some(12)
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// TLS for NBD clients (NBD_OPT_STARTTLS).
#[derive(Clone)]
pub struct NbdTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// FORCEDTLS: nothing but NBD_OPT_STARTTLS (and ABORT) without TLS.
    /// Otherwise clients choose (plain clients keep working).
    pub required: bool,
}

/// A whole client connection, plain or TLS, as the TLS-capable path sees it.
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {}
type Conn = Box<dyn NbdStream>;

/// Turns the plain halves into TLS halves after NBD_OPT_STARTTLS.
type Upgrade<R, W> = Box<dyn FnOnce(R, W) -> crate::BoxFuture<'static, io::Result<(R, W)>> + Send>;

fn tls_upgrade(tls: NbdTls) -> Upgrade<ReadHalf<Conn>, WriteHalf<Conn>> {
    Box::new(move |r: ReadHalf<Conn>, w: WriteHalf<Conn>| {
        Box::pin(async move {
            let stream = tls.acceptor.accept(r.unsplit(w)).await?;
            Ok(tokio::io::split(Box::new(stream) as Conn))
        })
    })
}

impl Server {
    pub fn new(registry: Arc<dyn ExportRegistry>, config: ServerConfig) -> Arc<Server> {
        Self::with_tls(registry, config, None)
    }

    /// A server that offers (or, with `required`, insists on) TLS.
    pub fn with_tls(
        registry: Arc<dyn ExportRegistry>,
        config: ServerConfig,
        tls: Option<NbdTls>,
    ) -> Arc<Server> {
        let (shutdown, _) = watch::channel(false);
        let config = config.sanitized();
        Arc::new(Server {
            registry,
            budget: Arc::new(Semaphore::new(config.max_in_flight_bytes_total)),
            config,
            next_id: AtomicU64::new(1),
            conns: Mutex::new(Conns {
                shutting_down: false,
                slots: HashMap::new(),
            }),
            shutdown,
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            refused_logged: Mutex::new(None),
            tls,
        })
    }

    /// Connections open now (handshaking or transmitting).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Payload bytes held by requests in flight on all connections; never
    /// more than [`ServerConfig::max_in_flight_bytes_total`].
    pub fn in_flight_bytes(&self) -> usize {
        self.config
            .max_in_flight_bytes_total
            .saturating_sub(self.budget.available_permits())
    }

    /// Connections refused so far because `max_connections` were open.
    pub fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes one of the `max_connections`, or says (in the log, at most
    /// once a second) that the limit refused one.
    fn reserve_connection(&self, peer: &str) -> Option<ConnPermit<'_>> {
        let max = self.config.max_connections;
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(ConnPermit(&self.open));
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self
            .refused_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(
                %peer,
                refused_so_far = refused,
                "NBD connection refused: {max} connections are open, the limit \
                 (nbd_max_connections in the daemon config; raise it there, or close idle clients)"
            );
        }
        None
    }

    /// The configuration in force (after bending invalid values into range).
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn conns(&self) -> MutexGuard<'_, Conns> {
        // The table stays consistent even if a holder panicked: every
        // critical section is a single map operation.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts TCP connections until [`Server::shutdown`], one task each with
    /// TCP_NODELAY set. Returns once every connection it accepted has closed.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        self.accept_loop(listener).await
    }

    /// Like [`Server::serve_tcp`], for a Unix socket.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> io::Result<()> {
        self.accept_loop(listener).await
    }

    async fn accept_loop<A: Acceptor>(self: Arc<Self>, listener: A) -> io::Result<()> {
        let mut shutdown = self.shutdown.subscribe();
        let mut tasks = JoinSet::new();
        let mut result = Ok(());
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = shutdown.changed() => continue,
                // Reap finished connections so the set does not grow.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                res = listener.accept_stream() => match res {
                    // Without TLS, the lock-free halves; with it, one stream
                    // that NBD_OPT_STARTTLS can turn into a TLS stream.
                    Ok((stream, peer)) => match self.tls.clone().filter(|_| A::TLS) {
                        None => {
                            let (r, w) = A::into_split(stream);
                            tasks.spawn(self.clone().run_connection(r, w, peer, None));
                        }
                        Some(tls) => {
                            let (r, w) = tokio::io::split(Box::new(stream) as Conn);
                            tasks.spawn(self.clone().run_connection(r, w, peer, Some(tls_upgrade(tls))));
                        }
                    },
                    Err(e) if transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "accept failed; closing listener");
                        // Ask the connections we started to close too: the
                        // caller is told this server is no longer serving.
                        result = Err(e);
                        break;
                    }
                },
            }
        }
        drop(listener);
        if result.is_err() {
            for (_, slot) in self.conns().slots.iter() {
                slot.close.send_replace(true);
            }
        }
        while tasks.join_next().await.is_some() {}
        result
    }

    /// Runs the whole protocol on one already-connected stream (used by the
    /// accept loops, and directly by tests over in-memory pipes).
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upgrade = self.tls.clone().map(tls_upgrade);
        let (r, w) = tokio::io::split(Box::new(stream) as Conn);
        self.run_connection(r, w, peer, upgrade).await
    }

    /// Greeting and option haggling; after NBD_OPT_STARTTLS, the upgrade and
    /// a second haggle over TLS. Gives the (possibly new) halves back.
    async fn handshake<R, W>(
        &self,
        mut reader: BufReader<R>,
        mut w: W,
        upgrade: Option<Upgrade<R, W>>,
    ) -> io::Result<(handshake::Outcome, BufReader<R>, W)>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        use handshake::{Outcome, TlsPhase};
        let phase = match (&self.tls, &upgrade) {
            (Some(t), Some(_)) => TlsPhase::Offered {
                required: t.required,
            },
            _ => TlsPhase::Unavailable,
        };
        let first = handshake::negotiate(
            &mut reader,
            &mut w,
            self.registry.as_ref(),
            &self.config,
            phase,
        )
        .await?;
        let Outcome::StartTls { no_zeroes } = first else {
            return Ok((first, reader, w));
        };
        let Some(upgrade) = upgrade else {
            return Err(handshake::protocol_error("TLS upgrade without TLS"));
        };
        // The client must wait for our ACK before its TLS handshake: bytes
        // already buffered would be lost to TLS, so they end the session.
        if !reader.buffer().is_empty() {
            return Err(handshake::protocol_error(
                "client sent data before the TLS handshake",
            ));
        }
        let (r, mut w) = upgrade(reader.into_inner(), w).await.map_err(|e| {
            tracing::info!(error = %e, "NBD TLS handshake failed; closed (the client needs a certificate from the cluster CA, and must trust it)");
            e
        })?;
        let mut reader = BufReader::with_capacity(READ_BUFFER, r);
        let second = handshake::haggle(
            &mut reader,
            &mut w,
            self.registry.as_ref(),
            &self.config,
            no_zeroes,
            TlsPhase::Active,
        )
        .await?;
        Ok((second, reader, w))
    }

    async fn run_connection<R, W>(
        self: Arc<Self>,
        r: R,
        w: W,
        peer: String,
        upgrade: Option<Upgrade<R, W>>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Dropping the stream halves on return closes the socket at once.
        let Some(_permit) = self.reserve_connection(&peer) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connected_at_unix = now_unix();
        let (close_tx, mut close_rx) = watch::channel(false);
        {
            let mut conns = self.conns();
            if conns.shutting_down {
                return;
            }
            conns.slots.insert(
                id,
                Slot {
                    info: None,
                    close: close_tx,
                },
            );
        }
        let _guard = SlotGuard { server: &self, id };
        let mut close = Box::pin(async move {
            // Err means the sender is gone, which only happens as we exit.
            let _ = close_rx.wait_for(|closed| *closed).await;
        });
        let span = tracing::debug_span!("nbd", conn = id, peer = %peer);
        tracing::debug!(parent: &span, "connected");

        let reader = BufReader::with_capacity(READ_BUFFER, r);
        let handshake = tokio::time::timeout(
            self.config.handshake_timeout,
            self.handshake(reader, w, upgrade),
        );
        let negotiated = tokio::select! {
            _ = &mut close => {
                tracing::debug!(parent: &span, "closed during handshake");
                return;
            }
            res = handshake => match res {
                Ok(res) => res,
                Err(_) => {
                    tracing::info!(
                        parent: &span,
                        "handshake not finished within {:?}; closed (nbd_handshake_timeout_secs in the daemon config)",
                        self.config.handshake_timeout
                    );
                    return;
                }
            },
        };
        let (n, mut reader, w) = match negotiated {
            Ok((handshake::Outcome::Transmission(n), reader, w)) => (n, reader, w),
            Ok(_) => {
                tracing::debug!(parent: &span, "handshake ended without an export");
                return;
            }
            Err(e) => {
                tracing::debug!(parent: &span, error = %e, "handshake failed");
                return;
            }
        };
        tracing::debug!(
            parent: &span,
            export = %n.name,
            structured = n.structured,
            block_status = n.meta_context.is_some(),
            flags = n.flags,
            "entered transmission"
        );
        if let Some(slot) = self.conns().slots.get_mut(&id) {
            slot.info = Some(ClientInfo {
                id,
                export: n.name.clone(),
                peer: peer.clone(),
                connected_at_unix,
            });
        }
        let session = Session {
            size: n.export.size(),
            read_only: n.export.read_only(),
            fast_zero: n.export.can_fast_zero(),
            export: n.export,
            structured: n.structured,
            meta_context: n.meta_context,
            max_payload: self.config.max_payload,
            min_block: self.config.min_block,
            max_in_flight: self.config.max_in_flight,
            max_in_flight_bytes: self.config.max_in_flight_bytes(),
            budget: self.budget.clone(),
        };
        let end = transmission::run(session, &mut reader, w, &mut close).await;
        match end {
            End::Disconnect => tracing::debug!(parent: &span, "client disconnected"),
            End::Closed => tracing::debug!(parent: &span, "closed by server"),
            End::Io(e) => tracing::debug!(parent: &span, error = %e, "connection lost"),
            End::Protocol(why) => {
                tracing::warn!(parent: &span, reason = why, "protocol violation; closed")
            }
        }
    }

    /// Connections that completed the handshake into an export.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut v: Vec<ClientInfo> = self
            .conns()
            .slots
            .values()
            .filter_map(|s| s.info.clone())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Closes every connection using export `name`: each stops reading new
    /// requests, answers those in flight (waiting at most
    /// [`transmission::CLOSE_GRACE`]) and drops the socket. Returns how many
    /// connections were told to close; it does not wait for them.
    pub fn disconnect_export(&self, name: &str) -> usize {
        let conns = self.conns();
        let mut n = 0;
        for slot in conns.slots.values() {
            if slot.info.as_ref().is_some_and(|i| i.export == name) {
                slot.close.send_replace(true);
                n += 1;
            }
        }
        n
    }

    /// Stops the accept loops and closes every connection (in-flight requests
    /// are answered first, as for [`Server::disconnect_export`]).
    pub fn shutdown(&self) {
        let mut conns = self.conns();
        conns.shutting_down = true;
        for slot in conns.slots.values() {
            slot.close.send_replace(true);
        }
        drop(conns);
        self.shutdown.send_replace(true);
    }
}
