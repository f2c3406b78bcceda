//! One VHDX file as the writer handles it: open with validation, create,
//! read its own extents, write and zero payload, and persist metadata in an
//! order that leaves the file valid at every instant.
//!
//! Metadata is never updated through the VHDX log (the log stays empty,
//! LogGuid zero). Instead:
//! - New payload and sector bitmap blocks are appended past the end of the
//!   file, so they never overlap anything a crash could leave referenced.
//! - BAT entries and sector bitmaps are kept in memory and written by
//!   [`Image::flush`]: first the data (`fdatasync`), then the sector bitmaps
//!   and the BAT entries of sector bitmap blocks, sync, then the payload BAT
//!   entries, sync. A BAT entry therefore never points at data or bitmap bits
//!   that are not yet durable; each entry is 8 bytes inside one sector.
//! - Headers alternate between the two slots with increasing sequence
//!   numbers, each write followed by a flush, as the spec's update procedure
//!   says, and are written twice so both slots end up current.
//! - The parent locator is rewritten into free space of the metadata region
//!   and then switched to by rewriting its 32-byte table entry, which lies
//!   in one 512-byte sector.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::unix::fs::FileExt,
};

use super::format::{self as f, Geometry, Guid, Header, MetadataEntry, ParentLocator, MIB};
use crate::{image::ImageError, sys::fs as sysfs};

const FORMAT: &str = "vhdx";
const CREATOR: &str = concat!("ferry ", env!("CARGO_PKG_VERSION"));

pub(super) fn corrupt(file: &str, reason: impl Into<String>) -> ImageError {
    ImageError::corrupt(FORMAT, file, reason)
}

pub(super) fn unsupported(file: &str, what: impl Into<String>) -> ImageError {
    ImageError::unsupported(FORMAT, file, what)
}

/// Where a run of virtual bytes of this file comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Extent {
    /// Stored in this file at this offset.
    Data(u64),
    /// Not in this file: the parent holds it.
    Parent,
    /// Reads as zeroes.
    Zero,
}

/// What a new file looks like.
pub(super) struct NewImage {
    pub disk_size: u64,
    pub block_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub page83: Guid,
    pub parent: Option<ParentLocator>,
}

pub(super) struct Image {
    name: String,
    file: File,
    writable: bool,
    header: Header,
    /// Slot (0 or 1) of the current header.
    slot: usize,
    geo: Geometry,
    physical_sector: u32,
    page83: Guid,
    bat_offset: u64,
    bat: Vec<u64>,
    meta_offset: u64,
    meta_len: u64,
    meta_entries: Vec<MetadataEntry>,
    parent: Option<ParentLocator>,
    /// Where the next block goes: past everything, 1 MiB aligned.
    next_free: u64,
    /// Sector bitmap bytes of payload blocks, loaded on demand.
    bitmaps: HashMap<u64, Vec<u8>>,
    dirty_bat: BTreeSet<usize>,
    dirty_bitmaps: BTreeSet<u64>,
    /// Whether this session has updated the headers (new FileWriteGuid).
    session_open: bool,
    /// Whether this session has given the file a new DataWriteGuid.
    data_guid_fresh: bool,
}

// Layout of the files this module creates.
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
const ITEMS_AT: u32 = 64 * 1024;
const LOCATOR_AT: u32 = 68 * 1024;
/// Cached sector bitmaps kept past a flush (512 bytes each with 2 MiB
/// blocks).
const BITMAP_CACHE_BLOCKS: usize = 1 << 16;

impl Image {
    /// Writes a new VHDX into `file` (empty) and opens it for writing.
    pub fn create(file: File, name: &str, p: &NewImage) -> Result<Image, ImageError> {
        let geo = Geometry {
            disk_size: p.disk_size,
            block_size: p.block_size,
            logical_sector: u64::from(p.logical_sector),
            has_parent: p.parent.is_some(),
        };
        // Room for the differencing layout too, so the table never has to grow.
        let with_bitmaps = Geometry {
            has_parent: true,
            ..geo
        };
        let bat_len = (with_bitmaps.bat_entries() * 8)
            .next_multiple_of(MIB)
            .max(MIB);
        let w = |buf: &[u8], at: u64| {
            file.write_all_at(buf, at)
                .map_err(ImageError::io(name, format!("write at {at}")))
        };

        w(&f::file_identifier(CREATOR), 0)?;
        let mut header = Header {
            sequence: 1,
            file_write_guid: f::random_guid(),
            data_write_guid: f::random_guid(),
            log_guid: f::ZERO_GUID,
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH as u32,
            log_offset: LOG_OFFSET,
        };
        w(&header.encode(), f::HEADER_OFFSETS[0])?;
        header.sequence = 2;
        w(&header.encode(), f::HEADER_OFFSETS[1])?;

        let regions = f::encode_region_table(&[
            f::RegionEntry {
                guid: f::BAT_REGION,
                offset: BAT_OFFSET,
                length: bat_len as u32,
                required: true,
            },
            f::RegionEntry {
                guid: f::METADATA_REGION,
                offset: METADATA_OFFSET,
                length: METADATA_LENGTH as u32,
                required: true,
            },
        ]);
        w(&regions, f::REGION_TABLE_OFFSETS[0])?;
        w(&regions, f::REGION_TABLE_OFFSETS[1])?;

        let mut params = (p.block_size as u32).to_le_bytes().to_vec();
        let flags = if p.parent.is_some() {
            f::PARAM_HAS_PARENT
        } else {
            0
        };
        params.extend_from_slice(&flags.to_le_bytes());
        let vd = f::META_IS_VIRTUAL_DISK | f::META_IS_REQUIRED;
        let mut items: Vec<(Guid, Vec<u8>, u32, u32)> = vec![
            (f::FILE_PARAMETERS, params, ITEMS_AT, f::META_IS_REQUIRED),
            (
                f::VIRTUAL_DISK_SIZE,
                p.disk_size.to_le_bytes().to_vec(),
                ITEMS_AT + 8,
                vd,
            ),
            (f::PAGE83_DATA, p.page83.to_vec(), ITEMS_AT + 16, vd),
            (
                f::LOGICAL_SECTOR_SIZE,
                p.logical_sector.to_le_bytes().to_vec(),
                ITEMS_AT + 32,
                vd,
            ),
            (
                f::PHYSICAL_SECTOR_SIZE,
                p.physical_sector.to_le_bytes().to_vec(),
                ITEMS_AT + 36,
                vd,
            ),
        ];
        if let Some(loc) = &p.parent {
            items.push((
                f::PARENT_LOCATOR,
                loc.encode(),
                LOCATOR_AT,
                f::META_IS_REQUIRED,
            ));
        }
        let entries: Vec<MetadataEntry> = items
            .iter()
            .map(|(item, data, offset, flags)| MetadataEntry {
                item: *item,
                offset: *offset,
                length: data.len() as u32,
                flags: *flags,
            })
            .collect();
        w(&f::encode_metadata_table(&entries), METADATA_OFFSET)?;
        for (_, data, offset, _) in &items {
            w(data, METADATA_OFFSET + u64::from(*offset))?;
        }
        // The log and the BAT start out as zeroes: an empty log, and every
        // block NOT_PRESENT.
        file.set_len(BAT_OFFSET + bat_len)
            .map_err(ImageError::io(name, "extend"))?;
        file.sync_all().map_err(ImageError::io(name, "fsync"))?;
        Image::open(file, name, true, true)
    }

    /// Opens and validates a VHDX file. `load_bat: false` reads only the
    /// headers and metadata (enough to learn the parent), for a quick look.
    pub fn open(
        file: File,
        name: &str,
        writable: bool,
        load_bat: bool,
    ) -> Result<Image, ImageError> {
        let file_len = file.metadata().map_err(ImageError::io(name, "stat"))?.len();
        if file_len < f::HEADER_SECTION {
            return Err(corrupt(name, "shorter than the 1 MiB header section"));
        }
        let mut head = vec![0u8; f::HEADER_SECTION as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(ImageError::io(name, "read the header section"))?;
        if &head[..8] != f::FILE_SIGNATURE {
            return Err(corrupt(name, "no \"vhdxfile\" signature"));
        }
        let h_at = |i: usize| {
            let at = f::HEADER_OFFSETS[i] as usize;
            &head[at..at + f::HEADER_SIZE]
        };
        let (slot, header) = f::current_header([h_at(0), h_at(1)]).map_err(|r| corrupt(name, r))?;
        if header.version != 1 {
            return Err(unsupported(
                name,
                format!("header version {}", header.version),
            ));
        }
        if header.log_guid != f::ZERO_GUID {
            return Err(unsupported(
                name,
                "log replay (the log is not empty: its last writer did not finish)",
            ));
        }
        if header.log_version != 0 {
            return Err(unsupported(
                name,
                format!("log version {}", header.log_version),
            ));
        }

        // Reserved ranges of the file, to check for overlaps.
        let mut reserved: Vec<(u64, u64, String)> =
            vec![(0, f::HEADER_SECTION, "the header section".into())];
        if header.log_length != 0 {
            let (off, len) = (header.log_offset, u64::from(header.log_length));
            if off % MIB != 0 || len % MIB != 0 || off < MIB {
                return Err(corrupt(name, "the log is not 1 MiB aligned"));
            }
            reserved.push((off, off + len, "the log".into()));
        }

        let table = f::REGION_TABLE_OFFSETS
            .iter()
            .find_map(|&at| f::decode_region_table(&head[at as usize..]))
            .ok_or_else(|| {
                corrupt(
                    name,
                    "neither region table has a valid signature and checksum",
                )
            })?
            .map_err(|r| corrupt(name, r))?;
        let (mut bat_region, mut meta_region) = (None, None);
        for e in &table {
            let (off, len) = (e.offset, u64::from(e.length));
            if off < MIB || off % MIB != 0 || len % MIB != 0 || len == 0 {
                return Err(corrupt(name, "a region is not 1 MiB aligned"));
            }
            if off + len > file_len {
                return Err(corrupt(name, "a region extends past the end of the file"));
            }
            let slot = if e.guid == f::BAT_REGION {
                &mut bat_region
            } else if e.guid == f::METADATA_REGION {
                &mut meta_region
            } else if e.required {
                return Err(unsupported(
                    name,
                    format!("required region {}", f::guid_string(&e.guid)),
                ));
            } else {
                reserved.push((off, off + len, "an unknown region".into()));
                continue;
            };
            if slot.replace((off, len)).is_some() {
                return Err(corrupt(name, "a region appears twice in the region table"));
            }
        }
        let (bat_offset, bat_len) = bat_region.ok_or_else(|| corrupt(name, "no BAT region"))?;
        let (meta_offset, meta_len) =
            meta_region.ok_or_else(|| corrupt(name, "no metadata region"))?;
        reserved.push((bat_offset, bat_offset + bat_len, "the BAT".into()));
        reserved.push((
            meta_offset,
            meta_offset + meta_len,
            "the metadata region".into(),
        ));
        reserved.sort();
        for w in reserved.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(corrupt(name, format!("{} overlaps {}", w[0].2, w[1].2)));
            }
        }

        let mut table_buf = vec![0u8; f::METADATA_TABLE_SIZE];
        file.read_exact_at(&mut table_buf, meta_offset)
            .map_err(ImageError::io(name, "read the metadata table"))?;
        let meta_entries = f::decode_metadata_table(&table_buf).map_err(|r| corrupt(name, r))?;
        let mut spans = Vec::new();
        for (i, e) in meta_entries.iter().enumerate() {
            if meta_entries[..i]
                .iter()
                .any(|o| o.item == e.item && o.is_user() == e.is_user())
            {
                return Err(corrupt(name, "a metadata item appears twice"));
            }
            if e.length == 0 {
                if e.offset != 0 {
                    return Err(corrupt(name, "an empty metadata item has an offset"));
                }
                continue;
            }
            let (off, len) = (u64::from(e.offset), u64::from(e.length));
            if off < f::METADATA_TABLE_SIZE as u64 || len > MIB || off + len > meta_len {
                return Err(corrupt(
                    name,
                    "a metadata item lies outside the metadata region",
                ));
            }
            spans.push((off, off + len));
        }
        spans.sort();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(corrupt(name, "metadata items overlap"));
        }
        let known = [
            f::FILE_PARAMETERS,
            f::VIRTUAL_DISK_SIZE,
            f::PAGE83_DATA,
            f::LOGICAL_SECTOR_SIZE,
            f::PHYSICAL_SECTOR_SIZE,
            f::PARENT_LOCATOR,
        ];
        if let Some(e) = meta_entries
            .iter()
            .find(|e| e.is_required() && (e.is_user() || !known.contains(&e.item)))
        {
            return Err(unsupported(
                name,
                format!("required metadata item {}", f::guid_string(&e.item)),
            ));
        }
        let item =
            |id: Guid, what: &str, len: Option<usize>| -> Result<Option<Vec<u8>>, ImageError> {
                let Some(e) = meta_entries.iter().find(|e| e.item == id && !e.is_user()) else {
                    return Ok(None);
                };
                if len.is_some_and(|l| l != e.length as usize) {
                    return Err(corrupt(
                        name,
                        format!("the {what} item has the wrong length"),
                    ));
                }
                let mut b = vec![0u8; e.length as usize];
                file.read_exact_at(&mut b, meta_offset + u64::from(e.offset))
                    .map_err(ImageError::io(name, format!("read the {what} item")))?;
                Ok(Some(b))
            };
        let need = |id: Guid, what: &str, len: usize| -> Result<Vec<u8>, ImageError> {
            item(id, what, Some(len))?
                .ok_or_else(|| corrupt(name, format!("the {what} metadata item is missing")))
        };
        let params = need(f::FILE_PARAMETERS, "file parameters", 8)?;
        let block_size = u64::from(f::le32(&params, 0));
        let param_flags = f::le32(&params, 4);
        let disk_size = f::le64(&need(f::VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
        let page83 = f::guid_at(&need(f::PAGE83_DATA, "page 83 data", 16)?, 0);
        let logical_sector = f::le32(&need(f::LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0);
        let physical_sector = f::le32(
            &need(f::PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?,
            0,
        );
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(corrupt(name, format!("block size {block_size}")));
        }
        if ![512, 4096].contains(&logical_sector) || ![512, 4096].contains(&physical_sector) {
            return Err(corrupt(name, "sector sizes must be 512 or 4096"));
        }
        if disk_size == 0
            || !disk_size.is_multiple_of(u64::from(logical_sector))
            || disk_size > f::MAX_DISK_SIZE
        {
            return Err(corrupt(name, format!("virtual disk size {disk_size}")));
        }
        let has_parent = param_flags & f::PARAM_HAS_PARENT != 0;
        let parent = if has_parent {
            let raw = item(f::PARENT_LOCATOR, "parent locator", None)?
                .ok_or_else(|| corrupt(name, "differencing file without a parent locator"))?;
            let loc = f::ParentLocator::decode(&raw)
                .map_err(|r| corrupt(name, r))?
                .ok_or_else(|| unsupported(name, "a parent that is not a VHDX file"))?;
            if loc.linkages().is_empty() {
                return Err(corrupt(name, "the parent locator has no parent_linkage"));
            }
            Some(loc)
        } else {
            None
        };
        let geo = Geometry {
            disk_size,
            block_size,
            logical_sector: u64::from(logical_sector),
            has_parent,
        };
        let entries = geo.bat_entries();
        if entries * 8 > bat_len {
            return Err(corrupt(name, "the BAT region is too small for the disk"));
        }
        let next_free = reserved
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
            .max(file_len)
            .next_multiple_of(MIB);

        let mut img = Image {
            name: name.to_owned(),
            file,
            writable,
            header,
            slot,
            geo,
            physical_sector,
            page83,
            bat_offset,
            bat: Vec::new(),
            meta_offset,
            meta_len,
            meta_entries,
            parent,
            next_free,
            bitmaps: HashMap::new(),
            dirty_bat: BTreeSet::new(),
            dirty_bitmaps: BTreeSet::new(),
            session_open: false,
            data_guid_fresh: false,
        };
        if load_bat {
            img.load_bat(entries, file_len, &reserved)?;
        }
        Ok(img)
    }

    fn load_bat(
        &mut self,
        entries: u64,
        file_len: u64,
        reserved: &[(u64, u64, String)],
    ) -> Result<(), ImageError> {
        let name = self.name.clone();
        let mut raw = vec![0u8; (entries * 8) as usize];
        self.file
            .read_exact_at(&mut raw, self.bat_offset)
            .map_err(ImageError::io(&name, "read the BAT"))?;
        self.bat = raw.chunks_exact(8).map(|c| f::le64(c, 0)).collect();
        let geo = self.geo;
        let mut used: Vec<(u64, u64)> = Vec::new();
        let mut check = |i: usize, off: u64, len: u64| -> Result<(), ImageError> {
            if off < f::HEADER_SECTION || off + len > file_len {
                return Err(corrupt(
                    &name,
                    format!("BAT entry {i} points outside the file"),
                ));
            }
            if let Some(r) = reserved.iter().find(|r| off < r.1 && r.0 < off + len) {
                return Err(corrupt(&name, format!("BAT entry {i} overlaps {}", r.2)));
            }
            used.push((off, off + len));
            Ok(())
        };
        for block in 0..geo.payload_blocks() {
            let i = geo.payload_index(block);
            let e = self.bat[i];
            match f::bat_state(e) {
                f::PAYLOAD_NOT_PRESENT
                | f::PAYLOAD_UNDEFINED
                | f::PAYLOAD_ZERO
                | f::PAYLOAD_UNMAPPED => {}
                f::PAYLOAD_FULLY_PRESENT => check(i, f::bat_offset(e), geo.block_size)?,
                f::PAYLOAD_PARTIALLY_PRESENT if geo.has_parent => {
                    check(i, f::bat_offset(e), geo.block_size)?;
                    let sb = self
                        .bat
                        .get(geo.bitmap_index(block / geo.chunk_ratio()))
                        .copied()
                        .unwrap_or(0);
                    if f::bat_state(sb) != f::SB_PRESENT {
                        return Err(corrupt(
                            &name,
                            format!("block {block} is partially present without a sector bitmap"),
                        ));
                    }
                }
                s => {
                    return Err(corrupt(
                        &name,
                        format!("BAT entry {i} has state {s}, invalid here"),
                    ))
                }
            }
        }
        for chunk in 0..geo.bitmap_blocks() {
            let i = geo.bitmap_index(chunk);
            let Some(&e) = self.bat.get(i) else { continue };
            match f::bat_state(e) {
                f::SB_NOT_PRESENT => {}
                f::SB_PRESENT if geo.has_parent => {
                    check(i, f::bat_offset(e), f::SECTOR_BITMAP_BLOCK)?
                }
                s => {
                    return Err(corrupt(
                        &name,
                        format!("BAT entry {i} has state {s}, invalid here"),
                    ))
                }
            }
        }
        used.sort();
        if used.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(corrupt(&name, "two BAT entries share file space"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn disk_size(&self) -> u64 {
        self.geo.disk_size
    }

    pub fn has_parent(&self) -> bool {
        self.geo.has_parent
    }

    pub fn physical_sector(&self) -> u32 {
        self.physical_sector
    }

    pub fn page83(&self) -> Guid {
        self.page83
    }

    pub fn data_write_guid(&self) -> Guid {
        self.header.data_write_guid
    }

    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.parent.as_ref()
    }

    /// The parent's file name, which must be in the same directory.
    pub fn parent_name(&self) -> Result<Option<String>, ImageError> {
        let Some(loc) = &self.parent else {
            return Ok(None);
        };
        let Some(path) = loc.get("relative_path") else {
            return Err(unsupported(
                &self.name,
                "a parent located only by an absolute or volume path",
            ));
        };
        let p = path
            .strip_prefix(".\\")
            .or_else(|| path.strip_prefix("./"))
            .unwrap_or(path);
        if p.is_empty() || p.contains(['\\', '/']) || p == "." || p == ".." {
            return Err(unsupported(
                &self.name,
                format!("a parent outside the image's directory ({path})"),
            ));
        }
        Ok(Some(p.to_owned()))
    }

    fn pread(&self, at: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, at).map_err(ImageError::io(
            &self.name,
            format!("read {} bytes at {at}", buf.len()),
        ))
    }

    fn pwrite(&self, at: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.file.write_all_at(buf, at).map_err(ImageError::io(
            &self.name,
            format!("write {} bytes at {at}", buf.len()),
        ))
    }

    fn sync(&self) -> Result<(), ImageError> {
        self.file
            .sync_data()
            .map_err(ImageError::io(&self.name, "fdatasync"))
    }

    /// Writes the header twice, to the non-current slot first, each time
    /// with the next sequence number and a flush.
    fn update_header(&mut self, change: impl FnOnce(&mut Header)) -> Result<(), ImageError> {
        let mut h = self.header.clone();
        change(&mut h);
        for _ in 0..2 {
            h.sequence = self.header.sequence + 1;
            let slot = 1 - self.slot;
            self.pwrite(f::HEADER_OFFSETS[slot], &h.encode())?;
            self.sync()?;
            self.header = h.clone();
            self.slot = slot;
        }
        Ok(())
    }

    /// Must precede any modification: the first one in a session gets a new
    /// FileWriteGuid; `user_data` also gets a new DataWriteGuid (once per
    /// session), since the virtual disk's content is about to change.
    pub fn begin_session(&mut self, user_data: bool) -> Result<(), ImageError> {
        if !self.writable {
            return Err(ImageError::Io {
                file: self.name.clone(),
                op: "modify a file opened read-only".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        let new_file_guid = !self.session_open;
        let new_data_guid = user_data && !self.data_guid_fresh;
        if new_file_guid || new_data_guid {
            self.update_header(|h| {
                if new_file_guid {
                    h.file_write_guid = f::random_guid();
                }
                if new_data_guid {
                    h.data_write_guid = f::random_guid();
                }
            })?;
        }
        self.session_open = true;
        self.data_guid_fresh |= new_data_guid;
        Ok(())
    }

    /// Gives the file the identity a merged child had, so the child's
    /// children accept it as their parent.
    pub fn set_data_write_guid(&mut self, guid: Guid) -> Result<(), ImageError> {
        self.begin_session(false)?;
        self.update_header(|h| h.data_write_guid = guid)?;
        self.data_guid_fresh = false;
        Ok(())
    }

    /// Points the file at another parent: the new locator goes into free
    /// space of the metadata region, then the table entry switches to it.
    pub fn set_parent_locator(&mut self, loc: &ParentLocator) -> Result<(), ImageError> {
        let idx = self
            .meta_entries
            .iter()
            .position(|e| e.item == f::PARENT_LOCATOR && !e.is_user())
            .ok_or_else(|| corrupt(&self.name, "no parent locator to replace"))?;
        let bytes = loc.encode();
        let at = self.free_metadata_space(bytes.len() as u64)?;
        self.begin_session(false)?;
        self.pwrite(self.meta_offset + at, &bytes)?;
        self.sync()?;
        let mut entry = self.meta_entries[idx].clone();
        entry.offset = at as u32;
        entry.length = bytes.len() as u32;
        self.pwrite(
            self.meta_offset + f::metadata_entry_at(idx) as u64,
            &f::encode_metadata_entry(&entry),
        )?;
        self.sync()?;
        self.meta_entries[idx] = entry;
        self.parent = Some(loc.clone());
        Ok(())
    }

    /// The lowest 512-aligned gap of `len` bytes among the metadata items.
    fn free_metadata_space(&self, len: u64) -> Result<u64, ImageError> {
        let mut spans: Vec<(u64, u64)> = self
            .meta_entries
            .iter()
            .filter(|e| e.length > 0)
            .map(|e| {
                (
                    u64::from(e.offset),
                    u64::from(e.offset) + u64::from(e.length),
                )
            })
            .collect();
        spans.sort();
        let mut at = f::METADATA_TABLE_SIZE as u64;
        for (start, end) in spans {
            if at + len <= start {
                break;
            }
            at = at.max(end.next_multiple_of(512));
        }
        if at + len > self.meta_len.min(u64::from(u32::MAX)) {
            return Err(unsupported(&self.name, "a full metadata region"));
        }
        Ok(at)
    }

    /// Where the bytes at virtual `offset` come from, and for how many bytes
    /// (at most `max`, never past the end of the block) that holds.
    pub fn extent_at(&mut self, offset: u64, max: u64) -> Result<(u64, Extent), ImageError> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let in_block = offset % bs;
        let avail = max.min(bs - in_block);
        let e = self.bat[self.geo.payload_index(block)];
        Ok(match f::bat_state(e) {
            f::PAYLOAD_FULLY_PRESENT => (avail, Extent::Data(f::bat_offset(e) + in_block)),
            f::PAYLOAD_PARTIALLY_PRESENT => {
                let lss = self.geo.logical_sector;
                let end = in_block + avail;
                let bits = self.bitmap(block)?;
                let first = in_block / lss;
                let present = bit(bits, first);
                let mut s = first + 1;
                while s * lss < end && bit(bits, s) == present {
                    s += 1;
                }
                let len = (s * lss).min(end) - in_block;
                if present {
                    (len, Extent::Data(f::bat_offset(e) + in_block))
                } else {
                    (len, Extent::Parent)
                }
            }
            f::PAYLOAD_NOT_PRESENT if self.geo.has_parent => (avail, Extent::Parent),
            // NOT_PRESENT without a parent, ZERO, UNDEFINED, UNMAPPED: this
            // implementation reads all of them as zeroes.
            _ => (avail, Extent::Zero),
        })
    }

    /// Reads bytes of this file only (no parent): `Parent` extents are an
    /// error, the caller asked for data it knows is here.
    pub fn read_own(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let mut pos = 0;
        while pos < buf.len() {
            let (len, ext) = self.extent_at(offset + pos as u64, (buf.len() - pos) as u64)?;
            let piece = &mut buf[pos..pos + len as usize];
            match ext {
                Extent::Data(at) => self.pread(at, piece)?,
                Extent::Zero => piece.fill(0),
                Extent::Parent => {
                    return Err(corrupt(
                        &self.name,
                        "read of a range the file does not hold",
                    ))
                }
            }
            pos += len as usize;
        }
        Ok(())
    }

    /// The ranges block `block` defines in this file, as (offset, length,
    /// is_data); ranges left to the parent are omitted, zero ranges have
    /// `is_data` false.
    pub fn block_runs(&mut self, block: u64) -> Result<Vec<(u64, u64, bool)>, ImageError> {
        let start = block * self.geo.block_size;
        let end = (start + self.geo.block_size).min(self.geo.disk_size);
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let (len, ext) = self.extent_at(at, end - at)?;
            match ext {
                Extent::Data(_) => runs.push((at, len, true)),
                Extent::Zero => runs.push((at, len, false)),
                Extent::Parent => {}
            }
            at += len;
        }
        Ok(runs)
    }

    fn bitmap(&mut self, block: u64) -> Result<&mut Vec<u8>, ImageError> {
        if !self.bitmaps.contains_key(&block) {
            let per_block = self.geo.bitmap_bytes_per_block();
            let mut bits = vec![0u8; per_block as usize];
            let cr = self.geo.chunk_ratio();
            let sb = self.bat[self.geo.bitmap_index(block / cr)];
            if f::bat_state(sb) == f::SB_PRESENT {
                self.pread(f::bat_offset(sb) + (block % cr) * per_block, &mut bits)?;
            }
            self.bitmaps.insert(block, bits);
        }
        Ok(self.bitmaps.get_mut(&block).expect("just inserted"))
    }

    fn set_bat(&mut self, index: usize, entry: u64) {
        self.bat[index] = entry;
        self.dirty_bat.insert(index);
    }

    /// Appends `len` bytes (rounded up to 1 MiB) of zeroes to the file.
    fn allocate(&mut self, len: u64) -> Result<u64, ImageError> {
        let at = self.next_free;
        self.next_free += len.next_multiple_of(MIB);
        self.file
            .set_len(self.next_free)
            .map_err(ImageError::io(&self.name, "extend"))?;
        Ok(at)
    }

    /// Marks sectors `[first, first + count)` of `block` as present in this
    /// file; a block whose sectors are now all present becomes fully present.
    fn set_present(&mut self, block: u64, first: u64, count: u64) -> Result<(), ImageError> {
        let bits = self.bitmap(block)?;
        for s in first..first + count {
            bits[(s / 8) as usize] |= 1 << (s % 8);
        }
        let full = bits.iter().all(|&b| b == 0xFF);
        self.dirty_bitmaps.insert(block);
        let i = self.geo.payload_index(block);
        if full && f::bat_state(self.bat[i]) == f::PAYLOAD_PARTIALLY_PRESENT {
            self.set_bat(
                i,
                f::bat_entry(f::PAYLOAD_FULLY_PRESENT, f::bat_offset(self.bat[i])),
            );
        }
        Ok(())
    }

    /// Gives `block` file space. A differencing block that only gets part of
    /// its sectors becomes partially present (with every bit clear: stale
    /// bits from a crashed allocation must not show); anything else becomes
    /// fully present, the fresh space reading as zeroes.
    fn allocate_block(&mut self, block: u64, whole: bool) -> Result<u64, ImageError> {
        let i = self.geo.payload_index(block);
        let parent_backed =
            self.geo.has_parent && f::bat_state(self.bat[i]) == f::PAYLOAD_NOT_PRESENT;
        if parent_backed && !whole {
            let chunk = block / self.geo.chunk_ratio();
            let sbi = self.geo.bitmap_index(chunk);
            if f::bat_state(self.bat[sbi]) != f::SB_PRESENT {
                let at = self.allocate(f::SECTOR_BITMAP_BLOCK)?;
                // Blocks of this chunk cached as "no bitmap" were all zero,
                // which is what the fresh bitmap block holds.
                self.set_bat(sbi, f::bat_entry(f::SB_PRESENT, at));
            }
            let at = self.allocate(self.geo.block_size)?;
            let per_block = self.geo.bitmap_bytes_per_block() as usize;
            self.bitmaps.insert(block, vec![0u8; per_block]);
            self.dirty_bitmaps.insert(block);
            self.set_bat(i, f::bat_entry(f::PAYLOAD_PARTIALLY_PRESENT, at));
            Ok(at)
        } else {
            let at = self.allocate(self.geo.block_size)?;
            self.set_bat(i, f::bat_entry(f::PAYLOAD_FULLY_PRESENT, at));
            Ok(at)
        }
    }

    /// Writes virtual bytes into this file. In a differencing file the range
    /// must be whole logical sectors (the caller fills partial sectors from
    /// the chain first).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        debug_assert!(self.session_open);
        let lss = self.geo.logical_sector;
        if self.geo.has_parent
            && (!offset.is_multiple_of(lss) || !(data.len() as u64).is_multiple_of(lss))
        {
            return Err(corrupt(
                &self.name,
                "unaligned write into a differencing file",
            ));
        }
        let bs = self.geo.block_size;
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let block = off / bs;
            let in_block = off % bs;
            let len = ((bs - in_block) as usize).min(data.len() - pos);
            // The last block may end with the disk, before the block does.
            let whole =
                in_block == 0 && (len as u64 == bs || off + len as u64 == self.geo.disk_size);
            let i = self.geo.payload_index(block);
            let base = match f::bat_state(self.bat[i]) {
                f::PAYLOAD_FULLY_PRESENT | f::PAYLOAD_PARTIALLY_PRESENT => {
                    f::bat_offset(self.bat[i])
                }
                _ => self.allocate_block(block, whole)?,
            };
            self.pwrite(base + in_block, &data[pos..pos + len])?;
            if f::bat_state(self.bat[i]) == f::PAYLOAD_PARTIALLY_PRESENT {
                self.set_present(block, in_block / lss, len as u64 / lss)?;
            }
            pos += len;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)`, inside one block, read as zeroes in
    /// this file, punching holes where the data was stored.
    /// `below_has_data`: whether the parent chain may hold non-zero data
    /// there (if not, an absent range needs nothing).
    pub fn zero(&mut self, offset: u64, len: u64, below_has_data: bool) -> Result<(), ImageError> {
        debug_assert!(self.session_open);
        let bs = self.geo.block_size;
        let lss = self.geo.logical_sector;
        let block = offset / bs;
        let in_block = offset % bs;
        debug_assert!(in_block + len <= bs);
        let i = self.geo.payload_index(block);
        match f::bat_state(self.bat[i]) {
            f::PAYLOAD_FULLY_PRESENT => {
                self.zero_file_range(f::bat_offset(self.bat[i]) + in_block, len)
            }
            f::PAYLOAD_PARTIALLY_PRESENT => {
                self.zero_file_range(f::bat_offset(self.bat[i]) + in_block, len)?;
                self.set_present(block, in_block / lss, len / lss)
            }
            f::PAYLOAD_NOT_PRESENT if self.geo.has_parent && below_has_data => {
                let whole = in_block == 0 && (len == bs || offset + len == self.geo.disk_size);
                self.allocate_block(block, whole)?;
                if f::bat_state(self.bat[i]) == f::PAYLOAD_PARTIALLY_PRESENT {
                    self.set_present(block, in_block / lss, len / lss)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn zero_file_range(&self, at: u64, len: u64) -> Result<(), ImageError> {
        match sysfs::punch_hole(&self.file, at, len) {
            Ok(()) => Ok(()),
            Err(e) if sysfs::is_unsupported(&e) => {
                let zeros = vec![0u8; len.min(MIB) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    self.pwrite(at + done, &zeros[..n as usize])?;
                    done += n;
                }
                Ok(())
            }
            Err(e) => Err(ImageError::Io {
                file: self.name.clone(),
                op: format!("punch a hole of {len} bytes at {at}"),
                source: e,
            }),
        }
    }

    /// Makes everything written durable, in the order the module docs give.
    pub fn flush(&mut self) -> Result<(), ImageError> {
        if !self.writable || !self.session_open {
            return Ok(());
        }
        self.sync()?;
        if self.dirty_bat.is_empty() && self.dirty_bitmaps.is_empty() {
            return Ok(());
        }
        let cr = self.geo.chunk_ratio();
        let is_bitmap_entry = |i: usize| i as u64 % (cr + 1) == cr;
        let per_block = self.geo.bitmap_bytes_per_block();
        for &block in &self.dirty_bitmaps {
            let sb = self.bat[self.geo.bitmap_index(block / cr)];
            debug_assert_eq!(f::bat_state(sb), f::SB_PRESENT);
            let at = f::bat_offset(sb) + (block % cr) * per_block;
            self.pwrite(at, &self.bitmaps[&block])?;
        }
        let (bitmap_entries, payload_entries): (Vec<usize>, Vec<usize>) =
            self.dirty_bat.iter().partition(|&&i| is_bitmap_entry(i));
        self.write_bat_entries(&bitmap_entries)?;
        self.sync()?;
        self.write_bat_entries(&payload_entries)?;
        self.sync()?;
        self.dirty_bat.clear();
        self.dirty_bitmaps.clear();
        // Every cached bitmap is clean now; keep the cache from growing
        // with the number of partially present blocks ever touched.
        if self.bitmaps.len() > BITMAP_CACHE_BLOCKS {
            self.bitmaps.clear();
        }
        Ok(())
    }

    /// Writes BAT entries, coalescing runs of neighbours into one write.
    fn write_bat_entries(&self, sorted: &[usize]) -> Result<(), ImageError> {
        let mut k = 0;
        while k < sorted.len() {
            let first = sorted[k];
            let mut last = first;
            while k + 1 < sorted.len() && sorted[k + 1] == last + 1 {
                k += 1;
                last = sorted[k];
            }
            let bytes: Vec<u8> = self.bat[first..=last]
                .iter()
                .flat_map(|e| e.to_le_bytes())
                .collect();
            self.pwrite(self.bat_offset + first as u64 * 8, &bytes)?;
            k += 1;
        }
        Ok(())
    }
}

fn bit(bits: &[u8], sector: u64) -> bool {
    bits[(sector / 8) as usize] & (1 << (sector % 8)) != 0
}
