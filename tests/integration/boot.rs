//! The standby must boot. A real bootable disk (extlinux, the Debian cloud
//! kernel, a busybox initramfs that prints the content of `/marker`) is
//! synced with boot points into each format, and `ferry boot-test` boots
//! the working image and an older boot point under qemu: each must show
//! its own marker. A text the console never shows must fail, so the test
//! can fail.

use std::{process::Output, time::Duration};

use crate::{
    bootdisk::{assets, Assets, BootDisk},
    sshd::Sshd,
    util::{privileged, Ferry, TempDir},
};

/// TCG boots the disk in about 5 s on an idle machine; other tests share
/// the two cores.
const BOOT_TIMEOUT: &str = "180";

fn ready(test: &str) -> Option<Assets> {
    if !privileged(test) {
        return None;
    }
    assets(test)
}

/// A source disk, a target directory and a private ferry.
struct Rig {
    disk: BootDisk,
    dir: TempDir,
    f: Ferry,
    url: String,
}

impl Rig {
    fn new(assets: &Assets, image: &str) -> Self {
        let disk = BootDisk::new(assets, "old");
        let dir = TempDir::new();
        let url = format!("file://{}", dir.join(image).display());
        Self {
            disk,
            dir,
            f: Ferry::new(),
            url,
        }
    }

    fn sync(&self) {
        self.f.ok(&["sync", self.disk.arg(), &self.url]);
    }

    /// Syncs and ends with a boot point; returns its name.
    fn sync_boot_point(&self) -> String {
        let s = self
            .f
            .json(&["sync", self.disk.arg(), &self.url, "--boot-point"]);
        let name = s["boot_point"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no boot point taken: {s}"))
            .to_owned();
        // Boot point names have one-second resolution.
        std::thread::sleep(Duration::from_millis(1100));
        name
    }

    fn boot_test(&self, point: Option<&str>, expect: &str) -> Output {
        self.boot_test_at(&self.url, &[], point, expect)
    }

    /// `ferry boot-test URL [POINT] --expect EXPECT EXTRA...`.
    fn boot_test_at(
        &self,
        url: &str,
        extra: &[String],
        point: Option<&str>,
        expect: &str,
    ) -> Output {
        let mut args = vec!["boot-test", url];
        args.extend(point);
        args.extend(["--expect", expect, "--timeout", BOOT_TIMEOUT]);
        args.extend(extra.iter().map(String::as_str));
        self.f.output(&args)
    }

    fn boots(&self, point: Option<&str>, expect: &str) {
        passed(&self.boot_test(point, expect), point, expect);
    }
}

/// `ferry boot-test` passed: exit 0 and a `pass:` line.
fn passed(out: &Output, point: Option<&str>, expect: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code() == Some(0) && stdout.starts_with("pass: "),
        "boot-test {point:?} --expect {expect} should pass ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.lines().next().unwrap_or_default());
}

/// Raw: the working image shows the new marker, the first boot point the
/// old one, and a marker nobody wrote fails with exit 1 after a boot that
/// did show the real one.
#[test]
fn boot_test_raw_working_image_and_boot_point() {
    let Some(a) = ready("boot_test_raw_working_image_and_boot_point") else {
        return;
    };
    let rig = Rig::new(&a, "web.img");
    let first = rig.sync_boot_point();
    rig.disk.set_marker("new");
    rig.sync_boot_point();
    rig.boots(None, "FERRY-MARKER:new");
    rig.boots(Some(&first), "FERRY-MARKER:old");

    let out = rig.boot_test(None, "FERRY-MARKER:nope");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("fail: "), "{stdout}");
    assert!(
        stdout.contains("the guest stopped without showing"),
        "{stdout}"
    );
    // It booted and showed the marker it has: the failure is the text's.
    assert!(stdout.contains("\nFERRY-MARKER:new\n"), "{stdout}");

    // Errors exit 2 with one line: a boot point that does not exist, and
    // an image a sync holds (its lock taken here).
    let out = rig.boot_test(Some("V19990101_000000"), "FERRY-MARKER:old");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no boot point named"), "{stderr}");
    let lock = std::fs::File::open(rig.dir.join("web.img.ferry.lock")).unwrap();
    assert!(ferry::sys::fs::try_lock_exclusive(&lock).unwrap());
    let out = rig.boot_test(None, "FERRY-MARKER:new");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("in use by another ferry session"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// qcow2: the working image boots as it is; a boot point is an internal
/// snapshot, copied out by qemu-img and booted.
#[test]
fn boot_test_qcow2_working_image_and_boot_point() {
    let Some(a) = ready("boot_test_qcow2_working_image_and_boot_point") else {
        return;
    };
    let rig = Rig::new(&a, "web.qcow2");
    let first = rig.sync_boot_point();
    rig.disk.set_marker("new");
    rig.sync_boot_point();
    rig.boots(None, "FERRY-MARKER:new");
    rig.boots(Some(&first), "FERRY-MARKER:old");

    // Over SSH the agent boots it on the target host: the boot point is
    // copied out there and booted, and errors still come back as one line.
    let sshd = Sshd::start();
    let url = sshd.url(&rig.dir.join("web.qcow2"));
    let ssh = sshd.args();
    let out = rig.boot_test_at(&url, &ssh, Some(&first), "FERRY-MARKER:old");
    passed(&out, Some(&first), "FERRY-MARKER:old");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("snapshot V"),
        "{out:?}"
    );
    let out = rig.boot_test_at(&url, &ssh, Some("V19990101_000000"), "FERRY-MARKER:old");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no boot point named"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// VMDK: qemu follows the delta chain from `web.vmdk`, and from a boot
/// point's frozen layer (here the base).
#[test]
fn boot_test_vmdk_working_image_and_boot_point() {
    let Some(a) = ready("boot_test_vmdk_working_image_and_boot_point") else {
        return;
    };
    let rig = Rig::new(&a, "web.vmdk");
    let first = rig.sync_boot_point();
    rig.disk.set_marker("new");
    rig.sync_boot_point();
    rig.boots(None, "FERRY-MARKER:new");
    rig.boots(Some(&first), "FERRY-MARKER:old");
}

/// VHDX: qemu reads a dynamic VHDX but not a differencing (AVHDX) one. The
/// base boots while it is the working image, and later as the first boot
/// point, which froze it; the working image is then an AVHDX, which is
/// refused with exit 2 and a clear line.
#[test]
fn boot_test_vhdx_base_boots_and_avhdx_is_refused() {
    let Some(a) = ready("boot_test_vhdx_base_boots_and_avhdx_is_refused") else {
        return;
    };
    let rig = Rig::new(&a, "web.vhdx");
    rig.sync();
    rig.boots(None, "FERRY-MARKER:old");
    let first = rig.sync_boot_point();
    rig.disk.set_marker("new");
    rig.sync_boot_point();
    rig.boots(Some(&first), "FERRY-MARKER:old");

    let out = rig.boot_test(None, "FERRY-MARKER:new");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("qemu cannot read AVHDX"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
