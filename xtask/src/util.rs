//! Running commands: each is printed (`$ cmd`) before it runs, a failure
//! becomes one error line naming the command, and an interrupt stops the child
//! so that the callers' clean-up guards can run.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys;

/// Prints a line to stdout, ignoring write errors: a closed pipe (`| head`)
/// must not abort a run half-way and skip its clean-up.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::util::write_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

pub fn write_line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
}

/// Prints a narration line (`==> ...`).
pub fn step(what: &str) {
    say!("==> {what}");
}

/// Prints a warning to stderr; used where an error must not stop clean-up.
pub fn warn(what: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "warning: {what}");
}

/// The workspace root (the directory holding the top `Cargo.toml`).
/// `cargo run` says where xtask's manifest is; the path compiled in is
/// only a fallback, as a build shared between two checkouts (one target
/// directory) would otherwise work on the checkout it was built from.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), Path::to_path_buf)
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The cargo that runs us (`CARGO` is set by `cargo run`), so nested builds
/// use the same toolchain.
pub fn cargo() -> Cmd {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::new(program)
        .shown_as("cargo")
        .current_dir(workspace_root())
}

/// Builds `package` in release mode and returns the path of its binary `bin`.
pub fn build_release_binary(package: &str, bin: &str) -> Result<PathBuf> {
    cargo().args(["build", "--release", "-p", package]).run()?;
    let path = target_dir().join("release").join(bin);
    if !path.is_file() {
        bail!(
            "`cargo build --release -p {package}` succeeded but {} does not exist",
            path.display()
        );
    }
    Ok(path)
}

/// A command to print and run.
pub struct Cmd {
    program: OsString,
    shown_as: Option<String>,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    quiet: bool,
    cleanup: bool,
}

/// What a command printed, captured.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            shown_as: None,
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
            quiet: false,
            cleanup: false,
        }
    }

    /// Shows the program under a short name (`ferry` rather than its path).
    pub fn shown_as(mut self, name: &str) -> Self {
        self.shown_as = Some(name.to_owned());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Does not print the command: for read-only probes whose result the
    /// caller reports in its own words.
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// Part of clean-up: runs even after an interrupt, and is not stopped by
    /// one.
    pub fn cleanup(mut self) -> Self {
        self.cleanup = true;
        self
    }

    /// Runs with inherited stdio; a non-zero exit is an error.
    pub fn run(&self) -> Result<()> {
        let mut child = self.spawn(Stdio::inherit(), Stdio::inherit())?;
        let status = self.wait(&mut child)?;
        if !status.success() {
            bail!("`{self}` failed: {status}");
        }
        Ok(())
    }

    /// Runs with stdout and stderr captured; a non-zero exit is an error
    /// quoting stderr.
    pub fn output(&self) -> Result<Output> {
        let output = self.output_unchecked()?;
        if !output.status.success() {
            bail!("`{self}` failed: {}", output.failure_detail());
        }
        Ok(output)
    }

    /// Runs with stdout and stderr captured and returns whatever the exit
    /// status; an error only if it could not run.
    pub fn output_unchecked(&self) -> Result<Output> {
        let mut child = self.spawn(Stdio::piped(), Stdio::piped())?;
        // Read both pipes on their own threads so a chatty child cannot
        // block on a full pipe while we wait for it.
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let waited = self.wait(&mut child);
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        Ok(Output {
            status: waited?,
            stdout,
            stderr,
        })
    }

    fn spawn(&self, stdout: Stdio, stderr: Stdio) -> Result<Child> {
        if !self.cleanup && sys::interrupted() {
            bail!("interrupted");
        }
        if !self.quiet {
            say!("$ {self}");
        }
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command.spawn().with_context(|| {
            format!(
                "could not start `{}`",
                self.shown_as
                    .clone()
                    .unwrap_or_else(|| self.program.to_string_lossy().into_owned())
            )
        })
    }

    /// Waits for the child, polling so that an interrupt can stop it (a
    /// blocking `wait` would simply be restarted after the signal).
    fn wait(&self, child: &mut Child) -> Result<ExitStatus> {
        let mut pause = Duration::from_millis(1);
        let mut terminated_at: Option<Instant> = None;
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for `{self}` failed"))?
            {
                // A terminal's ctrl-c reaches the child too, which may exit
                // before we look at the flag: still report the interrupt.
                if terminated_at.is_some() || (!self.cleanup && sys::interrupted()) {
                    bail!("interrupted while running `{self}`");
                }
                return Ok(status);
            }
            if !self.cleanup && sys::interrupted() {
                match terminated_at {
                    None => {
                        sys::terminate(child.id());
                        terminated_at = Some(Instant::now());
                    }
                    Some(at) if at.elapsed() > Duration::from_secs(5) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!("interrupted while running `{self}` (killed it)");
                    }
                    Some(_) => {}
                }
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(30));
        }
    }
}

impl Output {
    /// The exit status and the last lines of stderr, on one line.
    pub fn failure_detail(&self) -> String {
        let stderr = one_line(&self.stderr);
        if stderr.is_empty() {
            self.status.to_string()
        } else {
            format!("{}: {stderr}", self.status)
        }
    }
}

/// The non-empty lines of `text`, trimmed and joined with ` / `; long output
/// keeps only its tail, where tools put the reason they failed.
pub fn one_line(text: &str) -> String {
    const KEEP: usize = 4;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(KEEP)..].join(" / ")
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.envs {
            write!(
                f,
                "{}={} ",
                key.to_string_lossy(),
                shell_quote(&value.to_string_lossy())
            )?;
        }
        match &self.shown_as {
            Some(name) => f.write_str(name)?,
            None => f.write_str(&shell_quote(&self.program.to_string_lossy()))?,
        }
        for arg in &self.args {
            write!(f, " {}", shell_quote(&arg.to_string_lossy()))?;
        }
        Ok(())
    }
}

/// Quotes `word` for a POSIX shell when it needs it, so printed commands can
/// be pasted.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("--bs=4k"), "--bs=4k");
        assert_eq!(shell_quote("/dev/loop3"), "/dev/loop3");
        assert_eq!(shell_quote("${Status}"), "'${Status}'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn displays_env_program_and_args() {
        let cmd = Cmd::new("/usr/bin/apt-get")
            .shown_as("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "fio"]);
        assert_eq!(
            cmd.to_string(),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y fio"
        );
    }

    #[test]
    fn one_line_keeps_the_tail() {
        assert_eq!(one_line("a\n\n b \nc\nd\ne\n"), "b / c / d / e");
        assert_eq!(one_line("\n"), "");
    }

    #[test]
    fn failure_names_the_command_and_quotes_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .quiet()
            .output()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("`sh -c 'echo oops >&2; exit 3'` failed: "),
            "{err}"
        );
        assert!(err.ends_with("oops"), "{err}");
    }

    #[test]
    fn captures_large_output_without_blocking() {
        let output = Cmd::new("sh")
            .args(["-c", "head -c 300000 /dev/zero | tr '\\0' x"])
            .quiet()
            .output();
        assert_eq!(output.map(|o| o.stdout.len()).ok(), Some(300_000));
    }
}
