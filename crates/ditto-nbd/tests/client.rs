//! The NBD client against the project's own server (in-process, loopback and Unix socket) and against scripted fake servers.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ditto_nbd::client::{Client, ClientError, DEFAULT_MAX_PAYLOAD};
use ditto_nbd::memory::{MemExport, MemRegistry};
use ditto_nbd::proto::*;
use ditto_nbd::{ExportError, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SIZE: u64 = 8 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// A server on 127.0.0.1 with a writable export "disk" and a read-only "ro".
struct Fixture {
    server: Arc<Server>,
    disk: Arc<MemExport>,
    addr: std::net::SocketAddr,
    task: JoinHandle<io::Result<()>>,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with(MemExport::new(SIZE), ServerConfig::default()).await
    }

    async fn with(disk: MemExport, config: ServerConfig) -> Fixture {
        let disk = Arc::new(disk);
        let registry = Arc::new(MemRegistry::new());
        registry.insert("disk", "test disk", disk.clone());
        registry.insert(
            "ro",
            "read-only",
            Arc::new(MemExport::new(SIZE).read_only(true)),
        );
        let server = Server::new(registry, config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(server.clone().serve_tcp(listener));
        Fixture {
            server,
            disk,
            addr,
            task,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    async fn client(&self) -> Client {
        Client::connect(&self.uri("disk")).await.unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
        self.task.abort();
    }
}

/// Bounds every test: a hang is a failure, not a stuck CI job.
async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}

#[tokio::test]
async fn handshake_reports_export_and_block_sizes() {
    let f = Fixture::new().await;
    let c = within(10, f.client()).await;
    let info = c.info();
    assert_eq!(info.size, SIZE);
    assert_eq!(info.export, "disk");
    assert!(info.used_go, "the server knows NBD_OPT_GO");
    assert!(info.can_flush() && info.can_fua() && info.can_trim() && info.can_write_zeroes());
    assert!(!info.read_only());
    let bs = info
        .block_size
        .expect("the server sends NBD_INFO_BLOCK_SIZE");
    assert_eq!((bs.min, bs.preferred, bs.max), (1, 4096, 32 << 20));
    assert_eq!(c.max_payload(), DEFAULT_MAX_PAYLOAD);
    assert_eq!(c.endpoint(), f.addr.to_string());
    assert!(!c.is_closed());
    assert_eq!(f.server.clients().len(), 1);
    assert_eq!(f.server.clients()[0].export, "disk");

    let ro = within(10, Client::connect(&f.uri("ro"))).await.unwrap();
    assert!(ro.info().read_only());
}

#[tokio::test]
async fn unix_socket_uri_connects() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let registry = Arc::new(MemRegistry::new());
    let disk = Arc::new(MemExport::new(SIZE));
    registry.insert("my disk", "", disk.clone());
    let server = Server::new(registry, ServerConfig::default());
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let task = tokio::spawn(server.clone().serve_unix(listener));
    let uri = format!("nbd+unix:///my%20disk?socket={}", sock.display());
    let c = within(10, Client::connect(&uri)).await.unwrap();
    assert_eq!(c.size(), SIZE);
    c.write(0, Bytes::from_static(b"hello"), true)
        .await
        .unwrap();
    assert_eq!(&disk.snapshot()[..5], b"hello");
    within(10, c.disconnect()).await.unwrap();
    server.shutdown();
    task.abort();
}

#[tokio::test]
async fn roundtrip_larger_than_max_block_size_is_split() {
    let config = ServerConfig {
        max_payload: 64 * 1024,
        ..ServerConfig::default()
    };
    let f = Fixture::with(MemExport::new(SIZE), config).await;
    let c = within(10, f.client()).await;
    assert_eq!(c.max_payload(), 64 * 1024);
    // Odd offset and length: pieces do not line up with anything.
    let data = pattern((1 << 20) + 123, 3);
    let calls0 = f.disk.calls();
    within(10, c.write(777, Bytes::from(data.clone()), false))
        .await
        .unwrap();
    assert!(
        f.disk.calls() - calls0 >= 17,
        "1 MiB in 64 KiB pieces: {} calls",
        f.disk.calls() - calls0
    );
    // The server closes the connection on an oversized WRITE and refuses an
    // oversized READ, so success proves every piece was within the limit.
    let back = within(10, c.read(777, data.len())).await.unwrap();
    assert!(back[..] == data[..], "read back differs");
    assert_eq!(&f.disk.snapshot()[777..777 + data.len()], &data[..]);
    // Zeroing and trimming over several pieces too.
    within(10, c.write_zeroes(777, 300_000, true))
        .await
        .unwrap();
    let back = c.read(0, 777 + 300_001).await.unwrap();
    assert!(back[..777].iter().all(|&b| b == 0));
    assert!(back[777..777 + 300_000].iter().all(|&b| b == 0));
    assert_eq!(back[777 + 300_000], data[300_000]);
    within(10, c.trim(0, 1 << 20)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(f.disk.out_of_range_calls(), 0);
    assert!(!c.is_closed());
}

#[tokio::test]
async fn two_hundred_concurrent_requests() {
    // Jitter makes the server complete requests out of order.
    let f = Fixture::with(MemExport::new(SIZE).jitter_ms(7), ServerConfig::default()).await;
    let c = Arc::new(within(10, f.client()).await);
    let writes = (0..200u64).map(|i| {
        let c = c.clone();
        async move {
            c.write(i * 4096, Bytes::from(pattern(4096, i as u8)), false)
                .await
        }
    });
    within(30, futures::future::try_join_all(writes))
        .await
        .unwrap();
    let reads = (0..200u64).map(|i| {
        let c = c.clone();
        async move { (i, c.read(i * 4096, 4096).await) }
    });
    for (i, r) in within(30, futures::future::join_all(reads)).await {
        assert_eq!(r.unwrap()[..], pattern(4096, i as u8)[..], "block {i}");
    }
    assert!(
        f.disk.max_concurrent_calls() > 1,
        "requests were not in flight together"
    );
}

#[tokio::test]
async fn server_errors_map_to_io_error_kinds() {
    let f = Fixture::new().await;
    let c = within(10, f.client()).await;
    let cases = [
        (ExportError::NoSpace, NBD_ENOSPC, io::ErrorKind::StorageFull),
        (
            ExportError::Io("disk on fire".into()),
            NBD_EIO,
            io::ErrorKind::Other,
        ),
        (
            ExportError::Invalid("nope".into()),
            NBD_EINVAL,
            io::ErrorKind::InvalidInput,
        ),
    ];
    for (inject, errno, kind) in cases {
        f.disk.fail_next(inject);
        let e = within(10, c.write(0, Bytes::from_static(b"x"), false))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), Some(errno), "{e}");
        assert!(matches!(e, ClientError::Server { op: "write", .. }), "{e}");
        let io: io::Error = e.into();
        assert_eq!(io.kind(), kind, "{io}");
    }
    f.disk.fail_next(ExportError::Io("bad sector".into()));
    let e = c.read(4096, 512).await.unwrap_err();
    assert_eq!(e.errno(), Some(NBD_EIO));
    assert!(e.to_string().contains("EIO"), "{e}");
    // The stream stays in sync after a failed READ (no payload followed).
    c.write(4096, Bytes::from_static(b"ok"), false)
        .await
        .unwrap();
    assert_eq!(&c.read(4096, 2).await.unwrap()[..], b"ok");

    let ro = within(10, Client::connect(&f.uri("ro"))).await.unwrap();
    let e = ro
        .write(0, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Some(NBD_EPERM));
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);

    // Checked locally, never sent.
    let e = c.read(SIZE - 1, 2).await.unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    let e = c
        .write(u64::MAX, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");

    // Unknown export: refused during negotiation, as NotFound.
    let e = within(10, Client::connect(&f.uri("nope")))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("no such export"), "{e}");

    // ESHUTDOWN: the request fails and the client disconnects softly.
    f.disk.fail_next(ExportError::Shutdown);
    let e = c.flush().await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    assert!(c.is_closed());
    let e = c.read(0, 1).await.unwrap_err();
    assert!(matches!(e, ClientError::ConnectionLost { .. }), "{e}");
}

/// A TCP proxy whose connections can be cut at once, like a pulled cable.
async fn proxy(to: std::net::SocketAddr) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut a, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                if let Ok(mut b) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (addr.to_string(), task)
}

#[tokio::test]
async fn lost_connection_fails_in_flight_requests_promptly() {
    // Every export call takes seconds: requests are surely in flight when cut.
    let f = Fixture::with(
        MemExport::new(SIZE).jitter_ms(20_000),
        ServerConfig::default(),
    )
    .await;
    let (addr, cut) = proxy(f.addr).await;
    let c = Arc::new(
        within(10, Client::connect(&format!("nbd://{addr}/disk")))
            .await
            .unwrap(),
    );
    let in_flight: Vec<_> = (0..10u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    c.read(i * 4096, 4096).await.map(|_| ())
                } else {
                    c.write(i * 4096, Bytes::from(vec![1u8; 4096]), false).await
                }
            })
        })
        .collect();
    for _ in 0..100 {
        if f.disk.max_concurrent_calls() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.disk.max_concurrent_calls(),
        10,
        "requests reached the server"
    );
    let start = Instant::now();
    cut.abort();
    for t in in_flight {
        let r = within(5, t).await.unwrap();
        match r {
            Err(ClientError::ConnectionLost { reason, .. }) => {
                assert!(reason.contains("closed"), "{reason}")
            }
            other => panic!("expected a lost connection, got {other:?}"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(c.is_closed());
    // Later requests fail at once too.
    let e = within(1, c.write(0, Bytes::from_static(b"x"), false))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::ConnectionLost { .. }), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::ConnectionAborted);
}

#[tokio::test]
async fn disconnect_is_clean_and_final() {
    let f = Fixture::new().await;
    let c = within(10, f.client()).await;
    c.write(0, Bytes::from_static(b"abc"), false).await.unwrap();
    within(10, c.disconnect()).await.unwrap();
    assert!(c.is_closed());
    for _ in 0..100 {
        if f.server.clients().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        f.server.clients().is_empty(),
        "server still has the connection"
    );
    let e = c.read(0, 3).await.unwrap_err();
    assert!(e.to_string().contains("disconnected"), "{e}");
    // Dropping a client disconnects it too.
    let d = within(10, f.client()).await;
    assert_eq!(f.server.clients().len(), 1);
    drop(d);
    for _ in 0..100 {
        if f.server.clients().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(f.server.clients().is_empty(), "dropped client lingers");
}

#[tokio::test]
async fn bad_uris_and_unreachable_servers_are_refused_clearly() {
    for uri in [
        "nbd:/x",
        "nbds://h/x",
        "nbd://h:99999/x",
        "nbd+unix:///x",
        "nbd://u@h/x",
        "file:///dev/sda",
    ] {
        let e = Client::connect(uri).await.unwrap_err();
        assert!(matches!(e, ClientError::BadUri { .. }), "{uri}: {e}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("nbd+unix:///?socket={}/none.sock", dir.path().display());
    let e = within(10, Client::connect(&uri)).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("none.sock"), "{e}");
}

// ------------------------------------------------------- scripted fake servers

/// Server side of a scripted conversation.
struct Fake(DuplexStream);

impl Fake {
    async fn greet(&mut self, flags: u16) {
        let mut g = Vec::new();
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&flags.to_be_bytes());
        self.0.write_all(&g).await.unwrap();
        let mut cf = [0u8; 4];
        self.0.read_exact(&mut cf).await.unwrap();
        let expect = NBD_FLAG_C_FIXED_NEWSTYLE
            | if flags & NBD_FLAG_NO_ZEROES != 0 {
                NBD_FLAG_C_NO_ZEROES
            } else {
                0
            };
        assert_eq!(u32::from_be_bytes(cf), expect);
    }

    async fn option(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..8], &IHAVEOPT.to_be_bytes());
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (opt, data)
    }

    async fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        let mut r = Vec::new();
        r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        self.0.write_all(&r).await.unwrap();
    }

    /// Answers NBD_OPT_GO with an export of `size` bytes and `flags`.
    async fn go(&mut self, size: u64, flags: u16) {
        let (opt, data) = self.option().await;
        assert_eq!(opt, NBD_OPT_GO);
        // name length, name, 1 request: NBD_INFO_BLOCK_SIZE.
        let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        assert_eq!(&data[4 + n..], &[0, 1, 0, 3]);
        let mut info = Vec::new();
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(NBD_OPT_GO, NBD_REP_INFO, &info).await;
        self.reply(NBD_OPT_GO, NBD_REP_ACK, &[]).await;
    }

    async fn request(&mut self) -> RequestHeader {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        self.0.read_exact(&mut h).await.unwrap();
        RequestHeader::parse(&h)
    }

    async fn simple(&mut self, error: u32, handle: u64, data: &[u8]) {
        let mut r = Vec::new();
        put_simple_reply(&mut r, error, handle);
        r.extend_from_slice(data);
        self.0.write_all(&r).await.unwrap();
    }
}

fn fake() -> (DuplexStream, Fake) {
    let (c, s) = tokio::io::duplex(1 << 20);
    (c, Fake(s))
}

const FLAGS: u16 = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;

#[tokio::test]
async fn falls_back_to_export_name_when_go_is_unknown() {
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE).await; // no NO_ZEROES: padding follows
        let (opt, _) = s.option().await;
        assert_eq!(opt, NBD_OPT_GO);
        s.reply(NBD_OPT_GO, NBD_REP_ERR_UNSUP, b"what is GO?").await;
        let (opt, name) = s.option().await;
        assert_eq!((opt, &name[..]), (NBD_OPT_EXPORT_NAME, &b"old"[..]));
        let mut answer = Vec::new();
        answer.extend_from_slice(&(1u64 << 20).to_be_bytes());
        answer.extend_from_slice(&FLAGS.to_be_bytes());
        answer.extend_from_slice(&[0u8; 124]);
        s.0.write_all(&answer).await.unwrap();
        let r = s.request().await;
        assert_eq!((r.kind, r.offset, r.length), (NBD_CMD_READ, 512, 4));
        s.simple(0, r.handle, b"data").await;
        s
    });
    let client = within(10, Client::handshake(c, "old", "fake"))
        .await
        .unwrap();
    assert!(!client.info().used_go);
    assert_eq!(client.size(), 1 << 20);
    assert_eq!(client.info().block_size, None);
    assert_eq!(&within(10, client.read(512, 4)).await.unwrap()[..], b"data");
    // TRIM was not advertised: refused locally.
    let e = client.trim(0, 4096).await.unwrap_err();
    assert!(matches!(e, ClientError::Unsupported { .. }), "{e}");
    within(10, server).await.unwrap();
}

#[tokio::test]
async fn export_name_refusal_is_reported() {
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        s.reply(NBD_OPT_GO, NBD_REP_ERR_UNSUP, &[]).await;
        let _ = s.option().await;
        // Closing is the only refusal NBD_OPT_EXPORT_NAME allows.
    });
    let e = within(10, Client::handshake(c, "x", "fake"))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    server.await.unwrap();
}

#[tokio::test]
async fn block_size_limits_are_honoured() {
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        let mut info = Vec::new();
        info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        for v in [512u32, 4096, 8192] {
            info.extend_from_slice(&v.to_be_bytes());
        }
        s.reply(NBD_OPT_GO, NBD_REP_INFO, &info).await;
        let mut info = Vec::new();
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&(FLAGS | NBD_FLAG_SEND_FUA).to_be_bytes());
        s.reply(NBD_OPT_GO, NBD_REP_INFO, &info).await;
        s.reply(NBD_OPT_GO, NBD_REP_ACK, &[]).await;
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let r = s.request().await;
            assert_eq!(r.kind, NBD_CMD_WRITE);
            assert_eq!(r.flags, NBD_CMD_FLAG_FUA);
            let mut payload = vec![0u8; r.length as usize];
            s.0.read_exact(&mut payload).await.unwrap();
            lengths.push((r.offset, r.length));
            s.simple(0, r.handle, &[]).await;
        }
        lengths.sort();
        lengths
    });
    let client = within(10, Client::handshake(c, "", "fake")).await.unwrap();
    assert_eq!(client.max_payload(), 8192);
    within(10, client.write(4096, Bytes::from(vec![1u8; 20480]), true))
        .await
        .unwrap();
    assert_eq!(
        within(10, server).await.unwrap(),
        vec![(4096, 8192), (12288, 8192), (20480, 4096)]
    );
    // Misaligned requests are refused before they reach the server.
    let e = client.read(100, 512).await.unwrap_err();
    assert!(matches!(e, ClientError::Misaligned { .. }), "{e}");
}

/// Runs a fake server that negotiates normally, then does `bad` to the first
/// request; the client's request must fail (no panic, no hang).
async fn misbehaving_server(bad: &'static [u8], read: bool) -> ClientError {
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        s.go(1 << 20, FLAGS).await;
        let r = s.request().await;
        let mut reply = bad.to_vec();
        // Placeholder handle 0xffff.. is replaced by the real one.
        if reply.len() >= 16 && reply[8..16] == [0xff; 8] {
            reply[8..16].copy_from_slice(&r.handle.to_be_bytes());
        }
        s.0.write_all(&reply).await.unwrap();
        // Keep the pipe open: the client must notice the violation itself.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = within(10, Client::handshake(c, "", "fake")).await.unwrap();
    let e = if read {
        within(5, client.read(0, 4096)).await.unwrap_err()
    } else {
        within(5, client.flush()).await.unwrap_err()
    };
    assert!(client.is_closed(), "{e}");
    server.abort();
    e
}

#[tokio::test]
async fn malformed_replies_fail_requests_without_panicking() {
    // Reply to a handle never sent.
    let mut unknown = Vec::new();
    put_simple_reply(&mut unknown, 0, 0x1234_5678);
    let unknown: &'static [u8] = unknown.leak();
    let e = misbehaving_server(unknown, false).await;
    assert!(e.to_string().contains("unknown handle"), "{e}");
    // A structured reply that was never negotiated.
    let mut structured = Vec::new();
    put_structured_header(&mut structured, NBD_REPLY_FLAG_DONE, 0, u64::MAX, 0);
    let e = misbehaving_server(structured.leak(), false).await;
    assert!(e.to_string().contains("structured"), "{e}");
    // Garbage.
    let e = misbehaving_server(&[0xde; 64], false).await;
    assert!(e.to_string().contains("magic"), "{e}");
    // A READ reply cut short: the data never comes in full.
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        s.go(1 << 20, FLAGS).await;
        let r = s.request().await;
        s.simple(0, r.handle, &[7u8; 100]).await;
        // Hang up mid-payload.
    });
    let client = within(10, Client::handshake(c, "", "fake")).await.unwrap();
    let e = within(5, client.read(0, 4096)).await.unwrap_err();
    assert!(matches!(e, ClientError::ConnectionLost { .. }), "{e}");
    server.await.unwrap();
}

#[tokio::test]
async fn malformed_negotiation_is_refused() {
    // Not an NBD server at all.
    let (c, mut s) = fake();
    s.0.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n")
        .await
        .unwrap();
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not an NBD server"), "{e}");

    // Plain newstyle without the fixed flag.
    let (c, mut s) = fake();
    let mut g = Vec::new();
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&0u16.to_be_bytes());
    s.0.write_all(&g).await.unwrap();
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fixed newstyle"), "{e}");

    // Oversized option reply: refused before reading it.
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        let mut r = Vec::new();
        r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        r.extend_from_slice(&NBD_REP_INFO.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        s.0.write_all(&r).await.unwrap();
        s
    });
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    drop(server.await.unwrap());

    // ACK without NBD_INFO_EXPORT.
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        s.reply(NBD_OPT_GO, NBD_REP_ACK, &[]).await;
        s
    });
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NBD_INFO_EXPORT"), "{e}");
    drop(server.await.unwrap());

    // Nonsense block sizes.
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        let mut info = Vec::new();
        info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        for v in [3u32, 4096, 1] {
            info.extend_from_slice(&v.to_be_bytes());
        }
        s.reply(NBD_OPT_GO, NBD_REP_INFO, &info).await;
        s
    });
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
    drop(server.await.unwrap());

    // A truncated INFO item.
    let (c, mut s) = fake();
    let server = tokio::spawn(async move {
        s.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
        let _ = s.option().await;
        s.reply(NBD_OPT_GO, NBD_REP_INFO, &[0, 0, 1]).await;
        s
    });
    let e = within(5, Client::handshake(c, "", "fake"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expected 12"), "{e}");
    drop(server.await.unwrap());
}
