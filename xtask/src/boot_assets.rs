//! What the boot test needs on a fresh machine: qemu-system-x86 from the
//! backports suite, extlinux, a static busybox and cpio (the packages), and a
//! Debian cloud kernel with the virtio modules it needs to see a virtio disk
//! (the assets). The kernel is taken from its .deb without installing it,
//! so the host's own kernel and boot loader are never touched.
//!
//! Assets go to `target/boot-assets/` (see [`assets_dir`]); the integration
//! tests look there, or where `FERRY_BOOT_ASSETS` says.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::util::{self, say, Cmd};

/// Packages the boot test uses from the distribution's own suite.
pub const PACKAGES: &[&str] = &["extlinux", "syslinux-common", "busybox-static", "cpio"];

/// qemu-system-x86 comes from backports: bookworm's own 7.2 depends on
/// qemu-utils 7.2 and would replace the preinstalled qemu-utils 10.
const QEMU_PACKAGE: &str = "qemu-system-x86";

/// The metapackage whose dependency names the current cloud kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the cloud kernel needs for a virtio disk, in load order (each
/// after the ones it depends on). ext4, the serial console and gzip
/// initramfs support are built in.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Where the boot test finds `vmlinuz`, `modules/` and `modules/load-order`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("FERRY_BOOT_ASSETS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => util::workspace_root().join("target").join("boot-assets"),
    }
}

/// Installs the packages and fetches the kernel, skipping what is there.
/// `apt_get` builds an apt-get command with the lock timeout set.
pub fn run(apt_get: impl Fn() -> Cmd, installed: impl Fn(&str) -> Result<bool>) -> Result<()> {
    qemu(&apt_get, &installed).context("installing qemu-system-x86 from backports failed")?;
    kernel(&apt_get).context("fetching the cloud kernel for the boot test failed")
}

fn qemu(apt_get: &impl Fn() -> Cmd, installed: &impl Fn(&str) -> Result<bool>) -> Result<()> {
    if installed(QEMU_PACKAGE)? {
        say!("ok: {QEMU_PACKAGE} already present");
        return Ok(());
    }
    let suite = format!("{}-backports", codename()?);
    if !suite_configured(&suite)? {
        add_backports(&suite)?;
    }
    say!("installing {QEMU_PACKAGE} from {suite}");
    apt_get().arg("update").run()?;
    apt_get()
        .args(["install", "-y", "--no-install-recommends", "-t", &suite])
        .arg(QEMU_PACKAGE)
        .run()
}

/// The release codename, e.g. `bookworm`.
fn codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release failed")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME")
}

/// Apt source files that are in use: `sources.list` and the `.list` and
/// `.sources` files of `sources.list.d` (others, e.g. `.disabled`, are not
/// read by apt).
fn source_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files.into_iter().filter(|p| p.is_file()).collect()
}

fn suite_configured(suite: &str) -> Result<bool> {
    for file in source_files() {
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        if mentions_suite(&text, suite) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether an uncommented line of a one-line (`deb URI SUITE ...`) or
/// deb822 (`Suites: a b`) source names `suite`.
fn mentions_suite(text: &str, suite: &str) -> bool {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with("deb ") || l.starts_with("Suites:"))
        .any(|l| l.split_whitespace().any(|w| w == suite))
}

/// The mirror and keyring the release's main suite comes from.
struct Mirror {
    uri: String,
    signed_by: Option<String>,
}

/// Finds the mirror `codename` itself is fetched from, in deb822 or
/// one-line sources.
fn main_mirror(codename: &str) -> Option<Mirror> {
    for file in source_files() {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Some(m) = mirror_in(&text, codename) {
            return Some(m);
        }
    }
    None
}

fn mirror_in(text: &str, codename: &str) -> Option<Mirror> {
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let suites = field("Suites:").unwrap_or_default();
        if field("Types:").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"))
            && suites.split_whitespace().any(|s| s == codename)
        {
            if let Some(uri) =
                field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_owned))
            {
                return Some(Mirror {
                    uri,
                    signed_by: field("Signed-By:"),
                });
            }
        }
    }
    // One-line: deb [options] URI SUITE COMPONENTS...
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("deb "))
    {
        let mut words = line["deb ".len()..].trim_start();
        let mut signed_by = None;
        if let Some(rest) = words.strip_prefix('[') {
            let (opts, after) = rest.split_once(']')?;
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by=").map(str::to_owned));
            words = after;
        }
        let mut it = words.split_whitespace();
        if let (Some(uri), Some(suite)) = (it.next(), it.next()) {
            if suite == codename {
                return Some(Mirror {
                    uri: uri.to_owned(),
                    signed_by,
                });
            }
        }
    }
    None
}

fn add_backports(suite: &str) -> Result<()> {
    let codename = codename()?;
    let mirror = main_mirror(&codename).unwrap_or(Mirror {
        uri: "http://deb.debian.org/debian".to_owned(),
        signed_by: None,
    });
    let options = match &mirror.signed_by {
        Some(key) if !key.contains(char::is_whitespace) => format!("[signed-by={key}] "),
        _ => String::new(),
    };
    let line = format!("deb {options}{} {suite} main\n", mirror.uri);
    let path = Path::new("/etc/apt/sources.list.d/ferry-backports.list");
    say!("adding {suite} to apt sources: {}", path.display());
    fs::write(path, line).with_context(|| format!("writing {} failed", path.display()))
}

/// Fetches the current cloud kernel's .deb, extracts it, and keeps
/// `vmlinuz` and [`MODULES`]; the .deb and the rest are removed.
fn kernel(apt_get: &impl Fn() -> Cmd) -> Result<()> {
    let dir = assets_dir();
    let modules = dir.join("modules");
    let have = dir.join("vmlinuz").is_file()
        && modules.join("load-order").is_file()
        && MODULES
            .iter()
            .all(|m| modules.join(format!("{m}.ko")).is_file());
    if have {
        say!("ok: boot test kernel already in {}", dir.display());
        return Ok(());
    }
    let package = match kernel_package()? {
        Some(p) => p,
        None => {
            // A machine whose package lists were never fetched.
            apt_get().arg("update").run()?;
            kernel_package()?
                .with_context(|| format!("apt knows no dependency of {KERNEL_METAPACKAGE}"))?
        }
    };
    say!("fetching {package} (not installed: only its kernel and a few modules are kept)");
    let work = dir.join("download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {} failed", work.display()))?;
    // Root downloads into a root-owned directory: apt's `_apt` sandbox
    // user could not write there.
    apt_get()
        .args(["-o", "APT::Sandbox::User=root", "download", &package])
        .current_dir(&work)
        .run()?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let tree = work.join("tree");
    Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree).run()?;
    let vmlinuz = find(&tree.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .with_context(|| format!("{package} holds no boot/vmlinuz-*"))?;
    fs::create_dir_all(&modules)?;
    for m in MODULES {
        let file = format!("{m}.ko");
        let found = find(&tree.join("lib/modules"), |n| n == file)?
            .with_context(|| format!("{package} holds no {file}"))?;
        copy(&found, &modules.join(&file))?;
    }
    fs::write(modules.join("load-order"), MODULES.join("\n") + "\n")?;
    // Last, so a half-done run is never taken for a finished one.
    copy(&vmlinuz, &dir.join("vmlinuz"))?;
    fs::write(dir.join("kernel-package"), format!("{package}\n"))?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {} failed", work.display()))?;
    say!("boot test kernel: {}", dir.join("vmlinuz").display());
    Ok(())
}

/// The versioned package `linux-image-cloud-amd64` depends on, e.g.
/// `linux-image-6.1.0-56-cloud-amd64`.
fn kernel_package() -> Result<Option<String>> {
    let out = Cmd::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .quiet()
        .output_unchecked()?;
    Ok(versioned_dependency(&out.stdout))
}

fn versioned_dependency(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p != &KERNEL_METAPACKAGE)
        .map(str::to_owned)
}

/// The first file under `dir` (depth first) whose name satisfies `want`.
fn find(dir: &Path, want: impl Fn(&str) -> bool + Copy) -> Result<Option<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {} failed", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if let Some(found) = find(&p, want)? {
                return Ok(Some(found));
            }
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(want) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Copies through a temporary name, so a file that exists is complete.
fn copy(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {} failed", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} failed", tmp.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_suite_in_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\
                      Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        assert!(!mentions_suite(deb822, "bookworm-backports"));
        assert!(mentions_suite(deb822, "bookworm-updates"));
        let m = mirror_in(deb822, "bookworm").unwrap();
        assert_eq!(m.uri, "http://deb.debian.org/debian");
        assert_eq!(
            m.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert!(mirror_in(deb822, "trixie").is_none());

        let one_line = "# deb http://x/debian bookworm-backports main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n";
        assert!(!mentions_suite(one_line, "bookworm-backports"));
        let m = mirror_in(one_line, "bookworm").unwrap();
        assert_eq!(m.uri, "http://m/debian");
        assert_eq!(m.signed_by.as_deref(), Some("/k.gpg"));
        assert!(mentions_suite(
            "deb http://m/debian bookworm-backports main\n",
            "bookworm-backports"
        ));
    }

    #[test]
    fn picks_the_versioned_kernel() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            versioned_dependency(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(versioned_dependency("linux-image-cloud-amd64\n"), None);
    }
}
