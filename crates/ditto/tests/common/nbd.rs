//! A minimal NBD client for tests: fixed-newstyle handshake with NBD_OPT_GO,
//! simple replies only. Used as a long-lived client that holds a connection
//! open (e.g. to check that `volume delete` refuses while a client is
//! connected), and for small reads and writes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// A connected NBD client in the transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    next_handle: u64,
}

fn read_u16(s: &mut TcpStream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl NbdClient {
    /// Connects to `addr` (HOST:PORT) and selects export `name` with NBD_OPT_GO.
    pub fn connect(addr: &str, name: &str) -> io::Result<NbdClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        if read_u64(&mut s)? != NBDMAGIC {
            return Err(invalid("no NBDMAGIC".into()));
        }
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(invalid("not a newstyle server (no IHAVEOPT)".into()));
        }
        let hflags = read_u16(&mut s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(invalid(format!(
                "server is not fixed-newstyle (flags {hflags:#x})"
            )));
        }
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&cflags.to_be_bytes())?;

        // NBD_OPT_GO: name length, name, no information requests.
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg)?;

        let mut size = None;
        let mut flags = 0;
        loop {
            if read_u64(&mut s)? != OPT_REPLY_MAGIC {
                return Err(invalid("bad option reply magic".into()));
            }
            let opt = read_u32(&mut s)?;
            let typ = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > 1 << 20 {
                return Err(invalid(format!("option reply of {len} bytes")));
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            if opt != OPT_GO {
                return Err(invalid(format!("reply for option {opt}, expected GO")));
            }
            if typ & 0x8000_0000 != 0 {
                return Err(io::Error::other(format!(
                    "server refused export {name:?}: error {typ:#x} {}",
                    String::from_utf8_lossy(&payload)
                )));
            }
            match typ {
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT && payload.len() >= 12 {
                        size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8")));
                        flags = u16::from_be_bytes([payload[10], payload[11]]);
                    }
                }
                REP_ACK => break,
                _ => {}
            }
        }
        let size = size.ok_or_else(|| invalid("no NBD_INFO_EXPORT before ACK".into()))?;
        Ok(NbdClient {
            stream: s,
            size,
            flags,
            next_handle: 1,
        })
    }

    fn request(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&typ.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg)?;
        Ok(handle)
    }

    fn simple_reply(&mut self, handle: u64) -> io::Result<()> {
        let magic = read_u32(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(invalid(format!(
                "reply magic {magic:#x}, expected simple reply"
            )));
        }
        let err = read_u32(&mut self.stream)?;
        let h = read_u64(&mut self.stream)?;
        if h != handle {
            return Err(invalid(format!("reply for handle {h}, expected {handle}")));
        }
        if err != 0 {
            return Err(io::Error::other(format!("NBD error {err}")));
        }
        Ok(())
    }

    /// NBD_CMD_READ.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.request(CMD_READ, offset, len, &[])?;
        self.simple_reply(h)?;
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// NBD_CMD_WRITE.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let h = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.simple_reply(h)
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> io::Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.simple_reply(h)
    }

    /// Waits up to `timeout` for the server to close the connection (EOF or
    /// reset); returns whether it did. Sends nothing.
    pub fn wait_closed_by_server(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)));
        let mut b = [0u8; 4096];
        while Instant::now() < deadline {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {} // e.g. an unsolicited error reply before closing
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// The client side of the connection, as the server sees its peer.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// NBD_CMD_DISC and close.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
