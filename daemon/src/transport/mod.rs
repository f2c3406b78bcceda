//! Reaching the target agent. A [`Link`] is a pair of byte streams to and
//! from one agent session, plus the worker that carries them:
//!
//! - `file://` runs the agent in this process, on a thread joined by a
//!   socket pair and a pipe: no network, the same agent code as a remote
//!   target;
//! - `ssh://` runs `ferry agent` on the target over an SSH exec channel
//!   (the OpenSSH client). The host key is always checked against
//!   known_hosts. If the target has no ferry of this version, ferry pushes
//!   its own binary into a private directory and checks it before running
//!   it.
//!
//! Frames are the protocol's business; a link only moves bytes, in both
//! directions at once, so an agent's error reply is seen while data is
//! still being sent.

mod kept;
mod local;
pub mod push;
pub mod ssh;
pub mod url;

use std::{
    io::{PipeReader, PipeWriter, Read},
    os::{fd::AsFd, unix::net::UnixStream},
    thread::JoinHandle,
};

pub use ssh::{Password, Reuse, Secret, SshOptions};
pub use url::{Endpoint, TargetUrl, UrlError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {host}: {reason}")]
    Connect { host: String, reason: String },
    #[error(
        "host key of {host} is not in {known_hosts}; check it (ssh-keyscan), then rerun with \
         --accept-new-host-key to record it"
    )]
    UnknownHostKey { host: String, known_hosts: String },
    #[error(
        "host key of {host} does not match {known_hosts} (now {fingerprint}): refusing to \
         connect; if the host was reinstalled, remove its old key from that file"
    )]
    HostKeyChanged {
        host: String,
        known_hosts: String,
        fingerprint: String,
    },
    #[error("known hosts file {path}")]
    KnownHosts {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("authentication as {user}@{host} failed (tried: {tried})")]
    Auth {
        user: String,
        host: String,
        tried: String,
    },
    #[error("password file {path}: {reason}")]
    PasswordFile { path: String, reason: String },
    #[error("ssh to {host} failed: {message}")]
    Ssh { host: String, message: String },
    #[error("the OpenSSH client `ssh` is not installed (Debian: apt install openssh-client)")]
    NoClient,
    #[error("cannot install ferry on {host}: {reason}")]
    Push { host: String, reason: String },
    #[error("cannot start ferry's agent on {host}: {reason}")]
    Launch { host: String, reason: String },
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {host} lost")]
    Lost {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent on {host} exited with status {status}{}", stderr_suffix(.stderr))]
    AgentExited {
        host: String,
        status: i32,
        stderr: String,
    },
    #[error("local agent failed")]
    LocalAgent {
        #[source]
        source: crate::agent::AgentError,
    },
    #[error("local agent thread panicked")]
    Panicked,
}

fn stderr_suffix(stderr: &str) -> String {
    match stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(": {}", line.trim()),
        None => String::new(),
    }
}

/// How a session ended, as seen by the worker that carried it.
#[derive(Debug, Default)]
pub struct LinkEnd {
    /// The remote agent's exit status, when there is one.
    pub exit_status: Option<i32>,
    /// The tail of what the agent wrote to stderr.
    pub stderr: String,
}

/// Byte streams to and from one agent session.
pub struct Link {
    /// Frames to the agent (see [`to_agent`]). Dropping it tells the agent
    /// the session is over.
    pub tx: UnixStream,
    /// Frames from the agent; EOF when the session is over.
    pub rx: Box<dyn Read + Send>,
    /// What carries the session (the local agent's thread, `ssh`'s
    /// watcher); none for a kept agent, reached through a socket.
    pub worker: Option<JoinHandle<Result<LinkEnd, TransportError>>>,
    /// Where the agent runs, for messages.
    pub peer: String,
}

/// Options that matter only to some transports.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub ssh: SshOptions,
}

/// Starts an agent session for `url`.
pub fn connect(url: &TargetUrl, opts: &ConnectOptions) -> Result<Link, TransportError> {
    match &url.endpoint {
        Endpoint::Local => local::start(&url.root),
        Endpoint::Ssh { user, host, port } => {
            let dest = ssh::Destination {
                user: user.clone(),
                host: host.clone(),
                port: *port,
                opts: opts.ssh.clone(),
            };
            ssh::start_agent(&dest, &url.root)
        }
    }
}

/// The stream that carries frames to the agent: the agent's end (or
/// `ssh`'s stdin) and ours. A socket pair rather than a pipe, because a pipe
/// wakes its writer every time the reader takes from it while it is full:
/// a sender that outruns `ssh` would be woken (on the other core) for each
/// few KiB `ssh` reads. A socket wakes its writer only once the reader has
/// taken three quarters of the send buffer.
fn to_agent() -> Result<(UnixStream, UnixStream), TransportError> {
    let (theirs, ours) = UnixStream::pair().map_err(|source| TransportError::Io {
        op: "create socket pair",
        source,
    })?;
    crate::sys::fd::grow_send_buffer(ours.as_fd(), TO_AGENT_BUFFER);
    // The other way carries nothing: the agent's replies take their own pipe.
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    Ok((theirs, ours))
}

/// Send buffer asked for frames to the agent (the kernel doubles it for its
/// bookkeeping). Pipes to and from the agent get 1 MiB.
pub(super) const TO_AGENT_BUFFER: usize = 1 << 20;

fn pipe() -> Result<(PipeReader, PipeWriter), TransportError> {
    let (r, w) = std::io::pipe().map_err(|source| TransportError::Io {
        op: "create pipe",
        source,
    })?;
    crate::sys::fd::grow_pipe(w.as_fd(), 1 << 20);
    Ok((r, w))
}
