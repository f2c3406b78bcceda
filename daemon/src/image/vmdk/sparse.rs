//! Hosted sparse extents (Virtual Disk Format 5.0, "Hosted Sparse Extents"):
//! a 512-byte `KDMV` header, the embedded descriptor, a grain directory (GD)
//! of grain-table (GT) sector numbers, GTs of grain sector numbers, grains.
//!
//! Layout of the extents ferry creates, in sectors (as `qemu-img` lays them
//! out, so both tools find what they expect):
//!
//! | what | where |
//! |---|---|
//! | header | 0 |
//! | descriptor | 1, 20 sectors |
//! | redundant GD, then its GTs | 21 |
//! | GD, then its GTs | after the redundant GTs |
//! | grains | from `overHead`, a multiple of the grain size, appended |
//!
//! Invariants:
//! - Every GT is preallocated at creation (as holes), so the GD never changes
//!   after creation and a grain allocation only changes one GT entry (GTE).
//! - A GTE reaches the disk only after the grain it points to: new GTEs stay
//!   in memory (dirty GTs) until [`Sparse::flush`] has synced the data. After a
//!   crash a GTE is therefore old or points to complete data; at worst
//!   appended grains leak.
//! - Grains are only appended, never moved or reused: a grain being zeroed
//!   keeps its place and has its bytes punched out.
//! - GTE 1 means "zeroed grain" (reads as zeroes, hides the parent); it is
//!   only valid with header flag bit 2, which every extent ferry writes has.
//!   Without that flag a zeroed grain is allocated instead.
//! - Redundant GTs (flag bit 1) get every GTE the primary GTs get.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::unix::fs::FileExt,
};

use super::{corrupt, unsupported};
use crate::{image::ImageError, sys::fs as sysfs};

pub(super) const SECTOR: u64 = 512;
/// 64 KiB grains, what VMware and QEMU use.
pub(super) const GRAIN_SECTORS: u64 = 128;

const MAGIC: &[u8; 4] = b"KDMV";
const COWD_MAGIC: &[u8; 4] = b"COWD";
const FLAG_NL_DETECT: u32 = 1 << 0;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const GD_AT_END: u64 = u64::MAX;
/// The spec's fixed GT size (QEMU accepts smaller).
const GTES_PER_GT: u32 = 512;
const DESC_SECTORS: u64 = 20;
/// Newline check bytes at offset 73: they catch text-mode transfers.
const NL_CHECK: [u8; 4] = *b"\n \r\n";
/// Most GTs held in memory (2 KiB each) before the cache is dropped.
const GT_CACHE_LIMIT: usize = 8192;
/// Largest embedded descriptor read, in sectors.
const MAX_DESC_SECTORS: u64 = 2048;

/// Where a grain's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gte {
    /// Not here: read the parent.
    Unallocated,
    /// Reads as zeroes, whatever the parent holds.
    Zero,
    /// At this sector of the extent file.
    At(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u32,
    rgd_offset: u64,
    gd_offset: u64,
    overhead: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        // 72: uncleanShutdown = 0; 77: compressAlgorithm = 0.
        b[73..77].copy_from_slice(&NL_CHECK);
        b
    }

    /// Decodes and checks a header against the file's length; the error is
    /// `(corrupt?, reason)`.
    fn decode(b: &[u8; 512], file_len: u64) -> Result<Self, (bool, String)> {
        let bad = |s: String| Err((true, s));
        if &b[0..4] == COWD_MAGIC {
            return Err((false, "vmfsSparse (COWD) extents".into()));
        }
        if &b[0..4] != MAGIC {
            return bad("bad magic (not KDMV)".into());
        }
        let h = Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
        };
        let compress = u16::from_le_bytes([b[77], b[78]]);
        if !(1..=3).contains(&h.version) {
            return bad(format!("sparse extent version {}", h.version));
        }
        if h.flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0
            || compress != 0
            || h.gd_offset == GD_AT_END
        {
            return Err((false, "compressed grains (streamOptimized)".into()));
        }
        if h.flags & FLAG_NL_DETECT != 0 && b[73..77] != NL_CHECK {
            return bad("newline check bytes damaged (copied in text mode?)".into());
        }
        if !h.grain.is_power_of_two() || h.grain > 2048 {
            return bad(format!("grain size of {} sectors", h.grain));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > GTES_PER_GT {
            return bad(format!("{} entries per grain table", h.gtes_per_gt));
        }
        if h.capacity == 0 || h.capacity > 1 << 40 {
            return bad(format!("capacity of {} sectors", h.capacity));
        }
        let sectors = file_len.div_ceil(SECTOR);
        if h.desc_offset == 0 || h.desc_size == 0 {
            return bad("no embedded descriptor".into());
        }
        if h.desc_size > MAX_DESC_SECTORS || h.desc_offset + h.desc_size > sectors {
            return bad("descriptor beyond the end of the file".into());
        }
        let gd_bytes = h.gd_entries() * 4;
        let mut dirs = vec![("grain directory", h.gd_offset)];
        if h.flags & FLAG_RGD != 0 {
            dirs.push(("redundant grain directory", h.rgd_offset));
        }
        for (what, at) in dirs {
            if at == 0 || at.saturating_mul(SECTOR).saturating_add(gd_bytes) > file_len {
                return bad(format!("{what} at sector {at} beyond the end of the file"));
            }
        }
        if h.overhead > sectors {
            return bad(format!(
                "file truncated (grains start at sector {})",
                h.overhead
            ));
        }
        Ok(h)
    }

    fn gt_sectors(&self) -> u64 {
        (u64::from(self.gtes_per_gt) * 4).div_ceil(SECTOR)
    }

    fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain * u64::from(self.gtes_per_gt))
    }
}

/// One hosted sparse extent file.
pub(super) struct Sparse {
    file: File,
    /// For error messages.
    name: String,
    h: Header,
    file_len: u64,
    /// Where the next grain goes, in sectors.
    next_grain: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    gd_dirty: bool,
    gts: HashMap<usize, Vec<u32>>,
    dirty: BTreeSet<usize>,
}

impl Sparse {
    /// Whether a disk of `capacity` sectors fits a sparse extent: grain
    /// sector numbers are 32 bits.
    pub fn fits(capacity: u64) -> bool {
        let (_, overhead) = layout(capacity, DESC_SECTORS);
        overhead + capacity.next_multiple_of(GRAIN_SECTORS) <= 1 << 32
    }

    /// Writes a new, empty extent (version 2, zeroed-grain GTEs, redundant
    /// GD) holding `descriptor` into the empty `file`.
    pub fn create(
        file: File,
        name: &str,
        capacity: u64,
        descriptor: &str,
    ) -> Result<Self, ImageError> {
        let desc_size = (descriptor.len() as u64).div_ceil(SECTOR).max(DESC_SECTORS);
        let ((rgd_offset, gd_offset), overhead) = layout(capacity, desc_size);
        let h = Header {
            version: 2,
            flags: FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN,
            capacity,
            grain: GRAIN_SECTORS,
            desc_offset: 1,
            desc_size,
            gtes_per_gt: GTES_PER_GT,
            rgd_offset,
            gd_offset,
            overhead,
        };
        let entries = h.gd_entries();
        let table = |first_gt: u64| -> Result<Vec<u32>, ImageError> {
            (0..entries)
                .map(|i| {
                    u32::try_from(first_gt + i * h.gt_sectors())
                        .map_err(|_| unsupported(name, "a disk this large in a sparse extent"))
                })
                .collect()
        };
        let gd_sectors = (entries * 4).div_ceil(SECTOR);
        let gd = table(gd_offset + gd_sectors)?;
        let rgd = table(rgd_offset + gd_sectors)?;
        let io = |op: &str| ImageError::io(name, op.to_owned());
        file.write_all_at(&h.encode(), 0)
            .map_err(io("write header"))?;
        file.write_all_at(descriptor.as_bytes(), SECTOR)
            .map_err(io("write descriptor"))?;
        file.write_all_at(&table_bytes(&rgd), rgd_offset * SECTOR)
            .map_err(io("write redundant grain directory"))?;
        file.write_all_at(&table_bytes(&gd), gd_offset * SECTOR)
            .map_err(io("write grain directory"))?;
        // The GTs stay holes: all zero, every grain unallocated.
        file.set_len(overhead * SECTOR).map_err(io("extend"))?;
        file.sync_all().map_err(io("fsync"))?;
        Ok(Self {
            file,
            name: name.to_owned(),
            file_len: overhead * SECTOR,
            next_grain: overhead,
            gd,
            rgd: Some(rgd),
            gd_dirty: false,
            gts: HashMap::new(),
            dirty: BTreeSet::new(),
            h,
        })
    }

    /// Opens an extent, checking the header and the grain directories.
    pub fn open(file: File, name: &str) -> Result<Self, ImageError> {
        let io = |op: &str| ImageError::io(name, op.to_owned());
        let file_len = file.metadata().map_err(io("stat"))?.len();
        let mut b = [0u8; 512];
        if file_len < SECTOR {
            return Err(corrupt(name, "shorter than one sector"));
        }
        file.read_exact_at(&mut b, 0).map_err(io("read header"))?;
        let h = Header::decode(&b, file_len).map_err(|(is_corrupt, why)| {
            if is_corrupt {
                corrupt(name, why)
            } else {
                unsupported(name, why)
            }
        })?;
        let read_table = |at: u64, what: &str| -> Result<Vec<u32>, ImageError> {
            let mut raw = vec![0u8; h.gd_entries() as usize * 4];
            file.read_exact_at(&mut raw, at * SECTOR)
                .map_err(io(&format!("read {what}")))?;
            let table: Vec<u32> = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            for (i, &gt) in table.iter().enumerate() {
                let end = u64::from(gt) * SECTOR + u64::from(h.gtes_per_gt) * 4;
                if gt != 0 && end > file_len {
                    return Err(corrupt(
                        name,
                        format!("{what} entry {i}: grain table beyond the end of the file"),
                    ));
                }
            }
            Ok(table)
        };
        let gd = read_table(h.gd_offset, "grain directory")?;
        let rgd = if h.flags & FLAG_RGD != 0 {
            Some(read_table(h.rgd_offset, "redundant grain directory")?)
        } else {
            None
        };
        let next_grain = file_len
            .div_ceil(SECTOR)
            .next_multiple_of(h.grain)
            .max(h.overhead);
        Ok(Self {
            file,
            name: name.to_owned(),
            file_len,
            next_grain,
            gd,
            rgd,
            gd_dirty: false,
            gts: HashMap::new(),
            dirty: BTreeSet::new(),
            h,
        })
    }

    pub fn set_name(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    /// Replaces the handle (e.g. a read-only one by a writable one).
    pub fn set_file(&mut self, file: File) {
        self.file = file;
    }

    pub fn capacity(&self) -> u64 {
        self.h.capacity
    }

    pub fn version(&self) -> u32 {
        self.h.version
    }

    pub fn grain_bytes(&self) -> u64 {
        self.h.grain * SECTOR
    }

    pub fn has_zero_grain(&self) -> bool {
        self.h.flags & FLAG_ZERO_GRAIN != 0
    }

    fn io(&self, op: &str) -> impl FnOnce(std::io::Error) -> ImageError {
        ImageError::io(&self.name, op.to_owned())
    }

    /// The embedded descriptor's text.
    pub fn descriptor(&self) -> Result<String, ImageError> {
        let mut raw = vec![0u8; (self.h.desc_size * SECTOR) as usize];
        self.file
            .read_exact_at(&mut raw, self.h.desc_offset * SECTOR)
            .map_err(self.io("read descriptor"))?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        raw.truncate(end);
        String::from_utf8(raw).map_err(|_| corrupt(&self.name, "descriptor is not UTF-8"))
    }

    /// Rewrites the embedded descriptor in place and syncs it. Only the
    /// bytes of the old and new text are written (zeroes past the new
    /// text), usually one sector.
    pub fn set_descriptor(&mut self, text: &str) -> Result<(), ImageError> {
        let room = self.h.desc_size * SECTOR;
        if text.len() as u64 >= room {
            return Err(unsupported(&self.name, "a descriptor this long"));
        }
        let old = self.descriptor()?.len();
        let mut raw = text.as_bytes().to_vec();
        raw.resize(raw.len().max(old), 0);
        self.file
            .write_all_at(&raw, self.h.desc_offset * SECTOR)
            .map_err(self.io("write descriptor"))?;
        self.file.sync_data().map_err(self.io("fsync"))
    }

    fn split(&self, grain: u64) -> (usize, usize) {
        let per = u64::from(self.h.gtes_per_gt);
        ((grain / per) as usize, (grain % per) as usize)
    }

    /// GT `index`, loaded if needed; `None` if the GD has no table for it.
    fn gt(&mut self, index: usize) -> Result<Option<&mut Vec<u32>>, ImageError> {
        if !self.gts.contains_key(&index) {
            if self.gd[index] == 0 {
                return Ok(None);
            }
            if self.gts.len() >= GT_CACHE_LIMIT {
                self.write_tables()?;
                self.gts.clear();
            }
            let table = self.read_gt(u64::from(self.gd[index]), index)?;
            self.gts.insert(index, table);
        }
        Ok(self.gts.get_mut(&index))
    }

    fn read_gt(&self, sector: u64, index: usize) -> Result<Vec<u32>, ImageError> {
        let mut raw = vec![0u8; self.h.gtes_per_gt as usize * 4];
        self.file
            .read_exact_at(&mut raw, sector * SECTOR)
            .map_err(self.io("read grain table"))?;
        let table: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        for (i, &e) in table.iter().enumerate() {
            let e = u64::from(e);
            let ok = match e {
                0 => true,
                1 => self.has_zero_grain(),
                _ => e >= self.h.overhead && e * SECTOR < self.file_len,
            };
            if !ok {
                return Err(corrupt(
                    &self.name,
                    format!("grain table {index} entry {i} points to sector {e}"),
                ));
            }
        }
        Ok(table)
    }

    pub fn lookup(&mut self, grain: u64) -> Result<Gte, ImageError> {
        let (t, i) = self.split(grain);
        Ok(match self.gt(t)?.map(|gt| gt[i]) {
            None | Some(0) => Gte::Unallocated,
            Some(1) if self.has_zero_grain() => Gte::Zero,
            Some(s) => Gte::At(u64::from(s)),
        })
    }

    /// The allocated and zeroed grains of GT `t` (for merging).
    pub fn table_entries(&mut self, t: usize) -> Result<Vec<(u64, Gte)>, ImageError> {
        let per = u64::from(self.h.gtes_per_gt);
        let zero = self.has_zero_grain();
        let Some(gt) = self.gt(t)? else {
            return Ok(Vec::new());
        };
        Ok(gt
            .iter()
            .enumerate()
            .filter(|&(_, &e)| e != 0)
            .map(|(i, &e)| {
                let g = t as u64 * per + i as u64;
                (
                    g,
                    if e == 1 && zero {
                        Gte::Zero
                    } else {
                        Gte::At(e.into())
                    },
                )
            })
            .collect())
    }

    pub fn tables(&self) -> usize {
        self.gd.len()
    }

    /// Points `grain` at `gte` (in memory until [`Sparse::flush`]).
    pub fn set(&mut self, grain: u64, gte: Gte) -> Result<(), ImageError> {
        let value = match gte {
            Gte::Unallocated => 0,
            Gte::Zero => {
                debug_assert!(self.has_zero_grain());
                1
            }
            Gte::At(s) => u32::try_from(s).expect("allocated below 2^32"),
        };
        let (t, i) = self.split(grain);
        if self.gd[t] == 0 {
            self.new_table(t)?;
        }
        self.gt(t)?.expect("table exists")[i] = value;
        self.dirty.insert(t);
        Ok(())
    }

    /// A GD entry without a table happens only in extents others wrote.
    fn new_table(&mut self, t: usize) -> Result<(), ImageError> {
        let sectors = self.h.gt_sectors().next_multiple_of(self.h.grain);
        let below_4g = |at: u64| u32::try_from(at).expect("reserved below 2^32");
        let primary = below_4g(self.reserve(sectors)?);
        let backup = match self.rgd.is_some() {
            true => Some(below_4g(self.reserve(sectors)?)),
            false => None,
        };
        self.gd[t] = primary;
        if let (Some(rgd), Some(b)) = (self.rgd.as_mut(), backup) {
            rgd[t] = b;
        }
        self.gd_dirty = true;
        self.gts.insert(t, vec![0; self.h.gtes_per_gt as usize]);
        Ok(())
    }

    fn reserve(&mut self, sectors: u64) -> Result<u64, ImageError> {
        let at = self.next_grain;
        if at + sectors > 1 << 32 {
            return Err(unsupported(
                &self.name,
                "more than 2 TiB of grains in one sparse extent",
            ));
        }
        self.next_grain = at + sectors;
        self.file_len = self.file_len.max(self.next_grain * SECTOR);
        Ok(at)
    }

    /// Room for one more grain at the end of the file; returns its sector.
    pub fn allocate(&mut self) -> Result<u64, ImageError> {
        self.reserve(self.h.grain)
    }

    /// Reads extent bytes at `sector * 512 + skip`; past the end of the
    /// file reads as zeroes.
    pub fn read_grain(&self, sector: u64, skip: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        read_full(&self.file, sector * SECTOR + skip, buf).map_err(self.io("read grain"))
    }

    pub fn write_grain(&self, sector: u64, skip: u64, data: &[u8]) -> Result<(), ImageError> {
        self.file
            .write_all_at(data, sector * SECTOR + skip)
            .map_err(self.io("write grain"))
    }

    /// Makes an allocated grain read as zeroes, freeing its blocks where the
    /// filesystem can.
    pub fn zero_grain(&self, sector: u64) -> Result<(), ImageError> {
        let (at, len) = (sector * SECTOR, self.grain_bytes());
        zero_range(&self.file, at, len).map_err(self.io("zero grain"))
    }

    /// GT changes reach the disk only after the grains they point to.
    fn write_tables(&mut self) -> Result<(), ImageError> {
        if self.dirty.is_empty() && !self.gd_dirty {
            return Ok(());
        }
        self.file.sync_data().map_err(self.io("fsync"))?;
        for &t in &self.dirty {
            let raw = table_bytes(&self.gts[&t]);
            let mut at = vec![self.gd[t]];
            at.extend(self.rgd.as_ref().map(|r| r[t]));
            for sector in at {
                self.file
                    .write_all_at(&raw, u64::from(sector) * SECTOR)
                    .map_err(self.io("write grain table"))?;
            }
        }
        self.dirty.clear();
        if self.gd_dirty {
            self.file.sync_data().map_err(self.io("fsync"))?;
            let mut dirs = vec![(self.h.gd_offset, &self.gd)];
            dirs.extend(self.rgd.as_ref().map(|r| (self.h.rgd_offset, r)));
            for (at, table) in dirs {
                self.file
                    .write_all_at(&table_bytes(table), at * SECTOR)
                    .map_err(self.io("write grain directory"))?;
            }
            self.gd_dirty = false;
        }
        Ok(())
    }

    /// Makes every grain and GTE written so far durable.
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.write_tables()?;
        self.file.sync_data().map_err(self.io("fsync"))
    }
}

/// `(redundant GD sector, GD sector)` and the first grain sector of a new
/// extent whose descriptor takes `desc_size` sectors.
fn layout(capacity: u64, desc_size: u64) -> ((u64, u64), u64) {
    let entries = capacity.div_ceil(GRAIN_SECTORS * u64::from(GTES_PER_GT));
    let gd_sectors = (entries * 4).div_ceil(SECTOR);
    let gt_sectors = (u64::from(GTES_PER_GT) * 4).div_ceil(SECTOR);
    let copy = gd_sectors + entries * gt_sectors;
    let rgd = 1 + desc_size;
    let gd = rgd + copy;
    ((rgd, gd), (gd + copy).next_multiple_of(GRAIN_SECTORS))
}

fn table_bytes(table: &[u32]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// `read_exact_at` that reads zeroes past the end of the file.
pub(super) fn read_full(file: &File, mut at: u64, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, at) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Zeroes `[at, at + len)` of `file`: a punched hole where the filesystem
/// can, written zeroes where it cannot.
pub(super) fn zero_range(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    match sysfs::punch_hole(file, at, len) {
        Err(e) if sysfs::is_unsupported(&e) => {}
        other => return other,
    }
    let chunk = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64);
        file.write_all_at(&chunk[..n as usize], at + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let ((rgd_offset, gd_offset), overhead) = layout(20480, DESC_SECTORS);
        Header {
            version: 2,
            flags: FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN,
            capacity: 20480,
            grain: GRAIN_SECTORS,
            desc_offset: 1,
            desc_size: DESC_SECTORS,
            gtes_per_gt: GTES_PER_GT,
            rgd_offset,
            gd_offset,
            overhead,
        }
    }

    #[test]
    fn layout_matches_qemu_img() {
        // `qemu-img create -f vmdk x.vmdk 10M`: rgd 21, gd 26, overHead 128.
        let h = header();
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 26, 128));
    }

    #[test]
    fn header_round_trips_and_checks() {
        let h = header();
        let len = h.overhead * SECTOR;
        assert_eq!(Header::decode(&h.encode(), len).unwrap(), h);
        let broken = |f: &dyn Fn(&mut [u8; 512])| {
            let mut b = h.encode();
            f(&mut b);
            Header::decode(&b, len).unwrap_err()
        };
        assert!(broken(&|b| b[0] = b'X').0);
        assert!(broken(&|b| b[4] = 4).0);
        assert!(broken(&|b| b[4] = 0).0);
        assert!(broken(&|b| b[20] = 100).0);
        assert!(broken(&|b| b[56..64].copy_from_slice(&1_000_000u64.to_le_bytes())).0);
        assert!(broken(&|b| b[75] = b'\n').0);
        assert!(
            !broken(&|b| b[10] = 1).0,
            "compressed is unsupported, not corrupt"
        );
        assert!(!broken(&|b| b[0..4].copy_from_slice(b"COWD")).0);
        assert!(Header::decode(&h.encode(), 10 * SECTOR).unwrap_err().0);
    }

    #[test]
    fn two_tib_does_not_fit_but_just_under_does() {
        assert!(!Sparse::fits(1 << 32));
        assert!(Sparse::fits((1 << 32) - (1 << 20)));
    }
}
