//! qcow2 standby images; boot points are internal snapshots.
//!
//! Images this module creates are qcow2 version 3 with 64 KiB clusters and
//! 16-bit refcounts: no backing file, compression, encryption, extended L2
//! entries or external data file. It opens version 2 and 3 images with any
//! cluster size qemu accepts and refuses (`Unsupported`) anything else,
//! rather than guessing.
//!
//! Metadata is cached in memory and written by [`Qcow2::commit`], which
//! orders the writes, with a sync between each group, so that a crash at any
//! point leaves an image that is consistent apart from leaked clusters
//! (clusters whose refcount is higher than the references to them):
//!
//! 1. guest data and the refcount blocks that count new clusters (then the
//!    refcount table, then the header if the table moved);
//! 2. L2 tables;
//! 3. the active L1 table, then the header fields that point at new L1 or
//!    snapshot tables;
//! 4. only then the decrements for clusters nothing on disk points at any
//!    more.
//!
//! Invariants:
//! - refcounts are exact: the header's dirty bit and lazy refcounts are
//!   never used;
//! - a cluster is written in place only if the entry that leads to it, and
//!   the L2 table holding that entry, are reached through the active L1
//!   table alone (refcount 1); everything shared with a snapshot is copied
//!   first. The COPIED flag says so in the active tables; when it is clear
//!   the refcount decides;
//! - the snapshot table and snapshots' L1 tables are never rewritten in
//!   place: a new copy is written, the header switched to it, then the old
//!   one freed (a revert replaces the active L1 table the same way; writes
//!   update it in place, entry by entry);
//! - every boot point operation ends with [`Qcow2::commit`], so the set of
//!   snapshots in memory is the set on disk whenever guest data is written.
//!
//! Memory: L2 tables are cached up to 32 MiB; every refcount block touched
//! stays loaded (64 KiB per 2 GiB of file with 64 KiB clusters).
//!
//! Dropping an image commits its metadata (best effort, logged on failure);
//! only [`Standby::flush`] reports errors and ends with `fsync`.
//!
//! Known window: a crash in the middle of [`Standby::create_boot_point`]
//! can leave COPIED clear on clusters whose refcount is 1. That only costs
//! a needless copy on the next write (which sets the flag again), but
//! `qemu-img check` reports it until `qemu-img check -r all` is run.

mod boot;
mod header;
mod map;
mod refcount;
mod snapshot;

use std::{collections::HashMap, fs::File, io, os::unix::fs::FileExt};

use self::{
    header::{field, Header},
    snapshot::Snapshot,
};
use super::{Dir, Format, ImageError, Standby};
use crate::sys::fs as sysfs;

/// Cluster size of the images [`Qcow2::create`] makes: 64 KiB.
const CLUSTER_BITS: u32 = 16;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor bit 0 (v3): the cluster reads as zeroes.
const ZERO_FLAG: u64 = 1;
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const RT_RESERVED: u64 = 0x1ff;

/// qemu's limits: a 32 MiB L1 table, an 8 MiB refcount table.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
const MAX_REFCOUNT_TABLE_ENTRIES: u64 = (8 << 20) / 8;
/// Memory for cached L2 tables, beyond which clean ones are dropped.
const L2_CACHE_BYTES: u64 = 32 << 20;

const FORMAT: &str = "qcow2";

fn corrupt(file: &str, reason: impl Into<String>) -> ImageError {
    ImageError::corrupt(FORMAT, file, reason)
}

fn unsupported(file: &str, what: impl Into<String>) -> ImageError {
    ImageError::unsupported(FORMAT, file, what)
}

/// A refcount block in memory.
struct RefBlock {
    counts: Vec<u16>,
    dirty: bool,
}

/// An L2 table in memory.
struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: File,
    name: String,
    version: u32,
    cluster_bits: u32,
    size: u64,

    /// The active L1 table.
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: bool,

    /// The refcount table.
    rt: Vec<u64>,
    rt_offset: u64,
    rt_clusters: u32,
    /// The table changed since it was last written.
    rt_dirty: bool,
    /// The table moved; the header must point at the new one.
    rt_moved: bool,
    /// Refcount blocks by index in the refcount table.
    blocks: HashMap<u64, RefBlock>,

    /// L2 tables by file offset.
    l2: HashMap<u64, L2Table>,

    /// Oldest first (the table's order, which is creation order).
    snapshots: Vec<Snapshot>,
    snap_offset: u64,
    snap_len: u64,
    /// L1 or snapshot table location changed since the header was written.
    header_dirty: bool,

    /// Clusters losing one reference once the metadata that dropped it is
    /// durable (see `refcount`).
    pending: Vec<u64>,
    /// Cluster number past every cluster in use and past the end of the
    /// file.
    end: u64,
    /// No free cluster below this one.
    free_hint: u64,
    /// Something was written since the last sync.
    unsynced: bool,

    /// Test hook: fail every write after this many, as if the machine had
    /// stopped there.
    #[cfg(test)]
    crash_after: Option<u64>,
    /// Test hook: skip syncs (a simulated crash keeps the page cache).
    #[cfg(test)]
    skip_sync: bool,
    /// Test hook: `crash_after` when a commit began writing a moved
    /// refcount table.
    #[cfg(test)]
    table_moved_at: Option<u64>,
}

impl Qcow2 {
    /// Creates a new, empty image of `size` bytes (a multiple of 512).
    pub fn create(dir: &Dir, name: &str, size: u64) -> Result<Self, ImageError> {
        Self::create_with(dir, name, size, CLUSTER_BITS)
    }

    fn create_with(
        dir: &Dir,
        name: &str,
        size: u64,
        cluster_bits: u32,
    ) -> Result<Self, ImageError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(unsupported(
                name,
                format!("a disk of {size} bytes (not a positive multiple of 512)"),
            ));
        }
        let cluster = 1u64 << cluster_bits;
        let l1_entries = header::l1_entries_for(size, cluster_bits);
        let l1_clusters = (l1_entries * 8).div_ceil(cluster);
        // Header, refcount table, one refcount block, L1 table; the block
        // must count them all.
        let used = 3 + l1_clusters;
        if l1_entries > MAX_L1_ENTRIES || used > cluster / 2 {
            return Err(unsupported(
                name,
                format!("a {size}-byte disk with {cluster}-byte clusters"),
            ));
        }
        let h = Header {
            version: 3,
            cluster_bits,
            size,
            l1_size: l1_entries as u32,
            l1_offset: 3 * cluster,
            rt_offset: cluster,
            rt_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            autoclear: 0,
        };
        let file = dir.create(name).map_err(ImageError::io(name, "create"))?;
        let write = |at: u64, buf: &[u8]| {
            file.write_all_at(buf, at)
                .map_err(ImageError::io(name, format!("write at {at:#x}")))
        };
        let result = (|| {
            write(0, &h.encode_new())?;
            let mut table = vec![0u8; cluster as usize];
            table[..8].copy_from_slice(&(2 * cluster).to_be_bytes());
            write(cluster, &table)?;
            let mut block = vec![0u8; cluster as usize];
            for c in 0..used as usize {
                block[2 * c..2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            write(2 * cluster, &block)?;
            write(3 * cluster, &vec![0u8; (l1_clusters * cluster) as usize])?;
            file.sync_all().map_err(ImageError::io(name, "sync"))?;
            dir.sync()
                .map_err(ImageError::io(name, "sync the directory"))
        })();
        drop(file);
        if let Err(e) = result {
            let _ = dir.remove(name);
            return Err(e);
        }
        Self::open(dir, name)
    }

    /// Grows the disk to `size` bytes, as `qemu-img resize` does: the new
    /// space reads as zeroes, boot points keep the size they were taken at.
    /// A larger L1 table that no longer fits its clusters moves to new ones.
    pub fn grow(&mut self, size: u64) -> Result<(), ImageError> {
        if size < self.size || !size.is_multiple_of(512) {
            return Err(unsupported(
                &self.name,
                format!("growing a {}-byte disk to {size} bytes", self.size),
            ));
        }
        let entries = header::l1_entries_for(size, self.cluster_bits);
        if entries > MAX_L1_ENTRIES {
            return Err(unsupported(
                &self.name,
                format!(
                    "a {size}-byte disk with {}-byte clusters",
                    self.cluster_size()
                ),
            ));
        }
        if entries > self.l1.len() as u64 {
            let old_entries = self.l1.len() as u64;
            self.l1.resize(entries as usize, 0);
            if self.l1_clusters(entries) > self.l1_clusters(old_entries) {
                let l1 = self.l1.clone();
                let offset = self.write_new_l1(&l1)?;
                let old: Vec<u64> = self
                    .l1_table_clusters(self.l1_offset, old_entries as u32)
                    .collect();
                self.pending.extend(old);
                self.l1_offset = offset;
            } else {
                // The table's clusters were zero past its end.
                self.l1_dirty = true;
            }
        }
        self.size = size;
        self.header_dirty = true;
        self.commit()
    }

    /// Opens an existing image read-write, checking the header and the
    /// tables it points to.
    pub fn open(dir: &Dir, name: &str) -> Result<Self, ImageError> {
        let file = dir.open_rw(name).map_err(ImageError::io(name, "open"))?;
        let file_len = file.metadata().map_err(ImageError::io(name, "stat"))?.len();
        // Enough for the largest cluster 0 qemu allows.
        let mut head = vec![0u8; file_len.min(2 << 20) as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(ImageError::io(name, "read the header"))?;
        let h = Header::parse(&head, file_len, name)?;
        let cluster = 1u64 << h.cluster_bits;
        let (snapshots, snap_len) = if h.nb_snapshots > 0 {
            snapshot::read_table(
                &file,
                name,
                h.snapshots_offset,
                h.nb_snapshots,
                file_len,
                h.cluster_bits,
            )?
        } else {
            (Vec::new(), 0)
        };

        let mut img = Qcow2 {
            file,
            name: name.to_owned(),
            version: h.version,
            cluster_bits: h.cluster_bits,
            size: h.size,
            l1: Vec::new(),
            l1_offset: h.l1_offset,
            l1_dirty: false,
            rt: Vec::new(),
            rt_offset: h.rt_offset,
            rt_clusters: h.rt_clusters,
            rt_dirty: false,
            rt_moved: false,
            blocks: HashMap::new(),
            l2: HashMap::new(),
            snapshots,
            snap_offset: h.snapshots_offset,
            snap_len,
            header_dirty: false,
            pending: Vec::new(),
            end: file_len.div_ceil(cluster),
            free_hint: 0,
            unsynced: false,
            #[cfg(test)]
            crash_after: None,
            #[cfg(test)]
            skip_sync: false,
            #[cfg(test)]
            table_moved_at: None,
        };

        let mut table = vec![0u8; (u64::from(h.rt_clusters) * cluster) as usize];
        img.read_meta(h.rt_offset, &mut table, "refcount table")?;
        img.rt = be64s(&table);
        for (t, &e) in img.rt.iter().enumerate() {
            let off = e & !RT_RESERVED;
            if e & RT_RESERVED != 0
                || !off.is_multiple_of(cluster)
                || off.saturating_add(cluster) > file_len
            {
                return Err(corrupt(
                    name,
                    format!("refcount table entry {t} ({e:#x}) is not a block inside the file"),
                ));
            }
        }
        // Clusters past the end of the file may be counted (allocated by a
        // writer that stopped before writing them): `end` goes past them.
        let per = img.block_entries();
        for t in (0..img.rt.len() as u64).rev() {
            if img.rt[t as usize] == 0 {
                continue;
            }
            let last = img.block_counts(t)?.iter().rposition(|&n| n != 0);
            if let Some(i) = last {
                img.end = img.end.max(t * per + i as u64 + 1);
                break;
            }
        }

        img.l1 = img.read_l1_at(h.l1_offset, h.l1_size)?;
        for (what, offset) in [
            ("the header", 0),
            ("the refcount table", h.rt_offset),
            ("the L1 table", h.l1_offset),
        ] {
            if offset == 0 && what != "the header" {
                continue;
            }
            if img.refcount(offset >> h.cluster_bits)? == 0 {
                return Err(corrupt(
                    name,
                    format!("{what} at {offset:#x} has refcount 0"),
                ));
            }
        }
        if h.autoclear != 0 {
            // The spec lets a writer that does not know these features use
            // the image once it clears their bits.
            img.write(
                field::AUTOCLEAR,
                &0u64.to_be_bytes(),
                "clear autoclear bits",
            )?;
            img.sync()?;
        }
        Ok(img)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters an L1 table of `entries` entries occupies.
    fn l1_clusters(&self, entries: u64) -> u64 {
        (entries * 8).div_ceil(self.cluster_size())
    }

    /// Reads an L1 table and checks its entries.
    fn read_l1_at(&self, offset: u64, entries: u32) -> Result<Vec<u64>, ImageError> {
        let mut buf = vec![0u8; entries as usize * 8];
        if entries > 0 {
            self.read_meta(offset, &mut buf, "L1 table")?;
        }
        let l1 = be64s(&buf);
        for (i, &e) in l1.iter().enumerate() {
            let off = e & L1E_OFFSET_MASK;
            if e & L1E_RESERVED != 0
                || !off.is_multiple_of(self.cluster_size())
                || off >> self.cluster_bits >= self.end
                || (off == 0 && e & COPIED != 0)
            {
                return Err(corrupt(
                    &self.name,
                    format!("L1 table at {offset:#x}: entry {i} ({e:#x}) is invalid"),
                ));
            }
        }
        Ok(l1)
    }

    /// Reads metadata that must lie wholly inside the file.
    fn read_meta(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(
                    &self.name,
                    format!("{what} at {offset:#x} lies past the end of the file"),
                )
            } else {
                ImageError::io(&self.name, format!("read {what} at {offset:#x}"))(e)
            }
        })
    }

    /// Reads guest data; what lies past the end of the file reads as zeroes
    /// (a writer may have counted a cluster it never wrote out).
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ImageError::io(
                        &self.name,
                        format!("read data at {:#x}", offset + done as u64),
                    )(e))
                }
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write(&mut self, offset: u64, buf: &[u8], what: &str) -> Result<(), ImageError> {
        #[cfg(test)]
        if let Some(left) = self.crash_after.as_mut() {
            if *left == 0 {
                return Err(ImageError::Io {
                    file: self.name.clone(),
                    op: "write (simulated crash)".into(),
                    source: io::Error::other("simulated crash"),
                });
            }
            *left -= 1;
        }
        self.unsynced = true;
        self.file
            .write_all_at(buf, offset)
            .map_err(ImageError::io(&self.name, format!("{what} at {offset:#x}")))
    }

    /// Orders the writes before it against those after it.
    fn sync(&mut self) -> Result<(), ImageError> {
        #[cfg(test)]
        if self.skip_sync {
            self.unsynced = false;
        }
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(ImageError::io(&self.name, "sync"))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Makes every change durable, in the order the module docs give.
    fn commit(&mut self) -> Result<(), ImageError> {
        #[cfg(test)]
        if self.rt_moved && self.table_moved_at.is_none() {
            self.table_moved_at = self.crash_after;
        }
        // 1. New clusters' contents and refcounts before anything points at
        //    them.
        self.write_blocks()?;
        if self.rt_dirty {
            self.sync()?;
            let table = self.encode_table();
            self.write(self.rt_offset, &table, "write refcount table")?;
            if self.rt_moved {
                self.sync()?;
                let mut f = self.rt_offset.to_be_bytes().to_vec();
                f.extend_from_slice(&self.rt_clusters.to_be_bytes());
                self.write(field::REFCOUNT_TABLE, &f, "write header")?;
                self.rt_moved = false;
            }
            self.rt_dirty = false;
        }
        self.sync()?;

        // 2. L2 tables.
        let mut dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        dirty.sort_unstable();
        for o in dirty {
            let buf: Vec<u8> = self.l2[&o]
                .entries
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.write(o, &buf, "write L2 table")?;
            self.l2.get_mut(&o).expect("listed above").dirty = false;
        }
        self.sync()?;

        // 3. The active L1 table, then the header.
        if self.l1_dirty {
            let buf: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write(self.l1_offset, &buf, "write L1 table")?;
            self.l1_dirty = false;
        }
        if self.header_dirty {
            self.sync()?;
            let mut f = (self.l1.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&self.l1_offset.to_be_bytes());
            self.write(field::L1, &f, "write header")?;
            // After the L1 fields: a crash between the two leaves a table
            // large enough for either size.
            self.write(field::SIZE, &self.size.to_be_bytes(), "write header")?;
            let mut f = (self.snapshots.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&self.snap_offset.to_be_bytes());
            self.write(field::SNAPSHOTS, &f, "write header")?;
            self.header_dirty = false;
        }
        self.sync()?;

        // 4. Drop the references nothing durable uses any more.
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let mut freed = Vec::new();
            for offset in pending {
                if self.decref(offset)? == 0 {
                    self.l2.remove(&offset);
                    freed.push(offset);
                }
            }
            self.write_blocks()?;
            self.sync()?;
            self.punch(freed);
        }
        Ok(())
    }

    /// Gives free clusters' space back to the filesystem, where it can.
    fn punch(&self, mut freed: Vec<u64>) {
        freed.sort_unstable();
        let cluster = self.cluster_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for off in freed {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == off => *len += cluster,
                _ => runs.push((off, cluster)),
            }
        }
        for (off, len) in runs {
            if let Err(e) = sysfs::punch_hole(&self.file, off, len) {
                if !sysfs::is_unsupported(&e) {
                    tracing::debug!(image = %self.name, "punching free clusters at {off:#x} failed: {e}");
                }
                return;
            }
        }
    }

    /// The counts in refcount block `t`, which the table has.
    fn block_counts(&mut self, t: u64) -> Result<&[u16], ImageError> {
        Ok(self.block(t)?.map_or(&[][..], |b| &b.counts[..]))
    }

    fn find(&self, name: &str) -> Result<usize, ImageError> {
        self.snapshots
            .iter()
            .position(|s| s.name == name.as_bytes())
            .ok_or_else(|| ImageError::NoSuchBootPoint {
                name: name.to_owned(),
            })
    }
}

fn be64s(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl Standby for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        super::check_range(offset, data.len() as u64, self.size)?;
        let cluster = self.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let n = ((cluster - pos % cluster) as usize).min(data.len() - done);
            self.trim_cache()?;
            self.write_chunk(pos, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_range(offset, len, self.size)?;
        self.zero_range(offset, len)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        super::check_range(offset, buf.len() as u64, self.size)?;
        let cluster = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cluster - pos % cluster) as usize).min(buf.len() - done);
            self.trim_cache()?;
            self.read_chunk(pos, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.commit()?;
        self.file
            .sync_all()
            .map_err(ImageError::io(&self.name, "sync"))
    }

    fn create_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        if self.find(name).is_ok() {
            return Err(ImageError::BootPointExists {
                name: name.to_owned(),
            });
        }
        let max = Format::Qcow2.max_boot_points();
        if self.snapshots.len() >= max {
            return Err(ImageError::TooManyBootPoints {
                format: FORMAT,
                max,
            });
        }
        self.snapshot_create(name)
    }

    fn boot_points(&self) -> Vec<String> {
        self.snapshots.iter().map(Snapshot::name_lossy).collect()
    }

    fn revert_to(&mut self, name: &str) -> Result<(), ImageError> {
        let i = self.find(name)?;
        self.snapshot_goto(i)
    }

    /// The image itself; a boot point is one of its internal snapshots.
    fn boot_file(&self, point: Option<&str>) -> Result<super::BootFile, ImageError> {
        let mut file = super::BootFile::new(self.name.clone(), "qcow2");
        if let Some(p) = point {
            self.find(p)?;
            file.snapshot = Some(p.to_owned());
        }
        Ok(file)
    }

    fn delete_boot_point(&mut self, name: &str) -> Result<(), ImageError> {
        let i = self.find(name)?;
        self.snapshot_delete(i)
    }

    fn merge_oldest(&mut self) -> Result<(), ImageError> {
        // The newer of the two keeps its content and name; the older one's
        // content is not needed by anything else, so merging is deleting it.
        if self.snapshots.len() < 2 {
            return Ok(()); // nothing to merge, as the other formats
        }
        self.snapshot_delete(0)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crash_after.is_some() {
            return;
        }
        if let Err(e) = self.commit() {
            tracing::warn!(image = %self.name, "writing qcow2 metadata on close failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
