//! Developer tasks for ferry, run as `cargo xtask <task>`: installing what a
//! fresh machine lacks, the CI test run, whole-system benches and a demo.

mod bench;
mod bench_sync;
mod boot_assets;
mod cpu;
mod demo;
mod hosts;
mod mount;
mod rig;
mod setup;
mod sshd;
mod standby;
mod sys;
mod test;
mod util;
mod workload;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about,
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks (apt packages, qemu from
    /// backports and a cloud kernel for the boot test, rust-src, bpf-linker
    /// for LLVM 22, bpffs); skips what is already there
    Setup,
    /// Run setup, then cargo fmt --check, clippy and all tests (as CI does)
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        cargo_test_args: Vec<String>,
    },
    /// Whole-system benchmarks
    #[command(subcommand)]
    Bench(Bench),
    /// Show ferry at work on a scratch disk: track it, seed a standby image,
    /// change files, sync only what changed, verify
    Demo,
}

#[derive(Subcommand)]
enum Bench {
    /// fio random writes to a RAM-backed loop device, without and with
    /// tracking, and the time per BPF program run
    TrackerOverhead(bench::TrackerOverheadArgs),
    /// Bring a standby up to date over a real sshd after 1% churn with ferry,
    /// rsync and a full copy; and ferry after 100% churn against the physical
    /// limit (source read, ssh throughput)
    Sync(bench_sync::SyncArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Before any thread exists: changes our own environment.
    setup::put_cargo_bin_on_path();
    sys::install_interrupt_handler()?;
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => test::run(&cargo_test_args),
        Task::Bench(Bench::TrackerOverhead(args)) => bench::tracker_overhead(&args),
        Task::Bench(Bench::Sync(args)) => bench_sync::run(&args),
        Task::Demo => demo::run(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_forwards_everything_after_the_double_dash() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "dirty", "--", "--nocapture"]);
        let args = match cli.map(|cli| cli.task) {
            Ok(Task::Test { cargo_test_args }) => cargo_test_args,
            _ => Vec::new(),
        };
        assert_eq!(args, ["dirty", "--", "--nocapture"]);
    }
}
