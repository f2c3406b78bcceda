//! Making sure the target runs an agent of this very ferry, in one round
//! trip when it is already there.
//!
//! The launcher, a short `/bin/sh` script run over the exec channel, picks
//! in order: a copy pushed earlier, found by the hash of this binary (it
//! was checked when it was pushed); a `ferry` on the target's PATH that
//! reports this version. It prints [`RUNNING`] and becomes the agent, or
//! prints [`MISSING`] and exits. Then ferry pushes its own binary into
//! `~/.cache/ferry/agent-<sha256 prefix>/` (mode 0700) as `ferry.part`,
//! reads it back, checks its SHA-256, and only then has the next launcher
//! rename it into place and run it.
//!
//! Every build pushed leaves a copy (a few MB), so copies do not pile up
//! over upgrades: the launcher stamps the copy it runs (`used`, written by
//! a builtin's redirection, no extra process), and each push removes the other
//! copies whose stamp, or whose directory when there is no stamp, is older
//! than [`PRUNE_AFTER_DAYS`]. A source of another version that still syncs
//! to the host keeps its copy fresh by using it.

use std::{path::Path, sync::OnceLock, time::Duration};

use sha2::{Digest, Sha256};

use super::{
    ssh::{self, shell_quote, Destination},
    TransportError,
};

/// What `ferry --version` prints.
pub fn version_line() -> String {
    format!("ferry {}", env!("CARGO_PKG_VERSION"))
}

/// The launcher's line before the agent's stream starts.
pub const RUNNING: &str = "ferry-launcher: agent starting";
/// The launcher's line when the target has no ferry of this build.
pub const MISSING: &str = "ferry-launcher: no agent";
/// The upload's line before the copy is read back.
const COPY_FOLLOWS: &[u8] = b"ferry-push: copy follows\n";

/// Most output a login may print before the launcher's line or the
/// read-back copy: a message of the day, or an `echo` in a shell's rc
/// file, which would otherwise break the session.
pub const MAX_NOISE: usize = 16 << 10;

/// This binary and its SHA-256, read once per process.
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

/// Pushed copies unused for this long are removed at the next push.
pub const PRUNE_AFTER_DAYS: u32 = 30;

/// The directory (under the login's home) a pushed copy lives in.
fn cache_dir(hash: &str) -> String {
    format!("\"$HOME\"/.cache/ferry/agent-{}", &hash[..16])
}

/// The command that starts the agent for `root`. With `promote`, a
/// `ferry.part` that was just checked becomes the cached copy first.
/// With `keep`, the agent is asked to stay as that kept agent (its name and
/// idle time) after the session.
pub fn launcher(
    root: &Path,
    promote: bool,
    keep: Option<(&str, Duration)>,
) -> Result<String, TransportError> {
    let (_, hash) = own_binary().map_err(|reason| TransportError::Push {
        host: "this host".into(),
        reason,
    })?;
    let mut script = launcher_script(hash, root, promote);
    if let Some((name, idle)) = keep {
        script.push_str(&format!(
            " --keep {} --idle {}",
            shell_quote(name),
            idle.as_secs().max(1)
        ));
    }
    Ok(format!("exec /bin/sh -c {}", shell_quote(&script)))
}

/// The launcher's script, its last command the agent's (more arguments may
/// follow).
fn launcher_script(hash: &str, root: &Path, promote: bool) -> String {
    let dir = cache_dir(hash);
    let promote = if promote {
        "[ -f \"$d/ferry.part\" ] && mv -f \"$d/ferry.part\" \"$d/ferry\"; "
    } else {
        ""
    };
    // Whatever the login shell is (bash, zsh, fish, csh), `exec /bin/sh -c`
    // (see `launcher`) is one simple command it runs the same way.
    format!(
        "d={dir}; {promote}\
         if [ -x \"$d/ferry\" ]; then f=\"$d/ferry\"; true 2>/dev/null > \"$d/used\"; \
         elif [ \"$(ferry --version 2>/dev/null)\" = {version} ]; then f=ferry; \
         else echo {missing}; exit 0; fi; \
         echo {running}; exec \"$f\" agent --root {root}",
        version = shell_quote(&version_line()),
        missing = shell_quote(MISSING),
        running = shell_quote(RUNNING),
        root = shell_quote(&root.to_string_lossy()),
    )
}

/// Shell that removes the pushed copies other than `$d` that were not used
/// for [`PRUNE_AFTER_DAYS`] (by their `used` stamp, else their directory).
fn prune_script() -> String {
    format!(
        "for o in \"$HOME\"/.cache/ferry/agent-*; do \
         [ -d \"$o\" ] && [ ! -L \"$o\" ] && [ \"$o\" != \"$d\" ] || continue; \
         if [ -e \"$o/used\" ]; then s=\"$o/used\"; else s=\"$o\"; fi; \
         [ -n \"$(find \"$s\" -prune -mtime +{days})\" ] && rm -rf \"$o\"; \
         done; true",
        days = PRUNE_AFTER_DAYS - 1
    )
}

/// Copies this binary to the target as `ferry.part` in the cache directory
/// and checks the copy's SHA-256 from what the target reads back.
pub fn upload(dest: &Destination) -> Result<(), TransportError> {
    let host = dest.display();
    let push_err = |reason: String| TransportError::Push {
        host: host.clone(),
        reason,
    };
    let (bytes, hash) = own_binary().map_err(push_err)?;
    let script = format!(
        "umask 077 && d={dir} && mkdir -p \"$d\" && cat > \"$d/ferry.part\" && \
         chmod 700 \"$d/ferry.part\" && {{ {prune}; }} >/dev/null 2>&1 && \
         printf %s {follows} && cat \"$d/ferry.part\"",
        dir = cache_dir(hash),
        prune = prune_script(),
        follows = shell_quote(&String::from_utf8_lossy(COPY_FOLLOWS)),
    );
    let mut back = Sha256::new();
    let mut len = 0u64;
    let mut copy = AfterMark::default();
    ssh::run(
        dest,
        &format!("exec /bin/sh -c {}", shell_quote(&script)),
        bytes,
        &mut |piece| {
            copy.feed(piece, &mut |piece| {
                back.update(piece);
                len += piece.len() as u64;
            });
        },
    )?;
    if !copy.found {
        return Err(push_err(format!(
            "the target did not read the copy back; it printed {:?}",
            String::from_utf8_lossy(&copy.before).trim()
        )));
    }
    let got = hex(&back.finalize());
    if len != bytes.len() as u64 || got != *hash {
        return Err(push_err(format!(
            "the copy reads back as {len} bytes with SHA-256 {got}, expected {} bytes with \
             {hash}: transfer corrupted",
            bytes.len()
        )));
    }
    tracing::info!(
        "pushed ferry to {host} (~/.cache/ferry/agent-{})",
        &hash[..16]
    );
    Ok(())
}

/// Passes on what follows [`COPY_FOLLOWS`]; what the login printed before
/// it (a message of the day, an `echo` in a shell's rc file) is dropped.
#[derive(Default)]
struct AfterMark {
    /// Output before the mark, up to [`MAX_NOISE`] bytes.
    before: Vec<u8>,
    found: bool,
}

impl AfterMark {
    fn feed(&mut self, piece: &[u8], out: &mut dyn FnMut(&[u8])) {
        if self.found {
            out(piece);
            return;
        }
        let from = self.before.len().saturating_sub(COPY_FOLLOWS.len() - 1);
        self.before.extend_from_slice(piece);
        let at = self.before[from..]
            .windows(COPY_FOLLOWS.len())
            .position(|w| w == COPY_FOLLOWS)
            .map(|i| from + i);
        if let Some(at) = at {
            self.found = true;
            let rest = self.before.split_off(at + COPY_FOLLOWS.len());
            self.before.truncate(at);
            out(&rest);
        } else if self.before.len() > MAX_NOISE {
            let cut = self.before.len() - MAX_NOISE;
            self.before.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs the launcher with a fake home and PATH; returns its stdout.
    fn launch(home: &Path, path: &str, promote: bool) -> String {
        launch_for(home, path, Path::new("/srv/st"), promote)
    }

    fn launch_for(home: &Path, path: &str, root: &Path, promote: bool) -> String {
        let script = launcher_script(&"ab".repeat(32), root, promote);
        let out = Command::new("/bin/sh")
            .args(["-c", &script])
            .env("HOME", home)
            .env("PATH", path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Feeds `stream` to an `AfterMark` in pieces of `step` bytes.
    fn after_mark(stream: &[u8], step: usize) -> (AfterMark, Vec<u8>) {
        let mut mark = AfterMark::default();
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            mark.feed(piece, &mut |p| out.extend_from_slice(p));
        }
        (mark, out)
    }

    #[test]
    fn the_read_back_copy_starts_after_the_mark_wherever_pieces_break() {
        let copy: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = b"Welcome to the standby host\nferry-push".to_vec();
        stream.extend_from_slice(COPY_FOLLOWS);
        stream.extend_from_slice(&copy);
        for step in [1, 2, 7, COPY_FOLLOWS.len(), 4096, stream.len()] {
            let (mark, out) = after_mark(&stream, step);
            assert!(mark.found, "step {step}");
            assert_eq!(out, copy, "step {step}");
            assert_eq!(
                mark.before, b"Welcome to the standby host\nferry-push",
                "step {step}"
            );
        }
        // The mark inside the copy is the copy's.
        let mut twice = COPY_FOLLOWS.to_vec();
        twice.extend_from_slice(COPY_FOLLOWS);
        assert_eq!(after_mark(&twice, 3).1, COPY_FOLLOWS);
    }

    #[test]
    fn without_the_mark_nothing_passes_and_the_noise_kept_is_bounded() {
        let noise = b"This account is currently not available.\n".repeat(1000);
        let (mark, out) = after_mark(&noise, 333);
        assert!(!mark.found);
        assert!(out.is_empty());
        assert!(
            mark.before.len() <= MAX_NOISE + 333,
            "{}",
            mark.before.len()
        );
        assert!(mark.before.ends_with(b"not available.\n"));
    }

    #[test]
    fn launcher_prefers_the_checked_copy_then_this_version_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = crate::testutil::TempDir::new("launcher");
        let fake = |path: &Path, says: &str| {
            std::fs::write(path, format!("#!/bin/sh\necho \"{says} $*\"\n")).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let bin = tmp.path("bin");
        std::fs::create_dir(&bin).unwrap();
        let sys_path = format!("{}:/usr/bin:/bin", bin.display());

        // Nothing there: it says so and runs nothing.
        assert_eq!(launch(&tmp.0, &sys_path, false), format!("{MISSING}\n"));

        // Another version on PATH is not good enough.
        fake(&bin.join("ferry"), "ferry 0.0.0-other");
        assert_eq!(launch(&tmp.0, &sys_path, false), format!("{MISSING}\n"));

        // This version on PATH is.
        std::fs::write(
            bin.join("ferry"),
            format!(
                "#!/bin/sh\n[ \"$1\" = --version ] && echo '{}' && exit\necho \"path $*\"\n",
                version_line()
            ),
        )
        .unwrap();
        let out = launch(&tmp.0, &sys_path, false);
        assert_eq!(out, format!("{RUNNING}\npath agent --root /srv/st\n"));

        // A pushed part is used only when promoted (after its check), and
        // then before the one on PATH.
        let cache = tmp.path(".cache/ferry/agent-abababababababab");
        std::fs::create_dir_all(&cache).unwrap();
        fake(&cache.join("ferry.part"), "cached");
        let out = launch(&tmp.0, &sys_path, false);
        assert_eq!(out, format!("{RUNNING}\npath agent --root /srv/st\n"));
        let out = launch(&tmp.0, &sys_path, true);
        assert_eq!(out, format!("{RUNNING}\ncached agent --root /srv/st\n"));
        assert!(!cache.join("ferry.part").exists());
        // And from then on without promotion; each run stamps it as used.
        std::fs::remove_file(cache.join("used")).unwrap();
        let out = launch(&tmp.0, &sys_path, false);
        assert_eq!(out, format!("{RUNNING}\ncached agent --root /srv/st\n"));
        assert!(cache.join("used").is_file());
        // A copy that cannot be stamped still runs.
        std::fs::remove_file(cache.join("used")).unwrap();
        std::fs::create_dir(cache.join("used")).unwrap();
        let out = launch(&tmp.0, &sys_path, false);
        assert_eq!(out, format!("{RUNNING}\ncached agent --root /srv/st\n"));
    }

    #[test]
    fn a_push_removes_other_copies_unused_for_a_month() {
        let tmp = crate::testutil::TempDir::new("prune");
        let cache = tmp.path(".cache/ferry");
        let make = |name: &str, stamp: Option<&str>, dir_age: &str| {
            let d = cache.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("ferry"), "x").unwrap();
            if let Some(age) = stamp {
                std::fs::write(d.join("used"), "").unwrap();
                touch(&d.join("used"), age);
            }
            touch(&d, dir_age);
            d
        };
        let ours = make("agent-0000000000000000", None, "90 days ago");
        let stale = make("agent-1111111111111111", Some("40 days ago"), "90 days ago");
        let in_use = make("agent-2222222222222222", Some("2 days ago"), "90 days ago");
        let unstamped_old = make("agent-3333333333333333", None, "40 days ago");
        let unstamped_new = make("agent-4444444444444444", None, "1 day ago");
        let elsewhere = tmp.path("keep");
        std::fs::create_dir(&elsewhere).unwrap();
        touch(&elsewhere, "90 days ago");
        let link = cache.join("agent-5555555555555555");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let script = format!(
            "d=\"$HOME\"/.cache/ferry/agent-0000000000000000; {}",
            prune_script()
        );
        let out = Command::new("/bin/sh")
            .args(["-c", &script])
            .env("HOME", &tmp.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for (dir, kept) in [
            (&ours, true),
            (&stale, false),
            (&in_use, true),
            (&unstamped_old, false),
            (&unstamped_new, true),
            (&elsewhere, true),
            (&link, true),
        ] {
            assert_eq!(dir.exists(), kept, "{}", dir.display());
        }
    }

    fn touch(path: &Path, when: &str) {
        let st = Command::new("touch")
            .args(["-h", "-d", when])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
    }

    #[test]
    fn launcher_passes_the_root_as_one_word_never_as_shell() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = crate::testutil::TempDir::new("launcher-quote");
        let cache = tmp.path(".cache/ferry/agent-abababababababab");
        std::fs::create_dir_all(&cache).unwrap();
        // The stand-in agent prints each argument on its own line.
        let agent = cache.join("ferry");
        std::fs::write(&agent, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let marker = tmp.path("ran");
        let root = format!("/srv/it's here $(touch {})", marker.display());
        let out = launch_for(&tmp.0, "/usr/bin:/bin", Path::new(&root), false);
        assert_eq!(out, format!("{RUNNING}\nagent\n--root\n{root}\n"));
        assert!(!marker.exists(), "the root was run as shell");
    }
}
