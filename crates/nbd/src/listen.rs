//! Where a server listens, and its accept loop.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::server::{Server, SocketLike};
use crate::DEFAULT_PORT;

/// A listening address: `unix:PATH`, `tcp:HOST:PORT` or `tcp:PORT`
/// (loopback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl Default for Listen {
    fn default() -> Self {
        Listen::Tcp(format!("127.0.0.1:{DEFAULT_PORT}"))
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.parse::<u16>().is_ok() {
                return Ok(Listen::Tcp(format!("127.0.0.1:{a}")));
            }
            if a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Listen::Tcp(a.to_string()));
            }
            return Err(format!("tcp:{a}: expected tcp:HOST:PORT or tcp:PORT"));
        }
        Err(format!("{s}: expected unix:PATH or tcp:HOST:PORT"))
    }
}

/// A bound listening socket. A Unix socket's file is removed when it is
/// dropped.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Bind; a Unix socket file left by a server that is gone is replaced,
    /// one that a server still answers on is refused.
    pub fn bind(at: &Listen) -> io::Result<Listener> {
        match at {
            Listen::Unix(p) => {
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    if UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{}: a server is listening there", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                Ok(Listener::Unix(l, p.clone()))
            }
            Listen::Tcp(a) => TcpListener::bind(a.as_str())
                .map(Listener::Tcp)
                .map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}"))),
        }
    }

    /// The NBD URI a client uses to reach export `name` here.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Listener::Unix(_, p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) if a.ip().is_ipv6() => format!("nbd://[{}]:{}/{name}", a.ip(), a.port()),
                Ok(a) => format!("nbd://{}:{}/{name}", a.ip(), a.port()),
                Err(_) => format!("nbd://localhost/{name}"),
            },
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Small replies (a write's ack) must not wait for Nagle.
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Conn {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

/// Accept and serve connections, each on a thread of its own, until
/// `stop` is set; then stop reading from every connection (a request
/// under way is finished and answered) and wait for them all. At most
/// `max_conns` at once: more are closed at once.
pub fn serve_until(
    server: Arc<Server>,
    listener: &Listener,
    stop: &AtomicBool,
    max_conns: usize,
) -> io::Result<()> {
    let mut conns: Vec<(Arc<dyn SocketLike>, JoinHandle<()>)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.fd(), 100)? {
            conns.retain(|(_, h)| !h.is_finished());
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("folio export: accept: {e}");
                continue;
            }
        };
        conns.retain(|(_, h)| !h.is_finished());
        if conns.len() >= max_conns {
            eprintln!("folio export: refusing a connection: {max_conns} already open");
            continue;
        }
        let server = Arc::clone(&server);
        let (sock, handle): (Arc<dyn SocketLike>, _) = match conn {
            Conn::Unix(s) => {
                let s = Arc::new(s);
                let t = Arc::clone(&s);
                (s, std::thread::spawn(move || report(server.serve(&*t))))
            }
            Conn::Tcp(s) => {
                let s = Arc::new(s);
                let t = Arc::clone(&s);
                (s, std::thread::spawn(move || report(server.serve(&*t))))
            }
        };
        conns.push((sock, handle));
    }
    for (s, _) in &conns {
        s.stop_reading();
    }
    for (_, h) in conns {
        let _ = h.join();
    }
    Ok(())
}

fn report(r: io::Result<()>) {
    if let Err(e) = r {
        // A client that vanished mid-stream is routine; anything else is
        // worth a line.
        if !matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
        ) {
            eprintln!("folio export: connection closed: {e}");
        }
    }
}

/// Wait up to `ms` for `fd` to be readable (a connection to accept).
#[allow(unsafe_code)]
fn readable(fd: RawFd, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that outlives the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        r if r > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}
