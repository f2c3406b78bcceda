//! Small fd-level wrappers: non-blocking mode, `poll`, pipe and socket
//! buffer sizes.

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

/// Asks for a send buffer of `bytes` on a socket (best effort): beyond
/// `/proc/sys/net/core/wmem_max` only with CAP_NET_ADMIN, else capped there.
pub fn grow_send_buffer(fd: BorrowedFd<'_>, bytes: usize) {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a valid borrowed fd reads one c_int from a
        // live local, whose size is passed with it.
        let done = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            return;
        }
    }
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

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    fn send_buffer(fd: BorrowedFd<'_>) -> usize {
        let mut bytes: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local
        // and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::from_mut(&mut bytes).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        usize::try_from(bytes).unwrap()
    }

    #[test]
    fn a_send_buffer_grows_as_far_as_allowed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let before = send_buffer(a.as_fd());
        grow_send_buffer(a.as_fd(), 1 << 20);
        let after = send_buffer(a.as_fd());
        // The kernel doubles what it is asked for, for its bookkeeping.
        // Without CAP_NET_ADMIN the request is capped at wmem_max.
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let floor = if crate::sys::is_root() {
            2 << 20
        } else {
            (2 * wmem_max).min(2 << 20)
        };
        assert!(
            after >= floor.max(before),
            "send buffer {before} -> {after}, expected at least {floor}"
        );
    }
}
