//! Making sure the target runs an agent of this very ferry.
//!
//! In order: a copy pushed earlier, found by the hash of this binary
//! (checked when it was pushed); a `ferry` on the target's PATH that reports
//! this version; otherwise this binary is pushed over SFTP into
//! `~/.cache/ferry/agent-<sha256 prefix>/` (mode 0700), read back, checked
//! against its SHA-256, and only then renamed into place and run.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use sha2::{Digest, Sha256};
use ssh2::{OpenFlags, OpenType, RenameFlags, Session, Sftp};

use super::{ssh::shell_quote, TransportError};

/// What `ferry --version` prints.
pub fn version_line() -> String {
    format!("ferry {}", env!("CARGO_PKG_VERSION"))
}

/// This binary and its SHA-256, read once.
fn own_binary() -> Result<&'static (Vec<u8>, String), String> {
    static BINARY: OnceLock<Result<(Vec<u8>, String), String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let path = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let hash = hex(&Sha256::digest(&bytes));
            Ok((bytes, hash))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the shell word that runs the right ferry on the target.
pub fn remote_ferry(session: &Session, host: &str) -> Result<String, TransportError> {
    let push_err = |reason: String| TransportError::Push {
        host: host.to_owned(),
        reason,
    };
    let (bytes, hash) = own_binary().map_err(push_err)?;
    let sftp = session.sftp().map_err(|e| push_err(format!("SFTP: {e}")))?;
    let home = sftp
        .realpath(Path::new("."))
        .map_err(|e| push_err(format!("SFTP home directory: {e}")))?;
    let dir = home
        .join(".cache/ferry")
        .join(format!("agent-{}", &hash[..16]));
    let path = dir.join("ferry");
    // A copy under this hash's name was checked when it was pushed and only
    // then renamed into place, in a directory only its owner can write; the
    // size guards against a truncated file without reading it all back.
    if sftp
        .stat(&path)
        .is_ok_and(|st| st.size == Some(bytes.len() as u64))
    {
        return Ok(shell_quote(&path.to_string_lossy()));
    }
    // Running a command costs a round trip and a login shell: only now.
    if let Ok((0, out)) = run(session, "ferry --version 2>/dev/null") {
        if out.trim() == version_line() {
            return Ok("ferry".to_owned());
        }
    }
    for d in [home.join(".cache"), home.join(".cache/ferry"), dir.clone()] {
        if sftp.stat(&d).is_err() {
            sftp.mkdir(&d, 0o700)
                .map_err(|e| push_err(format!("mkdir {}: {e}", d.display())))?;
        }
    }
    let part = dir.join("ferry.part");
    {
        let mut f = sftp
            .open_mode(
                &part,
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                0o700,
                OpenType::File,
            )
            .map_err(|e| push_err(format!("create {}: {e}", part.display())))?;
        for piece in bytes.chunks(1 << 20) {
            f.write_all(piece)
                .map_err(|e| push_err(format!("write {}: {e}", part.display())))?;
        }
    }
    let got = remote_hash(&sftp, &part).map_err(push_err)?;
    if got != *hash {
        let _ = sftp.unlink(&part);
        return Err(push_err(format!(
            "the copy's SHA-256 is {got}, expected {hash}: transfer corrupted"
        )));
    }
    sftp.rename(
        &part,
        &path,
        Some(RenameFlags::OVERWRITE | RenameFlags::ATOMIC),
    )
    .map_err(|e| push_err(format!("rename into {}: {e}", path.display())))?;
    tracing::info!("pushed ferry to {host}:{}", path.display());
    Ok(shell_quote(&path.to_string_lossy()))
}

/// SHA-256 of a remote file, read back over SFTP.
fn remote_hash(sftp: &Sftp, path: &PathBuf) -> Result<String, String> {
    let mut f = sftp
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Runs `command` on the target; its exit status and stdout.
fn run(session: &Session, command: &str) -> Result<(i32, String), ssh2::Error> {
    let mut ch = session.channel_session()?;
    ch.exec(command)?;
    let mut out = String::new();
    let _ = ch.read_to_string(&mut out);
    ch.wait_close()?;
    Ok((ch.exit_status()?, out))
}
