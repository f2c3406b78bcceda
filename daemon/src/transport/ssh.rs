//! `ssh://` targets over libssh2: connect, verify the host key, log in, run
//! the agent on an exec channel, and carry its bytes.
//!
//! Security rules kept here:
//! - the host key is always checked against known_hosts; an unknown key is
//!   recorded only with `--accept-new-host-key`, a changed key never;
//! - a password comes from a 0600 file or the environment, never argv, and
//!   is never logged ([`Secret`] has no readable `Debug`).
//!
//! libssh2 serialises every call on a session, so one thread (the pump)
//! owns the channel in non-blocking mode and moves bytes both ways between
//! it and two pipes; a blocking read could otherwise starve the writer.

use std::{
    fs,
    io::{self, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use ssh2::{CheckResult, HashType, KnownHostFileKind, MethodType, Session};

use super::{pipe, push, Link, LinkEnd, TransportError};
use crate::sys::fd::{poll, set_nonblocking, Interest};

/// Environment variable a password may come from.
pub const PASSWORD_ENV: &str = "FERRY_SSH_PASSWORD";

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

#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// known_hosts to check against; default `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// Record an unknown host key instead of refusing.
    pub accept_new_host_key: bool,
    /// Private key to log in with; default: ssh-agent, then ~/.ssh/id_*.
    pub identity: Option<PathBuf>,
    /// Password, or passphrase of the key.
    pub password: Option<Secret>,
    pub connect_timeout: Option<Duration>,
}

impl SshOptions {
    fn known_hosts_path(&self) -> PathBuf {
        self.known_hosts
            .clone()
            .unwrap_or_else(|| home().join(".ssh/known_hosts"))
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// Host key algorithms in order of preference, strongest common first.
const HOST_KEY_PREFS: &str = "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,\
                              ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256,ssh-rsa";
/// AES-GCM is the fastest cipher libssh2 offers on hosts with AES-NI.
const CIPHER_PREFS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";

/// An authenticated session and the socket under it.
pub struct Connection {
    pub session: Session,
    /// The session's TCP socket, owned by `session`; kept for `poll`.
    fd: RawFd,
    /// `host` or `[host]:port`.
    pub display: String,
}

/// Opens an authenticated session to `user@host:port`.
pub fn connect(
    user: &str,
    host: &str,
    port: u16,
    opts: &SshOptions,
) -> Result<Connection, TransportError> {
    let addr = format!("{host}:{port}");
    let display = host_pattern(host, port);
    let connect_err = |source| TransportError::Connect {
        addr: addr.clone(),
        source,
    };
    let timeout = opts.connect_timeout.unwrap_or(Duration::from_secs(15));
    let sockaddr = addr
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(io::Error::other("no address")))?;
    let tcp = TcpStream::connect_timeout(&sockaddr, timeout).map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    let mut session = Session::new().map_err(|source| TransportError::Handshake {
        host: display.clone(),
        source,
    })?;
    let ssh_err = |op| {
        let host = display.clone();
        move |source| TransportError::Ssh { host, op, source }
    };
    session
        .method_pref(MethodType::HostKey, HOST_KEY_PREFS)
        .map_err(ssh_err("host key preference"))?;
    for dir in [MethodType::CryptCs, MethodType::CryptSc] {
        session
            .method_pref(dir, CIPHER_PREFS)
            .map_err(ssh_err("cipher preference"))?;
    }
    session.set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    let fd = tcp.as_raw_fd();
    session.set_tcp_stream(tcp);
    session
        .handshake()
        .map_err(|source| TransportError::Handshake {
            host: display.clone(),
            source,
        })?;
    verify_host_key(&session, host, port, opts)?;
    authenticate(&session, user, &display, opts)?;
    // Long transfers must not time out; liveness comes from TCP.
    session.set_timeout(0);
    Ok(Connection {
        session,
        fd,
        display,
    })
}

/// `host` or `[host]:port`, as known_hosts writes it.
fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

fn verify_host_key(
    session: &Session,
    host: &str,
    port: u16,
    opts: &SshOptions,
) -> Result<(), TransportError> {
    let path = opts.known_hosts_path();
    let display = host_pattern(host, port);
    let (key, key_type) = session.host_key().ok_or_else(|| TransportError::Ssh {
        host: display.clone(),
        op: "read host key",
        source: ssh2::Error::unknown(),
    })?;
    let fingerprint = session
        .host_key_hash(HashType::Sha256)
        .map(|h| format!("{} SHA256:{}", key_type_name(key_type), base64(h, false)))
        .unwrap_or_default();
    let mut known = session
        .known_hosts()
        .map_err(|source| TransportError::Ssh {
            host: display.clone(),
            op: "known hosts",
            source,
        })?;
    if path.exists() {
        known
            .read_file(&path, KnownHostFileKind::OpenSSH)
            .map_err(|e| TransportError::KnownHosts {
                path: path.display().to_string(),
                source: io::Error::other(e.message().to_owned()),
            })?;
    }
    match known.check_port(host, port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(TransportError::HostKeyChanged {
            host: display,
            known_hosts: path.display().to_string(),
            fingerprint,
        }),
        CheckResult::NotFound | CheckResult::Failure if opts.accept_new_host_key => {
            let line = format!(
                "{display} {} {}\n",
                key_type_name(key_type),
                base64(key, true)
            );
            append_known_host(&path, &line).map_err(|source| TransportError::KnownHosts {
                path: path.display().to_string(),
                source,
            })?;
            tracing::warn!(
                "recorded the host key of {} ({fingerprint}) in {}",
                host_pattern(host, port),
                path.display()
            );
            Ok(())
        }
        CheckResult::NotFound | CheckResult::Failure => Err(TransportError::UnknownHostKey {
            host: display,
            known_hosts: path.display().to_string(),
            fingerprint,
        }),
    }
}

fn append_known_host(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()
}

fn key_type_name(t: ssh2::HostKeyType) -> &'static str {
    use ssh2::HostKeyType as T;
    match t {
        T::Rsa => "ssh-rsa",
        T::Dss => "ssh-dss",
        T::Ecdsa256 => "ecdsa-sha2-nistp256",
        T::Ecdsa384 => "ecdsa-sha2-nistp384",
        T::Ecdsa521 => "ecdsa-sha2-nistp521",
        T::Ed25519 => "ssh-ed25519",
        T::Unknown => "unknown",
    }
}

/// Standard base64: unpadded as OpenSSH prints fingerprints, padded as
/// known_hosts holds key blobs.
fn base64(bytes: &[u8], pad: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=group.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if pad {
            for _ in group.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

fn authenticate(
    session: &Session,
    user: &str,
    display: &str,
    opts: &SshOptions,
) -> Result<(), TransportError> {
    let mut tried = Vec::new();
    let passphrase = opts.password.as_ref().map(Secret::expose);
    if let Some(key) = &opts.identity {
        tried.push(format!("key {}", key.display()));
        if !key.exists() {
            return Err(TransportError::Auth {
                user: user.into(),
                host: display.into(),
                tried: format!("key {} (no such file)", key.display()),
            });
        }
        if session
            .userauth_pubkey_file(user, None, key, passphrase)
            .is_ok()
        {
            return Ok(());
        }
    } else {
        if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            tried.push("ssh-agent".to_owned());
            if session.userauth_agent(user).is_ok() {
                return Ok(());
            }
        }
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let key = home().join(".ssh").join(name);
            if key.exists() {
                tried.push(format!("key {}", key.display()));
                if session
                    .userauth_pubkey_file(user, None, &key, passphrase)
                    .is_ok()
                {
                    return Ok(());
                }
            }
        }
    }
    if let Some(password) = &opts.password {
        tried.push("password".to_owned());
        if session.userauth_password(user, password.expose()).is_ok() {
            return Ok(());
        }
    }
    if tried.is_empty() {
        tried.push("nothing: no key, no ssh-agent, no password".to_owned());
    }
    Err(TransportError::Auth {
        user: user.into(),
        host: display.into(),
        tried: tried.join(", "),
    })
}

/// Runs the agent on the target and starts the pump that carries its bytes.
pub fn start_agent(conn: Connection, root: &Path) -> Result<Link, TransportError> {
    let Connection {
        session,
        fd,
        display,
    } = conn;
    let program = push::remote_ferry(&session, &display)?;
    let command = format!(
        "{program} agent --root {}",
        shell_quote(&root.to_string_lossy())
    );
    let mut channel = session
        .channel_session()
        .map_err(|source| TransportError::Ssh {
            host: display.clone(),
            op: "open channel",
            source,
        })?;
    channel
        .exec(&command)
        .map_err(|source| TransportError::Ssh {
            host: display.clone(),
            op: "run the agent",
            source,
        })?;
    let (to_agent_rx, to_agent_tx) = pipe()?;
    let (from_agent_rx, from_agent_tx) = pipe()?;
    let peer = display.clone();
    let worker = std::thread::Builder::new()
        .name("ferry-ssh".into())
        .spawn(move || pump(session, fd, channel, &display, to_agent_rx, from_agent_tx))
        .map_err(|source| TransportError::Io {
            op: "start the SSH pump",
            source,
        })?;
    Ok(Link {
        tx: to_agent_tx,
        rx: from_agent_rx,
        worker,
        peer,
    })
}

/// Single-quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

const PUMP_BUF: usize = 1 << 20;
const STDERR_KEEP: usize = 4096;

/// Moves bytes between the channel and the pipes until the agent closes
/// its side. Returns the agent's exit status and the tail of its stderr.
fn pump(
    session: Session,
    tcp_fd: RawFd,
    mut channel: ssh2::Channel,
    host: &str,
    mut outgoing: io::PipeReader,
    mut incoming: io::PipeWriter,
) -> Result<LinkEnd, TransportError> {
    let lost = |source: io::Error| TransportError::Lost {
        host: host.to_owned(),
        source,
    };
    set_nonblocking(outgoing.as_fd()).map_err(|source| TransportError::Io {
        op: "set pipe non-blocking",
        source,
    })?;
    session.set_blocking(false);
    let mut out = vec![0u8; PUMP_BUF];
    let (mut out_pos, mut out_len) = (0usize, 0usize);
    let mut out_eof = false;
    let mut eof_sent = false;
    let mut consumer_gone = false;
    let mut inbuf = vec![0u8; 256 << 10];
    let mut errbuf = [0u8; 4096];
    let mut stderr = Vec::new();
    loop {
        let mut progress = false;
        if out_pos == out_len && !out_eof {
            match outgoing.read(&mut out) {
                Ok(0) => out_eof = true,
                Ok(n) => {
                    (out_pos, out_len) = (0, n);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(lost(e)),
            }
        }
        if out_pos < out_len {
            match channel.write(&out[out_pos..out_len]) {
                Ok(n) => {
                    out_pos += n;
                    progress |= n > 0;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(lost(e)),
            }
        } else if out_eof && !eof_sent {
            match channel.send_eof() {
                Ok(()) => {
                    eof_sent = true;
                    progress = true;
                }
                Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {}
                Err(e) => return Err(lost(io::Error::other(e))),
            }
        }
        match channel.read(&mut inbuf) {
            Ok(0) => {}
            Ok(n) => {
                progress = true;
                if !consumer_gone && incoming.write_all(&inbuf[..n]).is_err() {
                    // The source stopped listening; keep the session
                    // draining so the agent can finish.
                    consumer_gone = true;
                }
            }
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(lost(e)),
        }
        match channel.stderr().read(&mut errbuf) {
            Ok(n) if n > 0 => {
                progress = true;
                stderr.extend_from_slice(&errbuf[..n]);
                if stderr.len() > STDERR_KEEP {
                    stderr.drain(..stderr.len() - STDERR_KEEP);
                }
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(lost(e)),
        }
        if channel.eof() {
            break;
        }
        if !progress {
            let dirs = session.block_directions();
            let tcp_interest = Interest {
                read: true,
                write: matches!(
                    dirs,
                    ssh2::BlockDirections::Outbound | ssh2::BlockDirections::Both
                ),
            };
            // SAFETY: `session` owns the socket behind `tcp_fd` and lives
            // until this function returns, past this borrow.
            let tcp = unsafe { BorrowedFd::borrow_raw(tcp_fd) };
            let mut fds = vec![(tcp, tcp_interest)];
            if out_pos == out_len && !out_eof {
                fds.push((
                    outgoing.as_fd(),
                    Interest {
                        read: true,
                        write: false,
                    },
                ));
            }
            poll(&fds, Duration::from_millis(100)).map_err(lost)?;
        }
    }
    drop(incoming);
    // Collect the exit status; give a stuck close a bounded wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match channel.wait_close() {
            Ok(()) => break,
            Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {
                if std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
    let _ = channel.stderr().read_to_end(&mut stderr);
    Ok(LinkEnd {
        exit_status: channel.exit_status().ok(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b"foobar", false), "Zm9vYmFy");
        assert_eq!(base64(b"fo", false), "Zm8");
        // Key blobs are padded.
        let long = [0u8; 34];
        assert!(base64(&long, true).ends_with("=="));
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
        let dir = std::env::temp_dir().join(format!("ferry-secret-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        fs::write(&path, "hunter2\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secret::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("hunter2"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "hunter2");
        fs::remove_dir_all(dir).unwrap();
    }
}
