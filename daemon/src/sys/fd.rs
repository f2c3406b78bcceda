//! Small fd-level wrappers: non-blocking mode, `poll`, pipe capacity.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    time::Duration,
};

/// Puts `fd` into non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a valid borrowed fd; no memory passed.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for a bigger pipe buffer (best effort: the kernel caps it at
/// `/proc/sys/fs/pipe-max-size`). Fewer, larger transfers between the
/// pipeline and the transport.
pub fn grow_pipe(fd: BorrowedFd<'_>, bytes: usize) {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ on a valid borrowed fd takes an int by value.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) };
}

/// What to wait for on one fd.
#[derive(Clone, Copy, Debug, Default)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

/// Waits until one of `fds` is ready as asked, or `timeout` passes.
/// Interrupted waits return early; callers loop anyway.
pub fn poll(fds: &[(BorrowedFd<'_>, Interest)], timeout: Duration) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, i)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: (if i.read { libc::POLLIN } else { 0 })
                | (if i.write { libc::POLLOUT } else { 0 }),
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfds` is a valid, initialised array of `pfds.len()` pollfd
    // structs that outlives the call; every fd is borrowed, hence open.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}
