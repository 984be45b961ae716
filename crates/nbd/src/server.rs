//! The NBD server: the fixed newstyle handshake and the transmission
//! phase over any stream, serving one [`Export`].
//!
//! Each connection is served by one thread, one request at a time (the
//! protocol lets a server reply in any order; replying in order is one
//! of the orders). Data moves through bounce buffers taken from a
//! [`BouncePool`] reserved when the server starts, one buffer per request
//! in flight and requests of any size streamed through it in pieces, so
//! serving never allocates per request: a write needs no new memory on
//! its way to the export (seed 002's rule for a loop device's writeback).
//!
//! A misbehaving client gets the protocol's error where the protocol has
//! one (EINVAL for an out-of-range or misaligned request, EPERM for a
//! write to a read-only export), and a closed connection where it has
//! none (a bad magic, a payload over [`MAX_PAYLOAD`], an option over
//! [`MAX_OPTION`] that cannot be skipped); never a panic.

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::proto::*;
use crate::transform::Transform;

/// The largest request payload served (the protocol's recommended
/// maximum; clients told by NBD_INFO_BLOCK_SIZE keep to it).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload read during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;
/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 2048;
/// A client must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a server serves: a byte range with the block layer's operations.
/// Every method takes `&self`: connections call it from their threads.
pub trait Export: Send + Sync {
    /// The export's size in bytes (fixed while served).
    fn size(&self) -> u64;
    /// Fill `buf` from `offset` (inside the size).
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `data` at `offset` (inside the size).
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The range's data is no longer needed (and reads as zeros after).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make the range read as zeros: by punching it out if `punch`, else
    /// keeping it allocated.
    fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()>;
    /// The run starting at `offset`, at most `len` long, that is all data
    /// or all hole: (its length, hole?). A hole reads as zeros.
    fn extent(&self, offset: u64, len: u64) -> io::Result<(u64, bool)>;
    /// Prefetch the range (NBD_CMD_CACHE); by default reads nothing.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A fixed set of bounce buffers reserved at start. Taking one waits
/// when all are in use, so memory stays bounded however many requests
/// arrive.
pub struct BouncePool {
    free: Mutex<Vec<Box<[u8]>>>,
    returned: Condvar,
    chunk: usize,
}

/// Room before a buffer's data for a reply header, so that a header and
/// its data leave in one write.
pub const HEADROOM: usize = 32;

impl BouncePool {
    pub fn new(count: usize, chunk: usize) -> Arc<BouncePool> {
        let free = (0..count.max(1))
            .map(|_| vec![0u8; HEADROOM + chunk].into_boxed_slice())
            .collect();
        Arc::new(BouncePool {
            free: Mutex::new(free),
            returned: Condvar::new(),
            chunk,
        })
    }

    /// The data bytes of each buffer.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// A buffer, waiting for one to come back if all are taken.
    pub fn take(self: &Arc<Self>) -> Bounce {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(buf) = free.pop() {
                return Bounce {
                    pool: Arc::clone(self),
                    buf: Some(buf),
                };
            }
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A buffer taken from a [`BouncePool`]; it goes back when dropped.
pub struct Bounce {
    pool: Arc<BouncePool>,
    buf: Option<Box<[u8]>>,
}

impl Bounce {
    fn all(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
            free.push(buf);
            self.pool.returned.notify_one();
        }
    }
}

/// How an export is offered.
pub struct ExportConfig {
    /// The export's name; the empty name (the default export) also finds it.
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub transform: Option<Transform>,
}

/// Serves one export to any number of connections.
pub struct Server {
    export: Arc<dyn Export>,
    config: ExportConfig,
    pool: Arc<BouncePool>,
}

/// The state one connection negotiated.
#[derive(Default)]
struct Negotiated {
    structured: bool,
    no_zeroes: bool,
    /// base:allocation selected (context id 1).
    allocation: bool,
}

const ALLOCATION_ID: u32 = 1;

/// How a request ended for the connection.
enum Flow {
    Continue,
    Close,
}

impl Server {
    pub fn new(export: Arc<dyn Export>, config: ExportConfig, pool: Arc<BouncePool>) -> Server {
        Server {
            export,
            config,
            pool,
        }
    }

    fn min_block(&self) -> u64 {
        self.config.transform.as_ref().map_or(1, |t| t.alignment())
    }

    fn transmission_flags(&self) -> u16 {
        // Multi-conn is safe: every connection shares one filesystem and
        // page cache, and a flush makes all completed writes durable,
        // whichever connection made them.
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        if self.config.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        f
    }

    /// Serve one connection until the client disconnects (or breaks the
    /// protocol). `stream` is read and written through its `&` impls, so
    /// that another thread can shut it down.
    pub fn serve<S>(&self, stream: &S) -> io::Result<()>
    where
        S: SocketLike,
        for<'a> &'a S: Read + Write,
    {
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut reader = BufReader::with_capacity(64 << 10, stream);
        let mut writer = stream;
        let Some(neg) = self.handshake(&mut reader, &mut writer)? else {
            return Ok(());
        };
        stream.set_read_timeout(None)?;
        let mut bounce = self.pool.take();
        loop {
            let mut hdr = [0u8; REQUEST_LEN];
            match reader.read_exact(&mut hdr) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(req) = Request::parse(&hdr) else {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "bad request magic; closing",
                ));
            };
            match self.request(&req, &neg, &mut reader, &mut writer, &mut bounce)? {
                Flow::Continue => {}
                Flow::Close => return Ok(()),
            }
        }
    }

    // ---- handshake ----

    /// The fixed newstyle handshake; `None` if the client ended it.
    fn handshake(&self, r: &mut impl Read, w: &mut impl Write) -> io::Result<Option<Negotiated>> {
        let mut hello = Out::default();
        hello
            .u64(NBDMAGIC)
            .u64(IHAVEOPT)
            .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        w.write_all(&hello.0)?;
        let cflags = r.be_u32()?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("unknown client flags {cflags:#x}"),
            ));
        }
        let mut neg = Negotiated {
            no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
            ..Default::default()
        };
        loop {
            if r.be_u64()? != IHAVEOPT {
                return Err(io::Error::new(ErrorKind::InvalidData, "bad option magic"));
            }
            let opt = r.be_u32()?;
            let len = r.be_u32()?;
            if len > MAX_OPTION {
                // Skip it and say so; the client may go on.
                io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
                opt_reply(w, opt, REP_ERR_TOO_BIG, b"option too long")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    if !self.name_matches(&data) {
                        // No way to say why in this old option: close.
                        return Ok(None);
                    }
                    let mut o = Out::default();
                    o.u64(self.export.size()).u16(self.transmission_flags());
                    if !neg.no_zeroes {
                        o.bytes(&[0u8; 124]);
                    }
                    w.write_all(&o.0)?;
                    return Ok(Some(neg));
                }
                OPT_ABORT => {
                    opt_reply(w, opt, REP_ACK, &[])?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        opt_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                        continue;
                    }
                    let mut o = Out::default();
                    o.u32(self.config.name.len() as u32)
                        .bytes(self.config.name.as_bytes())
                        .bytes(self.config.description.as_bytes());
                    opt_reply(w, opt, REP_SERVER, &o.0)?;
                    opt_reply(w, opt, REP_ACK, &[])?;
                }
                OPT_STARTTLS => opt_reply(w, opt, REP_ERR_UNSUP, b"no TLS in folio")?,
                OPT_INFO | OPT_GO => {
                    if self.info(w, opt, &data)? && opt == OPT_GO {
                        return Ok(Some(neg));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if data.is_empty() {
                        neg.structured = true;
                        opt_reply(w, opt, REP_ACK, &[])?;
                    } else {
                        opt_reply(w, opt, REP_ERR_INVALID, b"takes no data")?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(w, opt, &data, &mut neg)?;
                }
                _ => opt_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
            }
        }
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.name.as_bytes()
    }

    /// NBD_OPT_INFO / NBD_OPT_GO; true if the export was found and
    /// described.
    fn info(&self, w: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<bool> {
        let mut f = Fields(data);
        let parsed = (|| {
            let name = f.string()?;
            let n = f.u16()?;
            let reqs: Vec<u16> = (0..n).map(|_| f.u16()).collect::<Option<_>>()?;
            f.is_empty().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            opt_reply(w, opt, REP_ERR_INVALID, b"malformed request")?;
            return Ok(false);
        };
        if !self.name_matches(name) {
            opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(false);
        }
        let mut o = Out::default();
        o.u16(INFO_EXPORT)
            .u64(self.export.size())
            .u16(self.transmission_flags());
        opt_reply(w, opt, REP_INFO, &o.0)?;
        if reqs.contains(&INFO_NAME) {
            let mut o = Out::default();
            o.u16(INFO_NAME).bytes(self.config.name.as_bytes());
            opt_reply(w, opt, REP_INFO, &o.0)?;
        }
        if reqs.contains(&INFO_DESCRIPTION) {
            let mut o = Out::default();
            o.u16(INFO_DESCRIPTION)
                .bytes(self.config.description.as_bytes());
            opt_reply(w, opt, REP_INFO, &o.0)?;
        }
        // Always: the alignment an XTS transform needs, the page size as
        // the preferred size, and the payload limit.
        let mut o = Out::default();
        o.u16(INFO_BLOCK_SIZE)
            .u32(self.min_block() as u32)
            .u32(4096)
            .u32(MAX_PAYLOAD);
        opt_reply(w, opt, REP_INFO, &o.0)?;
        opt_reply(w, opt, REP_ACK, &[])?;
        Ok(true)
    }

    fn meta_context(
        &self,
        w: &mut impl Write,
        opt: u32,
        data: &[u8],
        neg: &mut Negotiated,
    ) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && !neg.structured {
            return opt_reply(w, opt, REP_ERR_INVALID, b"structured replies first");
        }
        let mut f = Fields(data);
        let parsed = (|| {
            let name = f.string()?;
            let n = f.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(f.string()?);
            }
            f.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return opt_reply(w, opt, REP_ERR_INVALID, b"malformed request");
        };
        if !self.name_matches(name) {
            return opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export");
        }
        let wanted = if set {
            queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
        } else {
            // LIST: no query lists all; "base:" names the namespace.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == BASE_ALLOCATION.as_bytes() || *q == b"base:")
        };
        if set {
            neg.allocation = wanted;
        }
        if wanted {
            let mut o = Out::default();
            o.u32(if set { ALLOCATION_ID } else { 0 })
                .bytes(BASE_ALLOCATION.as_bytes());
            opt_reply(w, opt, REP_META_CONTEXT, &o.0)?;
        }
        opt_reply(w, opt, REP_ACK, &[])
    }

    // ---- transmission ----

    fn request(
        &self,
        req: &Request,
        neg: &Negotiated,
        r: &mut impl Read,
        w: &mut impl Write,
        bounce: &mut Bounce,
    ) -> io::Result<Flow> {
        let known =
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
        if req.cmd == CMD_WRITE && req.length > MAX_PAYLOAD {
            // The payload cannot be skipped safely: the connection ends.
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("write of {} bytes is over the limit", req.length),
            ));
        }
        let check = self.validate(req, neg, known);
        if req.cmd == CMD_DISC {
            return Ok(Flow::Close);
        }
        if let Err(errno) = check {
            if req.cmd == CMD_WRITE {
                io::copy(&mut r.take(u64::from(req.length)), &mut io::sink())?;
            }
            self.reply_error(w, neg.structured, req, errno, "invalid request")?;
            return Ok(Flow::Continue);
        }
        let (off, len) = (req.offset, u64::from(req.length));
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = match req.cmd {
            CMD_READ => return self.read(req, neg, w, bounce),
            CMD_WRITE => self.write(off, len, r, bounce)?,
            CMD_FLUSH => self.export.flush(),
            CMD_TRIM => self.export.trim(off, len),
            CMD_WRITE_ZEROES => self.zero(req, bounce),
            CMD_CACHE => self.export.cache(off, len),
            CMD_BLOCK_STATUS => return self.block_status(req, w).map(|()| Flow::Continue),
            _ => unreachable!("validate refuses unknown commands"),
        };
        let result = result.and_then(|()| {
            if fua && matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
                self.export.flush()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => w.write_all(&simple_reply(0, req.cookie))?,
            Err(e) => self.reply_error(w, neg.structured, req, wire_errno(&e), &e.to_string())?,
        }
        Ok(Flow::Continue)
    }

    /// The protocol's checks of a request before it runs.
    fn validate(&self, req: &Request, neg: &Negotiated, known: u16) -> Result<(), u32> {
        if req.flags & !known != 0 {
            return Err(EINVAL);
        }
        let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        match req.cmd {
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE => {}
            CMD_BLOCK_STATUS if neg.structured && neg.allocation && req.length > 0 => {}
            CMD_FLUSH | CMD_DISC => return Ok(()),
            _ => return Err(EINVAL),
        }
        if req.cmd == CMD_READ && req.length > MAX_PAYLOAD {
            return Err(EOVERFLOW);
        }
        if writes && self.config.read_only {
            return Err(EPERM);
        }
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|e| e > self.export.size()) {
            return Err(if writes { ENOSPC } else { EINVAL });
        }
        let a = self.min_block();
        if req.cmd != CMD_BLOCK_STATUS
            && (!req.offset.is_multiple_of(a) || !u64::from(req.length).is_multiple_of(a))
        {
            return Err(EINVAL);
        }
        Ok(())
    }

    fn reply_error(
        &self,
        w: &mut impl Write,
        structured: bool,
        req: &Request,
        errno: u32,
        msg: &str,
    ) -> io::Result<()> {
        if structured && matches!(req.cmd, CMD_READ | CMD_BLOCK_STATUS) {
            let msg = &msg.as_bytes()[..msg.len().min(1024)];
            let mut o = Out::default();
            o.bytes(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                (4 + 2 + msg.len()) as u32,
            ))
            .u32(errno)
            .u16(msg.len() as u16)
            .bytes(msg);
            w.write_all(&o.0)
        } else {
            w.write_all(&simple_reply(errno, req.cookie))
        }
    }

    /// Pieces of a request no longer than a bounce buffer.
    fn pieces(&self, off: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
        let chunk = self.pool.chunk() as u64;
        let n = len.div_ceil(chunk);
        (0..n).map(move |i| {
            let at = i * chunk;
            (off + at, (len - at).min(chunk) as usize)
        })
    }

    fn read_piece(&self, at: u64, data: &mut [u8]) -> io::Result<()> {
        self.export.read(at, data)?;
        if let Some(t) = &self.config.transform {
            t.decrypt(at, data)?;
        }
        Ok(())
    }

    fn read(
        &self,
        req: &Request,
        neg: &Negotiated,
        w: &mut impl Write,
        bounce: &mut Bounce,
    ) -> io::Result<Flow> {
        let len = u64::from(req.length);
        if len == 0 {
            if neg.structured {
                w.write_all(&chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    req.cookie,
                    0,
                ))?;
            } else {
                w.write_all(&simple_reply(0, req.cookie))?;
            }
            return Ok(Flow::Continue);
        }
        let end = req.offset + len;
        let buf = bounce.all();
        for (i, (at, n)) in self.pieces(req.offset, len).enumerate() {
            let data = &mut buf[HEADROOM..HEADROOM + n];
            if let Err(e) = self.read_piece(at, data) {
                if neg.structured {
                    let msg = e.to_string();
                    let msg = &msg.as_bytes()[..msg.len().min(1024)];
                    let mut o = Out::default();
                    o.bytes(&chunk_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_ERROR_OFFSET,
                        req.cookie,
                        (4 + 2 + msg.len() + 8) as u32,
                    ))
                    .u32(wire_errno(&e))
                    .u16(msg.len() as u16)
                    .bytes(msg)
                    .u64(at);
                    w.write_all(&o.0)?;
                    return Ok(Flow::Continue);
                }
                if i == 0 {
                    w.write_all(&simple_reply(wire_errno(&e), req.cookie))?;
                    return Ok(Flow::Continue);
                }
                // Part of the data has gone out under a success header:
                // the simple protocol can only end the connection.
                return Err(e);
            }
            // The header goes in the headroom just before the data.
            let start = if neg.structured {
                let flags = if at + n as u64 == end {
                    REPLY_FLAG_DONE
                } else {
                    0
                };
                let h = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + n as u32);
                let s = HEADROOM - 8 - h.len();
                buf[s..s + h.len()].copy_from_slice(&h);
                buf[HEADROOM - 8..HEADROOM].copy_from_slice(&be64_bytes(at));
                s
            } else if i == 0 {
                let h = simple_reply(0, req.cookie);
                buf[HEADROOM - h.len()..HEADROOM].copy_from_slice(&h);
                HEADROOM - h.len()
            } else {
                HEADROOM
            };
            w.write_all(&buf[start..HEADROOM + n])?;
        }
        Ok(Flow::Continue)
    }

    /// Receive a write's payload piece by piece; an error of the export
    /// (the inner result) stops the writing, never the reading (the
    /// stream must stay in step). The outer error is the stream's.
    fn write(
        &self,
        off: u64,
        len: u64,
        r: &mut impl Read,
        bounce: &mut Bounce,
    ) -> io::Result<io::Result<()>> {
        let buf = bounce.all();
        let mut result = Ok(());
        for (at, n) in self.pieces(off, len) {
            let data = &mut buf[HEADROOM..HEADROOM + n];
            r.read_exact(data)?;
            if result.is_ok() {
                result = self.write_piece(at, data);
            }
        }
        Ok(result)
    }

    fn write_piece(&self, at: u64, data: &mut [u8]) -> io::Result<()> {
        if let Some(t) = &self.config.transform {
            t.encrypt(at, data)?;
        }
        self.export.write(at, data)
    }

    fn zero(&self, req: &Request, bounce: &mut Bounce) -> io::Result<()> {
        let (off, len) = (req.offset, u64::from(req.length));
        if self.config.transform.is_none() {
            return self
                .export
                .zero(off, len, req.flags & CMD_FLAG_NO_HOLE == 0);
        }
        // Transformed zeros are not zeros: they must be written.
        if req.flags & CMD_FLAG_FAST_ZERO != 0 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let buf = bounce.all();
        for (at, n) in self.pieces(off, len) {
            let data = &mut buf[HEADROOM..HEADROOM + n];
            data.fill(0);
            self.write_piece(at, data)?;
        }
        Ok(())
    }

    fn block_status(&self, req: &Request, w: &mut impl Write) -> io::Result<()> {
        // Under a transform a hole reads as the transform of zeros, so it
        // is reported unallocated but not zero.
        let zero = if self.config.transform.is_none() {
            STATE_ZERO
        } else {
            0
        };
        let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut o = Out::default();
        o.bytes(&[0u8; CHUNK_HEADER_LEN]).u32(ALLOCATION_ID);
        let (mut at, end) = (req.offset, req.offset + u64::from(req.length));
        let mut count = 0;
        let mut last: Option<(u64, u32)> = None;
        while at < end && count < limit {
            match self.export.extent(at, end - at) {
                Ok((n, hole)) if n > 0 => {
                    let flags = if hole { STATE_HOLE | zero } else { 0 };
                    // Neighbouring runs of one kind are one descriptor.
                    match &mut last {
                        Some((l, f)) if *f == flags => *l += n,
                        _ => {
                            if let Some((l, f)) = last.take() {
                                o.u32(l as u32).u32(f);
                                count += 1;
                            }
                            last = Some((n, flags));
                        }
                    }
                    at += n;
                }
                Ok(_) => break,
                Err(e) if count == 0 && last.is_none() => {
                    return self.reply_error(w, true, req, wire_errno(&e), &e.to_string());
                }
                // Report what is known; the client asks again for the rest.
                Err(_) => break,
            }
        }
        if let Some((l, f)) = last {
            if count < limit {
                o.u32(l as u32).u32(f);
                count += 1;
            }
        }
        if count == 0 {
            // Nothing to describe (the export shrank?): an error, never an
            // empty reply.
            let e = io::Error::from_raw_os_error(libc::EIO);
            return self.reply_error(w, true, req, wire_errno(&e), "no allocation status");
        }
        let payload = (o.0.len() - CHUNK_HEADER_LEN) as u32;
        o.0[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            payload,
        ));
        w.write_all(&o.0)
    }
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut o = Out::default();
    o.u64(REPLY_MAGIC)
        .u32(opt)
        .u32(kind)
        .u32(data.len() as u32)
        .bytes(data);
    w.write_all(&o.0)
}

/// What the server needs of a connected socket besides reading and
/// writing through `&` references.
pub trait SocketLike: Send + Sync {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Stop reading from another thread: a blocked read sees the end of
    /// the stream, and a request under way still gets its reply.
    fn stop_reading(&self);
}

impl SocketLike for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
    fn stop_reading(&self) {
        let _ = self.shutdown(std::net::Shutdown::Read);
    }
}

impl SocketLike for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn stop_reading(&self) {
        let _ = self.shutdown(std::net::Shutdown::Read);
    }
}
