//! A small hand-written NBD client for driving the server byte by byte in tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ditto_nbd::memory::{MemExport, MemRegistry};
use ditto_nbd::proto::*;
use ditto_nbd::{Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

pub const DISK_SIZE: u64 = 1 << 20;

/// A server with a writable export "disk" and a read-only one "ro".
pub struct Fixture {
    pub server: Arc<Server>,
    pub registry: Arc<MemRegistry>,
    pub disk: Arc<MemExport>,
    pub ro: Arc<MemExport>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with(MemExport::new(DISK_SIZE), ServerConfig::default())
    }

    pub fn with(disk: MemExport, config: ServerConfig) -> Fixture {
        let disk = Arc::new(disk);
        let ro = Arc::new(MemExport::new(DISK_SIZE).read_only(true));
        let registry = Arc::new(MemRegistry::new());
        registry.insert("disk", "test disk", disk.clone());
        registry.insert("ro", "read-only disk", ro.clone());
        let server = Server::new(registry.clone(), config);
        Fixture {
            server,
            registry,
            disk,
            ro,
        }
    }

    /// Connects an in-memory pipe; the handle resolves when the server is done with it.
    pub fn connect(&self) -> (Client<DuplexStream>, JoinHandle<()>) {
        let (c, s) = tokio::io::duplex(4 << 20);
        let task = tokio::spawn(self.server.clone().serve_connection(s, "test-peer".into()));
        (Client::new(c), task)
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A whole reply to one request, assembled from its chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// First error seen (simple reply error field or error chunk); 0 if none.
    pub error: u32,
    /// Error message from a structured error chunk.
    pub message: String,
    /// Read data (simple payload, or OFFSET_DATA chunks as (offset, bytes)).
    pub data: Vec<(u64, Vec<u8>)>,
    /// Block status chunks: (context id, [(length, flags)]).
    pub block_status: Vec<(u32, Vec<(u32, u32)>)>,
    /// Chunk types seen, in order (empty for simple replies).
    pub chunk_types: Vec<u16>,
    pub structured: bool,
}

pub struct Client<S> {
    pub s: S,
    pub structured: bool,
    /// Handles of READs in flight and their lengths (simple replies carry no length).
    reads: HashMap<u64, u32>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(s: S) -> Self {
        Client {
            s,
            structured: false,
            reads: HashMap::new(),
        }
    }

    /// Reads the greeting and answers with `client_flags`; returns the handshake flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(self.s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = self.s.read_u16().await.unwrap();
        self.s.write_u32(client_flags).await.unwrap();
        flags
    }

    pub async fn greet_default(&mut self) {
        let f = self
            .greet(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .await;
        assert_eq!(f, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> OptReply {
        assert_eq!(self.s.read_u64().await.unwrap(), REPLY_MAGIC);
        let option = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply { option, kind, data }
    }

    /// Reads replies until a final one (ACK or error).
    pub async fn read_opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply().await;
            let last = r.kind == NBD_REP_ACK || r.kind & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub async fn structured_reply(&mut self) {
        self.send_option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
        let r = self.read_opt_reply().await;
        assert_eq!(r.kind, NBD_REP_ACK);
        self.structured = true;
    }

    /// SET_META_CONTEXT (or LIST) with `queries`; returns all replies.
    pub async fn meta_context(
        &mut self,
        option: u32,
        name: &str,
        queries: &[&str],
    ) -> Vec<OptReply> {
        self.send_option(option, &meta_payload(name, queries)).await;
        self.read_opt_replies().await
    }

    /// INFO or GO; returns all replies.
    pub async fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> Vec<OptReply> {
        self.send_option(option, &info_payload(name, requests))
            .await;
        self.read_opt_replies().await
    }

    /// GO into `name`, asserting success; returns (size, transmission flags).
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info(NBD_OPT_GO, name, &[]).await;
        assert_eq!(replies.last().unwrap().kind, NBD_REP_ACK, "{replies:?}");
        export_info(&replies).expect("NBD_INFO_EXPORT")
    }

    /// Full structured handshake with base:allocation, into `name`.
    pub async fn open_structured(&mut self, name: &str) -> (u64, u16) {
        self.greet_default().await;
        self.structured_reply().await;
        let r = self
            .meta_context(NBD_OPT_SET_META_CONTEXT, name, &["base:allocation"])
            .await;
        assert_eq!(r.len(), 2, "{r:?}");
        self.go(name).await
    }

    /// Handshake with simple replies only, into `name`.
    pub async fn open_simple(&mut self, name: &str) -> (u64, u16) {
        self.greet_default().await;
        self.go(name).await
    }

    pub async fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        if kind == NBD_CMD_READ {
            self.reads.insert(handle, len);
        }
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one complete reply (all chunks up to DONE).
    pub async fn read_reply(&mut self) -> Reply {
        let magic = self.s.read_u32().await.unwrap();
        if magic == NBD_SIMPLE_REPLY_MAGIC {
            let error = self.s.read_u32().await.unwrap();
            let handle = self.s.read_u64().await.unwrap();
            let mut r = Reply {
                handle,
                error,
                ..Reply::default()
            };
            if let Some(len) = self.reads.remove(&handle) {
                if error == 0 {
                    let mut d = vec![0; len as usize];
                    self.s.read_exact(&mut d).await.unwrap();
                    r.data.push((0, d));
                }
            }
            return r;
        }
        assert_eq!(magic, NBD_STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut r = Reply {
            structured: true,
            ..Reply::default()
        };
        let mut first = true;
        loop {
            if !first {
                assert_eq!(self.s.read_u32().await.unwrap(), NBD_STRUCTURED_REPLY_MAGIC);
            }
            let flags = self.s.read_u16().await.unwrap();
            let kind = self.s.read_u16().await.unwrap();
            let handle = self.s.read_u64().await.unwrap();
            let len = self.s.read_u32().await.unwrap();
            let mut p = vec![0; len as usize];
            self.s.read_exact(&mut p).await.unwrap();
            if first {
                r.handle = handle;
            } else {
                // This client keeps one request's chunks together only
                // because the server sends every reply as a single chunk.
                assert_eq!(r.handle, handle, "chunks of different replies interleaved");
            }
            first = false;
            r.chunk_types.push(kind);
            match kind {
                NBD_REPLY_TYPE_NONE => assert_eq!(len, 0),
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    assert!(len >= 9, "OFFSET_DATA chunk too short");
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    r.data.push((off, p[8..].to_vec()));
                }
                NBD_REPLY_TYPE_BLOCK_STATUS => {
                    assert!(
                        len >= 12 && (len - 4) % 8 == 0,
                        "bad BLOCK_STATUS length {len}"
                    );
                    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let d = p[4..]
                        .chunks(8)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[..4].try_into().unwrap()),
                                u32::from_be_bytes(c[4..].try_into().unwrap()),
                            )
                        })
                        .collect();
                    r.block_status.push((id, d));
                }
                k if k & 0x8000 != 0 => {
                    assert!(len >= 6);
                    let err = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let mlen = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                    assert!(6 + mlen <= len as usize, "message longer than chunk");
                    assert_ne!(err, 0, "error chunk with zero error");
                    if r.error == 0 {
                        r.error = err;
                        r.message = String::from_utf8(p[6..6 + mlen].to_vec()).unwrap();
                    }
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                self.reads.remove(&r.handle);
                return r;
            }
        }
    }

    pub async fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Reply {
        self.send_request(flags, kind, 0xfeed, offset, len, payload)
            .await;
        let r = self.read_reply().await;
        assert_eq!(r.handle, 0xfeed);
        r
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.request(0, NBD_CMD_WRITE, offset, data.len() as u32, data)
            .await
    }

    /// READ, returning (error, data assembled in order).
    pub async fn read(&mut self, offset: u64, len: u32) -> (u32, Vec<u8>) {
        let r = self.request(0, NBD_CMD_READ, offset, len, &[]).await;
        (r.error, assemble(&r, offset, len))
    }

    /// True if the server closed the connection (EOF within a second).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }
}

/// Puts the read chunks of `r` together into the requested range.
pub fn assemble(r: &Reply, offset: u64, len: u32) -> Vec<u8> {
    if !r.structured {
        return r.data.first().map(|d| d.1.clone()).unwrap_or_default();
    }
    let mut out = vec![0u8; len as usize];
    for (off, d) in &r.data {
        let s = (off - offset) as usize;
        out[s..s + d.len()].copy_from_slice(d);
    }
    out
}

pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// (size, flags) from the NBD_INFO_EXPORT among `replies`.
pub fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies.iter().find_map(|r| {
        (r.kind == NBD_REP_INFO
            && r.data.len() == 12
            && r.data[..2] == NBD_INFO_EXPORT.to_be_bytes())
        .then(|| {
            (
                u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
            )
        })
    })
}

/// Payload of the NBD_REP_INFO of type `kind`, without the type.
pub fn info_item(replies: &[OptReply], kind: u16) -> Option<Vec<u8>> {
    replies.iter().find_map(|r| {
        (r.kind == NBD_REP_INFO && r.data.len() >= 2 && r.data[..2] == kind.to_be_bytes())
            .then(|| r.data[2..].to_vec())
    })
}
