//! Fixed-newstyle handshake: greeting, client flags and option haggling up to the transmission phase.
//!
//! Every option's payload is read whole (it is bounded by [`MAX_OPTION_LEN`])
//! before it is looked at, so an option we do not understand can always be
//! answered `NBD_REP_ERR_UNSUP` without losing track of the stream.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::server::ServerConfig;
use crate::{Export, ExportRegistry};

/// Largest option payload we accept. Names are at most 4096 bytes; a
/// meta-context request with a few queries fits easily. Anything bigger is a
/// broken or hostile client, and reading it would only cost us memory.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Metadata context id we hand out for `base:allocation` (opaque to clients;
/// any value works, it only has to be unique per connection).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled on when the client entered transmission.
pub struct Negotiated {
    pub export: Arc<dyn Export>,
    pub name: String,
    pub structured: bool,
    /// Context id for `base:allocation`, when it was selected for this export.
    pub meta_context: Option<u32>,
    pub flags: u16,
}

/// Per-connection state built up by options.
#[derive(Default)]
struct State {
    structured: bool,
    no_zeroes: bool,
    /// Export name for which the last SET_META_CONTEXT selected base:allocation.
    meta_for: Option<String>,
}

/// Transmission flags for `export`, given what was negotiated.
pub fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES;
    if export.read_only() {
        flags |= NBD_FLAG_READ_ONLY;
    }
    // The protocol requires SEND_DF to stay clear without structured replies.
    if structured {
        flags |= NBD_FLAG_SEND_DF;
    }
    if export.can_multi_conn() {
        flags |= NBD_FLAG_CAN_MULTI_CONN;
    }
    if export.can_fast_zero() {
        flags |= NBD_FLAG_SEND_FAST_ZERO;
    }
    flags
}

pub(crate) fn protocol_error(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Appends one option reply (header and payload) to `out`.
fn put_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Callers only pass data bounded by MAX_STRING_LEN-sized pieces or fixed
    // structures, so the length always fits; saturate rather than trust that.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

fn put_error(out: &mut Vec<u8>, option: u32, reply: u32, msg: &str) {
    put_reply(
        out,
        option,
        reply,
        wire_message(msg, MAX_STRING_LEN).as_bytes(),
    );
}

/// Reads big-endian fields out of an option payload without ever panicking.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A string field: valid UTF-8, no NUL, at most 4096 bytes.
fn wire_string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING_LEN || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// NBD_OPT_INFO / NBD_OPT_GO payload: name and the list of information requests.
fn parse_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor { data };
    let name_len = usize::try_from(c.u32()?).ok()?;
    let name = wire_string(c.bytes(name_len)?)?;
    let count = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        requests.push(c.u16()?);
    }
    c.is_empty().then_some((name, requests))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT payload: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&[u8]>)> {
    let mut c = Cursor { data };
    let name_len = usize::try_from(c.u32()?).ok()?;
    let name = wire_string(c.bytes(name_len)?)?;
    let count = c.u32()?;
    // `count` is client-controlled: never size an allocation from it.
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = usize::try_from(c.u32()?).ok()?;
        queries.push(c.bytes(len)?);
    }
    c.is_empty().then_some((name, queries))
}

fn meta_context_payload(id: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + BASE_ALLOCATION.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(BASE_ALLOCATION.as_bytes());
    p
}

fn info_payload(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + body.len());
    p.extend_from_slice(&kind.to_be_bytes());
    p.extend_from_slice(body);
    p
}

/// Where a connection stands with TLS (the protocol's "TLS support").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// No TLS configured (NOTLS): NBD_OPT_STARTTLS is refused by policy.
    Unavailable,
    /// TLS configured, not started. `required` is FORCEDTLS: every option
    /// but NBD_OPT_STARTTLS and NBD_OPT_ABORT gets NBD_REP_ERR_TLS_REQD.
    Offered { required: bool },
    /// The session runs over TLS.
    Active,
}

/// How option haggling ended.
pub enum Outcome {
    /// The client entered transmission.
    Transmission(Negotiated),
    /// The session ended cleanly (NBD_OPT_ABORT, or a client we refuse).
    Ended,
    /// NBD_OPT_STARTTLS was acknowledged: upgrade the stream, then haggle
    /// again over TLS (with nothing kept from before but `no_zeroes`).
    StartTls { no_zeroes: bool },
}

/// Runs the handshake from the greeting. `Err` is an I/O error or protocol
/// violation; see [`Outcome`] for the rest.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &dyn ExportRegistry,
    config: &ServerConfig,
    tls: TlsPhase,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&out).await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        // "the server MUST drop the TCP connection if the client sets an unknown flag"
        return Err(protocol_error("client set unknown handshake flags"));
    }
    if client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        // Plain newstyle cannot carry option errors; we only speak fixed newstyle.
        tracing::debug!("client does not support fixed newstyle; closing");
        return Ok(Outcome::Ended);
    }
    haggle(
        reader,
        writer,
        registry,
        config,
        client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        tls,
    )
    .await
}

/// Option haggling, after the greeting or after a TLS upgrade.
pub async fn haggle<R, W>(
    reader: &mut R,
    writer: &mut W,
    registry: &dyn ExportRegistry,
    config: &ServerConfig,
    no_zeroes: bool,
    tls: TlsPhase,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    let mut st = State {
        no_zeroes,
        ..State::default()
    };
    let tls_required = tls == TlsPhase::Offered { required: true };

    let mut data = Vec::new();
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut hdr).await?;
        let magic = u64::from_be_bytes([
            hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7],
        ]);
        let option = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if magic != IHAVEOPT {
            return Err(protocol_error("bad option magic"));
        }
        out.clear();
        if len > MAX_OPTION_LEN {
            // Reading (or skipping) the payload would be on the word of a client
            // that already broke the string limits; tell it why and hang up.
            if option != NBD_OPT_EXPORT_NAME {
                put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_TOO_BIG,
                    "option payload too large",
                );
                writer.write_all(&out).await?;
                writer.flush().await?;
            }
            return Err(protocol_error("option payload too large"));
        }
        data.clear();
        data.resize(len as usize, 0);
        reader.read_exact(&mut data).await?;

        if tls_required && !matches!(option, NBD_OPT_STARTTLS | NBD_OPT_ABORT) {
            if option == NBD_OPT_EXPORT_NAME {
                // Cannot be answered with an error: the protocol says to hang up.
                tracing::info!(
                    "client asked for an export without TLS, which this server requires; closed"
                );
                return Ok(Outcome::Ended);
            }
            put_error(
                &mut out,
                option,
                NBD_REP_ERR_TLS_REQD,
                "this server requires TLS: connect with nbds:// (or qemu's tls-creds)",
            );
            writer.write_all(&out).await?;
            writer.flush().await?;
            continue;
        }
        match option {
            NBD_OPT_STARTTLS => match tls {
                TlsPhase::Unavailable => put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_POLICY,
                    "TLS is not configured on this server (nbd_tls in the daemon config)",
                ),
                TlsPhase::Active => put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_INVALID,
                    "TLS is already running",
                ),
                TlsPhase::Offered { .. } if !data.is_empty() => put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                ),
                TlsPhase::Offered { .. } => {
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                    writer.write_all(&out).await?;
                    writer.flush().await?;
                    return Ok(Outcome::StartTls {
                        no_zeroes: st.no_zeroes,
                    });
                }
            },
            NBD_OPT_EXPORT_NAME => {
                // No way to answer an error here: the protocol says to hang up.
                let Some(name) = wire_string(&data) else {
                    return Err(protocol_error("bad export name"));
                };
                let Some(export) = registry.open(name) else {
                    tracing::debug!(export = name, "NBD_OPT_EXPORT_NAME for unknown export");
                    return Ok(Outcome::Ended);
                };
                let flags = transmission_flags(export.as_ref(), st.structured);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !st.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&out).await?;
                writer.flush().await?;
                let meta_context =
                    (st.meta_for.as_deref() == Some(name)).then_some(BASE_ALLOCATION_ID);
                return Ok(Outcome::Transmission(Negotiated {
                    export,
                    name: name.to_string(),
                    structured: st.structured,
                    meta_context,
                    flags,
                }));
            }
            NBD_OPT_ABORT => {
                // Payload, if any, is ignored as the protocol asks.
                put_reply(&mut out, option, NBD_REP_ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
                return Ok(Outcome::Ended);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for e in registry.list() {
                        if e.name.len() > MAX_STRING_LEN {
                            continue; // a name no client could send back
                        }
                        let name_len = e.name.len() as u32;
                        let desc = wire_message(&e.description, MAX_STRING_LEN);
                        let mut p = Vec::with_capacity(4 + e.name.len() + desc.len());
                        p.extend_from_slice(&name_len.to_be_bytes());
                        p.extend_from_slice(e.name.as_bytes());
                        p.extend_from_slice(desc.as_bytes());
                        put_reply(&mut out, option, NBD_REP_SERVER, &p);
                    }
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "malformed info request",
                    );
                    writer.write_all(&out).await?;
                    writer.flush().await?;
                    continue;
                };
                let Some(export) = registry.open(name) else {
                    put_error(&mut out, option, NBD_REP_ERR_UNKNOWN, "unknown export");
                    writer.write_all(&out).await?;
                    writer.flush().await?;
                    continue;
                };
                let flags = transmission_flags(export.as_ref(), st.structured);
                let mut body = [0u8; 10];
                body[..8].copy_from_slice(&export.size().to_be_bytes());
                body[8..].copy_from_slice(&flags.to_be_bytes());
                put_reply(
                    &mut out,
                    option,
                    NBD_REP_INFO,
                    &info_payload(NBD_INFO_EXPORT, &body),
                );
                if requests.contains(&NBD_INFO_NAME) {
                    put_reply(
                        &mut out,
                        option,
                        NBD_REP_INFO,
                        &info_payload(NBD_INFO_NAME, name.as_bytes()),
                    );
                }
                if requests.contains(&NBD_INFO_DESCRIPTION) {
                    if let Some(desc) = registry.description(name) {
                        let desc = wire_message(&desc, MAX_STRING_LEN);
                        put_reply(
                            &mut out,
                            option,
                            NBD_REP_INFO,
                            &info_payload(NBD_INFO_DESCRIPTION, desc.as_bytes()),
                        );
                    }
                }
                // Always sent: libnbd and qemu use it, older clients ignore it.
                let mut bs = [0u8; 12];
                bs[..4].copy_from_slice(&config.min_block.to_be_bytes());
                bs[4..8].copy_from_slice(&config.preferred_block.to_be_bytes());
                bs[8..].copy_from_slice(&config.max_payload.to_be_bytes());
                put_reply(
                    &mut out,
                    option,
                    NBD_REP_INFO,
                    &info_payload(NBD_INFO_BLOCK_SIZE, &bs),
                );
                put_reply(&mut out, option, NBD_REP_ACK, &[]);
                writer.write_all(&out).await?;
                writer.flush().await?;
                if option == NBD_OPT_GO {
                    let meta_context =
                        (st.meta_for.as_deref() == Some(name)).then_some(BASE_ALLOCATION_ID);
                    return Ok(Outcome::Transmission(Negotiated {
                        export,
                        name: name.to_string(),
                        structured: st.structured,
                        meta_context,
                        flags,
                    }));
                }
                continue;
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    st.structured = true;
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let set = option == NBD_OPT_SET_META_CONTEXT;
                if set {
                    // "replaces all previously-set metadata contexts (including when this command fails)"
                    st.meta_for = None;
                }
                meta_context(&mut out, option, set, &data, &mut st, registry);
            }
            _ => {
                // Includes NBD_OPT_EXTENDED_HEADERS; the payload was already consumed.
                put_error(&mut out, option, NBD_REP_ERR_UNSUP, "option not supported");
            }
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
    }
}

/// Answers NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT into `out`.
fn meta_context(
    out: &mut Vec<u8>,
    option: u32,
    set: bool,
    data: &[u8],
    st: &mut State,
    registry: &dyn ExportRegistry,
) {
    if !st.structured {
        put_error(
            out,
            option,
            NBD_REP_ERR_INVALID,
            "structured replies must be negotiated first",
        );
        return;
    }
    let Some((name, queries)) = parse_meta(data) else {
        put_error(
            out,
            option,
            NBD_REP_ERR_INVALID,
            "malformed meta context request",
        );
        return;
    };
    if registry.open(name).is_none() {
        put_error(out, option, NBD_REP_ERR_UNKNOWN, "unknown export");
        return;
    }
    let selected = if set {
        // "base:" alone MUST be ignored by SET; zero queries select nothing.
        queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
    } else {
        // LIST: zero queries list everything; "base:" is a wildcard.
        queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == BASE_ALLOCATION.as_bytes() || *q == b"base:")
    };
    if selected {
        // LIST replies carry a reserved id of zero.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        put_reply(out, option, NBD_REP_META_CONTEXT, &meta_context_payload(id));
        if set {
            st.meta_for = Some(name.to_string());
        }
    }
    put_reply(out, option, NBD_REP_ACK, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_info_rejects_truncated_and_trailing_data() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&3u32.to_be_bytes());
        ok.extend_from_slice(b"vol");
        ok.extend_from_slice(&2u16.to_be_bytes());
        ok.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        ok.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info(&ok),
            Some(("vol", vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info(&ok[..ok.len() - 1]), None);
        let mut extra = ok.clone();
        extra.push(0);
        assert_eq!(parse_info(&extra), None);
        // Name length pointing past the end.
        let mut bad = Vec::new();
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        bad.extend_from_slice(&[0; 6]);
        assert_eq!(parse_info(&bad), None);
    }

    #[test]
    fn parse_meta_does_not_trust_query_count() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta(&d), None);
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(b"a");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"base:");
        assert_eq!(parse_meta(&d), Some(("a", vec![&b"base:"[..]])));
    }
}
