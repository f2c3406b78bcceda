//! A kept agent: after a session it was launched for over SSH, the agent
//! stays on the target for a while, listening on a private Unix socket, so
//! the next jobs to the same root reach it through the source's kept SSH
//! connection (a forwarded socket) instead of starting a login shell and a
//! new agent. A login runs the user's shell rc files, which can take longer
//! than a small incremental.
//!
//! - Where: `$XDG_RUNTIME_DIR/ferry/` when that is set, else
//!   `~/.cache/ferry/`; the directory must be the user's own and mode 0700.
//!   The socket is `keep-NAME.sock` (mode 0600); the source names it by a
//!   hash of its own build and the root, so a kept agent only serves the
//!   build that launched it, for one root. `keep-NAME.lock` (flocked while
//!   an agent listens) makes sure one agent serves a name; its log is
//!   `keep-NAME.log`.
//! - Each connection is one session, exactly as over `ssh`'s exec channel:
//!   the launcher's banner line, then frames. Sessions run on their own
//!   threads; images are locked per session as always.
//! - It leaves when no session has run for its idle time (the source's
//!   `--ssh-persist`), or as soon as it is idle and its socket is gone or
//!   replaced (its directory was removed: a logout, a cleanup). A
//!   connection that arrives as it leaves gets no banner, and the source
//!   launches a new agent.

use std::{
    fs,
    io::{self, Write},
    os::{
        fd::AsFd,
        unix::{
            fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
            net::{UnixListener, UnixStream},
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{serve, AgentError};
use crate::sys::{
    fd::{poll, Interest},
    fs::try_lock_exclusive,
};

/// The line a launched agent prints after the launcher's, before frames,
/// when it was asked to stay: this prefix, then the socket's path.
pub const KEPT: &str = "ferry-agent: kept at ";
/// The same line when an agent already listened there (so a source that
/// just failed to reach it cannot reach it through its connection).
pub const STILL_KEPT: &str = "ferry-agent: still kept at ";
/// The same line when it cannot stay: this prefix, then why.
pub const NOT_KEPT: &str = "ferry-agent: not kept: ";

/// Longest socket path (a Unix socket path has 108 bytes).
const MAX_SOCKET_PATH: usize = 100;
/// How often a listening agent looks at its socket and its idle time.
const TICK: Duration = Duration::from_secs(1);

/// The kept agents' directory for this user, made if needed; it must be
/// ours and private.
pub fn dir() -> Result<PathBuf, String> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir());
    let dir = match runtime {
        Some(d) => d.join("ferry"),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .ok_or("neither XDG_RUNTIME_DIR nor HOME is set")?
            .join(".cache/ferry"),
    };
    private_dir(dir)
}

/// Makes `dir` (mode 0700) if needed, and checks that it and its parent
/// are ours alone.
fn private_dir(dir: PathBuf) -> Result<PathBuf, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    // Whoever may rename entries of the parent could swap our directory
    // for theirs between our check and the bind, and take the sessions.
    if let Some(parent) = dir.parent().filter(|p| p.exists()) {
        let meta = fs::metadata(parent).map_err(|e| fail(&e))?;
        if meta.mode() & 0o022 != 0 || (meta.uid() != me && meta.uid() != 0) {
            return Err(format!(
                "{} may be changed by other users",
                parent.display()
            ));
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(&e))?;
    let meta = fs::symlink_metadata(&dir).map_err(|e| fail(&e))?;
    if !meta.is_dir() || meta.uid() != me {
        return Err(fail(&"not a directory of this user"));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(|e| fail(&e))?;
    }
    Ok(dir)
}

/// A kept agent's name, as the source gives it: 16 lowercase hex digits.
fn check_name(name: &str) -> Result<(), String> {
    if name.len() == 16 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a kept agent's name"))
    }
}

/// Where the agent named `name` listens in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    let path = dir.join(format!("keep-{name}.sock"));
    let text = path.to_str().ok_or("the socket path is not UTF-8")?;
    if text.len() > MAX_SOCKET_PATH || text.contains('\n') || text.contains(':') {
        return Err(format!("{text} cannot be a forwarded socket's path"));
    }
    Ok(path)
}

/// Where a kept agent listens, and whether it was there already.
#[derive(Debug)]
pub struct Started {
    pub socket: PathBuf,
    pub already: bool,
}

/// Starts the agent that stays (a process of its own, in its own session,
/// with its log for stderr) unless one already serves `name`, and says
/// where it listens. Called by a launched agent before its session.
pub fn start(root: &Path, name: &str, idle: Duration) -> Result<Started, String> {
    if !root.is_absolute() {
        return Err("the root is not an absolute path".into());
    }
    let dir = dir()?;
    let socket = socket_path(&dir, name)?;
    if listening(&dir, name) {
        return Ok(Started {
            socket,
            already: true,
        });
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log_path(&dir, name))
        .map_err(|e| format!("its log: {e}"))?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut cmd = Command::new(me);
    cmd.arg("agent")
        .arg("--root")
        .arg(root)
        .args(["--listen", name, "--idle"])
        .arg(idle.as_secs().max(1).to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid, which is async-signal-safe. A session of its own keeps
    // the agent out of the login's process group and its hangups.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| format!("cannot start it: {e}"))?;
    Ok(Started {
        socket,
        already: false,
    })
}

fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("keep-{name}.lock"))
}

fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("keep-{name}.log"))
}

/// Whether an agent listens as `name`: it holds the lock and its socket is
/// there (one whose socket is gone holds the lock until it leaves).
fn listening(dir: &Path, name: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let socket = socket_path(dir, name);
    if !socket.is_ok_and(|s| fs::symlink_metadata(s).is_ok_and(|m| m.file_type().is_socket())) {
        return false;
    }
    fs::File::open(lock_path(dir, name))
        .and_then(|lock| try_lock_exclusive(&lock))
        .is_ok_and(|got| !got)
}

/// What a listening agent knows about its sessions.
struct Sessions {
    running: usize,
    last_end: Instant,
}

/// One session counted as running while this lives.
struct Running(Arc<Mutex<Sessions>>);

impl Running {
    fn start(sessions: &Arc<Mutex<Sessions>>) -> Self {
        sessions.lock().unwrap_or_else(|p| p.into_inner()).running += 1;
        Self(Arc::clone(sessions))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.running -= 1;
        s.last_end = Instant::now();
    }
}

/// Listens as the kept agent `name` in `dir` until it has been idle for
/// `idle`, or is idle and its socket is gone. Returns after two ticks if
/// another agent still serves `name` (one that is leaving lets go sooner).
pub fn listen(root: &Path, dir: &Path, name: &str, idle: Duration) -> io::Result<()> {
    let socket = socket_path(dir, name).map_err(io::Error::other)?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path(dir, name))?;
    // An agent leaving (idle, or its socket gone) lets go within a tick; a
    // live one never does.
    let deadline = Instant::now() + 2 * TICK;
    while !try_lock_exclusive(&lock)? {
        if Instant::now() >= deadline {
            tracing::debug!("another agent serves {}", socket.display());
            return Ok(());
        }
        std::thread::sleep(TICK / 10);
    }
    // Ours now: whatever is there is an earlier agent's leftover, and the
    // log (our stderr, appended to) starts anew.
    if let Ok(log) = fs::OpenOptions::new().write(true).open(log_path(dir, name)) {
        let _ = log.set_len(0);
    }
    match fs::remove_file(&socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&socket)?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let ino = fs::metadata(&socket)?.ino();
    tracing::info!(
        "kept agent for {} listening on {}",
        root.display(),
        socket.display()
    );
    let sessions = Arc::new(Mutex::new(Sessions {
        running: 0,
        last_end: Instant::now(),
    }));
    let readable = Interest {
        read: true,
        write: false,
    };
    loop {
        poll(&[(listener.as_fd(), readable)], TICK)?;
        match listener.accept() {
            Ok((stream, _)) => {
                // Counted until the thread is done with it, even if the
                // session panics: a count stuck above 0 would keep the
                // agent forever.
                let running = Running::start(&sessions);
                let root = root.to_owned();
                let spawned =
                    std::thread::Builder::new()
                        .name("ferry-kept".into())
                        .spawn(move || {
                            let _running = running;
                            if let Err(e) = session(&root, stream) {
                                tracing::info!("session ended: {}", super::chain_text(&e));
                            }
                        });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a session thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => tracing::warn!("accepting a session failed: {e}"),
        }
        let s = sessions.lock().unwrap_or_else(|p| p.into_inner());
        if s.running > 0 {
            continue;
        }
        let ours = fs::symlink_metadata(&socket).is_ok_and(|m| m.ino() == ino);
        if !ours || s.last_end.elapsed() >= idle {
            if ours {
                let _ = fs::remove_file(&socket);
            }
            tracing::info!(
                "kept agent leaving: {}",
                if ours { "idle" } else { "its socket is gone" }
            );
            // Connections still queued are closed with the listener: their
            // sources see no banner and launch an agent of their own.
            return Ok(());
        }
    }
}

/// One session on an accepted connection: the launcher's banner, then the
/// same frames as over an exec channel.
fn session(root: &Path, stream: UnixStream) -> Result<super::SessionSummary, AgentError> {
    let reply = |source| AgentError::Reply { source };
    stream.set_nonblocking(false).map_err(reply)?;
    let mut output = stream.try_clone().map_err(reply)?;
    writeln!(output, "{}", crate::transport::push::RUNNING).map_err(reply)?;
    serve(root, stream, output)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;
    use crate::testutil::TempDir;

    const NAME: &str = "0123456789abcdef";

    fn wait_for(path: &Path, there: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while path.exists() != there {
            assert!(
                Instant::now() < deadline,
                "{} never {}",
                path.display(),
                if there { "came" } else { "went" }
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn banner(socket: &Path) -> String {
        let stream = UnixStream::connect(socket).unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    /// A kept agent for a fresh root in `tmp`, listening: its root, its
    /// socket and its thread.
    fn agent(
        tmp: &TempDir,
        idle: Duration,
    ) -> (PathBuf, PathBuf, std::thread::JoinHandle<io::Result<()>>) {
        let (root, dir) = (tmp.path("root"), tmp.0.clone());
        fs::create_dir(&root).unwrap();
        let socket = socket_path(&dir, NAME).unwrap();
        let thread = {
            let root = root.clone();
            std::thread::spawn(move || listen(&root, &dir, NAME, idle))
        };
        wait_for(&socket, true);
        (root, socket, thread)
    }

    #[test]
    fn serves_one_session_per_connection_then_leaves_when_idle() {
        let tmp = TempDir::new("kept-idle");
        let (_, socket, agent) = agent(&tmp, Duration::from_millis(1500));
        let mode = fs::metadata(&socket).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is the user's alone");
        for _ in 0..3 {
            let started = Instant::now();
            assert_eq!(
                banner(&socket),
                format!("{}\n", crate::transport::push::RUNNING)
            );
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "not served at once"
            );
        }
        // Nothing more: it leaves, and takes its socket away.
        agent.join().unwrap().unwrap();
        assert!(!socket.exists());
        assert!(UnixStream::connect(&socket).is_err());
    }

    #[test]
    fn one_agent_per_name_and_none_once_its_socket_is_gone() {
        let tmp = TempDir::new("kept-one");
        let (root, socket, first) = agent(&tmp, Duration::from_secs(600));
        // A second agent for the name gives up (after two ticks); the first
        // still serves.
        listen(&root, &tmp.0, NAME, Duration::from_secs(600)).unwrap();
        assert!(banner(&socket).contains("agent starting"));
        assert!(listening(&tmp.0, NAME));
        // Its directory cleaned up: it leaves long before its idle time,
        // and is no longer taken for listening at once.
        fs::remove_file(&socket).unwrap();
        assert!(!listening(&tmp.0, NAME));
        first.join().unwrap().unwrap();
        assert!(!listening(&tmp.0, NAME));
    }

    #[test]
    fn the_directory_must_be_ours_alone_and_so_its_parent() {
        let tmp = TempDir::new("kept-dir");
        let open = tmp.path("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = private_dir(open.join("ferry")).unwrap_err();
        assert!(err.contains("other users"), "{err}");
        assert!(!open.join("ferry").exists());

        let home = tmp.path("home");
        fs::create_dir(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = private_dir(home.join(".cache/ferry")).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // Loosened by hand: tightened again.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(dir.clone()).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // A file in its place is refused.
        let file = home.join("file");
        fs::write(&file, "").unwrap();
        assert!(private_dir(file).is_err());
    }

    #[test]
    fn names_and_paths_that_cannot_be_forwarded_are_refused() {
        let dir = Path::new("/run/user/0/ferry");
        assert!(socket_path(dir, NAME).is_ok());
        for bad in [
            "",
            "0123456789ABCDEF",
            "../../etc/passwd",
            "0123456789abcdef0",
        ] {
            assert!(socket_path(dir, bad).is_err(), "{bad:?}");
        }
        assert!(socket_path(Path::new("/a:b"), NAME).is_err());
        assert!(socket_path(&Path::new("/").join("x".repeat(90)), NAME).is_err());
    }
}
