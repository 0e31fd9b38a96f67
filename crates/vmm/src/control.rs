//! The control endpoint of a running VM: a Unix socket named `control` in
//! the VM's node directory ([`crate::devmem::vm_dir`]), beside its
//! device-memory nodes, so that other processes of the same user reach a
//! VM by its name (the job of bhyve's `vmmctl`).
//!
//! The protocol is one request line, one response: the client writes a
//! command and a newline, the server writes its answer and closes the
//! connection. Commands are words (`inspect`, `framebuffer`, ...); what
//! they answer is the VMM's business ([`serve`] takes the handler). The
//! socket goes with the directory when the VM goes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 256;

/// The socket's path in a VM's node directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control")
}

/// Binds the control socket in `dir` (mode 0600 through the directory's
/// 0700).
pub fn bind(dir: &Path) -> Result<UnixListener> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|e| Error::Io("bind control socket", e.kind(), e.raw_os_error()))?;
    l.set_nonblocking(true).map_err(|e| Error::Io("control socket", e.kind(), e.raw_os_error()))?;
    Ok(l)
}

/// Serves requests on `listener` until `stop` is set: each connection's
/// first line (at most [`MAX_REQUEST`] bytes, trimmed) goes to `handler`,
/// whose answer is written back. A client that sends nothing for a second
/// is dropped; no client can stall the server for longer.
pub fn serve(listener: &UnixListener, stop: &AtomicBool, handler: &dyn Fn(&str) -> String) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer(stream, handler);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn answer(stream: UnixStream, handler: &dyn Fn(&str) -> String) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST as u64)).read_line(&mut line)?;
    let reply = handler(line.trim());
    (&stream).write_all(reply.as_bytes())?;
    // Close our side first, then drain what the client still sends (a
    // request longer than the limit): closing with unread data would reset
    // the connection before the client read the answer.
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = io::copy(&mut (&stream).take(1 << 16), &mut io::sink());
    Ok(())
}

/// Sends `command` to the VM named `vm` and returns its answer.
/// [`Error::NoSuchNode`] when no such VM is running.
pub fn request(vm: &str, command: &str) -> Result<String> {
    request_with_timeout(vm, command, Duration::from_secs(10))
}

/// [`request`], waiting up to `timeout` for the answer (a command that
/// answers when it is done, as a live migration's `migrate ADDR`).
pub fn request_with_timeout(vm: &str, command: &str, timeout: Duration) -> Result<String> {
    crate::devmem::check_name(vm).map_err(Error::BadVmName)?;
    let path = socket_path(&crate::devmem::vm_dir(vm));
    let mut s = UnixStream::connect(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Error::NoSuchNode,
        k => Error::Io("connect control socket", k, e.raw_os_error()),
    })?;
    let io = |e: io::Error| Error::Io("control request", e.kind(), e.raw_os_error());
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(command.as_bytes()).map_err(io)?;
    s.write_all(b"\n").map_err(io)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(io)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer() {
        let name = format!("ctl{}", std::process::id());
        let dir = crate::devmem::VmDir::create(&name).unwrap();
        let l = bind(dir.path()).unwrap();
        let stop = AtomicBool::new(false);
        let (a, b) = std::thread::scope(|s| {
            s.spawn(|| serve(&l, &stop, &|cmd| format!("got {cmd}")));
            let a = request(&name, "inspect");
            // An over-long request is cut, not buffered without end.
            let b = request(&name, &"x".repeat(10_000));
            stop.store(true, Ordering::SeqCst);
            (a, b)
        });
        assert_eq!(a.unwrap(), "got inspect");
        assert_eq!(b.unwrap().len(), 4 + MAX_REQUEST);
        assert_eq!(request("no-such-vm-here", "inspect").unwrap_err(), Error::NoSuchNode);
        assert!(matches!(request("../x", "inspect").unwrap_err(), Error::BadVmName(_)));
    }
}
