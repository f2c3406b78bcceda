//! `cargo xtask demo`: the tracker at work on a scratch loop device, with
//! every command printed so a reader learns the CLI. It uses its own state
//! and BPF pin dirs, so it never disturbs a real installation.

use std::path::PathBuf;

use anyhow::Result;

use crate::rig::Rig;
use crate::setup;
use crate::util::{self, say, Cmd};

const DISK_MIB: u64 = 256;

pub fn run() -> Result<()> {
    setup::require_root("xtask demo")?;
    setup::run()?;
    let ferry = util::build_release_binary("ferry", "ferry")?;

    let pid = std::process::id();
    let work_dir = PathBuf::from(format!("/var/tmp/ferry-demo-{pid}"));
    let mut rig = Rig::new(
        ferry.clone(),
        &work_dir,
        PathBuf::from(format!("/sys/fs/bpf/ferry-demo-{pid}")),
    )?;
    say!(
        "(`ferry` below is {}; --state-dir and --bpf-dir keep this demo apart from \
         a real installation, which uses the defaults)",
        ferry.display()
    );

    util::step(&format!(
        "making a {DISK_MIB} MiB sparse file and a loop device"
    ));
    let image = work_dir.join("disk.img");
    rig.create_file(&image, DISK_MIB << 20)?;
    say!(
        "created {} ({DISK_MIB} MiB, no blocks allocated)",
        image.display()
    );
    let device = rig.attach_loop(&image, false)?;

    util::step(&format!("tracking writes to {device} (default chunk size)"));
    rig.track_add(&[])?;
    rig.ferry().args(["track", "list"]).run()?;

    util::step(
        "writing 16 blocks of 4 KiB at 400 KiB, 300 blocks at 40000 KiB, \
         and discarding 4 MiB at 128 MiB",
    );
    dd(&device, 100, 16)?;
    dd(&device, 10_000, 300)?;
    Cmd::new("blkdiscard")
        .args(["-o", "128MiB", "-l", "4MiB", &device])
        .run()?;

    util::step("what ferry recorded: the dirty chunks, and the counters");
    rig.ferry().args(["track", "dirty", &device]).run()?;
    rig.ferry().args(["track", "list"]).run()?;
    rig.ferry()
        .args(["track", "dirty", &device, "--json"])
        .run()?;

    util::step("draining the dirty set (as a sync does), after which it is empty");
    rig.ferry().args(["track", "drain", &device]).run()?;
    rig.ferry().args(["track", "dirty", &device]).run()?;

    util::step("stopping tracking");
    rig.track_remove()?;
    Ok(())
}

/// Writes `count` random 4 KiB blocks at block `seek`, bypassing the page
/// cache so each write reaches the device at once.
fn dd(device: &str, seek: u64, count: u64) -> Result<()> {
    Cmd::new("dd")
        .args([
            "if=/dev/urandom".to_owned(),
            format!("of={device}"),
            "bs=4k".to_owned(),
            format!("count={count}"),
            format!("seek={seek}"),
            "oflag=direct".to_owned(),
            "conv=notrunc".to_owned(),
        ])
        .run()
}
