//! Wire constants and fixed-size layouts of the NBD protocol (NetworkBlockDevice `doc/proto.md`).
//!
//! Everything on the wire is big-endian. Names follow the protocol document so
//! they can be grepped against it.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after NBDMAGIC and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Not implemented (answered `NBD_REP_ERR_UNSUP`); named for tests and docs.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_REP_INFO information types.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission phase.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Command types.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// Error values: the only numbers allowed in a reply's error field.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Request header: magic(4) flags(2) type(2) handle(8) offset(8) length(4).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply header: magic(4) error(4) handle(8).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header: magic(4) flags(2) type(2) handle(8) length(4).
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Option request header: IHAVEOPT(8) option(4) length(4).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string the protocol allows (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;

/// A parsed transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> RequestHeader {
        RequestHeader {
            magic: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        }
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Appends a structured reply chunk header; the caller appends `length` payload bytes.
pub fn put_structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, length: u32) {
    out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Cuts `msg` to what may go in an error string: at most `max` bytes, on a
/// character boundary, without NUL (strings "MUST NOT contain NUL").
pub fn wire_message(msg: &str, max: usize) -> String {
    let mut end = msg.len().min(max);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg[..end].replace('\0', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_parses_big_endian() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&0x0102u16.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let h = RequestHeader::parse(&b);
        assert_eq!(
            h,
            RequestHeader {
                magic: NBD_REQUEST_MAGIC,
                flags: 0x0102,
                kind: NBD_CMD_WRITE,
                handle: 0x1122_3344_5566_7788,
                offset: 4096,
                length: 512,
            }
        );
    }

    #[test]
    fn reply_headers_have_documented_sizes() {
        let mut v = Vec::new();
        put_simple_reply(&mut v, NBD_EIO, 7);
        assert_eq!(v.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&v[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&v[4..8], &5u32.to_be_bytes());
        v.clear();
        put_structured_header(
            &mut v,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            9,
            12,
        );
        assert_eq!(v.len(), STRUCTURED_REPLY_LEN);
        assert_eq!(&v[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&v[16..20], &12u32.to_be_bytes());
    }

    #[test]
    fn wire_message_cuts_on_char_boundary_and_strips_nul() {
        assert_eq!(wire_message("a\0b", 100), "a b");
        // "é" is two bytes; cutting at 2 must not split it.
        assert_eq!(wire_message("aé", 2), "a");
        assert_eq!(wire_message("abc", 2), "ab");
    }
}
