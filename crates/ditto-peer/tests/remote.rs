//! A volume mirrored over a local file and a replica served by another
//! "node" (a peer server on loopback): writes reach both, a dead peer is
//! failed out without losing acknowledged writes, a re-add catches it up,
//! fencing refuses a superseded primary, and hostile input closes only the
//! connection that sent it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::{
    FileReplica, LogSink, Member, ReaddPlan, ReplicaBackend, ReplicaState, ThreadPoolEngine,
    Volume, VolumeOptions,
};
use ditto_format::{Layout, Superblock};
use ditto_peer::client::Dial;
use ditto_peer::server::{PeerAuth, ServerLimits, StaticRegistry};
use ditto_peer::wire::{Frame, Kind, HEADER_LEN};
use ditto_peer::{PeerServer, RemoteReplica};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

const SIZE: u64 = 16 << 20;
const REGION: u32 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Two {
    dir: tempfile::TempDir,
    vol: Uuid,
    ids: [Uuid; 2],
}

impl Two {
    async fn new() -> Two {
        let dir = tempfile::tempdir().unwrap();
        let vol = Uuid::new_v4();
        let ids = [Uuid::new_v4(), Uuid::new_v4()];
        for (i, id) in ids.iter().enumerate() {
            FileReplica::create(
                &ThreadPoolEngine,
                &dir.path().join(format!("r{i}")),
                vol,
                *id,
                Layout::new(SIZE, REGION).unwrap(),
            )
            .await
            .unwrap();
        }
        Two { dir, vol, ids }
    }

    async fn file(&self, i: usize) -> Arc<FileReplica> {
        FileReplica::open(
            &ThreadPoolEngine,
            &self.dir.path().join(format!("r{i}")),
            self.vol,
        )
        .await
        .unwrap()
    }

    fn data(&self, i: usize) -> Vec<u8> {
        let all = std::fs::read(self.dir.path().join(format!("r{i}"))).unwrap();
        let sb = Superblock::decode_slots(&all).unwrap();
        all[sb.layout.data_offset as usize..].to_vec()
    }

    /// Serve replica 1 on a fresh loopback port ("node b").
    async fn serve(&self) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let registry = Arc::new(StaticRegistry::default());
        registry.insert(self.file(1).await as Arc<dyn ReplicaBackend>);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = PeerServer::new(
            "b",
            registry,
            ServerLimits::default(),
            PeerAuth::LoopbackPlain,
        );
        let task = tokio::spawn(async move {
            let _ = server.serve(listener).await;
        });
        (addr, task)
    }

    async fn remote(&self, addr: SocketAddr) -> Arc<RemoteReplica> {
        RemoteReplica::connect(&addr.to_string(), &dial(), self.vol, self.ids[1], TIMEOUT)
            .await
            .unwrap()
    }

    async fn open(&self, remote: Arc<RemoteReplica>) -> Arc<Volume> {
        let members = vec![
            Member::new(
                self.ids[0],
                "a:disk1",
                self.file(0).await as Arc<dyn ReplicaBackend>,
            ),
            Member::new(self.ids[1], "b:disk1", remote as Arc<dyn ReplicaBackend>),
        ];
        let options = VolumeOptions {
            io_timeout: Duration::from_secs(2),
            resync_min_rate: 1 << 30,
            ..VolumeOptions::default()
        };
        Volume::open("vm1", self.vol, SIZE, members, options, Arc::new(LogSink))
            .await
            .unwrap()
    }
}

/// Node "a" dialling node "b" in plain TCP (loopback).
fn dial() -> Dial {
    Dial {
        me: "a".into(),
        peer: "b".into(),
        tls: None,
        connector: None,
    }
}

/// A raw connection that says hello for `replica` of `volume` with versions
/// `versions`; returns it and the node's answer.
async fn raw_hello(
    addr: SocketAddr,
    volume: Uuid,
    replica: Uuid,
    versions: (u16, u16),
) -> (TcpStream, Frame) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = ditto_peer::wire::Hello {
        min_version: versions.0,
        max_version: versions.1,
        features: 0,
        required_features: 0,
        volume,
        replica,
        node: "a".into(),
    };
    Frame {
        payload: hello.encode().unwrap(),
        ..Frame::new(Kind::Hello, 0)
    }
    .write_to(&mut s)
    .await
    .unwrap();
    let answer = Frame::read_from(&mut s, 1 << 16).await.unwrap();
    (s, answer)
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

fn states(v: &Volume) -> Vec<ReplicaState> {
    v.members().iter().map(|m| m.state).collect()
}

async fn wait_in_sync(v: &Volume) {
    for _ in 0..400 {
        if states(v).iter().all(|s| *s == ReplicaState::InSync)
            && v.job().is_none_or(|j| j.finished)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not in sync after 10 s: {:?} {:?}", v.members(), v.job());
}

#[tokio::test]
async fn writes_reach_the_remote_replica_and_read_back() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let v = t.open(t.remote(addr).await).await;
    // Many requests in flight at once (pipelined on the one connection).
    let mut writes = Vec::new();
    for i in 0..64u64 {
        let v = v.clone();
        writes.push(tokio::spawn(async move {
            v.write(i * 65536, pattern(i as u8, 65536), false).await
        }));
    }
    for w in writes {
        w.await.unwrap().unwrap();
    }
    v.flush().await.unwrap();
    for i in 0..64u64 {
        let got = v.read(i * 65536, 65536).await.unwrap();
        assert_eq!(got, pattern(i as u8, 65536), "block {i}");
    }
    v.write_zeroes(0, 65536, false, false).await.unwrap();
    v.close().await.unwrap();
    let (a, b) = (t.data(0), t.data(1));
    assert_eq!(
        &b[..65536],
        &vec![0u8; 65536][..],
        "zeroes reached the remote"
    );
    assert_eq!(&b[65536..131072], &pattern(1, 65536)[..]);
    assert!(a == b, "the local and the remote replica differ");
}

/// The Digest frame (feature bit 0, negotiated at hello): `holds` is true
/// only for the bytes the remote replica has at that offset, and a digest
/// outside the volume is refused without closing the connection.
#[tokio::test]
async fn a_remote_replica_tells_by_digest_whether_it_holds_a_run() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let remote = t.remote(addr).await;
    remote.write(65536, pattern(7, 65536)).await.unwrap();
    assert!(remote.holds(65536, pattern(7, 65536)).await.unwrap());
    assert!(!remote.holds(65536, pattern(8, 65536)).await.unwrap());
    assert!(
        !remote.holds(0, pattern(7, 65536)).await.unwrap(),
        "other offset"
    );
    assert!(
        remote.holds(SIZE, pattern(7, 4096)).await.is_err(),
        "a digest past the end must be refused"
    );
    // The connection still serves.
    assert_eq!(remote.read(65536, 65536).await.unwrap(), pattern(7, 65536));
}

#[tokio::test]
async fn a_dead_peer_is_failed_out_and_a_readd_catches_it_up() {
    let t = Two::new().await;
    let (addr, server) = t.serve().await;
    let v = t.open(t.remote(addr).await).await;
    v.write(0, pattern(1, 4096), true).await.unwrap();
    // The peer node dies: its server and every connection go away.
    server.abort();
    let _ = server.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Writes go on; the remote is failed out; nothing acknowledged is lost.
    let mut acked = Vec::new();
    for i in 1..8u64 {
        if v.write(i << 20, pattern(i as u8, 4096), true).await.is_ok() {
            acked.push(i);
        }
    }
    assert_eq!(acked.len(), 7, "writes failed with one replica left");
    assert_eq!(states(&v), vec![ReplicaState::InSync, ReplicaState::Failed]);
    // The peer comes back; a re-add connects anew and catches up the gap.
    // (The dropped connection is gone for good: its RemoteReplica stays failed.)
    let (addr2, _server2) = t.serve().await;
    let plan = v
        .readd(t.ids[1], t.remote(addr2).await, false)
        .await
        .unwrap();
    assert!(matches!(plan, ReaddPlan::CatchUp { .. }), "{plan:?}");
    wait_in_sync(&v).await;
    for i in &acked {
        assert_eq!(
            v.read(i << 20, 4096).await.unwrap(),
            pattern(*i as u8, 4096)
        );
    }
    v.close().await.unwrap();
    assert!(t.data(0) == t.data(1), "replicas differ after the catch-up");
}

#[tokio::test]
async fn a_superseded_connection_is_fenced() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let old = t.remote(addr).await;
    old.write(0, pattern(1, 4096)).await.unwrap();
    // Another primary (or a re-add) opens the replica: the old connection's
    // writes, flushes and superblocks are refused from then on.
    let new = t.remote(addr).await;
    let e = old
        .write(0, pattern(2, 4096))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("newer connection"), "{e}");
    assert!(old.flush().await.is_err());
    let mut stale = old.superblock();
    stale.sequence += 5;
    assert!(old.write_superblock(stale).await.is_err());
    // The new one goes on, and the old write never landed.
    new.write(4096, pattern(3, 4096)).await.unwrap();
    assert_eq!(new.read(0, 4096).await.unwrap(), pattern(1, 4096));
    // Taking the generation back is refused.
    let mut back = new.superblock();
    back.generation -= 1;
    let e = new.write_superblock(back).await.unwrap_err().to_string();
    assert!(e.contains("another primary"), "{e}");
}

/// A request the primary issued before its own superblock write (a
/// membership change) is served, though it arrives after it: the connection
/// is the current one. Refusing it failed healthy replicas out at every
/// membership change under load (cluster simulator, seed 1).
#[tokio::test]
async fn a_request_issued_before_its_own_superblock_write_is_served() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let (mut s, ok) = raw_hello(addr, t.vol, t.ids[1], (1, 1)).await;
    assert_eq!(ok.kind, Kind::HelloOk);
    let generation = ok.generation;
    let mut sb = t.file(1).await.superblock();
    sb.generation = generation + 3;
    Frame {
        generation: generation + 3,
        payload: Bytes::from(sb.encode().unwrap()),
        ..Frame::new(Kind::WriteSuperblock, 1)
    }
    .write_to(&mut s)
    .await
    .unwrap();
    let r = Frame::read_from(&mut s, 1 << 16).await.unwrap();
    assert_eq!(r.arg, 0, "{}", String::from_utf8_lossy(&r.payload));
    Frame {
        generation,
        payload: pattern(5, 4096),
        ..Frame::new(Kind::Write, 2)
    }
    .write_to(&mut s)
    .await
    .unwrap();
    let r = Frame::read_from(&mut s, 1 << 16).await.unwrap();
    assert_eq!(
        r.arg,
        ditto_peer::wire::Status::Ok as u64,
        "{}",
        String::from_utf8_lossy(&r.payload)
    );
    assert_eq!(
        &t.data(1)[..4096],
        &pattern(5, 4096)[..],
        "the write did not land"
    );
}

#[tokio::test]
async fn refusals_name_the_cause() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let e = RemoteReplica::connect(&addr.to_string(), &dial(), t.vol, Uuid::new_v4(), TIMEOUT)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("holds no replica"), "{e}");
    // Nothing listening.
    let free = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = RemoteReplica::connect(&free.to_string(), &dial(), t.vol, t.ids[1], TIMEOUT)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot reach"), "{e}");
    // A hello from a newer protocol.
    let (_s, answer) = raw_hello(addr, t.vol, t.ids[1], (7, 9)).await;
    let why = String::from_utf8_lossy(&answer.payload).into_owned();
    assert!(why.contains("7..=9") && why.contains('1'), "{why}");
}

#[tokio::test]
async fn hostile_input_closes_only_its_connection() {
    let t = Two::new().await;
    let (addr, _server) = t.serve().await;
    let good = t.remote(addr).await;
    good.write(0, pattern(9, 4096)).await.unwrap();
    // Garbage instead of a hello, a header claiming 4 GiB, a truncated frame,
    // and requests out of range: none may panic, allocate, or write.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(&[0xAB; 200]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, junk.read_to_end(&mut sink)).await;

    let mut huge = Frame::new(Kind::Hello, 0).encode_header().unwrap();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c::crc32c(&huge[..52]);
    huge[52..56].copy_from_slice(&crc.to_le_bytes());
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&huge).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "the server kept a connection that claimed a 4 GiB frame"
    );

    let mut s = TcpStream::connect(addr).await.unwrap();
    let whole = Frame::new(Kind::Hello, 0).encode().unwrap();
    s.write_all(&whole[..HEADER_LEN / 2]).await.unwrap();
    drop(s);

    let e = good
        .write(SIZE - 4096, pattern(1, 8192))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
    let e = good
        .read(u64::MAX - 10, 4096)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
    // The good connection still works and nothing else was written.
    assert_eq!(good.read(0, 4096).await.unwrap(), pattern(9, 4096));
    let data = t.data(1);
    assert!(
        data[4096..].iter().all(|b| *b == 0),
        "bytes written outside the requests"
    );
}

/// Peers that ask for reads and never read the replies hold at most the
/// node's byte budget, and each at most its share: the server stops reading
/// their requests instead of growing.
#[tokio::test]
async fn peers_that_never_read_replies_stay_within_the_byte_budget() {
    let t = Two::new().await;
    let registry = Arc::new(StaticRegistry::default());
    registry.insert(t.file(1).await as Arc<dyn ReplicaBackend>);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = ServerLimits {
        in_flight_bytes: 256 << 20,
        ..ServerLimits::default()
    };
    let server = PeerServer::new("b", registry, limits, PeerAuth::LoopbackPlain);
    tokio::spawn(server.clone().serve(listener));
    let rss_before = rss_bytes();
    let mut streams = Vec::new();
    for _ in 0..6 {
        let (s, ok) = raw_hello(addr, t.vol, t.ids[1], (1, 1)).await;
        streams.push((s, ok.generation));
    }
    // Each asks for 8 MiB reads (48 of them) and never reads the replies.
    for (s, generation) in streams.iter_mut() {
        for i in 0..48u64 {
            let f = Frame {
                offset: (i % 2) * (8 << 20),
                arg: 8 << 20,
                generation: *generation,
                ..Frame::new(Kind::Read, i + 1)
            };
            let sent = tokio::time::timeout(Duration::from_millis(300), f.write_to(s)).await;
            if sent.is_err() {
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = server.in_flight_bytes();
    assert!(
        held > 0,
        "nothing was held: the test did not load the server"
    );
    assert!(
        held <= 256 << 20,
        "{held} bytes held, over the 256 MiB budget"
    );
    // What the process really allocated: 48 unread 8 MiB replies would be
    // 384 MiB; the current connection's share is 64 MiB.
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 200 << 20, "the server grew by {} MiB", grown >> 20);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
