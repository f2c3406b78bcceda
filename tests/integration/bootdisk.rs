//! A bootable source disk: a loop device with an MBR, one active partition
//! holding ext4 with extlinux, the Debian cloud kernel and a busybox
//! initramfs. The initramfs's `/init` mounts the partition read-only,
//! prints `FERRY-MARKER:` and the content of `/marker` on it to the serial
//! console, and powers off: a boot under TCG takes a few seconds.
//!
//! The kernel and its virtio modules come from `cargo xtask setup`
//! (`target/boot-assets/`, or `FERRY_BOOT_ASSETS`).

use std::{
    os::unix::fs::{FileExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use crate::util::{run, unique, LoopDev, TempDir};

const MIB: u64 = 1 << 20;
/// Where the syslinux packages put the MBR boot code.
const MBR_BINS: &[&str] = &["/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/EXTLINUX/mbr.bin"];
const BUSYBOX: &str = "/bin/busybox";

/// The boot test's kernel, modules and tools.
pub struct Assets {
    vmlinuz: PathBuf,
    modules: PathBuf,
    mbr: PathBuf,
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The assets, or `None` with a printed reason when they are missing
/// outside CI. Under CI (`CI` set) a missing asset fails the test:
/// `cargo xtask setup` installs all of them.
pub fn assets(test: &str) -> Option<Assets> {
    let dir = match std::env::var_os("FERRY_BOOT_ASSETS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/boot-assets"),
    };
    let modules = dir.join("modules");
    let mbr = MBR_BINS.iter().map(PathBuf::from).find(|p| p.is_file());
    let mut missing: Vec<String> = Vec::new();
    for file in [dir.join("vmlinuz"), modules.join("load-order")] {
        if !file.is_file() {
            missing.push(file.display().to_string());
        }
    }
    if let Ok(order) = std::fs::read_to_string(modules.join("load-order")) {
        for m in order.split_whitespace() {
            let ko = modules.join(format!("{m}.ko"));
            if !ko.is_file() {
                missing.push(ko.display().to_string());
            }
        }
    }
    if mbr.is_none() {
        missing.push("syslinux's mbr.bin (syslinux-common)".into());
    }
    if !Path::new(BUSYBOX).is_file() {
        missing.push(format!("{BUSYBOX} (busybox-static)"));
    }
    for tool in ["extlinux", "cpio", "qemu-system-x86_64"] {
        if !on_path(tool) {
            missing.push(tool.into());
        }
    }
    if missing.is_empty() {
        return Some(Assets {
            vmlinuz: dir.join("vmlinuz"),
            modules,
            mbr: mbr.expect("checked"),
        });
    }
    let why = format!(
        "boot test assets missing (run `cargo xtask setup`): {}",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}, but CI must run the boot test");
    }
    eprintln!("skipped {test}: {why}");
    None
}

/// `/init` of the initramfs: load the virtio modules, wait for the disk,
/// print the marker, power off. Every failure prints a `FERRY-ERROR:` line,
/// so a failed boot says why in the console tail.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
for m in $(cat /modules/load-order); do
  insmod /modules/$m.ko || echo "FERRY-ERROR: insmod $m failed"
done
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if mount -t ext4 -o ro /dev/vda1 /mnt; then
  echo "FERRY-MARKER:$(cat /mnt/marker)"
  umount /mnt
else
  echo "FERRY-ERROR: cannot mount /dev/vda1"
fi
poweroff -f
"#;

const EXTLINUX_CONF: &str = "DEFAULT ferry\nPROMPT 0\nTIMEOUT 0\n\
LABEL ferry\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.gz\n  APPEND console=ttyS0 quiet\n";

/// The bootable disk; the partition is unmounted between calls, and the
/// loop device is detached on drop (after an unmount if a panic left it
/// mounted).
pub struct BootDisk {
    pub dev: LoopDev,
    mnt: PathBuf,
}

impl BootDisk {
    /// A 64 MiB disk whose `/marker` holds `marker`.
    pub fn new(assets: &Assets, marker: &str) -> Self {
        let dev = LoopDev::with_table(64 * MIB, "label: dos\nstart=2048, type=83, bootable\n");
        let mnt = PathBuf::from("/dev/shm").join(unique("ferry-it-boot"));
        std::fs::create_dir_all(&mnt).unwrap();
        let disk = Self { dev, mnt };
        let p1 = disk.dev.partition(1);
        run(
            "mkfs.ext4",
            &["-q", "-F", "-L", "ferryboot", p1.to_str().unwrap()],
        );
        // The MBR's boot code (not its partition table): it boots the
        // active partition's extlinux.
        let code = std::fs::read(&assets.mbr).unwrap();
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.dev.path)
            .unwrap();
        dev.write_all_at(&code[..440], 0).unwrap();
        dev.sync_all().unwrap();

        disk.mount();
        let boot = disk.mnt.join("boot");
        std::fs::create_dir(&boot).unwrap();
        std::fs::copy(&assets.vmlinuz, boot.join("vmlinuz")).unwrap();
        initramfs(assets, &boot.join("initrd.gz"));
        std::fs::write(boot.join("extlinux.conf"), EXTLINUX_CONF).unwrap();
        run("extlinux", &["--install", boot.to_str().unwrap()]);
        std::fs::write(disk.mnt.join("marker"), marker).unwrap();
        disk.unmount();
        disk
    }

    /// Replaces `/marker` (mounts, writes, unmounts: every block is on
    /// the disk when this returns).
    pub fn set_marker(&self, marker: &str) {
        self.mount();
        std::fs::write(self.mnt.join("marker"), marker).unwrap();
        self.unmount();
    }

    /// The whole disk, the source ferry syncs.
    pub fn arg(&self) -> &str {
        self.dev.arg()
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                self.dev.partition(1).to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        );
    }

    fn unmount(&self) {
        run("umount", &[self.mnt.to_str().unwrap()]);
    }
}

impl Drop for BootDisk {
    fn drop(&mut self) {
        // Mounted only if a panic came between mount and unmount.
        let _ = Command::new("umount")
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Writes a gzipped newc cpio with busybox, the modules and `/init`.
fn initramfs(assets: &Assets, out: &Path) {
    let root = TempDir::new();
    for d in ["bin", "dev", "proc", "mnt", "modules"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for entry in std::fs::read_dir(&assets.modules).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, root.join("modules").join(p.file_name().unwrap())).unwrap();
    }
    let init = root.join("init");
    std::fs::write(&init, INIT).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; cd "$1" && find . | cpio -o -H newc --quiet | gzip -9n > "$2""#)
        .arg("bash")
        .arg(&root.path)
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "building the initramfs failed");
}
