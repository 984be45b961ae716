//! The server and the client against each other, and the server against
//! clients that break the protocol, over Unix sockets, with an in-memory
//! export and a model. (Real clients — qemu-img, qemu-io, nbdinfo — are
//! in the folio-cli tests.)

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use folio_blockdev::BlockDevice;
use folio_nbd::proto::*;
use folio_nbd::{
    BouncePool, Export, ExportConfig, Listen, Listener, NbdDevice, NbdUri, Server, Transform,
    MAX_OPTION, MAX_PAYLOAD,
};

const BLOCK: u64 = 4096;

/// Bytes plus an allocated flag per 4 KiB block.
struct MemExport {
    data: RwLock<(Vec<u8>, Vec<bool>)>,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemExport {
    fn new(size: usize) -> Arc<MemExport> {
        Arc::new(MemExport {
            data: RwLock::new((vec![0; size], vec![false; size.div_ceil(BLOCK as usize)])),
            flushes: Default::default(),
        })
    }
    fn bytes(&self) -> Vec<u8> {
        self.data.read().unwrap().0.clone()
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap().0.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.read().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d.0[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        let o = offset as usize;
        d.0[o..o + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK) {
            d.1[b as usize] = true;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }
    fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let mut d = self.data.write().unwrap();
        let o = offset as usize;
        d.0[o..o + len as usize].fill(0);
        if punch {
            // Whole blocks only become holes.
            for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                d.1[b as usize] = false;
            }
        }
        Ok(())
    }
    fn extent(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        let d = self.data.read().unwrap();
        let alloc = |at: u64| d.1[(at / BLOCK) as usize];
        let first = alloc(offset);
        let mut at = offset;
        while at < offset + len && alloc(at) == first {
            at = (at / BLOCK + 1) * BLOCK;
        }
        Ok((at.min(offset + len) - offset, !first))
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sock: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(
    tag: &str,
    export: Arc<dyn Export>,
    read_only: bool,
    transform: Option<Transform>,
) -> Running {
    let sock = std::env::temp_dir().join(format!("folio-nbd-{tag}-{}.sock", std::process::id()));
    let listener = Listener::bind(&Listen::Unix(sock.clone())).unwrap();
    let server = Arc::new(Server::new(
        export,
        ExportConfig {
            name: "disk".into(),
            description: "test".into(),
            read_only,
            transform,
        },
        BouncePool::new(2, 64 << 10),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        folio_nbd::serve_until(server, &listener, &s, 8).unwrap();
    });
    Running {
        stop,
        thread: Some(thread),
        sock,
    }
}

fn uri(r: &Running, name: &str) -> NbdUri {
    NbdUri::parse(&format!("nbd+unix:///{name}?socket={}", r.sock.display())).unwrap()
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn client_and_server_agree_with_a_model() {
    const SIZE: usize = 4 << 20;
    for (tag, transform) in [
        ("plain", None),
        ("xor", Some(Transform::Xor(0xa5))),
        ("xts", Some(Transform::aes_xts(&[9u8; 64]).unwrap())),
    ] {
        let export = MemExport::new(SIZE);
        let align = transform.as_ref().map_or(1, |t| t.alignment());
        let run = serve(tag, export.clone(), false, transform);
        let dev = NbdDevice::connect(&uri(&run, "disk"), false).unwrap();
        assert_eq!(dev.size_bytes(), SIZE as u64);
        // Under a transform a fresh export reads as the transform of
        // zeros (as a fresh dm-crypt device reads as noise).
        let mut model = vec![0u8; SIZE];
        dev.read_at(0, &mut model).unwrap();
        assert_eq!(tag == "plain", model.iter().all(|&b| b == 0), "{tag}");
        let seed = 0x5eed_0000 + tag.len() as u64;
        let mut rng = Rng(seed);
        for op in 0..400 {
            // Lengths up to 200 KiB: several bounce-buffer pieces.
            let len = (rng.below(200 << 10) + 1).div_ceil(align) * align;
            let off = rng.below(SIZE as u64 - len) / align * align;
            let (o, l) = (off as usize, len as usize);
            match rng.below(4) {
                0 | 1 => {
                    let fill = (op % 251) as u8;
                    let data: Vec<u8> = (0..l).map(|i| fill.wrapping_add(i as u8)).collect();
                    dev.write_at(off, &data).unwrap();
                    model[o..o + l].copy_from_slice(&data);
                }
                2 => {
                    dev.discard(off, len).unwrap();
                    model[o..o + l].fill(0);
                }
                _ => {
                    let mut got = vec![0u8; l];
                    dev.read_at(off, &mut got).unwrap();
                    assert!(
                        got == model[o..o + l],
                        "{tag} seed {seed:#x} op {op}: read at {off} (+{len}) differs"
                    );
                }
            }
        }
        dev.flush().unwrap();
        assert!(export.flushes.load(Ordering::Relaxed) >= 1);
        let mut all = vec![0u8; SIZE];
        dev.read_at(0, &mut all).unwrap();
        assert!(
            all == model,
            "{tag}: the whole export differs from the model"
        );
        if tag != "plain" {
            // What the export stores is not the plaintext.
            assert!(
                export.bytes() != model,
                "{tag}: stored bytes equal the plaintext"
            );
        } else {
            assert!(export.bytes() == model);
        }
        // Out of range, refused by the client before the wire.
        assert!(dev.read_at(SIZE as u64 - 10, &mut [0u8; 20]).is_err());
    }
}

#[test]
fn an_unknown_export_is_refused_by_name() {
    let run = serve("names", MemExport::new(1 << 20), false, None);
    assert!(
        NbdDevice::connect(&uri(&run, ""), true).is_ok(),
        "the empty name is the default export"
    );
    let e = NbdDevice::connect(&uri(&run, "other"), true).err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
}

#[test]
fn a_read_only_export_refuses_writes() {
    let run = serve("ro", MemExport::new(1 << 20), true, None);
    let dev = NbdDevice::connect(&uri(&run, "disk"), false).unwrap();
    assert!(dev.is_read_only());
    // Past the client's own check, the server says EPERM.
    let mut c = RawClient::go(&run, false);
    let r = c.request(CMD_WRITE, 0, 0, 512, &[1u8; 512]);
    assert_eq!(r, EPERM);
}

/// A hand-driven client for the misbehaviour tests.
struct RawClient(UnixStream);

impl RawClient {
    fn connect(run: &Running) -> RawClient {
        let s = UnixStream::connect(&run.sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        RawClient(s)
    }

    fn hello(&mut self) {
        let mut b = [0u8; 18];
        self.0.read_exact(&mut b).unwrap();
        assert_eq!(be64(&b[0..8]), NBDMAGIC);
        assert_eq!(be64(&b[8..16]), IHAVEOPT);
        let mut o = Out::default();
        o.u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        self.0.write_all(&o.0).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut o = Out::default();
        o.u64(IHAVEOPT).u32(opt).u32(data.len() as u32).bytes(data);
        self.0.write_all(&o.0).unwrap();
    }

    /// (reply type, data) of one option reply.
    fn opt_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..8]), REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        self.0.read_exact(&mut d).unwrap();
        (be32(&h[12..16]), d)
    }

    /// Replies to one option up to its ACK (or error); the last type.
    fn replies_until_done(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.opt_reply();
            let done = r.0 == REP_ACK || r.0 & (1 << 31) != 0;
            all.push(r);
            if done {
                return all;
            }
        }
    }

    /// Handshake through NBD_OPT_GO, optionally with structured replies
    /// and base:allocation.
    fn go(run: &Running, structured: bool) -> RawClient {
        let mut c = RawClient::connect(run);
        c.hello();
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_reply().0, REP_ACK);
            let mut o = Out::default();
            o.u32(4)
                .bytes(b"disk")
                .u32(1)
                .u32(15)
                .bytes(b"base:allocation");
            c.option(OPT_SET_META_CONTEXT, &o.0);
            let r = c.replies_until_done();
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        let mut o = Out::default();
        o.u32(4).bytes(b"disk").u16(0);
        c.option(OPT_GO, &o.0);
        let r = c.replies_until_done();
        assert_eq!(r.last().unwrap().0, REP_ACK);
        c
    }

    fn send(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) {
        let h = Request {
            flags,
            cmd,
            cookie: 77,
            offset,
            length: len,
        }
        .encode();
        self.0.write_all(&h).unwrap();
        self.0.write_all(payload).unwrap();
    }

    /// A simple reply's error (its data, for reads, is read and dropped).
    fn request(&mut self, cmd: u16, offset: u64, len: u32, data_len: usize, payload: &[u8]) -> u32 {
        self.send(cmd, 0, offset, len, payload);
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(be32(&r[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be64(&r[8..16]), 77);
        let err = be32(&r[4..8]);
        if err == 0 {
            let mut d = vec![0u8; data_len];
            self.0.read_exact(&mut d).unwrap();
        }
        err
    }

    /// Is the connection closed by the server?
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn misbehaving_clients_get_errors_or_a_closed_socket() {
    let export = MemExport::new(1 << 20);
    let run = serve("hostile", export.clone(), false, None);

    // Unknown client flags: closed.
    let mut c = RawClient::connect(&run);
    let mut b = [0u8; 18];
    c.0.read_exact(&mut b).unwrap();
    c.0.write_all(&[0, 0, 0, 0x80]).unwrap();
    assert!(c.closed());

    // A bad option magic: closed.
    let mut c = RawClient::connect(&run);
    c.hello();
    c.0.write_all(&[0xff; 16]).unwrap();
    assert!(c.closed());

    // An over-long option is skipped and refused; the client goes on.
    let mut c = RawClient::connect(&run);
    c.hello();
    c.option(OPT_GO, &vec![0u8; (MAX_OPTION + 1) as usize]);
    assert_eq!(c.opt_reply().0, REP_ERR_TOO_BIG);
    // Malformed GO (name length beyond the data), unknown option, LIST.
    let mut o = Out::default();
    o.u32(1000).bytes(b"x");
    c.option(OPT_GO, &o.0);
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID);
    c.option(99, b"junk");
    assert_eq!(c.opt_reply().0, REP_ERR_UNSUP);
    c.option(OPT_LIST, &[]);
    let r = c.replies_until_done();
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1[4..], b"disktest");
    // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
    let mut o = Out::default();
    o.u32(0).u32(1).u32(15).bytes(b"base:allocation");
    c.option(OPT_SET_META_CONTEXT, &o.0);
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().0, REP_ACK);
    assert!(c.closed());

    // In transmission: range, flags, commands, sizes.
    let mut c = RawClient::go(&run, false);
    assert_eq!(c.request(CMD_READ, (1 << 20) - 10, 20, 20, &[]), EINVAL);
    assert_eq!(c.request(CMD_READ, u64::MAX - 5, 20, 20, &[]), EINVAL);
    assert_eq!(
        c.request(CMD_WRITE, (1 << 20) - 2, 4, 0, &[1, 2, 3, 4]),
        ENOSPC
    );
    assert_eq!(c.request(CMD_READ, 0, MAX_PAYLOAD + 1, 0, &[]), EOVERFLOW);
    assert_eq!(c.request(99, 0, 0, 0, &[]), EINVAL);
    // BLOCK_STATUS without base:allocation negotiated.
    assert_eq!(c.request(CMD_BLOCK_STATUS, 0, 4096, 0, &[]), EINVAL);
    c.send(CMD_READ, 1 << 12, 0, 8, &[]);
    let mut r = [0u8; 16];
    c.0.read_exact(&mut r).unwrap();
    assert_eq!(be32(&r[4..8]), EINVAL, "unknown command flag");
    // Still in step after all that.
    assert_eq!(c.request(CMD_WRITE, 0, 3, 0, b"abc"), 0);
    assert_eq!(c.request(CMD_READ, 0, 3, 3, &[]), 0);
    assert_eq!(c.request(CMD_FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(c.request(CMD_CACHE, 0, 65536, 0, &[]), 0);
    assert_eq!(c.request(CMD_CACHE, 1 << 20, 1, 0, &[]), EINVAL);
    // A write over the payload limit cannot be skipped: closed.
    c.send(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1, &[]);
    assert!(c.closed());

    // A bad request magic: closed.
    let mut c = RawClient::go(&run, false);
    c.0.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());

    // A client that drops mid-payload: the partial write may land or not,
    // but the server goes on serving others.
    let mut c = RawClient::go(&run, false);
    c.send(CMD_WRITE, 0, 8192, 65536, &[7u8; 1000]);
    drop(c);
    let dev = NbdDevice::connect(&uri(&run, "disk"), false).unwrap();
    let mut got = [0u8; 3];
    dev.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"abc");
}

#[test]
fn block_status_reports_holes_and_data() {
    let export = MemExport::new(1 << 20);
    export.write(8192, &[1u8; 8192]).unwrap();
    let run = serve("status", export, false, None);
    let mut c = RawClient::go(&run, true);
    for (flags, want) in [
        (
            0u16,
            vec![
                (8192u32, STATE_HOLE | STATE_ZERO),
                (8192, 0),
                ((1 << 20) - 16384, STATE_HOLE | STATE_ZERO),
            ],
        ),
        (CMD_FLAG_REQ_ONE, vec![(8192, STATE_HOLE | STATE_ZERO)]),
    ] {
        c.send(CMD_BLOCK_STATUS, flags, 0, 1 << 20, &[]);
        let mut h = [0u8; 20];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&h[6..8]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be16(&h[4..6]) & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        c.0.read_exact(&mut d).unwrap();
        assert_eq!(be32(&d[0..4]), 1, "context id");
        let got: Vec<(u32, u32)> = d[4..]
            .chunks(8)
            .map(|e| (be32(&e[0..4]), be32(&e[4..8])))
            .collect();
        assert_eq!(got, want, "flags {flags:#x}");
    }
    // A structured read: data chunks then DONE.
    c.send(CMD_READ, 0, 8192, 8192, &[]);
    let mut h = [0u8; 20];
    c.0.read_exact(&mut h).unwrap();
    assert_eq!(be16(&h[6..8]), REPLY_TYPE_OFFSET_DATA);
    assert_eq!(be16(&h[4..6]), REPLY_FLAG_DONE);
    let mut d = vec![0u8; be32(&h[16..20]) as usize];
    c.0.read_exact(&mut d).unwrap();
    assert_eq!(be64(&d[0..8]), 8192);
    assert!(d[8..].iter().all(|&b| b == 1));
}
