//! Mutual TLS between nodes: only a certificate from the cluster CA, valid
//! now and issued for the node name the peer claims, of a node this node
//! knows, gets in; a dialled address that answers as another node is refused.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ditto_engine::{FileReplica, ReplicaBackend, ThreadPoolEngine};
use ditto_format::Layout;
use ditto_peer::client::Dial;
use ditto_peer::server::{PeerAuth, ServerLimits, StaticRegistry};
use ditto_peer::tls::{create_ca, create_node_cert, PeerTls, TlsFiles};
use ditto_peer::{PeerServer, RemoteReplica};
use tokio::net::TcpListener;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(5);

struct Cluster {
    dir: tempfile::TempDir,
    vol: Uuid,
    replica: Uuid,
    refusals: Arc<Mutex<Vec<String>>>,
    addr: String,
}

fn node_cert(dir: &Path, ca: &str, name: &str, from: i64, until: i64) -> PeerTls {
    let out = dir.join(format!("{ca}-{name}"));
    create_node_cert(name, &[], &dir.join(ca), &out, from, until).unwrap();
    PeerTls::load(name, &TlsFiles::in_dirs(&dir.join(ca), &out)).unwrap()
}

impl Cluster {
    /// Node "b" serves one replica over TLS and knows nodes "a" and "c".
    async fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        create_ca(&dir.path().join("ca")).unwrap();
        create_ca(&dir.path().join("other-ca")).unwrap();
        let (vol, replica) = (Uuid::new_v4(), Uuid::new_v4());
        let file = FileReplica::create(
            &ThreadPoolEngine,
            &dir.path().join("r"),
            vol,
            replica,
            Layout::new(8 << 20, 1 << 20).unwrap(),
        )
        .await
        .unwrap();
        let registry = Arc::new(StaticRegistry::default());
        registry.insert(file as Arc<dyn ReplicaBackend>);
        let b = node_cert(dir.path(), "ca", "b", -1, 365);
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let refusals = refusals.clone();
            Arc::new(move |why: &str| refusals.lock().unwrap().push(why.to_string()))
        };
        let auth = PeerAuth::Tls {
            tls: b,
            known: Arc::new(|n: &str| n == "a" || n == "c"),
        };
        let server =
            PeerServer::with_refusal_hook("b", registry, ServerLimits::default(), auth, Some(hook));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let _ = server.serve(listener).await;
        });
        Cluster {
            dir,
            vol,
            replica,
            refusals,
            addr,
        }
    }

    async fn dial(&self, me: &str, peer: &str, tls: PeerTls) -> Result<Arc<RemoteReplica>, String> {
        let dial = Dial {
            me: me.into(),
            peer: peer.into(),
            tls: Some(tls),
            connector: None,
        };
        RemoteReplica::connect(&self.addr, &dial, self.vol, self.replica, TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }

    /// The server's refusals so far, once one has arrived.
    async fn refusal(&self) -> String {
        for _ in 0..200 {
            if let Some(r) = self.refusals.lock().unwrap().last() {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server logged no refusal");
    }
}

#[tokio::test]
async fn a_node_with_a_cluster_certificate_gets_in() {
    let c = Cluster::new().await;
    let a = node_cert(c.dir.path(), "ca", "a", -1, 365);
    let r = c.dial("a", "b", a).await.unwrap();
    r.write(0, Bytes::from(vec![7u8; 4096])).await.unwrap();
    r.flush().await.unwrap();
    assert_eq!(&r.read(0, 4096).await.unwrap()[..], &[7u8; 4096][..]);
    assert!(c.refusals.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let c = Cluster::new().await;
    let evil = node_cert(c.dir.path(), "other-ca", "a", -1, 365);
    let e = c.dial("a", "b", evil).await.unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    assert!(c.refusal().await.contains("TLS handshake"));
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let c = Cluster::new().await;
    let old = node_cert(c.dir.path(), "ca", "c", -30, -1);
    let e = c.dial("c", "b", old).await.unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    let why = c.refusal().await;
    assert!(why.to_lowercase().contains("expired"), "{why}");
}

#[tokio::test]
async fn an_unknown_node_is_refused() {
    let c = Cluster::new().await;
    let d = node_cert(c.dir.path(), "ca", "d", -1, 365);
    let e = c.dial("d", "b", d).await.unwrap_err();
    assert!(
        e.contains("not a node this node knows") && e.contains("ditto node add"),
        "{e}"
    );
    assert!(c.refusal().await.contains("\"d\""));
}

#[tokio::test]
async fn a_node_claiming_another_name_is_refused() {
    let c = Cluster::new().await;
    let a = node_cert(c.dir.path(), "ca", "a", -1, 365);
    // Holds a's certificate, says it is c.
    let e = c.dial("c", "b", a).await.unwrap_err();
    assert!(e.contains("not issued for that name"), "{e}");
}

#[tokio::test]
async fn an_address_answering_as_another_node_is_refused() {
    let c = Cluster::new().await;
    let a = node_cert(c.dir.path(), "ca", "a", -1, 365);
    // a dials what it believes is node "x"; the address is node b.
    let e = c.dial("a", "x", a).await.unwrap_err();
    assert!(e.contains("expected node x"), "{e}");
}

#[test]
fn certificates_are_never_overwritten_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    create_ca(dir.path()).unwrap();
    let e = create_ca(dir.path()).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    let e = create_node_cert("Bad_Name", &[], dir.path(), &dir.path().join("n"), 0, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lowercase"), "{e}");
    create_node_cert("n1", &[], dir.path(), &dir.path().join("n"), 0, 1).unwrap();
    assert!(create_node_cert("n1", &[], dir.path(), &dir.path().join("n"), 0, 1).is_err());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("n/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the node key is readable by others");
}
