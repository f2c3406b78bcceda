//! Freezing the filesystems on a device (FIFREEZE/FITHAW) for a consistent
//! boot point, and making sure they are always thawed.
//!
//! A frozen filesystem blocks every writer on the server, so a freeze must
//! never outlive ferry's interest in it: every frozen filesystem is held in
//! one registry, and [`thaw_all`] (called on the normal path, by the freeze
//! watchdog, and by the signal thread before ferry exits on SIGINT, SIGTERM,
//! SIGHUP or SIGQUIT) thaws them all. Only SIGKILL can leave a freeze behind;
//! `fsfreeze -u MOUNTPOINT` lifts it.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

static FROZEN: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

/// Mount points of filesystems on `major:minor`, or on its partitions when
/// it is a whole disk.
pub fn mounts_of(major: u32, minor: u32) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let ours = format!("{major}:{minor}");
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let on_it = *dev == ours
            || std::fs::read_to_string(format!("/sys/dev/block/{dev}/../dev"))
                .is_ok_and(|parent| parent.trim() == ours)
                && Path::new(&format!("/sys/dev/block/{dev}/partition")).exists();
        if on_it {
            out.push(PathBuf::from(unescape(point)));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Freezes the filesystem mounted at `point` and registers it for thawing.
pub fn freeze(point: &Path) -> io::Result<()> {
    let dir = File::open(point)?;
    // SAFETY: FIFREEZE on a valid fd takes no argument memory.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    FROZEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((point.to_owned(), dir));
    Ok(())
}

/// Thaws every filesystem ferry froze; returns the ones that failed.
pub fn thaw_all() -> Vec<(PathBuf, io::Error)> {
    let frozen = std::mem::take(&mut *FROZEN.lock().unwrap_or_else(|e| e.into_inner()));
    let mut failed = Vec::new();
    for (point, dir) in frozen {
        // SAFETY: FITHAW on a valid fd takes no argument memory.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) } < 0 {
            let e = io::Error::last_os_error();
            // EINVAL: not frozen (any more); nothing to undo.
            if e.raw_os_error() != Some(libc::EINVAL) {
                failed.push((point, e));
            }
        }
    }
    failed
}

/// Whether anything is frozen.
pub fn any_frozen() -> bool {
    !FROZEN.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Routes SIGINT, SIGTERM, SIGHUP and SIGQUIT to a thread that thaws
/// whatever is frozen, says which signal ended the command and `then`
/// (what happens to the work), and exits with 128 + the signal number.
/// Call it before any other thread starts: threads inherit the blocked mask.
pub fn guard_signals(then: &'static str) -> io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                for (point, e) in thaw_all() {
                    eprintln!("ferry: could not thaw {}: {e}", point.display());
                }
                // A progress bar may be half drawn on the line.
                let fresh_line = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    "\r\x1b[2K"
                } else {
                    ""
                };
                eprintln!(
                    "{fresh_line}ferry: interrupted by {}; {then}",
                    signal_name(sig)
                );
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

fn signal_name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/tail\04"), r"/tail\04");
    }
}
