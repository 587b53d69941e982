//! This node among its peers: the replicas it holds for primaries on other
//! nodes (served by `ditto-peer`'s replica server), and how it dials the
//! nodes named in its config. Kept apart from `Node`, which runs the
//! volumes this node is primary of.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ditto_control::model::{
    now_unix, HeldMember, HeldReplicaRecord, PoolKind, WitnessRecord, RECORD_VERSION,
};
use ditto_control::{DaemonConfig, Store};
use ditto_engine::{BoxFuture, FileReplica, IoEngine, ReplicaBackend};
use ditto_format::Layout;
use ditto_peer::client::Dial;
use ditto_peer::server::{ReplicaRegistry, ServedReplica};
use ditto_peer::tls::{PeerTls, TlsFiles};
use ditto_peer::wire::{CreateReplica, MemberRef, PrimaryClaim, Superseded};
use uuid::Uuid;

/// How long a peer may take to answer a connect, hello or create.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// A member as the store keeps it, from the wire's form, and back.
pub fn held_members(members: &[MemberRef]) -> Vec<HeldMember> {
    members
        .iter()
        .map(|m| HeldMember {
            replica: m.replica,
            node: m.node.clone(),
            pool: m.pool.clone(),
        })
        .collect()
}

pub fn member_refs(members: &[HeldMember]) -> Vec<MemberRef> {
    members
        .iter()
        .map(|m| MemberRef {
            replica: m.replica,
            node: m.node.clone(),
            pool: m.pool.clone(),
        })
        .collect()
}

/// What the held-replica registry asks of the node it runs in (`Node`).
pub trait LocalNode: Send + Sync + 'static {
    /// Room a new replica may take in a pool (the node's own accounting).
    fn pool_free(&self, pool: &str) -> u64;
    /// Hand a volume this node is primary of over to node `to`
    /// (`Node::demote_to`): the replicas now held for it, and all the volume's.
    fn demote_to(
        &self,
        to: String,
        volume: Uuid,
        discard: bool,
    ) -> BoxFuture<'static, Result<(Vec<HeldReplicaRecord>, PrimaryClaim), String>>;
    /// The epoch of `volume` when this node is its primary.
    fn primary_epoch(&self, volume: Uuid) -> Option<u64>;
    /// Node `from` (the primary) asks this node to take `volume` over.
    fn take_over(&self, from: String, volume: Uuid) -> BoxFuture<'static, Result<(), String>>;
    /// Node `by` took `volume` over at `epoch` (newer than this node's):
    /// stop serving it and hold its replicas for `by`. Returns those.
    fn superseded(
        &self,
        volume: Uuid,
        by: String,
        epoch: u64,
        members: Vec<MemberRef>,
    ) -> BoxFuture<'static, Result<Vec<HeldReplicaRecord>, String>>;
}

/// The replicas this node holds for other nodes' volumes.
pub struct HeldReplicas {
    store: Arc<Store>,
    engine: Arc<dyn IoEngine>,
    node: Box<dyn LocalNode>,
    /// This node's name.
    me: String,
    served: Mutex<HashMap<(Uuid, Uuid), Arc<ServedReplica>>>,
    /// One create at a time: the space check and the file must agree.
    creating: tokio::sync::Mutex<()>,
}

impl HeldReplicas {
    /// Open every held replica recorded in the store; one that cannot be
    /// opened is logged and not served (its primary fails it out).
    pub async fn open(
        store: Arc<Store>,
        engine: Arc<dyn IoEngine>,
        node: Box<dyn LocalNode>,
        me: String,
    ) -> Arc<HeldReplicas> {
        let held = Arc::new(HeldReplicas {
            store,
            engine,
            node,
            me,
            served: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        });
        let records = held.store.held_replicas().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list held replicas");
            Vec::new()
        });
        for r in records {
            match FileReplica::open(held.engine.as_ref(), &r.path, r.volume).await {
                Ok(b) => held.serve(r.volume, r.replica, b),
                Err(e) => {
                    tracing::error!(volume = %r.volume_name, replica = %r.replica, error = %e, "held replica cannot be opened; not served")
                }
            }
        }
        held
    }

    fn serve(&self, volume: Uuid, replica: Uuid, backend: Arc<FileReplica>) {
        if let Ok(mut m) = self.served.lock() {
            m.insert(
                (volume, replica),
                ServedReplica::new(backend as Arc<dyn ReplicaBackend>),
            );
        }
    }

    async fn create_held(&self, from: &str, req: CreateReplica) -> Result<(), String> {
        let _one = self.creating.lock().await;
        let layout = Layout::new(req.size, req.region_size).map_err(|e| e.to_string())?;
        ditto_control::validate::name("volume", &req.volume_name).map_err(|e| e.to_string())?;
        let pools = self.store.pools().map_err(|e| e.to_string())?;
        let Some(pool) = pools.iter().find(|p| p.name == req.pool) else {
            return Err(format!(
                "this node has no pool {:?} (its pools: {})",
                req.pool,
                pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if pool.kind != PoolKind::Directory {
            return Err(format!(
                "pool {:?} is a {} pool; replicas for other nodes go in directory pools",
                pool.name,
                pool.kind.as_str()
            ));
        }
        let free = self.node.pool_free(&pool.name);
        if free < layout.replica_len() {
            return Err(format!(
                "pool {:?} has {free} bytes free (after what its replicas reserve), the replica needs {}",
                pool.name,
                layout.replica_len()
            ));
        }
        if self
            .store
            .held_replicas()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|h| h.replica == req.replica)
        {
            return Err(format!("replica {} exists here already", req.replica));
        }
        let path = pool.path.join(format!(
            "{}-{}.replica",
            req.volume_name,
            &req.replica.simple().to_string()[..8]
        ));
        let backend =
            FileReplica::create(self.engine.as_ref(), &path, req.volume, req.replica, layout)
                .await
                .map_err(|e| e.to_string())?;
        let record = HeldReplicaRecord {
            version: RECORD_VERSION,
            volume: req.volume,
            replica: req.replica,
            volume_name: req.volume_name.clone(),
            pool: pool.name.clone(),
            path: path.clone(),
            primary: from.to_string(),
            created_unix: now_unix(),
            epoch: 0,
            members: Vec::new(),
            tiebreaker: None,
        };
        if let Err(e) = self.store.insert_held_replica(&record) {
            let _ = std::fs::remove_file(&path);
            return Err(e.to_string());
        }
        tracing::info!(volume = %req.volume_name, replica = %req.replica, pool = %pool.name, primary = from, "replica created for a peer");
        self.serve(req.volume, req.replica, backend);
        Ok(())
    }
}

impl HeldReplicas {
    /// Stop serving a replica this node takes for its own volume (a
    /// promote): every connection to it is refused from now on.
    pub async fn release(&self, volume: Uuid, replica: Uuid) {
        let served = self
            .served
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&(volume, replica)));
        if let Some(served) = served {
            served.retire().await;
        }
    }

    async fn demote_for(
        &self,
        from: &str,
        volume: Uuid,
        discard: bool,
    ) -> Result<PrimaryClaim, String> {
        let (held, claim) = self
            .node
            .demote_to(from.to_string(), volume, discard)
            .await?;
        self.serve_handed_over(held).await;
        Ok(claim)
    }

    pub async fn serve_handed_over(&self, held: Vec<HeldReplicaRecord>) {
        for h in held {
            match FileReplica::open(self.engine.as_ref(), &h.path, h.volume).await {
                Ok(b) => self.serve(h.volume, h.replica, b),
                Err(e) => {
                    tracing::error!(volume = %h.volume_name, error = %e, "handed-over replica cannot be opened; not served")
                }
            }
        }
    }

    /// The primary this node's replicas of `volume` follow, and its epoch:
    /// this node itself when it runs the volume.
    fn followed_primary(&self, volume: Uuid) -> Option<(String, u64)> {
        if let Some(epoch) = self.node.primary_epoch(volume) {
            return Some((String::new(), epoch));
        }
        let records = self.store.held_replicas().ok()?;
        records
            .into_iter()
            .filter(|h| h.volume == volume)
            .max_by_key(|h| h.epoch)
            .map(|h| (h.primary, h.epoch))
    }

    /// Node `from` claims to be the primary of a volume at an epoch. Held
    /// replicas follow a newer epoch (a promote elsewhere took it over), or
    /// the primary they follow (its new member list); a primary here is
    /// superseded by a newer epoch. Anything else is refused, naming the
    /// primary this node follows.
    async fn claim_for(
        &self,
        me: &str,
        from: &str,
        claim: PrimaryClaim,
    ) -> Result<Option<ditto_engine::VoteRecord>, Superseded> {
        let _one = self.creating.lock().await;
        // This node is the volume's tiebreaker: judged as a held replica
        // would be, and answered with the membership it holds.
        if let Some(w) = self.witness_of(claim.volume) {
            let mut witness = witness_logic(&w);
            let held = witness.claim(me, from, claim.epoch)?;
            self.store_witness(&w, &witness).map_err(|why| Superseded {
                node: me.to_string(),
                epoch: 0,
                why,
            })?;
            if w.primary != witness.primary {
                tracing::warn!(volume = %w.volume_name, primary = from, epoch = claim.epoch, "another node took over a volume this node is the tiebreaker of; it follows that node now");
            }
            return Ok(Some(held));
        }
        let members = held_members(&claim.members);
        if let Some(mine) = self.node.primary_epoch(claim.volume) {
            if !ditto_peer::fence::superseded_by_claim(mine, claim.epoch) {
                return Err(Superseded {
                    node: me.to_string(),
                    epoch: mine,
                    why: format!(
                        "node {me} is the primary of this volume at epoch {mine}, not older than node {from}'s {}: two primaries, a split brain. Resolve it with `ditto volume resolve VOLUME --keep NODE`",
                        claim.epoch
                    ),
                });
            }
            let held = self
                .node
                .superseded(claim.volume, from.to_string(), claim.epoch, claim.members)
                .await
                .map_err(|why| Superseded {
                    node: me.to_string(),
                    epoch: mine,
                    why,
                })?;
            self.serve_handed_over(held).await;
            return Ok(None);
        }
        let records = self.store.held_replicas().map_err(|e| Superseded {
            node: me.to_string(),
            epoch: 0,
            why: e.to_string(),
        })?;
        for mut h in records.into_iter().filter(|h| h.volume == claim.volume) {
            let verdict = ditto_peer::fence::judge_claim(&h.primary, h.epoch, from, claim.epoch);
            if verdict == ditto_peer::fence::ClaimVerdict::Refuse {
                return Err(Superseded {
                    node: h.primary.clone(),
                    epoch: h.epoch,
                    why: format!(
                        "node {me} follows node {} as the primary of {} at epoch {}, newer than or equal to node {from}'s {}",
                        h.primary, h.volume_name, h.epoch, claim.epoch
                    ),
                });
            }
            let took_over = verdict == ditto_peer::fence::ClaimVerdict::TakeOver;
            h.primary = from.to_string();
            h.epoch = claim.epoch;
            h.members = members.clone();
            if claim.tiebreaker.is_some() {
                h.tiebreaker = claim.tiebreaker.clone();
            }
            self.store.update_held_replica(&h).map_err(|e| Superseded {
                node: me.to_string(),
                epoch: 0,
                why: e.to_string(),
            })?;
            if took_over {
                // The old primary's sessions are refused from here on.
                if let Some(served) = self.lookup(h.volume, h.replica) {
                    served.retire().await;
                }
                tracing::warn!(volume = %h.volume_name, replica = %h.replica, primary = from, epoch = claim.epoch, "another node took the volume over; this replica follows it now");
            }
        }
        Ok(None)
    }

    fn witness_of(&self, volume: Uuid) -> Option<WitnessRecord> {
        self.store
            .witnesses()
            .ok()?
            .into_iter()
            .find(|w| w.volume == volume)
    }

    /// Store `after`, the witness `before` changed by a claim or a record.
    fn store_witness(
        &self,
        before: &WitnessRecord,
        after: &ditto_peer::witness::Witness,
    ) -> Result<(), String> {
        let mut updated = WitnessRecord {
            primary: after.primary.clone(),
            epoch: after.epoch,
            record_epoch: after.record.epoch,
            generation: after.record.generation,
            in_sync: after.record.in_sync.clone(),
            ..before.clone()
        };
        // A heartbeat that changes nothing commits nothing: `updated_unix`
        // is when the record last changed. (Stamped before the comparison,
        // every heartbeat was a store commit with its fsync.)
        if updated == *before {
            return Ok(());
        }
        updated.updated_unix = now_unix();
        self.store
            .update_witness(&updated)
            .map_err(|e| e.to_string())
    }

    /// The volumes this node is the diskless tiebreaker of.
    pub fn witnesses(&self) -> Vec<WitnessRecord> {
        self.store.witnesses().unwrap_or_default()
    }

    async fn witness_for(
        &self,
        from: &str,
        op: ditto_peer::wire::WitnessOp,
        req: ditto_peer::wire::WitnessRequest,
    ) -> Result<Option<ditto_engine::VoteRecord>, ditto_peer::server::Refusal> {
        use ditto_peer::server::Refusal;
        use ditto_peer::wire::WitnessOp;
        let _one = self.creating.lock().await;
        let existing = self.witness_of(req.volume);
        match (op, existing) {
            (WitnessOp::Create, Some(w)) if w.primary == from => Ok(None), // a retried create
            (WitnessOp::Create, Some(w)) => Err(Refusal::Invalid(format!(
                "node {} is the tiebreaker of volume {} for node {} already",
                self.me, w.volume_name, w.primary
            ))),
            (WitnessOp::Create, None) => {
                ditto_control::validate::name("volume", &req.volume_name)
                    .map_err(|e| Refusal::Invalid(e.to_string()))?;
                if self
                    .store
                    .held_replicas()
                    .map_err(|e| Refusal::Invalid(e.to_string()))?
                    .iter()
                    .any(|h| h.volume == req.volume)
                {
                    return Err(Refusal::Invalid(format!(
                        "node {} holds a replica of volume {}; a tiebreaker must be a node without one",
                        self.me, req.volume_name
                    )));
                }
                let now = now_unix();
                let w = WitnessRecord {
                    version: RECORD_VERSION,
                    volume: req.volume,
                    volume_name: req.volume_name.clone(),
                    primary: from.to_string(),
                    epoch: req.record.epoch,
                    record_epoch: req.record.epoch,
                    generation: req.record.generation,
                    in_sync: req.record.in_sync.clone(),
                    created_unix: now,
                    updated_unix: now,
                };
                self.store
                    .insert_witness(&w)
                    .map_err(|e| Refusal::Invalid(e.to_string()))?;
                tracing::info!(volume = %req.volume_name, primary = from, "this node is the volume's tiebreaker now");
                Ok(None)
            }
            (_, None) => Err(Refusal::Invalid(format!(
                "node {} is not the tiebreaker of volume {} ({}); create the volume with `--tiebreaker {}` to make it one",
                self.me, req.volume_name, req.volume, self.me
            ))),
            (WitnessOp::Record, Some(w)) => {
                let mut witness = witness_logic(&w);
                witness
                    .record(&self.me, from, req.record)
                    .map_err(Refusal::Superseded)?;
                self.store_witness(&w, &witness).map_err(Refusal::Invalid)?;
                Ok(None)
            }
            (WitnessOp::Query, Some(w)) => Ok(Some(witness_logic(&w).record)),
            (WitnessOp::Delete, Some(w)) => {
                if w.primary != from {
                    return Err(Refusal::Invalid(format!(
                        "node {from} is not the primary of {} here (node {} is); only its primary deletes the tiebreaker's record",
                        w.volume_name, w.primary
                    )));
                }
                self.store
                    .delete_witness(w.volume)
                    .map_err(|e| Refusal::Invalid(e.to_string()))?;
                tracing::info!(volume = %w.volume_name, primary = from, "tiebreaker record deleted");
                Ok(None)
            }
        }
    }

    async fn delete_held(&self, from: &str, volume: Uuid, replica: Uuid) -> Result<(), String> {
        let _one = self.creating.lock().await;
        let records = self.store.held_replicas().map_err(|e| e.to_string())?;
        let Some(r) = records
            .into_iter()
            .find(|r| r.replica == replica && r.volume == volume)
        else {
            return Err(format!(
                "this node holds no replica {replica} of volume {volume}"
            ));
        };
        if r.primary != from {
            return Err(format!(
                "replica {replica} was created by node {}, not {from}; only its primary deletes it",
                r.primary
            ));
        }
        let served = self
            .served
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&(volume, replica)));
        if let Some(served) = served {
            // Nothing more lands on it: connections are refused from here on.
            served.retire().await;
        }
        self.store
            .delete_held_replica(replica)
            .map_err(|e| e.to_string())?;
        if let Err(e) = std::fs::remove_file(&r.path) {
            tracing::warn!(path = %r.path.display(), error = %e, "could not remove a deleted held replica's file");
        }
        tracing::info!(volume = %r.volume_name, replica = %replica, primary = from, "held replica deleted");
        Ok(())
    }
}

impl ReplicaRegistry for HeldReplicas {
    fn lookup(&self, volume: Uuid, replica: Uuid) -> Option<Arc<ServedReplica>> {
        self.served.lock().ok()?.get(&(volume, replica)).cloned()
    }

    fn create(&self, from: &str, req: CreateReplica) -> BoxFuture<'_, Result<(), String>> {
        let from = from.to_string();
        Box::pin(async move { self.create_held(&from, req).await })
    }

    fn demote(
        &self,
        from: &str,
        volume: Uuid,
        discard: bool,
    ) -> BoxFuture<'_, Result<PrimaryClaim, String>> {
        let from = from.to_string();
        Box::pin(async move { self.demote_for(&from, volume, discard).await })
    }

    fn delete(&self, from: &str, volume: Uuid, replica: Uuid) -> BoxFuture<'_, Result<(), String>> {
        let from = from.to_string();
        Box::pin(async move { self.delete_held(&from, volume, replica).await })
    }

    fn take_over(&self, from: &str, volume: Uuid) -> BoxFuture<'_, Result<(), String>> {
        let followed = self
            .store
            .held_replicas()
            .ok()
            .and_then(|h| h.into_iter().find(|h| h.volume == volume));
        let from = from.to_string();
        Box::pin(async move {
            match followed {
                Some(h) if h.primary == from => self.node.take_over(from, volume).await,
                Some(h) => Err(format!(
                    "this node follows node {} for {}, not node {from}",
                    h.primary, h.volume_name
                )),
                None => Err(format!("this node holds no replica of volume {volume}")),
            }
        })
    }

    fn pools(&self) -> Vec<ditto_peer::wire::PoolRoom> {
        self.store
            .pools()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.kind == PoolKind::Directory)
            .map(|p| ditto_peer::wire::PoolRoom {
                free: self.node.pool_free(&p.name),
                pool: p.name,
            })
            .collect()
    }

    fn check_primary(&self, from: &str, volume: Uuid) -> Result<(), Superseded> {
        match self.followed_primary(volume) {
            Some((primary, epoch)) if !ditto_peer::fence::may_open(Some(&primary), from) => {
                let primary = if primary.is_empty() {
                    self.me.clone()
                } else {
                    primary
                };
                Err(Superseded {
                    why: format!(
                        "node {primary} is the primary of volume {volume} (epoch {epoch}), not node {from}; node {from} must stop serving it"
                    ),
                    node: primary,
                    epoch,
                })
            }
            _ => Ok(()),
        }
    }

    fn claim(
        &self,
        from: &str,
        claim: PrimaryClaim,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, Superseded>> {
        let from = from.to_string();
        Box::pin(async move { self.claim_for(&self.me, &from, claim).await })
    }

    fn witness(
        &self,
        from: &str,
        op: ditto_peer::wire::WitnessOp,
        req: ditto_peer::wire::WitnessRequest,
    ) -> BoxFuture<'_, Result<Option<ditto_engine::VoteRecord>, ditto_peer::server::Refusal>> {
        let from = from.to_string();
        Box::pin(async move { self.witness_for(&from, op, req).await })
    }
}

/// A stored witness record as the shared tiebreaker rule handles it.
fn witness_logic(w: &WitnessRecord) -> ditto_peer::witness::Witness {
    ditto_peer::witness::Witness {
        volume: w.volume,
        volume_name: w.volume_name.clone(),
        primary: w.primary.clone(),
        epoch: w.epoch,
        record: ditto_engine::VoteRecord {
            epoch: w.record_epoch,
            generation: w.generation,
            in_sync: w.in_sync.clone(),
        },
    }
}

/// This node's TLS identity, when `[tls]` is configured.
pub fn peer_tls(cfg: &DaemonConfig) -> Result<Option<PeerTls>, ditto_peer::tls::TlsError> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
    let files = TlsFiles {
        ca: t.ca.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
    };
    Ok(Some(PeerTls::load(&cfg.node_name, &files)?))
}

/// How this node dials the other nodes: those of its config's `[nodes]`
/// and those added with `ditto node add` (store table `nodes`). Clones
/// share one list, so a node added is known to the peer server at once.
#[derive(Clone)]
pub struct Dialer {
    me: String,
    tls: Option<PeerTls>,
    /// name → (address, from the config)
    nodes: Arc<std::sync::RwLock<std::collections::BTreeMap<String, (String, bool)>>>,
}

impl Dialer {
    pub fn new(cfg: &DaemonConfig, tls: Option<PeerTls>, added: &[(String, String)]) -> Dialer {
        let mut nodes: std::collections::BTreeMap<String, (String, bool)> = added
            .iter()
            .map(|(n, a)| (n.clone(), (a.clone(), false)))
            .collect();
        for (k, v) in &cfg.nodes {
            nodes.insert(k.clone(), (v.address.clone(), true));
        }
        Dialer {
            me: cfg.node_name.clone(),
            tls,
            nodes: Arc::new(std::sync::RwLock::new(nodes)),
        }
    }

    fn snapshot(&self) -> std::collections::BTreeMap<String, (String, bool)> {
        match self.nodes.read() {
            Ok(n) => n.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The address of node `name` and how to dial it.
    pub fn dial(&self, name: &str) -> Result<(String, Dial), String> {
        let nodes = self.snapshot();
        let Some((addr, _)) = nodes.get(name) else {
            let known: Vec<&str> = nodes.keys().map(String::as_str).collect();
            return Err(format!(
                "node {name:?} is not known here (known: {}); add it with `ditto node add {name} --address HOST:PORT` or `[nodes.{name}] address = \"HOST:PORT\"` in the config",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ));
        };
        Ok((addr.clone(), self.dial_as(name)))
    }

    /// How to dial a node that says it is `name` (known or not).
    pub fn dial_as(&self, name: &str) -> Dial {
        Dial {
            me: self.me.clone(),
            peer: name.to_string(),
            tls: self.tls.clone(),
            connector: None,
        }
    }

    pub fn knows(&self, name: &str) -> bool {
        self.snapshot().contains_key(name)
    }

    /// Whether node `name` is listed in the config (not removable by `node remove`).
    pub fn in_config(&self, name: &str) -> Option<bool> {
        self.snapshot().get(name).map(|(_, c)| *c)
    }

    pub fn add(&self, name: &str, addr: &str) {
        if let Ok(mut n) = self.nodes.write() {
            n.insert(name.to_string(), (addr.to_string(), false));
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut n) = self.nodes.write() {
            n.remove(name);
        }
    }

    /// Every known node, tried now (all at once, each within 3 s).
    pub async fn probe_all(&self) -> Vec<crate::api_types::PeerNodeInfo> {
        let nodes = self.snapshot();
        let probes = nodes.iter().map(|(name, (address, in_config))| async move {
            let address = address.clone();
            let in_config = *in_config;
            let result = match self.dial(name) {
                Err(e) => Err(e),
                Ok((addr, dial)) => ditto_peer::client::ping(&addr, &dial, Duration::from_secs(3))
                    .await
                    .map_err(|e| e.to_string()),
            };
            let (connected, rtt_ms, protocol, error) = match result {
                Ok(p) if p.node != *name && !p.node.is_empty() => (
                    false,
                    None,
                    Some(p.version),
                    Some(format!("the node at {address} says it is node {:?}, not {name:?}; check the address", p.node)),
                ),
                Ok(p) => (
                    true,
                    Some(p.rtt.as_secs_f64() * 1000.0),
                    Some(p.version),
                    None,
                ),
                Err(e) => (false, None, None, Some(e)),
            };
            crate::api_types::PeerNodeInfo {
                name: name.clone(),
                address,
                connected,
                rtt_ms,
                protocol,
                error,
                source: if in_config { "config" } else { "added" }.to_string(),
            }
        });
        futures::future::join_all(probes).await
    }
}
