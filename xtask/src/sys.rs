//! The few raw libc calls xtask needs, behind safe wrappers: the effective
//! uid, interrupt handling, asking a child process to stop and pinning
//! processes to CPUs.
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

/// A set of CPUs, for pinning a process and what it starts.
#[derive(Clone)]
pub struct Cpus(libc::cpu_set_t);

impl Cpus {
    /// The CPUs this process may run on.
    pub fn allowed() -> Result<Self> {
        // SAFETY: an all-zero `cpu_set_t` is the empty set, a valid value.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live `cpu_set_t` and the size passed is its own.
        let failed = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0
        };
        if failed {
            bail!(
                "reading this process's CPUs failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(set))
    }

    /// The set holding `cpus`, each below CPU_SETSIZE.
    pub fn of(cpus: &[usize]) -> Self {
        // SAFETY: an all-zero `cpu_set_t` is the empty set, a valid value.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            assert!(
                cpu < libc::CPU_SETSIZE as usize,
                "CPU {cpu} is out of range"
            );
            // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        Self(set)
    }

    /// The CPUs in the set, in order.
    pub fn list(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
            .collect()
    }

    /// Pins the calling thread, and so whatever it starts from now on, to
    /// these CPUs. Only a system call: safe between fork and exec.
    pub fn pin_this_thread(&self) -> std::io::Result<()> {
        // SAFETY: `self.0` is a live `cpu_set_t` and the size passed is its
        // own; pid 0 is the calling thread.
        let failed = unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) != 0
        };
        if failed {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Display for Cpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.list().iter().map(usize::to_string).collect();
        write!(f, "{}", names.join(","))
    }
}
