//! The cluster mode: several simulated nodes on a simulated network, each
//! holding one replica of one volume with majority quorum, talking the real
//! peer protocol to each other.
//!
//! Each node is a turmoil host. What runs there is ditto's own code: the
//! volume engine on the primary, [`ditto_peer::RemoteReplica`] to the other
//! nodes' replicas over turmoil TCP, [`ditto_peer::PeerServer`] serving this
//! node's replica, and the fencing rule of [`ditto_peer::fence`]. The node's
//! orchestration (promote, step down, re-add) follows the daemon's
//! (`crates/ditto-node/src/node/peering.rs`) in a few lines per job.
//!
//! The network: turmoil delays and reorders segments (reassembled in order,
//! as TCP does); a partition *holds* a link's segments (TCP retransmits:
//! nothing is lost, only late), healed either by releasing them or by
//! resetting the link's connections (`Net::reset`, what TCP's timeout
//! does). Nodes crash (kill -9, or power loss: unflushed writes resolve at
//! random) and restart; any node may be told to promote itself.
//!
//! The checker: every acknowledged write reads back at the end, from
//! whichever primary the nodes converge on (the single-node model,
//! [`Model`]); and at most one node's writes are acknowledged for one
//! (epoch, generation) of the volume.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ditto_engine::{
    BoxFuture, EngineError, Event as EngineEvent, EventSink, FileReplica, IoFile, Member,
    MissingReplica, NoQuorum, ReplicaBackend, ReplicaState, Volume, VolumeOptions,
};
use ditto_format::Layout;
use ditto_peer::client::{ConnectError, Connector, Dial, PeerStream};
use ditto_peer::fence::{self, ClaimVerdict};
use ditto_peer::server::{PeerAuth, ServedReplica, ServerLimits};
use ditto_peer::wire::{MemberRef, PrimaryClaim, Superseded};
use ditto_peer::{PeerServer, RemoteReplica, ReplicaRegistry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::disk::{CrashMode, SimDisk};
use crate::model::{decode, fill, Model, BLOCK};
use crate::rng::SimRng;
use crate::world::{install_panic_hook, take_panics};

const PORT: u16 = 10811;
/// How long a node waits for another to answer a control request.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Sizes and timeouts of one cluster run.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nodes: usize,
    pub volume_size: u64,
    pub region_size: u32,
    pub io_timeout: Duration,
    pub tick: Duration,
    /// Record a readable log (for a failing seed).
    pub verbose: bool,
    /// The last node holds no replica: it is the volume's diskless
    /// tiebreaker (two data nodes and a voter).
    pub tiebreaker: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: 3,
            volume_size: 2 << 20,
            region_size: 64 << 10,
            io_timeout: Duration::from_secs(2),
            tick: Duration::from_millis(1),
            verbose: false,
            tiebreaker: false,
        }
    }
}

/// What the checker found. All but [`ClusterCheck::Liveness`] are safety
/// violations; liveness (the nodes converge on one primary once healed) is
/// known not to hold in every seed yet (docs/replication.md, "The cluster simulator").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterCheck {
    /// An acknowledged write did not read back at the end.
    LostWrite,
    /// A block held bytes no write produced.
    Garbage,
    /// Two nodes acknowledged writes for one (epoch, generation).
    TwoPrimaries,
    /// The nodes did not converge on one primary with every replica in sync.
    Liveness,
    /// ditto's code panicked.
    Panic,
}

#[derive(Debug, Clone)]
pub struct ClusterViolation {
    pub check: ClusterCheck,
    pub at: Duration,
    pub message: String,
}

impl ClusterCheck {
    pub fn is_safety(self) -> bool {
        self != ClusterCheck::Liveness
    }
}

impl fmt::Display for ClusterViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} at {:.3} s: {}",
            self.check,
            self.at.as_secs_f64(),
            self.message
        )
    }
}

/// Counts of one run.
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    pub writes: u64,
    pub acked: u64,
    pub flushes: u64,
    pub promotes: u64,
    pub promoted: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub resets: u64,
    pub primaries_seen: u64,
}

impl ClusterStats {
    pub fn add(&mut self, o: &ClusterStats) {
        self.writes += o.writes;
        self.acked += o.acked;
        self.flushes += o.flushes;
        self.promotes += o.promotes;
        self.promoted += o.promoted;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.resets += o.resets;
        self.primaries_seen += o.primaries_seen;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

// ---------------------------------------------------------------- network

/// One connection's fault state: once broken, every read and write fails
/// with a reset, and its pending reader and writer are woken to see it.
#[derive(Default)]
struct ConnState {
    broken: AtomicBool,
    wakers: Mutex<[Option<Waker>; 2]>,
}

/// A turmoil TCP stream the driver can reset.
struct FaultStream {
    inner: turmoil::net::TcpStream,
    state: Arc<ConnState>,
}

impl FaultStream {
    fn check(&self, cx: &Context<'_>, slot: usize) -> Option<io::Error> {
        if self.state.broken.load(Ordering::Acquire) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset (simulated)",
            ));
        }
        lock(&self.state.wakers)[slot] = Some(cx.waker().clone());
        None
    }
}

impl AsyncRead for FaultStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx, 0) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check(cx, 1) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx, 1) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections between nodes, so the driver can reset a link's.
#[derive(Default)]
struct Net {
    ips: Mutex<BTreeMap<IpAddr, usize>>,
    conns: Mutex<Vec<(usize, usize, Weak<ConnState>)>>,
}

impl Net {
    fn node_of(&self, ip: IpAddr) -> usize {
        lock(&self.ips).get(&ip).copied().unwrap_or(usize::MAX)
    }

    fn wrap(&self, a: usize, b: usize, inner: turmoil::net::TcpStream) -> FaultStream {
        let state = Arc::new(ConnState::default());
        let mut conns = lock(&self.conns);
        conns.retain(|(_, _, w)| w.strong_count() > 0);
        conns.push((a.min(b), a.max(b), Arc::downgrade(&state)));
        FaultStream { inner, state }
    }

    /// Reset every connection between nodes `a` and `b`.
    fn reset(&self, a: usize, b: usize) {
        let (lo, hi) = (a.min(b), a.max(b));
        for (x, y, w) in lock(&self.conns).iter() {
            if (*x, *y) != (lo, hi) {
                continue;
            }
            if let Some(s) = w.upgrade() {
                s.broken.store(true, Ordering::Release);
                for waker in lock(&s.wakers).iter_mut().filter_map(Option::take) {
                    waker.wake();
                }
            }
        }
    }
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn addr_of(i: usize) -> String {
    format!("{}:{PORT}", node_name(i))
}

// ---------------------------------------------------------------- nodes

/// A node's durable role (its store: survives crashes, durable when set).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Primary { epoch: u64 },
    Follows { primary: usize, epoch: u64 },
}

#[derive(Debug, Clone)]
enum Req {
    Write {
        first: u64,
        n: u64,
        id: u64,
        fua: bool,
    },
    Flush,
    Read {
        first: u64,
        n: u64,
    },
    Promote,
}

#[derive(Debug)]
enum Reply {
    /// Done by the primary at this epoch and generation.
    Done {
        epoch: u64,
        generation: u64,
    },
    Data(Bytes),
    Err(String),
}

/// The volume all nodes hold a replica of.
struct Spec {
    uuid: Uuid,
    size: u64,
    layout: Layout,
    /// Replica uuid of each data node (nodes 0..replicas.len()).
    replicas: Vec<Uuid>,
    /// Nodes in all: with a tiebreaker, one more than `replicas`.
    nodes: usize,
    io_timeout: Duration,
    /// Odd seeds resync with checksums (`resync_checksums`, DRBD's
    /// csums-alg), so the path that skips runs meets every fault too.
    resync_checksums: bool,
}

/// What the driver and one node share; lives outside the node's runtime,
/// so it survives its crashes (the disk and the store).
struct NodeShared {
    index: usize,
    disk: Arc<SimDisk>,
    role: Mutex<Role>,
    volume: Mutex<Option<Arc<Volume>>>,
    served: Mutex<Option<Arc<ServedReplica>>>,
    requests: Mutex<VecDeque<(u64, Req)>>,
    notify: Notify,
    completions: Mutex<Vec<(u64, Reply)>>,
    spec: Arc<Spec>,
    net: Arc<Net>,
    log: Option<Arc<Mutex<Vec<String>>>>,
    /// Its replica was formatted (the first boot did it).
    formatted: AtomicBool,
    /// On the tiebreaker node, its witness record (durable, like `role`).
    witness: Mutex<Option<ditto_peer::witness::Witness>>,
}

/// One run (boot) of a node's software; dies with a crash.
struct Boot {
    shared: Arc<NodeShared>,
    /// Serializes role changes, as the daemon's control lock does.
    ops: tokio::sync::Mutex<()>,
    /// One assembly at a time (the daemon's `assembling` set): two would
    /// run two instances of the volume on the same replicas.
    assembling: tokio::sync::Mutex<()>,
}

impl NodeShared {
    fn name(&self) -> String {
        node_name(self.index)
    }

    fn note(&self, text: impl FnOnce() -> String) {
        if let Some(log) = &self.log {
            let now = turmoil::elapsed();
            lock(log).push(format!(
                "{:>9.3} {}: {}",
                now.as_secs_f64(),
                self.name(),
                text()
            ));
        }
    }

    fn role(&self) -> Role {
        lock(&self.role).clone()
    }

    fn volume(&self) -> Option<Arc<Volume>> {
        lock(&self.volume).clone()
    }

    fn dial(self: &Arc<Self>, peer: usize) -> Dial {
        let me = self.index;
        let net = self.net.clone();
        let connector: Connector = Arc::new(move |addr: String| {
            let net = net.clone();
            Box::pin(async move {
                let s = turmoil::net::TcpStream::connect(addr.as_str()).await?;
                let peer = net.node_of(s.peer_addr()?.ip());
                Ok(Box::new(net.wrap(me, peer, s)) as Box<dyn PeerStream>)
            })
        });
        Dial {
            me: self.name(),
            peer: node_name(peer),
            tls: None,
            connector: Some(connector),
        }
    }

    /// Every other node (the tiebreaker too): claims go to all of them.
    fn others(&self) -> Vec<usize> {
        (0..self.spec.nodes).filter(|i| *i != self.index).collect()
    }

    fn is_witness(&self) -> bool {
        self.index >= self.spec.replicas.len()
    }

    /// The tiebreaker's node, when the volume has one.
    fn tiebreaker(&self) -> Option<usize> {
        (self.spec.nodes > self.spec.replicas.len()).then_some(self.spec.replicas.len())
    }

    fn members(&self) -> Vec<MemberRef> {
        self.spec
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| MemberRef {
                replica: *r,
                node: node_name(i),
                pool: "p0".into(),
            })
            .collect()
    }

    fn claim(&self, epoch: u64) -> PrimaryClaim {
        PrimaryClaim {
            volume: self.spec.uuid,
            epoch,
            members: self.members(),
            tiebreaker: self.tiebreaker().map(node_name),
        }
    }

    fn superseded(&self, why: String) -> Superseded {
        if let Some(w) = lock(&self.witness).as_ref() {
            return Superseded {
                node: w.primary.clone(),
                epoch: w.epoch,
                why,
            };
        }
        let (node, epoch) = match self.role() {
            Role::Primary { epoch } => (self.name(), epoch),
            Role::Follows { primary, epoch } => (node_name(primary), epoch),
        };
        Superseded { node, epoch, why }
    }
}

/// A superblock in one line, for the log.
fn describe(sb: &ditto_format::Superblock) -> String {
    let set: Vec<String> = sb
        .replica_set
        .iter()
        .map(|e| {
            format!(
                "{}:{:?}@{}",
                e.replica.as_u64_pair().1 & 0xf,
                e.state,
                e.since_generation
            )
        })
        .collect();
    format!(
        "r{} e{} g{} [{}]{}",
        sb.replica_uuid.as_u64_pair().1 & 0xf,
        sb.epoch,
        sb.generation,
        set.join(" "),
        sb.rebuild_cursor
            .map(|c| format!(" cursor {c}"))
            .unwrap_or_default()
    )
}

struct Sink(Arc<NodeShared>);

impl EventSink for Sink {
    fn emit(&self, e: EngineEvent) {
        self.0
            .note(|| format!("engine {}: {}", e.kind.as_str(), e.message));
    }
}

impl Boot {
    /// Serve this node's replica to the primary it follows.
    async fn serve_replica(&self) {
        let s = &self.shared;
        if s.is_witness() {
            return;
        }
        let file = s.disk.open() as Arc<dyn IoFile>;
        match FileReplica::open_on(file, s.disk.name().to_string(), s.spec.uuid).await {
            Ok(b) => *lock(&s.served) = Some(ServedReplica::new(b)),
            Err(e) => s.note(|| format!("replica cannot be opened: {e}")),
        }
    }

    async fn retire_served(&self) {
        let served = lock(&self.shared.served).take();
        if let Some(served) = served {
            served.retire().await;
        }
    }

    /// Stop running the volume and follow `primary` at `epoch`.
    async fn step_down(&self, primary: usize, epoch: u64) {
        let s = &self.shared;
        let volume = lock(&s.volume).take();
        if let Some(v) = volume {
            let _ = v.close().await;
        }
        *lock(&s.role) = Role::Follows { primary, epoch };
        s.note(|| format!("follows {} at epoch {epoch}", node_name(primary)));
        // An assembly in progress writes this node's replica through its
        // own handle: it is served to the new primary only once that
        // assembly has stopped (`assemble` serves it then), or two writers
        // would share the file (found with the tiebreaker, seed 649).
        if self.assembling.try_lock().is_ok() {
            self.serve_replica().await;
        }
    }

    /// Open the volume as its primary at a new epoch, as the daemon's start
    /// does: the epoch is claimed first, and only the nodes that took the
    /// claim lend their replicas (the others are missing), so no two starts
    /// share an epoch. This node's replica and the others' over the network.
    async fn assemble(self: &Arc<Self>) {
        let s = &self.shared;
        let _one = self.assembling.lock().await;
        if s.volume().is_some() {
            return;
        }
        self.assemble_once().await;
        // Superseded while it ran: the replica is served to the new primary
        // now that this assembly no longer writes it (`step_down` left it).
        let _ops = self.ops.lock().await;
        if matches!(s.role(), Role::Follows { .. }) && lock(&s.served).is_none() {
            self.serve_replica().await;
        }
    }

    async fn assemble_once(self: &Arc<Self>) {
        let s = &self.shared;
        let Some((took, epoch, witnessed)) = self.claim_start().await else {
            return;
        };
        let spec = &s.spec;
        let mut members = Vec::new();
        for (i, id) in spec.replicas.iter().enumerate() {
            let backend: Arc<dyn ReplicaBackend> = if i == s.index {
                let file = s.disk.open() as Arc<dyn IoFile>;
                match FileReplica::open_on(file, s.disk.name().to_string(), spec.uuid).await {
                    Ok(b) => b,
                    Err(e) => Arc::new(MissingReplica::new(
                        s.disk.name(),
                        e.to_string(),
                        spec.uuid,
                        *id,
                        spec.layout,
                    )),
                }
            } else {
                let connected = match took.contains(&i) {
                    true => self.connect(i).await,
                    false => None,
                };
                match connected {
                    Some(b) => b,
                    None => Arc::new(MissingReplica::new(
                        addr_of(i),
                        "node does not answer or did not take this start's claim",
                        spec.uuid,
                        *id,
                        spec.layout,
                    )),
                }
            };
            if s.role() != (Role::Primary { epoch }) {
                return; // superseded while connecting
            }
            members.push(Member::new(*id, node_name(i), backend).in_domain(node_name(i)));
        }
        let options = VolumeOptions {
            io_timeout: spec.io_timeout,
            resync_min_rate: 64 << 20,
            resync_max_rate: 256 << 20,
            dirty_clear_delay: Duration::from_millis(200),
            resync_checksums: spec.resync_checksums,
            quorum: Some(NoQuorum::Error),
            epoch,
            tiebreaker: s.tiebreaker().map(|t| ditto_engine::Tiebreaker {
                voter: Arc::new(ditto_peer::client::RemoteVoter {
                    node: node_name(t),
                    addr: addr_of(t),
                    dial: s.dial(t),
                    volume: spec.uuid,
                    volume_name: "simvol".into(),
                    timeout: PEER_TIMEOUT,
                }),
                claimed: witnessed,
            }),
            ..VolumeOptions::default()
        };
        let sink = Arc::new(Sink(s.clone()));
        let shown: Vec<String> = if s.log.is_some() {
            members
                .iter()
                .map(|m| describe(&m.backend.superblock()))
                .collect()
        } else {
            Vec::new()
        };
        s.note(|| format!("opening at epoch {epoch}: {}", shown.join("; ")));
        match Volume::open("simvol", spec.uuid, spec.size, members, options, sink).await {
            Ok(v) => {
                // Superseded while it opened: this instance must not serve
                // (the daemon's `assemble_once` checks the same).
                let ops = self.ops.lock().await;
                if s.role() != (Role::Primary { epoch }) {
                    drop(ops);
                    s.note(|| format!("opened at epoch {epoch} but superseded meanwhile: closed"));
                    let _ = v.close().await;
                    return;
                }
                s.note(|| {
                    format!(
                        "volume open at epoch {epoch}, generation {}",
                        v.generation()
                    )
                });
                *lock(&s.volume) = Some(v);
                drop(ops);
                self.announce(epoch).await;
            }
            Err(e) => s.note(|| format!("volume does not open: {e}")),
        }
    }

    /// Take a new epoch for a start and claim it at every other node: the
    /// nodes that took it, and the epoch. None when a node names a primary
    /// newer than this node's last epoch (this node steps down to it) or
    /// the role changed meanwhile. With a tiebreaker that took the claim,
    /// also the membership record it held.
    async fn claim_start(
        self: &Arc<Self>,
    ) -> Option<(Vec<usize>, u64, Option<ditto_engine::VoteRecord>)> {
        let s = &self.shared;
        let epoch = {
            let _one = self.ops.lock().await;
            let Role::Primary { epoch: last } = s.role() else {
                return None;
            };
            *lock(&s.role) = Role::Primary { epoch: last + 1 };
            last + 1
        };
        let claim = s.claim(epoch);
        let mut took = Vec::new();
        let mut witnessed = None;
        for i in s.others() {
            let r =
                ditto_peer::client::claim_primary(&addr_of(i), &s.dial(i), &claim, PEER_TIMEOUT)
                    .await;
            match r {
                Ok(record) => {
                    took.push(i);
                    if Some(i) == s.tiebreaker() {
                        witnessed = Some(record.unwrap_or_default());
                    }
                }
                Err(ConnectError::Superseded {
                    node,
                    epoch: theirs,
                    ..
                }) if node != s.name() && theirs >= epoch => {
                    let by = (0..s.spec.nodes).find(|j| node_name(*j) == node)?;
                    let _one = self.ops.lock().await;
                    if s.role() == (Role::Primary { epoch }) {
                        s.note(|| format!("start at epoch {epoch} refused: {node} is primary at epoch {theirs}"));
                        self.step_down(by, theirs).await;
                    }
                    return None;
                }
                Err(e) => {
                    s.note(|| format!("claim at epoch {epoch} not taken by {}: {e}", node_name(i)))
                }
            }
            if s.role() != (Role::Primary { epoch }) {
                return None;
            }
        }
        Some((took, epoch, witnessed))
    }

    /// Connect to node `i`'s replica; a node that follows a newer primary
    /// makes this one step down, one that follows an older one is told.
    async fn connect(self: &Arc<Self>, i: usize) -> Option<Arc<dyn ReplicaBackend>> {
        let s = &self.shared;
        let dial = s.dial(i);
        let r = RemoteReplica::connect(
            &addr_of(i),
            &dial,
            s.spec.uuid,
            s.spec.replicas[i],
            PEER_TIMEOUT,
        )
        .await;
        match r {
            Ok(b) => Some(b as Arc<dyn ReplicaBackend>),
            Err(ConnectError::Superseded { node, epoch, .. }) => {
                self.settle(&node, epoch).await;
                None
            }
            Err(e) => {
                s.note(|| format!("cannot open {}'s replica: {e}", node_name(i)));
                None
            }
        }
    }

    /// A node named `node` as the primary at `epoch`: step down for a newer
    /// epoch, else tell the others this node's.
    async fn settle(self: &Arc<Self>, node: &str, epoch: u64) {
        let Role::Primary { epoch: mine } = self.shared.role() else {
            return;
        };
        let by = (0..self.shared.spec.replicas.len()).find(|i| node_name(*i) == node);
        match by {
            Some(by) if fence::superseded_by_claim(mine, epoch) => {
                let _one = self.ops.lock().await;
                if self.shared.role() == (Role::Primary { epoch: mine }) {
                    self.shared
                        .note(|| format!("superseded: {node} is primary at epoch {epoch}"));
                    self.step_down(by, epoch).await;
                }
            }
            _ => self.announce(mine).await,
        }
    }

    /// Tell every other node that this one is the primary at `epoch`.
    async fn announce(self: &Arc<Self>, epoch: u64) {
        let s = &self.shared;
        let claim = s.claim(epoch);
        for i in s.others() {
            let r =
                ditto_peer::client::claim_primary(&addr_of(i), &s.dial(i), &claim, PEER_TIMEOUT)
                    .await;
            if let Err(ConnectError::Superseded {
                node,
                epoch: theirs,
                ..
            }) = r
            {
                if fence::superseded_by_claim(epoch, theirs) {
                    Box::pin(self.settle(&node, theirs)).await;
                    return;
                }
            }
        }
    }

    /// `ditto volume promote` here: a planned switch-over when the primary
    /// answers, else a takeover with a majority (quorum), as the daemon's
    /// `take_over` does.
    async fn promote(self: &Arc<Self>) -> Reply {
        let s = &self.shared;
        if s.is_witness() {
            return Reply::Err("the tiebreaker holds no data and is never promoted".into());
        }
        let Role::Follows { primary, epoch } = s.role() else {
            return Reply::Err("already the primary".into());
        };
        let dial = s.dial(primary);
        let planned =
            ditto_peer::client::demote(&addr_of(primary), &dial, s.spec.uuid, false, PEER_TIMEOUT)
                .await;
        let new_epoch = match planned {
            Ok(handed) => handed.epoch.max(epoch) + 1,
            Err(e @ (ConnectError::Refused { .. } | ConnectError::Superseded { .. })) => {
                return Reply::Err(format!("not handed over: {e}"));
            }
            Err(_) => {
                let mut reached = 1;
                let voters = s.spec.nodes;
                let others: Vec<usize> = s.others().into_iter().filter(|i| *i != primary).collect();
                for i in &others {
                    if ditto_peer::client::ping(&addr_of(*i), &s.dial(*i), PEER_TIMEOUT)
                        .await
                        .is_ok()
                    {
                        reached += 1;
                    }
                }
                if reached < voters / 2 + 1 {
                    return Reply::Err(format!("no quorum: {reached} of {voters} nodes reached"));
                }
                let claim = s.claim(epoch + 1);
                for i in &others {
                    let r = ditto_peer::client::claim_primary(
                        &addr_of(*i),
                        &s.dial(*i),
                        &claim,
                        PEER_TIMEOUT,
                    )
                    .await;
                    if let Err(e @ ConnectError::Superseded { .. }) = r {
                        return Reply::Err(format!("takeover refused: {e}"));
                    }
                }
                epoch + 1
            }
        };
        {
            let _one = self.ops.lock().await;
            if !matches!(s.role(), Role::Follows { .. }) {
                return Reply::Err("became primary meanwhile".into());
            }
            *lock(&s.role) = Role::Primary { epoch: new_epoch };
            s.note(|| format!("promoted at epoch {new_epoch}"));
            self.retire_served().await;
        }
        self.assemble().await;
        match s.volume() {
            Some(_) => Reply::Done {
                epoch: new_epoch,
                generation: 0,
            },
            None => Reply::Err(format!("primary at epoch {new_epoch}, not started yet")),
        }
    }

    /// The daemon's reconnect loop: start the volume if it is not running,
    /// re-add replicas that are back.
    async fn maintain(self: &Arc<Self>) {
        let s = &self.shared;
        let Role::Primary { epoch } = s.role() else {
            return;
        };
        let Some(volume) = s.volume() else {
            self.assemble().await;
            return;
        };
        // The tiebreaker's heartbeat, as the daemon's reconnect loop sends it.
        volume.refresh_tiebreaker().await;
        // Stranded (no in-sync replica reachable through this instance):
        // closed and started again, as the daemon's reconnect loop does.
        if let Some(why) = volume.stranded() {
            let _one = self.ops.lock().await;
            let same = s.volume().is_some_and(|v| Arc::ptr_eq(&v, &volume));
            if same && s.role() == (Role::Primary { epoch }) {
                s.note(|| format!("restarting the volume: {why}"));
                *lock(&s.volume) = None;
                let _ = volume.close().await;
            }
            return;
        }
        let out: Vec<Uuid> = volume
            .members()
            .iter()
            .filter(|m| m.awaits_readd())
            .map(|m| m.id)
            .collect();
        for i in 0..s.spec.replicas.len() {
            let id = s.spec.replicas[i];
            if !out.contains(&id) {
                continue;
            }
            // This node's own replica, stale after a takeover: caught up
            // from the others, as the daemon's reconnect loop does.
            let backend = if i == s.index {
                let file = s.disk.open() as Arc<dyn IoFile>;
                match FileReplica::open_on(file, s.disk.name().to_string(), s.spec.uuid).await {
                    Ok(b) => Some(b as Arc<dyn ReplicaBackend>),
                    Err(_) => None,
                }
            } else {
                self.connect(i).await
            };
            let Some(backend) = backend else {
                continue;
            };
            if s.role() != (Role::Primary { epoch }) {
                return;
            }
            let _one = self.ops.lock().await;
            match volume.readd(id, backend, false).await {
                Ok(plan) => s.note(|| format!("re-added {}: {plan:?}", node_name(i))),
                // With quorum the returning side had no majority: rebuilt.
                Err(EngineError::SplitBrain { .. }) => {
                    s.note(|| format!("{}'s replica diverged: rebuilt", node_name(i)));
                    drop(_one);
                    if let Some(b) = self.connect(i).await {
                        let _ = volume.readd(id, b, true).await;
                    }
                }
                Err(e) => s.note(|| format!("re-add of {} refused: {e}", node_name(i))),
            }
        }
    }

    async fn serve(self: &Arc<Self>, req: Req) -> Reply {
        if let Req::Promote = req {
            return self.promote().await;
        }
        let s = &self.shared;
        let (Role::Primary { epoch }, Some(v)) = (s.role(), s.volume()) else {
            return Reply::Err("not the primary here".into());
        };
        let r = match req {
            Req::Write { first, n, id, fua } => {
                let mut buf = BytesMut::zeroed((n * BLOCK) as usize);
                fill(&mut buf, id, first);
                v.write(first * BLOCK, buf.freeze(), fua).await
            }
            Req::Flush => v.flush().await,
            Req::Read { first, n } => {
                return match v.read(first * BLOCK, (n * BLOCK) as usize).await {
                    Ok(data) => Reply::Data(data),
                    Err(e) => Reply::Err(e.to_string()),
                }
            }
            Req::Promote => unreachable!("handled above"),
        };
        match r {
            Ok(()) => Reply::Done {
                epoch,
                generation: v.generation(),
            },
            Err(e) => Reply::Err(e.to_string()),
        }
    }
}

/// The fencing a node applies, through [`ditto_peer::fence`].
struct Registry(Arc<Boot>);

impl ReplicaRegistry for Registry {
    fn lookup(&self, volume: Uuid, replica: Uuid) -> Option<Arc<ServedReplica>> {
        let s = &self.0.shared;
        (volume == s.spec.uuid && s.spec.replicas.get(s.index) == Some(&replica))
            .then(|| lock(&s.served).clone())
            .flatten()
    }

    fn check_primary(&self, from: &str, _volume: Uuid) -> Result<(), Superseded> {
        let s = &self.0.shared;
        let followed = match s.role() {
            Role::Primary { .. } => s.name(),
            Role::Follows { primary, .. } => node_name(primary),
        };
        if fence::may_open(Some(&followed), from) {
            Ok(())
        } else {
            Err(s.superseded(format!("{from} is not the primary {followed}")))
        }
    }

    fn claim(
        &self,
        from: &str,
        claim: PrimaryClaim,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, Superseded>> {
        let from = from.to_string();
        Box::pin(async move {
            let boot = &self.0;
            let s = &boot.shared;
            let Some(by) = (0..s.spec.replicas.len()).find(|i| node_name(*i) == from) else {
                return Err(s.superseded(format!("unknown node {from}")));
            };
            let _one = boot.ops.lock().await;
            if let Some(w) = lock(&s.witness).as_mut() {
                let took = w.claim(&s.name(), &from, claim.epoch)?;
                s.note(|| format!("witness follows {from} at epoch {}", claim.epoch));
                return Ok(Some(took));
            }
            match s.role() {
                Role::Primary { epoch } => {
                    if !fence::superseded_by_claim(epoch, claim.epoch) {
                        return Err(s.superseded(format!("primary at epoch {epoch}")));
                    }
                    s.note(|| format!("superseded by {from}'s claim at epoch {}", claim.epoch));
                    boot.step_down(by, claim.epoch).await;
                    Ok(None)
                }
                Role::Follows { primary, epoch } => {
                    match fence::judge_claim(&node_name(primary), epoch, &from, claim.epoch) {
                        ClaimVerdict::Refuse => Err(s.superseded(format!(
                            "follows {} at epoch {epoch}",
                            node_name(primary)
                        ))),
                        ClaimVerdict::Follow => {
                            *lock(&s.role) = Role::Follows {
                                primary: by,
                                epoch: claim.epoch,
                            };
                            Ok(None)
                        }
                        ClaimVerdict::TakeOver => {
                            *lock(&s.role) = Role::Follows {
                                primary: by,
                                epoch: claim.epoch,
                            };
                            s.note(|| format!("follows {from} at epoch {} now", claim.epoch));
                            // The old primary's sessions are refused from here on.
                            let served = lock(&s.served).clone();
                            if let Some(served) = served {
                                served.retire().await;
                            }
                            Ok(None)
                        }
                    }
                }
            }
        })
    }

    fn witness(
        &self,
        from: &str,
        op: ditto_peer::wire::WitnessOp,
        req: ditto_peer::wire::WitnessRequest,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, ditto_peer::server::Refusal>> {
        let from = from.to_string();
        Box::pin(async move {
            let s = &self.0.shared;
            let mut witness = lock(&s.witness);
            let Some(w) = witness.as_mut() else {
                return Err(ditto_peer::server::Refusal::Invalid(
                    "not the tiebreaker".into(),
                ));
            };
            if op != ditto_peer::wire::WitnessOp::Record || req.volume != s.spec.uuid {
                return Err(ditto_peer::server::Refusal::Invalid(format!(
                    "{op:?} of volume {} is not simulated",
                    req.volume
                )));
            }
            w.record(&s.name(), &from, req.record)
                .map(|_| None)
                .map_err(ditto_peer::server::Refusal::Superseded)
        })
    }

    fn demote(
        &self,
        from: &str,
        _volume: Uuid,
        _discard: bool,
    ) -> BoxFuture<'_, Result<PrimaryClaim, String>> {
        let from = from.to_string();
        Box::pin(async move {
            let boot = &self.0;
            let s = &boot.shared;
            let Some(to) = (0..s.spec.replicas.len()).find(|i| node_name(*i) == from) else {
                return Err(format!("unknown node {from}"));
            };
            let _one = boot.ops.lock().await;
            match s.role() {
                Role::Follows { primary, epoch } if primary == to => Ok(s.claim(epoch)),
                Role::Follows { .. } => Err("not the primary".into()),
                Role::Primary { epoch } => {
                    let Some(v) = s.volume() else {
                        return Err("the volume is not running here".into());
                    };
                    let target = s.spec.replicas[to];
                    let state = v.members().iter().find(|m| m.id == target).map(|m| m.state);
                    if state != Some(ReplicaState::InSync) {
                        return Err(format!("{from}'s replica is not in sync"));
                    }
                    if v.abandoned_ops() > 0 {
                        return Err("operations in flight on a hung replica".into());
                    }
                    if let Err(e) = v.close().await {
                        // Closed all the same: started again (at a new
                        // epoch) by the reconnect loop, never left stopped.
                        *lock(&s.volume) = None;
                        return Err(format!("not closed cleanly: {e}"));
                    }
                    *lock(&s.volume) = None;
                    *lock(&s.role) = Role::Follows { primary: to, epoch };
                    s.note(|| format!("handed over to {from} at epoch {epoch}"));
                    boot.serve_replica().await;
                    Ok(s.claim(epoch))
                }
            }
        })
    }
}

/// The node's software: the peer server, the reconnect loop, and requests.
async fn node_main(shared: Arc<NodeShared>) -> turmoil::Result {
    let boot = Arc::new(Boot {
        shared: shared.clone(),
        ops: tokio::sync::Mutex::new(()),
        assembling: tokio::sync::Mutex::new(()),
    });
    if !shared.formatted.load(Ordering::Acquire) && !shared.is_witness() {
        let spec = &shared.spec;
        let file = shared.disk.open() as Arc<dyn IoFile>;
        let name = shared.disk.name().to_string();
        let id = spec.replicas[shared.index];
        FileReplica::format_on(file, name, spec.uuid, id, spec.layout).await?;
    }
    shared.formatted.store(true, Ordering::Release);
    if let Role::Follows { .. } = shared.role() {
        boot.serve_replica().await;
    }
    let server = PeerServer::new(
        shared.name(),
        Arc::new(Registry(boot.clone())),
        ServerLimits::default(),
        PeerAuth::LoopbackPlain,
    );
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, addr)) = listener.accept().await {
                let peer = shared.net.node_of(addr.ip());
                let stream = shared.net.wrap(shared.index, peer, stream);
                tokio::spawn(server.clone().serve_trusted(stream, addr));
            }
        });
    }
    {
        let boot = boot.clone();
        tokio::spawn(async move {
            loop {
                boot.maintain().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    }
    loop {
        let batch: Vec<_> = lock(&shared.requests).drain(..).collect();
        if batch.is_empty() {
            shared.notify.notified().await;
            continue;
        }
        for (id, req) in batch {
            let boot = boot.clone();
            tokio::spawn(async move {
                let reply = boot.serve(req).await;
                lock(&boot.shared.completions).push((id, reply));
            });
        }
    }
}

// ---------------------------------------------------------------- driver

enum Pending {
    Write {
        node: usize,
        first: u64,
        n: u64,
        fua: bool,
    },
    Flush {
        node: usize,
        cover: u64,
    },
    Read {
        first: u64,
        n: u64,
        floors: Vec<u64>,
        check: bool,
    },
    Promote {
        node: usize,
    },
}

/// One seed's cluster: the turmoil simulation, the nodes and the checker.
pub struct Cluster {
    sim: turmoil::Sim<'static>,
    nodes: Vec<Arc<NodeShared>>,
    net: Arc<Net>,
    cfg: ClusterConfig,
    rng: SimRng,
    crash_rng: SimRng,
    model: Model,
    busy: Vec<bool>,
    inflight: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Which node acknowledged writes at each (epoch, generation).
    acked_by: BTreeMap<(u64, u64), usize>,
    /// Links held now (partitioned), as (lo, hi) node pairs.
    held: BTreeSet<(usize, usize)>,
    pub stats: ClusterStats,
    violation: Option<ClusterViolation>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    /// Three (or `cfg.nodes`) nodes, the volume formatted on each, node 0 its primary.
    pub fn new(seed: u64, cfg: ClusterConfig) -> Result<Cluster, ClusterViolation> {
        install_panic_hook();
        let _ = take_panics();
        let fail = |m: String| ClusterViolation {
            check: ClusterCheck::Liveness,
            at: Duration::ZERO,
            message: m,
        };
        let layout =
            Layout::new(cfg.volume_size, cfg.region_size).map_err(|e| fail(e.to_string()))?;
        let spec = Arc::new(Spec {
            uuid: Uuid::from_u64_pair(seed, 0xc1u64),
            size: cfg.volume_size,
            layout,
            replicas: (0..cfg.nodes - usize::from(cfg.tiebreaker))
                .map(|i| Uuid::from_u64_pair(seed, 0x100 + i as u64))
                .collect(),
            nodes: cfg.nodes,
            io_timeout: cfg.io_timeout,
            resync_checksums: seed % 2 == 1,
        });
        let mut sim = turmoil::Builder::new()
            .tick_duration(cfg.tick)
            .simulation_duration(Duration::from_secs(1 << 40))
            .min_message_latency(Duration::from_micros(100))
            .max_message_latency(Duration::from_millis(2))
            .tcp_capacity(1 << 16)
            .rng_seed(seed)
            .build();
        let net = Arc::new(Net::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut nodes = Vec::new();
        for i in 0..cfg.nodes {
            let disk = SimDisk::new(
                format!("n{i}-disk"),
                layout.replica_len(),
                seed ^ (i as u64) << 32,
            );
            let shared = Arc::new(NodeShared {
                index: i,
                disk,
                role: Mutex::new(if i == 0 {
                    Role::Primary { epoch: 1 }
                } else {
                    Role::Follows {
                        primary: 0,
                        epoch: 1,
                    }
                }),
                volume: Mutex::new(None),
                served: Mutex::new(None),
                requests: Mutex::new(VecDeque::new()),
                notify: Notify::new(),
                completions: Mutex::new(Vec::new()),
                spec: spec.clone(),
                net: net.clone(),
                log: cfg.verbose.then(|| log.clone()),
                formatted: AtomicBool::new(false),
                witness: Mutex::new((cfg.tiebreaker && i == cfg.nodes - 1).then(|| {
                    ditto_peer::witness::Witness {
                        volume: spec.uuid,
                        volume_name: "simvol".into(),
                        primary: node_name(0),
                        epoch: 1,
                        record: ditto_engine::VoteRecord::default(),
                    }
                })),
            });
            nodes.push(shared);
        }
        for n in &nodes {
            let shared = n.clone();
            sim.host(node_name(n.index), move || node_main(shared.clone()));
        }
        for i in 0..cfg.nodes {
            lock(&net.ips).insert(sim.lookup(node_name(i)), i);
        }
        let blocks = cfg.volume_size / BLOCK;
        let mut c = Cluster {
            sim,
            nodes,
            net,
            rng: SimRng::stream(seed, "cluster"),
            crash_rng: SimRng::stream(seed, "cluster-crash"),
            cfg,
            model: Model::new(blocks),
            busy: vec![false; blocks as usize],
            inflight: BTreeMap::new(),
            next_id: 1,
            acked_by: BTreeMap::new(),
            held: BTreeSet::new(),
            stats: ClusterStats::default(),
            violation: None,
            log,
        };
        // Every node formats its replica at first boot (`volume create`).
        let limit = Duration::from_secs(10);
        while !c.nodes.iter().all(|n| n.formatted.load(Ordering::Acquire)) {
            c.step();
            if c.now() > limit {
                return Err(fail("the replicas were not formatted".into()));
            }
        }
        Ok(c)
    }

    pub fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    pub fn violation(&self) -> Option<&ClusterViolation> {
        self.violation.as_ref()
    }

    /// The readable log (with `verbose`).
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    fn note(&self, text: impl FnOnce() -> String) {
        if self.cfg.verbose {
            let t = self.now().as_secs_f64();
            lock(&self.log).push(format!("{t:>9.3} driver: {}", text()));
        }
    }

    fn fail(&mut self, check: ClusterCheck, message: String) {
        if self.violation.is_none() {
            self.note(|| format!("VIOLATION {check:?}: {message}"));
            self.violation = Some(ClusterViolation {
                check,
                at: self.now(),
                message,
            });
        }
    }

    fn send(&mut self, node: usize, req: Req, what: Pending) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.insert(id, what);
        let n = &self.nodes[node];
        lock(&n.requests).push_back((id, req));
        n.notify.notify_one();
        id
    }

    /// Advance simulated time one tick and take the nodes' replies.
    pub fn step(&mut self) {
        if let Err(e) = self.sim.step() {
            let message = format!("a node's software failed: {e}");
            self.fail(ClusterCheck::Panic, message);
        }
        let now = self.now();
        for n in &self.nodes {
            n.disk.pump(now);
        }
        if let Some(p) = take_panics().into_iter().next() {
            self.fail(ClusterCheck::Panic, format!("panicked: {p}"));
        }
        for i in 0..self.nodes.len() {
            let done: Vec<(u64, Reply)> = lock(&self.nodes[i].completions).drain(..).collect();
            for (id, reply) in done {
                self.complete(id, reply);
            }
        }
    }

    fn complete(&mut self, id: u64, reply: Reply) {
        let Some(what) = self.inflight.remove(&id) else {
            return;
        };
        match what {
            Pending::Write {
                node,
                first,
                n,
                fua,
            } => {
                let ok = matches!(reply, Reply::Done { .. });
                if let Reply::Done { epoch, generation } = &reply {
                    let (epoch, generation) = (*epoch, *generation);
                    self.stats.acked += 1;
                    let by = *self.acked_by.entry((epoch, generation)).or_insert(node);
                    if by != node {
                        self.fail(
                            ClusterCheck::TwoPrimaries,
                            format!(
                                "n{node} acknowledged write #{id} at epoch {epoch} generation {generation}, for which n{by} acknowledged writes too"
                            ),
                        );
                    }
                }
                let outcome = match &reply {
                    Reply::Err(why) => format!("failed: {why}"),
                    _ => "ok".to_string(),
                };
                self.note(|| format!("write #{id} blocks {first}+{n} on n{node}: {outcome}"));
                self.model.complete(id, first, n, ok, fua);
                for b in first..first + n {
                    self.busy[b as usize] = false;
                }
            }
            Pending::Flush { node, cover } => {
                if matches!(reply, Reply::Done { .. }) {
                    self.model.flushed(cover);
                }
                self.note(|| format!("flush on n{node}: {reply:?}"));
            }
            Pending::Read {
                first,
                n,
                floors,
                check,
            } => match reply {
                Reply::Data(data) => {
                    for (i, b) in (first..first + n).enumerate() {
                        let block = &data[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                        match decode(block, b) {
                            Err(why) => {
                                self.fail(ClusterCheck::Garbage, format!("block {b}: {why}"))
                            }
                            Ok(value) if check => {
                                if !self.model.check(b, floors[i], value, false) {
                                    let allowed = self.model.describe(b, floors[i]);
                                    self.fail(
                                        ClusterCheck::LostWrite,
                                        format!("block {b} reads back {value}; allowed: {allowed}"),
                                    );
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                }
                other => {
                    if check {
                        self.fail(
                            ClusterCheck::Liveness,
                            format!("final read of blocks {first}+{n} failed: {other:?}"),
                        );
                    }
                }
            },
            Pending::Promote { node } => {
                if matches!(reply, Reply::Done { .. }) {
                    self.stats.promoted += 1;
                }
                self.note(|| format!("promote n{node}: {reply:?}"));
            }
        }
    }

    /// Nodes running the volume now.
    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].volume().is_some())
            .collect()
    }

    fn pair(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn hold(&mut self, a: usize, b: usize) {
        if self.held.insert(Self::pair(a, b)) {
            self.stats.partitions += 1;
            self.note(|| format!("partition n{a} | n{b}"));
            self.sim.hold(node_name(a), node_name(b));
        }
    }

    /// Heal a held link: deliver what it held, or reset its connections.
    fn heal(&mut self, a: usize, b: usize, reset: bool) {
        if self.held.remove(&Self::pair(a, b)) {
            if reset {
                self.stats.resets += 1;
                self.net.reset(a, b);
            }
            self.note(|| format!("heal n{a} | n{b}{}", if reset { " (reset)" } else { "" }));
            self.sim.release(node_name(a), node_name(b));
        }
    }

    fn crash(&mut self, i: usize, power_loss: bool) {
        self.stats.crashes += 1;
        self.note(|| {
            format!(
                "crash n{i}{}",
                if power_loss { " (power loss)" } else { "" }
            )
        });
        let n = self.nodes[i].clone();
        self.sim.crash(node_name(i));
        *lock(&n.volume) = None;
        *lock(&n.served) = None;
        lock(&n.requests).clear();
        lock(&n.completions).clear();
        // Requests it held die with it: their outcome is unknown.
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, p)| match p {
                Pending::Write { node, .. }
                | Pending::Flush { node, .. }
                | Pending::Promote { node } => *node == i,
                Pending::Read { .. } => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.complete(id, Reply::Err("node crashed".into()));
        }
        let mode = if power_loss {
            CrashMode::Random
        } else {
            CrashMode::KeepAll
        };
        n.disk.crash(&mut self.crash_rng, mode);
        if power_loss {
            // What was not flushed may be gone from this node's replica;
            // only durable writes are owed from here on.
            self.model.crash();
        }
        self.net.reset_all(i);
        self.sim.bounce(node_name(i));
    }

    fn write(&mut self) {
        let running = self.running();
        let target = match self.rng.pick(&running) {
            Some(n) if !self.rng.chance(0.05) => *n,
            _ => self.rng.below(self.nodes.len() as u64) as usize,
        };
        let blocks = self.busy.len() as u64;
        let n = self.rng.range(1, 4).min(blocks);
        let first = self.rng.below(blocks - n + 1);
        if (first..first + n).any(|b| self.busy[b as usize]) {
            return;
        }
        for b in first..first + n {
            self.busy[b as usize] = true;
        }
        let fua = self.rng.chance(0.2);
        self.stats.writes += 1;
        let id = self.next_id;
        self.model.issue(id, first, n, false);
        self.send(
            target,
            Req::Write { first, n, id, fua },
            Pending::Write {
                node: target,
                first,
                n,
                fua,
            },
        );
    }

    /// One random incident or client request.
    fn act(&mut self) {
        let nodes = self.nodes.len();
        let roll = self.rng.below(1000);
        match roll {
            0..=799 => self.write(),
            800..=869 => {
                let target = self.rng.pick(&self.running()).copied().unwrap_or(0);
                self.stats.flushes += 1;
                let cover = self.model.flush_cover();
                self.send(
                    target,
                    Req::Flush,
                    Pending::Flush {
                        node: target,
                        cover,
                    },
                );
            }
            870..=889 => {
                let a = self.rng.below(nodes as u64) as usize;
                if self.rng.chance(0.5) {
                    for b in 0..nodes {
                        if b != a {
                            self.hold(a, b);
                        }
                    }
                } else {
                    let b = (a + 1 + self.rng.below(nodes as u64 - 1) as usize) % nodes;
                    self.hold(a, b);
                }
            }
            890..=929 => {
                if let Some(&(a, b)) = self
                    .held
                    .iter()
                    .nth(self.rng.below(self.held.len().max(1) as u64) as usize)
                {
                    let reset = self.rng.chance(0.5);
                    self.heal(a, b, reset);
                }
            }
            930..=944 => {
                let a = self.rng.below(nodes as u64) as usize;
                let b = (a + 1 + self.rng.below(nodes as u64 - 1) as usize) % nodes;
                if !self.held.contains(&Self::pair(a, b)) {
                    self.stats.resets += 1;
                    self.note(|| format!("reset n{a} - n{b}"));
                    self.net.reset(a, b);
                }
            }
            945..=959 => {
                let i = self.rng.below(nodes as u64) as usize;
                let power = self.rng.chance(0.3);
                self.crash(i, power);
            }
            960..=989 => {
                let i = self.rng.below(nodes as u64) as usize;
                self.stats.promotes += 1;
                self.note(|| format!("promote n{i}"));
                self.send(i, Req::Promote, Pending::Promote { node: i });
            }
            _ => {
                let ms = self.rng.range(1, 30);
                self.sim.set_max_message_latency(Duration::from_millis(ms));
            }
        }
    }

    fn sleep(&mut self, d: Duration) {
        let until = self.now() + d;
        while self.now() < until {
            self.step();
        }
    }

    /// Run `ops` random steps, then heal everything and check.
    pub fn run(&mut self, ops: u64) -> Result<(), ClusterViolation> {
        let mut seen = BTreeSet::new();
        for _ in 0..ops {
            self.act();
            let pause = Duration::from_millis(self.rng.range(0, 20));
            self.sleep(pause);
            for i in self.running() {
                if let Role::Primary { epoch } = self.nodes[i].role() {
                    seen.insert((i, epoch));
                }
            }
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
        }
        self.stats.primaries_seen = seen.len() as u64;
        self.finish()
    }

    /// Heal the network, wait for one primary with every replica in sync,
    /// read every block back from it and compare the replicas.
    fn finish(&mut self) -> Result<(), ClusterViolation> {
        let held: Vec<(usize, usize)> = self.held.iter().copied().collect();
        for (a, b) in held {
            self.heal(a, b, false);
        }
        self.sim.set_max_message_latency(Duration::from_millis(2));
        let started = self.now();
        let limit = Duration::from_secs(300);
        let mut next_promote = started + Duration::from_secs(10);
        let primary = loop {
            self.sleep(Duration::from_millis(100));
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
            let running = self.running();
            if running.len() == 1 && self.inflight.is_empty() {
                let v = self.nodes[running[0]].volume();
                if v.is_some_and(|v| {
                    v.members().iter().all(|m| m.state == ReplicaState::InSync)
                        && !v.resync_pending()
                }) {
                    break running[0];
                }
            }
            if self.now() > next_promote {
                // Nobody runs it (every primary superseded or short of a
                // majority when it tried): the operator promotes one.
                if running.is_empty() {
                    let data_nodes = self.nodes[0].spec.replicas.len();
                    let i = self.rng.below(data_nodes as u64) as usize;
                    self.note(|| format!("final: promote n{i}"));
                    self.send(i, Req::Promote, Pending::Promote { node: i });
                }
                next_promote = self.now() + Duration::from_secs(10);
            }
            if self.now() - started > limit {
                let states: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        let members = n
                            .volume()
                            .map(|v| {
                                v.members()
                                    .iter()
                                    .map(|m| format!("{}={}", m.label, m.state.as_str()))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        format!("{}: {:?} [{members}]", n.name(), n.role())
                    })
                    .collect();
                self.fail(
                    ClusterCheck::Liveness,
                    format!(
                        "no single primary with every replica in sync {} s after healing: {}",
                        limit.as_secs(),
                        states.join("; ")
                    ),
                );
                return Err(self.violation.clone().expect("just set"));
            }
        };
        self.note(|| format!("final primary n{primary}"));
        let blocks = self.busy.len() as u64;
        let chunk = 64;
        let mut first = 0;
        while first < blocks {
            let n = chunk.min(blocks - first);
            let floors = self.model.floors(first, n);
            self.send(
                primary,
                Req::Read { first, n },
                Pending::Read {
                    first,
                    n,
                    floors,
                    check: true,
                },
            );
            first += n;
        }
        let started = self.now();
        while !self.inflight.is_empty() && self.now() - started < Duration::from_secs(60) {
            self.step();
        }
        if !self.inflight.is_empty() {
            self.fail(ClusterCheck::Liveness, "final reads did not finish".into());
        }
        // Every replica holds the same data.
        let layout = self.nodes[0].spec.layout;
        let (offset, len) = (layout.data_offset, layout.volume_size);
        for i in 1..self.nodes[0].spec.replicas.len() {
            if !self.nodes[0]
                .disk
                .same_content(&self.nodes[i].disk, offset, len)
            {
                self.fail(
                    ClusterCheck::LostWrite,
                    format!("n0's and n{i}'s replicas differ, all in sync"),
                );
            }
        }
        match &self.violation {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }
}

impl Net {
    /// Reset every connection of node `i` (it crashed).
    fn reset_all(&self, i: usize) {
        for j in 0..lock(&self.ips).len() {
            if j != i {
                self.reset(i, j);
            }
        }
    }
}

/// Run one seed with `ops` steps.
pub fn run_cluster_seed(
    seed: u64,
    ops: u64,
    cfg: ClusterConfig,
) -> (Result<(), ClusterViolation>, ClusterStats, Vec<String>) {
    let mut c = match Cluster::new(seed, cfg) {
        Ok(c) => c,
        Err(v) => return (Err(v), ClusterStats::default(), Vec::new()),
    };
    let r = c.run(ops);
    (r, c.stats.clone(), c.log())
}
