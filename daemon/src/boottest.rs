//! `ferry boot-test`: proves a standby boots. qemu (TCG, so no KVM is
//! needed) boots the working image or a boot point, and the serial console
//! is watched for a text the guest prints once it is up (`login:` by
//! default).
//!
//! Nothing is written: qemu runs with `-snapshot`, so guest writes go to a
//! temporary overlay. The image's session lock (`IMAGE.ferry.lock`) is held
//! for the whole test, as `ferry boot-points revert` holds it: a sync cannot
//! change the files under the booting guest, and a sync that starts
//! meanwhile is refused as busy.
//!
//! Which file boots comes from the format ([`Standby::boot_file`]). A boot
//! point kept as an internal snapshot (qcow2) is first copied out with
//! `qemu-img convert -l snapshot.name=…` into a temporary raw file: qemu
//! cannot boot an internal snapshot without its saved VM state.
//!
//! [`Standby::boot_file`]: crate::image::Standby::boot_file

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    image::{self, BootFile, Dir, ImageError, Standby},
    sys::fs as sysfs,
    transport::{Endpoint, TargetUrl},
};

/// What a Linux guest prints once it is up.
pub const DEFAULT_EXPECT: &str = "login:";
/// Lines of the console a report keeps.
pub const TAIL_LINES: usize = 20;
/// Console bytes kept in memory; older output is dropped.
const CONSOLE_CAP: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BootTestError {
    #[error(
        "boot-test runs on the target host, beside the image: run it there with file://{path}"
    )]
    Remote { path: String },
    #[error("image {image} does not exist")]
    NoImage { image: String },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{image} is in use by another ferry session")]
    Busy { image: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot start {program} (install qemu-system-x86, or name it with --qemu)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("qemu-img convert of snapshot {snapshot} of {file} failed: {detail}")]
    Convert {
        file: String,
        snapshot: String,
        detail: String,
    },
    #[error("qemu failed ({status}): {detail}")]
    Qemu { status: String, detail: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BootTestError {
    let what = what.into();
    move |source| BootTestError::Io { what, source }
}

/// How the disk is attached to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bus {
    /// virtio-blk: needs virtio drivers in the guest (Linux has them).
    Virtio,
    /// An AHCI (SATA) controller: drivers every OS has.
    Sata,
    /// The PIIX IDE controller: the oldest and slowest, for old guests.
    Ide,
}

impl FromStr for Bus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtio" => Ok(Bus::Virtio),
            "sata" => Ok(Bus::Sata),
            "ide" => Ok(Bus::Ide),
            other => Err(format!(
                "unknown disk bus {other:?} (known: virtio, sata, ide)"
            )),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootTestOptions {
    /// The boot point to boot; `None` boots the working image.
    pub point: Option<String>,
    /// The console text that means the guest booted.
    pub expect: String,
    /// How long the guest gets to print it.
    pub timeout: Duration,
    /// qemu-system-x86_64 to run.
    pub qemu: PathBuf,
    /// qemu-img, for boot points held as internal snapshots.
    pub qemu_img: PathBuf,
    pub bus: Bus,
    pub memory_mib: u32,
}

impl BootTestOptions {
    pub fn new(point: Option<String>) -> Self {
        Self {
            point,
            expect: DEFAULT_EXPECT.to_owned(),
            timeout: Duration::from_secs(300),
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            bus: Bus::Virtio,
            memory_mib: 512,
        }
    }
}

/// How the watch ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The console showed the text (qemu was stopped then).
    Seen,
    /// The guest stopped qemu (powered off, or a reset with `-no-reboot`)
    /// without showing the text.
    GuestStopped,
    /// The time ran out.
    TimedOut,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootTestReport {
    pub passed: bool,
    pub outcome: Outcome,
    /// The file qemu booted, relative to the image's directory.
    pub file: String,
    pub format: String,
    /// The internal snapshot copied out to boot, if any.
    pub snapshot: Option<String>,
    pub expect: String,
    pub seconds: f64,
    /// The last [`TAIL_LINES`] lines of the console, control sequences
    /// removed.
    pub console_tail: Vec<String>,
}

/// Boots `target`'s working image or `opts.point` and watches the console
/// for `opts.expect`. A guest that does not show it is a report with
/// `passed: false`; an error means the test could not be run. A remote
/// target's test runs in its agent ([`crate::sync::manage::task`]).
pub fn boot_test(
    target: &TargetUrl,
    opts: &BootTestOptions,
) -> Result<BootTestReport, BootTestError> {
    if target.endpoint != Endpoint::Local {
        return Err(BootTestError::Remote {
            path: target.root.join(&target.image).display().to_string(),
        });
    }
    let open_dir =
        || Dir::open(&target.root).map_err(io_err(format!("{}: open", target.root.display())));
    let dir = open_dir()?;
    match dir.open_read(&target.image) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BootTestError::NoImage {
                image: target.image.clone(),
            })
        }
        other => drop(other.map_err(io_err(format!("{}: open", target.image)))?),
    }
    let _lock = lock_session(&dir, &target.image)?;
    let standby = image::open(target.format(), open_dir()?, &target.image)?;
    boot_standby(&target.root, standby.as_ref(), opts)
}

/// Boots `standby`, whose files are in the directory `dir`, as
/// [`boot_test`] does. The caller holds the image's session lock.
pub fn boot_standby(
    dir: &Path,
    standby: &dyn Standby,
    opts: &BootTestOptions,
) -> Result<BootTestReport, BootTestError> {
    let boot = standby.boot_file(opts.point.as_deref())?;
    let scratch = Scratch::new()?;
    let (drive, format) = match &boot.snapshot {
        None => (dir.join(&boot.path), boot.format),
        Some(snapshot) => {
            let raw = scratch.0.join("boot-point.raw");
            copy_out_snapshot(&opts.qemu_img, dir, &boot, snapshot, &raw)?;
            (raw, "raw")
        }
    };
    let started = Instant::now();
    let (outcome, console) = watch(&opts.qemu, &qemu_args(&drive, format, opts), opts)?;
    Ok(BootTestReport {
        passed: outcome == Outcome::Seen,
        outcome,
        file: boot.path,
        format: boot.format.to_owned(),
        snapshot: boot.snapshot,
        expect: opts.expect.clone(),
        seconds: started.elapsed().as_secs_f64(),
        console_tail: tail(&console, TAIL_LINES),
    })
}

/// `IMAGE.ferry.lock`, held; released on drop.
pub(crate) struct SessionLock(File);

impl Drop for SessionLock {
    fn drop(&mut self) {
        // Explicitly, as the agent does: a copy of the fd in a child on its
        // way to exec would otherwise keep the lock a moment longer.
        let _ = sysfs::unlock(&self.0);
    }
}

/// Takes `IMAGE.ferry.lock`, the lock every session that changes the image
/// holds.
pub(crate) fn lock_session(dir: &Dir, image: &str) -> Result<SessionLock, BootTestError> {
    match image::try_lock_session(dir, image)
        .map_err(io_err(format!("{image}.ferry.lock: lock")))?
    {
        Some(file) => Ok(SessionLock(file)),
        None => Err(BootTestError::Busy {
            image: image.to_owned(),
        }),
    }
}

/// A private temporary directory, removed on drop.
pub(crate) struct Scratch(pub PathBuf);

impl Scratch {
    pub(crate) fn new() -> Result<Self, BootTestError> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "ferry-boot-test-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(format!("{}: create", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies internal snapshot `snapshot` of `boot.path` out into the raw file
/// `to` (sparse, so only the data costs space).
fn copy_out_snapshot(
    qemu_img: &Path,
    root: &Path,
    boot: &BootFile,
    snapshot: &str,
    to: &Path,
) -> Result<(), BootTestError> {
    let out = Command::new(qemu_img)
        .args(["convert", "-f", boot.format, "-O", "raw", "-l"])
        .arg(format!("snapshot.name={snapshot}"))
        .arg(root.join(&boot.path))
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BootTestError::Spawn {
            program: qemu_img.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(BootTestError::Convert {
            file: boot.path.clone(),
            snapshot: snapshot.to_owned(),
            detail: first_line(&out.stderr),
        });
    }
    Ok(())
}

/// qemu's arguments: TCG (works without KVM), guest writes to a temporary
/// overlay (`-snapshot`), no devices but the disk and a serial console on
/// stdout, and a reset ends qemu rather than rebooting.
fn qemu_args(drive: &Path, format: &str, opts: &BootTestOptions) -> Vec<OsString> {
    let mut file = OsString::from("file=");
    // qemu splits -drive options at commas; a comma in a name is doubled.
    file.push(drive.as_os_str().to_string_lossy().replace(',', ",,"));
    let mut args: Vec<OsString> = [
        "-accel",
        "tcg",
        "-snapshot",
        "-m",
        &opts.memory_mib.to_string(),
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut drive_opt = file;
    drive_opt.push(format!(",format={format}"));
    match opts.bus {
        Bus::Virtio => {
            drive_opt.push(",if=virtio");
            args.extend(["-drive".into(), drive_opt]);
        }
        Bus::Ide => {
            drive_opt.push(",if=ide");
            args.extend(["-drive".into(), drive_opt]);
        }
        Bus::Sata => {
            drive_opt.push(",if=none,id=disk0");
            args.extend(
                [
                    "-device",
                    "ahci,id=ahci0",
                    "-device",
                    "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0",
                ]
                .map(OsString::from),
            );
            args.extend(["-drive".into(), drive_opt]);
        }
    }
    args
}

/// What the console reader shares with the watcher.
#[derive(Default)]
struct Console {
    bytes: Vec<u8>,
    seen: bool,
    closed: bool,
}

/// Kills qemu when dropped, whatever ended the watch.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` and watches its stdout for `opts.expect` until it shows,
/// the program exits, or `opts.timeout` passes. Returns the outcome and the
/// console. qemu's own errors (it exits non-zero) are errors, not failures
/// of the guest.
fn watch(
    program: &Path,
    args: &[OsString],
    opts: &BootTestOptions,
) -> Result<(Outcome, Vec<u8>), BootTestError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BootTestError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut guest = Guest(child);
    let console = Arc::new(Mutex::new(Console::default()));
    {
        let console = Arc::clone(&console);
        let expect = opts.expect.as_bytes().to_vec();
        thread::spawn(move || read_console(stdout, &expect, &console));
    }
    let errors = thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_end(&mut text);
        }
        text
    });
    let deadline = Instant::now() + opts.timeout;
    let seen = || console.lock().unwrap_or_else(|p| p.into_inner()).seen;
    let outcome = loop {
        if seen() {
            break Outcome::Seen;
        }
        if let Some(status) = guest
            .0
            .try_wait()
            .map_err(io_err(format!("waiting for {}", program.display())))?
        {
            // Let the reader take what was written before the exit.
            let until = Instant::now() + Duration::from_secs(1);
            while !console.lock().unwrap_or_else(|p| p.into_inner()).closed
                && Instant::now() < until
            {
                thread::sleep(Duration::from_millis(10));
            }
            if seen() {
                break Outcome::Seen;
            }
            if !status.success() {
                let detail = errors.join().unwrap_or_default();
                return Err(BootTestError::Qemu {
                    status: status.to_string(),
                    detail: first_line(&detail),
                });
            }
            break Outcome::GuestStopped;
        }
        if Instant::now() >= deadline {
            break Outcome::TimedOut;
        }
        thread::sleep(Duration::from_millis(50));
    };
    drop(guest);
    let bytes = std::mem::take(&mut console.lock().unwrap_or_else(|p| p.into_inner()).bytes);
    Ok((outcome, bytes))
}

/// Appends everything `pipe` yields to the console, noting when `expect`
/// shows (also across two reads), and keeping at most [`CONSOLE_CAP`] bytes.
fn read_console(pipe: Option<impl Read>, expect: &[u8], console: &Mutex<Console>) {
    let mut buf = [0u8; 8192];
    if let Some(mut pipe) = pipe {
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut c = console.lock().unwrap_or_else(|p| p.into_inner());
            let from = c.bytes.len().saturating_sub(expect.len());
            c.bytes.extend_from_slice(&buf[..n]);
            if !c.seen && contains(&c.bytes[from..], expect) {
                c.seen = true;
            }
            if c.bytes.len() > CONSOLE_CAP {
                let cut = c.bytes.len() - CONSOLE_CAP / 2;
                c.bytes.drain(..cut);
            }
        }
    }
    console.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// The last `n` non-empty lines of a console, without terminal control
/// sequences (a BIOS and boot loaders clear the screen and move the cursor).
pub fn tail(console: &[u8], n: usize) -> Vec<String> {
    let text = strip_controls(&String::from_utf8_lossy(console));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// Removes ANSI escape sequences, carriage returns and other control
/// characters but newlines and tabs.
fn strip_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; other escapes: ESC + one.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(expect: &str, secs: u64) -> BootTestOptions {
        BootTestOptions {
            expect: expect.to_owned(),
            timeout: Duration::from_secs(secs),
            ..BootTestOptions::new(None)
        }
    }

    /// A stand-in for qemu: a shell script.
    fn fake(script: &str) -> (Scratch, PathBuf) {
        let dir = Scratch::new().unwrap();
        let path = dir.0.join("fake-qemu");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, path)
    }

    #[test]
    fn the_text_passes_even_split_across_reads() {
        let (_d, qemu) =
            fake("printf 'Booting\\r\\nweb lo'; sleep 0.2; printf 'gin: '; exec sleep 30");
        let started = Instant::now();
        let (outcome, console) = watch(&qemu, &[], &opts("login:", 20)).unwrap();
        assert_eq!(outcome, Outcome::Seen);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "qemu was not stopped"
        );
        assert_eq!(tail(&console, 20), ["Booting", "web login:"]);
    }

    #[test]
    fn silence_times_out_and_the_guest_is_killed() {
        let (_d, qemu) = fake("echo starting; exec sleep 30");
        let started = Instant::now();
        let (outcome, console) = watch(&qemu, &[], &opts("login:", 1)).unwrap();
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(tail(&console, 20), ["starting"]);
    }

    #[test]
    fn a_guest_that_stops_without_the_text_fails_and_a_broken_qemu_is_an_error() {
        let (_d, qemu) = fake("echo 'Kernel panic'; echo 'login' ; exit 0");
        let (outcome, console) = watch(&qemu, &[], &opts("login:", 20)).unwrap();
        assert_eq!(outcome, Outcome::GuestStopped);
        assert_eq!(tail(&console, 1), ["login"]);
        // The text printed just before the exit still counts.
        let (_d, qemu) = fake("echo 'login:'; exit 0");
        assert_eq!(
            watch(&qemu, &[], &opts("login:", 20)).unwrap().0,
            Outcome::Seen
        );
        let (_d, qemu) = fake("echo 'qemu: could not open disk' >&2; exit 1");
        let e = watch(&qemu, &[], &opts("login:", 20)).unwrap_err();
        assert!(e.to_string().contains("could not open disk"), "{e}");
        let e = watch(Path::new("/nonexistent/qemu"), &[], &opts("x", 1)).unwrap_err();
        assert!(matches!(e, BootTestError::Spawn { .. }), "{e}");
    }

    #[test]
    fn the_tail_drops_control_sequences() {
        let console = b"\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n\r\nline 2\r\n\x1b[0mFERRY-MARKER:new\r\n";
        assert_eq!(tail(console, 20), ["SeaBIOS", "line 2", "FERRY-MARKER:new"]);
        assert_eq!(tail(console, 1), ["FERRY-MARKER:new"]);
    }

    #[test]
    fn qemu_gets_the_drive_on_the_chosen_bus() {
        let mut o = opts("x", 1);
        let text = |o: &BootTestOptions| {
            qemu_args(Path::new("/srv/a,b/web.vmdk"), "vmdk", o)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let virtio = text(&o);
        assert!(
            virtio.starts_with("-accel tcg -snapshot -m 512 "),
            "{virtio}"
        );
        assert!(virtio.contains("-serial stdio -no-reboot"), "{virtio}");
        assert!(
            virtio.ends_with("-drive file=/srv/a,,b/web.vmdk,format=vmdk,if=virtio"),
            "{virtio}"
        );
        o.bus = Bus::Sata;
        let sata = text(&o);
        assert!(sata.contains("-device ahci,id=ahci0"), "{sata}");
        assert!(sata.ends_with(",format=vmdk,if=none,id=disk0"), "{sata}");
        assert_eq!("ide".parse::<Bus>(), Ok(Bus::Ide));
        assert!("scsi".parse::<Bus>().is_err());
    }

    /// The path a qcow2 boot point takes: its internal snapshot is copied
    /// out and that copy, not the current content, is what boots.
    #[test]
    fn an_internal_snapshot_is_copied_out() {
        let have = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            assert!(std::env::var_os("CI").is_none(), "CI must have qemu-img");
            eprintln!("skipped an_internal_snapshot_is_copied_out: qemu-img is not installed");
            return;
        }
        let dir = Scratch::new().unwrap();
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .args(args)
                .current_dir(&dir.0)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let img = |args: &[&str]| run("qemu-img", args);
        let io = |cmd: &str| run("qemu-io", &["-f", "qcow2", "-c", cmd, "web.qcow2"]);
        img(&["create", "-q", "-f", "qcow2", "web.qcow2", "1M"]);
        io("write -P 1 0 4k");
        img(&["snapshot", "-c", "V20260101_000000", "web.qcow2"]);
        io("write -P 2 0 4k");
        let boot = BootFile {
            path: "web.qcow2".into(),
            format: "qcow2",
            snapshot: Some("V20260101_000000".into()),
        };
        let out = dir.0.join("out.raw");
        copy_out_snapshot(
            Path::new("qemu-img"),
            &dir.0,
            &boot,
            "V20260101_000000",
            &out,
        )
        .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert!(bytes[..4096].iter().all(|&b| b == 1));
        let e = copy_out_snapshot(
            Path::new("qemu-img"),
            &dir.0,
            &boot,
            "V19990101_000000",
            &out,
        )
        .unwrap_err();
        assert!(matches!(e, BootTestError::Convert { .. }), "{e}");
    }
}
