//! Test rigs with real parts: loop devices over sparse files, a private state
//! directory and a private bpffs pin directory per test, and the real `ferry`
//! binary. Every rig cleans up in `Drop`, so a panicking test leaves nothing
//! behind (pins removed, loop devices detached, files deleted).

use std::{
    alloc::Layout,
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::Receiver,
    },
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether privileged tests can run. Under CI they must: CI runs as root, so
/// a missing capability there is a failure, not a skip.
pub fn privileged(test: &str) -> bool {
    let root = ferry::sys::is_root();
    let bpffs = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    });
    if root && bpffs {
        return true;
    }
    let why = if root {
        "bpffs is not mounted at /sys/fs/bpf"
    } else {
        "not root"
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}, but CI must run privileged tests");
    }
    eprintln!("skipped {test}: {why}");
    false
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A loop device over a sparse file in /dev/shm, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
    /// The sparse file under the device: the truth to compare images with.
    pub backing: PathBuf,
}

impl LoopDev {
    pub fn new(size: u64) -> Self {
        Self::create(size, false)
    }

    /// With one partition starting at 1 MiB and spanning half the disk.
    pub fn partitioned(size: u64) -> Self {
        let table = format!("label: dos\nstart=2048, size={}, type=83\n", size / 512 / 2);
        Self::with_table(size, &table)
    }

    /// Partitioned by `table` (an sfdisk script) with one partition or
    /// more; waits for `p1` to appear.
    pub fn with_table(size: u64, table: &str) -> Self {
        let dev = Self::create(size, true);
        dev.write_table(table);
        let p1 = dev.partition(1);
        if !p1.exists() {
            let _ = Command::new("partx")
                .args(["-a", dev.path.to_str().unwrap()])
                .status();
        }
        for _ in 0..200 {
            if p1.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(p1.exists(), "{} did not appear", p1.display());
        dev
    }

    /// Rewrites the partition table with `table` and has the kernel take
    /// the changes (`partx -u`), as an admin moves or resizes a partition
    /// of a disk in use: a partition keeps its device number.
    pub fn repartition(&self, table: &str) {
        self.write_table(table);
        run("partx", &["-u", self.arg()]);
    }

    fn write_table(&self, table: &str) {
        let mut child = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", self.arg()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sfdisk");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk failed");
    }

    fn create(size: u64, partscan: bool) -> Self {
        let backing = PathBuf::from(format!("/dev/shm/{}.img", unique("ferry-it")));
        File::create(&backing).unwrap().set_len(size).unwrap();
        let mut args = vec!["-f", "--show"];
        if partscan {
            args.push("-P");
        }
        args.push(backing.to_str().unwrap());
        let out = Command::new("losetup").args(&args).output().unwrap();
        if !out.status.success() {
            let _ = std::fs::remove_file(&backing);
            panic!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { path, backing }
    }

    /// Extends the backing file to `size` and has the loop driver take the
    /// new size (`losetup -c`), as an admin grows a volume.
    pub fn grow(&self, size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        run("losetup", &["-c", self.arg()]);
    }

    /// Detaches the device and attaches it, under the same number, to
    /// `backing` (which it then owns), as an admin swaps the file under a
    /// loop device. Another process may take the number in between; the
    /// test then fails, and leaves that device alone.
    pub fn reattach(&mut self, backing: PathBuf) {
        run("losetup", &["-d", self.arg()]);
        let old = std::mem::replace(&mut self.backing, backing);
        let _ = std::fs::remove_file(old);
        run("losetup", &[self.arg(), self.backing.to_str().unwrap()]);
    }

    /// Whether the device is attached to `backing` now.
    fn attached_to(&self, backing: &Path) -> bool {
        let name = self.path.file_name().unwrap().to_str().unwrap();
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .is_ok_and(|b| Path::new(b.trim()) == backing)
    }

    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// A directory under /dev/shm, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = PathBuf::from("/dev/shm").join(unique("ferry-it-dir"));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// An ext4 filesystem on its own loop device, mounted; unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    pub dev: LoopDev,
}

impl Mounted {
    pub fn new(size: u64) -> Self {
        let dev = LoopDev::new(size);
        run("mkfs.ext4", &["-q", "-F", "-m", "0", dev.arg()]);
        let dir = PathBuf::from("/dev/shm").join(unique("ferry-it-mnt"));
        std::fs::create_dir_all(&dir).unwrap();
        run("mount", &[dev.arg(), dir.to_str().unwrap()]);
        Self { dir, dev }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A failed test may have left it frozen, and a frozen filesystem
        // cannot be unmounted; thawing one that is not frozen just fails.
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        // A test may have unmounted it already.
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Whether two files have the same bytes (`cmp`).
pub fn same_content(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// Writes `len` bytes of seeded pseudo-random data at `offset` (O_DIRECT).
pub fn write_random(path: &Path, offset: u64, len: usize, seed: u64) {
    let f = open_direct(path);
    let mut buf = AlignedBuf::new(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.as_mut().chunks_mut(8) {
        // xorshift64*: fast, and incompressible enough for zstd.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()[..word.len()]);
    }
    f.write_all_at(buf.as_ref(), offset).unwrap();
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Only while it is still ours: after a failed `reattach` the number
        // may belong to someone else.
        if self.attached_to(&self.backing) {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// A private ferry installation: state directory and bpffs pin directory.
pub struct Ferry {
    pub state: PathBuf,
    pub bpf: PathBuf,
}

impl Ferry {
    pub fn new() -> Self {
        // tmpfs: fsync is cheap, so drains are fast and races frequent.
        let state = PathBuf::from("/dev/shm").join(unique("ferry-it-state"));
        let bpf = PathBuf::from("/sys/fs/bpf").join(unique("ferry-it").replace('.', "_"));
        Self { state, bpf }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.arg("--state-dir")
            .arg(&self.state)
            .arg("--bpf-dir")
            .arg(&self.bpf)
            .args(args);
        cmd
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ferry")
    }

    /// Runs ferry, expecting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("ferry printed JSON")
    }

    /// Runs ferry, expecting failure with one line on stderr; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(!out.status.success(), "ferry {args:?} should have failed");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line expected, got: {err}"
        );
        err.trim_end().to_owned()
    }

    /// `[offset, length]` pairs of `ferry track dirty DEV --json`.
    pub fn extents(&self, dev: &str) -> Vec<(u64, u64)> {
        let v = self.json(&["track", "dirty", dev]);
        extents_of(&v)
    }

    /// A snapshot of everything ferry keeps, to prove a command changed nothing.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for dir in [&self.state, &self.bpf] {
            let Ok(entries) = walk(dir) else { continue };
            for p in entries {
                let content = if p.starts_with(&self.bpf) {
                    Vec::new()
                } else {
                    std::fs::read(&p).unwrap_or_default()
                };
                out.push((p, content));
            }
        }
        out.sort();
        out
    }
}

fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

pub fn extents_of(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["extents"]
        .as_array()
        .expect("extents array")
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect()
}

impl Drop for Ferry {
    fn drop(&mut self) {
        // Unpinning every pin detaches the programs; nothing here belongs to
        // anyone else.
        let _ = std::fs::remove_dir_all(&self.bpf);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size (callers pass whole blocks).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes until drop.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    pub fn as_ref(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

pub fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()))
}

/// Writes `len` bytes of `fill` at `offset` with O_DIRECT.
pub fn write_direct(path: &Path, offset: u64, len: usize, fill: u8) {
    let f = open_direct(path);
    let mut buf = AlignedBuf::new(len);
    buf.as_mut().fill(fill);
    f.write_all_at(buf.as_ref(), offset).unwrap();
}

/// Writes through the page cache, then fsyncs.
pub fn write_buffered(path: &Path, offset: u64, len: usize, fill: u8) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![fill; len], offset).unwrap();
    f.sync_all().unwrap();
}

/// Reads `child`'s stderr (piped) until a line `wanted` accepts, and
/// returns the rest of its lines. The child is killed, and the test fails
/// with what it printed, when no such line comes within two minutes.
pub fn await_stderr_line(
    child: &mut Child,
    wanted: impl Fn(&str) -> bool,
    what: &str,
) -> Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(line) if wanted(&line) => return lines,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} never happened: {seen:?}");
            }
        }
    }
}
