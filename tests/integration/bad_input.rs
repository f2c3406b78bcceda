//! Bad input gets one clear line, a non-zero exit, and changes nothing.

use crate::util::{privileged, Ferry, LoopDev};

const MIB: u64 = 1 << 20;

/// Runs a failing command and checks that it printed `needle` and that no
/// state, kernel or on disk, changed.
fn refused(f: &Ferry, args: &[&str], needle: &str) {
    let before = f.snapshot();
    let list_before = f.output(&["track", "list", "--json"]).stdout;
    let err = f.fails(args);
    assert!(
        err.contains(needle),
        "ferry {args:?}: expected '{needle}' in: {err}"
    );
    assert_eq!(f.snapshot(), before, "ferry {args:?} changed state");
    assert_eq!(f.output(&["track", "list", "--json"]).stdout, list_before);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !privileged("bad_input_is_refused_and_changes_nothing") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let other = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    crate::util::write_direct(&dev.path, 0, 4096, 1);

    refused(&f, &["track", "add", "/etc/hostname"], "not a block device");
    refused(
        &f,
        &["track", "add", "/dev/ferry-no-such-device"],
        "no such file",
    );
    refused(&f, &["track", "add", dev.arg()], "already tracked");
    refused(&f, &["track", "remove", other.arg()], "not tracked");
    refused(&f, &["track", "dirty", other.arg()], "not tracked");
    refused(&f, &["track", "drain", other.arg()], "not tracked");
    for bad in ["3K", "2M", "2K", "lots"] {
        refused(
            &f,
            &["track", "add", other.arg(), "--chunk-size", bad],
            "bad chunk size",
        );
    }
    // The tracked device kept its bits through all of that.
    assert_eq!(f.extents(dev.arg()), vec![(0, 65536)]);
}

#[test]
fn not_root_is_refused() {
    if !privileged("not_root_is_refused") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    let before = f.snapshot();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg("--state-dir")
        .arg(&f.state)
        .arg("--bpf-dir")
        .arg(&f.bpf)
        .args(["track", "add", dev.arg()])
        .output()
        .expect("setpriv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
    assert_eq!(f.snapshot(), before);
}

#[test]
fn missing_bpffs_is_refused() {
    if !privileged("missing_bpffs_is_refused") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--state-dir")
        .arg(&f.state)
        .args([
            "--bpf-dir",
            "/tmp/ferry-not-bpffs/x",
            "track",
            "add",
            dev.arg(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("BPF is unavailable"), "{err}");
    assert!(!std::path::Path::new("/tmp/ferry-not-bpffs").exists());
    assert!(!f.state.exists() || f.snapshot().is_empty());
}
