//! Helpers shared by the unit tests: scratch directories and files under
//! /var/tmp (a disk filesystem: tmpfs refuses O_DIRECT), removed on drop
//! even when a test panics, and a qemu-img probe.

use std::{io::Write, path::PathBuf, process::Command};

use crate::image::Dir;

fn scratch_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    PathBuf::from("/var/tmp").join(format!(
        "ferry-{tag}-{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = scratch_path(tag);
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

/// A file holding `bytes`, synced, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(tag: &str, bytes: &[u8]) -> Self {
        let path = scratch_path(tag);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
