//! `cargo xtask demo`: ferry's main job on a scratch disk, with every command
//! printed so a reader learns the CLI. A loop device with an ext4 filesystem
//! is tracked, a standby image is seeded on this host (`file://`), files
//! change, and an incremental sync ships only the chunks written since;
//! `ferry verify` then compares both sides. It uses its own state and BPF pin
//! dirs, so it never disturbs a real installation, and removes everything it
//! made, on error and after ctrl-c too.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::mount::Mount;
use crate::rig::Rig;
use crate::setup;
use crate::standby::{self, mib, SyncReport};
use crate::util::{self, say, Cmd};

const DISK_MIB: u64 = 256;

pub fn run() -> Result<()> {
    setup::require_root("xtask demo")?;
    setup::run()?;
    let ferry = util::build_release_binary("ferry", "ferry")?;

    // The mount is declared after the rig, so it is unmounted before the rig
    // detaches the loop device and removes the work dir.
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
        "making a {DISK_MIB} MiB scratch disk: a sparse file, a loop device, ext4, some files"
    ));
    let image = work_dir.join("disk.img");
    rig.create_file(&image, DISK_MIB << 20)?;
    let device = rig.attach_loop(&image, false)?;
    Cmd::new("mkfs.ext4")
        .args([
            "-q",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &device,
        ])
        .run()?;
    let mnt = work_dir.join("mnt");
    create_dir(&mnt)?;
    let mut mount = Mount::new(&device, &mnt)?;
    let data = mnt.join("data");
    Cmd::new("mkdir").arg(&data).run()?;
    Cmd::new("cp")
        .args(["-r", "/usr/share/common-licenses"])
        .arg(mnt.join("docs"))
        .run()?;
    write_random(&data.join("photos.bin"), 24, 0)?;
    write_random(&data.join("old.bin"), 4, 0)?;
    Cmd::new("sync").run()?;
    Cmd::new("df")
        .args(["-h", "--output=source,size,used,target"])
        .arg(mount.dir())
        .run()?;

    util::step(&format!("tracking writes to {device}"));
    rig.track_add(&[])?;
    rig.ferry().args(["track", "list"]).run()?;

    let standby_dir = work_dir.join("standby");
    create_dir(&standby_dir)?;
    let target = format!("file://{}", standby_dir.join("disk.img").display());
    util::step(
        "seeding a standby image: the first sync copies the whole disk \
         (all-zero chunks are skipped)",
    );
    let seed = standby::sync(&rig, &device, &target, &[])?;

    util::step("changing files: rewriting part of one, adding one, deleting one");
    write_random(&data.join("photos.bin"), 2, 8)?;
    write_random(&data.join("new.bin"), 3, 0)?;
    Cmd::new("cp")
        .arg("/etc/os-release")
        .arg(mnt.join("docs"))
        .run()?;
    Cmd::new("rm").arg(data.join("old.bin")).run()?;
    Cmd::new("sync").run()?;
    util::step("what ferry has recorded since the seed");
    rig.ferry().args(["track", "dirty", &device]).run()?;

    util::step("unmounting, so the disk is quiet and consistent for the last sync");
    mount.unmount()?;

    util::step("incremental sync: only the chunks written since the seed");
    let incremental = standby::sync(&rig, &device, &target, &[])?;
    if incremental.mode != "incremental" {
        bail!(
            "ferry ran a {} sync where an incremental one was expected",
            incremental.mode
        );
    }

    util::step("verifying: disk and standby image compared by checksums");
    let verified = standby::verify(&rig, &device, &target, &[])?;
    verified.require_identical()?;

    util::step("the standby image is a filesystem in its own right (checked read-only)");
    Cmd::new("e2fsck")
        .args(["-f", "-n"])
        .arg(standby_dir.join("disk.img"))
        .run()?;

    util::step("stopping tracking");
    rig.track_remove()?;

    summary(&device, &target, &seed, &incremental);
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir(dir).with_context(|| format!("creating {} failed", dir.display()))
}

/// Writes `mib` MiB of random data into `path` at MiB `seek`, keeping the
/// rest of the file.
fn write_random(path: &Path, mib: u64, seek: u64) -> Result<()> {
    let mut dd = Cmd::new("dd").args([
        "if=/dev/urandom".to_owned(),
        format!("of={}", path.display()),
        "bs=1M".to_owned(),
        format!("count={mib}"),
    ]);
    if seek > 0 {
        dd = dd.args([format!("seek={seek}"), "conv=notrunc".to_owned()]);
    }
    dd.arg("status=none").run()
}

fn summary(device: &str, target: &str, seed: &SyncReport, incremental: &SyncReport) {
    util::step("summary");
    say!("{device} -> {target}");
    say!(
        "{:<12} {:>12} {:>12} {:>14} {:>9}",
        "sync",
        "covered",
        "sent",
        "zeros skipped",
        "time"
    );
    for report in [seed, incremental] {
        say!(
            "{:<12} {:>12} {:>12} {:>14} {:>7.2} s",
            report.mode,
            mib(report.changed_bytes),
            mib(report.sent_bytes),
            mib(report.zero_bytes),
            report.wall_secs
        );
    }
    say!("verify: identical");
    say!("everything this demo made is removed below");
}
