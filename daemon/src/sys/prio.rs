//! CPU and I/O scheduling priorities of threads: `setpriority(2)` and
//! `ioprio_set(2)`.
//!
//! Linux keeps both per thread, and a new thread inherits its creator's, so
//! "the whole process" means every thread that exists now (listed in
//! `/proc/self/task`) plus the ones they create later.

use std::io;

/// `IOPRIO_CLASS_BE`: best effort, levels 0 (highest) to 7.
pub const IOPRIO_CLASS_BE: u16 = 2;
/// `IOPRIO_CLASS_IDLE`: only when the disk is otherwise idle.
pub const IOPRIO_CLASS_IDLE: u16 = 3;
const IOPRIO_CLASS_SHIFT: u16 = 13;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;

/// The kernel's encoding of a class and level (as in an SQE's `ioprio`).
pub const fn ioprio_value(class: u16, level: u16) -> u16 {
    (class << IOPRIO_CLASS_SHIFT) | (level & 0x7)
}

/// Thread ids of this process.
fn thread_ids() -> io::Result<Vec<libc::pid_t>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// Runs `f` for every thread, ignoring threads that exited meanwhile.
fn for_each_thread(f: impl Fn(libc::pid_t) -> io::Result<()>) -> io::Result<()> {
    for tid in thread_ids()? {
        match f(tid) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Sets the I/O priority of thread `tid` (0 = the calling thread).
pub fn set_thread_ioprio(tid: libc::pid_t, value: u16) -> io::Result<()> {
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid,
            libc::c_int::from(value),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The I/O priority of thread `tid` (0 = the calling thread).
pub fn thread_ioprio(tid: libc::pid_t) -> io::Result<u16> {
    // SAFETY: ioprio_get takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u16)
}

/// Sets the I/O priority of every thread of the process.
pub fn set_process_ioprio(value: u16) -> io::Result<()> {
    for_each_thread(|tid| set_thread_ioprio(tid, value))
}

/// Sets the nice value of thread `tid` (0 = the calling thread).
pub fn set_thread_nice(tid: libc::pid_t, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes integers only; on Linux, PRIO_PROCESS with a
    // thread id applies to that one thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The nice value of thread `tid` (0 = the calling thread).
pub fn thread_nice(tid: libc::pid_t) -> io::Result<i32> {
    // getpriority can return -1 legitimately: errno tells the error apart.
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority takes integers only.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if nice == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(0) {
            return Err(err);
        }
    }
    Ok(nice)
}

/// Sets the nice value of every thread of the process.
pub fn set_process_nice(nice: i32) -> io::Result<()> {
    for_each_thread(|tid| set_thread_nice(tid, nice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ioprio_round_trips() {
        std::thread::spawn(|| {
            let be7 = ioprio_value(IOPRIO_CLASS_BE, 7);
            set_thread_ioprio(0, be7).unwrap();
            assert_eq!(thread_ioprio(0).unwrap(), be7);
            let idle = ioprio_value(IOPRIO_CLASS_IDLE, 0);
            set_thread_ioprio(0, idle).unwrap();
            assert_eq!(thread_ioprio(0).unwrap(), idle);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn thread_nice_round_trips() {
        std::thread::spawn(|| {
            set_thread_nice(0, 7).unwrap();
            assert_eq!(thread_nice(0).unwrap(), 7);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn bad_ioprio_is_refused() {
        // Class 7 does not exist.
        let err = set_thread_ioprio(0, 7 << IOPRIO_CLASS_SHIFT).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
