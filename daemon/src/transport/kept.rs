//! The source's side of kept agents (see [`crate::agent::kept`]): when a
//! destination keeps its SSH connection, the agent a job launches stays on
//! the target, and the kept connection forwards a root-only socket in the
//! state directory to the agent's socket. The next job connects to that
//! socket: no exec channel, no login shell, no new agent; one round trip
//! for the channel.
//!
//! Anything short of the agent's banner on that socket (no socket, the
//! connection gone, the agent gone, forwarding refused by the server) and
//! the job launches an agent as before, which stays in turn. When that
//! agent says one was listening all along, the server refuses to forward
//! to it (`restrict` or `no-port-forwarding` on the key,
//! `AllowStreamLocalForwarding no`): for [`REFUSED_FOR`] jobs launch
//! agents that do not stay, without trying first. A kept agent
//! serves only the build that launched it and one root: both are in its
//! name (and a session checks the protocol version as ever).

use std::{
    io::{self, Read},
    os::{
        fd::AsFd,
        unix::{fs::MetadataExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use sha2::{Digest, Sha256};

use super::{
    push,
    ssh::{read_banner, Banner, Destination},
    Link, TO_AGENT_BUFFER,
};
use crate::{
    agent::kept::{KEPT, NOT_KEPT, STILL_KEPT},
    sys::fd::{poll, Interest},
};

/// How long jobs do without a kept agent after the server refused to
/// forward to one; then they try again.
pub const REFUSED_FOR: Duration = Duration::from_secs(600);

/// A kept agent this job may use, or ask for.
#[derive(Clone, Debug)]
pub struct Keep {
    /// Its name on the target: this build and the root.
    pub name: String,
    /// How long it stays without sessions: as long as the connection.
    pub idle: Duration,
    /// The forwarded socket in the state directory.
    pub local: PathBuf,
}

/// Longest path of a Unix socket (108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The kept agent for `root` on `dest`, if `dest` keeps its connection.
pub fn plan(dest: &Destination, root: &Path) -> Option<Keep> {
    let (control, idle) = dest.control_path()?;
    // This build, known without reading and hashing all of it (a job that
    // finds its kept agent would spend more on that than on the rest of
    // connecting): the version, and where the binary is and when it was
    // last written (a ctime no copy can keep).
    let exe = std::env::current_exe().ok()?;
    let meta = std::fs::metadata(&exe).ok()?;
    let mut h = Sha256::new();
    h.update(push::version_line().as_bytes());
    for n in [meta.dev(), meta.ino(), meta.len()] {
        h.update(n.to_le_bytes());
    }
    h.update(meta.ctime().to_le_bytes());
    h.update(meta.ctime_nsec().to_le_bytes());
    h.update(root.as_os_str().as_encoded_bytes());
    let name: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut local = control.into_os_string();
    local.push(format!("-{name}"));
    let local = PathBuf::from(local);
    // `ssh -L` splits its argument at ':'.
    let text = local.to_str()?;
    if text.contains(':') || text.len() > MAX_SOCKET_PATH {
        return None;
    }
    let keep = Keep { name, idle, local };
    if let Some(age) = std::fs::metadata(keep.refused())
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
    {
        if age < REFUSED_FOR {
            tracing::debug!(
                "{} refused to forward to a kept agent lately",
                dest.display()
            );
            return None;
        }
    }
    Some(keep)
}

impl Keep {
    /// Stamp of the last time the server refused to forward to the agent.
    fn refused(&self) -> PathBuf {
        let mut path = self.local.clone().into_os_string();
        path.push(".refused");
        PathBuf::from(path)
    }
}

/// How a try to reach the kept agent went.
pub enum Reached {
    Agent(Link),
    /// No forwarded socket, or no connection behind it.
    Nothing,
    /// The connection took the socket's connection and gave no banner: the
    /// agent is gone, or the server refuses to reach it.
    NoAnswer,
}

/// Reaches the kept agent, or says (in the log) why not.
pub fn connect(dest: &Destination, keep: &Keep) -> Reached {
    let stream = match UnixStream::connect(&keep.local) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // The connection that forwarded it is gone.
                let _ = std::fs::remove_file(&keep.local);
            }
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!("no kept agent at {}: {e}", keep.local.display());
            }
            return Reached::Nothing;
        }
    };
    crate::sys::fd::grow_send_buffer(stream.as_fd(), TO_AGENT_BUFFER);
    // The kept connection closes the socket at once when it cannot reach
    // the agent; a connection that hangs gets the connect timeout.
    let patience = dest.opts.connect_timeout.unwrap_or(Duration::from_secs(15));
    let mut rx = match stream
        .try_clone()
        .and_then(|rx| rx.set_read_timeout(Some(patience)).map(|()| rx))
    {
        Ok(rx) => rx,
        Err(e) => {
            tracing::debug!("the kept agent's socket: {e}");
            return Reached::Nothing;
        }
    };
    match read_banner(&mut rx) {
        Ok(Banner::Running) => {}
        Ok(Banner::Missing) => return Reached::NoAnswer,
        Err(said) => {
            tracing::debug!("the kept agent did not answer: {said}");
            return Reached::NoAnswer;
        }
    }
    if rx.set_read_timeout(None).is_err() {
        return Reached::NoAnswer;
    }
    tracing::debug!("reached the kept agent on {}", dest.display());
    Reached::Agent(Link {
        tx: stream,
        rx: Box::new(Replies(rx)),
        worker: None,
        peer: dest.display(),
    })
}

/// The kept agent's replies, read from the socket that also carries the
/// frames to it. A thread blocked in `read` on a socket wakes whenever the
/// socket's send buffer drains: the kernel wakes every waiter, and a bulk
/// job drains it thousands of times a second, each time waking the reply
/// reader for nothing (on the core `ssh` needs). One waiting in `poll` for
/// input wakes only for input.
struct Replies(UnixStream);

impl Read for Replies {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let readable = Interest {
            read: true,
            write: false,
        };
        // However the wait ends, the read that follows is right: it returns
        // what came, or blocks as it would have.
        poll(&[(self.0.as_fd(), readable)], Duration::MAX)?;
        self.0.read(buf)
    }
}

/// After a launch that asked the agent to stay: reads the agent's line
/// about it and has the kept connection forward `keep.local` to its
/// socket; or, when this job found no answer there while the agent says
/// it listened all along, stamps the refusal. Only a stream that is not as
/// it should be is an error.
pub fn after_launch(
    dest: &Destination,
    keep: &Keep,
    no_answer: bool,
    rx: &mut impl Read,
) -> Result<(), String> {
    let line = read_line(rx)?;
    let remote = match line.strip_prefix(STILL_KEPT) {
        Some(_) if no_answer => {
            tracing::debug!(
                "{} does not forward to the kept agent; launching agents that do not stay \
                 for {} minutes",
                dest.display(),
                REFUSED_FOR.as_secs() / 60
            );
            if let Err(e) = std::fs::write(keep.refused(), b"") {
                tracing::debug!("{}: {e}", keep.refused().display());
            }
            return Ok(());
        }
        Some(remote) => Some(remote),
        None => line.strip_prefix(KEPT),
    };
    if let Some(remote) = remote {
        // `ssh -L` would read a ':' as a host and port to connect to.
        if !remote.starts_with('/')
            || remote.len() > MAX_SOCKET_PATH
            || remote.contains(|c: char| c == ':' || c.is_whitespace() || c.is_control())
        {
            tracing::debug!("not forwarding to the kept agent's odd path {remote:?}");
            return Ok(());
        }
        if let Err(e) = dest.forward(&keep.local, Path::new(remote)) {
            tracing::debug!("the kept agent cannot be reached by later jobs: {e}");
        }
        Ok(())
    } else if let Some(why) = line.strip_prefix(NOT_KEPT) {
        tracing::debug!("the agent on {} does not stay: {why}", dest.display());
        Ok(())
    } else {
        Err(format!(
            "the agent said {line:?} instead of whether it stays"
        ))
    }
}

/// Longest line the agent prints about staying.
const MAX_LINE: usize = 4096;

/// One line, byte by byte so that no frame after it is taken.
fn read_line(rx: &mut impl Read) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() <= MAX_LINE {
        match rx.read(&mut byte) {
            Ok(0) => return Err("the agent ended before its first frame".into()),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the agent's line about staying is too long".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_about_staying_is_read_up_to_the_frames_and_no_further() {
        let mut stream: &[u8] = b"ferry-agent: kept at /run/user/0/ferry/keep-x.sock\nFRRY";
        assert_eq!(
            read_line(&mut stream).unwrap(),
            "ferry-agent: kept at /run/user/0/ferry/keep-x.sock"
        );
        assert_eq!(stream, b"FRRY");
        let mut cut: &[u8] = b"ferry-agent: kept";
        assert!(read_line(&mut cut).is_err());
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(read_line(&mut long.as_slice()).is_err());
    }
}
