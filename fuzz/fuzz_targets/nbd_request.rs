//! An NBD client's whole byte stream (handshake, options, requests)
//! against the server over a socket pair, with a small in-memory export.
#![no_main]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use folio_nbd::{BouncePool, Export, ExportConfig, Server};
use libfuzzer_sys::fuzz_target;

struct Mem(Mutex<Vec<u8>>);

impl Export for Mem {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }
    fn zero(&self, offset: u64, len: u64, _punch: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn extent(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        Ok((len.min(4096 - offset % 4096), offset % 8192 >= 4096))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((client, server_end)) = UnixStream::pair() else {
        return;
    };
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || {
        let mut c = client;
        let _ = c.write_all(&input);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    });
    let export = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 20])));
    let config = ExportConfig {
        name: "fuzz".into(),
        description: String::new(),
        read_only: false,
        transform: None,
    };
    let server = Server::new(export, config, BouncePool::new(1, 64 << 10));
    let _ = server.serve(&server_end);
    drop(server_end);
    let _ = feeder.join();
});
