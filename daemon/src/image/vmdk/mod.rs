//! VMDK standbys for ESXi: a monolithicFlat base and a chain of hosted sparse
//! deltas, one frozen delta per boot point (Virtual Disk Format 5.0).
//!
//! Files of an image named `web.vmdk`, all in its directory:
//!
//! | file | what |
//! |---|---|
//! | `web-flat.vmdk` | the base's data: a raw, sparse file |
//! | `web-base.vmdk` | the base's descriptor (`monolithicFlat`) |
//! | `web-NNNNNN.vmdk` | a frozen delta (`monolithicSparse`, descriptor inside) |
//! | `web.vmdk` | the working image, the top of the chain: a copy of the base's descriptor while there is no boot point, else the working delta |
//! | `web.vmx` | a minimal VM whose disk is `web.vmdk`; written once, never overwritten |
//! | `web.vmdk.bootpoints.json` | boot point names, oldest first, and each one's frozen file |
//!
//! The working delta is `web.vmdk` itself, not a second descriptor beside
//! a `web-NNNNNN.vmdk`: QEMU refuses `createType="monolithicSparse"` in a
//! separate descriptor, and one descriptor per extent leaves one CID per
//! content. So the VMX never changes.
//!
//! Boot point: the working delta is renamed to the next free `web-NNNNNN.vmdk`
//! (its descriptor's extent line renamed with it) and a new empty delta, made
//! as `web.vmdk.new`, takes the name `web.vmdk`; with no delta yet, the base
//! is frozen instead and the new delta's parent is `web-base.vmdk`.
//!
//! Layers form a tree, not a chain: after a revert two layers share a parent.
//! Retention keeps it small. A frozen layer no boot point names
//! ("anonymous") is removed when no layer depends on it, and committed into
//! when one layer does: the child's grains are written into the anonymous
//! parent, whose content then equals the child's, and the parent takes the
//! child's place (boot point name, children's `parentFileNameHint` and
//! `parentCID`, or the name `web.vmdk`). An anonymous layer with two
//! children stays until one of them goes.
//!
//! Invariants:
//! - A boot point's layer and all its ancestors are never written, except
//!   an anonymous ancestor being committed into, whose only dependent is the
//!   child whose content it takes on. Every chain reads the same content
//!   before, during and after a commit.
//! - Every child's `parentCID` equals its parent's `CID`. A commit keeps the
//!   parent's CID and repoints each child with one descriptor write (hint and
//!   CID together), so no step leaves a mismatch.
//! - Switches are renames or single-sector descriptor writes, in an order
//!   where a crash leaves a readable tree, possibly with an anonymous layer
//!   or an orphaned file. [`Vmdk::open`] finishes a half-done boot point
//!   (`web.vmdk.new` without `web.vmdk`), deletes orphaned deltas and
//!   temporary files, and corrects a self-extent line a crash left behind;
//!   the next retention operation commits leftover anonymous layers.
//! - In-place descriptor rewrites rely on a sector write being atomic, as
//!   VMware's and QEMU's own CID updates do.
//!
//! After an I/O error from a boot point or retention operation the in-memory
//! view may lag the files; drop the image and open it again.
//!
//! Limits: hosted sparse extents address 2 TiB, so images are at most that.
//! ESXi does not power on hosted sparse disks (VMware: re-import them with
//! `vmkfstools -i … -d thin` first); VMware Workstation, Fusion and QEMU run
//! the chain as it is.

mod descriptor;
mod sparse;
mod tree;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Read},
    os::{fd::OwnedFd, unix::fs::FileExt},
};

use descriptor::{CreateType, DescError, Descriptor, ExtentLine};
use serde::{Deserialize, Serialize};
use sparse::{read_full, Sparse, SECTOR};

use super::{BootFile, Dir, Format, ImageError, Standby};

const FORMAT: &str = "vmdk";
/// Longest chain followed before calling it a loop.
const MAX_DEPTH: usize = 256;
/// Largest text descriptor read.
const MAX_DESC_BYTES: u64 = 64 << 10;

pub(super) fn corrupt(file: &str, reason: impl Into<String>) -> ImageError {
    ImageError::corrupt(FORMAT, file, reason)
}

pub(super) fn unsupported(file: &str, what: impl Into<String>) -> ImageError {
    ImageError::unsupported(FORMAT, file, what)
}

fn desc_error(file: &str) -> impl FnOnce(DescError) -> ImageError + '_ {
    move |e| match e {
        DescError::Corrupt(r) => corrupt(file, r),
        DescError::Unsupported(w) => unsupported(file, w),
    }
}

/// The names of an image's files.
struct Names {
    image: String,
    stem: String,
}

impl Names {
    fn new(image: &str) -> Result<Self, ImageError> {
        let stem = image
            .len()
            .checked_sub(5)
            .filter(|&at| image.is_char_boundary(at) && image[at..].eq_ignore_ascii_case(".vmdk"))
            .map(|at| &image[..at]);
        match stem {
            Some(stem)
                if !stem.is_empty()
                    && !stem.starts_with('.')
                    && !stem.contains(['/', '\\', '"', '\0', '\n', '\r']) =>
            {
                Ok(Self {
                    image: image.to_owned(),
                    stem: stem.to_owned(),
                })
            }
            _ => Err(unsupported(image, "image names other than NAME.vmdk")),
        }
    }
    fn flat(&self) -> String {
        format!("{}-flat.vmdk", self.stem)
    }
    fn base(&self) -> String {
        format!("{}-base.vmdk", self.stem)
    }
    fn delta(&self, n: u32) -> String {
        format!("{}-{n:06}.vmdk", self.stem)
    }
    fn delta_number(&self, file: &str) -> Option<u32> {
        let digits = file
            .strip_prefix(self.stem.as_str())?
            .strip_prefix('-')?
            .strip_suffix(".vmdk")?;
        (digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }
    fn new_top(&self) -> String {
        format!("{}.new", self.image)
    }
    fn sidecar(&self) -> String {
        format!("{}.bootpoints.json", self.image)
    }
    fn vmx(&self) -> String {
        format!("{}.vmx", self.stem)
    }
}

#[derive(Serialize, Deserialize, Default)]
struct Sidecar {
    version: u32,
    /// Lowest number a new `NAME-NNNNNN.vmdk` may take.
    next_delta: u32,
    boot_points: Vec<BootPoint>,
}

#[derive(Serialize, Deserialize, Clone)]
struct BootPoint {
    name: String,
    /// The layer holding the boot point's content (with its ancestors).
    file: String,
}

enum Data {
    Flat {
        file: File,
        name: String,
        start: u64,
    },
    Sparse(Box<Sparse>),
}

/// One disk of the tree, keyed by its descriptor's file name.
struct Layer {
    desc: Descriptor,
    parent: Option<String>,
    data: Data,
    writable: bool,
}

/// A VMDK standby image; see the module docs.
pub struct Vmdk {
    dir: Dir,
    names: Names,
    size: u64,
    layers: HashMap<String, Layer>,
    /// The working layer: `names.image`, or `names.base()` while the base is
    /// the top.
    top: String,
    boot_points: Vec<BootPoint>,
    next_delta: u32,
}

fn new_cid() -> u32 {
    loop {
        let b = *uuid::Uuid::new_v4().as_bytes();
        let cid = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        // ffffffff means "no parent"; VMware also avoids fffffffe.
        if cid < 0xffff_fffe {
            return cid;
        }
    }
}

/// A handle of its own on the directory `dir` stands for.
fn dup_dir(dir: &Dir) -> Result<Dir, ImageError> {
    let f = dir
        .open_read(".")
        .map_err(ImageError::io(".", "open directory"))?;
    Ok(Dir::new(OwnedFd::from(f)))
}

fn remove_if_there(dir: &Dir, name: &str) -> Result<(), ImageError> {
    match dir.remove(name) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::io(name, "remove")(e)),
        _ => Ok(()),
    }
}

/// Replaces `name` by `bytes` all at once: temp file, fsync, rename.
fn write_atomic(dir: &Dir, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = format!("{name}.tmp");
    remove_if_there(dir, &tmp)?;
    let f = dir.create(&tmp).map_err(ImageError::io(&tmp, "create"))?;
    f.write_all_at(bytes, 0)
        .map_err(ImageError::io(&tmp, "write"))?;
    f.sync_all().map_err(ImageError::io(&tmp, "fsync"))?;
    dir.rename(&tmp, name)
        .map_err(ImageError::io(name, format!("rename {tmp} to")))?;
    dir.sync().map_err(ImageError::io(".", "fsync directory"))
}

fn vmx_text(names: &Names) -> String {
    let stem = &names.stem;
    let image = &names.image;
    format!(
        ".encoding = \"UTF-8\"\n\
         config.version = \"8\"\n\
         virtualHW.version = \"14\"\n\
         displayName = \"{stem}\"\n\
         guestOS = \"other-64\"\n\
         memsize = \"2048\"\n\
         numvcpus = \"2\"\n\
         scsi0.present = \"TRUE\"\n\
         scsi0.virtualDev = \"lsilogic\"\n\
         scsi0:0.present = \"TRUE\"\n\
         scsi0:0.deviceType = \"scsi-hardDisk\"\n\
         scsi0:0.fileName = \"{image}\"\n"
    )
}

impl Vmdk {
    /// Creates image `name` (`NAME.vmdk`) of `size` bytes in `dir`: an empty
    /// flat base, its descriptors, the VMX and an empty boot point list.
    /// Fails if any of the files exists.
    pub fn create(dir: &Dir, name: &str, size: u64) -> Result<Self, ImageError> {
        let names = Names::new(name)?;
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(unsupported(
                name,
                format!("a size of {size} bytes (not whole sectors)"),
            ));
        }
        if !Sparse::fits(size / SECTOR) {
            return Err(unsupported(
                name,
                "disks larger than hosted sparse extents (2 TiB)",
            ));
        }
        let dir = dup_dir(dir)?;
        for existing in [
            names.image.clone(),
            names.flat(),
            names.base(),
            names.sidecar(),
        ] {
            if dir.exists(&existing) {
                return Err(ImageError::io(&existing, "create")(
                    io::ErrorKind::AlreadyExists.into(),
                ));
            }
        }
        let made_vmx = !dir.exists(&names.vmx());
        match Self::create_files(&dir, &names, size, made_vmx) {
            Ok(()) => Self::load(dir, names),
            Err(e) => {
                // Leave nothing half-made behind; the error says why.
                let mut made = vec![
                    names.flat(),
                    names.base(),
                    names.image.clone(),
                    names.sidecar(),
                ];
                made.extend(made_vmx.then(|| names.vmx()));
                for f in made {
                    let _ = dir.remove(&f);
                }
                Err(e)
            }
        }
    }

    fn create_files(dir: &Dir, names: &Names, size: u64, vmx: bool) -> Result<(), ImageError> {
        let flat_name = names.flat();
        let flat = dir
            .create(&flat_name)
            .map_err(ImageError::io(&flat_name, "create"))?;
        flat.set_len(size)
            .map_err(ImageError::io(&flat_name, "extend"))?;
        flat.sync_all()
            .map_err(ImageError::io(&flat_name, "fsync"))?;
        let desc = Descriptor::new(
            new_cid(),
            CreateType::MonolithicFlat,
            ExtentLine {
                sectors: size / SECTOR,
                file: flat_name,
                flat_offset: Some(0),
            },
            None,
        );
        write_atomic(dir, &names.base(), desc.render().as_bytes())?;
        write_atomic(dir, &names.image, desc.render().as_bytes())?;
        let sidecar = Sidecar {
            version: 1,
            next_delta: 1,
            boot_points: Vec::new(),
        };
        let json = serde_json::to_vec_pretty(&sidecar).expect("serialisable");
        write_atomic(dir, &names.sidecar(), &json)?;
        if vmx {
            write_atomic(dir, &names.vmx(), vmx_text(names).as_bytes())?;
        }
        Ok(())
    }

    /// Opens image `name` in `dir`, checking every layer's header, descriptor
    /// and tables, and cleaning up after a crash (see the module docs).
    pub fn open(dir: &Dir, name: &str) -> Result<Self, ImageError> {
        let names = Names::new(name)?;
        Self::load(dup_dir(dir)?, names)
    }

    fn load(dir: Dir, names: Names) -> Result<Self, ImageError> {
        // A boot point that crashed between its two renames.
        let new_top = names.new_top();
        if dir.exists(&new_top) {
            if dir.exists(&names.image) {
                remove_if_there(&dir, &new_top)?;
            } else {
                dir.rename(&new_top, &names.image)
                    .map_err(ImageError::io(&names.image, format!("rename {new_top} to")))?;
            }
        }
        for f in [
            names.image.clone(),
            names.base(),
            names.sidecar(),
            names.vmx(),
        ] {
            remove_if_there(&dir, &format!("{f}.tmp"))?;
        }
        let sidecar = Self::read_sidecar(&dir, &names)?;
        let mut v = Self {
            dir,
            size: 0,
            layers: HashMap::new(),
            top: String::new(),
            boot_points: Vec::new(),
            next_delta: sidecar.next_delta.max(1),
            names,
        };
        v.top = v.load_chain(&v.names.image.clone())?;
        for bp in &sidecar.boot_points {
            if !v.dir.exists(&bp.file) {
                return Err(corrupt(
                    &v.names.sidecar(),
                    format!("boot point {}: {} is missing", bp.name, bp.file),
                ));
            }
            if v.load_chain(&bp.file)? == v.top {
                return Err(corrupt(
                    &v.names.sidecar(),
                    format!("boot point {} names the working image", bp.name),
                ));
            }
        }
        v.boot_points = sidecar.boot_points;
        v.check_tree()?;
        if let Data::Sparse(s) = &v.layers[&v.top].data {
            if s.version() == 3 {
                return Err(unsupported(
                    &v.top,
                    "writing version 3 (change tracking) extents",
                ));
            }
        }
        let top = v.top.clone();
        v.make_writable(&top)?;
        v.repair()?;
        Ok(v)
    }

    fn read_sidecar(dir: &Dir, names: &Names) -> Result<Sidecar, ImageError> {
        let name = names.sidecar();
        let mut f = match dir.open_read(&name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Sidecar::default()),
            other => other.map_err(ImageError::io(&name, "open"))?,
        };
        let mut text = Vec::new();
        f.read_to_end(&mut text)
            .map_err(ImageError::io(&name, "read"))?;
        let s: Sidecar =
            serde_json::from_slice(&text).map_err(|e| corrupt(&name, e.to_string()))?;
        let mut seen = HashSet::new();
        for bp in &s.boot_points {
            if !seen.insert(&bp.name) {
                return Err(corrupt(&name, format!("boot point {} twice", bp.name)));
            }
            if bp.file.is_empty() || bp.file.contains('/') || bp.file == ".." {
                return Err(corrupt(&name, format!("boot point file {:?}", bp.file)));
            }
        }
        Ok(s)
    }

    /// Loads `file` and its ancestors; returns `file`'s key.
    fn load_chain(&mut self, file: &str) -> Result<String, ImageError> {
        let first = self.load_one(file, None)?;
        let mut key = first.clone();
        for _ in 0..MAX_DEPTH {
            let Some(parent) = self.layers[&key].parent.clone() else {
                return Ok(first);
            };
            let loaded = self.layers.contains_key(&parent);
            if !loaded {
                self.load_one(&parent, Some(&key))?;
            }
            let (cid, pcid) = (
                self.layers[&parent].desc.cid,
                self.layers[&key].desc.parent_cid,
            );
            if cid != pcid {
                return Err(corrupt(
                    &key,
                    format!("parentCID {pcid:08x} is not the CID {cid:08x} of {parent}"),
                ));
            }
            if loaded {
                return Ok(first);
            }
            key = parent;
        }
        Err(corrupt(file, "parent chain too long"))
    }

    /// Loads one layer unless it is loaded; returns its key.
    fn load_one(&mut self, file: &str, child: Option<&str>) -> Result<String, ImageError> {
        if self.layers.contains_key(file) {
            return Ok(file.to_owned());
        }
        let (key, layer) = match (self.load_layer(file), child) {
            (Err(ImageError::Io { source, .. }), Some(child))
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Err(corrupt(child, format!("parent {file} is missing")))
            }
            (other, _) => other?,
        };
        if self.size == 0 {
            self.size = layer.desc.extent.sectors * SECTOR;
        }
        self.layers.entry(key.clone()).or_insert(layer);
        Ok(key)
    }

    /// Reads one layer's descriptor and opens its data, read-only.
    fn load_layer(&self, file: &str) -> Result<(String, Layer), ImageError> {
        let f = self
            .dir
            .open_read(file)
            .map_err(ImageError::io(file, "open"))?;
        let len = f.metadata().map_err(ImageError::io(file, "stat"))?.len();
        let mut magic = [0u8; 4];
        read_full(&f, 0, &mut magic).map_err(ImageError::io(file, "read"))?;
        let (key, desc, data) = if &magic == b"KDMV" || &magic == b"COWD" {
            let sparse = Sparse::open(f, file)?;
            let desc = Descriptor::parse(&sparse.descriptor()?).map_err(desc_error(file))?;
            if desc.create_type != CreateType::MonolithicSparse {
                return Err(corrupt(
                    file,
                    "sparse extent whose descriptor is not monolithicSparse",
                ));
            }
            if desc.extent.sectors != sparse.capacity() {
                return Err(corrupt(file, "descriptor and header disagree on the size"));
            }
            (file.to_owned(), desc, Data::Sparse(Box::new(sparse)))
        } else {
            if len > MAX_DESC_BYTES {
                return Err(corrupt(file, "neither a sparse extent nor a descriptor"));
            }
            let mut raw = vec![0u8; len as usize];
            read_full(&f, 0, &mut raw).map_err(ImageError::io(file, "read"))?;
            let text =
                String::from_utf8(raw).map_err(|_| corrupt(file, "descriptor is not UTF-8"))?;
            let desc = Descriptor::parse(&text).map_err(desc_error(file))?;
            if desc.create_type != CreateType::MonolithicFlat {
                return Err(unsupported(
                    file,
                    "monolithicSparse with a separate descriptor",
                ));
            }
            let extent = &desc.extent.file;
            let data = match self.dir.open_read(extent) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(corrupt(file, format!("flat extent {extent} is missing")))
                }
                Err(e) => return Err(ImageError::io(extent, "open")(e)),
            };
            let key = match file == self.names.image {
                // The working base: its own descriptor is NAME-base.vmdk.
                true => self.names.base(),
                false => file.to_owned(),
            };
            let start = desc.extent.flat_offset.expect("flat") * SECTOR;
            (
                key,
                desc.clone(),
                Data::Flat {
                    file: data,
                    name: extent.clone(),
                    start,
                },
            )
        };
        if let Some(p) = &desc.parent_hint {
            if *p == self.names.image || *p == key {
                return Err(corrupt(
                    file,
                    format!("parent {p} is the working image or itself"),
                ));
            }
        }
        if self.size != 0 && desc.extent.sectors * SECTOR != self.size {
            return Err(corrupt(file, "a different size than the working image"));
        }
        let layer = Layer {
            parent: desc.parent_hint.clone(),
            desc,
            data,
            writable: false,
        };
        Ok((key, layer))
    }

    /// Every chain ends at a root.
    fn check_tree(&self) -> Result<(), ImageError> {
        for key in self.layers.keys() {
            let mut at = key;
            let mut depth = 0;
            while let Some(p) = &self.layers[at].parent {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(corrupt(key, "parent chain loops or is too long"));
                }
                at = p;
            }
        }
        Ok(())
    }

    /// Clean-up after a crash: orphaned deltas, self-extent names, the VMX.
    fn repair(&mut self) -> Result<(), ImageError> {
        for key in self.layers.keys() {
            if let Some(n) = self.names.delta_number(key) {
                self.next_delta = self.next_delta.max(n + 1);
            }
        }
        for n in 1..self.next_delta + 8 {
            let f = self.names.delta(n);
            if !self.layers.contains_key(&f) && self.dir.exists(&f) {
                remove_if_there(&self.dir, &f)?;
            }
        }
        let misnamed: Vec<String> = self
            .layers
            .iter()
            .filter(|(k, l)| matches!(l.data, Data::Sparse(_)) && l.desc.extent.file != **k)
            .map(|(k, _)| k.clone())
            .collect();
        for key in misnamed {
            self.layers.get_mut(&key).expect("loaded").desc.extent.file = key.clone();
            self.write_descriptor(&key)?;
        }
        if !self.dir.exists(&self.names.vmx()) {
            write_atomic(
                &self.dir,
                &self.names.vmx(),
                vmx_text(&self.names).as_bytes(),
            )?;
        }
        self.dir
            .sync()
            .map_err(ImageError::io(".", "fsync directory"))
    }

    fn make_writable(&mut self, key: &str) -> Result<(), ImageError> {
        let layer = self.layers.get_mut(key).expect("loaded");
        if layer.writable {
            return Ok(());
        }
        match &mut layer.data {
            Data::Flat { file, name, .. } => {
                *file = self
                    .dir
                    .open_rw(name)
                    .map_err(ImageError::io(name, "open"))?;
            }
            Data::Sparse(s) => {
                s.set_file(self.dir.open_rw(key).map_err(ImageError::io(key, "open"))?)
            }
        }
        layer.writable = true;
        Ok(())
    }

    /// Rewrites a sparse layer's embedded descriptor from `desc`.
    fn write_descriptor(&mut self, key: &str) -> Result<(), ImageError> {
        self.make_writable(key)?;
        let layer = self.layers.get_mut(key).expect("loaded");
        let text = layer.desc.render();
        match &mut layer.data {
            Data::Sparse(s) => s.set_descriptor(&text),
            Data::Flat { .. } => write_atomic(&self.dir, key, text.as_bytes()),
        }
    }

    fn write_sidecar(&self) -> Result<(), ImageError> {
        let s = Sidecar {
            version: 1,
            next_delta: self.next_delta,
            boot_points: self.boot_points.clone(),
        };
        let json = serde_json::to_vec_pretty(&s).expect("serialisable");
        write_atomic(&self.dir, &self.names.sidecar(), &json)
    }

    /// Makes an empty delta on `parent` as `NAME.vmdk.new`, named for
    /// `NAME.vmdk` in its extent line; the caller renames it.
    fn new_delta(&self, parent: &str, parent_cid: u32) -> Result<Layer, ImageError> {
        let tmp = self.names.new_top();
        remove_if_there(&self.dir, &tmp)?;
        let desc = Descriptor::new(
            new_cid(),
            CreateType::MonolithicSparse,
            ExtentLine {
                sectors: self.size / SECTOR,
                file: self.names.image.clone(),
                flat_offset: None,
            },
            Some((parent_cid, parent.to_owned())),
        );
        let f = self
            .dir
            .create(&tmp)
            .map_err(ImageError::io(&tmp, "create"))?;
        let mut s = Sparse::create(f, &tmp, self.size / SECTOR, &desc.render())?;
        s.set_name(&self.names.image);
        Ok(Layer {
            desc,
            parent: Some(parent.to_owned()),
            data: Data::Sparse(Box::new(s)),
            writable: true,
        })
    }

    fn free_delta_name(&mut self) -> String {
        loop {
            let name = self.names.delta(self.next_delta);
            self.next_delta += 1;
            if !self.dir.exists(&name) && !self.layers.contains_key(&name) {
                return name;
            }
        }
    }
}

impl Standby for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        super::check_range(offset, data.len() as u64, self.size)?;
        let top = self.top.clone();
        self.write_layer(&top, offset, data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_range(offset, len, self.size)?;
        let top = self.top.clone();
        self.zero_layer(&top, offset, len)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        super::check_range(offset, buf.len() as u64, self.size)?;
        let top = self.top.clone();
        self.read_layer(&top, offset, buf)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        let top = self.top.clone();
        self.flush_layer(&top)
    }

    fn create_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        if self.boot_points.iter().any(|b| b.name == name) {
            return Err(ImageError::BootPointExists {
                name: name.to_owned(),
            });
        }
        let max = Format::Vmdk.max_boot_points();
        if self.boot_points.len() >= max {
            return Err(ImageError::TooManyBootPoints {
                format: FORMAT,
                max,
            });
        }
        self.flush()?;
        let image = self.names.image.clone();
        let new_top = self.names.new_top();
        let cid = self.layers[&self.top].desc.cid;
        let frozen = if let Data::Flat { .. } = self.layers[&self.top].data {
            // Freeze the base: its own descriptor names it from now on.
            let base = self.names.base();
            write_atomic(
                &self.dir,
                &base,
                self.layers[&self.top].desc.render().as_bytes(),
            )?;
            let delta = self.new_delta(&base, cid)?;
            self.dir
                .rename(&new_top, &image)
                .map_err(ImageError::io(&image, format!("rename {new_top} to")))?;
            self.layers.insert(image.clone(), delta);
            base
        } else {
            let frozen = self.free_delta_name();
            let delta = self.new_delta(&frozen, cid)?;
            // The extent line names the file itself; it follows the rename.
            self.layers
                .get_mut(&image)
                .expect("top")
                .desc
                .extent
                .file
                .clone_from(&frozen);
            self.write_descriptor(&image)?;
            self.dir
                .rename(&image, &frozen)
                .map_err(ImageError::io(&frozen, format!("rename {image} to")))?;
            // A crash here leaves no NAME.vmdk; open finishes the rename.
            self.dir
                .rename(&new_top, &image)
                .map_err(ImageError::io(&image, format!("rename {new_top} to")))?;
            let mut layer = self.layers.remove(&image).expect("top");
            if let Data::Sparse(s) = &mut layer.data {
                s.set_name(&frozen);
            }
            self.layers.insert(frozen.clone(), layer);
            self.layers.insert(image.clone(), delta);
            frozen
        };
        self.top = image;
        self.dir
            .sync()
            .map_err(ImageError::io(".", "fsync directory"))?;
        self.boot_points.push(BootPoint {
            name: name.to_owned(),
            file: frozen,
        });
        self.write_sidecar()
    }

    fn boot_points(&self) -> Vec<String> {
        self.boot_points.iter().map(|b| b.name.clone()).collect()
    }

    fn revert_to(&mut self, name: &str) -> Result<(), ImageError> {
        let Some(bp) = self.boot_points.iter().find(|b| b.name == name) else {
            return Err(ImageError::NoSuchBootPoint {
                name: name.to_owned(),
            });
        };
        let target = bp.file.clone();
        let image = self.names.image.clone();
        let new_top = self.names.new_top();
        let delta = self.new_delta(&target, self.layers[&target].desc.cid)?;
        self.dir
            .rename(&new_top, &image)
            .map_err(ImageError::io(&image, format!("rename {new_top} to")))?;
        self.dir
            .sync()
            .map_err(ImageError::io(".", "fsync directory"))?;
        // The old working delta is gone with the rename; a working base
        // cannot be (a boot point exists, so the base is frozen).
        self.layers.insert(image.clone(), delta);
        self.top = image;
        self.tidy()
    }

    fn delete_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        let Some(at) = self.boot_points.iter().position(|b| b.name == name) else {
            return Err(ImageError::NoSuchBootPoint {
                name: name.to_owned(),
            });
        };
        self.boot_points.remove(at);
        self.write_sidecar()?;
        self.tidy()
    }

    /// Deletes the oldest boot point's name. When only the next layer
    /// depends on the oldest's, the next is committed into it and it takes
    /// the next boot point's name. With fewer than two boot points there is
    /// nothing to merge.
    fn merge_oldest(&mut self) -> Result<(), ImageError> {
        if self.boot_points.len() < 2 {
            return Ok(());
        }
        let oldest = self.boot_points[0].name.clone();
        self.delete_boot_point(&oldest)
    }

    /// `web.vmdk` (what the VMX names), or the boot point's frozen layer;
    /// each names its parent, down to the base.
    fn boot_file(&self, point: Option<&str>) -> Result<BootFile, ImageError> {
        let path = match point {
            None => self.names.image.clone(),
            Some(name) => self
                .boot_points
                .iter()
                .find(|b| b.name == name)
                .ok_or_else(|| ImageError::NoSuchBootPoint {
                    name: name.to_owned(),
                })?
                .file
                .clone(),
        };
        Ok(BootFile::new(path, FORMAT))
    }
}

impl Drop for Vmdk {
    fn drop(&mut self) {
        // Like closing a disk: what was written becomes reachable. Errors
        // have nowhere to go; a caller that cares has called flush. A load
        // that failed half-way has no top.
        if self.layers.contains_key(&self.top) {
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests;
