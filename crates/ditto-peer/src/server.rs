//! The replica server: exposes this node's replicas to primaries on other
//! nodes. Each connection opens one replica (by volume and replica uuid),
//! then runs its requests concurrently (pipelined, replies in completion
//! order), bounded in bytes. The server owns the replica's superblock and
//! fences: only the newest connection may use a replica, and its
//! superblock generation never goes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::{BackendError, BoxFuture, ReplicaBackend};
use ditto_format::{Layout, Superblock};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::tls::{cert_names_node, PeerTls};
use crate::wire::{
    CreateReplica, Frame, FrameError, Hello, HelloOk, Kind, Status, KNOWN_FEATURES, MAX_PAYLOAD,
    VERSION,
};

/// A replica this node serves, with its fence.
pub struct ServedReplica {
    pub backend: Arc<dyn ReplicaBackend>,
    /// Data requests hold it shared from their generation check to their
    /// completion; superblock writes hold it exclusive, so no request that
    /// passed the check against an older generation lands after a newer one
    /// is durable.
    fence: tokio::sync::RwLock<()>,
    /// The connection that may use the replica: each hello takes a new
    /// number, and requests of older connections are refused. A primary that
    /// reconnects (a re-add) so never races its own dead connection's writes.
    session: std::sync::atomic::AtomicU64,
    /// Copied from the superblock, so requests do not clone it: the layout
    /// never changes, the generation only under the exclusive fence.
    replica: Uuid,
    layout: Layout,
    generation: std::sync::atomic::AtomicU64,
}

impl ServedReplica {
    pub fn new(backend: Arc<dyn ReplicaBackend>) -> Arc<Self> {
        let sb = backend.superblock();
        Arc::new(ServedReplica {
            backend,
            fence: tokio::sync::RwLock::new(()),
            session: std::sync::atomic::AtomicU64::new(0),
            replica: sb.replica_uuid,
            layout: sb.layout,
            generation: std::sync::atomic::AtomicU64::new(sb.generation),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Make a new connection the replica's only one: older connections'
    /// requests are refused from now on, and those already running finish
    /// before this returns (they hold the fence shared).
    async fn open_session(&self) -> u64 {
        let session = self.session.fetch_add(1, Ordering::AcqRel) + 1;
        drop(self.fence.write().await);
        session
    }

    /// Refuse every connection's requests from now on (the replica is being
    /// deleted); returns once those already running have finished.
    pub async fn retire(&self) {
        self.open_session().await;
    }
}

/// Where the server finds the replicas it may serve.
pub trait ReplicaRegistry: Send + Sync + 'static {
    fn lookup(&self, volume: Uuid, replica: Uuid) -> Option<Arc<ServedReplica>>;
    /// Create (format and record) a replica that node `from` asked for, and
    /// serve it from then on. The error says why not, for that node's user.
    fn create(&self, from: &str, req: CreateReplica) -> BoxFuture<'_, Result<(), String>> {
        let _ = (from, req);
        Box::pin(async { Err("this node does not create replicas for peers".to_string()) })
    }
    /// Node `from` takes volume `volume` over: stop being its primary here
    /// and hold its replicas for `from`. Returns the volume's replicas and
    /// the epoch it had here (the new primary's is one more).
    fn demote(
        &self,
        from: &str,
        volume: Uuid,
        discard: bool,
    ) -> BoxFuture<'_, Result<crate::wire::PrimaryClaim, String>> {
        let _ = (from, volume, discard);
        Box::pin(async { Err("this node does not hand volumes over".to_string()) })
    }
    /// Whether node `from` may open replicas of `volume` here: refused when
    /// another node is its primary (this one, or the one whose newer epoch
    /// the held replicas follow). The default registry fences nothing.
    fn check_primary(&self, from: &str, volume: Uuid) -> Result<(), crate::wire::Superseded> {
        let _ = (from, volume);
        Ok(())
    }
    /// Node `from` says it is the primary of a volume ([`Kind::Primary`]).
    /// Refused with the primary this node follows when the claim's epoch is
    /// older than that one's. The default registry accepts and keeps nothing.
    /// A tiebreaker of the volume answers with the membership record it
    /// held before the claim ([`crate::witness::Witness::claim`]).
    fn claim(
        &self,
        from: &str,
        claim: crate::wire::PrimaryClaim,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, crate::wire::Superseded>> {
        let _ = (from, claim);
        Box::pin(async { Ok(None) })
    }
    /// Node `from` asks this node, the volume's diskless tiebreaker, to
    /// create, update or delete its witness record ([`Kind::Witness`]).
    fn witness(
        &self,
        from: &str,
        op: crate::wire::WitnessOp,
        req: crate::wire::WitnessRequest,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, Refusal>> {
        let _ = (from, op, req);
        Box::pin(async {
            Err(Refusal::Invalid(
                "this node is no tiebreaker for volumes".to_string(),
            ))
        })
    }
    /// Node `from`, the primary of `volume`, asks this node to take it over
    /// (a planned promote here).
    fn take_over(&self, from: &str, volume: Uuid) -> BoxFuture<'_, Result<(), String>> {
        let _ = (from, volume);
        Box::pin(async { Err("this node does not take volumes over".to_string()) })
    }
    /// The pools that can hold a replica for another node, with their room.
    fn pools(&self) -> Vec<crate::wire::PoolRoom> {
        Vec::new()
    }
    /// Stop serving and delete a replica node `from` had created here.
    fn delete(&self, from: &str, volume: Uuid, replica: Uuid) -> BoxFuture<'_, Result<(), String>> {
        let _ = (from, volume, replica);
        Box::pin(async { Err("this node does not delete replicas for peers".to_string()) })
    }
}

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another node is the volume's primary here.
    Superseded(crate::wire::Superseded),
    /// The request cannot be done; the text says why.
    Invalid(String),
}

/// A fixed set of replicas, keyed by (volume, replica) uuid.
#[derive(Default)]
pub struct StaticRegistry {
    replicas: Mutex<HashMap<(Uuid, Uuid), Arc<ServedReplica>>>,
}

impl StaticRegistry {
    pub fn insert(&self, backend: Arc<dyn ReplicaBackend>) -> Arc<ServedReplica> {
        let sb = backend.superblock();
        let served = ServedReplica::new(backend);
        if let Ok(mut m) = self.replicas.lock() {
            m.insert((sb.volume_uuid, sb.replica_uuid), served.clone());
        }
        served
    }
}

impl ReplicaRegistry for StaticRegistry {
    fn lookup(&self, volume: Uuid, replica: Uuid) -> Option<Arc<ServedReplica>> {
        self.replicas.lock().ok()?.get(&(volume, replica)).cloned()
    }
}

/// Limits that keep a hostile or broken peer from exhausting the daemon.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Request payload and read bytes all peer connections together may
    /// have in flight; one connection holds at most a quarter of it (and at
    /// least one largest frame), so a few peers that never read their
    /// replies cannot pin all of it.
    pub in_flight_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            in_flight_bytes: 256 << 20,
        }
    }
}

impl ServerLimits {
    /// The node's budget, at least one largest frame.
    fn total_bytes(&self) -> usize {
        self.in_flight_bytes.max(MAX_PAYLOAD as usize)
    }

    /// One connection's share of it.
    fn per_connection_bytes(&self) -> usize {
        (self.total_bytes() / 4).max(MAX_PAYLOAD as usize)
    }
}

/// How peers prove who they are.
#[derive(Clone)]
pub enum PeerAuth {
    /// Plain TCP, accepted only from loopback addresses (tests, one machine).
    LoopbackPlain,
    /// Mutual TLS: a certificate from the cluster CA, valid for the node name
    /// the hello claims, and that name known to this node.
    Tls {
        tls: PeerTls,
        known: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    },
}

/// Told of every refused peer (for the node's events).
pub type RefusalHook = Arc<dyn Fn(&str) + Send + Sync>;

pub struct PeerServer {
    registry: Arc<dyn ReplicaRegistry>,
    limits: ServerLimits,
    /// The bytes all connections' requests hold ([`ServerLimits::in_flight_bytes`]).
    budget: Arc<Semaphore>,
    node: String,
    auth: PeerAuth,
    on_refusal: Option<RefusalHook>,
}

impl PeerServer {
    pub fn new(
        node: impl Into<String>,
        registry: Arc<dyn ReplicaRegistry>,
        limits: ServerLimits,
        auth: PeerAuth,
    ) -> Arc<Self> {
        Self::with_refusal_hook(node, registry, limits, auth, None)
    }

    pub fn with_refusal_hook(
        node: impl Into<String>,
        registry: Arc<dyn ReplicaRegistry>,
        limits: ServerLimits,
        auth: PeerAuth,
        on_refusal: Option<RefusalHook>,
    ) -> Arc<Self> {
        Arc::new(PeerServer {
            registry,
            budget: Arc::new(Semaphore::new(limits.total_bytes())),
            limits,
            node: node.into(),
            auth,
            on_refusal,
        })
    }

    /// Request bytes held by all connections now; never more than
    /// [`ServerLimits::in_flight_bytes`] (or one largest frame, if larger).
    pub fn in_flight_bytes(&self) -> usize {
        self.limits
            .total_bytes()
            .saturating_sub(self.budget.available_permits())
    }

    /// Log a refused peer, and tell the hook.
    fn refused(&self, why: &str) {
        tracing::warn!("peer refused: {why}");
        if let Some(hook) = &self.on_refusal {
            hook(why);
        }
    }

    /// Authenticate one accepted connection, then run it.
    async fn accept(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> Result<(), FrameError> {
        let tls = match &self.auth {
            PeerAuth::LoopbackPlain => {
                if !addr.ip().is_loopback() {
                    self.refused(&format!("{addr} is not on loopback, and without peer_tls only loopback peers are accepted; configure peer_tls (`ditto cert`)"));
                    return Ok(());
                }
                let (r, w) = stream.into_split();
                return self.connection(r, w, addr, None).await;
            }
            PeerAuth::Tls { tls, .. } => tls.clone(),
        };
        let accepted =
            tokio::time::timeout(self.limits.handshake_timeout, tls.acceptor.accept(stream)).await;
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.refused(&format!("TLS handshake with {addr} failed: {e} (a certificate from another CA, an expired one, or none)"));
                return Ok(());
            }
            Err(_) => {
                self.refused(&format!(
                    "{addr} did not finish the TLS handshake within {:?}",
                    self.limits.handshake_timeout
                ));
                return Ok(());
            }
        };
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let (r, w) = tokio::io::split(stream);
        self.connection(r, w, addr, cert).await
    }

    /// Accept connections until the listener fails. The connections belong
    /// to this future: dropping it (a stopping node) closes every one.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, addr) = listener.accept().await?;
            while connections.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(peer = %addr, limit = self.limits.max_connections, "peer connection refused: too many connections");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            connections.spawn(async move {
                let _slot = slot;
                if let Err(e) = me.accept(stream, addr).await {
                    tracing::warn!(peer = %addr, error = %e, "peer connection closed");
                }
            });
        }
    }

    /// Run one connection on a stream from a transport the caller trusts
    /// (the simulator's network): no TLS and no loopback check, the peer is
    /// the node its hello names. The daemon uses [`PeerServer::serve`].
    pub async fn serve_trusted<S>(
        self: Arc<Self>,
        stream: S,
        addr: SocketAddr,
    ) -> Result<(), FrameError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.connection(r, w, addr, None).await
    }

    /// Run one connection: handshake, then requests until it closes.
    async fn connection<R, W>(
        self: Arc<Self>,
        mut r: R,
        mut w: W,
        addr: SocketAddr,
        cert: Option<CertificateDer<'static>>,
    ) -> Result<(), FrameError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let hello = match tokio::time::timeout(
            self.limits.handshake_timeout,
            Frame::read_from(&mut r, 4096),
        )
        .await
        {
            Ok(f) => f?,
            Err(_) => {
                return Err(FrameError::Malformed {
                    what: "handshake",
                    why: format!("no hello within {:?}", self.limits.handshake_timeout),
                })
            }
        };
        let (served, session) = match self.accept_hello(&hello, cert.as_ref(), &mut w).await? {
            Opened::Refused => return Ok(()),
            Opened::Control(peer) => return self.control(r, w, &peer).await,
            Opened::Replica(served, session) => (served, session),
        };
        tracing::info!(peer = %addr, replica = %served.backend.location(), "peer opened replica");
        // A reply travels with the bytes its request reserved, released only
        // once it is written: replies queued for a peer that does not read
        // them stay within the budget too.
        type Reserved = Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>;
        let (tx, mut rx) = mpsc::channel::<(Frame, Reserved)>(1024);
        let writer = tokio::spawn(async move {
            while let Some((f, reserved)) = rx.recv().await {
                f.write_to(&mut w).await?;
                drop(reserved);
            }
            Ok::<(), FrameError>(())
        });
        let mine = Arc::new(Semaphore::new(self.limits.per_connection_bytes()));
        let result = loop {
            // Reserve the request's bytes (its payload, or what it reads) in
            // this connection's share and in the node's budget before the
            // payload is read or the read is done.
            let head = match Frame::read_head(&mut r, MAX_PAYLOAD).await {
                Ok(h) => h,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break Ok(())
                }
                Err(e) => {
                    let _ = tx.send((goodbye(&e.to_string()), None)).await;
                    break Err(e);
                }
            };
            let cost = request_cost(&head).clamp(1, self.limits.per_connection_bytes()) as u32;
            let (Ok(own), Ok(shared)) = (
                mine.clone().acquire_many_owned(cost).await,
                self.budget.clone().acquire_many_owned(cost).await,
            ) else {
                break Ok(());
            };
            let frame = match head.read_payload(&mut r).await {
                Ok(f) => f,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break Ok(())
                }
                Err(e) => {
                    let _ = tx.send((goodbye(&e.to_string()), None)).await;
                    break Err(e);
                }
            };
            let served = served.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let reply = handle(&served, session, frame).await;
                let _ = tx.send((reply, Some((own, shared)))).await;
            });
        };
        drop(tx);
        let _ = writer.await;
        result
    }

    /// Check the hello and answer it; the replica it opens, or None when refused.
    async fn accept_hello<W: AsyncWrite + Unpin>(
        &self,
        f: &Frame,
        cert: Option<&CertificateDer<'static>>,
        w: &mut W,
    ) -> Result<Opened, FrameError> {
        if f.kind != Kind::Hello {
            let why = format!("expected a hello, got {:?}", f.kind);
            goodbye(&why).write_to(w).await?;
            return Err(FrameError::Malformed {
                what: "handshake",
                why,
            });
        }
        let hello = Hello::decode(&f.payload)?;
        let refuse = |status: Status, why: String| Frame::reply(f.id, 0, status, Bytes::from(why));
        if hello.min_version > VERSION || hello.max_version < VERSION {
            let why = format!(
                "node {} speaks peer protocol versions {}..={}, node {} speaks {VERSION}; upgrade the older daemon",
                hello.node, hello.min_version, hello.max_version, self.node
            );
            self.refused(&why);
            refuse(Status::Version, why).write_to(w).await?;
            return Ok(Opened::Refused);
        }
        let unknown = hello.required_features & !KNOWN_FEATURES;
        if unknown != 0 {
            let why = format!("node {} requires peer features {unknown:#x} that node {} does not know; upgrade it", hello.node, self.node);
            self.refused(&why);
            refuse(Status::Version, why).write_to(w).await?;
            return Ok(Opened::Refused);
        }
        if let PeerAuth::Tls { known, .. } = &self.auth {
            let why = if !cert.is_some_and(|c| cert_names_node(c, &hello.node)) {
                Some(format!(
                    "the peer says it is node {:?}, but its certificate is not issued for that name",
                    hello.node
                ))
            } else if !known(&hello.node) {
                Some(format!(
                    "node {:?} is not a node this node knows; add it with `ditto node add {} --address HOST:PORT`",
                    hello.node, hello.node
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.refused(&why);
                refuse(Status::Unauthorized, why).write_to(w).await?;
                return Ok(Opened::Refused);
            }
        }
        if hello.volume.is_nil() && hello.replica.is_nil() {
            let ok = HelloOk {
                version: VERSION,
                features: hello.features & KNOWN_FEATURES,
                superblock: Bytes::new(),
            };
            Frame {
                payload: ok.encode(),
                ..Frame::new(Kind::HelloOk, f.id)
            }
            .write_to(w)
            .await?;
            return Ok(Opened::Control(hello.node));
        }
        if let Err(superseded) = self.registry.check_primary(&hello.node, hello.volume) {
            tracing::warn!(from = %hello.node, volume = %hello.volume, primary = %superseded.node, epoch = superseded.epoch, "replica session refused: {}", superseded.why);
            Frame::reply(f.id, 0, Status::Superseded, superseded.encode())
                .write_to(w)
                .await?;
            return Ok(Opened::Refused);
        }
        let Some(served) = self.registry.lookup(hello.volume, hello.replica) else {
            let why = format!(
                "node {} holds no replica {} of volume {}; check the replica's node with `ditto status`",
                self.node, hello.replica, hello.volume
            );
            tracing::warn!(from = %hello.node, "{why}");
            refuse(Status::UnknownReplica, why).write_to(w).await?;
            return Ok(Opened::Refused);
        };
        let session = served.open_session().await;
        let sb = served.backend.superblock();
        let encoded = sb.encode().map_err(|e| FrameError::Malformed {
            what: "superblock",
            why: e.to_string(),
        })?;
        let ok = HelloOk {
            version: VERSION,
            features: hello.features & KNOWN_FEATURES,
            superblock: Bytes::from(encoded),
        };
        Frame {
            generation: sb.generation,
            payload: ok.encode(),
            ..Frame::new(Kind::HelloOk, f.id)
        }
        .write_to(w)
        .await?;
        Ok(Opened::Replica(served, session))
    }
}

/// What a hello opened.
enum Opened {
    Refused,
    /// A control session (nil volume and replica) from the named node.
    Control(String),
    Replica(Arc<ServedReplica>, u64),
}

impl PeerServer {
    /// A control session: node-level requests, one at a time.
    async fn control<R, W>(&self, mut r: R, mut w: W, peer: &str) -> Result<(), FrameError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let f = match Frame::read_from(&mut r, 64 << 10).await {
                Ok(f) => f,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            let reply = match f.kind {
                Kind::CreateReplica => match CreateReplica::decode(&f.payload) {
                    Err(e) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(e.to_string())),
                    Ok(req) => match self.registry.create(peer, req).await {
                        Ok(()) => Frame::reply(f.id, 0, Status::Ok, Bytes::new()),
                        Err(why) => {
                            self.refused(&format!("node {peer}: cannot create replica: {why}"));
                            Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why))
                        }
                    },
                },
                // The reply names this node: `node add` checks it is the one meant.
                Kind::Ping => Frame::reply(f.id, 0, Status::Ok, Bytes::from(self.node.clone())),
                Kind::TakeOver => match crate::wire::decode_replica_ref(&f.payload) {
                    Err(e) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(e.to_string())),
                    Ok((volume, _)) => match self.registry.take_over(peer, volume).await {
                        Ok(()) => Frame::reply(f.id, 0, Status::Ok, Bytes::new()),
                        Err(why) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why)),
                    },
                },
                Kind::ListPools => Frame::reply(
                    f.id,
                    0,
                    Status::Ok,
                    crate::wire::encode_pools(&self.registry.pools()),
                ),
                Kind::Primary => match crate::wire::PrimaryClaim::decode(&f.payload) {
                    Err(e) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(e.to_string())),
                    Ok(claim) => match self.registry.claim(peer, claim).await {
                        Ok(None) => Frame::reply(f.id, 0, Status::Ok, Bytes::new()),
                        Ok(Some(record)) => Frame::reply(
                            f.id,
                            0,
                            Status::Ok,
                            crate::wire::encode_vote_record(&record),
                        ),
                        Err(s) => Frame::reply(f.id, 0, Status::Superseded, s.encode()),
                    },
                },
                Kind::Witness => {
                    let parsed = crate::wire::WitnessOp::from_u64(f.arg)
                        .ok_or_else(|| format!("unknown witness operation {}", f.arg))
                        .and_then(|op| {
                            crate::wire::WitnessRequest::decode(&f.payload)
                                .map(|req| (op, req))
                                .map_err(|e| e.to_string())
                        });
                    match parsed {
                        Err(why) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why)),
                        Ok((op, req)) => match self.registry.witness(peer, op, req).await {
                            Ok(None) => Frame::reply(f.id, 0, Status::Ok, Bytes::new()),
                            Ok(Some(record)) => Frame::reply(
                                f.id,
                                0,
                                Status::Ok,
                                crate::wire::encode_vote_record(&record),
                            ),
                            Err(Refusal::Superseded(s)) => {
                                Frame::reply(f.id, 0, Status::Superseded, s.encode())
                            }
                            Err(Refusal::Invalid(why)) => {
                                Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why))
                            }
                        },
                    }
                }
                Kind::Demote => match crate::wire::decode_replica_ref(&f.payload) {
                    Err(e) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(e.to_string())),
                    Ok((volume, _)) => match self
                        .registry
                        .demote(peer, volume, f.arg & crate::wire::DEMOTE_DISCARD != 0)
                        .await
                    {
                        Ok(claim) => Frame::reply(f.id, 0, Status::Ok, claim.encode()),
                        Err(why) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why)),
                    },
                },
                Kind::DeleteReplica => match crate::wire::decode_replica_ref(&f.payload) {
                    Err(e) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(e.to_string())),
                    Ok((volume, replica)) => {
                        match self.registry.delete(peer, volume, replica).await {
                            Ok(()) => Frame::reply(f.id, 0, Status::Ok, Bytes::new()),
                            Err(why) => Frame::reply(f.id, 0, Status::Invalid, Bytes::from(why)),
                        }
                    }
                },
                other => Frame::reply(
                    f.id,
                    0,
                    Status::Invalid,
                    Bytes::from(format!("{other:?} is not a control request")),
                ),
            };
            reply.write_to(&mut w).await?;
        }
    }
}

fn goodbye(why: &str) -> Frame {
    Frame {
        payload: Bytes::copy_from_slice(why.as_bytes()),
        ..Frame::new(Kind::Goodbye, 0)
    }
}

/// Bytes a request holds while in flight: its payload, or what it reads.
fn request_cost(f: &crate::wire::FrameHead) -> usize {
    match f.kind() {
        Kind::Read | Kind::Digest => f.arg().min(u64::from(MAX_PAYLOAD)) as usize,
        Kind::ReadDirtyMap => MAX_PAYLOAD as usize / 16,
        _ => f.payload_len() as usize,
    }
}

fn status_of(e: &BackendError) -> Status {
    match e {
        BackendError::Io { source, .. } => match source.raw_os_error() {
            Some(28) => Status::NoSpace, // ENOSPC on Linux
            _ if source.kind() == std::io::ErrorKind::Unsupported => Status::Unsupported,
            _ => Status::Io,
        },
        BackendError::Timeout { .. } | BackendError::Abandoned { .. } => Status::Timeout,
        BackendError::Format { .. } | BackendError::TooSmall { .. } => Status::Io,
    }
}

/// Execute one request against the served replica.
async fn handle(served: &ServedReplica, session: u64, f: Frame) -> Frame {
    let reply =
        |status: Status, payload: Bytes| Frame::reply(f.id, served.generation(), status, payload);
    let invalid = |why: String| reply(Status::Invalid, Bytes::from(why));
    let fail = |e: BackendError| reply(status_of(&e), Bytes::from(e.to_string()));
    let superseded = || {
        reply(
            Status::Fenced,
            Bytes::from(format!(
                "request refused: a newer connection opened replica {} (a re-add, or another primary took this volume over)",
                served.replica
            )),
        )
    };
    if f.kind == Kind::WriteSuperblock {
        let _exclusive = served.fence.write().await;
        if served.session.load(Ordering::Acquire) != session {
            return superseded();
        }
        return match check_superblock(&served.backend.superblock(), &f) {
            Err(r) => reply(r.0, Bytes::from(r.1)),
            Ok(new) => {
                let generation = new.generation;
                match served.backend.write_superblock(new).await {
                    Ok(()) => {
                        served.generation.store(generation, Ordering::Release);
                        reply(Status::Ok, Bytes::new())
                    }
                    Err(e) => fail(e),
                }
            }
        };
    }
    let _shared = served.fence.read().await;
    if served.session.load(Ordering::Acquire) != session {
        return superseded();
    }
    // Data requests are fenced by connection (only the newest may write)
    // and, at the hello, by epoch; not by generation: the primary's own
    // superblock write races its requests in flight on this connection
    // (they run concurrently here), and refusing those failed healthy
    // replicas out at every membership change (cluster simulator, seed 1).
    let size = served.layout.volume_size;
    let in_range = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);
    match f.kind {
        Kind::Read => {
            if f.arg > u64::from(MAX_PAYLOAD) || !in_range(f.offset, f.arg) {
                return invalid(format!("read of {} bytes at {} outside the {size}-byte volume or over the {MAX_PAYLOAD}-byte limit", f.arg, f.offset));
            }
            match served.backend.read(f.offset, f.arg as usize).await {
                Ok(data) => reply(Status::Ok, data),
                Err(e) => fail(e),
            }
        }
        Kind::Write => {
            if !in_range(f.offset, f.payload.len() as u64) {
                return invalid(format!(
                    "write of {} bytes at {} outside the {size}-byte volume",
                    f.payload.len(),
                    f.offset
                ));
            }
            match served.backend.write(f.offset, f.payload.clone()).await {
                Ok(()) => reply(Status::Ok, Bytes::new()),
                Err(e) => fail(e),
            }
        }
        Kind::Flush => match served.backend.flush().await {
            Ok(()) => reply(Status::Ok, Bytes::new()),
            Err(e) => fail(e),
        },
        Kind::Discard | Kind::WriteZeroes => {
            if !in_range(f.offset, f.arg) {
                return invalid(format!(
                    "zeroing of {} bytes at {} outside the {size}-byte volume",
                    f.arg, f.offset
                ));
            }
            let r = if f.kind == Kind::Discard {
                served.backend.discard(f.offset, f.arg).await
            } else {
                served.backend.write_zeroes(f.offset, f.arg).await
            };
            match r {
                Ok(()) => reply(Status::Ok, Bytes::new()),
                Err(e) => fail(e),
            }
        }
        Kind::Digest => {
            if f.arg > u64::from(MAX_PAYLOAD) || !in_range(f.offset, f.arg) {
                return invalid(format!("digest of {} bytes at {} outside the {size}-byte volume or over the {MAX_PAYLOAD}-byte limit", f.arg, f.offset));
            }
            match served.backend.read(f.offset, f.arg as usize).await {
                Ok(data) => reply(Status::Ok, crate::wire::digest(&data)),
                Err(e) => fail(e),
            }
        }
        Kind::Allocation => {
            if !in_range(f.offset, f.arg) {
                return invalid(format!(
                    "allocation query of {} bytes at {} outside the {size}-byte volume",
                    f.arg, f.offset
                ));
            }
            match served.backend.allocation(f.offset, f.arg).await {
                // Bounded: a reply larger than a frame is cut at the last run that fits.
                Ok(runs) => {
                    let max = MAX_PAYLOAD as usize / 24;
                    reply(
                        Status::Ok,
                        crate::wire::encode_runs(&runs[..runs.len().min(max)]),
                    )
                }
                Err(e) => fail(e),
            }
        }
        Kind::ReadDirtyMap => match served.backend.read_dirty_map().await {
            Ok(map) if map.len() <= MAX_PAYLOAD as usize => reply(Status::Ok, map),
            Ok(map) => invalid(format!("dirty map of {} bytes exceeds a frame", map.len())),
            Err(e) => fail(e),
        },
        Kind::WriteDirtyMap => {
            let blocks = f.payload.len() as u64;
            let ok = blocks.is_multiple_of(4096)
                && f.offset
                    .checked_mul(4096)
                    .and_then(|s| s.checked_add(blocks))
                    .is_some_and(|end| end <= served.layout.dirty_map_len);
            if !ok {
                return invalid(format!(
                    "dirty map write of {blocks} bytes at block {} outside the {}-byte map",
                    f.offset, served.layout.dirty_map_len
                ));
            }
            match served
                .backend
                .write_dirty_map(f.offset, f.payload.clone())
                .await
            {
                Ok(()) => reply(Status::Ok, Bytes::new()),
                Err(e) => fail(e),
            }
        }
        Kind::Hello
        | Kind::HelloOk
        | Kind::Reply
        | Kind::Goodbye
        | Kind::WriteSuperblock
        | Kind::CreateReplica
        | Kind::DeleteReplica
        | Kind::Ping
        | Kind::Demote
        | Kind::Primary
        | Kind::ListPools
        | Kind::Witness
        | Kind::TakeOver => invalid(format!("{:?} is not a request", f.kind)),
    }
}

/// A superblock write must name this replica and keep its layout, and may
/// not take its generation back.
fn check_superblock(current: &Superblock, f: &Frame) -> Result<Superblock, (Status, String)> {
    let new = Superblock::decode(&f.payload)
        .map_err(|e| (Status::Invalid, format!("superblock: {e}")))?;
    if new.volume_uuid != current.volume_uuid
        || new.replica_uuid != current.replica_uuid
        || new.layout != current.layout
    {
        return Err((
            Status::Invalid,
            "superblock names another volume, replica or layout".into(),
        ));
    }
    if f.generation < current.generation || new.generation < current.generation {
        return Err((
            Status::Fenced,
            format!(
                "superblock at generation {} refused: replica {} is at generation {}; another primary took this volume over",
                new.generation.min(f.generation),
                current.replica_uuid,
                current.generation
            ),
        ));
    }
    Ok(new)
}
