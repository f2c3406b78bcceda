//! `cargo xtask test`: everything CI checks, in order, stopping at the first
//! failure: formatting, clippy, then all tests (unit, property and the
//! root-only integration tests of `ferry-tests`).
//!
//! The eBPF crate is excluded from clippy and `cargo test`: it only builds for
//! the BPF target, and `daemon/build.rs` builds it anyway.

use anyhow::{Context, Result};

use crate::util::{self, say, Cmd};
use crate::{boot_assets, setup};

pub fn run(cargo_test_args: &[String]) -> Result<()> {
    setup::require_root("xtask test")?;
    setup::run().context("xtask test: setup failed")?;
    let steps: [(&str, Cmd); 3] = [
        ("format", util::cargo().args(["fmt", "--all", "--check"])),
        (
            "clippy",
            util::cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "tracker-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        (
            "tests",
            util::cargo()
                .env("FERRY_BOOT_ASSETS", boot_assets::assets_dir())
                .args(["test", "--workspace", "--exclude", "tracker-ebpf"])
                .args(cargo_test_args),
        ),
    ];
    for (i, (name, cmd)) in steps.iter().enumerate() {
        util::step(&format!("step {}/{}: {name}", i + 1, steps.len()));
        cmd.run()
            .with_context(|| format!("xtask test: step `{name}` failed"))?;
    }
    say!("xtask test: all steps passed");
    Ok(())
}
