//! Protocol conformance and robustness tests with a raw client over in-memory pipes and loopback.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ditto_nbd::memory::MemExport;
use ditto_nbd::proto::*;
use ditto_nbd::{ExportError, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------- handshake

#[tokio::test]
async fn handshake_simple_replies_then_write_and_read_back() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    let (size, flags) = c.open_simple("disk").await;
    assert_eq!(size, DISK_SIZE);
    // No DF without structured replies; no FAST_ZERO unless the export offers it.
    assert_eq!(flags, BASE_FLAGS);

    let data = pattern(8192, 7);
    let w = c.write(4096, &data).await;
    assert_eq!((w.error, w.structured), (0, false));
    let (err, back) = c.read(4096, 8192).await;
    assert_eq!(err, 0);
    assert_eq!(back, data);
    assert_eq!(&f.disk.snapshot()[4096..12288], &data[..]);
    let r = c.request(0, NBD_CMD_FLUSH, 0, 0, &[]).await;
    assert_eq!(r.error, 0);
    // Zero-length read in simple mode: a bare header, no payload.
    let (err, back) = c.read(0, 0).await;
    assert_eq!((err, back.len()), (0, 0));
    // The stream is still in sync after it.
    let (err, back) = c.read(4096, 16).await;
    assert_eq!((err, &back[..]), (0, &data[..16]));
    // Large payloads take the uncopied (vectored) path in both directions.
    let big = pattern(512 * 1024, 42);
    assert_eq!(c.write(65536, &big).await.error, 0);
    let (err, back) = c.read(65536, big.len() as u32).await;
    assert_eq!(err, 0);
    assert!(back == big, "large read differs");
}

#[tokio::test]
async fn handshake_structured_replies_and_read_chunks() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    c.structured_reply().await;
    let r = c
        .meta_context(NBD_OPT_SET_META_CONTEXT, "disk", &["base:allocation"])
        .await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, NBD_REP_META_CONTEXT);
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    assert_ne!(id, 0);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    assert_eq!(r[1].kind, NBD_REP_ACK);
    let (_, flags) = c.go("disk").await;
    assert_eq!(flags, BASE_FLAGS | NBD_FLAG_SEND_DF);

    let data = pattern(4096, 1);
    assert_eq!(c.write(0, &data).await.error, 0);
    let r = c.request(0, NBD_CMD_READ, 0, 4096, &[]).await;
    assert!(r.structured);
    assert_eq!(r.chunk_types, vec![NBD_REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(r.data, vec![(0, data.clone())]);
    // DF is accepted once advertised; the reply is one chunk anyway.
    let r = c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 100, &[]).await;
    assert_eq!((r.error, r.data.len()), (0, 1));
    // Zero-length read: NONE with DONE.
    let r = c.request(0, NBD_CMD_READ, 10, 0, &[]).await;
    assert_eq!(
        (r.error, r.chunk_types.clone()),
        (0, vec![NBD_REPLY_TYPE_NONE])
    );
    let big = pattern(300 * 1024, 5);
    assert_eq!(c.write(8192, &big).await.error, 0);
    let r = c
        .request(0, NBD_CMD_READ, 8192, big.len() as u32, &[])
        .await;
    assert!(r.data == vec![(8192, big)], "large structured read differs");
    // Block status answers with the id we were given.
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 8192, &[]).await;
    assert_eq!(r.block_status, vec![(id, vec![(4096, 0), (4096, 3)])]);
    let r = c
        .request(0, NBD_CMD_BLOCK_STATUS, 8192 + 300 * 1024, 8192, &[])
        .await;
    assert_eq!(r.block_status, vec![(id, vec![(8192, 3)])]);
}

#[tokio::test]
async fn opt_list_names_every_export_then_acks() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    c.send_option(NBD_OPT_LIST, &[]).await;
    let r = c.read_opt_replies().await;
    assert_eq!(r.len(), 3, "{r:?}");
    let mut seen = Vec::new();
    for s in &r[..2] {
        assert_eq!(s.kind, NBD_REP_SERVER);
        let n = u32::from_be_bytes(s.data[..4].try_into().unwrap()) as usize;
        seen.push((
            String::from_utf8(s.data[4..4 + n].to_vec()).unwrap(),
            String::from_utf8(s.data[4 + n..].to_vec()).unwrap(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("disk".to_string(), "test disk".to_string()),
            ("ro".to_string(), "read-only disk".to_string())
        ]
    );
    assert_eq!(r[2].kind, NBD_REP_ACK);
    // LIST with data is invalid, and the session goes on.
    c.send_option(NBD_OPT_LIST, b"x").await;
    assert_eq!(c.read_opt_reply().await.kind, NBD_REP_ERR_INVALID);
    c.go("disk").await;
}

#[tokio::test]
async fn opt_info_unknown_export_then_info_items_then_go() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    let r = c.info(NBD_OPT_INFO, "nope", &[]).await;
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].option, r[0].kind),
        (NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN)
    );
    let r = c.info(NBD_OPT_GO, "nope", &[]).await;
    assert_eq!(r.last().unwrap().kind, NBD_REP_ERR_UNKNOWN);

    let r = c
        .info(
            NBD_OPT_INFO,
            "disk",
            &[
                NBD_INFO_NAME,
                NBD_INFO_DESCRIPTION,
                NBD_INFO_BLOCK_SIZE,
                0x4242,
            ],
        )
        .await;
    assert_eq!(r.last().unwrap().kind, NBD_REP_ACK);
    assert_eq!(export_info(&r), Some((DISK_SIZE, BASE_FLAGS)));
    assert_eq!(info_item(&r, NBD_INFO_NAME).unwrap(), b"disk");
    assert_eq!(info_item(&r, NBD_INFO_DESCRIPTION).unwrap(), b"test disk");
    let bs = info_item(&r, NBD_INFO_BLOCK_SIZE).unwrap();
    assert_eq!(bs.len(), 12);
    assert_eq!(&bs[..4], &1u32.to_be_bytes());
    assert_eq!(&bs[4..8], &4096u32.to_be_bytes());
    assert_eq!(&bs[8..], &(32u32 << 20).to_be_bytes());

    // Block size is sent even unasked; name/description only when asked.
    let r = c.info(NBD_OPT_INFO, "ro", &[]).await;
    assert!(info_item(&r, NBD_INFO_BLOCK_SIZE).is_some());
    assert!(info_item(&r, NBD_INFO_NAME).is_none());
    assert_eq!(
        export_info(&r),
        Some((DISK_SIZE, BASE_FLAGS | NBD_FLAG_READ_ONLY))
    );

    // Malformed INFO (name length past the end) is ERR_INVALID, not a hang-up.
    c.send_option(NBD_OPT_INFO, &[0, 0, 0, 99, b'a']).await;
    assert_eq!(c.read_opt_reply().await.kind, NBD_REP_ERR_INVALID);
    c.go("disk").await;
    assert_eq!(c.write(0, b"ok").await.error, 0);
}

#[tokio::test]
async fn unknown_options_get_err_unsup_and_the_session_continues() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    for (opt, payload) in [
        (NBD_OPT_EXTENDED_HEADERS, &b""[..]),
        (NBD_OPT_EXTENDED_HEADERS, &b"junk-payload"[..]),
        (0x7777, &[1u8; 300][..]),
        (NBD_OPT_STARTTLS, &b""[..]),
        (4, &b""[..]), // withdrawn PEEK_EXPORT
    ] {
        c.send_option(opt, payload).await;
        let r = c.read_opt_reply().await;
        // Without TLS configured, STARTTLS is refused by policy (NOTLS mode).
        let want = if opt == NBD_OPT_STARTTLS {
            NBD_REP_ERR_POLICY
        } else {
            NBD_REP_ERR_UNSUP
        };
        assert_eq!((r.option, r.kind), (opt, want));
    }
    let (size, _) = c.go("disk").await;
    assert_eq!(size, DISK_SIZE);
    assert_eq!(c.write(0, b"still in sync").await.error, 0);
    assert_eq!(&f.disk.snapshot()[..13], b"still in sync");
}

#[tokio::test]
async fn export_name_option_honours_no_zeroes() {
    let f = Fixture::new();
    for (client_flags, tail) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0usize),
        (NBD_FLAG_C_FIXED_NEWSTYLE, 124),
    ] {
        let (mut c, _t) = f.connect();
        c.greet(client_flags).await;
        c.send_option(NBD_OPT_EXPORT_NAME, b"disk").await;
        assert_eq!(c.s.read_u64().await.unwrap(), DISK_SIZE);
        assert_eq!(c.s.read_u16().await.unwrap(), BASE_FLAGS);
        let mut zeroes = vec![0xffu8; tail];
        c.s.read_exact(&mut zeroes).await.unwrap();
        assert!(zeroes.iter().all(|&b| b == 0));
        // Next bytes are replies to requests, not padding.
        assert_eq!(c.write(0, b"abc").await.error, 0);
    }
    // Unknown export: the only answer the protocol allows is hanging up.
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    c.send_option(NBD_OPT_EXPORT_NAME, b"nope").await;
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn refuses_clients_without_fixed_newstyle_or_with_unknown_flags() {
    let f = Fixture::new();
    for flags in [
        0u32,
        NBD_FLAG_C_NO_ZEROES,
        NBD_FLAG_C_FIXED_NEWSTYLE | 4,
        0x8000_0001,
    ] {
        let (mut c, t) = f.connect();
        c.greet(flags).await;
        assert!(c.is_closed().await, "client flags {flags:#x} accepted");
        t.await.unwrap();
    }
}

#[tokio::test]
async fn abort_is_acked_then_closed() {
    let f = Fixture::new();
    let (mut c, t) = f.connect();
    c.greet_default().await;
    c.send_option(NBD_OPT_ABORT, &[]).await;
    let r = c.read_opt_reply().await;
    assert_eq!((r.option, r.kind), (NBD_OPT_ABORT, NBD_REP_ACK));
    assert!(c.is_closed().await);
    t.await.unwrap();
}

#[tokio::test]
async fn oversized_option_is_refused_without_reading_it() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    // Header only: claims 1 GiB of payload that never comes.
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    let r = c.read_opt_reply().await;
    assert_eq!(r.kind, NBD_REP_ERR_TOO_BIG);
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    c.s.write_all(&[0u8; 16]).await.unwrap();
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn meta_context_negotiation() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.greet_default().await;
    // Both need structured replies first.
    let r = c
        .meta_context(NBD_OPT_SET_META_CONTEXT, "disk", &["base:allocation"])
        .await;
    assert_eq!(
        r.iter().map(|r| r.kind).collect::<Vec<_>>(),
        vec![NBD_REP_ERR_INVALID]
    );
    let r = c.meta_context(NBD_OPT_LIST_META_CONTEXT, "disk", &[]).await;
    assert_eq!(r.last().unwrap().kind, NBD_REP_ERR_INVALID);
    c.structured_reply().await;

    // LIST: no query, "base:" and "base:allocation" all find it, with id 0.
    for q in [
        &[][..],
        &["base:"][..],
        &["base:allocation"][..],
        &["x-a:", "base:"][..],
    ] {
        let r = c.meta_context(NBD_OPT_LIST_META_CONTEXT, "disk", q).await;
        assert_eq!(r.len(), 2, "{q:?}: {r:?}");
        assert_eq!(r[0].kind, NBD_REP_META_CONTEXT);
        assert_eq!(&r[0].data[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].kind, NBD_REP_ACK);
    }
    // Other namespaces and unknown leaves just find nothing.
    for q in [
        &["qemu:dirty-bitmap:x"][..],
        &["base:nope"][..],
        &["nocolon"][..],
    ] {
        let r = c.meta_context(NBD_OPT_LIST_META_CONTEXT, "disk", q).await;
        assert_eq!(
            r.iter().map(|r| r.kind).collect::<Vec<_>>(),
            vec![NBD_REP_ACK]
        );
    }
    // SET ignores "base:" (a wildcard only for LIST).
    let r = c
        .meta_context(NBD_OPT_SET_META_CONTEXT, "disk", &["base:"])
        .await;
    assert_eq!(
        r.iter().map(|r| r.kind).collect::<Vec<_>>(),
        vec![NBD_REP_ACK]
    );
    // Unknown export and malformed requests.
    let r = c
        .meta_context(NBD_OPT_SET_META_CONTEXT, "nope", &["base:allocation"])
        .await;
    assert_eq!(r.last().unwrap().kind, NBD_REP_ERR_UNKNOWN);
    c.send_option(NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 4, b'd'])
        .await;
    assert_eq!(c.read_opt_reply().await.kind, NBD_REP_ERR_INVALID);

    // Selected for "ro" but going into "disk": no context in transmission.
    let r = c
        .meta_context(NBD_OPT_SET_META_CONTEXT, "ro", &["base:allocation"])
        .await;
    assert_eq!(r[0].kind, NBD_REP_META_CONTEXT);
    c.go("disk").await;
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 4096, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    assert!(r.block_status.is_empty());
}

// ---------------------------------------------------------------- transmission

#[tokio::test]
async fn out_of_range_read_is_einval_and_connection_survives() {
    let f = Fixture::new();
    for structured in [false, true] {
        let (mut c, _t) = f.connect();
        if structured {
            c.open_structured("disk").await;
        } else {
            c.open_simple("disk").await;
        }
        for (off, len) in [
            (DISK_SIZE, 1),
            (DISK_SIZE - 10, 11),
            (u64::MAX, 1),
            (u64::MAX - 10, 4096),
        ] {
            let r = c.request(0, NBD_CMD_READ, off, len, &[]).await;
            assert_eq!(r.error, NBD_EINVAL, "read {off}+{len}");
            assert!(r.data.is_empty());
            if structured {
                assert_eq!(r.chunk_types, vec![NBD_REPLY_TYPE_ERROR]);
                assert!(!r.message.is_empty());
            }
        }
        // Exactly up to the end is fine.
        let (err, d) = c.read(DISK_SIZE - 10, 10).await;
        assert_eq!((err, d.len()), (0, 10));
    }
    assert_eq!(f.disk.out_of_range_calls(), 0);
}

#[tokio::test]
async fn out_of_range_write_is_discarded_and_next_request_works() {
    let f = Fixture::new();
    let before = f.disk.snapshot();
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    // Payload bytes look like a request header: if the server did not
    // discard them it would execute this embedded write.
    let mut evil = Vec::new();
    evil.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    evil.extend_from_slice(&0u16.to_be_bytes());
    evil.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
    evil.extend_from_slice(&1u64.to_be_bytes());
    evil.extend_from_slice(&0u64.to_be_bytes());
    evil.extend_from_slice(&4u32.to_be_bytes());
    evil.extend_from_slice(b"EVIL");
    for off in [DISK_SIZE - 8, u64::MAX - 3] {
        let r = c
            .request(0, NBD_CMD_WRITE, off, evil.len() as u32, &evil)
            .await;
        // The protocol asks for ENOSPC on writes past the end.
        assert_eq!(r.error, NBD_ENOSPC);
    }
    assert_eq!(f.disk.snapshot(), before);
    assert_eq!(c.write(100, b"fine").await.error, 0);
    assert_eq!(&f.disk.snapshot()[100..104], b"fine");
    assert_eq!(f.disk.out_of_range_calls(), 0);
}

#[tokio::test]
async fn bad_request_magic_closes_connection() {
    let f = Fixture::new();
    let (mut c, t) = f.connect();
    c.open_simple("disk").await;
    let mut b = vec![0u8; 28];
    b[..4].copy_from_slice(&0x2560_9514u32.to_be_bytes());
    c.s.write_all(&b).await.unwrap();
    assert!(c.is_closed().await);
    t.await.unwrap();
}

#[tokio::test]
async fn oversized_read_is_einval_and_oversized_write_closes() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE),
        ServerConfig {
            max_payload: 64 * 1024,
            ..ServerConfig::default()
        },
    );
    let (mut c, t) = f.connect();
    c.open_structured("disk").await;
    let r = c.request(0, NBD_CMD_READ, 0, 64 * 1024 + 1, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.request(0, NBD_CMD_READ, 0, u32::MAX, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    // At the limit is fine.
    let (err, d) = c.read(0, 64 * 1024).await;
    assert_eq!((err, d.len()), (0, 64 * 1024));
    // TRIM and BLOCK_STATUS carry no payload: the limit does not apply.
    let r = c.request(0, NBD_CMD_TRIM, 0, DISK_SIZE as u32, &[]).await;
    assert_eq!(r.error, 0);
    let r = c
        .request(0, NBD_CMD_BLOCK_STATUS, 0, DISK_SIZE as u32, &[])
        .await;
    assert_eq!(r.error, 0);
    // A WRITE header announcing more than the limit: hang up without reading it.
    c.send_request(0, NBD_CMD_WRITE, 9, 0, 64 * 1024 + 1, &[])
        .await;
    assert!(c.is_closed().await);
    t.await.unwrap();
    assert_eq!(f.disk.calls(), 3);
}

#[tokio::test]
async fn unknown_commands_and_bad_flags_are_einval() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    for kind in [5u16, 8, 9, 0x7fff, 0xffff] {
        let r = c.request(0, kind, 0, 512, &[]).await;
        assert_eq!(r.error, NBD_EINVAL, "command {kind}");
    }
    for (flags, kind) in [
        (NBD_CMD_FLAG_NO_HOLE, NBD_CMD_READ),
        (NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ),
        (NBD_CMD_FLAG_DF, NBD_CMD_TRIM),
        // FAST_ZERO was not advertised for this export.
        (NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES),
        (1 << 5, NBD_CMD_FLUSH),
        (0x8000, NBD_CMD_BLOCK_STATUS),
    ] {
        let r = c.request(flags, kind, 0, 512, &[]).await;
        assert_eq!(r.error, NBD_EINVAL, "flags {flags:#x} on {kind}");
    }
    // A WRITE with a bad flag still has its payload consumed.
    let r = c
        .request(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_WRITE, 0, 4, b"nope")
        .await;
    assert_eq!(r.error, NBD_EINVAL);
    // FUA is accepted on anything.
    let r = c.request(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 0, 4, &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(c.write(0, b"good").await.error, 0);
    assert_eq!(&f.disk.snapshot()[..4], b"good");
}

#[tokio::test]
async fn df_is_refused_without_structured_replies() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.open_simple("disk").await;
    let r = c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 4, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    assert!(r.data.is_empty());
    // Block status without any context (and without structured replies).
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 4, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
}

#[tokio::test]
async fn writes_to_read_only_export_are_eperm() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    let (_, flags) = c.open_structured("ro").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
        let payload: &[u8] = if kind == NBD_CMD_WRITE { b"data" } else { b"" };
        let r = c.request(0, kind, 0, 4, payload).await;
        assert_eq!(r.error, NBD_EPERM, "command {kind}");
    }
    let (err, _) = c.read(0, 4).await;
    assert_eq!(err, 0);
    assert_eq!(c.request(0, NBD_CMD_FLUSH, 0, 0, &[]).await.error, 0);
    // Read-only refusals never reach the export.
    assert_eq!(f.ro.calls(), 2);
}

#[tokio::test]
async fn block_status_reports_holes_after_trim() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    const H: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(c.write(0, &pattern(65536, 3)).await.error, 0);
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 131072, &[]).await;
    assert_eq!(r.block_status[0].1, vec![(65536, 0), (65536, H)]);

    assert_eq!(c.request(0, NBD_CMD_TRIM, 16384, 16384, &[]).await.error, 0);
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 131072, &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(r.chunk_types, vec![NBD_REPLY_TYPE_BLOCK_STATUS]);
    assert_eq!(
        r.block_status[0].1,
        vec![(16384, 0), (16384, H), (32768, 0), (65536, H)]
    );
    // Trimmed range reads back as zeroes.
    let (_, d) = c.read(16384, 16384).await;
    assert!(d.iter().all(|&b| b == 0));
    // REQ_ONE: exactly one descriptor, not longer than the request.
    let r = c
        .request(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 0, 131072, &[])
        .await;
    assert_eq!(r.block_status[0].1, vec![(16384, 0)]);
    let r = c
        .request(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 20000, 1000, &[])
        .await;
    assert_eq!(r.block_status[0].1, vec![(1000, H)]);
    // Unaligned start, and a whole-disk query.
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 100, 16384, &[]).await;
    assert_eq!(r.block_status[0].1, vec![(16284, 0), (100, H)]);
    let r = c
        .request(0, NBD_CMD_BLOCK_STATUS, 0, DISK_SIZE as u32, &[])
        .await;
    let total: u64 = r.block_status[0].1.iter().map(|d| u64::from(d.0)).sum();
    assert_eq!(total, DISK_SIZE);
    // Out of range and zero length are EINVAL.
    let r = c
        .request(0, NBD_CMD_BLOCK_STATUS, DISK_SIZE - 1, 2, &[])
        .await;
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 0, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    assert_eq!(f.disk.out_of_range_calls(), 0);
}

#[tokio::test]
async fn write_zeroes_honours_no_hole_and_fast_zero() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE).fast_zero(true),
        ServerConfig::default(),
    );
    let (mut c, _t) = f.connect();
    let (_, flags) = c.open_structured("disk").await;
    assert_ne!(flags & NBD_FLAG_SEND_FAST_ZERO, 0);
    const H: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(c.write(0, &pattern(32768, 9)).await.error, 0);
    // NO_HOLE: zeroes, but stays allocated.
    let r = c
        .request(NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, 0, 8192, &[])
        .await;
    assert_eq!(r.error, 0);
    // Without it the export may punch a hole.
    let r = c
        .request(
            NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_WRITE_ZEROES,
            8192,
            8192,
            &[],
        )
        .await;
    assert_eq!(r.error, 0);
    let r = c.request(0, NBD_CMD_BLOCK_STATUS, 0, 32768, &[]).await;
    assert_eq!(r.block_status[0].1, vec![(8192, 0), (8192, H), (16384, 0)]);
    let (_, d) = c.read(0, 16384).await;
    assert!(d.iter().all(|&b| b == 0));
    let (_, d) = c.read(16384, 16384).await;
    assert_eq!(d, pattern(32768, 9)[16384..].to_vec());
}

#[tokio::test]
async fn export_errors_map_to_protocol_errors() {
    let f = Fixture::new();
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    let cases = [
        (
            ExportError::Io("disk on fire".into()),
            NBD_CMD_READ,
            0,
            NBD_EIO,
        ),
        (ExportError::NoSpace, NBD_CMD_WRITE, 0, NBD_ENOSPC),
        (
            ExportError::Invalid("x".into()),
            NBD_CMD_TRIM,
            0,
            NBD_EINVAL,
        ),
        (ExportError::ReadOnly, NBD_CMD_WRITE, 0, NBD_EPERM),
        (ExportError::Shutdown, NBD_CMD_FLUSH, 0, NBD_ESHUTDOWN),
        // ENOTSUP only for a refused FAST_ZERO ...
        (
            ExportError::NotSupported("slow".into()),
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_FAST_ZERO,
            NBD_ENOTSUP,
        ),
        // ... anything else unsupported is EINVAL.
        (
            ExportError::NotSupported("no".into()),
            NBD_CMD_TRIM,
            0,
            NBD_EINVAL,
        ),
        (
            ExportError::Io("bs".into()),
            NBD_CMD_BLOCK_STATUS,
            0,
            NBD_EIO,
        ),
    ];
    // FAST_ZERO needs the flag advertised; use an export that offers it.
    let fz = Fixture::with(
        MemExport::new(DISK_SIZE).fast_zero(true),
        ServerConfig::default(),
    );
    let (mut cfz, _tfz) = fz.connect();
    cfz.open_structured("disk").await;
    for (e, kind, flags, want) in cases {
        let (client, export) = if flags & NBD_CMD_FLAG_FAST_ZERO != 0 {
            (&mut cfz, &fz.disk)
        } else {
            (&mut c, &f.disk)
        };
        export.fail_next(e.clone());
        let payload: &[u8] = if kind == NBD_CMD_WRITE { b"abcd" } else { b"" };
        let len = if kind == NBD_CMD_FLUSH { 0 } else { 4 };
        let r = client.request(flags, kind, 0, len, payload).await;
        assert_eq!(r.error, want, "{e:?}");
        assert_eq!(r.chunk_types, vec![NBD_REPLY_TYPE_ERROR]);
        assert_eq!(r.message, e.to_string());
    }
    // Simple replies carry the same numbers.
    let (mut s, _ts) = f.connect();
    s.open_simple("disk").await;
    f.disk.fail_next(ExportError::Io("again".into()));
    let (err, d) = s.read(0, 4096).await;
    assert_eq!((err, d.len()), (NBD_EIO, 0));
    let (err, d) = s.read(0, 4096).await;
    assert_eq!((err, d.len()), (0, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_all_answered_with_right_handles() {
    // Jitter makes later requests finish first.
    let f = Fixture::with(
        MemExport::new(DISK_SIZE).jitter_ms(5),
        ServerConfig::default(),
    );
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    const N: u64 = 200;
    let mut expect = std::collections::HashMap::new();
    for i in 0..N {
        let off = i * 4096;
        if i % 2 == 0 {
            let d = pattern(4096, i as u8);
            c.send_request(0, NBD_CMD_WRITE, 1000 + i, off, 4096, &d)
                .await;
            expect.insert(1000 + i, None);
        } else {
            f.disk.fill(off, &pattern(4096, i as u8));
            c.send_request(0, NBD_CMD_READ, 1000 + i, off, 4096, &[])
                .await;
            expect.insert(1000 + i, Some((off, pattern(4096, i as u8))));
        }
    }
    let mut seen = Vec::new();
    for _ in 0..N {
        let r = tokio::time::timeout(Duration::from_secs(20), c.read_reply())
            .await
            .expect("reply");
        assert_eq!(r.error, 0);
        match expect
            .remove(&r.handle)
            .expect("unknown or duplicate handle")
        {
            None => assert!(r.data.is_empty()),
            Some((off, d)) => assert_eq!(r.data, vec![(off, d)]),
        }
        seen.push(r.handle);
    }
    assert!(expect.is_empty());
    let mut sorted = seen.clone();
    sorted.sort();
    assert_ne!(
        seen, sorted,
        "replies came back strictly in order: no concurrency"
    );
    assert!(f.disk.max_concurrent_calls() > 1);
    let snap = f.disk.snapshot();
    for i in (0..N).step_by(2) {
        let off = (i * 4096) as usize;
        assert_eq!(&snap[off..off + 4096], &pattern(4096, i as u8)[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE).jitter_ms(20),
        ServerConfig {
            max_in_flight: 4,
            ..ServerConfig::default()
        },
    );
    let (mut c, _t) = f.connect();
    c.open_simple("disk").await;
    for i in 0..32u64 {
        c.send_request(0, NBD_CMD_READ, i, i * 512, 512, &[]).await;
    }
    let mut handles = HashSet::new();
    for _ in 0..32 {
        let r = c.read_reply().await;
        assert_eq!(r.error, 0);
        assert!(handles.insert(r.handle));
    }
    let max = f.disk.max_concurrent_calls();
    assert!((2..=4).contains(&max), "max concurrent calls {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_answers_in_flight_requests_then_closes() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE).jitter_ms(50),
        ServerConfig::default(),
    );
    let (mut c, t) = f.connect();
    c.open_simple("disk").await;
    c.send_request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 77, 0, 4, b"last")
        .await;
    c.send_request(0, NBD_CMD_DISC, 78, 0, 0, &[]).await;
    let r = c.read_reply().await;
    assert_eq!((r.handle, r.error), (77, 0));
    assert!(c.is_closed().await);
    t.await.unwrap();
    assert_eq!(&f.disk.snapshot()[..4], b"last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_disconnect_export() {
    let f = Fixture::new();
    assert!(f.server.clients().is_empty());
    let (mut a, ta) = f.connect();
    a.open_structured("disk").await;
    let (mut b, _tb) = f.connect();
    b.open_simple("ro").await;
    // A connection still negotiating is not a client yet.
    let (mut pending, _tp) = f.connect();
    pending.greet_default().await;
    // Round trips make sure the server registered both sessions.
    assert_eq!(a.write(0, b"x").await.error, 0);
    assert_eq!(b.read(0, 1).await.0, 0);

    let clients = f.server.clients();
    assert_eq!(clients.len(), 2, "{clients:?}");
    let exports: Vec<&str> = clients.iter().map(|c| c.export.as_str()).collect();
    assert_eq!(exports, vec!["disk", "ro"]);
    assert!(clients.iter().all(|c| c.peer == "test-peer"));
    assert_ne!(clients[0].id, clients[1].id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(clients
        .iter()
        .all(|c| c.connected_at_unix <= now && c.connected_at_unix + 60 > now));

    assert_eq!(f.server.disconnect_export("nope"), 0);
    assert_eq!(f.server.disconnect_export("disk"), 1);
    assert!(a.is_closed().await);
    tokio::time::timeout(Duration::from_secs(5), ta)
        .await
        .expect("connection task ends")
        .unwrap();
    let clients = f.server.clients();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].export, "ro");
    // The other export's client is untouched.
    assert_eq!(b.read(0, 1).await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_waits_for_in_flight_request() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE).jitter_ms(200),
        ServerConfig::default(),
    );
    let (mut c, _t) = f.connect();
    c.open_simple("disk").await;
    c.send_request(0, NBD_CMD_WRITE, 5, 0, 4, b"slow").await;
    // Close only once the export is working on the request.
    while f.disk.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(f.server.disconnect_export("disk"), 1);
    let r = c.read_reply().await;
    assert_eq!((r.handle, r.error), (5, 0));
    assert!(c.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tcp_shutdown_closes_connections_and_returns() {
    let f = Fixture::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(f.server.clone().serve_tcp(listener));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = Client::new(stream);
    c.open_structured("disk").await;
    assert_eq!(c.write(0, b"tcp").await.error, 0);
    let clients = f.server.clients();
    assert_eq!(clients.len(), 1);
    assert!(clients[0].peer.starts_with("127.0.0.1:"), "{clients:?}");

    f.server.shutdown();
    assert!(c.is_closed().await);
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve_tcp returns after shutdown")
        .unwrap()
        .unwrap();
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_unix_socket() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let serving = tokio::spawn(f.server.clone().serve_unix(listener));
    let mut c = Client::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    c.open_simple("disk").await;
    assert_eq!(c.write(8, b"unix").await.error, 0);
    assert_eq!(c.read(8, 4).await, (0, b"unix".to_vec()));
    f.server.shutdown();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_before_serving_refuses_connections() {
    let f = Fixture::new();
    f.server.shutdown();
    let (mut c, t) = f.connect();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    t.await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), f.server.clone().serve_tcp(listener))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn config_is_sanitized() {
    let reg = Arc::new(ditto_nbd::memory::MemRegistry::new());
    let s = Server::new(
        reg,
        ServerConfig {
            max_payload: 5000,
            preferred_block: 3000,
            min_block: 1024,
            max_in_flight: 0,
            max_connections: 0,
            handshake_timeout: Duration::ZERO,
            max_in_flight_bytes_total: 0,
        },
    );
    let c = s.config();
    assert_eq!(c.min_block, 1024);
    assert_eq!(c.preferred_block, 4096);
    assert_eq!(c.max_payload, 4096);
    assert_eq!(c.max_in_flight, 1);
    assert_eq!(c.max_connections, 1);
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    // Room for at least one request of the largest size.
    assert_eq!(c.max_in_flight_bytes_total, 4096);
    let s = Server::new(
        Arc::new(ditto_nbd::memory::MemRegistry::new()),
        ServerConfig {
            max_payload: u32::MAX,
            preferred_block: 1 << 31,
            min_block: 3,
            max_in_flight: usize::MAX,
            max_connections: usize::MAX,
            handshake_timeout: Duration::MAX,
            max_in_flight_bytes_total: usize::MAX,
        },
    );
    let c = s.config();
    assert_eq!(c.min_block, 1);
    assert_eq!(c.preferred_block, 4096);
    assert_eq!(c.max_payload, 1 << 30);
    assert_eq!(c.max_in_flight, 65536);
    assert_eq!(
        c.max_in_flight_bytes_total,
        tokio::sync::Semaphore::MAX_PERMITS
    );
    assert_eq!(
        Server::new(
            Arc::new(ditto_nbd::memory::MemRegistry::new()),
            ServerConfig::default()
        )
        .config(),
        &ServerConfig::default()
    );
}

#[tokio::test]
async fn unaligned_requests_rejected_when_min_block_set() {
    let f = Fixture::with(
        MemExport::new(DISK_SIZE),
        ServerConfig {
            min_block: 512,
            ..ServerConfig::default()
        },
    );
    let (mut c, _t) = f.connect();
    c.open_structured("disk").await;
    assert_eq!(c.read(100, 512).await.0, NBD_EINVAL);
    assert_eq!(c.read(512, 100).await.0, NBD_EINVAL);
    assert_eq!(c.read(512, 512).await.0, 0);
    assert_eq!(c.write(3, b"x").await.error, NBD_EINVAL);
    assert_eq!(c.write(0, &[1u8; 512]).await.error, 0);
}
