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

#[test]
fn bad_sync_input_is_refused_and_changes_nothing() {
    if !privileged("bad_sync_input_is_refused_and_changes_nothing") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let untracked = LoopDev::new(16 * MIB);
    let dir = crate::util::TempDir::new();
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    let url = format!("file://{}", dir.join("standby.img").display());
    let u = untracked.arg();

    refused(&f, &["sync", "/etc/hostname", &url], "not a block device");
    refused(&f, &["sync", u, "http://host/x.img"], "expected file://");
    refused(&f, &["sync", u, "file://relative.img"], "absolute");
    refused(&f, &["sync", u, "file:///a/../b.img"], "'..'");
    refused(&f, &["sync", u, "ssh://host/x.img"], "a user and a host");
    refused(
        &f,
        &["sync", u, &format!("{url}?format=qcow9")],
        "unknown image format",
    );
    refused(&f, &["sync", u, &url, "--bwlimit", "12Q"], "unknown unit");
    refused(&f, &["sync", u, &url, "--ioprio", "urgent"], "urgent");
    // The target root must exist; nothing is created on the way.
    let missing = format!("file://{}/no/such/dir/x.img", dir.path.display());
    refused(&f, &["sync", u, &missing], "no/such/dir does not exist");
    assert!(!dir.join("no").exists());
    // A password file others can read is refused, and never echoed.
    let pw = dir.join("pw");
    std::fs::write(&pw, "hunter2\n").unwrap();
    refused(
        &f,
        &[
            "sync",
            u,
            "ssh://u@127.0.0.1:1/x.img",
            "--password-file",
            pw.to_str().unwrap(),
        ],
        "chmod 600",
    );
    // Unreachable target: one line, nothing tracked.
    let err = f.fails(&["sync", u, "ssh://u@127.0.0.1:1/x.img"]);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("hunter2"));
    refused(&f, &["verify", "/etc/hostname", &url], "not a block device");
    let out = f.output(&["verify", dev.arg(), &url]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "verify errors exit 2 (1 means 'differ')"
    );
    assert!(
        !dir.join("standby.img").exists(),
        "verify must not create the image"
    );
}
