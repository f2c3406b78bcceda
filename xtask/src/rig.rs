//! A scratch loop device over a backing file, and a ferry that keeps its
//! state and BPF pins in private directories so a bench or demo never touches
//! a real installation. Everything it set up is torn down in `Drop`, on error
//! and after an interrupt too.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::{self, say, Cmd};

pub struct Rig {
    ferry: PathBuf,
    state_dir: PathBuf,
    bpf_dir: PathBuf,
    /// Files and directories we created, removed in reverse order.
    created: Vec<PathBuf>,
    device: Option<String>,
    tracked: bool,
}

impl Rig {
    /// Prepares a rig that works in `work_dir` (created here, must not exist
    /// yet; ferry's state goes in `work_dir/state`) and lets ferry pin its BPF
    /// objects in `bpf_dir` (ferry creates it; must not exist yet either).
    pub fn new(ferry: PathBuf, work_dir: &Path, bpf_dir: PathBuf) -> Result<Self> {
        if bpf_dir.exists() {
            bail!(
                "{} already exists; it is not ours to reuse or remove",
                bpf_dir.display()
            );
        }
        let state_dir = work_dir.join("state");
        let mut rig = Self {
            ferry,
            state_dir: state_dir.clone(),
            bpf_dir: bpf_dir.clone(),
            created: Vec::new(),
            device: None,
            tracked: false,
        };
        // Registered first, so removed last.
        rig.created.push(bpf_dir);
        rig.create_dir(work_dir)?;
        fs::create_dir(&state_dir)
            .with_context(|| format!("creating {} failed", state_dir.display()))?;
        Ok(rig)
    }

    /// Creates a directory that is removed (with its contents) on drop.
    fn create_dir(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir(dir).with_context(|| format!("creating {} failed", dir.display()))?;
        self.created.push(dir.to_path_buf());
        Ok(())
    }

    /// Creates a sparse file of `bytes` that is removed on drop.
    pub fn create_file(&mut self, path: &Path, bytes: u64) -> Result<()> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {} failed", path.display()))?;
        self.created.push(path.to_path_buf());
        file.set_len(bytes)
            .with_context(|| format!("sizing {} to {bytes} bytes failed", path.display()))
    }

    /// Attaches a free loop device to `file` (`losetup -f`: never a fixed
    /// number, other work may hold some). With `direct_io`, asks for direct
    /// I/O on the backing file and falls back to buffered if refused.
    pub fn attach_loop(&mut self, file: &Path, direct_io: bool) -> Result<String> {
        let losetup = || Cmd::new("losetup").args(["-f", "--show"]);
        let attached = if direct_io {
            match losetup().arg("--direct-io=on").arg(file).output() {
                Ok(output) => output,
                Err(err) => {
                    util::warn(format_args!("{err:#}; retrying without --direct-io"));
                    losetup().arg(file).output()?
                }
            }
        } else {
            losetup().arg(file).output()?
        };
        let device = attached.stdout.trim().to_owned();
        if !device.starts_with("/dev/loop") {
            bail!("losetup -f printed {device:?}, not a loop device");
        }
        self.device = Some(device.clone());
        Ok(device)
    }

    /// ferry's private state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// ferry with this rig's private state and BPF pin dirs.
    pub fn ferry(&self) -> Cmd {
        Cmd::new(&self.ferry)
            .shown_as("ferry")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
    }

    /// `ferry track add DEVICE EXTRA...`
    pub fn track_add(&mut self, extra: &[&str]) -> Result<()> {
        let add = self
            .ferry()
            .args(["track", "add", self.device()?])
            .args(extra);
        // Set first: a failed add may still have attached something, and
        // clean-up would rather try a remove that fails.
        self.tracked = true;
        add.run()
    }

    /// `ferry track remove DEVICE`
    pub fn track_remove(&mut self) -> Result<()> {
        self.ferry()
            .args(["track", "remove", self.device()?])
            .run()?;
        self.tracked = false;
        Ok(())
    }

    pub fn device(&self) -> Result<&str> {
        self.device
            .as_deref()
            .context("no loop device attached yet")
    }

    fn teardown(&mut self) {
        if let Some(device) = self.device.take() {
            if self.tracked {
                let removed = self
                    .ferry()
                    .args(["track", "remove", &device])
                    .cleanup()
                    .run();
                if let Err(err) = removed {
                    util::warn(format_args!("clean-up: {err:#}"));
                }
            }
            let detached = Cmd::new("losetup").arg("-d").arg(&device).cleanup().run();
            if let Err(err) = detached {
                util::warn(format_args!("clean-up: {err:#}"));
            }
        }
        while let Some(path) = self.created.pop() {
            remove(&path);
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        util::step("cleaning up");
        self.teardown();
    }
}

/// Removes a file or a directory tree. `remove_dir_all` also works on
/// bpffs, where unlinking a pin releases it.
fn remove(path: &Path) {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
        Err(err) => Err(err),
    };
    match removed {
        Ok(()) => say!("removed {}", path.display()),
        Err(err) => util::warn(format_args!(
            "clean-up: removing {} failed: {err}",
            path.display()
        )),
    }
}
