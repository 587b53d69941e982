//! Property tests: hostile or random bytes after (and during) the handshake never panic the
//! server, never reach the export out of range, and never change data outside what the
//! client legitimately wrote.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use common::*;
use ditto_nbd::memory::MemExport;
use ditto_nbd::proto::*;
use ditto_nbd::ServerConfig;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes the test sends on purpose land in `[0, REGION)`.
const REGION: u64 = 64 * 1024;
/// Small so that "oversized" lengths are cheap to generate.
const MAX_PAYLOAD: u32 = 16 * 1024;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on any thread (spawned server tasks included), still printing them.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn initial(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(3)
}

#[derive(Debug, Clone)]
enum Op {
    /// A valid write inside REGION.
    Write { offset: u64, len: u16 },
    /// A valid read.
    Read { offset: u64, len: u16 },
    /// A header with the right magic and arbitrary fields; commands that
    /// change data always point outside the export, so they must be refused.
    Header {
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        send_payload: bool,
    },
    /// Random bytes (desynchronises the stream).
    Raw(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![0u16..10, any::<u16>()];
    let len = prop_oneof![
        0u32..8192,
        Just(MAX_PAYLOAD),
        Just(MAX_PAYLOAD + 1),
        Just(u32::MAX),
        any::<u32>(),
    ];
    // Mostly valid flags, so requests get past flag checks to the range checks.
    let flags = prop_oneof![Just(0u16), Just(NBD_CMD_FLAG_FUA), 0u16..32, any::<u16>()];
    let offset = prop_oneof![
        0u64..DISK_SIZE,
        Just(DISK_SIZE),
        (DISK_SIZE - 4096)..DISK_SIZE + 4096,
        (u64::MAX - 8192)..=u64::MAX,
        any::<u64>(),
    ];
    prop_oneof![
        3 => (0..REGION - 1, 1u16..4096).prop_map(|(offset, len)| Op::Write {
            offset,
            len: len.min((REGION - offset) as u16),
        }),
        2 => (0..DISK_SIZE - 8192, 0u16..8192).prop_map(|(offset, len)| Op::Read { offset, len }),
        4 => (kind, flags, offset, len, any::<bool>()).prop_map(
            |(kind, flags, offset, len, send_payload)| {
                let offset = if matches!(kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES) {
                    // Guaranteed past the end (or overflowing) whatever len is.
                    DISK_SIZE.saturating_sub(u64::from(len)) + 1 + offset % 4096
                } else {
                    offset
                };
                Op::Header { kind, flags, offset, len, send_payload }
            }
        ),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Op::Raw),
    ]
}

/// The byte stream for `ops`, and the handle of every request with the
/// length of READs (a simple reply's payload length is only known from it).
fn encode(ops: &[Op]) -> (Vec<u8>, Vec<(u64, u16, u32)>) {
    let mut b = Vec::new();
    let mut sent = Vec::new();
    let mut header = |b: &mut Vec<u8>, flags: u16, kind: u16, offset: u64, len: u32| {
        let handle = sent.len() as u64 + 1;
        sent.push((handle, kind, len));
        b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    };
    for op in ops {
        match op {
            Op::Write { offset, len } => {
                header(&mut b, 0, NBD_CMD_WRITE, *offset, u32::from(*len));
                // 0x5a never forms the request magic, so payload bytes cannot
                // be mistaken for a header after a desync.
                b.extend(std::iter::repeat_n(0x5a, usize::from(*len)));
            }
            Op::Read { offset, len } => header(&mut b, 0, NBD_CMD_READ, *offset, u32::from(*len)),
            Op::Header {
                kind,
                flags,
                offset,
                len,
                send_payload,
            } => {
                header(&mut b, *flags, *kind, *offset, *len);
                if *kind == NBD_CMD_WRITE && *send_payload && *len <= 8192 {
                    b.extend(std::iter::repeat_n(0x5a, *len as usize));
                }
            }
            Op::Raw(bytes) => b.extend_from_slice(bytes),
        }
    }
    (b, sent)
}

/// True when `ops` keep the stream in sync to the end: no garbage, no
/// DISC, every WRITE followed by its whole payload (and not over the limit).
fn well_formed(ops: &[Op]) -> bool {
    ops.iter().all(|op| match op {
        Op::Raw(_) => false,
        Op::Header {
            kind,
            len,
            send_payload,
            ..
        } => *kind != NBD_CMD_DISC && (*kind != NBD_CMD_WRITE || (*send_payload && *len <= 8192)),
        _ => true,
    })
}

/// Splits the server's reply stream into replies; returns their handles.
fn reply_handles(mut b: &[u8], sent: &[(u64, u16, u32)]) -> Vec<u64> {
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap());
    let mut handles = Vec::new();
    while b.len() >= 16 {
        match be32(b) {
            NBD_SIMPLE_REPLY_MAGIC => {
                let error = be32(&b[4..]);
                let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
                let (_, kind, len) = sent[(handle - 1) as usize];
                b = &b[16..];
                if kind == NBD_CMD_READ && error == 0 {
                    b = &b[len as usize..];
                }
                handles.push(handle);
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = u16::from_be_bytes(b[4..6].try_into().unwrap());
                assert_ne!(
                    flags & NBD_REPLY_FLAG_DONE,
                    0,
                    "server sends one chunk per reply"
                );
                let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
                let len = be32(&b[16..]) as usize;
                b = &b[20 + len..];
                handles.push(handle);
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
    assert!(b.is_empty(), "trailing partial reply");
    handles
}

fn run_transmission_case(structured: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let disk = MemExport::new(DISK_SIZE);
    let fx = Fixture::with(
        disk,
        ServerConfig {
            max_payload: MAX_PAYLOAD,
            max_in_flight: 8,
            ..ServerConfig::default()
        },
    );
    let init: Vec<u8> = (0..DISK_SIZE as usize).map(initial).collect();
    fx.disk.fill(0, &init);
    let (bytes, sent) = encode(&ops);

    let finished = rt.block_on(async {
        let (mut c, task) = fx.connect();
        if structured {
            c.open_structured("disk").await;
        } else {
            c.open_simple("disk").await;
        }
        let (mut rd, mut wr) = tokio::io::split(c.s);
        // Collect replies concurrently so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = rd.read_to_end(&mut all).await;
            all
        });
        // The server may hang up mid-way (bad magic, oversized write): fine.
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        let done = tokio::time::timeout(Duration::from_secs(20), task).await;
        let replies = tokio::time::timeout(Duration::from_secs(20), drain).await;
        (done, replies)
    });
    let (finished, replies) = finished;
    let joined = finished.map_err(|_| TestCaseError::fail("connection task did not finish"))?;
    let replies = replies
        .map_err(|_| TestCaseError::fail("reply stream did not end"))?
        .map_err(|e| TestCaseError::fail(format!("drain task: {e}")))?;
    if well_formed(&ops) {
        // Nothing was lost or invented: one reply per request, stream in sync.
        let mut got = reply_handles(&replies, &sent);
        got.sort_unstable();
        let want: Vec<u64> = sent.iter().map(|s| s.0).collect();
        prop_assert_eq!(got, want);
    }
    prop_assert!(joined.is_ok(), "connection task panicked: {joined:?}");
    prop_assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "a task panicked"
    );
    prop_assert_eq!(fx.disk.out_of_range_calls(), 0);
    let snap = fx.disk.snapshot();
    let region = REGION as usize;
    prop_assert!(
        snap[region..] == init[region..],
        "bytes outside the written region changed"
    );
    // Inside the region only the write pattern or the initial bytes appear.
    for (i, &b) in snap[..region].iter().enumerate() {
        prop_assert!(b == 0x5a || b == initial(i), "byte {} is {:#x}", i, b);
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum HsOp {
    /// A well-framed option with an arbitrary number and payload.
    Option {
        option: u32,
        payload: Vec<u8>,
    },
    Raw(Vec<u8>),
}

fn hs_op() -> impl Strategy<Value = HsOp> {
    let option = prop_oneof![0u32..16, any::<u32>()];
    prop_oneof![
        6 => (option, proptest::collection::vec(any::<u8>(), 0..128))
            .prop_map(|(option, payload)| HsOp::Option { option, payload }),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(HsOp::Raw),
    ]
}

fn run_handshake_case(client_flags: u32, ops: Vec<HsOp>) -> Result<(), TestCaseError> {
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fx = Fixture::new();
    let init = fx.disk.snapshot();
    let mut bytes = client_flags.to_be_bytes().to_vec();
    for op in &ops {
        match op {
            HsOp::Option { option, payload } => {
                bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&option.to_be_bytes());
                bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                bytes.extend_from_slice(payload);
            }
            HsOp::Raw(r) => bytes.extend_from_slice(r),
        }
    }
    let finished = rt.block_on(async {
        let (c, task) = fx.connect();
        let (mut rd, mut wr) = tokio::io::split(c.s);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        let done = tokio::time::timeout(Duration::from_secs(20), task).await;
        drain.abort();
        done
    });
    let joined = finished.map_err(|_| TestCaseError::fail("connection task did not finish"))?;
    prop_assert!(joined.is_ok(), "connection task panicked: {joined:?}");
    prop_assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "a task panicked"
    );
    // Random options may reach transmission (GO / EXPORT_NAME), but random
    // bytes after that cannot carry a valid write header.
    prop_assert!(fx.disk.snapshot() == init, "export changed");
    prop_assert_eq!(fx.disk.out_of_range_calls(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_requests_after_handshake(structured in any::<bool>(), ops in proptest::collection::vec(op(), 1..60)) {
        run_transmission_case(structured, ops)?;
    }

    #[test]
    fn random_options_during_handshake(
        client_flags in prop_oneof![Just(3u32), Just(1u32), any::<u32>()],
        ops in proptest::collection::vec(hs_op(), 0..20),
    ) {
        run_handshake_case(client_flags, ops)?;
    }
}

/// Deterministic worst cases next to the random ones.
#[test]
fn hostile_sequences() {
    let cases: Vec<Vec<Op>> = vec![
        // Oversized write header closes before anything else happens.
        vec![
            Op::Header {
                kind: NBD_CMD_WRITE,
                flags: 0,
                offset: DISK_SIZE,
                len: MAX_PAYLOAD + 1,
                send_payload: false,
            },
            Op::Write { offset: 0, len: 10 },
        ],
        // Out-of-range write with payload, then valid traffic.
        vec![
            Op::Header {
                kind: NBD_CMD_WRITE,
                flags: 0,
                offset: DISK_SIZE - 1,
                len: 4096,
                send_payload: true,
            },
            Op::Write {
                offset: 100,
                len: 100,
            },
            Op::Read {
                offset: 0,
                len: 200,
            },
        ],
        // Overflowing offsets on every command.
        (0..10)
            .map(|kind| Op::Header {
                kind,
                flags: 0,
                offset: u64::MAX,
                len: 1,
                send_payload: true,
            })
            .collect(),
        // Garbage straight away.
        vec![Op::Raw(vec![0xff; 63])],
    ];
    for structured in [false, true] {
        for ops in &cases {
            run_transmission_case(structured, ops.clone()).unwrap();
        }
    }
}
