//! Hyper-V standby images: a dynamic VHDX base with an AVHDX differencing
//! chain for boot points ([MS-VHDX]).
//!
//! # Files
//!
//! ```text
//! web.vhdx              base, dynamic (2 MiB blocks, 512/4096-byte sectors)
//! web-000001.avhdx      differencing, parent web.vhdx
//! web-000002.avhdx      differencing, parent web-000001.avhdx   <- top
//! web.vhdx.chain.json   which file is the top, which holds each boot point
//! web.hyperv.ps1        defines the Hyper-V VM (see [`hyperv`]); written once
//! ```
//!
//! Writes go to the top only; reads resolve through the chain (payload BAT
//! state, then the sector bitmap of partially present blocks, then the
//! parent). Hyper-V boots from the top. Blocks are 2 MiB, Hyper-V's own
//! size for differencing disks: small enough that a scattered 4 KiB write
//! costs little in a test image (fresh blocks are sparse), big enough to keep
//! the BAT small (4 MiB per TiB).
//!
//! # Writes and crashes
//!
//! The log stays empty; `image` orders metadata writes instead. New blocks
//! are appended and referenced (BAT entry, sector bitmap bits) only by
//! `flush`, after the data is durable: a crash before `flush` loses writes
//! into blocks allocated since the last one and leaves every file valid;
//! writes into sectors already present may land, as on a disk. The first
//! change in a session rewrites both headers (new FileWriteGuid, and a new
//! DataWriteGuid before the first change of content).
//!
//! # Boot points
//!
//! Taking boot point `V` freezes the top (it is never written again, so its
//! DataWriteGuid, which the new child records as `parent_linkage`, stays
//! valid) and makes a new empty child the top. `V` names the frozen file.
//! Reverting to `V` discards the top and makes a new empty child of `V`'s
//! file the top; the files form a tree from then on, as Hyper-V checkpoints
//! do.
//!
//! Deleting a boot point removes its name only; then unnamed frozen files
//! are tidied: one without children is removed, one with a single child
//! absorbs that child (*pull-up*: the child's sectors are copied into the
//! parent, which takes the child's place and names), one with several
//! children stays as a shared ancestor. Merging the two oldest boot points
//! is deleting the oldest: its file then has the next boot point's file as
//! only child, pulls it up and carries the newer name and content. Copying
//! the child into the parent costs the child's size (a boot point's delta),
//! never the base's.
//!
//! # Crash safety of a pull-up of child C into parent X
//!
//! X is unnamed and C is its only child, so nothing but C reads X. Each
//! step leaves every file valid and every boot point and the top with their
//! content:
//!
//! 1. Copy C's present sectors into X, flush X. C reads the same: where it
//!    has sectors it shadows X, elsewhere X is unchanged.
//! 2. Rewrite C's parent locator to accept either X's current DataWriteGuid
//!    (`parent_linkage`) or C's own (`parent_linkage2`).
//! 3. Give X C's DataWriteGuid (a header update). X now reads exactly as C
//!    does; C still opens, via `parent_linkage2`.
//! 4. Point each child of C at X (`relative_path`); they link by C's
//!    DataWriteGuid, which X now carries, so both parents are valid.
//! 5. Rename in the sidecar: C's boot point names and the top move to X; C
//!    is listed for deletion.
//! 6. Remove C; drop it from the deletion list.
//!
//! Opening finishes what a crash interrupted: pending deletions are done,
//! and the tidying runs again (if X already carries C's DataWriteGuid, the
//! copy is known complete and steps 1–3 are skipped).
//!
//! The parent locator switch (steps 2 and 4) writes the new locator into
//! free space of the metadata region, then rewrites its 32-byte metadata
//! table entry, which sits in one 512-byte sector: this relies on sector
//! writes being atomic, as the two-header scheme does.
//!
//! # Limits
//!
//! No log replay (a file with a non-empty log is refused), no fixed VHDX
//! writes beyond what the dynamic path does, parents only in the same
//! directory, ZERO/UNDEFINED/UNMAPPED blocks read as zeroes.
//!
//! [MS-VHDX]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx/

mod chain;
pub mod format;
pub mod hyperv;
mod image;
pub mod reader;
#[cfg(test)]
mod tests;

use std::{collections::HashSet, io};

use self::{
    chain::{BootPoint, ChainState},
    format::{Guid, ParentLocator, MIB},
    image::{corrupt, unsupported, Extent, Image, NewImage},
};
use super::{BootFile, Dir, Format, ImageError, Standby};

/// Payload block size of the files this module creates.
pub const BLOCK_SIZE: u64 = 2 * MIB;

/// A VHDX standby image and its boot points.
pub struct Vhdx {
    dir: Dir,
    /// The base file's name, e.g. `web.vhdx`.
    name: String,
    /// `web`, for `web-NNNNNN.avhdx`.
    stem: String,
    /// `web.vhdx.chain.json`.
    json: String,
    state: ChainState,
    size: u64,
    /// The top (open for writing) and its ancestors down to the base.
    /// Empty only between a structural change and the reload after it.
    chain: Vec<Image>,
}

/// What the tidying found to do next.
enum Tidy {
    Remove(String),
    PullUp {
        child: String,
        into: String,
        grandchildren: Vec<String>,
    },
}

/// One file of the image, as its own headers and locator describe it.
struct Node {
    name: String,
    parent: Option<String>,
}

impl Vhdx {
    /// Creates `name` (a dynamic VHDX of `size` bytes) and its sidecar.
    pub fn create(dir: &Dir, name: &str, size: u64) -> Result<Self, ImageError> {
        check_name(name)?;
        if size == 0 || !size.is_multiple_of(512) || size > format::MAX_DISK_SIZE {
            return Err(unsupported(
                name,
                format!("a disk of {size} bytes (a multiple of 512 up to 64 TiB is needed)"),
            ));
        }
        if dir.exists(name) {
            return Err(ImageError::io(name, "create")(io::Error::from(
                io::ErrorKind::AlreadyExists,
            )));
        }
        let dir = dup_dir(dir)?;
        create_file(
            &dir,
            name,
            &NewImage {
                disk_size: size,
                block_size: BLOCK_SIZE,
                logical_sector: 512,
                physical_sector: 4096,
                page83: format::random_guid(),
                parent: None,
            },
        )?;
        let state = ChainState::single(name);
        state.store(&dir, &json_name(name))?;
        Self::start(dir, name, state)
    }

    /// Opens `name` and the chain its sidecar describes (a lone VHDX if
    /// there is none), finishing any merge a crash interrupted.
    pub fn open(dir: &Dir, name: &str) -> Result<Self, ImageError> {
        check_name(name)?;
        let dir = dup_dir(dir)?;
        let state = ChainState::load(&dir, &json_name(name), name)?
            .unwrap_or_else(|| ChainState::single(name));
        Self::start(dir, name, state)
    }

    fn start(dir: Dir, name: &str, state: ChainState) -> Result<Self, ImageError> {
        let stem = match name.rsplit_once('.') {
            Some((s, ext)) if ext.eq_ignore_ascii_case("vhdx") && !s.is_empty() => s,
            _ => name,
        };
        let mut v = Vhdx {
            dir,
            name: name.to_owned(),
            stem: stem.to_owned(),
            json: json_name(name),
            state,
            size: 0,
            chain: Vec::new(),
        };
        v.finish_deletes()?;
        v.tidy()?;
        v.load_chain()?;
        v.write_vm_script()?;
        Ok(v)
    }

    /// Writes the Hyper-V VM definition ([`hyperv`]) unless it is there:
    /// it never needs rewriting, and an admin may have edited it.
    fn write_vm_script(&self) -> Result<(), ImageError> {
        let script = hyperv::script_name(&self.stem);
        if self.dir.exists(&script) {
            return Ok(());
        }
        self.dir
            .write_atomic(
                &script,
                hyperv::script_text(&self.name, &self.json, &self.stem).as_bytes(),
            )
            .map_err(ImageError::io(&script, "write"))
    }

    /// The files of the image, the base first.
    pub fn files(&self) -> &[String] {
        &self.state.files
    }

    /// The working image's file: the one Hyper-V boots from.
    pub fn top_file(&self) -> &str {
        &self.state.top
    }

    /// The file holding boot point `name`, to read it with [`reader`].
    pub fn boot_point_file(&self, name: &str) -> Option<&str> {
        self.state.boot_point_file(name)
    }

    fn open_file(&self, name: &str, writable: bool, load_bat: bool) -> Result<Image, ImageError> {
        let file = if writable {
            self.dir.open_rw(name)
        } else {
            self.dir.open_read(name)
        }
        .map_err(ImageError::io(name, "open"))?;
        Image::open(file, name, writable, load_bat)
    }

    /// Opens the top for writing and its ancestors for reading.
    fn load_chain(&mut self) -> Result<(), ImageError> {
        self.chain.clear();
        let mut chain: Vec<Image> = Vec::new();
        let mut name = self.state.top.clone();
        loop {
            let img = self.open_file(&name, chain.is_empty(), true)?;
            if let Some(child) = chain.last() {
                check_link(child, &img)?;
            }
            let parent = img.parent_name()?;
            chain.push(img);
            let Some(p) = parent else { break };
            if chain.iter().any(|i| i.name() == p) {
                return Err(corrupt(&name, "the parent chain loops"));
            }
            if !self.state.files.contains(&p) {
                return Err(corrupt(
                    &name,
                    format!("its parent {p} is not listed in {}", self.json),
                ));
            }
            name = p;
        }
        if chain.last().map(Image::name) != Some(self.name.as_str()) {
            return Err(corrupt(
                &self.json,
                format!(
                    "the chain of {} does not end at {}",
                    self.state.top, self.name
                ),
            ));
        }
        self.size = chain[0].disk_size();
        self.chain = chain;
        Ok(())
    }

    fn ensure_loaded(&mut self) -> Result<(), ImageError> {
        if self.chain.is_empty() {
            self.load_chain()?;
        }
        Ok(())
    }

    /// Every file's parent, checked against the parent's identity.
    fn nodes(&self) -> Result<Vec<Node>, ImageError> {
        let mut infos = Vec::new();
        for name in &self.state.files {
            let img = self.open_file(name, false, false)?;
            let parent = img.parent_name()?;
            let links = img
                .parent_locator()
                .map(ParentLocator::linkages)
                .unwrap_or_default();
            infos.push((name.clone(), parent, img.data_write_guid(), links));
        }
        let mut nodes = Vec::new();
        for (name, parent, _, links) in &infos {
            if let Some(p) = parent {
                let Some(pinfo) = infos.iter().find(|i| &i.0 == p) else {
                    return Err(corrupt(
                        name,
                        format!("its parent {p} is not listed in {}", self.json),
                    ));
                };
                if !links.contains(&pinfo.2) {
                    return Err(corrupt(
                        name,
                        format!("its parent {p} changed since it was created"),
                    ));
                }
            } else if name != &self.name {
                return Err(corrupt(name, "a file other than the base has no parent"));
            }
            nodes.push(Node {
                name: name.clone(),
                parent: parent.clone(),
            });
        }
        Ok(nodes)
    }

    /// Removes unnamed frozen files nothing needs and pulls single children
    /// into their unnamed parents, until neither applies.
    fn tidy(&mut self) -> Result<(), ImageError> {
        loop {
            let nodes = self.nodes()?;
            let named: HashSet<&str> = self
                .state
                .boot_points
                .iter()
                .map(|b| b.file.as_str())
                .chain(std::iter::once(self.state.top.as_str()))
                .collect();
            let children = |name: &str| -> Vec<&Node> {
                nodes
                    .iter()
                    .filter(|c| c.parent.as_deref() == Some(name))
                    .collect()
            };
            let unnamed = nodes.iter().filter(|n| !named.contains(n.name.as_str()));
            // Removals first: a pull-up into a file about to go is wasted.
            let remove = unnamed
                .clone()
                .find(|n| children(&n.name).is_empty())
                .map(|n| Tidy::Remove(n.name.clone()));
            let todo = remove.or_else(|| {
                unnamed
                    .filter_map(|n| match children(&n.name).as_slice() {
                        [c] => Some(Tidy::PullUp {
                            child: c.name.clone(),
                            into: n.name.clone(),
                            grandchildren: children(&c.name)
                                .iter()
                                .map(|g| g.name.clone())
                                .collect(),
                        }),
                        _ => None,
                    })
                    .next()
            });
            let Some(todo) = todo else { return Ok(()) };
            self.chain.clear();
            match todo {
                Tidy::Remove(name) => self.drop_file(&name)?,
                Tidy::PullUp {
                    child,
                    into,
                    grandchildren,
                } => self.pull_up(&child, &into, &grandchildren)?,
            }
        }
    }

    /// The six steps of the module docs.
    fn pull_up(
        &mut self,
        c_name: &str,
        x_name: &str,
        grandchildren: &[String],
    ) -> Result<(), ImageError> {
        let mut x = self.open_file(x_name, true, true)?;
        let mut c = self.open_file(c_name, true, true)?;
        let g = c.data_write_guid();
        if x.data_write_guid() != g {
            x.begin_session(false)?;
            copy_into(&mut c, &mut x)?;
            x.flush()?;
            c.set_parent_locator(&ParentLocator::new(&x.data_write_guid(), Some(&g), x_name))?;
            x.set_data_write_guid(g)?;
        }
        for k in grandchildren {
            let mut img = self.open_file(k, true, false)?;
            img.set_parent_locator(&ParentLocator::new(&g, None, x_name))?;
        }
        drop((x, c));
        for b in &mut self.state.boot_points {
            if b.file == c_name {
                x_name.clone_into(&mut b.file);
            }
        }
        if self.state.top == c_name {
            x_name.clone_into(&mut self.state.top);
        }
        self.drop_file(c_name)
    }

    /// Drops `name` from the sidecar, then from the directory.
    fn drop_file(&mut self, name: &str) -> Result<(), ImageError> {
        self.state.files.retain(|f| f != name);
        self.state.pending_delete.push(name.to_owned());
        self.state.store(&self.dir, &self.json)?;
        self.finish_deletes()
    }

    fn finish_deletes(&mut self) -> Result<(), ImageError> {
        if self.state.pending_delete.is_empty() {
            return Ok(());
        }
        for name in &self.state.pending_delete {
            remove_if_exists(&self.dir, name)?;
        }
        self.dir
            .sync()
            .map_err(ImageError::io(&self.json, "fsync the directory"))?;
        self.state.pending_delete.clear();
        self.state.store(&self.dir, &self.json)
    }

    /// Creates an empty differencing child of `parent` under the next free
    /// name; the caller records it in the sidecar.
    fn new_child_of(&mut self, parent: &str) -> Result<String, ImageError> {
        let p = self.open_file(parent, false, false)?;
        let child = loop {
            let n = format!("{}-{:06}.avhdx", self.stem, self.state.next_index);
            self.state.next_index += 1;
            if !self.state.files.contains(&n) && n != self.json {
                break n;
            }
        };
        // A file of that name is a leftover of a crash before the sidecar
        // recorded it.
        remove_if_exists(&self.dir, &child)?;
        create_file(
            &self.dir,
            &child,
            &NewImage {
                disk_size: p.disk_size(),
                block_size: BLOCK_SIZE,
                logical_sector: p.geometry().logical_sector as u32,
                physical_sector: p.physical_sector(),
                page83: p.page83(),
                parent: Some(ParentLocator::new(&p.data_write_guid(), None, parent)),
            },
        )?;
        Ok(child)
    }

    /// Writes a piece smaller than a logical sector of a differencing top:
    /// the rest of its sector comes from the chain.
    fn write_partial_sector(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let lss = self.chain[0].geometry().logical_sector;
        let start = offset / lss * lss;
        let mut sector = vec![0u8; lss as usize];
        read_chain(&mut self.chain, start, &mut sector)?;
        let at = (offset - start) as usize;
        sector[at..at + data.len()].copy_from_slice(data);
        self.chain[0].write(start, &sector)
    }
}

impl Standby for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.ensure_loaded()?;
        super::check_range(offset, data.len() as u64, self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        self.chain[0].begin_session(true)?;
        let lss = self.chain[0].geometry().logical_sector;
        if !self.chain[0].has_parent() {
            return self.chain[0].write(offset, data);
        }
        let end = offset + data.len() as u64;
        let mut at = offset;
        if !at.is_multiple_of(lss) {
            let piece_end = at.next_multiple_of(lss).min(end);
            self.write_partial_sector(at, &data[..(piece_end - at) as usize])?;
            at = piece_end;
        }
        let whole_end = (end / lss * lss).max(at);
        if whole_end > at {
            let from = (at - offset) as usize;
            self.chain[0].write(at, &data[from..(whole_end - offset) as usize])?;
            at = whole_end;
        }
        if at < end {
            self.write_partial_sector(at, &data[(at - offset) as usize..])?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.ensure_loaded()?;
        super::check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.chain[0].begin_session(true)?;
        let geo = self.chain[0].geometry();
        let (lss, bs) = (geo.logical_sector, geo.block_size);
        let (mut at, mut end) = (offset, offset + len);
        if geo.has_parent {
            if !at.is_multiple_of(lss) {
                let piece_end = at.next_multiple_of(lss).min(end);
                self.write_partial_sector(at, &vec![0; (piece_end - at) as usize])?;
                at = piece_end;
            }
            if !end.is_multiple_of(lss) && end / lss * lss >= at {
                let start = end / lss * lss;
                self.write_partial_sector(start, &vec![0; (end - start) as usize])?;
                end = start;
            }
        }
        while at < end {
            let piece = (end - at).min(bs - at % bs);
            let below = geo.has_parent && may_have_data(&mut self.chain[1..], at, piece)?;
            self.chain[0].zero(at, piece, below)?;
            at += piece;
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.ensure_loaded()?;
        super::check_range(offset, buf.len() as u64, self.size)?;
        read_chain(&mut self.chain, offset, buf)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        match self.chain.first_mut() {
            Some(top) => top.flush(),
            None => Ok(()),
        }
    }

    fn create_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        self.ensure_loaded()?;
        if self.state.boot_point_file(name).is_some() {
            return Err(ImageError::BootPointExists { name: name.into() });
        }
        let max = Format::Vhdx.max_boot_points();
        if self.state.boot_points.len() >= max {
            return Err(ImageError::TooManyBootPoints {
                format: Format::Vhdx.name(),
                max,
            });
        }
        self.chain[0].flush()?;
        let frozen = self.state.top.clone();
        let child = self.new_child_of(&frozen)?;
        self.state.files.push(child.clone());
        self.state.boot_points.push(BootPoint {
            name: name.to_owned(),
            file: frozen,
        });
        self.state.top = child;
        self.state.store(&self.dir, &self.json)?;
        self.load_chain()
    }

    fn boot_points(&self) -> Vec<String> {
        self.state
            .boot_points
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    fn revert_to(&mut self, name: &str) -> Result<(), ImageError> {
        let file = self
            .state
            .boot_point_file(name)
            .ok_or_else(|| ImageError::NoSuchBootPoint { name: name.into() })?
            .to_owned();
        self.chain.clear();
        let child = self.new_child_of(&file)?;
        let old = std::mem::replace(&mut self.state.top, child.clone());
        self.state.files.push(child);
        self.state.files.retain(|f| f != &old);
        self.state.pending_delete.push(old);
        self.state.store(&self.dir, &self.json)?;
        self.finish_deletes()?;
        self.tidy()?;
        self.load_chain()
    }

    fn delete_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        let i = self
            .state
            .boot_points
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| ImageError::NoSuchBootPoint { name: name.into() })?;
        self.flush()?;
        self.state.boot_points.remove(i);
        self.state.store(&self.dir, &self.json)?;
        self.chain.clear();
        self.tidy()?;
        self.load_chain()
    }

    /// With fewer than two boot points there is nothing to merge: a no-op,
    /// as the other formats do.
    fn merge_oldest(&mut self) -> Result<(), ImageError> {
        match self.state.boot_points.as_slice() {
            [oldest, _, ..] => {
                let oldest = oldest.name.clone();
                self.delete_boot_point(&oldest)
            }
            _ => Ok(()),
        }
    }

    /// The top, or the boot point's frozen file, when that is the base:
    /// qemu reads a lone dynamic VHDX but not a differencing one.
    fn boot_file(&self, point: Option<&str>) -> Result<BootFile, ImageError> {
        let file = match point {
            None => self.top_file(),
            Some(name) => self
                .boot_point_file(name)
                .ok_or_else(|| ImageError::NoSuchBootPoint { name: name.into() })?,
        };
        if file != self.name {
            return Err(unsupported(
                file,
                "qemu cannot read AVHDX differencing disks; boot it on Hyper-V \
                 (qemu boots the base alone, and a boot point the base holds)",
            ));
        }
        Ok(BootFile::new(file, "vhdx"))
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        // Best effort: callers that care call flush and see its error.
        let _ = Standby::flush(self);
    }
}

/// Reads virtual bytes through `chain` (a file, then its ancestors); past
/// the last file everything is zero.
fn read_chain(chain: &mut [Image], offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
    let Some((img, rest)) = chain.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let (len, ext) = img.extent_at(at, (buf.len() - pos) as u64)?;
        let piece = &mut buf[pos..pos + len as usize];
        match ext {
            Extent::Data(_) => img.read_own(at, piece)?,
            Extent::Parent => read_chain(rest, at, piece)?,
            Extent::Zero => piece.fill(0),
        }
        pos += len as usize;
    }
    Ok(())
}

/// Whether any file of `chain` may hold data in `[offset, offset + len)`.
fn may_have_data(chain: &mut [Image], offset: u64, len: u64) -> Result<bool, ImageError> {
    let Some((img, rest)) = chain.split_first_mut() else {
        return Ok(false);
    };
    let mut at = offset;
    while at < offset + len {
        let (n, ext) = img.extent_at(at, offset + len - at)?;
        match ext {
            Extent::Data(_) => return Ok(true),
            Extent::Parent => {
                if may_have_data(rest, at, n)? {
                    return Ok(true);
                }
            }
            Extent::Zero => {}
        }
        at += n;
    }
    Ok(false)
}

/// Copies every sector `c` defines (data and explicit zeroes) into `x`.
fn copy_into(c: &mut Image, x: &mut Image) -> Result<(), ImageError> {
    let mut buf = Vec::new();
    let xbs = x.geometry().block_size;
    for block in 0..c.geometry().payload_blocks() {
        for (off, len, is_data) in c.block_runs(block)? {
            if is_data {
                buf.resize(len as usize, 0);
                c.read_own(off, &mut buf)?;
                x.write(off, &buf)?;
            } else {
                let mut at = off;
                while at < off + len {
                    let piece = (off + len - at).min(xbs - at % xbs);
                    x.zero(at, piece, true)?;
                    at += piece;
                }
            }
        }
    }
    Ok(())
}

/// A child must link to its parent's current identity and describe the
/// same disk.
fn check_link(child: &Image, parent: &Image) -> Result<(), ImageError> {
    let links: Vec<Guid> = child
        .parent_locator()
        .map(ParentLocator::linkages)
        .unwrap_or_default();
    if !links.contains(&parent.data_write_guid()) {
        return Err(corrupt(
            child.name(),
            format!("its parent {} changed since it was created", parent.name()),
        ));
    }
    let (c, p) = (child.geometry(), parent.geometry());
    if c.disk_size != p.disk_size || c.logical_sector != p.logical_sector {
        return Err(corrupt(
            child.name(),
            format!(
                "its disk geometry differs from its parent {}",
                parent.name()
            ),
        ));
    }
    Ok(())
}

/// Writes a new file under a temporary name and renames it into place, so
/// `name` is either absent or complete.
fn create_file(dir: &Dir, name: &str, params: &NewImage) -> Result<Image, ImageError> {
    let tmp = format!("{name}.tmp");
    remove_if_exists(dir, &tmp)?;
    let file = dir.create(&tmp).map_err(ImageError::io(&tmp, "create"))?;
    let img = Image::create(file, name, params)?;
    dir.rename(&tmp, name)
        .map_err(ImageError::io(name, "rename into place"))?;
    dir.sync()
        .map_err(ImageError::io(name, "fsync the directory"))?;
    Ok(img)
}

fn remove_if_exists(dir: &Dir, name: &str) -> Result<(), ImageError> {
    match dir.remove(name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io(name, "remove")(e)),
    }
}

/// A second handle on the image's directory, resolved beneath the first.
fn dup_dir(dir: &Dir) -> Result<Dir, ImageError> {
    let f = dir
        .open_read(".")
        .map_err(ImageError::io(".", "open the image directory"))?;
    Ok(Dir::new(f.into()))
}

fn json_name(name: &str) -> String {
    format!("{name}.chain.json")
}

fn check_name(name: &str) -> Result<(), ImageError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ImageError::io(name, "use as an image name")(
            io::Error::new(io::ErrorKind::InvalidInput, "not a single file name"),
        ));
    }
    Ok(())
}
