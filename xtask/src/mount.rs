//! A scratch filesystem mounted for the demo or a bench, unmounted in `Drop`
//! (on error and after an interrupt too) so the loop device under it can be
//! detached and the mount point removed.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::util::{self, Cmd};

pub struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `device` on the existing directory `dir`.
    pub fn new(device: &str, dir: &Path) -> Result<Self> {
        Cmd::new("mount")
            .args(["-o", "noatime", device])
            .arg(dir)
            .run()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts now, which also writes back everything the filesystem held
    /// in memory: afterwards the device is quiet and consistent.
    pub fn unmount(&mut self) -> Result<()> {
        Cmd::new("umount").arg(&self.dir).run()?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let unmounted = Cmd::new("umount").arg(&self.dir).cleanup().run();
        if let Err(err) = unmounted {
            // Something still holds it: detach it lazily, so that removing
            // the mount point cannot descend into the filesystem and the
            // loop device is released once the last user lets go.
            util::warn(format_args!("clean-up: {err:#}; detaching it lazily"));
            let lazy = Cmd::new("umount").arg("-l").arg(&self.dir).cleanup().run();
            if let Err(err) = lazy {
                util::warn(format_args!("clean-up: {err:#}"));
            }
        }
    }
}
