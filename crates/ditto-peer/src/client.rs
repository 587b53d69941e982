//! The remote replica backend: a replica on another node, reached over the
//! peer protocol, driven by the volume engine like a local file.
//!
//! Requests are pipelined on one connection (each gets an id; replies come
//! back in any order). A lost connection is never resumed: the server may
//! have restarted, lost its cache or been replaced, so every operation fails
//! from then on, the engine fails the replica out, and a re-add connects
//! anew and judges the superblock it is shown.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::{Allocation, BackendError, BoxFuture, ReplicaBackend};
use ditto_format::Superblock;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::tls::PeerTls;
use crate::wire::{
    decode_runs, Frame, FrameError, Hello, HelloOk, Kind, Status, MAX_PAYLOAD, VERSION,
};

/// Why a remote replica could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach peer {addr}: {source}; check that its daemon runs and listens there (peer_listen)")]
    Unreachable { addr: String, source: io::Error },
    #[error("peer {addr} is not on loopback and no TLS is configured: peers talk plain TCP only on 127.0.0.0/8; set peer_tls in the config")]
    PlainNotLoopback { addr: String },
    #[error("TLS with peer {addr} (expected node {peer}) failed: {why}; the peer needs a certificate from this cluster's CA for its node name (`ditto cert node {peer}`)")]
    Tls {
        addr: String,
        peer: String,
        why: String,
    },
    #[error("peer {addr} did not answer the hello within {seconds} s")]
    Timeout { addr: String, seconds: u64 },
    #[error("peer {addr}: {source}")]
    Protocol { addr: String, source: FrameError },
    #[error("peer {addr} refused replica {replica}: {why}")]
    Refused {
        addr: String,
        replica: Uuid,
        why: String,
    },
    #[error("peer {addr}: node {node} is the primary of this volume (epoch {epoch}): {why}")]
    Superseded {
        addr: String,
        node: String,
        epoch: u64,
        why: String,
    },
    #[error("peer {addr} answered with replica {got} of volume {volume}, not the replica {want} that was asked for; refused")]
    WrongReplica {
        addr: String,
        want: Uuid,
        got: Uuid,
        volume: Uuid,
    },
}

// Ordered, so a lost connection fails its waiters in one order (the
// simulator replays a seed exactly).
type Waiters = Arc<Mutex<BTreeMap<u64, oneshot::Sender<Frame>>>>;

/// A byte stream to a peer: plain TCP (loopback only) or TLS.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> PeerStream for T {}
type Stream = Box<dyn PeerStream>;

/// Opens the byte stream to a peer address in place of TCP: the
/// simulator's network. Its streams are used as given (no TLS, no loopback
/// check), so only code embedding the peer client can set one.
pub type Connector =
    Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Box<dyn PeerStream>>> + Send + Sync>;

/// How this node dials a peer: its own name, the name the peer must prove
/// (its certificate), and TLS, which is required unless the address is on
/// loopback.
#[derive(Clone)]
pub struct Dial {
    pub me: String,
    pub peer: String,
    pub tls: Option<PeerTls>,
    /// A transport other than TCP (None: TCP, the daemon's).
    pub connector: Option<Connector>,
}

impl Dial {
    async fn open(&self, addr: &str) -> Result<Stream, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable {
            addr: addr.into(),
            source,
        };
        if let Some(connect) = &self.connector {
            return connect(addr.to_string()).await.map_err(unreachable);
        }
        let tcp = TcpStream::connect(addr).await.map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            let remote = tcp.peer_addr().map_err(unreachable)?;
            if !remote.ip().is_loopback() {
                return Err(ConnectError::PlainNotLoopback { addr: addr.into() });
            }
            return Ok(Box::new(tcp));
        };
        let name = PeerTls::server_name(&self.peer).map_err(|e| ConnectError::Tls {
            addr: addr.into(),
            peer: self.peer.clone(),
            why: e.to_string(),
        })?;
        let stream = tls
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Tls {
                addr: addr.into(),
                peer: self.peer.clone(),
                why: e.to_string(),
            })?;
        Ok(Box::new(stream))
    }
}

pub struct RemoteReplica {
    location: String,
    superblock: Mutex<Superblock>,
    /// The generation requests carry: the newest this connection has seen
    /// in a superblock. The server refuses anything older than its own.
    session_generation: AtomicU64,
    next_id: AtomicU64,
    tx: mpsc::Sender<Frame>,
    waiters: Waiters,
    /// Why the connection is gone, once it is.
    lost: Arc<Mutex<Option<String>>>,
    sb_write: tokio::sync::Mutex<()>,
    /// The features both sides speak (the hello's answer).
    features: u64,
}

impl std::fmt::Debug for RemoteReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReplica")
            .field("location", &self.location)
            .finish()
    }
}

/// Connect and say hello for `replica` of `volume` (both nil: a control
/// session). Returns the halves and the node's answer.
async fn open_session(
    addr: &str,
    dial: &Dial,
    volume: Uuid,
    replica: Uuid,
    timeout: Duration,
) -> Result<(ReadHalf<Stream>, WriteHalf<Stream>, HelloOk), ConnectError> {
    let seconds = timeout.as_secs();
    let stream = match tokio::time::timeout(timeout, dial.open(addr)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ConnectError::Timeout {
                addr: addr.into(),
                seconds,
            })
        }
    };
    let (mut r, mut w) = tokio::io::split(stream);
    let protocol = |source| ConnectError::Protocol {
        addr: addr.into(),
        source,
    };
    let hello = Hello {
        min_version: VERSION,
        max_version: VERSION,
        features: crate::wire::KNOWN_FEATURES,
        required_features: 0,
        volume,
        replica,
        node: dial.me.clone(),
    };
    let answer = tokio::time::timeout(timeout, async {
        Frame {
            payload: hello.encode()?,
            ..Frame::new(Kind::Hello, 0)
        }
        .write_to(&mut w)
        .await?;
        Frame::read_from(&mut r, 64 << 10).await
    })
    .await
    .map_err(|_| ConnectError::Timeout {
        addr: addr.into(),
        seconds,
    })?
    .map_err(|e| match e {
        // In TLS 1.3 the node judges our certificate after our side of
        // the handshake: its refusal arrives as an alert on first read.
        FrameError::Io(io) if dial.tls.is_some() => ConnectError::Tls {
            addr: addr.into(),
            peer: dial.peer.clone(),
            why: io.to_string(),
        },
        other => protocol(other),
    })?;
    match answer.kind {
        Kind::HelloOk => {}
        Kind::Reply if answer.arg == Status::Superseded as u64 => {
            return Err(superseded(addr, &answer.payload))
        }
        Kind::Reply | Kind::Goodbye => {
            return Err(ConnectError::Refused {
                addr: addr.into(),
                replica,
                why: String::from_utf8_lossy(&answer.payload).into_owned(),
            })
        }
        other => {
            return Err(protocol(FrameError::Malformed {
                what: "hello reply",
                why: format!("got a {other:?} frame"),
            }))
        }
    }
    let ok = HelloOk::decode(&answer.payload).map_err(protocol)?;
    Ok((r, w, ok))
}

/// Ask the node at `addr` to create a replica in one of its pools.
pub async fn create_replica(
    addr: &str,
    dial: &Dial,
    req: &crate::wire::CreateReplica,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let payload = req.encode().map_err(|source| ConnectError::Protocol {
        addr: addr.into(),
        source,
    })?;
    control(
        addr,
        dial,
        (Kind::CreateReplica, 0),
        payload,
        req.replica,
        timeout,
    )
    .await?;
    Ok(())
}

/// Ask the node at `addr` to delete a replica it holds for this node.
pub async fn delete_replica(
    addr: &str,
    dial: &Dial,
    volume: Uuid,
    replica: Uuid,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let payload = crate::wire::encode_replica_ref(volume, replica);
    control(
        addr,
        dial,
        (Kind::DeleteReplica, 0),
        payload,
        replica,
        timeout,
    )
    .await?;
    Ok(())
}

/// Ask the node at `addr`, the primary of `volume`, to hand it over to this
/// node; returns the volume's replicas and its epoch there. `discard`: this
/// node keeps its own diverged data (a split brain resolved in its favour),
/// so the primary hands over without its replica being in sync
/// ([`crate::wire::DEMOTE_DISCARD`]).
pub async fn demote(
    addr: &str,
    dial: &Dial,
    volume: Uuid,
    discard: bool,
    timeout: Duration,
) -> Result<crate::wire::PrimaryClaim, ConnectError> {
    let payload = crate::wire::encode_replica_ref(volume, Uuid::nil());
    let flags = if discard {
        crate::wire::DEMOTE_DISCARD
    } else {
        0
    };
    let answer = control(
        addr,
        dial,
        (Kind::Demote, flags),
        payload,
        Uuid::nil(),
        timeout,
    )
    .await?;
    crate::wire::PrimaryClaim::decode(&answer.reply).map_err(|source| ConnectError::Protocol {
        addr: addr.into(),
        source,
    })
}

/// Tell the node at `addr`, which holds replicas of `claim.volume` (or is
/// its tiebreaker), that this node is its primary at `claim.epoch` with
/// `claim.members`. A tiebreaker answers with the membership record it
/// held before the claim.
pub async fn claim_primary(
    addr: &str,
    dial: &Dial,
    claim: &crate::wire::PrimaryClaim,
    timeout: Duration,
) -> Result<Option<ditto_engine::VoteRecord>, ConnectError> {
    let answer = control(
        addr,
        dial,
        (Kind::Primary, 0),
        claim.encode(),
        Uuid::nil(),
        timeout,
    )
    .await?;
    vote_record_reply(addr, &answer.reply)
}

/// A reply that carries a tiebreaker's vote record, or nothing.
fn vote_record_reply(
    addr: &str,
    reply: &[u8],
) -> Result<Option<ditto_engine::VoteRecord>, ConnectError> {
    if reply.is_empty() {
        return Ok(None);
    }
    crate::wire::decode_vote_record(reply)
        .map(Some)
        .map_err(|source| ConnectError::Protocol {
            addr: addr.into(),
            source,
        })
}

/// Ask the node at `addr`, the volume's diskless tiebreaker, to create,
/// update, delete or show its witness record; a query answers with the
/// vote record it holds.
pub async fn witness(
    addr: &str,
    dial: &Dial,
    op: crate::wire::WitnessOp,
    req: &crate::wire::WitnessRequest,
    timeout: Duration,
) -> Result<Option<ditto_engine::VoteRecord>, ConnectError> {
    let answer = control(
        addr,
        dial,
        (Kind::Witness, op as u64),
        req.encode(),
        Uuid::nil(),
        timeout,
    )
    .await?;
    vote_record_reply(addr, &answer.reply)
}

/// The volume's diskless tiebreaker on another node, as the engine's
/// [`ditto_engine::Voter`]: each record is one control request.
pub struct RemoteVoter {
    pub node: String,
    pub addr: String,
    pub dial: Dial,
    pub volume: Uuid,
    pub volume_name: String,
    pub timeout: Duration,
}

impl ditto_engine::Voter for RemoteVoter {
    fn domain(&self) -> &str {
        &self.node
    }

    fn record(
        &self,
        record: ditto_engine::VoteRecord,
    ) -> ditto_engine::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let req = crate::wire::WitnessRequest {
                volume: self.volume,
                volume_name: self.volume_name.clone(),
                record,
            };
            witness(
                &self.addr,
                &self.dial,
                crate::wire::WitnessOp::Record,
                &req,
                self.timeout,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }
}

/// Ask the node at `addr` to take `volume` over from this node now.
pub async fn take_over(
    addr: &str,
    dial: &Dial,
    volume: Uuid,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let payload = crate::wire::encode_replica_ref(volume, Uuid::nil());
    control(
        addr,
        dial,
        (Kind::TakeOver, 0),
        payload,
        Uuid::nil(),
        timeout,
    )
    .await?;
    Ok(())
}

/// The pools of the node at `addr` that can hold a replica, with their room.
pub async fn list_pools(
    addr: &str,
    dial: &Dial,
    timeout: Duration,
) -> Result<Vec<crate::wire::PoolRoom>, ConnectError> {
    let answer = control(
        addr,
        dial,
        (Kind::ListPools, 0),
        Bytes::new(),
        Uuid::nil(),
        timeout,
    )
    .await?;
    crate::wire::decode_pools(&answer.reply).map_err(|source| ConnectError::Protocol {
        addr: addr.into(),
        source,
    })
}

fn superseded(addr: &str, payload: &[u8]) -> ConnectError {
    match crate::wire::Superseded::decode(payload) {
        Ok(s) => ConnectError::Superseded {
            addr: addr.into(),
            node: s.node,
            epoch: s.epoch,
            why: s.why,
        },
        Err(source) => ConnectError::Protocol {
            addr: addr.into(),
            source,
        },
    }
}

/// What a ping of a node found.
#[derive(Debug, Clone)]
pub struct Pong {
    /// Protocol version the node agreed to.
    pub version: u16,
    /// Round trip of one request on an open session.
    pub rtt: Duration,
    /// The name the node gave for itself.
    pub node: String,
}

/// Connect to the node at `addr` (proving who each side is, with TLS), and
/// time one request.
pub async fn ping(addr: &str, dial: &Dial, timeout: Duration) -> Result<Pong, ConnectError> {
    let answer = control(
        addr,
        dial,
        (Kind::Ping, 0),
        Bytes::new(),
        Uuid::nil(),
        timeout,
    )
    .await?;
    Ok(Pong {
        version: answer.hello.version,
        rtt: answer.rtt,
        node: String::from_utf8_lossy(&answer.reply).into_owned(),
    })
}

/// The answer to one control request.
struct ControlAnswer {
    hello: HelloOk,
    /// The Ok reply's payload.
    reply: Bytes,
    /// From sending the request to its reply (the session already open).
    rtt: Duration,
}

/// One request on a new control session; a reply that is not Ok is a
/// refusal (about `replica`, when it names one) with the node's reason.
/// One request on a control session: `(kind, arg)` and its payload.
async fn control(
    addr: &str,
    dial: &Dial,
    (kind, arg): (Kind, u64),
    payload: Bytes,
    replica: Uuid,
    timeout: Duration,
) -> Result<ControlAnswer, ConnectError> {
    let (mut r, mut w, hello) = open_session(addr, dial, Uuid::nil(), Uuid::nil(), timeout).await?;
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(timeout, async {
        Frame {
            payload,
            arg,
            ..Frame::new(kind, 1)
        }
        .write_to(&mut w)
        .await?;
        Frame::read_from(&mut r, 1 << 20).await
    })
    .await
    .map_err(|_| ConnectError::Timeout {
        addr: addr.into(),
        seconds: timeout.as_secs(),
    })?
    .map_err(|source| ConnectError::Protocol {
        addr: addr.into(),
        source,
    })?;
    if answer.kind == Kind::Reply && answer.arg == Status::Superseded as u64 {
        return Err(superseded(addr, &answer.payload));
    }
    if answer.kind != Kind::Reply || answer.arg != Status::Ok as u64 {
        return Err(ConnectError::Refused {
            addr: addr.into(),
            replica,
            why: String::from_utf8_lossy(&answer.payload).into_owned(),
        });
    }
    Ok(ControlAnswer {
        hello,
        reply: answer.payload,
        rtt: started.elapsed(),
    })
}

impl RemoteReplica {
    /// Connect to `addr`, open `replica` of `volume` there and read its superblock.
    pub async fn connect(
        addr: &str,
        dial: &Dial,
        volume: Uuid,
        replica: Uuid,
        timeout: Duration,
    ) -> Result<Arc<RemoteReplica>, ConnectError> {
        let (r, w, ok) = open_session(addr, dial, volume, replica, timeout).await?;
        let mut r = r;
        let protocol = |source| ConnectError::Protocol {
            addr: addr.into(),
            source,
        };
        let sb = Superblock::decode(&ok.superblock).map_err(|e| {
            protocol(FrameError::Malformed {
                what: "superblock",
                why: e.to_string(),
            })
        })?;
        if sb.replica_uuid != replica || sb.volume_uuid != volume {
            return Err(ConnectError::WrongReplica {
                addr: addr.into(),
                want: replica,
                got: sb.replica_uuid,
                volume: sb.volume_uuid,
            });
        }
        let location = format!("peer://{addr}/{replica}");
        let (tx, rx) = mpsc::channel::<Frame>(1024);
        let waiters: Waiters = Arc::new(Mutex::new(BTreeMap::new()));
        let lost = Arc::new(Mutex::new(None));
        tokio::spawn(write_frames(rx, w, lost.clone(), waiters.clone()));
        {
            let (waiters, lost, location) = (waiters.clone(), lost.clone(), location.clone());
            tokio::spawn(async move {
                let why = read_replies(&mut r, &waiters).await;
                tracing::warn!(replica = %location, "peer connection lost: {why}");
                mark_lost(&lost, &waiters, why);
            });
        }
        Ok(Arc::new(RemoteReplica {
            location,
            session_generation: AtomicU64::new(sb.generation),
            superblock: Mutex::new(sb),
            next_id: AtomicU64::new(1),
            tx,
            waiters,
            lost,
            sb_write: tokio::sync::Mutex::new(()),
            features: ok.features,
        }))
    }

    fn lost_error(&self, op: &'static str) -> Option<BackendError> {
        let lost = self.lost.lock().ok()?.clone()?;
        Some(self.io_error(
            op,
            io::ErrorKind::NotConnected,
            format!("connection to the peer was lost ({lost}); it is not resumed: re-add the replica (`ditto replica readd`) to connect again and check it"),
        ))
    }

    fn io_error(&self, op: &'static str, kind: io::ErrorKind, msg: String) -> BackendError {
        BackendError::Io {
            op,
            location: self.location.clone(),
            source: io::Error::new(kind, msg),
        }
    }

    /// Send one request and wait for its reply; a reply that is not `Ok`
    /// becomes the error its status names.
    async fn call(&self, op: &'static str, mut f: Frame) -> Result<Frame, BackendError> {
        if let Some(e) = self.lost_error(op) {
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        f.id = id;
        f.generation = f
            .generation
            .max(self.session_generation.load(Ordering::Acquire));
        let (done, wait) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id, done);
        }
        // The loss is recorded before the waiters are dropped: checked again
        // after inserting, no waiter can be left that nothing will wake.
        if let Some(e) = self.lost_error(op) {
            if let Ok(mut w) = self.waiters.lock() {
                w.remove(&id);
            }
            return Err(e);
        }
        if self.tx.send(f).await.is_err() {
            return Err(self.lost_error(op).unwrap_or_else(|| {
                self.io_error(
                    op,
                    io::ErrorKind::NotConnected,
                    "peer connection closed".into(),
                )
            }));
        }
        let reply = match wait.await {
            Ok(r) => r,
            Err(_) => {
                return Err(self.lost_error(op).unwrap_or_else(|| {
                    self.io_error(
                        op,
                        io::ErrorKind::NotConnected,
                        "peer connection closed".into(),
                    )
                }))
            }
        };
        let status = Status::from_u64(reply.arg);
        if status == Some(Status::Ok) {
            return Ok(reply);
        }
        let msg = String::from_utf8_lossy(&reply.payload).into_owned();
        let kind = match status {
            Some(Status::NoSpace) => io::ErrorKind::StorageFull,
            Some(Status::Unsupported) => io::ErrorKind::Unsupported,
            Some(Status::Fenced) => io::ErrorKind::PermissionDenied,
            Some(Status::Invalid) => io::ErrorKind::InvalidInput,
            Some(Status::Timeout) => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        Err(self.io_error(op, kind, format!("peer: {msg}")))
    }

    async fn simple(
        &self,
        op: &'static str,
        kind: Kind,
        offset: u64,
        arg: u64,
        payload: Bytes,
    ) -> Result<Frame, BackendError> {
        let f = Frame {
            offset,
            arg,
            payload,
            ..Frame::new(kind, 0)
        };
        self.call(op, f).await
    }
}

fn mark_lost(lost: &Mutex<Option<String>>, waiters: &Waiters, why: String) {
    if let Ok(mut l) = lost.lock() {
        l.get_or_insert(why);
    }
    // Dropping the senders wakes every waiter with the loss.
    if let Ok(mut w) = waiters.lock() {
        w.clear();
    }
}

async fn write_frames(
    mut rx: mpsc::Receiver<Frame>,
    w: WriteHalf<Stream>,
    lost: Arc<Mutex<Option<String>>>,
    waiters: Waiters,
) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(f) = rx.recv().await {
        let mut r = f.write_to(&mut w).await;
        // Batch what is queued already into the same flush.
        while r.is_ok() {
            match rx.try_recv() {
                Ok(next) => r = next.write_to(&mut w).await,
                Err(_) => break,
            }
        }
        if let Err(e) = r {
            mark_lost(&lost, &waiters, e.to_string());
            return;
        }
        if let Err(e) = w.flush().await {
            mark_lost(&lost, &waiters, e.to_string());
            return;
        }
    }
}

/// Dispatch replies to their waiters until the connection fails; returns why.
async fn read_replies(r: &mut ReadHalf<Stream>, waiters: &Waiters) -> String {
    loop {
        let f = match Frame::read_from(r, MAX_PAYLOAD).await {
            Ok(f) => f,
            Err(e) => return e.to_string(),
        };
        match f.kind {
            Kind::Reply => {
                let waiter = waiters.lock().ok().and_then(|mut w| w.remove(&f.id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(f);
                    }
                    None => {
                        return format!("the peer answered request {} that is not in flight", f.id)
                    }
                }
            }
            Kind::Goodbye => {
                return format!("the peer closed: {}", String::from_utf8_lossy(&f.payload))
            }
            other => return format!("the peer sent a {other:?} frame where replies are expected"),
        }
    }
}

fn ok_unit(r: Result<Frame, BackendError>) -> Result<(), BackendError> {
    r.map(|_| ())
}

impl ReplicaBackend for RemoteReplica {
    fn location(&self) -> &str {
        &self.location
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().ok()?.clone()
    }

    fn superblock(&self) -> Superblock {
        match self.superblock.lock() {
            Ok(sb) => sb.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write_superblock(&self, sb: Superblock) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let _one = self.sb_write.lock().await;
            let encoded = sb.encode().map_err(|source| BackendError::Format {
                location: self.location.clone(),
                source,
            })?;
            let f = Frame {
                generation: sb.generation,
                payload: Bytes::from(encoded),
                ..Frame::new(Kind::WriteSuperblock, 0)
            };
            self.call("write superblock", f).await?;
            self.session_generation
                .fetch_max(sb.generation, Ordering::AcqRel);
            if let Ok(mut cur) = self.superblock.lock() {
                *cur = sb;
            }
            Ok(())
        })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            let reply = self
                .simple("read", Kind::Read, offset, len as u64, Bytes::new())
                .await?;
            if reply.payload.len() != len {
                return Err(self.io_error(
                    "read",
                    io::ErrorKind::InvalidData,
                    format!(
                        "peer returned {} bytes for a {len}-byte read",
                        reply.payload.len()
                    ),
                ));
            }
            Ok(reply.payload)
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { ok_unit(self.simple("write", Kind::Write, offset, 0, data).await) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(
            async move { ok_unit(self.simple("flush", Kind::Flush, 0, 0, Bytes::new()).await) },
        )
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            ok_unit(
                self.simple("discard", Kind::Discard, offset, len, Bytes::new())
                    .await,
            )
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            ok_unit(
                self.simple("write zeroes", Kind::WriteZeroes, offset, len, Bytes::new())
                    .await,
            )
        })
    }

    fn holds(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<bool, BackendError>> {
        Box::pin(async move {
            if self.features & crate::wire::FEATURE_DIGEST == 0 {
                return Ok(false);
            }
            let len = data.len() as u64;
            let reply = self
                .simple("digest", Kind::Digest, offset, len, Bytes::new())
                .await?;
            Ok(reply.payload == crate::wire::digest(&data))
        })
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Allocation>, BackendError>> {
        Box::pin(async move {
            let reply = self
                .simple("allocation", Kind::Allocation, offset, len, Bytes::new())
                .await?;
            decode_runs(&reply.payload)
                .map_err(|e| self.io_error("allocation", io::ErrorKind::InvalidData, e.to_string()))
        })
    }

    fn read_dirty_map(&self) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            let reply = self
                .simple("read dirty map", Kind::ReadDirtyMap, 0, 0, Bytes::new())
                .await?;
            Ok(reply.payload)
        })
    }

    fn write_dirty_map(
        &self,
        first_block: u64,
        blocks: Bytes,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            ok_unit(
                self.simple(
                    "write dirty map",
                    Kind::WriteDirtyMap,
                    first_block,
                    0,
                    blocks,
                )
                .await,
            )
        })
    }
}
