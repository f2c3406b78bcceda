//! `ferry sync` and `ferry verify` end to end: real loop devices, the real
//! tracker, a real sshd, and `cmp` of source and image as the judge.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use crate::{
    sshd::Sshd,
    util::{
        await_stderr_line, privileged, run, same_content, write_direct, write_random, Ferry,
        LoopDev, Mounted, TempDir,
    },
};

const MIB: u64 = 1 << 20;
const K64: u64 = 64 * 1024;

/// Runs `ferry sync --json` and returns the summary.
fn sync(f: &Ferry, dev: &LoopDev, url: &str, extra: &[String]) -> serde_json::Value {
    let mut args = vec!["sync", dev.arg(), url];
    args.extend(extra.iter().map(String::as_str));
    f.json(&args)
}

/// A source device, a private ferry, and a standby image in a temp dir,
/// reached through `file://` or a real sshd.
struct Standby {
    dev: LoopDev,
    f: Ferry,
    image: PathBuf,
    url: String,
    /// Login and host key options for ssh:// targets.
    extra: Vec<String>,
    _dir: TempDir,
}

impl Standby {
    fn file(size: u64) -> Self {
        Self::new(size, None)
    }

    fn ssh(sshd: &Sshd, size: u64) -> Self {
        Self::new(size, Some(sshd))
    }

    fn new(size: u64, sshd: Option<&Sshd>) -> Self {
        let dir = TempDir::new();
        let image = dir.join("standby.img");
        let (url, extra) = match sshd {
            Some(s) => (s.url(&image), s.args()),
            None => (format!("file://{}", image.display()), Vec::new()),
        };
        Self {
            dev: LoopDev::new(size),
            f: Ferry::new(),
            image,
            url,
            extra,
            _dir: dir,
        }
    }

    /// `ferry CMD DEV URL [extra] [more]`.
    fn args<'a>(&'a self, cmd: &'a str, more: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![cmd, self.dev.arg(), self.url.as_str()];
        args.extend(self.extra.iter().map(String::as_str));
        args.extend_from_slice(more);
        args
    }

    fn sync(&self) -> serde_json::Value {
        self.f.json(&self.args("sync", &[]))
    }

    /// `ferry sync --json` with the transport's debug log: the summary and
    /// what it said.
    fn sync_saying(&self) -> (serde_json::Value, String) {
        let out = self
            .f
            .command(&self.args("sync", &["--json"]))
            .env("FERRY_LOG", "ferry::transport=debug")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{said}");
        (serde_json::from_slice(&out.stdout).unwrap(), said)
    }

    fn identical(&self) -> bool {
        same_content(&self.dev.backing, &self.image)
    }

    /// The next sync is a checksum resync for a reason that says `why`,
    /// leaves the image identical, and the one after is an incremental
    /// again. Returns the resync's summary.
    fn resyncs_because(&self, why: &str) -> serde_json::Value {
        let r = self.sync();
        assert_eq!(r["mode"], "resync", "{r}");
        assert!(r["resync_reason"].as_str().unwrap().contains(why), "{r}");
        assert!(self.identical(), "{r}");
        let next = self.sync();
        assert_eq!(next["mode"], "incremental", "{next}");
        r
    }

    /// After an interrupted job: the image still differs (else the test
    /// proves nothing), and one more sync makes it identical. Returns that
    /// sync's summary.
    fn rerun_completes(&self) -> serde_json::Value {
        assert!(
            !self.identical(),
            "nothing left to do: the test proves nothing"
        );
        let again = self.sync();
        assert!(
            self.identical(),
            "image differs after the rerun (what the interrupted job found was lost): {again}"
        );
        again
    }

    /// Starts a sync that takes a few seconds (8 MiB/s on the wire), lets it
    /// get going, then calls `interrupt`; the sync must still be running.
    /// Returns the lines it prints on stderr from then on.
    fn interrupted_sync(
        &self,
        interrupt: impl FnOnce(&mut std::process::Child),
    ) -> Receiver<String> {
        self.interrupted_sync_with(&[], interrupt)
    }

    /// As `interrupted_sync`, with more options. The interrupt comes once
    /// the job says it ships data (a resync compares checksums first, which
    /// takes longer on a loaded machine), plus a moment.
    fn interrupted_sync_with(
        &self,
        more: &[&str],
        interrupt: impl FnOnce(&mut std::process::Child),
    ) -> Receiver<String> {
        let mut args = self.args("sync", &["--bwlimit", "8M", "--zstd-level", "0"]);
        args.extend_from_slice(more);
        let mut child = self
            .f
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = await_stderr_line(
            &mut child,
            |l| ["seeding", "shipping"].iter().any(|p| l.contains(p)),
            "shipping",
        );
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync finished before it could be interrupted"
        );
        interrupt(&mut child);
        let _ = child.wait();
        lines
    }
}

/// The sync notices that `what` happened mid-transfer and fails on its
/// own, within 30 s.
fn fails_on_its_own(child: &mut std::process::Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "sync hung after {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !child.wait().unwrap().success(),
        "the sync succeeded after {what}"
    );
}

/// Some scattered data on a fresh device: a few MiB of random bytes and a
/// few small writes, the rest zeros.
fn scatter(dev: &LoopDev, seed: u64) {
    write_random(&dev.path, 0, MIB as usize, seed);
    write_random(&dev.path, 7 * MIB, 3 * MIB as usize, seed + 1);
    write_direct(&dev.path, 20 * MIB + 4096, 4096, 0x5a);
}

fn end_to_end(s: &Standby) {
    scatter(&s.dev, 1);
    let seed = s.sync();
    assert_eq!(seed["mode"], "seed", "{seed}");
    assert_eq!(seed["resync"], false);
    assert!(s.identical(), "image differs after the seed");
    // Zero chunks were skipped: far fewer bytes sent than the device holds.
    let size = std::fs::metadata(&s.dev.backing).unwrap().len();
    assert!(seed["zero_bytes"].as_u64().unwrap() > size / 2, "{seed}");
    assert!(seed["sent_bytes"].as_u64().unwrap() < size / 4, "{seed}");

    // 10 small writes, 5 chunks apart: 10 chunks dirty.
    for i in 0..10u64 {
        write_random(&s.dev.path, 30 * MIB + i * 5 * K64, 4096, 100 + i);
    }
    let inc = s.sync();
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert_eq!(inc["changed_bytes"], 10 * K64, "{inc}");
    let sent = inc["sent_bytes"].as_u64().unwrap();
    assert!(sent <= 11 * K64, "sent {sent} for 640 KiB dirty");
    assert!(s.identical(), "image differs after the incremental");

    // verify agrees, and sees a difference once there is one.
    let v = s.f.json(&s.args("verify", &[]));
    assert_eq!(v["identical"], true, "{v}");
    write_direct(&s.dev.path, 40 * MIB, 4096, 0x77);
    let out = s.f.output(&s.args("verify", &[]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify must exit 1 on a difference"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&(40 * MIB).to_string()), "{text}");
}

#[test]
fn file_target_seed_incremental_verify() {
    if !privileged("file_target_seed_incremental_verify") {
        return;
    }
    end_to_end(&Standby::file(64 * MIB));
}

#[test]
fn ssh_target_seed_incremental_verify() {
    if !privileged("ssh_target_seed_incremental_verify") {
        return;
    }
    let sshd = Sshd::start();
    end_to_end(&Standby::ssh(&sshd, 64 * MIB));
}

#[test]
fn kill_9_mid_transfer_then_rerun_is_identical() {
    if !privileged("kill_9_mid_transfer_then_rerun_is_identical") {
        return;
    }
    let s = Standby::file(64 * MIB);
    write_random(&s.dev.path, 0, 8 * MIB as usize, 5);
    s.sync();
    // 32 MiB of changes at 8 MiB/s: about 4 s to ship.
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 6);
    s.interrupted_sync(|child| child.kill().unwrap());
    s.rerun_completes();
}

/// `track targets` counts what a job cut short left for the next one.
#[test]
fn track_targets_counts_what_a_cut_job_left() {
    if !privileged("track_targets_counts_what_a_cut_job_left") {
        return;
    }
    let s = Standby::file(64 * MIB);
    let behind = || {
        let t = s.f.json(&["track", "targets", s.dev.arg()]);
        let t = &t["targets"][0];
        (
            t["behind_bytes"].as_u64().unwrap(),
            t["state"].as_str().unwrap().to_owned(),
        )
    };
    write_random(&s.dev.path, 0, 40 * MIB as usize, 7);
    s.interrupted_sync(|child| child.kill().unwrap());
    assert_eq!(behind(), (64 * MIB, "not-seeded".to_owned()));
    s.rerun_completes();
    assert_eq!(behind(), (0, "ok".to_owned()));
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 8);
    s.interrupted_sync(|child| child.kill().unwrap());
    assert_eq!(behind(), (32 * MIB, "ok".to_owned()));
    s.rerun_completes();
    assert_eq!(behind(), (0, "ok".to_owned()));
}

/// SIGTERM (a service stopped, Ctrl-C's cousin) ends the job with one line
/// that says nothing is lost, and the next job completes it.
#[test]
fn sigterm_mid_transfer_says_so_and_loses_nothing() {
    if !privileged("sigterm_mid_transfer_says_so_and_loses_nothing") {
        return;
    }
    let s = Standby::file(64 * MIB);
    write_random(&s.dev.path, 0, 8 * MIB as usize, 9);
    s.sync();
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 10);
    let mut status = None;
    let lines = s.interrupted_sync(|child| {
        run("kill", &["-TERM", &child.id().to_string()]);
        status = Some(child.wait().unwrap());
    });
    assert_eq!(status.unwrap().code(), Some(128 + 15), "{status:?}");
    let said: Vec<String> = lines.iter().collect();
    assert!(
        said.iter()
            .any(|l| l.ends_with("interrupted by SIGTERM; nothing is lost: what the target did not acknowledge is shipped by the next sync")),
        "{said:?}"
    );
    s.rerun_completes();
}

#[test]
fn cut_ssh_session_then_rerun_is_identical() {
    if !privileged("cut_ssh_session_then_rerun_is_identical") {
        return;
    }
    let sshd = Sshd::start();
    let s = Standby::ssh(&sshd, 64 * MIB);
    write_random(&s.dev.path, 0, 8 * MIB as usize, 7);
    s.sync();
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 8);
    s.interrupted_sync(|child| {
        assert!(sshd.kill_sessions(), "no sshd session to kill");
        fails_on_its_own(child, "its session was cut");
    });
    s.rerun_completes();
}

#[test]
fn full_target_keeps_the_dirty_set() {
    if !privileged("full_target_keeps_the_dirty_set") {
        return;
    }
    let dev = LoopDev::new(64 * MIB);
    let target = Mounted::new(96 * MIB);
    let f = Ferry::new();
    let image = target.dir.join("standby.img");
    let url = format!("file://{}", image.display());
    write_random(&dev.path, 0, 4 * MIB as usize, 9);
    sync(&f, &dev, &url, &[]);
    // Leave about 16 MiB free: 40 MiB of incompressible changes cannot fit.
    let filler = target.dir.join("filler");
    let free = run(
        "df",
        &["--output=avail", "-B1", target.dir.to_str().unwrap()],
    );
    let free: u64 = free.lines().nth(1).unwrap().trim().parse().unwrap();
    std::fs::write(&filler, vec![1u8; (free - 16 * MIB) as usize]).unwrap();
    write_random(&dev.path, 8 * MIB, 40 * MIB as usize, 10);
    let out = f.output(&["sync", dev.arg(), &url]);
    assert!(!out.status.success(), "a full target must fail the sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let err = stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        err.starts_with("ferry: ") && err.contains("disk full"),
        "{stderr}"
    );
    // Room again: the next run ships what the failed one could not, from
    // the kept set alone (an incremental, not a resync).
    std::fs::remove_file(&filler).unwrap();
    let again = sync(&f, &dev, &url, &[]);
    assert_eq!(again["mode"], "incremental", "{again}");
    assert!(same_content(&dev.backing, &image), "image differs: {again}");
}

/// A known_hosts in `dir` that names `sshd`'s address with some other key.
fn known_hosts_with_another_key(sshd: &Sshd, dir: &TempDir) -> PathBuf {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            dir.join("k").to_str().unwrap(),
        ],
    );
    let other_pub = std::fs::read_to_string(dir.join("k.pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    let path = dir.join("known_hosts");
    std::fs::write(
        &path,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            sshd.port,
            parts.next().unwrap(),
            parts.next().unwrap()
        ),
    )
    .unwrap();
    path
}

#[test]
fn wrong_or_unknown_host_key_is_refused() {
    if !privileged("wrong_or_unknown_host_key_is_refused") {
        return;
    }
    let sshd = Sshd::start();
    let dev = LoopDev::new(16 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("standby.img");
    let url = sshd.url(&image);
    let id = sshd.dir.join("id_ed25519").display().to_string();

    let other = TempDir::new();
    let wrong = known_hosts_with_another_key(&sshd, &other);
    let err = f.fails(&[
        "sync",
        dev.arg(),
        &url,
        "--identity",
        &id,
        "--known-hosts",
        wrong.to_str().unwrap(),
    ]);
    assert!(err.contains("does not match"), "{err}");
    // Even with the opt-in, a changed key is refused.
    let err = f.fails(&[
        "sync",
        dev.arg(),
        &url,
        "--identity",
        &id,
        "--known-hosts",
        wrong.to_str().unwrap(),
        "--accept-new-host-key",
    ]);
    assert!(err.contains("does not match"), "{err}");
    assert!(
        !image.exists(),
        "nothing may be written to a host that failed verification"
    );

    // Unknown: refused, then recorded with the explicit opt-in.
    let empty = other.join("empty_known_hosts");
    let err = f.fails(&[
        "sync",
        dev.arg(),
        &url,
        "--identity",
        &id,
        "--known-hosts",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("--accept-new-host-key"), "{err}");
    assert!(!image.exists());
    f.ok(&[
        "sync",
        dev.arg(),
        &url,
        "--identity",
        &id,
        "--known-hosts",
        empty.to_str().unwrap(),
        "--accept-new-host-key",
    ]);
    let recorded = std::fs::read_to_string(&empty).unwrap();
    assert!(
        recorded.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)),
        "{recorded}"
    );
    assert!(same_content(&dev.backing, &image));
}

/// A login that prints before it runs the command (a message of the day,
/// an `echo` in a shell's rc file; the second without a newline) neither
/// breaks the binary push nor the agent's stream. The login's home is
/// fresh, so this build is pushed.
#[test]
fn a_login_that_prints_first_still_syncs() {
    if !privileged("a_login_that_prints_first_still_syncs") {
        return;
    }
    let home = TempDir::new();
    let sshd = Sshd::start_with_key_options(&format!(
        r#"command="export HOME={}; echo Welcome to the standby host; printf 'Last backup: never'; eval \"$SSH_ORIGINAL_COMMAND\"""#,
        home.path.display()
    ));
    let s = Standby::ssh(&sshd, 32 * MIB);
    scatter(&s.dev, 7);
    let seed = s.sync();
    assert_eq!(seed["mode"], "seed", "{seed}");
    assert!(s.identical(), "image differs after the seed");
    let pushed = std::fs::read_dir(home.join(".cache/ferry"))
        .expect("this build was pushed into the login's home")
        .filter_map(Result::ok)
        .any(|e| e.path().join("ferry").is_file());
    assert!(pushed, "no pushed copy under {}", home.path.display());
    write_random(&s.dev.path, 5 * MIB, 64 * 1024, 8);
    let inc = s.sync();
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert!(s.identical(), "image differs after the incremental");
}

/// A ferry of this version that cannot stay on the target (another build
/// of it, without kept agents) still serves the job, as an agent that does
/// not stay.
#[test]
fn an_agent_that_cannot_stay_still_syncs() {
    if !privileged("an_agent_that_cannot_stay_still_syncs") {
        return;
    }
    // The launcher's line, then an agent that refuses `--keep`.
    let sshd = Sshd::start_with_key_options(
        r#"command="case \"$SSH_ORIGINAL_COMMAND\" in *--keep*) echo ferry-launcher: agent starting; echo \"error: unexpected argument '--keep' found\" >&2; exit 2;; *) eval \"$SSH_ORIGINAL_COMMAND\";; esac""#,
    );
    let s = Standby::ssh(&sshd, 32 * MIB);
    scatter(&s.dev, 12);
    let (seed, said) = s.sync_saying();
    assert_eq!(seed["mode"], "seed", "{seed}");
    assert!(said.contains("an agent that does not stay"), "{said}");
    assert!(said.contains("unexpected argument"), "{said}");
    assert!(s.identical(), "image differs after the seed");
    assert!(sshd.kept_agents().is_empty());
    write_direct(&s.dev.path, 3 * MIB, 4096, 0x21);
    let (inc, said) = s.sync_saying();
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert!(!said.contains("reached the kept agent"), "{said}");
    assert!(s.identical(), "image differs after the incremental");
}

/// A login that refuses commands (a nologin shell) gets one line that
/// quotes what it said, and nothing is written.
#[test]
fn a_login_that_refuses_commands_is_quoted() {
    if !privileged("a_login_that_refuses_commands_is_quoted") {
        return;
    }
    let sshd = Sshd::start_with_key_options(
        r#"command="echo This account is currently not available.; exit 1""#,
    );
    let s = Standby::ssh(&sshd, 16 * MIB);
    let err = s.f.fails(&s.args("sync", &[]));
    assert!(
        err.contains("cannot start ferry's agent")
            && err.contains("printed \"This account is currently not available.\""),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!s.image.exists(), "nothing may be written");
}

/// An image that already holds the data (copied some other way, or left
/// by a source that was untracked and tracked again) is compared, not
/// copied again: the first job ships only what differs.
#[test]
fn an_image_that_already_holds_the_data_is_compared_not_copied() {
    if !privileged("an_image_that_already_holds_the_data_is_compared_not_copied") {
        return;
    }
    let s = Standby::file(32 * MIB);
    scatter(&s.dev, 11);
    std::fs::copy(&s.dev.backing, &s.image).unwrap();
    write_direct(&s.dev.path, 5 * MIB, 4096, 0x42);
    let first = s.sync();
    assert_eq!(first["mode"], "resync", "{first}");
    assert!(s.identical(), "{first}");
    let sent = first["sent_bytes"].as_u64().unwrap();
    assert!(sent < 256 * 1024, "sent {sent} bytes for one changed chunk");

    // Untracked and tracked again, the device is a new source: refused,
    // with the way out in the message; taking the image over compares.
    s.f.ok(&["track", "remove", s.dev.arg()]);
    write_direct(&s.dev.path, 9 * MIB, 4096, 0x43);
    let err = s.f.fails(&s.args("sync", &[]));
    assert!(err.contains("--force-new-source"), "{err}");
    let taken = s.f.json(&s.args("sync", &["--force-new-source"]));
    assert_eq!(taken["mode"], "resync", "{taken}");
    assert!(s.identical(), "{taken}");
    let sent = taken["sent_bytes"].as_u64().unwrap();
    assert!(sent < 256 * 1024, "sent {sent} bytes for one changed chunk");
    let next = s.sync();
    assert_eq!(next["mode"], "incremental", "{next}");

    // A chunk size for a device tracked already is not silently ignored.
    let out = s.f.output(&s.args("sync", &["--chunk-size", "4K"]));
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("already tracked in 64K chunks"), "{said}");
}

/// `--bwlimit` holds over a job of about 10 s: what went on the wire,
/// divided by the whole job's time, stays within 5% of the limit. (Only
/// the upper side is asserted: a loaded machine may well be slower.)
#[test]
fn bwlimit_holds_over_ten_seconds() {
    if !privileged("bwlimit_holds_over_ten_seconds") {
        return;
    }
    let s = Standby::file(32 * MIB);
    write_random(&s.dev.path, 0, 20 * MIB as usize, 21);
    let limit = 2 * MIB;
    let seed =
        s.f.json(&s.args("sync", &["--bwlimit", "2M", "--zstd-level", "0"]));
    assert!(s.identical(), "{seed}");
    let sent = seed["sent_bytes"].as_u64().unwrap();
    let secs = seed["duration_secs"].as_f64().unwrap();
    assert!(sent > 20 * MIB, "{seed}");
    let rate = sent as f64 / secs;
    assert!(
        rate <= limit as f64 * 1.05,
        "{rate:.0} B/s on the wire over {secs:.1} s, limit {limit}: {seed}"
    );
}

#[test]
fn path_escapes_are_refused() {
    if !privileged("path_escapes_are_refused") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let root = TempDir::new();
    let outside = TempDir::new();
    let f = Ferry::new();
    // A symlink in the root pointing outside it.
    let victim = outside.join("victim.img");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, root.join("standby.img")).unwrap();
    let err = f.fails(&[
        "sync",
        dev.arg(),
        &format!("file://{}", root.join("standby.img").display()),
    ]);
    assert!(err.contains("outside"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // `..` in the address is refused before anything runs.
    let err = f.fails(&[
        "sync",
        dev.arg(),
        &format!("file://{}/../x.img", root.path.display()),
    ]);
    assert!(err.contains(".."), "{err}");
    assert!(!outside.path.parent().unwrap().join("x.img").exists());
}

#[test]
fn corrupted_frame_is_detected_and_not_applied() {
    if !privileged("corrupted_frame_is_detected_and_not_applied") {
        return;
    }
    let s = Standby::file(16 * MIB);
    s.sync();
    write_direct(&s.dev.path, 3 * MIB, 4096, 0xee);
    let out =
        s.f.command(&s.args("sync", &[]))
            .env("FERRY_TEST_CORRUPT_FRAME", "1")
            .output()
            .unwrap();
    assert!(!out.status.success(), "a corrupt frame must fail the sync");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum"), "{err}");
    let img = std::fs::read(&s.image).unwrap();
    assert!(
        img[3 * MIB as usize..3 * MIB as usize + 4096]
            .iter()
            .all(|&b| b == 0),
        "corrupt data was applied"
    );
    s.sync();
    assert!(s.identical());
}

#[test]
fn second_source_is_refused() {
    if !privileged("second_source_is_refused") {
        return;
    }
    let a = LoopDev::new(16 * MIB);
    let b = LoopDev::new(16 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("standby.img");
    let url = format!("file://{}", image.display());
    write_random(&a.path, 0, MIB as usize, 11);
    write_random(&b.path, 0, MIB as usize, 12);
    sync(&f, &a, &url, &[]);
    let err = f.fails(&["sync", b.arg(), &url]);
    assert!(err.contains("belongs to source"), "{err}");
    assert!(
        same_content(&a.backing, &image),
        "the refused source changed the image"
    );
    // Taking the image over is an explicit decision.
    let took = sync(&f, &b, &url, &["--force-new-source".into()]);
    assert!(same_content(&b.backing, &image), "{took}");
}

#[test]
fn ssh_connection_and_agent_are_kept_for_the_next_job() {
    if !privileged("ssh_connection_and_agent_are_kept_for_the_next_job") {
        return;
    }
    const REACHED: &str = "reached the kept agent";
    let sshd = Sshd::start();
    let s = Standby::ssh(&sshd, 32 * MIB);
    scatter(&s.dev, 41);
    s.sync();
    let kept = sshd.connections(|n| n == 1);
    assert_eq!(kept.len(), 1, "the seed's connection should stay open");
    let agents = sshd.kept_agents();
    assert_eq!(agents.len(), 1, "the seed's agent should stay: {agents:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agents[0]), 0o600, "only its user may reach the agent");

    // The incremental runs on the kept agent, over the kept connection.
    write_direct(&s.dev.path, 5 * MIB, 4096, 0x5a);
    let (next, said) = s.sync_saying();
    assert_eq!(next["mode"], "incremental", "{next}");
    assert!(said.contains(REACHED), "{said}");
    assert!(s.identical(), "{next}");
    assert_eq!(
        sshd.connections(|n| n == 1),
        kept,
        "the incremental made a connection of its own"
    );

    // The kept agent gone (its socket removed, as at a logout): the next
    // job launches an agent, which stays in turn for the one after.
    std::fs::remove_file(&agents[0]).unwrap();
    write_direct(&s.dev.path, 6 * MIB, 4096, 0xa5);
    let (again, said) = s.sync_saying();
    assert!(!said.contains(REACHED), "{said}");
    assert!(s.identical(), "{again}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sshd.kept_agents().is_empty() {
        assert!(Instant::now() < deadline, "the new agent does not stay");
        std::thread::sleep(Duration::from_millis(50));
    }
    write_direct(&s.dev.path, 7 * MIB, 4096, 0x3c);
    let (third, said) = s.sync_saying();
    assert!(said.contains(REACHED), "{said}");
    assert!(s.identical(), "{third}");

    // --ssh-persist 0: a connection and an agent of its own, both gone
    // when the job ends.
    write_direct(&s.dev.path, 8 * MIB, 4096, 0xc3);
    let out =
        s.f.command(&s.args("sync", &["--ssh-persist", "0"]))
            .env("FERRY_LOG", "ferry::transport=debug")
            .output()
            .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains(REACHED), "{said}");
    assert!(s.identical(), "{said}");
    assert_eq!(sshd.connections(|n| n == 1), kept, "{said}");

    // The state directory holds the connection's socket and the kept
    // agent's forward, both root-only, in a root-only directory.
    let state = s.f.state.join("ssh");
    let sockets: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sockets.len(), 2, "{sockets:?}");
    for socket in &sockets {
        assert_eq!(mode(socket), 0o600, "{}", socket.display());
    }
    assert_eq!(mode(&state), 0o700, "the sockets' directory is root-only");
}

/// A server that refuses forwarding (`restrict` on the key) cannot reach
/// the kept agent: the job that finds so launches an agent, and the jobs
/// after it launch agents that do not stay, without trying first.
#[test]
fn a_server_that_refuses_forwarding_gets_agents_that_do_not_stay() {
    if !privileged("a_server_that_refuses_forwarding_gets_agents_that_do_not_stay") {
        return;
    }
    let sshd = Sshd::start_with_key_options("restrict");
    let s = Standby::ssh(&sshd, 32 * MIB);
    scatter(&s.dev, 13);
    let (seed, _) = s.sync_saying();
    assert_eq!(seed["mode"], "seed", "{seed}");
    assert_eq!(sshd.kept_agents().len(), 1, "the seed's agent stays");
    write_direct(&s.dev.path, 3 * MIB, 4096, 0x31);
    let (inc, said) = s.sync_saying();
    assert_eq!(inc["mode"], "incremental", "{inc}");
    assert!(said.contains("did not answer"), "{said}");
    assert!(
        said.contains("does not forward to the kept agent"),
        "{said}"
    );
    assert!(s.identical(), "{inc}");
    write_direct(&s.dev.path, 4 * MIB, 4096, 0x32);
    let (next, said) = s.sync_saying();
    assert!(
        said.contains("refused to forward to a kept agent lately"),
        "{said}"
    );
    assert!(!said.contains("did not answer"), "tried again: {said}");
    assert!(s.identical(), "{next}");
}

/// Two jobs to images under the same root run at once on the one agent
/// kept for that root, each in its own session.
#[test]
fn a_kept_agent_serves_two_jobs_at_once() {
    if !privileged("a_kept_agent_serves_two_jobs_at_once") {
        return;
    }
    let sshd = Sshd::start();
    let dir = TempDir::new();
    let f = Ferry::new();
    let devs = [LoopDev::new(32 * MIB), LoopDev::new(32 * MIB)];
    let images = [dir.join("a.img"), dir.join("b.img")];
    let urls = images.each_ref().map(|i| sshd.url(i));
    for (i, dev) in devs.iter().enumerate() {
        write_random(&dev.path, 0, 4 * MIB as usize, 51 + i as u64);
        sync(&f, dev, &urls[i], &sshd.args());
    }
    assert_eq!(sshd.kept_agents().len(), 1, "one agent for the root");
    for (i, dev) in devs.iter().enumerate() {
        write_random(&dev.path, 8 * MIB, 16 * MIB as usize, 61 + i as u64);
    }
    // 16 MiB at 8 MB/s each: the two sessions overlap for seconds.
    let jobs: Vec<_> = devs
        .iter()
        .zip(&urls)
        .map(|(dev, url)| {
            let mut args = vec!["sync", dev.arg(), url.as_str(), "--bwlimit", "8M"];
            let login = sshd.args();
            args.extend(login.iter().map(String::as_str));
            f.command(&args)
                .env("FERRY_LOG", "ferry::transport=debug")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for job in jobs {
        let out = job.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("reached the kept agent"), "{said}");
    }
    for (dev, image) in devs.iter().zip(&images) {
        assert!(same_content(&dev.backing, image), "{}", image.display());
    }
}

#[test]
fn killed_kept_agent_then_rerun_is_identical() {
    if !privileged("killed_kept_agent_then_rerun_is_identical") {
        return;
    }
    let sshd = Sshd::start();
    let s = Standby::ssh(&sshd, 64 * MIB);
    write_random(&s.dev.path, 0, 8 * MIB as usize, 17);
    s.sync();
    let agents = sshd.kept_agents();
    assert_eq!(agents.len(), 1, "the seed's agent should stay: {agents:?}");
    let name = agents[0].file_stem().unwrap().to_str().unwrap();
    let name = name.strip_prefix("keep-").unwrap().to_owned();
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 18);
    let lines = s.interrupted_sync(|child| {
        run(
            "pkill",
            &["-KILL", "-f", &format!("agent --root .* --listen {name}")],
        );
        fails_on_its_own(child, "its agent died");
    });
    let said: Vec<String> = lines.iter().collect();
    assert!(
        said.iter()
            .any(|l| l.contains("lost") || l.contains("closed")),
        "{said:?}"
    );
    s.rerun_completes();
}

#[test]
fn refused_connection_after_reading_ahead_loses_nothing() {
    if !privileged("refused_connection_after_reading_ahead_loses_nothing") {
        return;
    }
    let sshd = Sshd::start();
    let s = Standby::ssh(&sshd, 32 * MIB);
    scatter(&s.dev, 43);
    s.sync();
    // The next job expects an incremental and freezes the dirty set while
    // it connects; with a known_hosts that refuses the host, it must keep
    // those chunks for the job after it.
    write_direct(&s.dev.path, 9 * MIB, 8192, 0x77);
    let other = TempDir::new();
    let wrong = known_hosts_with_another_key(&sshd, &other);
    let id = sshd.dir.join("id_ed25519");
    let err = s.f.fails(&[
        "sync",
        s.dev.arg(),
        &s.url,
        "--identity",
        id.to_str().unwrap(),
        "--known-hosts",
        wrong.to_str().unwrap(),
    ]);
    assert!(err.contains("does not match"), "{err}");
    let again = s.sync();
    assert_eq!(again["mode"], "incremental", "{again}");
    assert!(s.identical(), "the refused job's chunks were lost: {again}");
}

#[test]
fn expected_incremental_on_a_taken_over_image_resyncs() {
    if !privileged("expected_incremental_on_a_taken_over_image_resyncs") {
        return;
    }
    let a = Standby::file(32 * MIB);
    scatter(&a.dev, 45);
    a.sync();
    // Another source takes the image over; `a` still believes it is seeded
    // and reads ahead for an incremental, which the target turns into a
    // checksum resync.
    let b = LoopDev::new(32 * MIB);
    write_random(&b.path, 2 * MIB, MIB as usize, 46);
    let fb = Ferry::new();
    sync(&fb, &b, &a.url, &["--force-new-source".into()]);
    write_direct(&a.dev.path, 12 * MIB, 4096, 0x33);
    let back = a.f.json(&a.args("sync", &["--force-new-source"]));
    assert_eq!(back["mode"], "resync", "{back}");
    assert!(a.identical(), "{back}");
    let next = a.sync();
    assert_eq!(next["mode"], "incremental", "{next}");
    assert!(a.identical(), "{next}");
}

#[test]
fn a_grown_device_ships_its_new_space() {
    if !privileged("a_grown_device_ships_its_new_space") {
        return;
    }
    let s = Standby::file(32 * MIB);
    scatter(&s.dev, 61);
    s.sync();
    // The volume grows and is written past its old end before ferry runs
    // again: the tracker never saw those writes.
    s.dev.grow(48 * MIB);
    write_random(&s.dev.path, 40 * MIB, MIB as usize, 62);
    write_direct(&s.dev.path, 4 * MIB, 4096, 0x77);
    // The next command notices and follows.
    let list = s.f.json(&["track", "list"]);
    assert_eq!(list["devices"][0]["size"], 48 * MIB, "{list}");
    assert_eq!(list["devices"][0]["state"], "tracking", "{list}");
    assert!(
        list["devices"][0]["dirty_bytes"].as_u64().unwrap() >= 16 * MIB,
        "the new space is not dirty: {list}"
    );
    // The raw image grows with its source, and gets the new space and the
    // writes made meanwhile in an incremental, not a resync.
    let r = s.sync();
    assert_eq!(r["mode"], "incremental", "{r}");
    assert_eq!(std::fs::metadata(&s.image).unwrap().len(), 48 * MIB);
    assert!(s.identical(), "{r}");
    assert!(r["sent_bytes"].as_u64().unwrap() < 2 * MIB, "{r}");
    // The new space is tracked from now on.
    write_random(&s.dev.path, 46 * MIB, 8192, 63);
    let r = s.sync();
    assert_eq!(r["changed_bytes"], 64 << 10, "{r}");
    assert!(s.identical(), "{r}");
}

#[test]
fn a_qcow2_standby_grows_with_its_device() {
    if !privileged("a_qcow2_standby_grows_with_its_device") {
        return;
    }
    let dev = LoopDev::new(32 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("web.qcow2");
    let url = format!("file://{}", image.display());
    write_random(&dev.path, 0, 2 * MIB as usize, 64);
    sync(&f, &dev, &url, &[]);
    dev.grow(48 * MIB);
    write_random(&dev.path, 44 * MIB, MIB as usize, 65);
    let r = sync(&f, &dev, &url, &[]);
    assert_eq!(r["mode"], "incremental", "{r}");
    let img = image.to_str().unwrap();
    run("qemu-img", &["check", img]);
    let info = run("qemu-img", &["info", "--output=json", img]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 48 * MIB)),
        "{info}"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            dev.backing.to_str().unwrap(),
            img,
        ],
    );
}

/// A job that fails after the target recorded this source's identity, but
/// before the device was tracked, offers the same identity next time: the
/// target does not refuse the retry as another source.
#[test]
fn a_retry_after_tracking_failed_is_the_same_source() {
    if !privileged("a_retry_after_tracking_failed_is_the_same_source") {
        return;
    }
    // Nine partitions: one disk's tracked slots run out at eight.
    let table = format!("label: gpt\n{}", "size=4MiB\n".repeat(9));
    let dev = LoopDev::with_table(64 * MIB, &table);
    let part = |n: u32| {
        let p = dev.partition(n);
        for _ in 0..200 {
            if p.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        p.to_str().unwrap().to_owned()
    };
    let f = Ferry::new();
    for n in 1..=8 {
        f.ok(&["track", "add", &part(n)]);
    }
    let dir = TempDir::new();
    let image = dir.join("p9.img");
    let url = format!("file://{}", image.display());
    let p9 = part(9);
    let out = f.output(&["sync", &p9, &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("too many tracked devices"), "{err}");
    assert!(
        image.exists(),
        "the target did not record the source: proves nothing"
    );
    f.ok(&["track", "remove", &part(8)]);
    let r = f.json(&["sync", &p9, &url]);
    assert_ne!(r["mode"], "incremental", "{r}");
    assert!(same_content(Path::new(&p9), &image), "{r}");
}

#[test]
fn other_media_under_the_same_device_is_compared_not_trusted() {
    if !privileged("other_media_under_the_same_device_is_compared_not_trusted") {
        return;
    }
    let mut s = Standby::file(32 * MIB);
    scatter(&s.dev, 71);
    s.sync();
    // The loop device gets another file under the same number: a copy of
    // its disk changed elsewhere, by writes the tracker never saw.
    let other = PathBuf::from(format!("{}.other", s.dev.backing.display()));
    std::fs::copy(&s.dev.backing, &other).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&other)
            .unwrap();
        f.write_all_at(&[0xc3; 8192], 9 * MIB).unwrap();
        f.write_all_at(&[0x3c; 4096], 30 * MIB).unwrap();
    }
    s.dev.reattach(other);
    write_direct(&s.dev.path, 5 * MIB, 4096, 0x42);
    s.resyncs_because("other media");
}

/// A partition moved to another start (same name, same size; the kernel
/// may give it another device number): its bits describe sectors it no
/// longer holds, so the next sync compares checksums, as the same source,
/// and tracking follows the new start from then on.
#[test]
fn a_moved_partition_is_compared_not_trusted() {
    if !privileged("a_moved_partition_is_compared_not_trusted") {
        return;
    }
    let table = |start: u64| format!("label: dos\nstart={start}, size=32768, type=83\n");
    let dev = LoopDev::with_table(64 * MIB, &table(2048));
    // Different data under the old and the new place of the partition.
    for i in 0..24 {
        write_random(&dev.path, MIB + i * MIB, 1 << 20, 500 + i);
    }
    let p1 = dev.partition(1);
    let p1s = p1.to_str().unwrap();
    let f = Ferry::new();
    let dir = TempDir::new();
    let image = dir.join("p1.img");
    let url = format!("file://{}", image.display());
    let seed = f.json(&["sync", p1s, &url]);
    assert_eq!(seed["mode"], "seed", "{seed}");
    assert!(same_content(&p1, &image));

    // The partition now starts 1 MiB further in: nothing was written, yet
    // every byte of it changed.
    dev.repartition(&table(4096));
    assert!(
        !same_content(&p1, &image),
        "the move changed nothing: proves nothing"
    );
    let r = f.json(&["sync", p1s, &url]);
    assert_eq!(r["mode"], "resync", "{r}");
    // The kernel may keep the partition's number or give it another one.
    let why = r["resync_reason"].as_str().unwrap();
    assert!(
        why.contains("partition") && why.contains("start sector 2048, now 4096"),
        "{r}"
    );
    assert!(same_content(&p1, &image), "{r}");

    // Writes through the moved partition land in its new bits.
    write_random(&p1, 3 * MIB, 4096, 77);
    let r = f.json(&["sync", p1s, &url]);
    assert_eq!(r["mode"], "incremental", "{r}");
    assert!(same_content(&p1, &image), "{r}");
}

#[test]
fn an_image_written_outside_ferry_is_compared_not_trusted() {
    if !privileged("an_image_written_outside_ferry_is_compared_not_trusted") {
        return;
    }
    let s = Standby::file(32 * MIB);
    scatter(&s.dev, 81);
    s.sync();
    write_direct(&s.dev.path, 3 * MIB, 4096, 0x11);
    assert_eq!(s.sync()["mode"], "incremental");
    // Someone boots the standby on the image, or mounts it read-write.
    std::thread::sleep(std::time::Duration::from_millis(50));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.image)
            .unwrap();
        f.write_all_at(&[0xee; 4096], 12 * MIB).unwrap();
    }
    write_direct(&s.dev.path, 5 * MIB, 4096, 0x22);
    s.resyncs_because("something other than ferry");
}

#[test]
fn lost_tracking_state_leads_to_checksum_resync() {
    if !privileged("lost_tracking_state_leads_to_checksum_resync") {
        return;
    }
    let s = Standby::file(64 * MIB);
    scatter(&s.dev, 13);
    s.sync();
    // The kernel state goes away (as at a reboot); then 3 chunks change.
    std::fs::remove_dir_all(&s.f.bpf).unwrap();
    for i in 0..3u64 {
        write_random(&s.dev.path, 50 * MIB + i * MIB, 4096, 20 + i);
    }
    let list = s.f.json(&["track", "list"]);
    let state = list["devices"][0]["state"].as_str().unwrap().to_owned();
    assert_eq!(state, "needs-resync", "{list}");
    let r = s.resyncs_because("tracking-lost");
    assert_eq!(r["differing_bytes"], 3 * K64, "{r}");
    assert!(
        r["sent_bytes"].as_u64().unwrap() < 4 * K64,
        "only the differing chunks are sent: {r}"
    );
}

#[test]
fn one_device_feeds_two_targets() {
    if !privileged("one_device_feeds_two_targets") {
        return;
    }
    let dev = LoopDev::new(32 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let (ua, ub) = (
        format!("file://{}", a.display()),
        format!("file://{}", b.display()),
    );
    write_random(&dev.path, 0, MIB as usize, 30);
    sync(&f, &dev, &ua, &[]);
    sync(&f, &dev, &ub, &[]);
    write_direct(&dev.path, 5 * MIB, 4096, 1);
    sync(&f, &dev, &ua, &[]);
    write_direct(&dev.path, 9 * MIB, 4096, 2);
    // Each target's lag, the kernel's undrained marks included.
    let behind = |f: &Ferry| -> Vec<(String, u64, String)> {
        let list = f.json(&["track", "targets", dev.arg()]);
        list["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert!(t["last_sync"].as_u64().unwrap() > 0, "{t}");
                (
                    t["target"].as_str().unwrap().to_owned(),
                    t["behind_bytes"].as_u64().unwrap(),
                    t["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        behind(&f),
        [
            (ua.clone(), K64, "ok".to_owned()),
            (ub.clone(), 2 * K64, "ok".to_owned())
        ]
    );
    // `track drain` takes the bits, but both targets keep what they need.
    f.ok(&["track", "drain", dev.arg()]);
    assert_eq!(behind(&f)[1].1, 2 * K64);
    sync(&f, &dev, &ua, &[]);
    assert_eq!(behind(&f)[0].1, 0);
    let text = f.ok(&["track", "targets"]);
    assert!(text.contains(&ub) && text.contains(" ago)"), "{text}");
    let rb = sync(&f, &dev, &ub, &[]);
    assert_eq!(rb["changed_bytes"], 2 * K64, "{rb}");
    assert!(same_content(&dev.backing, &a));
    assert!(same_content(&dev.backing, &b));
    // A retired standby is forgotten; fed again later, it is compared.
    f.ok(&["track", "forget", dev.arg(), &ub]);
    assert_eq!(behind(&f).len(), 1);
    let err = f.fails(&["track", "forget", dev.arg(), &ub]);
    assert!(err.contains("does not feed"), "{err}");
    write_direct(&dev.path, 13 * MIB, 4096, 3);
    let again = sync(&f, &dev, &ub, &[]);
    assert_eq!(again["mode"], "resync", "{again}");
    assert!(same_content(&dev.backing, &b));
}

#[test]
fn sync_on_a_filesystem_in_use() {
    if !privileged("sync_on_a_filesystem_in_use") {
        return;
    }
    let src = Mounted::new(64 * MIB);
    let dir = TempDir::new();
    let f = Ferry::new();
    let image = dir.join("standby.img");
    let url = format!("file://{}", image.display());
    for i in 0..20 {
        std::fs::write(
            src.dir.join(format!("file{i}")),
            vec![i as u8; 100_000 + i * 3000],
        )
        .unwrap();
    }
    run("sync", &[]);
    let dev = &src.dev;
    sync(&f, dev, &url, &[]);
    std::fs::write(src.dir.join("new"), vec![7u8; 300_000]).unwrap();
    run("umount", &[src.dir.to_str().unwrap()]);
    let inc = sync(&f, dev, &url, &[]);
    assert_eq!(inc["mode"], "incremental");
    assert!(same_content(&dev.backing, &image), "{inc}");
    // The image is a valid filesystem with the new file in it.
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn torture_writes_during_repeated_syncs() {
    if !privileged("torture_writes_during_repeated_syncs") {
        return;
    }
    let secs: u64 = std::env::var("FERRY_SYNC_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let s = Standby::file(64 * MIB);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = s.dev.path.clone();
        std::thread::spawn(move || {
            let mut x: u64 = 0x1234_5678;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (64 * MIB / 4096)) * 4096;
                let len = 4096 * (1 + (x >> 40) % 16) as usize;
                let len = len.min((64 * MIB - offset) as usize);
                write_random(&path, offset, len, x);
                n += 1;
                if n.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut syncs = 0;
    while Instant::now() < deadline {
        let r = s.sync();
        assert_ne!(
            r["mode"], "resync",
            "nothing should force a resync here: {r}"
        );
        syncs += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let last = s.sync();
    assert_eq!(last["mode"], "incremental", "{last}");
    assert!(
        syncs >= 3 && writes > 100,
        "too little happened: {syncs} syncs, {writes} writes"
    );
    assert!(
        s.identical(),
        "image differs after {syncs} syncs under {writes} writes: {last}"
    );
}

/// Regression: replies to hash requests sent ahead arrived while the next
/// request was being sent and were taken for a protocol error, so verify
/// and resync failed on devices larger than the requests in flight.
#[test]
fn verify_reads_replies_that_arrive_early() {
    if !privileged("verify_reads_replies_that_arrive_early") {
        return;
    }
    let s = Standby::file(640 * MIB);
    write_random(&s.dev.path, 600 * MIB, MIB as usize, 40);
    s.sync();
    let v = s.f.json(&s.args("verify", &[]));
    assert_eq!(v["identical"], true, "{v}");
    let r = s.f.json(&s.args("sync", &["--resync"]));
    assert_eq!(r["differing_bytes"], 0, "{r}");
}

/// Regression: a resync asked for with --resync and killed while shipping
/// forgot what it had found different, and the next (incremental) run
/// left the image wrong.
#[test]
fn killed_resync_is_completed_by_the_next_sync() {
    if !privileged("killed_resync_is_completed_by_the_next_sync") {
        return;
    }
    let s = Standby::file(64 * MIB);
    write_random(&s.dev.path, 16 * MIB, 32 * MIB as usize, 50);
    s.sync();
    // Damage 32 MiB of the image behind ferry's back, leaving its
    // modification time as it was (as failing media would): only a
    // checksum resync can see it.
    {
        use std::os::unix::fs::FileExt;
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.image)
            .unwrap();
        let mtime = img.metadata().unwrap().modified().unwrap();
        img.write_all_at(&vec![0xa5; 32 * MIB as usize], 16 * MIB)
            .unwrap();
        img.set_modified(mtime).unwrap();
    }
    s.interrupted_sync_with(&["--resync"], |child| child.kill().unwrap());
    let next = s.rerun_completes();
    assert_eq!(next["mode"], "incremental", "{next}");
}
