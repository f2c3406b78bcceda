//! Helpers shared by the format tests: a scratch directory under /var/tmp
//! (O_DIRECT and reflink-capable filesystems live there, not on tmpfs),
//! removed on drop even when a test panics, and a qemu-img probe.

use std::{path::PathBuf, process::Command};

use super::Dir;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from("/var/tmp").join(format!(
            "ferry-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn dir(&self) -> Dir {
        Dir::open(&self.0).unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether qemu-img runs here (the formats' outside reader). CI installs
/// it; elsewhere the qemu checks are skipped with a printed reason.
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping the qemu-img checks: qemu-img is not installed");
    }
    ok
}
