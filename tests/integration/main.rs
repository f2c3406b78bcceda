//! ferry's integration tests: real loop devices, the real eBPF program, the
//! real `ferry` binary. Tests that need root or BPF skip with a printed
//! reason only when the capability is truly missing; under CI they run.

mod bad_input;
mod boot;
mod bootdisk;
mod bootpoints;
mod sshd;
mod sync;
mod torture;
mod track;
mod util;
