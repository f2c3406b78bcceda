//! Boot points: one instant of the source kept on the target, retention,
//! revert, and the scripts around the freeze. Real loop devices, a mounted
//! ext4 on the source, and the image files themselves as the judge.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::sshd::Sshd;
use crate::util::{
    await_stderr_line, privileged, run, same_content, write_random, Ferry, LoopDev, Mounted,
    TempDir,
};

const MIB: u64 = 1 << 20;

/// The content of `/marker` in the ext4 image `image` (read with debugfs,
/// without mounting).
fn marker(image: &Path) -> String {
    let out = Command::new("debugfs")
        .args(["-R", "cat /marker"])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn set_marker(src: &Mounted, text: &str) {
    std::fs::write(src.dir.join("marker"), text).unwrap();
}

fn list(f: &Ferry, url: &str) -> serde_json::Value {
    f.json(&["boot-points", "list", url])
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v["boot_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn app_consistent_boot_points_retention_and_revert() {
    if !privileged("app_consistent_boot_points_retention_and_revert") {
        return;
    }
    let src = Mounted::new(64 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("web.img");
    let url = format!("file://{}", image.display());
    let point = |name: &str| dir.join(&format!("web.img.{name}"));

    let mut taken: Vec<String> = Vec::new();
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        set_marker(&src, text);
        let s = f.json(&[
            "sync",
            src.dev.arg(),
            &url,
            "--boot-point",
            "--max-boot-points",
            "2",
        ]);
        let bp = &s["boot_point"];
        assert_eq!(bp["kind"], "app-consistent", "{s}");
        assert_eq!(bp["frozen"][0], src.dir.to_str().unwrap(), "{s}");
        assert!(bp["freeze_ms"].as_f64().unwrap() < 2000.0, "{s}");
        let name = bp["name"].as_str().unwrap().to_owned();
        // The boot point is a filesystem that holds the marker of its time.
        assert_eq!(marker(&point(&name)), *text);
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(point(&name))
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        if i == 2 {
            assert_eq!(bp["merged"], taken[0].as_str(), "{s}");
        }
        taken.push(name);
        // Boot point names have one-second resolution.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // Retention kept the newest two, unchanged.
    let v = list(&f, &url);
    assert_eq!(names(&v), taken[1..].to_vec(), "{v}");
    assert_eq!(v["boot_points"][0]["kind"], "app");
    assert_eq!(marker(&point(&taken[1])), "two");
    assert!(!point(&taken[0]).exists());

    // Revert: the working image becomes "two", and the next sync compares
    // checksums and brings it back to the source.
    let kept = dir.join("kept");
    std::fs::copy(point(&taken[1]), &kept).unwrap();
    f.ok(&["boot-points", "revert", &url, &taken[1]]);
    assert!(same_content(&image, &kept));
    assert!(
        same_content(&point(&taken[1]), &kept),
        "revert changed the boot point"
    );
    run("umount", &[src.dir.to_str().unwrap()]);
    let s = f.json(&["sync", src.dev.arg(), &url]);
    assert_eq!(s["mode"], "resync", "{s}");
    assert!(same_content(&src.dev.backing, &image));
    assert!(
        same_content(&point(&taken[1]), &kept),
        "a sync changed a boot point"
    );

    // Delete.
    f.ok(&["boot-points", "delete", &url, &taken[2]]);
    assert_eq!(names(&list(&f, &url)), vec![taken[1].clone()]);
}

#[test]
fn a_failing_pre_script_takes_no_boot_point_but_ships() {
    if !privileged("a_failing_pre_script_takes_no_boot_point_but_ships") {
        return;
    }
    let src = Mounted::new(32 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let url = format!("file://{}", dir.join("web.img").display());
    let script = dir.join("pre.sh");
    std::fs::write(&script, "#!/bin/sh\necho quiescing >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    set_marker(&src, "x");
    let s = f.json(&[
        "sync",
        src.dev.arg(),
        &url,
        "--boot-point",
        "--pre-snapshot",
        script.to_str().unwrap(),
    ]);
    assert!(s["boot_point"].get("name").is_none(), "{s}");
    assert!(
        s["boot_point"]["note"]
            .as_str()
            .unwrap()
            .contains("pre-snapshot script failed"),
        "{s}"
    );
    assert_eq!(s["generation"], 1, "the changes still ship: {s}");
    assert!(names(&list(&f, &url)).is_empty());
}

#[test]
fn a_raw_device_gets_a_crash_consistent_boot_point() {
    if !privileged("a_raw_device_gets_a_crash_consistent_boot_point") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let url = format!("file://{}", dir.join("raw.img").display());
    write_random(&dev.path, 0, MIB as usize, 1);
    let s = f.json(&["sync", dev.arg(), &url, "--boot-point"]);
    assert_eq!(s["boot_point"]["kind"], "crash-consistent", "{s}");
    let name = s["boot_point"]["name"].as_str().unwrap();
    assert!(same_content(
        &dev.backing,
        &dir.join(&format!("raw.img.{name}"))
    ));
    assert_eq!(list(&f, &url)["boot_points"][0]["kind"], "crash");
}

#[test]
fn bad_boot_point_input_is_refused() {
    if !privileged("bad_boot_point_input_is_refused") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let url = format!("file://{}", dir.join("raw.img").display());
    f.ok(&["sync", dev.arg(), &url, "--boot-point"]);
    let before = std::fs::read_dir(&dir.path).unwrap().count();
    let qcow2 = format!("file://{}", dir.join("web.qcow2").display());
    for (args, needle) in [
        (
            vec!["boot-points", "revert", &url, "V20000101_000000"],
            "no boot point named",
        ),
        (
            vec!["boot-points", "delete", &url, "V20000101_000000"],
            "no boot point named",
        ),
        (
            vec!["boot-points", "list", "file:///nonexistent-dir/x.img"],
            "nonexistent-dir",
        ),
        (
            vec![
                "sync",
                dev.arg(),
                &url,
                "--boot-point",
                "--max-boot-points",
                "31",
            ],
            "31",
        ),
        (
            vec![
                "sync",
                dev.arg(),
                &url,
                "--boot-point",
                "--max-boot-points",
                "0",
            ],
            "0",
        ),
        (
            vec![
                "sync",
                dev.arg(),
                &format!("{url}?format=qcow7"),
                "--boot-point",
            ],
            "unknown image format",
        ),
        (
            vec!["sync", dev.arg(), &url, "--max-freeze", "soon"],
            "duration",
        ),
        (
            vec![
                "sync",
                dev.arg(),
                &qcow2,
                "--boot-point",
                "--max-boot-points",
                "23",
            ],
            "at most 22",
        ),
    ] {
        let err = f.fails(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(&dir.path).unwrap().count(),
        before,
        "bad input changed the target"
    );
}

/// What `qemu-img compare` says of an image and a raw file.
fn qemu_same(format: &str, image: &Path, raw: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    out.status.success()
}

/// Whether internal snapshot `name` of `image` equals `raw`: qemu-img
/// converts the snapshot to raw, then compares.
fn qemu_same_at(format: &str, image: &Path, name: &str, raw: &Path) -> bool {
    let out = raw.with_extension(format!("{name}.raw"));
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            "-l",
            &format!("snapshot.name={name}"),
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let same = same_content(&out, raw);
    let _ = std::fs::remove_file(&out);
    same
}

/// `qemu-img check` finds nothing wrong with `image`.
fn qemu_check(format: &str, image: &Path) {
    let check = Command::new("qemu-img")
        .args(["check", "-f", format])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check of {}: {}",
        image.display(),
        String::from_utf8_lossy(&check.stdout)
    );
}

/// A VMDK boot point's file, from the format's own list beside the image.
fn vmdk_point_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("web.vmdk.bootpoints.json")).unwrap())
            .unwrap();
    let file = v["boot_points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {v}"))["file"]
        .as_str()
        .unwrap()
        .to_owned();
    dir.join(file)
}

/// A VHDX boot point's content, read by the independent VHDX reader (qemu
/// cannot read differencing VHDX).
fn vhdx_point_bytes(dir: &Path, name: &str) -> Vec<u8> {
    use ferry::image::{vhdx, Dir};
    let d = Dir::open(dir).unwrap();
    let image = vhdx::Vhdx::open(&d, "web.vhdx").unwrap();
    let file = image.boot_point_file(name).unwrap().to_owned();
    vhdx::reader::ChainReader::open(&d, &file)
        .unwrap()
        .read_all()
        .unwrap()
}

#[test]
fn qcow2_vmdk_and_vhdx_standbys_with_boot_points() {
    if !privileged("qcow2_vmdk_and_vhdx_standbys_with_boot_points") {
        return;
    }
    for format in ["qcow2", "vmdk", "vhdx"] {
        let dev = LoopDev::new(32 * MIB);
        let dir = TempDir::new();
        let f = Ferry::new();
        let image = dir.join(&format!("web.{format}"));
        let url = format!("file://{}", image.display());
        write_random(&dev.path, 0, 4 * MIB as usize, 1);
        let s1 = f.json(&["sync", dev.arg(), &url, "--boot-point"]);
        let v1 = s1["boot_point"]["name"].as_str().unwrap().to_owned();
        let at_v1 = dir.join("at_v1.raw");
        std::fs::copy(&dev.backing, &at_v1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_random(&dev.path, 2 * MIB, 4 * MIB as usize, 2);
        write_random(&dev.path, 20 * MIB, MIB as usize, 3);
        let s2 = f.json(&["sync", dev.arg(), &url, "--boot-point"]);
        assert_eq!(s2["mode"], "incremental", "{s2}");
        let v2 = s2["boot_point"]["name"].as_str().unwrap().to_owned();
        assert_eq!(names(&list(&f, &url)), vec![v1.clone(), v2.clone()]);
        // The working image holds the source, and each boot point its time.
        let v = f.json(&["verify", dev.arg(), &url]);
        assert_eq!(v["identical"], true, "{format}: {v}");
        match format {
            "qcow2" => {
                assert!(qemu_same("qcow2", &image, &dev.backing), "qcow2 top");
                let snaps = run("qemu-img", &["snapshot", "-l", image.to_str().unwrap()]);
                assert!(snaps.contains(&v1) && snaps.contains(&v2), "{snaps}");
                assert!(qemu_same_at("qcow2", &image, &v1, &at_v1), "qcow2 V1");
                assert!(qemu_same_at("qcow2", &image, &v2, &dev.backing), "qcow2 V2");
                qemu_check("qcow2", &image);
            }
            "vmdk" => {
                assert!(qemu_same("vmdk", &image, &dev.backing), "vmdk top");
                assert!(
                    qemu_same("vmdk", &vmdk_point_file(&dir.path, &v1), &at_v1),
                    "vmdk V1"
                );
                assert!(
                    qemu_same("vmdk", &vmdk_point_file(&dir.path, &v2), &dev.backing),
                    "vmdk V2"
                );
                qemu_check("vmdk", &image);
            }
            _ => {
                assert_eq!(
                    vhdx_point_bytes(&dir.path, &v1),
                    std::fs::read(&at_v1).unwrap(),
                    "vhdx V1"
                );
                assert_eq!(
                    vhdx_point_bytes(&dir.path, &v2),
                    std::fs::read(&dev.backing).unwrap(),
                    "vhdx V2"
                );
                let base = dir.join("web.vhdx");
                qemu_check("vhdx", &base);
            }
        }
        // Export: a standalone image of V1, in another format.
        for out_fmt in ["qcow2", "raw"] {
            let out = dir.join(&format!("v1-export.{out_fmt}"));
            f.ok(&["boot-points", "export", &url, &v1, out.to_str().unwrap()]);
            assert!(
                qemu_same(out_fmt, &out, &at_v1),
                "{format} export to {out_fmt}"
            );
        }
        let err = f.fails(&[
            "boot-points",
            "export",
            &url,
            &v1,
            dir.join("v1-export.raw").to_str().unwrap(),
        ]);
        assert!(err.contains("never overwrites"), "{err}");
        if format == "vhdx" {
            // Over SSH the agent exports on the target host, beside the
            // image (V1 is an AVHDX chain: ferry's reader flattens it).
            let sshd = Sshd::start();
            let remote = sshd.url(&image);
            let export = |point: &str, out: &str| {
                let mut args = vec!["boot-points", "export", &remote, point, out];
                let ssh = sshd.args();
                args.extend(ssh.iter().map(String::as_str));
                f.output(&args)
            };
            let out = export(&v1, "v1-remote.qcow2");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{out:?}");
            let written = dir.join("v1-remote.qcow2");
            assert!(
                stdout.contains(&format!("to 127.0.0.1:{}", written.display())),
                "{stdout}"
            );
            assert!(qemu_same("qcow2", &written, &at_v1));
            for (point, out, says) in [
                (v1.as_str(), "v1-remote.qcow2", "never overwrites"),
                (v1.as_str(), "../v1.qcow2", "OUT is a file name"),
                (v1.as_str(), "v1.txt", "must end in"),
                ("V19990101_000000", "none.raw", "no boot point named"),
            ] {
                let err = export(point, out);
                let stderr = String::from_utf8_lossy(&err.stderr);
                assert_eq!(err.status.code(), Some(1), "{out}: {stderr}");
                assert!(stderr.contains(says), "{out}: {stderr}");
                assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            }
            assert!(!dir.join("none.raw").exists());
        }
        // Retention at 2: the oldest goes, the newest keeps its content.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let s3 = f.json(&[
            "sync",
            dev.arg(),
            &url,
            "--boot-point",
            "--max-boot-points",
            "2",
        ]);
        assert_eq!(s3["boot_point"]["merged"], v1.as_str(), "{s3}");
        let v3 = s3["boot_point"]["name"].as_str().unwrap().to_owned();
        assert_eq!(names(&list(&f, &url)), vec![v2.clone(), v3]);
        match format {
            "qcow2" => assert!(qemu_same_at("qcow2", &image, &v2, &dev.backing)),
            "vmdk" => assert!(qemu_same(
                "vmdk",
                &vmdk_point_file(&dir.path, &v2),
                &dev.backing
            )),
            _ => assert_eq!(
                vhdx_point_bytes(&dir.path, &v2),
                std::fs::read(&dev.backing).unwrap()
            ),
        }
    }
}

#[test]
fn corrupt_images_and_busy_images_are_refused() {
    if !privileged("corrupt_images_and_busy_images_are_refused") {
        return;
    }
    let dev = LoopDev::new(64 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    // A qcow2 header that is not one: refused, never "repaired".
    let bad = dir.join("bad.qcow2");
    let mut junk = b"QFI\xfb\0\0\0\x03".to_vec();
    junk.resize(1 << 20, 0x5a);
    std::fs::write(&bad, &junk).unwrap();
    let err = f.fails(&["sync", dev.arg(), &format!("file://{}", bad.display())]);
    assert!(
        err.contains("corrupt") || err.contains("not supported"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        junk,
        "a corrupt image was changed"
    );

    // Revert while a sync holds the image: refused, the sync goes on.
    let url = format!("file://{}", dir.join("web.img").display());
    write_random(&dev.path, 0, MIB as usize, 1);
    let first = f.json(&["sync", dev.arg(), &url, "--boot-point"]);
    let name = first["boot_point"]["name"].as_str().unwrap().to_owned();
    write_random(&dev.path, 8 * MIB, 32 * MIB as usize, 2);
    let mut syncing = f
        .command(&[
            "sync",
            dev.arg(),
            &url,
            "--bwlimit",
            "8M",
            "--zstd-level",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let err = f.fails(&["boot-points", "revert", &url, &name]);
    assert!(err.contains("in use"), "{err}");
    assert!(syncing.wait().unwrap().success(), "the sync was disturbed");
    assert!(same_content(&dev.backing, &dir.join("web.img")));
}

#[test]
fn a_freeze_held_too_long_is_thawed_and_no_boot_point_is_taken() {
    if !privileged("a_freeze_held_too_long_is_thawed_and_no_boot_point_is_taken") {
        return;
    }
    let src = Mounted::new(32 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("web.img");
    let url = format!("file://{}", image.display());
    set_marker(&src, "x");
    // Nothing can be drained and read within a microsecond: every attempt
    // overruns, the watchdog thaws, and the job ships without a boot point.
    let s = f.json(&[
        "sync",
        src.dev.arg(),
        &url,
        "--boot-point",
        "--max-freeze",
        "0.001ms",
    ]);
    assert!(s["boot_point"].get("name").is_none(), "{s}");
    assert!(
        s["boot_point"]["note"]
            .as_str()
            .unwrap()
            .contains("--max-freeze"),
        "{s}"
    );
    assert!(names(&list(&f, &url)).is_empty());
    // Thawed: unfreezing a filesystem that is not frozen fails.
    let unfreeze = Command::new("fsfreeze")
        .arg("-u")
        .arg(&src.dir)
        .output()
        .unwrap();
    assert!(!unfreeze.status.success(), "the filesystem was left frozen");
    // Everything taken was still shipped.
    run("umount", &[src.dir.to_str().unwrap()]);
    let next = f.json(&["sync", src.dev.arg(), &url]);
    assert!(same_content(&src.dev.backing, &image), "{next}");
}

#[test]
fn a_signal_during_the_freeze_thaws_before_ferry_exits() {
    if !privileged("a_signal_during_the_freeze_thaws_before_ferry_exits") {
        return;
    }
    let src = Mounted::new(32 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("web.img");
    let url = format!("file://{}", image.display());
    set_marker(&src, "before");
    f.json(&["sync", src.dev.arg(), &url]);
    set_marker(&src, "after");
    // The hook holds the freeze long after the signal; only ferry's signal
    // thread can end it in time.
    let mut syncing = f
        .command(&[
            "sync",
            src.dev.arg(),
            &url,
            "--boot-point",
            "--max-freeze",
            "600s",
        ])
        .env("FERRY_TEST_HOLD_FREEZE_MS", "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = await_stderr_line(
        &mut syncing,
        |l| l.contains("holding the freeze"),
        "the freeze",
    );
    run("kill", &["-TERM", &syncing.id().to_string()]);
    let status = syncing.wait().unwrap();
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(status.code(), Some(143), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("interrupted by SIGTERM")),
        "{rest:?}"
    );
    // Thawed: unfreezing a filesystem that is not frozen fails, and writes
    // go through.
    let unfreeze = Command::new("fsfreeze")
        .arg("-u")
        .arg(&src.dir)
        .output()
        .unwrap();
    assert!(
        !unfreeze.status.success(),
        "ferry exited and left the filesystem frozen"
    );
    set_marker(&src, "later");
    // Nothing the interrupted job took from the tracker is lost.
    run("umount", &[src.dir.to_str().unwrap()]);
    f.json(&["sync", src.dev.arg(), &url]);
    assert!(same_content(&src.dev.backing, &image));
    assert_eq!(marker(&image), "later");
}

/// The content of `/NAME` in the ext4 image `image` (debugfs, no mount).
fn file_in(image: &Path, name: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Kills the writer on drop, so a failed test leaves no process behind.
struct Writer(std::process::Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_boot_point_of_two_disks_is_one_instant_of_both() {
    if !privileged("a_boot_point_of_two_disks_is_one_instant_of_both") {
        return;
    }
    let (a, b) = (Mounted::new(32 * MIB), Mounted::new(32 * MIB));
    let dir = TempDir::new();
    let f = Ferry::new();
    let (img_a, img_b) = (dir.join("web-a.img"), dir.join("web-b.img"));
    let url_a = format!("file://{}", img_a.display());
    let disk_b = format!("{}=file://{}", b.dev.arg(), img_b.display());
    let both = |extra: &[&str]| {
        let mut args = vec!["sync", a.dev.arg(), &url_a, "--disk", &disk_b];
        args.extend(extra);
        f.json(&args)
    };
    let seeded = both(&[]);
    assert_eq!(seeded.as_array().map(Vec::len), Some(2), "{seeded}");
    // A writer counts on disk A, then on disk B, each number put in place
    // whole (written aside, then renamed: `echo > counter` would leave it
    // empty for an instant a freeze can catch) and made durable. At one
    // instant of both, B holds A's number or the one before it; freezes of
    // each disk at its own time would be far apart.
    let script = format!(
        "i=0; while :; do i=$((i+1)); \
         echo $i > {a}/counter.new; mv {a}/counter.new {a}/counter; sync {a}/counter; \
         echo $i > {b}/counter.new; mv {b}/counter.new {b}/counter; sync {b}/counter; done",
        a = a.dir.display(),
        b = b.dir.display()
    );
    let writer = Writer(Command::new("sh").args(["-c", &script]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let s = both(&["--boot-point", "--max-freeze", "30s"]);
    std::thread::sleep(Duration::from_millis(300));
    drop(writer);
    let (sa, sb) = (&s[0]["boot_point"], &s[1]["boot_point"]);
    let name = sa["name"].as_str().unwrap_or_else(|| panic!("{s}"));
    assert_eq!(sb["name"].as_str(), Some(name), "{s}");
    for bp in [sa, sb] {
        assert_eq!(bp["kind"], "app-consistent", "{s}");
        let frozen = bp["frozen"].as_array().unwrap();
        assert_eq!(frozen.len(), 2, "both filesystems frozen at once: {s}");
    }
    let at = |img: &Path| {
        let text = file_in(
            &PathBuf::from(format!("{}.{name}", img.display())),
            "counter",
        );
        text.parse::<u64>()
            .unwrap_or_else(|_| panic!("no counter in {}: {text:?}", img.display()))
    };
    let (ca, cb) = (at(&img_a), at(&img_b));
    assert!(
        ca == cb || ca == cb + 1,
        "A counted {ca}, B {cb}: not one instant"
    );
    assert!(cb > 0);
    // Both working images equal their sources once the writer is gone.
    both(&[]);
    run("umount", &[a.dir.to_str().unwrap()]);
    run("umount", &[b.dir.to_str().unwrap()]);
    both(&[]);
    assert!(same_content(&a.dev.backing, &img_a));
    assert!(same_content(&b.dev.backing, &img_b));
    // A disk or a target given twice is refused before anything happens.
    let err = f.fails(&[
        "sync",
        a.dev.arg(),
        &url_a,
        "--disk",
        &format!("{}={url_a}", b.dev.arg()),
    ]);
    assert!(err.contains("given twice"), "{err}");
    let twice = format!("{}=file://{}", a.dev.arg(), dir.join("other.img").display());
    let err = f.fails(&["sync", a.dev.arg(), &url_a, "--disk", &twice]);
    assert!(err.contains("given twice"), "{err}");
    assert!(!dir.join("other.img").exists());
}

/// A boot point that one disk cannot take is deleted again from the disks
/// that took it: a server boots from all of its disks or none.
#[test]
fn a_boot_point_is_on_every_disk_or_none() {
    if !privileged("a_boot_point_is_on_every_disk_or_none") {
        return;
    }
    let (a, b) = (LoopDev::new(16 * MIB), LoopDev::new(16 * MIB));
    let dir = TempDir::new();
    let f = Ferry::new();
    let (img_a, img_b) = (dir.join("a.img"), dir.join("b.img"));
    let url_a = format!("file://{}", img_a.display());
    let disk_b = format!("{}=file://{}", b.arg(), img_b.display());
    write_random(&a.path, 0, MIB as usize, 91);
    write_random(&b.path, 0, MIB as usize, 92);
    let job = [
        "sync",
        a.arg(),
        &url_a,
        "--disk",
        &disk_b,
        "--boot-point",
        "--max-boot-points",
        "30",
    ];
    // B's directory already holds files under every name the boot point can
    // get in the next 20 s, so B refuses it after A took it (fewer than the
    // 30 boot points kept, or the oldest would be merged to make room).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let squatters: Vec<PathBuf> = (0..20)
        .map(|s| {
            let name = ferry::image::boot_point_name(now + s);
            PathBuf::from(format!("{}.{name}", img_b.display()))
        })
        .collect();
    for p in &squatters {
        std::fs::write(p, b"not ferry's").unwrap();
    }
    // The job's progress lines come first; its error is the last line.
    let out = f.output(&job);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let err = stderr.trim_end().lines().last().unwrap();
    assert!(err.starts_with("ferry: "), "{stderr}");
    assert!(err.contains("not taken on every disk"), "{err}");
    assert!(err.contains("no disk has it"), "{err}");
    let points = |img: &Path| -> Vec<String> {
        let prefix = format!("{}.V", img.file_name().unwrap().to_str().unwrap());
        let mut names: Vec<String> = std::fs::read_dir(&dir.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        points(&img_a),
        Vec::<String>::new(),
        "A kept the boot point"
    );
    assert_eq!(points(&img_b).len(), squatters.len());
    // The data itself was committed on both.
    assert!(same_content(&a.backing, &img_a));
    assert!(same_content(&b.backing, &img_b));
    // Without the squatters the same job takes it on both.
    for p in &squatters {
        std::fs::remove_file(p).unwrap();
    }
    let s = f.json(&job);
    let name = s[0]["boot_point"]["name"].as_str().unwrap().to_owned();
    assert_eq!(s[1]["boot_point"]["name"], name.as_str(), "{s}");
    assert_eq!(points(&img_a), [format!("a.img.{name}")]);
    assert_eq!(points(&img_b), [format!("b.img.{name}")]);
}
