//! The only place that calls libc or raw syscalls. Everything above uses the
//! safe wrappers here.

pub mod blk;
pub mod bpf;
pub mod fd;
pub mod freeze;
pub mod fs;
pub mod mmap;
pub mod prio;
pub mod ringmem;
pub mod splice;
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
