//! `folio export` with real NBD clients (qemu-img, qemu-io, nbdinfo), and
//! folio opening images that real NBD servers (qemu-nbd, nbdkit) serve.
//! Needs qemu-utils, libnbd-bin and nbdkit (scripts/test.sh installs
//! them); skipped without them outside CI.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{e2fsck_clean, ok, pattern, scratch};
use folio_ext4::{Filesystem, OpenOptions};

fn have_tools() -> bool {
    let missing: Vec<_> = [
        "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdkit", "nbdcopy",
    ]
    .into_iter()
    .filter(|t| {
        !Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but {missing:?} are missing"
        );
        eprintln!("SKIP: NBD tests need {missing:?}");
    }
    missing.is_empty()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A `folio export` in the foreground, as a child; stopped with SIGTERM.
struct Exporter {
    child: Child,
    uri: String,
}

impl Exporter {
    /// Listening on the Unix socket `sock`, unless `extra` names another
    /// `--listen`.
    fn start(img: &Path, path: &str, sock: &Path, extra: &[&str]) -> Exporter {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_folio"));
        cmd.arg("export").arg(img).arg(path);
        if !extra.contains(&"--listen") {
            cmd.arg("--listen").arg(format!("unix:{}", sock.display()));
        }
        let mut child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let uri = line
            .trim()
            .rsplit(" at ")
            .next()
            .filter(|u| u.starts_with("nbd"))
            .unwrap_or_else(|| panic!("folio export did not start: {line}"))
            .to_string();
        // Keep draining its stderr into ours.
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                eprintln!("[export] {l}");
            }
        });
        Exporter { child, uri }
    }

    /// SIGTERM, and its exit status must be success.
    fn stop(mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "folio export exited with {st}");
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child's pid has no memory effects here.
    unsafe { libc::kill(pid as i32, sig) };
}

/// `qemu-img convert` from `src` to `dst` (raw both), into an existing
/// target (`-n`) when `into_existing`.
fn qemu_img_convert(
    src: &dyn AsRef<std::ffi::OsStr>,
    dst: &dyn AsRef<std::ffi::OsStr>,
    into_existing: bool,
) {
    let mut c = Command::new("qemu-img");
    c.arg("convert");
    if into_existing {
        c.arg("-n");
    }
    run(c.args(["-f", "raw", "-O", "raw"]).arg(src).arg(dst));
}

/// A scratch directory with an image `img` of `size` in it; `None` (the
/// test skips) without the NBD tools.
fn setup(tag: &str, size: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if !have_tools() {
        return None;
    }
    let dir = scratch("nbd", tag);
    let img = dir.join("img");
    mkfs(&img, size);
    Some((dir, img))
}

fn mkfs(img: &Path, size: &str) {
    ok(&[&"mkfs", &"-q", &img, &"--size", &size]);
}

fn free_blocks(img: &Path) -> u64 {
    let fs = Filesystem::open_path(img, OpenOptions::default()).unwrap();
    let free = fs.statfs().blocks_free;
    fs.close().unwrap();
    free
}

/// (offset, length, is-hole) rows of `nbdinfo --map`.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    run(Command::new("nbdinfo").arg("--map").arg(uri))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3].contains("hole"),
            )
        })
        .collect()
}

/// Is all of [off, off+len) reported as a hole?
fn is_hole(m: &[(u64, u64, bool)], off: u64, len: u64) -> bool {
    m.iter()
        .filter(|(o, l, _)| *o < off + len && o + l > off)
        .all(|r| r.2)
}

#[test]
fn qemu_img_round_trip_map_and_trim() {
    let Some((dir, img)) = setup("convert", "256M") else {
        return;
    };
    // A raw disk image: 40 MiB of data, a hole, 2 MiB more at 60 MiB.
    let src = dir.join("src.raw");
    let mut raw = pattern(64 << 20, 7);
    raw[40 << 20..60 << 20].fill(0);
    raw[62 << 20..].fill(0);
    std::fs::write(&src, &raw).unwrap();
    let exp = Exporter::start(&img, "/disk.raw", &dir.join("s.sock"), &["--size", "64M"]);
    qemu_img_convert(&src, &exp.uri, true);
    let back = dir.join("back.raw");
    qemu_img_convert(&exp.uri, &back, false);
    assert!(
        std::fs::read(&back).unwrap() == raw,
        "qemu-img convert out differs"
    );
    // Four connections at once (nbdcopy uses multi-conn when offered).
    let again = dir.join("again.raw");
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&exp.uri)
        .arg(&again));
    assert!(
        std::fs::read(&again).unwrap() == raw,
        "nbdcopy over 4 connections differs"
    );
    // qemu-img convert skips zeros: the zero range stays a hole.
    let m = map(&exp.uri);
    assert!(is_hole(&m, 40 << 20, 20 << 20), "{m:?}");
    assert!(!is_hole(&m, 0, 4096), "{m:?}");
    exp.stop();
    e2fsck_clean(&img);
    let got = dir.join("got.raw");
    ok(&[&"get", &img, &"/disk.raw", &got]);
    assert!(std::fs::read(&got).unwrap() == raw, "folio get differs");

    // TRIM frees the blocks: a hole in the map, free blocks in statfs.
    let before = free_blocks(&img);
    let exp = Exporter::start(&img, "/disk.raw", &dir.join("s.sock"), &[]);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "discard 0 16M", "-c", "read -P 0 0 16M"])
        .arg(&exp.uri));
    let m = map(&exp.uri);
    assert!(is_hole(&m, 0, 16 << 20), "{m:?}");
    exp.stop();
    let after = free_blocks(&img);
    assert!(
        after >= before + (16 << 20) / 4096,
        "discard of 16 MiB freed only {} blocks",
        after - before
    );
    e2fsck_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_io_random_patterns_agree_with_a_model() {
    let Some((dir, img)) = setup("qemuio", "128M") else {
        return;
    };
    const SIZE: u64 = 16 << 20;
    let seed = std::env::var("FOLIO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9u64);
    eprintln!("qemu-io model seed {seed} (FOLIO_SEED replays it)");
    let mut rng = pattern(4 * 600 * 8, seed).into_iter();
    let mut next = |n: u64| {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(rng.next().unwrap());
        }
        v % n
    };
    let mut model = vec![0u8; SIZE as usize];
    let mut script = String::new();
    for i in 0..600 {
        let len = (next(256) + 1) * 512;
        let off = next((SIZE - len) / 512) * 512;
        let (o, l) = (off as usize, len as usize);
        match next(5) {
            0 | 1 => {
                let p = (i % 250 + 1) as u8;
                script += &format!("write -P {p} {off} {len}\n");
                model[o..o + l].fill(p);
            }
            2 => {
                script += &format!("discard {off} {len}\n");
                model[o..o + l].fill(0);
            }
            3 => {
                // -u may punch (no NO_HOLE flag); without it, zero-range.
                let u = if i % 2 == 0 { "-u " } else { "" };
                script += &format!("write -z {u}{off} {len}\n");
                model[o..o + l].fill(0);
            }
            _ => {
                let p = model[o];
                if model[o..o + l].iter().all(|&b| b == p) {
                    script += &format!("read -P {p} {off} {len}\n");
                }
            }
        }
        if i % 97 == 0 {
            script += "flush\n";
        }
    }
    let exp = Exporter::start(&img, "/vm.raw", &dir.join("s.sock"), &["--create", "16M"]);
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&exp.uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    q.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = q.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.contains("fail") && !out.contains("error"),
        "seed {seed}: qemu-io reported: {}",
        out.lines()
            .filter(|l| l.contains("fail") || l.contains("error"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let back = dir.join("back.raw");
    qemu_img_convert(&exp.uri, &back, false);
    exp.stop();
    let got = std::fs::read(&back).unwrap();
    if let Some(at) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "seed {seed}: byte {at} is {} through the export, {} in the model",
            got[at], model[at]
        );
    }
    e2fsck_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_client_and_a_killed_server_lose_nothing_flushed() {
    let Some((dir, img)) = setup("kill", "256M") else {
        return;
    };
    let sock = dir.join("s.sock");
    let exp = Exporter::start(&img, "/disk.raw", &sock, &["--size", "64M"]);
    // A client killed in the middle of a large write.
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 17 0 60M"])
        .arg(&exp.uri)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let _ = q.kill();
    let _ = q.wait();
    // The server serves the next client; what it flushes is durable.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 34 1M 3M",
            "-c",
            "flush",
            "-c",
            "read -P 34 1M 3M",
        ])
        .arg(&exp.uri));
    exp.kill();
    // Reopen (replaying the journal) and look.
    ok(&[&"recover", &img]);
    e2fsck_clean(&img);
    let got = dir.join("got.raw");
    ok(&[&"get", &img, &"/disk.raw", &got]);
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(
        got[1 << 20..4 << 20].iter().all(|&b| b == 34),
        "flushed data lost"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transforms_round_trip_and_hide_the_plaintext() {
    let Some((dir, img)) = setup("xform", "128M") else {
        return;
    };
    let key = dir.join("key");
    std::fs::write(&key, pattern(64, 99)).unwrap();
    let plain = pattern(8 << 20, 3);
    let src = dir.join("p.raw");
    std::fs::write(&src, &plain).unwrap();
    for (file, t) in [
        ("/x.raw", "xor:0x5a".to_string()),
        ("/e.raw", format!("aes-xts-plain64:{}", key.display())),
    ] {
        let exp = Exporter::start(
            &img,
            file,
            &dir.join("s.sock"),
            &["--size", "8M", "--transform", &t],
        );
        qemu_img_convert(&src, &exp.uri, true);
        let back = dir.join("back.raw");
        qemu_img_convert(&exp.uri, &back, false);
        exp.stop();
        assert!(
            std::fs::read(&back).unwrap() == plain,
            "{t}: export round trip"
        );
        let dec = dir.join("dec.raw");
        ok(&[&"get", &img, &file, &dec, &"--transform", &t]);
        assert!(
            std::fs::read(&dec).unwrap() == plain,
            "{t}: get --transform"
        );
        let stored = dir.join("stored.raw");
        ok(&[&"get", &img, &file, &stored]);
        let stored = std::fs::read(&stored).unwrap();
        assert_eq!(stored.len(), plain.len());
        let same = stored.iter().zip(&plain).filter(|(a, b)| a == b).count();
        assert!(
            same < plain.len() / 100,
            "{t}: the image holds the plaintext"
        );
        if t.starts_with("aes") {
            xts_matches_dm_crypt_layout(&key, &dir.join("p.raw"), &stored, &dir);
        }
    }
    e2fsck_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

/// dm-crypt's aes-xts-plain64: sector n of 512 bytes encrypted with the
/// tweak n as a 16-byte little-endian number. Checked against Python's
/// `cryptography` where it is installed.
fn xts_matches_dm_crypt_layout(key: &Path, plain: &Path, stored: &[u8], dir: &Path) {
    let out = dir.join("stored.bin");
    std::fs::write(&out, stored).unwrap();
    let py = format!(
        "from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
         k=open('{}','rb').read(); p=open('{}','rb').read(); c=open('{}','rb').read()\n\
         for s in (0, 1, 4095, 16383):\n\
         \x20   e=Cipher(algorithms.AES(k), modes.XTS(s.to_bytes(16,'little'))).encryptor()\n\
         \x20   assert e.update(p[s*512:(s+1)*512])+e.finalize()==c[s*512:(s+1)*512], s\n\
         print('ok')\n",
        key.display(),
        plain.display(),
        out.display()
    );
    let o = Command::new("python3").arg("-c").arg(&py).output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!("SKIP: the XTS layout check needs python3's cryptography");
        }
        Ok(o) => panic!("XTS layout differs: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("SKIP: the XTS layout check needs python3"),
    }
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never came up",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(cmd: &mut Command, sock: &Path) -> Daemon {
    let d = Daemon(cmd.stdout(Stdio::null()).spawn().unwrap());
    wait_for_socket(sock);
    d
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

#[test]
fn folio_uses_images_on_qemu_nbd_and_nbdkit() {
    if !have_tools() {
        return;
    }
    let dir = scratch("nbd", "client");
    let tree = dir.join("payload.bin");
    let payload = pattern(3 << 20, 5);
    std::fs::write(&tree, &payload).unwrap();

    // qemu-nbd serving a raw file.
    let raw = dir.join("q.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let sock = dir.join("q.sock");
    let server = spawn_server(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&sock)
            .arg(&raw),
        &sock,
    );
    let uri = unix_uri(&sock);
    ok(&[&"mkfs", &"-q", &uri]);
    ok(&[&"mkdir", &uri, &"/d"]);
    ok(&[&"put", &uri, &tree, &"/d/payload.bin"]);
    let back = dir.join("back.bin");
    ok(&[&"get", &uri, &"/d/payload.bin", &back]);
    assert!(std::fs::read(&back).unwrap() == payload);
    assert!(ok(&[&"ls", &uri, &"/d"]).contains("payload.bin"));
    drop(server);
    e2fsck_clean(&raw);

    // nbdkit memory: a fresh mkfs, copied out with nbdcopy and checked.
    let sock = dir.join("m.sock");
    let server = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "96M"]),
        &sock,
    );
    let uri = unix_uri(&sock);
    ok(&[&"mkfs", &"-q", &uri]);
    ok(&[&"put", &uri, &tree, &"/p"]);
    ok(&[&"get", &uri, &"/p", &back]);
    assert!(std::fs::read(&back).unwrap() == payload);
    let copy = dir.join("m.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    drop(server);
    e2fsck_clean(&copy);

    // A FUSE mount of an image on nbdkit file (root and /dev/fuse only).
    if common::can_mount() {
        let file = dir.join("f.raw");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        let sock = dir.join("f.sock");
        let server = spawn_server(
            Command::new("nbdkit")
                .args(["-f", "-U"])
                .arg(&sock)
                .arg("file")
                .arg(&file),
            &sock,
        );
        let uri = unix_uri(&sock);
        ok(&[&"mkfs", &"-q", &uri]);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        ok(&[&"mount", &uri, &mnt]);
        std::fs::write(mnt.join("payload.bin"), &payload).unwrap();
        ok(&[&"umount", &mnt]);
        drop(server);
        e2fsck_clean(&file);
        let got = dir.join("got.bin");
        ok(&[&"get", &file, &"/payload.bin", &got]);
        assert!(std::fs::read(&got).unwrap() == payload);
    }

    // nbdkit file, killed in the middle of a put: an error, no panic.
    let file = dir.join("k.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let sock = dir.join("k.sock");
    let big = dir.join("big.bin");
    std::fs::write(&big, pattern(96 << 20, 8)).unwrap();
    let mut server = spawn_server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(&file),
        &sock,
    );
    let uri = unix_uri(&sock);
    ok(&[&"mkfs", &"-q", &uri]);
    let put = Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("put")
        .arg(&uri)
        .arg(&big)
        .arg("/big")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = server.0.kill();
    let _ = server.0.wait();
    let out = put.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        // It finished before the kill: fine, but it said nothing wrong.
        eprintln!("note: the put finished before the server was killed");
    } else {
        assert!(
            err.contains("connection") || err.contains("I/O") || err.contains("Broken pipe"),
            "{err}"
        );
    }
    // What the killed server's file holds recovers clean.
    ok(&[&"recover", &file]);
    e2fsck_clean(&file);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fork_pid_file_and_sigterm() {
    let Some((dir, img)) = setup("fork", "64M") else {
        return;
    };
    let pid_file = dir.join("pid");
    let sock = dir.join("f.sock");
    let out = ok(&[
        &"export",
        &img,
        &"/d.raw",
        &"--create",
        &"4M",
        &"--fork",
        &"--pid-file",
        &pid_file,
        &"--listen",
        &format!("unix:{}", sock.display()),
    ]);
    let uri = out.trim().to_string();
    assert!(uri.starts_with("nbd+unix:///d.raw?socket="), "{uri}");
    // TCP, on a port the kernel picks, loopback only.
    let tcp_img = dir.join("tcp.img");
    mkfs(&tcp_img, "64M");
    let tcp = Exporter::start(
        &tcp_img,
        "/t.raw",
        Path::new(""),
        &["--create", "1M", "--listen", "tcp:127.0.0.1:0"],
    );
    assert!(tcp.uri.starts_with("nbd://127.0.0.1:"), "{}", tcp.uri);
    let info = run(Command::new("nbdinfo").arg(&tcp.uri));
    assert!(info.contains("export-size: 1048576"), "{info}");
    tcp.stop();
    e2fsck_clean(&tcp_img);
    // Read-only: the image opened read-only, writes refused (EPERM).
    let ro = Exporter::start(&tcp_img, "/t.raw", &dir.join("ro.sock"), &["-r"]);
    let info = run(Command::new("nbdinfo").arg(&ro.uri));
    assert!(info.contains("is_read_only: true"), "{info}");
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(&ro.uri)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            || out.contains("failed")
            || out.contains("denied")
            || out.contains("read-only"),
        "a write to a read-only export: {out}"
    );
    ro.stop();
    let info = run(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("export-size: 4194304"), "{info}");
    // A second export of the same image is refused: it is locked.
    let o = common::folio(&[
        &"export",
        &img,
        &"/d.raw",
        &"--listen",
        &"unix:/nonexistent/x",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Confined once listening (issue 17).
    assert_eq!(
        folio_cli::confine::proc_status(pid),
        Some((true, true, true)),
        "the export server is not confined"
    );
    signal(pid, libc::SIGTERM);
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "export did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "the socket file is removed");
    e2fsck_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Running (not gone, not a zombie awaiting a reaper).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}
