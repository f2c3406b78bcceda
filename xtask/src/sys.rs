//! The few raw libc calls xtask needs, behind safe wrappers: the effective
//! uid, interrupt handling and asking a child process to stop.
//!
//! Interrupts: SIGINT, SIGTERM and SIGHUP only set a flag. Whoever is waiting
//! on a child notices it, stops the child and returns an error, so the
//! callers' `Drop` guards get to detach loop devices and remove pin dirs. A
//! second signal exits at once, for when clean-up itself hangs.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Result};

static SIGNALS_SEEN: AtomicUsize = AtomicUsize::new(0);

/// Exit status of a process ended by SIGINT, as shells report it.
const FORCED_EXIT_STATUS: libc::c_int = 130;

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only async-signal-safe work here: an atomic add and `_exit`.
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) > 0 {
        // SAFETY: `_exit` is async-signal-safe and takes no pointers; skipping
        // destructors is the point of a second interrupt.
        unsafe { libc::_exit(FORCED_EXIT_STATUS) };
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP to the flag read by [`interrupted`].
pub fn install_interrupt_handler() -> Result<()> {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `handler` is an `extern "C" fn(c_int)` that lives for the
        // whole program and only does async-signal-safe work. The zeroed
        // `sigaction` is a valid value (empty mask, no flags) before we fill it.
        let failed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) != 0
        };
        if failed {
            bail!(
                "installing a handler for signal {signal} failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// True once SIGINT, SIGTERM or SIGHUP has arrived.
pub fn interrupted() -> bool {
    SIGNALS_SEEN.load(Ordering::SeqCst) > 0
}

/// Asks a child to stop with SIGTERM. The caller must not have reaped it yet,
/// so the pid cannot have been reused.
pub fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: `kill` takes no pointers; the caller guarantees `pid` is its own
    // unreaped child. A failure (it already exited) needs no handling.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// The effective user id is 0.
pub fn is_root() -> bool {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
