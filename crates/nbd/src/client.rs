//! An NBD client that is a [`BlockDevice`]: every folio command and the
//! library can open an image that lives on an NBD server (qemu-nbd,
//! nbdkit, `folio export`, rbd-nbd, ...).
//!
//! One connection, one request at a time, simple replies. A lost
//! connection or a protocol error is an I/O error for the caller, and the
//! device stays failed (a journalled filesystem on it turns read-only);
//! it never reconnects behind the caller's back, where writes made
//! between the drop and the reconnect could be lost without a word.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use folio_blockdev::BlockDevice;

use crate::proto::*;
use crate::server::MAX_OPTION;
use crate::DEFAULT_PORT;

/// Where an export lives: `nbd://HOST[:PORT]/[EXPORT]` or
/// `nbd+unix:///[EXPORT]?socket=PATH` (the NBD URI forms qemu and
/// libnbd use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub at: Endpoint,
    pub export: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl NbdUri {
    /// Is `s` an NBD URI (rather than a file name)?
    pub fn looks_like(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let bad = |why: &str| format!("{s}: {why}");
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("needs ?socket=PATH"))?;
            let export = path
                .strip_prefix('/')
                .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("needs ?socket=PATH"))?;
            return Ok(NbdUri {
                at: Endpoint::Unix(PathBuf::from(percent_decode(socket)?)),
                export: percent_decode(export)?,
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let with_port = if host.starts_with('[') {
                // [v6]:port or [v6]
                match host.rsplit_once("]:") {
                    Some(_) => host.to_string(),
                    None => format!("{host}:{DEFAULT_PORT}"),
                }
            } else if let Some((_, port)) = host.rsplit_once(':') {
                port.parse::<u16>().map_err(|_| bad("bad port"))?;
                host.to_string()
            } else {
                format!("{host}:{DEFAULT_PORT}")
            };
            return Ok(NbdUri {
                at: Endpoint::Tcp(with_port),
                export: percent_decode(export)?,
            });
        }
        Err(bad("not an nbd:// or nbd+unix:// URI"))
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            Endpoint::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s}: bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s}: not UTF-8"))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Conn {
    stream: Stream,
    cookie: u64,
}

/// A block device on an NBD server.
pub struct NbdDevice {
    conn: Mutex<Conn>,
    uri: String,
    size: u64,
    flags: u16,
    max_payload: u32,
    read_only: bool,
    failed: AtomicBool,
}

fn proto_err(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl NbdDevice {
    /// Connect and negotiate; `read_only` refuses writes here whatever
    /// the server allows.
    pub fn connect(uri: &NbdUri, read_only: bool) -> io::Result<NbdDevice> {
        let name = uri.to_string();
        // The caller names the URI; say which side failed.
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("NBD server: {e}"));
        let stream = match &uri.at {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).map_err(ctx)?;
                s.set_nodelay(true).map_err(ctx)?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(ctx)?),
        };
        let mut conn = Conn { stream, cookie: 0 };
        let (size, flags, max_payload) = negotiate(&mut conn.stream, &uri.export).map_err(ctx)?;
        Ok(NbdDevice {
            conn: Mutex::new(conn),
            uri: name,
            size,
            flags,
            max_payload,
            read_only: read_only || flags & TFLAG_READ_ONLY != 0,
            failed: AtomicBool::new(false),
        })
    }

    /// The transmission flags the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// One request and its simple reply; `payload` goes out after the
    /// header (WRITE), `data` is filled from the reply (READ).
    fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: &mut [u8],
    ) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "{}: the connection was lost earlier; reopen the image",
                    self.uri
                ),
            ));
        }
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.cookie += 1;
        let cookie = conn.cookie;
        let r = (|| -> io::Result<u32> {
            let hdr = Request {
                flags,
                cmd,
                cookie,
                offset,
                length: len,
            }
            .encode();
            conn.stream.write_all(&hdr)?;
            if !payload.is_empty() {
                conn.stream.write_all(payload)?;
            }
            let mut rep = [0u8; SIMPLE_REPLY_LEN];
            conn.stream.read_exact(&mut rep)?;
            if be32(&rep[0..4]) != SIMPLE_REPLY_MAGIC || be64(&rep[8..16]) != cookie {
                return Err(proto_err("reply out of step with the request".into()));
            }
            let err = be32(&rep[4..8]);
            if err == 0 && !data.is_empty() {
                conn.stream.read_exact(data)?;
            }
            Ok(err)
        })();
        match r {
            Ok(0) => Ok(()),
            Ok(err) => Err(host_error(
                err,
                &format!("{} at byte {offset} (+{len})", cmd_name(cmd)),
            )),
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                Err(io::Error::new(
                    e.kind(),
                    format!("{}: connection lost: {e}", self.uri),
                ))
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "I/O at byte {offset} (+{len}) is beyond the end of {} ({} bytes)",
                    self.uri, self.size
                ),
            )),
        }
    }

    fn refuse_if_read_only(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is read-only", self.uri),
            ));
        }
        Ok(())
    }
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write zeroes",
        _ => "request",
    }
}

/// The fixed newstyle handshake: (size, transmission flags, largest payload).
fn negotiate(s: &mut Stream, export: &str) -> io::Result<(u64, u16, u32)> {
    if s.be_u64()? != NBDMAGIC {
        return Err(proto_err("not an NBD server".into()));
    }
    if s.be_u64()? != IHAVEOPT {
        return Err(proto_err(
            "the server speaks the oldstyle protocol, which folio does not".into(),
        ));
    }
    let hflags = s.be_u16()?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("the server does not speak fixed newstyle".into()));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut o = Out::default();
    o.u32(FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
    // NBD_OPT_GO asking for the block size limits.
    o.u64(IHAVEOPT)
        .u32(OPT_GO)
        .u32(4 + export.len() as u32 + 2 + 2)
        .u32(export.len() as u32)
        .bytes(export.as_bytes())
        .u16(1)
        .u16(INFO_BLOCK_SIZE);
    s.write_all(&o.0)?;
    let (mut size, mut flags, mut max) = (None, 0u16, MAX_DEFAULT);
    loop {
        if s.be_u64()? != REPLY_MAGIC {
            return Err(proto_err("bad option reply magic".into()));
        }
        let opt = s.be_u32()?;
        let kind = s.be_u32()?;
        let len = s.be_u32()?;
        if len > MAX_OPTION || opt != OPT_GO {
            return Err(proto_err(format!(
                "bad option reply (option {opt}, {len} bytes)"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO => {
                let mut f = Fields(&data);
                match f.u16() {
                    Some(INFO_EXPORT) if data.len() >= 12 => {
                        size = Some(be64(&data[2..10]));
                        flags = be16(&data[10..12]);
                    }
                    Some(INFO_BLOCK_SIZE) if data.len() >= 14 => {
                        max = be32(&data[10..14]).clamp(4096, MAX_DEFAULT);
                    }
                    _ => {}
                }
            }
            REP_ERR_UNSUP => return export_name(s, export, no_zeroes),
            REP_ERR_UNKNOWN => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the server has no export {export:?}"),
                ))
            }
            k if k & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data);
                return Err(proto_err(format!(
                    "the server refused the export: {msg} (error {:#x})",
                    k
                )));
            }
            _ => {}
        }
    }
    let size = size.ok_or_else(|| proto_err("the server did not send the export's size".into()))?;
    Ok((size, flags, max))
}

/// The payload limit when the server names none.
const MAX_DEFAULT: u32 = 32 << 20;

/// The old NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO.
fn export_name(s: &mut Stream, export: &str, no_zeroes: bool) -> io::Result<(u64, u16, u32)> {
    let mut o = Out::default();
    o.u64(IHAVEOPT)
        .u32(OPT_EXPORT_NAME)
        .u32(export.len() as u32)
        .bytes(export.as_bytes());
    s.write_all(&o.0)?;
    let size = s.be_u64()?;
    let flags = s.be_u16()?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok((size, flags, MAX_DEFAULT))
}

impl BlockDevice for NbdDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut at = 0;
        for piece in buf.chunks_mut(self.max_payload as usize) {
            let n = piece.len() as u32;
            self.request(CMD_READ, 0, offset + at, n, &[], piece)?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.refuse_if_read_only()?;
        self.check(offset, buf.len() as u64)?;
        let mut at = 0;
        for piece in buf.chunks(self.max_payload as usize) {
            let n = piece.len() as u32;
            self.request(CMD_WRITE, 0, offset + at, n, piece, &mut [])?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only || self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        self.refuse_if_read_only()?;
        self.check(offset, len_bytes)?;
        let cmd = if self.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
            CMD_WRITE_ZEROES
        } else if self.flags & TFLAG_SEND_TRIM != 0 {
            CMD_TRIM
        } else {
            // Discard is advice; a server without either has none to take.
            return Ok(());
        };
        let mut at = 0;
        while at < len_bytes {
            let n = (len_bytes - at).min(1 << 30) as u32;
            self.request(cmd, 0, offset + at, n, &[], &mut [])?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        if !self.failed.load(Ordering::Acquire) {
            let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
            conn.cookie += 1;
            let hdr = Request {
                flags: 0,
                cmd: CMD_DISC,
                cookie: conn.cookie,
                offset: 0,
                length: 0,
            }
            .encode();
            let _ = conn.stream.write_all(&hdr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://example.org/disk").unwrap();
        assert_eq!(u.at, Endpoint::Tcp(format!("example.org:{DEFAULT_PORT}")));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1:1234").unwrap();
        assert_eq!(u.at, Endpoint::Tcp("127.0.0.1:1234".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.at, Endpoint::Tcp("[::1]:99".into()));
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd+unix:///x?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.at, Endpoint::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "x");
        for bad in [
            "nbd://",
            "nbd://h:notaport/",
            "nbd+unix:///x",
            "nbd+unix://x?socket=/s",
            "file:///x",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
