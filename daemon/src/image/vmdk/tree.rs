//! How data moves through the tree of layers: reads fall through to the
//! parent, writes allocate grains in the layer written and copy the rest of
//! the grain up from below, and retention commits a child into its anonymous
//! parent.
//!
//! Invariant: only the working layer and an anonymous layer being committed
//! into are ever written; see the parent module for why a commit keeps every
//! chain's content at each step.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::FileExt,
};

use super::{
    remove_if_there,
    sparse::{read_full, zero_range, Gte, Sparse},
    write_atomic, Data, Vmdk,
};
use crate::image::ImageError;

impl Vmdk {
    /// Reads layer `key` as its chain shows it.
    pub(super) fn read_layer(
        &mut self,
        key: &str,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), ImageError> {
        let layer = self.layers.get_mut(key).expect("loaded");
        let parent = layer.parent.clone();
        // Ranges of `buf` this layer leaves to its parent.
        let mut holes: Vec<(usize, usize)> = Vec::new();
        match &mut layer.data {
            Data::Flat { file, name, start } => {
                return read_full(file, *start + off, buf).map_err(ImageError::io(name, "read"));
            }
            Data::Sparse(s) => {
                let gb = s.grain_bytes();
                let mut done = 0;
                while done < buf.len() {
                    let pos = off + done as u64;
                    let skip = pos % gb;
                    let n = ((gb - skip) as usize).min(buf.len() - done);
                    let part = &mut buf[done..done + n];
                    match s.lookup(pos / gb)? {
                        Gte::At(sector) => s.read_grain(sector, skip, part)?,
                        Gte::Zero => part.fill(0),
                        Gte::Unallocated => match holes.last_mut() {
                            Some((_, end)) if *end == done => *end += n,
                            _ => holes.push((done, done + n)),
                        },
                    }
                    done += n;
                }
            }
        }
        for (from, to) in holes {
            match &parent {
                Some(p) => self.read_layer(p, off + from as u64, &mut buf[from..to])?,
                None => buf[from..to].fill(0),
            }
        }
        Ok(())
    }

    /// Writes into layer `key`, allocating grains and filling the rest of a
    /// new grain from the layer's parent chain.
    pub(super) fn write_layer(
        &mut self,
        key: &str,
        off: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let size = self.size;
        let layer = self.layers.get_mut(key).expect("loaded");
        let parent = layer.parent.clone();
        let gb = match &layer.data {
            Data::Flat { file, name, start } => {
                return file
                    .write_all_at(data, *start + off)
                    .map_err(ImageError::io(name, "write"));
            }
            Data::Sparse(s) => s.grain_bytes(),
        };
        let mut done = 0;
        while done < data.len() {
            let pos = off + done as u64;
            let (grain, skip) = (pos / gb, pos % gb);
            let n = ((gb - skip) as usize).min(data.len() - done);
            let part = &data[done..done + n];
            let gte = self.sparse(key).lookup(grain)?;
            if let Gte::At(sector) = gte {
                self.sparse(key).write_grain(sector, skip, part)?;
            } else {
                let start = grain * gb;
                let valid = gb.min(size - start) as usize;
                let mut whole = vec![0u8; gb as usize];
                let covered = skip == 0 && n >= valid;
                if let (Gte::Unallocated, false, Some(p)) = (gte, covered, &parent) {
                    self.read_layer(p, start, &mut whole[..valid])?;
                }
                whole[skip as usize..skip as usize + n].copy_from_slice(part);
                let s = self.sparse(key);
                let sector = s.allocate()?;
                s.write_grain(sector, 0, &whole)?;
                s.set(grain, Gte::At(sector))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Makes `[off, off + len)` of layer `key` read as zeroes.
    pub(super) fn zero_layer(&mut self, key: &str, off: u64, len: u64) -> Result<(), ImageError> {
        let size = self.size;
        let layer = self.layers.get_mut(key).expect("loaded");
        let has_parent = layer.parent.is_some();
        let gb = match &layer.data {
            Data::Flat { file, name, start } => {
                return zero_range(file, *start + off, len).map_err(ImageError::io(name, "zero"));
            }
            Data::Sparse(s) => s.grain_bytes(),
        };
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let (grain, skip) = (pos / gb, pos % gb);
            let n = (gb - skip).min(len - done);
            if skip != 0 || n < gb.min(size - grain * gb) {
                self.write_layer(key, pos, &vec![0u8; n as usize])?;
            } else {
                let s = self.sparse(key);
                match s.lookup(grain)? {
                    Gte::At(sector) => s.zero_grain(sector)?,
                    Gte::Zero => {}
                    Gte::Unallocated if !has_parent => {}
                    Gte::Unallocated if s.has_zero_grain() => s.set(grain, Gte::Zero)?,
                    Gte::Unallocated => {
                        let sector = s.allocate()?;
                        s.write_grain(sector, 0, &vec![0u8; gb as usize])?;
                        s.set(grain, Gte::At(sector))?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    pub(super) fn sparse(&mut self, key: &str) -> &mut Sparse {
        match &mut self.layers.get_mut(key).expect("loaded").data {
            Data::Sparse(s) => s,
            Data::Flat { .. } => unreachable!("{key} is flat"),
        }
    }

    pub(super) fn flush_layer(&mut self, key: &str) -> Result<(), ImageError> {
        match &mut self.layers.get_mut(key).expect("loaded").data {
            Data::Flat { file, name, .. } => file.sync_all().map_err(ImageError::io(name, "fsync")),
            Data::Sparse(s) => s.flush(),
        }
    }

    pub(super) fn children(&self) -> HashMap<&str, Vec<&str>> {
        let mut map: HashMap<&str, Vec<&str>> = HashMap::new();
        for (k, l) in &self.layers {
            if let Some(p) = &l.parent {
                map.entry(p.as_str()).or_default().push(k.as_str());
            }
        }
        map
    }

    /// Removes anonymous layers nothing depends on and commits into those
    /// one layer depends on, until there is none left.
    pub(super) fn tidy(&mut self) -> Result<(), ImageError> {
        loop {
            let named: HashSet<&str> = self.boot_points.iter().map(|b| b.file.as_str()).collect();
            let children = self.children();
            let mut candidates: Vec<(usize, &str, Option<&str>)> = self
                .layers
                .keys()
                .filter(|k| **k != self.top && !named.contains(k.as_str()))
                .filter_map(|k| {
                    let kids = children.get(k.as_str()).map(Vec::as_slice).unwrap_or(&[]);
                    (kids.len() <= 1).then(|| (kids.len(), k.as_str(), kids.first().copied()))
                })
                .collect();
            candidates.sort();
            let Some(&(_, key, child)) = candidates.first() else {
                return Ok(());
            };
            let (key, child) = (key.to_owned(), child.map(str::to_owned));
            match child {
                Some(child) => self.commit(&key, &child)?,
                None => {
                    let layer = self.layers.remove(&key).expect("loaded");
                    if let Data::Sparse(_) = layer.data {
                        remove_if_there(&self.dir, &key)?;
                    }
                    self.dir
                        .sync()
                        .map_err(ImageError::io(".", "fsync directory"))?;
                }
            }
        }
    }

    /// Commits `child` into its anonymous `parent`, which then takes the
    /// child's place. See the module docs for why each step is safe.
    pub(super) fn commit(&mut self, parent: &str, child: &str) -> Result<(), ImageError> {
        self.make_writable(parent)?;
        self.flush_layer(child)?;
        let gb = match &self.layers[child].data {
            Data::Sparse(s) => s.grain_bytes(),
            Data::Flat { .. } => unreachable!("a child has a parent, so it is sparse"),
        };
        let mut buf = vec![0u8; gb as usize];
        for t in 0..self.sparse(child).tables() {
            for (grain, gte) in self.sparse(child).table_entries(t)? {
                let start = grain * gb;
                if start >= self.size {
                    // The last table's entries past the disk's end.
                    break;
                }
                let valid = gb.min(self.size - start) as usize;
                match gte {
                    Gte::At(sector) => {
                        self.sparse(child)
                            .read_grain(sector, 0, &mut buf[..valid])?;
                        self.write_layer(parent, start, &buf[..valid])?;
                    }
                    Gte::Zero => self.zero_layer(parent, start, valid as u64)?,
                    Gte::Unallocated => {}
                }
            }
        }
        self.flush_layer(parent)?;
        // The parent now reads as the child: hand it the child's place.
        if child == self.top {
            let top = self.names.image.clone();
            let mut layer = self.layers.remove(parent).expect("loaded");
            match &mut layer.data {
                Data::Sparse(s) => {
                    layer.desc.extent.file.clone_from(&top);
                    s.set_descriptor(&layer.desc.render())?;
                    self.dir
                        .rename(parent, &top)
                        .map_err(ImageError::io(&top, format!("rename {parent} to")))?;
                    s.set_name(&top);
                    self.layers.insert(top.clone(), layer);
                    self.top = top;
                }
                Data::Flat { .. } => {
                    write_atomic(&self.dir, &top, layer.desc.render().as_bytes())?;
                    self.layers.remove(&top);
                    self.layers.insert(parent.to_owned(), layer);
                    self.top = parent.to_owned();
                }
            }
        } else {
            let mut renamed = false;
            for bp in &mut self.boot_points {
                if bp.file == child {
                    parent.clone_into(&mut bp.file);
                    renamed = true;
                }
            }
            if renamed {
                self.write_sidecar()?;
            }
            let grandchildren: Vec<String> = self
                .children()
                .get(child)
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default();
            let cid = self.layers[parent].desc.cid;
            for g in grandchildren {
                let layer = self.layers.get_mut(&g).expect("loaded");
                layer.parent = Some(parent.to_owned());
                layer.desc.parent_hint = Some(parent.to_owned());
                layer.desc.parent_cid = cid;
                self.write_descriptor(&g)?;
            }
            self.layers.remove(child);
            remove_if_there(&self.dir, child)?;
        }
        self.dir
            .sync()
            .map_err(ImageError::io(".", "fsync directory"))
    }
}
