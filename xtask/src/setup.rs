//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to
//! build, test and run ferry. Every step first checks whether it is already
//! satisfied and then does nothing, so running it again is cheap.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::{self, say, Cmd};
use crate::{boot_assets, sys};

/// Debian packages the build, tests, benches and demo use. `libllvm22` is
/// what bpf-linker links against; it comes from bookworm-security.
/// `openssh-client` is ferry's SSH transport; `openssh-server` is the real
/// sshd the transport tests talk to; `rsync` is a bench baseline.
/// The boot test's packages are in [`boot_assets::PACKAGES`].
const APT_PACKAGES: &[&str] = &[
    "fio",
    "openssh-server",
    "openssh-client",
    "rsync",
    "util-linux",
    "e2fsprogs",
    "xfsprogs",
    "fdisk",
    "libllvm22",
    "qemu-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
const LLVM_LIB: &str = "libLLVM.so.22.1";
const BPFFS: &str = "/sys/fs/bpf";

/// Apt waits this long for another dpkg user to let go of the lock.
const APT_LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=600";

pub fn run() -> Result<()> {
    require_root("xtask setup")?;
    apt_packages().context("installing apt packages failed")?;
    boot_assets::run(apt_get, apt_installed)?;
    rust_src().context("adding the rust-src component failed")?;
    bpf_linker().context("installing bpf-linker failed")?;
    bpffs().context("mounting bpffs failed")?;
    Ok(())
}

/// Fails with one clear line unless we are root.
pub fn require_root(what: &str) -> Result<()> {
    if !sys::is_root() {
        bail!(
            "{what} must run as root: it installs packages and mounts bpffs, and \
             ferry needs root for loop devices and BPF programs"
        );
    }
    Ok(())
}

/// Puts cargo's bin dir first on our PATH so every child we spawn (aya-build
/// looks for `bpf-linker` there) finds what `cargo install` put there.
/// Must run before any thread is started.
pub fn put_cargo_bin_on_path() {
    let Some(bin) = cargo_home().map(|home| home.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if dirs.first() == Some(&bin) {
        return;
    }
    dirs.retain(|dir| *dir != bin);
    dirs.insert(0, bin);
    if let Ok(joined) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", joined);
    }
}

fn cargo_home() -> Option<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home)),
        _ => std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")),
    }
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    let mut present = Vec::new();
    for &package in APT_PACKAGES.iter().chain(boot_assets::PACKAGES) {
        if apt_installed(package)? {
            present.push(package);
        } else {
            missing.push(package);
        }
    }
    if !present.is_empty() {
        say!("ok: apt packages already present: {}", present.join(" "));
    }
    if missing.is_empty() {
        return Ok(());
    }
    say!("installing apt packages: {}", missing.join(" "));
    // The index may be stale or absent on a fresh machine, and libllvm22 is
    // only in a recent bookworm-security index.
    apt_get().arg("update").run()?;
    apt_get()
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .run()
}

fn apt_get() -> Cmd {
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", APT_LOCK_TIMEOUT])
}

fn apt_installed(package: &str) -> Result<bool> {
    // dpkg-query exits non-zero for a package it has never heard of: that
    // just means "not installed".
    let output = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .quiet()
        .output_unchecked()?;
    Ok(output.status.success() && output.stdout.trim() == "install ok installed")
}

fn rust_src() -> Result<()> {
    // Run from the workspace root so a rust-toolchain file there picks the
    // toolchain, the same one cargo builds the eBPF crate with.
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed"])
        .current_dir(util::workspace_root())
        .quiet()
        .output()?;
    if installed
        .stdout
        .lines()
        .any(|line| line.trim() == "rust-src")
    {
        say!("ok: rust-src already present");
        return Ok(());
    }
    say!("installing rust-src");
    Cmd::new("rustup")
        .args(["component", "add", "rust-src"])
        .current_dir(util::workspace_root())
        .run()
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version() {
        if version
            .split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION)
        {
            say!("ok: bpf-linker {BPF_LINKER_VERSION} already present");
            return Ok(());
        }
        say!("found `{version}`, want {BPF_LINKER_VERSION}");
    }
    say!("installing bpf-linker {BPF_LINKER_VERSION} (built for LLVM 22)");
    let prefix = llvm_prefix()?;
    util::cargo()
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .run()
}

/// The first line of `bpf-linker --version`, looking on PATH and in cargo's
/// bin dir; `None` if it is nowhere or does not run.
fn bpf_linker_version() -> Option<String> {
    let mut candidates = vec![PathBuf::from("bpf-linker")];
    candidates.extend(cargo_home().map(|home| home.join("bin").join("bpf-linker")));
    candidates.into_iter().find_map(|program| {
        let output = Cmd::new(program).arg("--version").quiet().output().ok()?;
        output
            .stdout
            .lines()
            .next()
            .map(|line| line.trim().to_owned())
    })
}

/// Makes `target/llvm22/lib/libLLVM.so` point at Debian's LLVM 22 library;
/// llvm-sys wants that layout under `LLVM_PREFIX`. Returns the prefix.
fn llvm_prefix() -> Result<PathBuf> {
    let library = find_llvm_library()?;
    let prefix = util::workspace_root().join("target").join("llvm22");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir)
        .with_context(|| format!("creating {} failed", lib_dir.display()))?;
    let link = lib_dir.join("libLLVM.so");
    match fs::read_link(&link) {
        Ok(current) if current == library => return Ok(prefix),
        Ok(_) => fs::remove_file(&link)
            .with_context(|| format!("removing stale {} failed", link.display()))?,
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("{} is not a symlink", link.display()))
        }
    }
    symlink(&library, &link)
        .with_context(|| format!("linking {} -> {} failed", link.display(), library.display()))?;
    say!("linked {} -> {}", link.display(), library.display());
    Ok(prefix)
}

fn find_llvm_library() -> Result<PathBuf> {
    let dir = Path::new(LLVM_LIB_DIR);
    let exact = dir.join(LLVM_LIB);
    if exact.exists() {
        return Ok(exact);
    }
    let entries = fs::read_dir(dir).with_context(|| format!("listing {} failed", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("libLLVM.so.22")
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!("no libLLVM.so.22* in {LLVM_LIB_DIR}; is the libllvm22 package installed?")
    })
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts failed")?;
    if is_bpffs_mounted(&mounts) {
        say!("ok: bpffs already mounted at {BPFFS}");
        return Ok(());
    }
    say!("mounting bpffs at {BPFFS}");
    Cmd::new("mount").args(["-t", "bpf", "bpf", BPFFS]).run()
}

fn is_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_needs_the_bpf_type_at_the_right_place() {
        let mounted = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpffs_mounted(mounted));
        let elsewhere = "bpf /mnt/bpf bpf rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n";
        assert!(!is_bpffs_mounted(elsewhere));
        assert!(!is_bpffs_mounted(""));
    }
}
