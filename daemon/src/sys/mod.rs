//! The only place that calls libc or raw syscalls. Everything above uses the
//! safe wrappers here.

pub mod blk;
pub mod bpf;
pub mod fd;
pub mod freeze;
pub mod fs;
pub mod mmap;
pub mod prio;
pub mod uring;

use std::io;

/// Whether the process runs with root's effective uid.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Online CPUs as the kernel numbers per-CPU map slots (`possible` CPUs).
pub fn possible_cpus() -> io::Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| e)
}

/// This boot's random id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// Takes an exclusive `flock` on `file`, waiting for the holder to let go.
pub fn flock_exclusive(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Tries to take an exclusive `flock` on `file` without waiting; `false`
/// when another open file holds it.
pub fn flock_try_exclusive(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}
