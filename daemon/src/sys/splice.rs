//! Handing bytes to a local stream socket by reference. `vmsplice` puts the
//! caller's pages in a pipe, `splice` moves them on into the socket, and
//! the reader at the other end (`ssh`, or a local agent) copies them out of
//! those very pages. The sender's copy into the socket is gone; in exchange
//! the bytes must not change until the peer has read them, which
//! [`unread`] bounds.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// Bytes a pipe is asked to hold: a whole long read at once.
const PIPE_BYTES: usize = 1 << 20;

/// A pipe to splice through.
pub struct Splicer {
    read: OwnedFd,
    write: OwnedFd,
    /// A send failed part way, so the pipe may hold bytes of it.
    broken: bool,
}

impl Splicer {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a live array of two ints, as pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        super::fd::grow_pipe(write.as_fd(), PIPE_BYTES);
        Ok(Self {
            read,
            write,
            broken: false,
        })
    }

    /// Sends all of `bytes` into `socket` by reference, blocking as a write
    /// would. The peer reads the pages of `bytes` themselves: they must not
    /// change until [`unread`] shows the peer has read them, or it reads
    /// what they became. A failure leaves the splicer unusable.
    pub fn send(&mut self, socket: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("an earlier splice into the link failed"));
        }
        self.broken = true;
        let mut rest = bytes;
        while !rest.is_empty() {
            let iov = libc::iovec {
                iov_base: rest.as_ptr().cast_mut().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes `rest`, live for this call; without
            // SPLICE_F_GIFT the kernel only takes references to its pages.
            let moved = unsafe { libc::vmsplice(self.write.as_raw_fd(), &iov, 1, 0) };
            let mut in_pipe = match usize::try_from(moved) {
                Ok(0) => return Err(io::Error::other("vmsplice moved nothing")),
                Ok(n) => n,
                Err(_) => match io::Error::last_os_error() {
                    e if e.kind() == io::ErrorKind::Interrupted => continue,
                    e => return Err(e),
                },
            };
            rest = &rest[in_pipe..];
            while in_pipe > 0 {
                // SAFETY: plain fds and null offsets (neither end seeks);
                // no memory of ours is passed.
                let spliced = unsafe {
                    libc::splice(
                        self.read.as_raw_fd(),
                        std::ptr::null_mut(),
                        socket.as_raw_fd(),
                        std::ptr::null_mut(),
                        in_pipe,
                        libc::SPLICE_F_MOVE,
                    )
                };
                match usize::try_from(spliced) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => in_pipe -= n,
                    Err(_) => match io::Error::last_os_error() {
                        e if e.kind() == io::ErrorKind::Interrupted => {}
                        e => return Err(e),
                    },
                }
            }
        }
        self.broken = false;
        Ok(())
    }
}

/// An upper bound on the bytes written to `socket` (a local stream socket)
/// that its peer has not read yet: the kernel counts each queued buffer
/// with its bookkeeping.
pub fn unread(socket: BorrowedFd<'_>) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (the same number as TIOCOUTQ) writes one c_int,
    // into a live local.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(queued).map_err(|_| io::Error::other("negative send queue"))
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::unix::net::UnixStream};

    use super::*;

    #[test]
    fn spliced_bytes_arrive_and_are_counted_unread_until_read() {
        let (tx, mut rx) = UnixStream::pair().unwrap();
        super::super::fd::grow_send_buffer(tx.as_fd(), 4 << 20);
        let sent: Vec<u8> = (0..(3 << 20) / 2)
            .map(|i: u32| (i * 7 % 251) as u8)
            .collect();
        let mut splicer = Splicer::new().unwrap();
        assert_eq!(unread(tx.as_fd()).unwrap(), 0);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; (3 << 20) / 2];
            rx.read_exact(&mut got[..4096]).unwrap();
            // Hold back the rest until the sender has looked at the queue.
            std::thread::sleep(std::time::Duration::from_millis(200));
            rx.read_exact(&mut got[4096..]).unwrap();
            got
        });
        splicer.send(tx.as_fd(), &sent[..4096]).unwrap();
        splicer.send(tx.as_fd(), &sent[4096..]).unwrap();
        let queued = unread(tx.as_fd()).unwrap();
        assert!(queued >= sent.len() - 4096, "{queued} bytes unread");
        assert_eq!(reader.join().unwrap(), sent);
        assert_eq!(unread(tx.as_fd()).unwrap(), 0);
    }

    #[test]
    fn the_peer_reads_the_senders_pages_themselves() {
        // Why a sender must hold its bytes until they are read.
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let mut page = vec![b'a'; 4096];
        Splicer::new().unwrap().send(tx.as_fd(), &page).unwrap();
        page.fill(b'b');
        let mut got = vec![0; 4096];
        rx.read_exact(&mut got).unwrap();
        assert_eq!(got, page);
    }
}
