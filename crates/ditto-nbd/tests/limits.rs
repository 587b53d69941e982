//! What one client can take from the server: connections, descriptors held
//! by unfinished handshakes, and payload memory. Each limit must hold against
//! a client that misbehaves on purpose, over real loopback TCP.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ditto_nbd::memory::{MemExport, MemRegistry};
use ditto_nbd::proto::*;
use ditto_nbd::{BoxFuture, Export, ExportError, Extent, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Holds every WRITE until the gate opens, like a disk that stopped
/// answering: payloads pile up in the server unless something bounds them.
struct Gated {
    inner: Arc<MemExport>,
    open: watch::Receiver<bool>,
}

impl Export for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<bytes::Bytes, ExportError>> {
        self.inner.read(offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            self.inner.write(offset, data, fua).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        self.inner
            .write_zeroes(offset, len, fua, may_trim, fast_only)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        self.inner.block_status(offset, len)
    }
}

async fn serve(export: Arc<dyn Export>, config: ServerConfig) -> (Arc<Server>, String) {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("disk", "", export);
    let server = Server::new(registry, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(server.clone().serve_tcp(listener));
    (server, addr)
}

/// The tests measure the whole process (memory, descriptors): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True if the server closed the connection without sending anything more.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Reads the 18-byte greeting: the server accepted and serves this connection.
async fn greeted(s: &mut TcpStream) -> bool {
    let mut g = [0u8; 18];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut g)).await,
        Ok(Ok(_)) if g[..8] == NBDMAGIC.to_be_bytes()
    )
}

const BUDGET: usize = 32 << 20;
const WRITE_LEN: usize = 4 << 20;
const CONNECTIONS: usize = 10;
const WRITES_EACH: usize = 20;

/// Ten connections send 80 MiB of WRITEs each to an export that does not
/// answer, and read no replies. The server reads payloads only while the
/// shared budget allows: the bytes it holds stay within the budget, and so
/// does the growth of the process's memory (it used to be 128 MiB per
/// connection, 1.3 GB in all). When the export answers again every write
/// completes, and the data is what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_connections_that_never_read_replies_stay_within_the_byte_budget() {
    let _serial = SERIAL.lock().await;
    let disk = Arc::new(MemExport::new((CONNECTIONS * WRITE_LEN) as u64));
    let (gate, open) = watch::channel(false);
    let export = Arc::new(Gated {
        inner: disk.clone(),
        open,
    });
    let config = ServerConfig {
        max_payload: WRITE_LEN as u32,
        max_in_flight_bytes_total: BUDGET,
        ..ServerConfig::default()
    };
    let (server, addr) = serve(export, config).await;
    // The clients' payloads live in this process too: made before measuring.
    let payloads: Vec<Vec<u8>> = (0..CONNECTIONS)
        .map(|i| vec![i as u8 + 1; WRITE_LEN])
        .collect();
    let rss_before = rss_bytes();

    let mut clients = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        let addr = addr.clone();
        clients.push(tokio::spawn(async move {
            let mut c = Client::new(TcpStream::connect(&addr).await.unwrap());
            c.open_simple("disk").await;
            let offset = (i * WRITE_LEN) as u64;
            for h in 0..WRITES_EACH as u64 {
                c.send_request(0, NBD_CMD_WRITE, h, offset, WRITE_LEN as u32, &[])
                    .await;
                c.s.write_all(&payload).await.unwrap();
            }
            // Only now, once the export answers, read the replies.
            let mut errors = Vec::new();
            for _ in 0..WRITES_EACH {
                let r = c.read_reply().await;
                if r.error != 0 {
                    errors.push(r.error);
                }
            }
            errors
        }));
    }

    // The budget fills up, then the server stops reading payloads.
    wait_for("the budget to fill", 15, || {
        server.in_flight_bytes() + WRITE_LEN > BUDGET
    })
    .await;
    let mut peak_rss = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            server.in_flight_bytes() <= BUDGET,
            "{} bytes in flight, budget {BUDGET}",
            server.in_flight_bytes()
        );
        peak_rss = peak_rss.max(rss_bytes());
    }
    let growth = peak_rss.saturating_sub(rss_before);
    eprintln!(
        "memory growth with {CONNECTIONS} connections pushing {} MiB: {} MiB (budget {} MiB, {} MiB in flight)",
        (CONNECTIONS * WRITES_EACH * WRITE_LEN) >> 20,
        growth >> 20,
        BUDGET >> 20,
        server.in_flight_bytes() >> 20
    );
    // The budget, plus buffers that are not payload (read buffers, pool).
    let bound = (BUDGET + (24 << 20)) as u64;
    assert!(
        growth <= bound,
        "the server's memory grew by {} MiB; the bound is {} MiB",
        growth >> 20,
        bound >> 20
    );

    // The export answers again: every write completes, nothing was lost.
    gate.send_replace(true);
    for (i, c) in clients.into_iter().enumerate() {
        let errors = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("writes complete once the export answers")
            .unwrap();
        assert!(errors.is_empty(), "connection {i}: errors {errors:?}");
    }
    let data = disk.snapshot();
    for i in 0..CONNECTIONS {
        let region = &data[i * WRITE_LEN..(i + 1) * WRITE_LEN];
        assert!(
            region.iter().all(|&b| b == i as u8 + 1),
            "data of connection {i}"
        );
    }
    assert_eq!(server.in_flight_bytes(), 0);
}

/// 300 connections that never finish the handshake are closed after the
/// handshake timeout, and the server's descriptors are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_handshakes_are_closed_after_the_timeout() {
    let _serial = SERIAL.lock().await;
    const N: usize = 300;
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (server, addr) = serve(Arc::new(MemExport::new(1 << 20)), config).await;
    let baseline = open_fds();
    let mut socks = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        assert!(greeted(&mut s).await, "the server greets a new connection");
        socks.push(s);
    }
    // Both ends of every connection live in this process.
    let with_all = open_fds();
    let start = Instant::now();
    for (i, s) in socks.iter_mut().enumerate() {
        assert!(
            closed_by_server(s, Duration::from_secs(5)).await,
            "connection {i} still open after {:?}",
            start.elapsed()
        );
    }
    let took = start.elapsed();
    // The server's end of each is closed: at least N descriptors fewer.
    wait_for("the server's descriptors to be released", 5, || {
        open_fds() + N <= with_all
    })
    .await;
    let after = open_fds();
    eprintln!(
        "descriptors: {baseline} before, {with_all} with {N} half-open handshakes, \
         {after} once the server closed them after {took:?} (the clients' {N} remain)"
    );
    assert_eq!(server.open_connections(), 0);
    drop(socks);
    wait_for("the clients' descriptors to close", 5, || {
        open_fds() + 2 * N <= with_all
    })
    .await;
}

/// Connections beyond `max_connections` are closed at once, without a
/// greeting; once one closes, a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let _serial = SERIAL.lock().await;
    const LIMIT: usize = 8;
    let config = ServerConfig {
        max_connections: LIMIT,
        ..ServerConfig::default()
    };
    let (server, addr) = serve(Arc::new(MemExport::new(1 << 20)), config).await;
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        assert!(greeted(&mut s).await);
        held.push(s);
    }
    for extra in 0..3 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let start = Instant::now();
        assert!(
            closed_by_server(&mut s, Duration::from_secs(2)).await,
            "connection {} beyond the limit was not refused",
            extra + 1
        );
        assert!(start.elapsed() < Duration::from_secs(1), "refused promptly");
    }
    assert_eq!(server.refused_connections(), 3);
    assert_eq!(server.open_connections(), LIMIT);
    // The held ones still work: one of them completes a handshake.
    let first = held.remove(0);
    let mut c = Client::new(first);
    c.s.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .await
        .unwrap();
    let (size, _) = c.go("disk").await;
    assert_eq!(size, 1 << 20);
    drop(c);
    wait_for("a slot to free up", 5, || server.open_connections() < LIMIT).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    assert!(greeted(&mut s).await, "served again below the limit");
}
