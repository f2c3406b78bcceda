//! `ssh://` targets through the OpenSSH client: run `ferry agent` on the
//! target over `ssh`'s exec channel and carry its bytes on `ssh`'s stdin and
//! stdout.
//!
//! Why the `ssh` program rather than an SSH library: on the bench machine
//! libssh2 moved 116 to 176 MiB/s through one channel (it encrypts a packet
//! 16 bytes per cipher call), OpenSSH 410 to 950 MiB/s over the same
//! loopback. A standby that cannot keep up with churn is not a standby.
//!
//! Security rules kept here:
//! - the host key is always checked (`StrictHostKeyChecking=yes`) against
//!   known_hosts; an unknown key is recorded only with
//!   `--accept-new-host-key` (`accept-new`), a changed key never;
//! - a password comes from a 0600 file or the environment, never argv, and
//!   is never logged ([`Secret`] has no readable `Debug`). `ssh` asks
//!   ferry itself for it (`SSH_ASKPASS`), and ferry answers from the file
//!   or the variable: the secret never sits on a command line;
//! - the user's ssh_config still applies (proxies, ports, keys), but
//!   nothing in it can turn off host key checking, forward agents or X11,
//!   or add a tty or a remote command to the session.

use std::{
    ffi::OsString,
    fs,
    io::{self, Read, Write},
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use super::{kept, pipe, push, to_agent, Link, LinkEnd, TransportError};

/// Environment variable a password may come from.
pub const PASSWORD_ENV: &str = "FERRY_SSH_PASSWORD";
/// Set on `ssh`'s environment when ferry is its askpass program.
pub const ASKPASS_ENV: &str = "FERRY_ASKPASS";
/// The password file's path, for the askpass run of ferry.
const ASKPASS_FILE_ENV: &str = "FERRY_ASKPASS_FILE";

/// The OpenSSH client.
const SSH: &str = "ssh";

/// Ciphers in order of preference: AES-GCM first, as it is the fastest
/// where the CPU has AES instructions (nearly every server); the rest are
/// OpenSSH's defaults, so any sshd finds one it speaks.
const CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
                       chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// A password or passphrase. Never printed.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from `path`, which must be a regular file that only
    /// its owner can read (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::PasswordFile {
            path: path.display().to_string(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:04o} lets others read it; chmod 600 it",
                meta.mode() & 0o7777
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let line = text.lines().next().unwrap_or("").to_owned();
        if line.is_empty() {
            return Err(bad("empty".into()));
        }
        Ok(Secret(line))
    }

    pub fn from_env() -> Option<Self> {
        std::env::var(PASSWORD_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(Secret)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a password comes from. The secret itself stays there: `ssh` gets
/// it through ferry's askpass run, which reads it again.
#[derive(Clone, Debug)]
pub enum Password {
    /// A file of mode 0600 or stricter (checked before connecting).
    File(PathBuf),
    /// [`PASSWORD_ENV`], inherited by `ssh` and its askpass.
    Env,
}

#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// known_hosts to check against; default: OpenSSH's own
    /// (`~/.ssh/known_hosts` and the system-wide file).
    pub known_hosts: Option<PathBuf>,
    /// Record an unknown host key instead of refusing.
    pub accept_new_host_key: bool,
    /// Private key to log in with; default: ssh-agent, then ~/.ssh/id_*.
    pub identity: Option<PathBuf>,
    /// Password, or passphrase of the key.
    pub password: Option<Password>,
    pub connect_timeout: Option<Duration>,
    /// Keep the connection for the next job; `None` closes it at the end.
    pub reuse: Option<Reuse>,
}

/// Connection sharing (OpenSSH's ControlMaster): the first session to a
/// target leaves its connection open in the background for `persist`
/// after its last session ends, and the next job's sessions run over it
/// without a new key exchange and login.
///
/// A connection is shared only by jobs that would have made the very same
/// connection: its socket is named by a hash of the user, host, port, key,
/// password source and the known_hosts and ssh_config files (their paths,
/// sizes and change times), so a job with another key or another
/// known_hosts, or after known_hosts changed, logs in anew and has the host
/// key checked again.
#[derive(Clone, Debug)]
pub struct Reuse {
    /// Root-only directory for the control sockets (in the state directory).
    pub dir: PathBuf,
    pub persist: Duration,
}

/// The longest control socket path: a Unix socket path has 108 bytes, and
/// `ssh` binds a name 17 bytes longer first.
const MAX_CONTROL_PATH: usize = 90;

/// Where and how to log in.
#[derive(Clone, Debug)]
pub struct Destination {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub opts: SshOptions,
}

impl Destination {
    /// `host` or `[host]:port`, as known_hosts writes it.
    pub fn display(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// The `ssh` command that runs `remote` (one shell word list, run by
    /// the login shell) on the target.
    fn command(&self, remote: &str) -> Command {
        let mut cmd = Command::new(SSH);
        cmd.args(self.args()).arg(remote);
        // A shared connection outlives the job in the background: it must
        // not keep the job's working directory (a mount) busy. Paths it is
        // given are absolute.
        cmd.current_dir("/");
        cmd.env_remove(ASKPASS_FILE_ENV);
        match &self.opts.password {
            Some(password) => {
                let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ferry"));
                cmd.env("SSH_ASKPASS", me)
                    .env("SSH_ASKPASS_REQUIRE", "force")
                    .env(ASKPASS_ENV, "1");
                if let Password::File(path) = password {
                    cmd.env(ASKPASS_FILE_ENV, path);
                }
            }
            None => {
                cmd.env_remove("SSH_ASKPASS").env_remove(ASKPASS_ENV);
            }
        }
        cmd
    }

    fn args(&self) -> Vec<OsString> {
        let timeout = self
            .opts
            .connect_timeout
            .unwrap_or(Duration::from_secs(15))
            .as_secs()
            .max(1);
        let mut options = vec![
            format!("ConnectTimeout={timeout}"),
            // A dead peer is noticed within a minute, not at TCP's pace.
            "ServerAliveInterval=15".to_owned(),
            "ServerAliveCountMax=4".to_owned(),
            format!(
                "StrictHostKeyChecking={}",
                if self.opts.accept_new_host_key {
                    "accept-new"
                } else {
                    "yes"
                }
            ),
            "UpdateHostKeys=no".to_owned(),
            "HashKnownHosts=no".to_owned(),
            "CheckHostIP=no".to_owned(),
            "ClearAllForwardings=yes".to_owned(),
            "ForwardAgent=no".to_owned(),
            "ForwardX11=no".to_owned(),
            "PermitLocalCommand=no".to_owned(),
            "RemoteCommand=none".to_owned(),
            "RequestTTY=no".to_owned(),
            // ferry compresses what is worth it.
            "Compression=no".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ];
        match self.control_path() {
            Some((path, persist)) => options.extend([
                "ControlMaster=auto".to_owned(),
                format!("ControlPath={}", path.display()),
                format!("ControlPersist={}", persist.as_secs().max(1)),
                // For the kept agent's socket (see `kept`), which a new
                // connection binds where an old one left its file.
                "StreamLocalBindUnlink=yes".to_owned(),
                "StreamLocalBindMask=0177".to_owned(),
            ]),
            None => options.extend(["ControlMaster=no".to_owned(), "ControlPath=none".to_owned()]),
        }
        if let Some(path) = &self.opts.known_hosts {
            options.push(format!("UserKnownHostsFile={}", path.display()));
            options.push("GlobalKnownHostsFile=/dev/null".to_owned());
        }
        match &self.opts.password {
            // BatchMode would silence the askpass too.
            Some(_) => options.push("NumberOfPasswordPrompts=1".to_owned()),
            None => options.push("BatchMode=yes".to_owned()),
        }
        if self.opts.identity.is_some() {
            options.push("IdentitiesOnly=yes".to_owned());
        }
        let mut args: Vec<OsString> = vec!["-T".into(), "-x".into(), "-a".into()];
        for option in options {
            args.push("-o".into());
            args.push(option.into());
        }
        args.extend(["-c".into(), CIPHERS.into()]);
        if let Some(key) = &self.opts.identity {
            args.push("-i".into());
            args.push(key.clone().into_os_string());
        }
        args.extend([
            "-p".into(),
            self.port.to_string().into(),
            "-l".into(),
            self.user.as_str().into(),
            "--".into(),
            self.host.as_str().into(),
        ]);
        args
    }

    /// Where this destination's shared connection listens, made ready (a
    /// root-only directory); `None` when sharing is off or cannot be had,
    /// and the job then makes its own connection.
    pub(super) fn control_path(&self) -> Option<(PathBuf, Duration)> {
        let reuse = self.opts.reuse.as_ref().filter(|r| !r.persist.is_zero())?;
        let path = reuse.dir.join(self.connection_key());
        if path.as_os_str().len() > MAX_CONTROL_PATH {
            tracing::debug!(
                "not sharing the ssh connection: {} is too long for a socket path",
                path.display()
            );
            return None;
        }
        match private_dir(&reuse.dir) {
            Ok(()) => Some((path, reuse.persist)),
            Err(e) => {
                tracing::debug!(
                    "not sharing the ssh connection: {}: {e}",
                    reuse.dir.display()
                );
                None
            }
        }
    }

    /// Names the connection by everything that decides how it is made and
    /// checked (see [`Reuse`]).
    fn connection_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut put = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        put(&self.user);
        put(&self.host);
        put(&self.port.to_string());
        put(if self.opts.accept_new_host_key {
            "accept-new"
        } else {
            "strict"
        });
        put(match &self.opts.password {
            None => "no password".into(),
            Some(Password::Env) => "password from the environment".into(),
            Some(Password::File(p)) => format!("password file {}", p.display()),
        }
        .as_str());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let files = [
            self.opts.known_hosts.clone(),
            self.opts.identity.clone(),
            home.as_ref().map(|h| h.join(".ssh/known_hosts")),
            home.as_ref().map(|h| h.join(".ssh/config")),
            Some(PathBuf::from("/etc/ssh/ssh_known_hosts")),
            Some(PathBuf::from("/etc/ssh/ssh_config")),
        ];
        for file in files.iter().flatten() {
            put(&file.display().to_string());
            put(&match fs::metadata(file) {
                Ok(m) => format!(
                    "{} {} {} {}.{}",
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.ctime(),
                    m.ctime_nsec()
                ),
                Err(e) => e.kind().to_string(),
            });
        }
        let digest = h.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Has the kept connection forward the local socket `local` to the
    /// target's socket `remote` (nothing new if it already does).
    pub(super) fn forward(&self, local: &Path, remote: &Path) -> Result<(), String> {
        let (control, _) = self.control_path().ok_or("the connection is not kept")?;
        let spec = format!("{}:{}", local.display(), remote.display());
        // `-F none`: only the kept connection is talked to, and no forward
        // from an ssh_config joins ours.
        let out = Command::new(SSH)
            .args(["-F", "none", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("ControlPath={}", control.display()))
            .args(["-O", "forward", "-L", &spec, "--", &self.host])
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(last_line(&String::from_utf8_lossy(&out.stderr))
                .unwrap_or("ssh -O forward failed")
                .to_owned())
        }
    }

    /// Checks what can be checked before `ssh` runs, so these get ferry's
    /// own clear message.
    fn preflight(&self) -> Result<(), TransportError> {
        if let Some(key) = &self.opts.identity {
            if !key.is_file() {
                return Err(TransportError::Auth {
                    user: self.user.clone(),
                    host: self.display(),
                    tried: format!("key {} (no such file)", key.display()),
                });
            }
        }
        if let Some(path) = &self.opts.known_hosts {
            if let Err(source) = fs::metadata(path) {
                if source.kind() != io::ErrorKind::NotFound {
                    return Err(TransportError::KnownHosts {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Turns what `ssh` said when it failed (exit status 255) into one
    /// clear error.
    fn failure(&self, stderr: &str) -> TransportError {
        let known_hosts = self.opts.known_hosts.as_ref().map_or_else(
            || "~/.ssh/known_hosts".to_owned(),
            |p| p.display().to_string(),
        );
        let fingerprint = stderr
            .split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .map(|w| w.trim_end_matches('.').to_owned());
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || stderr.contains("Host key for") && stderr.contains("has changed")
        {
            return TransportError::HostKeyChanged {
                host: self.display(),
                known_hosts,
                fingerprint: fingerprint.unwrap_or_else(|| "a different key".into()),
            };
        }
        if stderr.contains("host key is known for") || stderr.contains("Host key verification") {
            return TransportError::UnknownHostKey {
                host: self.display(),
                known_hosts,
            };
        }
        if let Some(rest) = stderr.split("Permission denied (").nth(1) {
            let methods = rest.split(')').next().unwrap_or("").to_owned();
            let mut tried = Vec::new();
            if let Some(key) = &self.opts.identity {
                tried.push(format!("key {}", key.display()));
            } else {
                tried.push("ssh-agent and ~/.ssh keys".to_owned());
            }
            if self.opts.password.is_some() {
                tried.push("password".to_owned());
            }
            return TransportError::Auth {
                user: self.user.clone(),
                host: self.display(),
                tried: format!("{}; the server offers: {methods}", tried.join(", ")),
            };
        }
        if let Some(line) = stderr.lines().find(|l| {
            l.contains("ssh: connect to host")
                || l.contains("Could not resolve hostname")
                || l.contains("Connection timed out during banner exchange")
        }) {
            let reason = line.rsplit(": ").next().unwrap_or(line).trim();
            return TransportError::Connect {
                host: self.display(),
                reason: reason.to_owned(),
            };
        }
        TransportError::Ssh {
            host: self.display(),
            message: last_line(stderr)
                .unwrap_or("ssh exited with status 255")
                .to_owned(),
        }
    }
}

/// Makes `dir` (and its parents) if needed, with mode 0700: the sockets in
/// it are logged-in connections.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// Runs the agent on the target. Pushes this binary first if the target
/// has no ferry of this build or version.
///
/// Over a kept connection, the agent kept by an earlier job is used when it
/// is there, and a launched one is asked to stay (see [`kept`]).
pub fn start_agent(dest: &Destination, root: &Path) -> Result<Link, TransportError> {
    dest.preflight()?;
    let keep = kept::plan(dest, root);
    let mut no_answer = false;
    if let Some(k) = &keep {
        match kept::connect(dest, k) {
            kept::Reached::Agent(link) => return Ok(link),
            kept::Reached::NoAnswer => no_answer = true,
            kept::Reached::Nothing => {}
        }
    }
    let keep = keep.map(|k| (k, no_answer));
    let start = |promote| match try_start(dest, root, promote, keep.as_ref())? {
        // A ferry of this version that cannot stay (another build of it on
        // the target's PATH): an agent that does not.
        Started::CannotKeep(why) => {
            tracing::debug!("launching an agent that does not stay: {why}");
            try_start(dest, root, promote, None)
        }
        started => Ok(started),
    };
    match start(false)? {
        Started::Running(link) => Ok(link),
        Started::Missing | Started::CannotKeep(_) => {
            push::upload(dest)?;
            match start(true)? {
                Started::Running(link) => Ok(link),
                Started::Missing | Started::CannotKeep(_) => Err(TransportError::Push {
                    host: dest.display(),
                    reason: "the pushed copy is not there after its upload".into(),
                }),
            }
        }
    }
}

enum Started {
    Running(Link),
    Missing,
    /// The agent was asked to stay and did not say whether it does.
    CannotKeep(String),
}

fn try_start(
    dest: &Destination,
    root: &Path,
    promote: bool,
    keep: Option<&(kept::Keep, bool)>,
) -> Result<Started, TransportError> {
    let (to_agent_rx, to_agent_tx) = to_agent()?;
    let (mut from_agent_rx, from_agent_tx) = pipe()?;
    let (err_rx, err_tx) = pipe()?;
    let launcher = push::launcher(root, promote, keep.map(|(k, _)| (k.name.as_str(), k.idle)))?;
    let mut cmd = dest.command(&launcher);
    cmd.stdin(Stdio::from(OwnedFd::from(to_agent_rx)))
        .stdout(Stdio::from(OwnedFd::from(from_agent_tx)))
        .stderr(Stdio::from(OwnedFd::from(err_tx)));
    let child = spawn(&mut cmd)?;
    // Our copies of the child's ends went with `cmd`'s Stdio; dropping
    // `cmd` closes them, so EOF arrives when `ssh` exits.
    drop(cmd);
    let worker = std::thread::Builder::new()
        .name("ferry-ssh".into())
        .spawn({
            let dest = dest.clone();
            move || wait(child, err_rx, &dest)
        })
        .map_err(|source| TransportError::Io {
            op: "start the ssh watcher",
            source,
        })?;
    let banner = read_banner(&mut from_agent_rx);
    if let (Ok(Banner::Running), Some((keep, no_answer))) = (&banner, keep) {
        if let Err(said) = kept::after_launch(dest, keep, *no_answer, &mut from_agent_rx) {
            drop(to_agent_tx);
            let end = worker.join().map_err(|_| TransportError::Panicked)??;
            return Ok(Started::CannotKeep(format!(
                "{said}{}",
                last_line(&end.stderr).map_or(String::new(), |l| format!(": {l}"))
            )));
        }
    }
    match banner {
        Ok(Banner::Running) => Ok(Started::Running(Link {
            tx: to_agent_tx,
            rx: Box::new(from_agent_rx),
            worker: Some(worker),
            peer: dest.display(),
        })),
        Ok(Banner::Missing) => {
            drop(to_agent_tx);
            let _ = worker.join();
            Ok(Started::Missing)
        }
        Err(said) => {
            drop(to_agent_tx);
            let end = worker.join().map_err(|_| TransportError::Panicked)??;
            Err(match end.exit_status {
                Some(255) => dest.failure(&end.stderr),
                _ => TransportError::Launch {
                    host: dest.display(),
                    reason: format!(
                        "{said}{}",
                        last_line(&end.stderr).map_or(String::new(), |l| format!(": {l}"))
                    ),
                },
            })
        }
    }
}

/// The launcher's answer.
#[derive(Debug, PartialEq)]
pub(super) enum Banner {
    Running,
    Missing,
}

/// Reads up to the launcher's line, byte by byte so nothing of the agent's
/// stream after it is taken. What the login printed before it (up to
/// [`push::MAX_NOISE`] bytes) is skipped; a line that merely ends with the
/// launcher's words counts, as output without a newline runs into it. On
/// failure, says what came instead.
pub(super) fn read_banner(rx: &mut impl Read) -> Result<Banner, String> {
    let mut line = Vec::new();
    let mut last = String::new();
    let mut seen = 0usize;
    let mut byte = [0u8; 1];
    while seen <= push::MAX_NOISE {
        match rx.read(&mut byte) {
            Ok(0) => {
                let text = String::from_utf8_lossy(&line);
                let said = if text.trim().is_empty() {
                    &last
                } else {
                    text.trim()
                };
                return Err(if said.is_empty() {
                    "no reply".into()
                } else {
                    format!("the login printed {said:?} and ended before ferry's launcher ran")
                });
            }
            Ok(_) if byte[0] == b'\n' => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                if text.ends_with(push::RUNNING) {
                    return Ok(Banner::Running);
                }
                if text.ends_with(push::MISSING) {
                    return Ok(Banner::Missing);
                }
                if !text.trim().is_empty() {
                    tracing::debug!(line = text, "skipped what the login printed");
                    last = text.trim().to_owned();
                }
                line.clear();
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
        seen += 1;
    }
    Err(format!(
        "more than {} KiB of output before ferry's launcher ran, the last line {last:?}",
        push::MAX_NOISE >> 10
    ))
}

fn spawn(cmd: &mut Command) -> Result<Child, TransportError> {
    cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TransportError::NoClient,
        _ => TransportError::Io {
            op: "start ssh",
            source,
        },
    })
}

const STDERR_KEEP: usize = 4096;

/// Keeps the tail of `ssh`'s stderr (the agent's, and ssh's own) until it
/// exits, then reports how the session ended.
fn wait(
    mut child: Child,
    mut stderr_rx: io::PipeReader,
    dest: &Destination,
) -> Result<LinkEnd, TransportError> {
    let mut stderr = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stderr_rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                stderr.extend_from_slice(&buf[..n]);
                if stderr.len() > STDERR_KEEP {
                    stderr.drain(..stderr.len() - STDERR_KEEP);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child.wait().map_err(|source| TransportError::Lost {
        host: dest.display(),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // ssh's own failure: the connection, not the agent.
        (Some(255), _) => Err(dest.failure(&stderr)),
        (code, None) => Ok(LinkEnd {
            exit_status: code,
            stderr,
        }),
        (_, Some(signal)) => Err(TransportError::Lost {
            host: dest.display(),
            source: io::Error::other(format!("ssh was killed by signal {signal}")),
        }),
    }
}

/// Runs `remote` on the target with `input` on its stdin and gives back
/// its stdout as it comes, to `sink`. For short jobs (the push).
pub(super) fn run(
    dest: &Destination,
    remote: &str,
    input: &[u8],
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), TransportError> {
    let mut cmd = dest.command(remote);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut cmd)?;
    let io_err = |op| move |source| TransportError::Io { op, source };
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // The remote side reads all of its input before it writes, so one
    // thread can write, then read.
    let written = stdin.write_all(input);
    drop(stdin);
    let mut stdout = stdout;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sink(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read from ssh")(e)),
        }
    }
    let status = child.wait().map_err(io_err("wait for ssh"))?;
    let stderr = err_reader.join().unwrap_or_default();
    match status.code() {
        Some(0) => written.map_err(io_err("write to ssh")),
        Some(255) => Err(dest.failure(&stderr)),
        _ => Err(TransportError::Push {
            host: dest.display(),
            reason: last_line(&stderr)
                .unwrap_or("the remote command failed")
                .to_owned(),
        }),
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// ferry run as `ssh`'s askpass program: prints the password from the
/// file or the environment, only for prompts that ask for a password or a
/// passphrase. Anything else (a host key question) is refused.
pub fn askpass(prompt: &str) -> Result<Secret, String> {
    let lower = prompt.to_lowercase();
    if !(lower.contains("password") || lower.contains("passphrase")) {
        return Err(format!(
            "ferry answers only password prompts, not {prompt:?}"
        ));
    }
    match std::env::var_os(ASKPASS_FILE_ENV) {
        Some(path) => Secret::from_file(Path::new(&path)).map_err(|e| e.to_string()),
        None => Secret::from_env().ok_or_else(|| format!("{PASSWORD_ENV} is not set")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(opts: &SshOptions) -> Destination {
        Destination {
            user: "backup".into(),
            host: "standby.example".into(),
            port: 2222,
            opts: opts.clone(),
        }
    }

    fn banner(stream: &str) -> Result<Banner, String> {
        read_banner(&mut stream.as_bytes())
    }

    #[test]
    fn the_launcher_line_is_found_after_what_the_login_printed() {
        let running = format!("{}\n", push::RUNNING);
        assert_eq!(banner(&running), Ok(Banner::Running));
        assert_eq!(
            banner(&format!(
                "Welcome!\r\n\nLast backup: never\n{}\n",
                push::MISSING
            )),
            Ok(Banner::Missing)
        );
        // Output without a newline runs into the launcher's line.
        assert_eq!(banner(&format!("motd{running}")), Ok(Banner::Running));
        // Nothing of the agent's stream after the line is taken.
        let owned = format!("hi\n{running}AGENT");
        let mut stream = owned.as_bytes();
        assert_eq!(read_banner(&mut stream), Ok(Banner::Running));
        assert_eq!(stream, b"AGENT");
    }

    #[test]
    fn a_login_that_never_runs_the_launcher_is_quoted() {
        assert_eq!(banner(""), Err("no reply".into()));
        let err = banner("This account is currently not available.\n").unwrap_err();
        assert!(
            err.contains("\"This account is currently not available.\" and ended"),
            "{err}"
        );
        let err = banner("partial line").unwrap_err();
        assert!(err.contains("\"partial line\""), "{err}");
        let err = banner(&"chatty\n".repeat(push::MAX_NOISE)).unwrap_err();
        assert!(err.contains("more than 16 KiB"), "{err}");
        assert!(err.contains("\"chatty\""), "{err}");
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/srv/a b"), "'/srv/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn password_file_must_be_private() {
        let dir = crate::testutil::TempDir::new("secret");
        let path = dir.path("pw");
        fs::write(&path, "hunter2\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secret::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("hunter2"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "hunter2");
    }

    #[test]
    fn host_keys_are_always_checked_and_nothing_is_forwarded() {
        let strict = SshOptions::default();
        let args: Vec<String> = dest(&strict)
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for must in [
            "StrictHostKeyChecking=yes",
            "ForwardAgent=no",
            "ClearAllForwardings=yes",
            "RemoteCommand=none",
            "BatchMode=yes",
        ] {
            assert!(args.iter().any(|a| a == must), "{must} missing: {args:?}");
        }
        // The host is last and after `--`, so it can never be an option.
        assert_eq!(&args[args.len() - 2..], ["--", "standby.example"]);
        let accept = SshOptions {
            accept_new_host_key: true,
            password: Some(Password::Env),
            ..SshOptions::default()
        };
        let args: Vec<String> = dest(&accept)
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.iter().any(|a| a == "StrictHostKeyChecking=accept-new"));
        assert!(!args.iter().any(|a| a == "BatchMode=yes"), "{args:?}");
    }

    fn arg_strings(d: &Destination) -> Vec<String> {
        d.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_connection_is_shared_only_by_jobs_that_would_make_the_same_one() {
        let dir = crate::testutil::TempDir::new("control");
        let sockets = dir.path("state/ssh");
        let known = dir.path("known_hosts");
        fs::write(&known, "").unwrap();
        let opts = SshOptions {
            known_hosts: Some(known.clone()),
            reuse: Some(Reuse {
                dir: sockets.clone(),
                persist: Duration::from_secs(60),
            }),
            ..SshOptions::default()
        };
        let args = arg_strings(&dest(&opts));
        assert!(args.iter().any(|a| a == "ControlMaster=auto"), "{args:?}");
        assert!(args.iter().any(|a| a == "ControlPersist=60"), "{args:?}");
        let path = args
            .iter()
            .find_map(|a| a.strip_prefix("ControlPath="))
            .expect("a control path");
        assert!(path.starts_with(&sockets.display().to_string()), "{path}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&sockets).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the sockets' directory is private");
        assert_eq!(
            dest(&opts).command("true").get_current_dir(),
            Some(Path::new("/")),
            "a kept connection must not hold the job's working directory"
        );

        // The same job again shares it; anything that changes how the
        // connection is made or checked does not.
        let key = |opts: &SshOptions| dest(opts).connection_key();
        let base = key(&opts);
        assert_eq!(key(&opts), base);
        let mut other_port = dest(&opts);
        other_port.port = 2223;
        assert_ne!(other_port.connection_key(), base);
        let other_known = SshOptions {
            known_hosts: Some(dir.path("elsewhere")),
            ..opts.clone()
        };
        assert_ne!(key(&other_known), base);
        let accept = SshOptions {
            accept_new_host_key: true,
            ..opts.clone()
        };
        assert_ne!(key(&accept), base);
        let keyed = SshOptions {
            identity: Some(dir.path("id")),
            ..opts.clone()
        };
        assert_ne!(key(&keyed), base);
        fs::write(&known, "[standby.example]:2222 ssh-ed25519 AAAA\n").unwrap();
        assert_ne!(
            key(&opts),
            base,
            "known_hosts changed: check the host again"
        );

        // Off, or a directory too deep for a socket path: a connection of
        // the job's own.
        for reuse in [
            Reuse {
                dir: sockets.clone(),
                persist: Duration::ZERO,
            },
            Reuse {
                dir: dir.path(&"d".repeat(100)),
                persist: Duration::from_secs(60),
            },
        ] {
            let opts = SshOptions {
                reuse: Some(reuse),
                ..SshOptions::default()
            };
            let args = arg_strings(&dest(&opts));
            assert!(args.iter().any(|a| a == "ControlMaster=no"), "{args:?}");
            assert!(args.iter().any(|a| a == "ControlPath=none"), "{args:?}");
        }
    }

    #[test]
    fn password_never_reaches_argv() {
        let dir = crate::testutil::TempDir::new("askpass");
        let path = dir.path("pw");
        fs::write(&path, "hunter2\n").unwrap();
        let opts = SshOptions {
            password: Some(Password::File(path)),
            ..SshOptions::default()
        };
        let cmd = dest(&opts).command("true");
        assert!(cmd
            .get_args()
            .all(|a| !a.to_string_lossy().contains("hunter2")));
        assert!(cmd
            .get_envs()
            .all(|(_, v)| v.is_none_or(|v| !v.to_string_lossy().contains("hunter2"))));
    }

    #[test]
    fn askpass_answers_only_password_prompts() {
        let err = askpass("Are you sure you want to continue connecting (yes/no)?").unwrap_err();
        assert!(err.contains("only password prompts"), "{err}");
    }

    #[test]
    fn ssh_failures_become_clear_errors() {
        let opts = SshOptions {
            known_hosts: Some(PathBuf::from("/etc/kh")),
            ..SshOptions::default()
        };
        let d = dest(&opts);
        let changed = "@@@\nWARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!\nThe fingerprint \
                       for the ED25519 key sent by the remote host is\nSHA256:abcd.\nHost key \
                       verification failed.\n";
        let err = d.failure(changed).to_string();
        assert!(err.contains("does not match /etc/kh"), "{err}");
        assert!(err.contains("SHA256:abcd"), "{err}");
        let unknown = "No ED25519 host key is known for [standby.example]:2222 and you have \
                       requested strict checking.\r\nHost key verification failed.\r\n";
        let err = d.failure(unknown).to_string();
        assert!(err.contains("--accept-new-host-key"), "{err}");
        let denied = "backup@standby.example: Permission denied (publickey,password).\r\n";
        let err = d.failure(denied).to_string();
        assert!(
            err.contains("authentication as backup@[standby.example]:2222"),
            "{err}"
        );
        assert!(err.contains("publickey,password"), "{err}");
        let refused = "ssh: connect to host standby.example port 2222: Connection refused\r\n";
        let err = d.failure(refused).to_string();
        assert_eq!(
            err,
            "cannot connect to [standby.example]:2222: Connection refused"
        );
    }
}
