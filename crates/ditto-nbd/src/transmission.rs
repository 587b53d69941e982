//! Transmission phase: parse requests, run them concurrently against the export, write replies.
//!
//! One reader loop (the connection task) parses request headers, checks them
//! and spawns a task per request; a writer task encodes replies in the order
//! they complete and writes them in batches, so several replies that finish
//! together leave in one write call. A slot semaphore bounds requests in
//! flight, and a byte semaphore bounds the payload memory a connection can
//! pin; both permits are released only once the reply has been written, so a
//! client that stops reading replies also stops being served.

use std::borrow::Cow;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::proto::*;
use crate::{Export, ExportError, Extent};

/// How long a closing connection waits for in-flight requests to be answered
/// before it drops the socket anyway (a stuck export or a client that stopped
/// reading must not keep `disconnect_export` or shutdown waiting forever).
pub const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// Read payloads up to this size are copied into the batch buffer; bigger
/// ones are written straight from the export's buffer with a vectored write.
const COPY_MAX: usize = 16 * 1024;
/// Write the batch once it holds this much, even if more replies are queued.
const BATCH_MAX: usize = 256 * 1024;

/// What the handshake settled, as the transmission phase needs it.
pub struct Session {
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub structured: bool,
    pub meta_context: Option<u32>,
    pub read_only: bool,
    pub fast_zero: bool,
    pub max_payload: u32,
    pub min_block: u32,
    pub max_in_flight: usize,
    /// Bound on READ/WRITE payload bytes held by this connection's requests in flight.
    pub max_in_flight_bytes: usize,
    /// The same bytes counted against the budget all connections share
    /// (permits of at least `max_payload`).
    pub budget: Arc<Semaphore>,
}

/// Why the transmission phase ended.
#[derive(Debug)]
pub enum End {
    /// Client sent NBD_CMD_DISC.
    Disconnect,
    /// The server asked the connection to close.
    Closed,
    /// Read failed (usually the client went away).
    Io(io::Error),
    /// The client broke the protocol in a way we cannot recover from.
    Protocol(&'static str),
}

/// The outcome of one request, before encoding.
enum Body {
    /// Success with no payload.
    Done,
    Error(u32, Cow<'static, str>),
    Read {
        offset: u64,
        data: Bytes,
    },
    BlockStatus {
        context: u32,
        /// Encoded (length, flags) descriptor pairs.
        descriptors: Vec<u8>,
    },
}

struct Reply {
    handle: u64,
    body: Body,
    /// Released when the reply has been written (see module docs).
    _slot: OwnedSemaphorePermit,
    _bytes: Option<BytePermits>,
}

/// Payload bytes of one request, held against the connection's bound and
/// the server-wide budget until its reply is written.
struct BytePermits {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

/// Maps an export error to the wire error for command `kind` with `flags`.
fn wire_error(e: &ExportError, kind: u16, flags: u16) -> u32 {
    match e {
        // The protocol reserves ENOTSUP for a refused FAST_ZERO ("SHOULD NOT
        // return NBD_ENOTSUP except ..."); anything else the export cannot do
        // is an invalid request from the client's point of view.
        ExportError::NotSupported(_)
            if !(kind == NBD_CMD_WRITE_ZEROES && flags & NBD_CMD_FLAG_FAST_ZERO != 0) =>
        {
            NBD_EINVAL
        }
        _ => e.nbd_errno(),
    }
}

fn export_error(e: ExportError, kind: u16, flags: u16) -> Body {
    Body::Error(wire_error(&e, kind, flags), Cow::Owned(e.to_string()))
}

impl Session {
    /// Checks a request header against the negotiated session. `Err` carries
    /// the wire error and a message for the client.
    fn check(&self, r: &RequestHeader) -> Result<(), (u32, &'static str)> {
        let allowed = match r.kind {
            NBD_CMD_READ if self.structured => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
            NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES if self.fast_zero => {
                NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
            }
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
            _ => return Err((NBD_EINVAL, "unknown command")),
        };
        // FUA is accepted on every command: the protocol says clients set it
        // loosely and the server must not reject it when SEND_FUA is offered.
        if r.flags & !allowed != 0 {
            return Err((NBD_EINVAL, "command flag not valid for this command"));
        }
        if r.kind == NBD_CMD_FLUSH {
            return Ok(());
        }
        let writes = matches!(r.kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err((NBD_EPERM, "export is read-only"));
        }
        if r.kind == NBD_CMD_BLOCK_STATUS {
            if self.meta_context.is_none() {
                return Err((NBD_EINVAL, "no metadata context negotiated"));
            }
            if r.length == 0 {
                return Err((NBD_EINVAL, "zero-length block status"));
            }
        }
        // Only READ and WRITE lengths become payload; TRIM, WRITE_ZEROES and
        // BLOCK_STATUS may cover more (qemu sends up to 2 GiB of them).
        if r.kind == NBD_CMD_READ && r.length > self.max_payload {
            return Err((NBD_EINVAL, "request longer than the maximum block size"));
        }
        let in_range = r
            .offset
            .checked_add(u64::from(r.length))
            .is_some_and(|end| end <= self.size);
        if !in_range {
            // The protocol asks for ENOSPC on writes past the end, EINVAL otherwise.
            return Err(match r.kind {
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES => {
                    (NBD_ENOSPC, "request beyond end of export")
                }
                _ => (NBD_EINVAL, "request beyond end of export"),
            });
        }
        let mask = u64::from(self.min_block.max(1) - 1);
        if (r.offset | u64::from(r.length)) & mask != 0 {
            return Err((NBD_EINVAL, "request not aligned to the minimum block size"));
        }
        Ok(())
    }
}

/// Runs one checked request against the export.
async fn execute(export: &dyn Export, r: RequestHeader, data: Bytes, context: u32) -> Body {
    let fua = r.flags & NBD_CMD_FLAG_FUA != 0;
    let done = |res: Result<(), ExportError>| match res {
        Ok(()) => Body::Done,
        Err(e) => export_error(e, r.kind, r.flags),
    };
    match r.kind {
        NBD_CMD_READ => {
            if r.length == 0 {
                return Body::Read {
                    offset: r.offset,
                    data: Bytes::new(),
                };
            }
            match export.read(r.offset, r.length).await {
                // A simple reply has no way to send a different length, and a
                // wrong one would desynchronise the client.
                Ok(data) if data.len() != r.length as usize => Body::Error(
                    NBD_EIO,
                    Cow::Borrowed("export returned a read of the wrong length"),
                ),
                Ok(data) => Body::Read {
                    offset: r.offset,
                    data,
                },
                Err(e) => export_error(e, r.kind, r.flags),
            }
        }
        NBD_CMD_WRITE if r.length == 0 => Body::Done,
        NBD_CMD_WRITE => done(export.write(r.offset, data, fua).await),
        NBD_CMD_FLUSH => done(export.flush().await),
        NBD_CMD_TRIM if r.length == 0 => Body::Done,
        NBD_CMD_TRIM => done(export.trim(r.offset, r.length, fua).await),
        NBD_CMD_WRITE_ZEROES if r.length == 0 => Body::Done,
        NBD_CMD_WRITE_ZEROES => {
            let may_trim = r.flags & NBD_CMD_FLAG_NO_HOLE == 0;
            let fast_only = r.flags & NBD_CMD_FLAG_FAST_ZERO != 0;
            done(
                export
                    .write_zeroes(r.offset, r.length, fua, may_trim, fast_only)
                    .await,
            )
        }
        NBD_CMD_BLOCK_STATUS => match export.block_status(r.offset, r.length).await {
            Ok(extents) => Body::BlockStatus {
                context,
                descriptors: encode_extents(
                    &extents,
                    r.length,
                    r.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                ),
            },
            Err(e) => export_error(e, r.kind, r.flags),
        },
        // `check` let nothing else through.
        _ => Body::Error(NBD_EINVAL, Cow::Borrowed("unknown command")),
    }
}

/// Turns the export's extents into block status descriptors for a request of
/// `len` bytes: zero-length extents dropped, total clipped to `len`, equal
/// neighbours merged, one descriptor only for REQ_ONE. Never empty: if the
/// export gave nothing usable we report the whole range as allocated (status
/// 0), which the protocol allows as always safe.
fn encode_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<u8> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(64));
    let mut remaining = u64::from(len);
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let piece = e.length.min(remaining);
        remaining -= piece;
        let mut flags = 0;
        if e.hole {
            flags |= NBD_STATE_HOLE;
        }
        if e.zero {
            flags |= NBD_STATE_ZERO;
        }
        // piece <= remaining <= len, so it fits in u32, and so do merged sums.
        let piece = piece as u32;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += piece,
            Some(_) if req_one => break,
            _ => out.push((piece, flags)),
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    let mut buf = Vec::with_capacity(out.len() * 8);
    for (l, f) in out {
        buf.extend_from_slice(&l.to_be_bytes());
        buf.extend_from_slice(&f.to_be_bytes());
    }
    buf
}

/// Reads exactly `len` payload bytes, without zero-filling a buffer first,
/// into page-aligned memory: an O_DIRECT disk write can then take the
/// payload as it is, where heap memory would be copied once per replica.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = ditto_buf::Filling::new(len)?;
    while !buf.is_full() {
        if r.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    buf.into_bytes()
        .ok_or_else(|| io::Error::other("payload buffer not filled"))
}

/// Reads and drops `len` payload bytes (a WRITE we refuse) without allocating them.
async fn discard_payload<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> io::Result<()> {
    let n = tokio::io::copy(&mut (&mut *r).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if n != u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// `close` resolves; then waits (at most [`CLOSE_GRACE`]) for replies to
/// requests already in flight to be written, and drops the writer.
pub async fn run<R, W, C>(session: Session, reader: &mut R, writer: W, close: &mut C) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    C: Future<Output = ()> + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let max_in_flight = session.max_in_flight.max(1);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let in_flight = InFlight {
        slots: slots.clone(),
        max: max_in_flight,
    };
    let mut writer_task = tokio::spawn(write_replies(writer, rx, session.structured, in_flight));
    let bytes = Arc::new(Semaphore::new(session.max_in_flight_bytes));
    let context = session.meta_context.unwrap_or(0);

    let end = loop {
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = &mut *close => break End::Closed,
            // The writer died (the client stopped taking replies): executing
            // more requests would only do work nobody hears about.
            _ = tx.closed() => break End::Io(io::ErrorKind::BrokenPipe.into()),
            res = reader.read_exact(&mut hdr) => {
                if let Err(e) = res {
                    break End::Io(e);
                }
            }
        }
        let r = RequestHeader::parse(&hdr);
        if r.magic != NBD_REQUEST_MAGIC {
            // Nothing after a bad magic can be trusted to be a request header.
            break End::Protocol("bad request magic");
        }
        if r.kind == NBD_CMD_DISC {
            break End::Disconnect;
        }
        if r.kind == NBD_CMD_WRITE && r.length > session.max_payload {
            // The payload cannot be skipped safely: it is larger than we
            // advertised, so either the client is broken or hostile, or this
            // "header" is really payload bytes of a stream that lost sync. In
            // either case the next 4 GiB are not known to end on a request
            // boundary, and reading them would be on the word of that client.
            // The protocol allows a hard disconnect here.
            break End::Protocol("write payload larger than the maximum block size");
        }
        let slot = tokio::select! {
            biased;
            _ = &mut *close => break End::Closed,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break End::Closed,
            },
        };
        if let Err((errno, msg)) = session.check(&r) {
            if r.kind == NBD_CMD_WRITE {
                // Keep the stream in sync: the payload follows regardless.
                if let Err(e) = discard_payload(reader, r.length).await {
                    break End::Io(e);
                }
            }
            let _ = tx.send(Reply {
                handle: r.handle,
                body: Body::Error(errno, Cow::Borrowed(msg)),
                _slot: slot,
                _bytes: None,
            });
            continue;
        }
        let payload_len = match r.kind {
            NBD_CMD_READ | NBD_CMD_WRITE => r.length as usize,
            _ => 0,
        };
        let byte_permit = if payload_len > 0 {
            // payload_len <= max_payload <= both bounds, so this always
            // completes once earlier replies (of this connection, or of
            // others for the shared budget) are written. The connection's
            // own share first: one connection never waits on the shared
            // budget for more than it may hold.
            let n = u32::try_from(payload_len).unwrap_or(u32::MAX);
            let p = tokio::select! {
                biased;
                _ = &mut *close => break End::Closed,
                p = async {
                    let connection = bytes.clone().acquire_many_owned(n).await?;
                    let server = session.budget.clone().acquire_many_owned(n).await?;
                    Ok::<_, tokio::sync::AcquireError>(BytePermits {
                        _connection: connection,
                        _server: server,
                    })
                } => p,
            };
            match p {
                Ok(p) => Some(p),
                Err(_) => break End::Closed,
            }
        } else {
            None
        };
        let data = if r.kind == NBD_CMD_WRITE {
            match read_payload(reader, payload_len).await {
                Ok(d) => d,
                Err(e) => break End::Io(e),
            }
        } else {
            Bytes::new()
        };
        let export = session.export.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let body = execute(export.as_ref(), r, data, context).await;
            // Fails only if the writer is gone, i.e. the connection is closing.
            let _ = tx.send(Reply {
                handle: r.handle,
                body,
                _slot: slot,
                _bytes: byte_permit,
            });
        });
    };

    // Replies still come from spawned requests; the writer ends when the last
    // of them has sent its reply and dropped its sender.
    drop(tx);
    match tokio::time::timeout(CLOSE_GRACE, &mut writer_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::debug!(error = %e, "writing replies failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "reply writer task failed"),
        Err(_) => {
            tracing::warn!("in-flight requests did not finish in time; dropping connection");
            writer_task.abort();
        }
    }
    end
}

/// Appends the encoding of `reply` to `out`. Returns a payload to be written
/// after `out` without copying, for big reads.
fn encode(out: &mut Vec<u8>, reply: &Reply, structured: bool) -> Option<Bytes> {
    let h = reply.handle;
    match &reply.body {
        Body::Done => put_simple_reply(out, 0, h),
        Body::Error(errno, msg) => {
            if structured {
                let msg = wire_message(msg, MAX_STRING_LEN);
                let len = 6 + msg.len() as u32;
                put_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, h, len);
                out.extend_from_slice(&errno.to_be_bytes());
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg.as_bytes());
            } else {
                put_simple_reply(out, *errno, h);
            }
        }
        Body::Read { offset, data } => {
            if structured {
                if data.is_empty() {
                    put_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, h, 0);
                    return None;
                }
                // The whole read is in hand, so no error can follow: the data
                // chunk may carry DONE itself. data.len() <= max_payload < 2^32 - 8.
                let len = 8 + data.len() as u32;
                put_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, h, len);
                out.extend_from_slice(&offset.to_be_bytes());
            } else {
                put_simple_reply(out, 0, h);
            }
            if data.len() > COPY_MAX {
                return Some(data.clone());
            }
            out.extend_from_slice(data);
        }
        Body::BlockStatus {
            context,
            descriptors,
        } => {
            // Only reachable with a meta context, hence with structured replies.
            let len = 4 + descriptors.len() as u32;
            put_structured_header(
                out,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                h,
                len,
            );
            out.extend_from_slice(&context.to_be_bytes());
            out.extend_from_slice(descriptors);
        }
    }
    None
}

/// Writes all of `bufs`, coping with partial vectored writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// How many requests of a connection hold a slot (from header read to reply
/// written), so the writer can tell whether more replies may be about to come.
struct InFlight {
    slots: Arc<Semaphore>,
    max: usize,
}

impl InFlight {
    fn count(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

/// The writer task: batches whatever replies are ready into one write, and
/// flushes when the queue runs dry.
///
/// Completions arrive in bursts (one reap of the disk ring wakes several
/// request tasks), but the scheduler runs the woken writer right after the
/// first of them queues its reply, so without help every reply would be its
/// own `sendto`: on loopback TCP each is a full trip through both stacks, and
/// the client pays a receive for each too. So when the queue runs dry while
/// other requests are still in flight, the writer yields once, letting the
/// rest of the burst queue their replies, and sends them together. A lone
/// request (queue depth 1) never waits: nothing else is in flight.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
    in_flight: InFlight,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(BATCH_MAX + COPY_MAX + 64);
    // Replies whose permits must be held until their bytes are written.
    let mut written = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut yielded = false;
        while let Some(reply) = next {
            if let Some(big) = encode(&mut out, &reply, structured) {
                let mut bufs = [IoSlice::new(&out), IoSlice::new(&big)];
                write_all_vectored(&mut w, &mut bufs).await?;
                out.clear();
                written.clear();
                drop(reply);
            } else {
                written.push(reply);
                if out.len() >= BATCH_MAX {
                    w.write_all(&out).await?;
                    out.clear();
                    written.clear();
                }
            }
            next = rx.try_recv().ok();
            // `written` holds the slots of the replies batched so far; any
            // slot beyond those is a request that may answer shortly.
            if next.is_none() && !yielded && in_flight.count() > written.len() {
                yielded = true;
                tokio::task::yield_now().await;
                next = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        w.flush().await?;
        written.clear();
    }
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    /// Records every write call and the bytes written.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(usize, Vec<u8>)>>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut g = self.0.lock().unwrap();
            g.0 += 1;
            g.1.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    // One worker, as the daemon runs on small machines: tokio then runs the
    // woken writer before the rest of a burst (its LIFO slot), which is what
    // made every reply its own write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn replies_finishing_together_go_out_in_few_writes() {
        const N: u64 = 8;
        let slots = Arc::new(Semaphore::new(N as usize));
        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let out = Recorder::default();
        let in_flight = InFlight {
            slots: slots.clone(),
            max: N as usize,
        };
        let writer = tokio::spawn(write_replies(out.clone(), rx, false, in_flight));
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let mut requests = Vec::new();
        for handle in 0..N {
            let slot = slots.clone().acquire_owned().await.unwrap();
            let tx = tx.clone();
            let mut go = go_rx.clone();
            requests.push(tokio::spawn(async move {
                go.wait_for(|g| *g).await.unwrap();
                tx.send(Reply {
                    handle,
                    body: Body::Done,
                    _slot: slot,
                    _bytes: None,
                })
                .ok()
                .unwrap();
            }));
        }
        drop(tx);
        // Let every request task reach its wait first.
        tokio::task::yield_now().await;
        go_tx.send(true).unwrap();
        for r in requests {
            r.await.unwrap();
        }
        writer.await.unwrap().unwrap();
        let (writes, bytes) = out.0.lock().unwrap().clone();
        let mut handles: Vec<u64> = bytes
            .chunks(16)
            .map(|c| {
                assert_eq!(c[..4], NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
                assert_eq!(c[4..8], [0; 4], "no error");
                u64::from_be_bytes(c[8..16].try_into().unwrap())
            })
            .collect();
        handles.sort_unstable();
        assert_eq!(handles, (0..N).collect::<Vec<_>>(), "every reply, once");
        assert!(
            writes <= 3,
            "{N} replies that finished together took {writes} writes"
        );
    }

    fn ext(length: u64, hole: bool) -> Extent {
        Extent {
            length,
            hole,
            zero: hole,
        }
    }

    fn decode(b: &[u8]) -> Vec<(u32, u32)> {
        b.chunks(8)
            .map(|c| {
                (
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn extents_are_clipped_merged_and_never_empty() {
        let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
        let e = [
            ext(100, false),
            ext(0, true),
            ext(50, false),
            ext(1 << 40, true),
        ];
        assert_eq!(
            decode(&encode_extents(&e, 1000, false)),
            vec![(150, 0), (850, hz)]
        );
        assert_eq!(decode(&encode_extents(&e, 1000, true)), vec![(150, 0)]);
        assert_eq!(decode(&encode_extents(&e, 120, false)), vec![(120, 0)]);
        assert_eq!(decode(&encode_extents(&[], 4096, false)), vec![(4096, 0)]);
        assert_eq!(
            decode(&encode_extents(&[ext(1 << 40, true)], u32::MAX, true)),
            vec![(u32::MAX, hz)]
        );
    }
}
