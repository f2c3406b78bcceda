//! The sidecar `<image>.chain.json`: which files make up the image, which
//! one is the working top (the file Hyper-V boots from), and which file
//! holds each boot point. Written atomically: temp file, fsync, rename,
//! directory fsync.
//!
//! The files' own parent locators are the truth about who is whose parent
//! (that is what Hyper-V follows); the sidecar only names things.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::image::corrupt;
use crate::image::{Dir, ImageError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootPoint {
    pub name: String,
    pub file: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    pub version: u32,
    /// The working image: the only file ever written.
    pub top: String,
    /// Every file of the image, the base first.
    pub files: Vec<String>,
    /// Oldest first.
    pub boot_points: Vec<BootPoint>,
    /// Number of the next `<stem>-NNNNNN.avhdx`.
    pub next_index: u32,
    /// Files dropped from `files` whose removal may not have happened yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_delete: Vec<String>,
}

impl ChainState {
    pub fn single(base: &str) -> Self {
        Self {
            version: 1,
            top: base.to_owned(),
            files: vec![base.to_owned()],
            boot_points: Vec::new(),
            next_index: 1,
            pending_delete: Vec::new(),
        }
    }

    /// `Ok(None)` if there is no sidecar (a lone VHDX, e.g. one qemu-img
    /// made).
    pub fn load(dir: &Dir, json: &str, base: &str) -> Result<Option<Self>, ImageError> {
        let mut text = String::new();
        match dir.open_read(json) {
            Ok(mut f) => f
                .read_to_string(&mut text)
                .map_err(ImageError::io(json, "read"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(json, "open")(e)),
        };
        let state: ChainState =
            serde_json::from_str(&text).map_err(|e| corrupt(json, format!("bad JSON: {e}")))?;
        state.check(base).map_err(|r| corrupt(json, r))?;
        Ok(Some(state))
    }

    fn check(&self, base: &str) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!("version {}", self.version));
        }
        let names = self
            .files
            .iter()
            .chain(self.boot_points.iter().map(|b| &b.file))
            .chain(self.pending_delete.iter())
            .chain(std::iter::once(&self.top));
        for n in names {
            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                return Err(format!("{n:?} is not a file name"));
            }
        }
        if self.files.first().map(String::as_str) != Some(base) {
            return Err(format!("the first file is not {base}"));
        }
        if !self.files.contains(&self.top) {
            return Err("the top is not one of the files".into());
        }
        for (i, b) in self.boot_points.iter().enumerate() {
            if !self.files.contains(&b.file) || b.file == self.top {
                return Err(format!("boot point {} names a wrong file", b.name));
            }
            if self.boot_points[..i].iter().any(|o| o.name == b.name) {
                return Err(format!("boot point {} appears twice", b.name));
            }
        }
        Ok(())
    }

    pub fn store(&self, dir: &Dir, json: &str) -> Result<(), ImageError> {
        let tmp = format!("{json}.tmp");
        match dir.remove(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(&tmp, "remove")(e)),
        }
        let mut f = dir.create(&tmp).map_err(ImageError::io(&tmp, "create"))?;
        let text = serde_json::to_string_pretty(self).expect("plain data serializes");
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(ImageError::io(&tmp, "write"))?;
        dir.rename(&tmp, json)
            .map_err(ImageError::io(json, "rename into place"))?;
        dir.sync()
            .map_err(ImageError::io(json, "fsync the directory"))
    }

    pub fn boot_point_file(&self, name: &str) -> Option<&str> {
        self.boot_points
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.file.as_str())
    }
}
