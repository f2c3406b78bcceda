//! The on-disk structures of [MS-VHDX] as the writer sees them: layout
//! constants, GUIDs, CRC-32C, and encoders/decoders for the headers, the
//! region table, the metadata table and items, the parent locator and BAT
//! entries.
//!
//! Every integer is little-endian. GUIDs are kept as their 16 on-disk bytes
//! (Microsoft's mixed-endian form: the first three fields little-endian).
//! The decoders here check shape (signatures, checksums, bounds) and return
//! a reason string; the caller decides whether that makes the file corrupt.
//!
//! [MS-VHDX]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx/

use uuid::Uuid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// The header section: file type identifier, two headers, two region tables.
pub const HEADER_SECTION: u64 = MIB;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const MAX_REGION_ENTRIES: usize = 2047;
/// The metadata table sits at the start of the metadata region; items
/// follow it, at 64 KiB or later.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
pub const MAX_METADATA_ENTRIES: usize = 2047;
/// Sector bitmap blocks are always 1 MiB: 2^23 bits, one per logical sector.
pub const SECTOR_BITMAP_BLOCK: u64 = MIB;
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// The largest virtual disk the format allows (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 * 1024 * 1024 * MIB;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

/// A GUID in its on-disk byte order, from its textual fields.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub type Guid = [u8; 16];
pub const ZERO_GUID: Guid = [0; 16];

// Regions.
pub const BAT_REGION: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub const METADATA_REGION: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

// Metadata items.
pub const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub const PAGE83_DATA: Guid = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub const PARENT_LOCATOR: Guid = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The locator type of a VHDX parent, the only one the spec defines.
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Metadata entry flag bits.
pub const META_IS_USER: u32 = 1;
pub const META_IS_VIRTUAL_DISK: u32 = 2;
pub const META_IS_REQUIRED: u32 = 4;

/// File Parameters flag bits.
pub const PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub const PARAM_HAS_PARENT: u32 = 2;

// BAT entry states. Payload blocks:
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
// Sector bitmap blocks:
pub const SB_NOT_PRESENT: u64 = 0;
pub const SB_PRESENT: u64 = 6;

const BAT_STATE_MASK: u64 = 0x7;
/// FileOffsetMB occupies bits 20..64, so masking off the low 20 bits gives
/// the offset in bytes directly.
const BAT_OFFSET_MASK: u64 = !(MIB - 1);

pub fn bat_state(entry: u64) -> u64 {
    entry & BAT_STATE_MASK
}

pub fn bat_offset(entry: u64) -> u64 {
    entry & BAT_OFFSET_MASK
}

/// A BAT entry; the offset must be 1 MiB aligned (0 for the states where
/// FileOffsetMB is reserved: Hyper-V refuses anything else).
pub fn bat_entry(state: u64, offset: u64) -> u64 {
    debug_assert_eq!(offset % MIB, 0);
    (offset & BAT_OFFSET_MASK) | (state & BAT_STATE_MASK)
}

// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as the spec's
// appendix and iSCSI use it: initial value and final xor all ones.
const CRC32C_POLY: u32 = 0x82F6_3B78;

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Stores the CRC-32C of `buf` (computed with the 4-byte checksum field at
/// `at` zeroed) into that field.
pub fn seal(buf: &mut [u8], at: usize) {
    buf[at..at + 4].fill(0);
    let crc = crc32c(buf);
    buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the checksum field at `at` matches the rest of `buf`.
pub fn checksum_ok(buf: &[u8], at: usize) -> bool {
    let stored = le32(buf, at);
    let mut copy = buf.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == stored
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn guid_at(b: &[u8], at: usize) -> Guid {
    b[at..at + 16].try_into().expect("16 bytes")
}

pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn random_guid() -> Guid {
    Uuid::new_v4().to_bytes_le()
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`, lowercase, as parent_linkage
/// values are written.
pub fn guid_string(g: &Guid) -> String {
    format!("{{{}}}", Uuid::from_bytes_le(*g).hyphenated())
}

/// Parses a braced (or bare) GUID string, any case.
pub fn parse_guid_string(s: &str) -> Option<Guid> {
    let inner = s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))?;
    Uuid::try_parse(inner).ok().map(|u| u.to_bytes_le())
}

pub fn utf16_bytes(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

pub fn utf16_string(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b.chunks_exact(2).map(|c| le16(c, 0)).collect();
    String::from_utf16(&units).ok()
}

/// The 64 KiB file type identifier: signature and the creator string.
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    let c = utf16_bytes(creator);
    let n = c.len().min(510);
    b[8..8 + n].copy_from_slice(&c[..n]);
    b
}

/// One of the two 4 KiB headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        put64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        seal(&mut b, 4);
        b
    }

    /// `None` if the signature or checksum is wrong: such a header is not
    /// valid, which is not yet corruption (the other one may be current).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE
            || &b[..4] != HEADER_SIGNATURE
            || !checksum_ok(&b[..HEADER_SIZE], 4)
        {
            return None;
        }
        Some(Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }
}

/// Picks the current header: the only valid one, or the valid one with the
/// greater sequence number. Returns its slot. Two valid headers with the same
/// sequence number are accepted only when byte-identical (Disk2VHD writes
/// them so); otherwise there is no current header.
pub fn current_header(raw: [&[u8]; 2]) -> Result<(usize, Header), String> {
    let h = [Header::decode(raw[0]), Header::decode(raw[1])];
    match (&h[0], &h[1]) {
        (None, None) => Err("neither header has a valid signature and checksum".into()),
        (Some(a), None) => Ok((0, a.clone())),
        (None, Some(b)) => Ok((1, b.clone())),
        (Some(a), Some(b)) => {
            if a.sequence > b.sequence {
                Ok((0, a.clone()))
            } else if b.sequence > a.sequence {
                Ok((1, b.clone()))
            } else if raw[0][..HEADER_SIZE] == raw[1][..HEADER_SIZE] {
                Ok((0, a.clone()))
            } else {
                Err(format!(
                    "both headers carry sequence number {} but differ",
                    a.sequence
                ))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

pub fn encode_region_table(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[..4].copy_from_slice(REGION_SIGNATURE);
    put32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = 16 + i * 32;
        b[at..at + 16].copy_from_slice(&e.guid);
        put64(&mut b, at + 16, e.offset);
        put32(&mut b, at + 24, e.length);
        put32(&mut b, at + 28, u32::from(e.required));
    }
    seal(&mut b, 4);
    b
}

/// `None` if the signature or checksum is wrong; `Err` if they are right but
/// the content is impossible.
pub fn decode_region_table(b: &[u8]) -> Option<Result<Vec<RegionEntry>, String>> {
    if b.len() < REGION_TABLE_SIZE
        || &b[..4] != REGION_SIGNATURE
        || !checksum_ok(&b[..REGION_TABLE_SIZE], 4)
    {
        return None;
    }
    let count = le32(b, 8) as usize;
    if count > MAX_REGION_ENTRIES {
        return Some(Err(format!("region table claims {count} entries")));
    }
    Some(Ok((0..count)
        .map(|i| {
            let at = 16 + i * 32;
            RegionEntry {
                guid: guid_at(b, at),
                offset: le64(b, at + 16),
                length: le32(b, at + 24),
                required: le32(b, at + 28) & 1 != 0,
            }
        })
        .collect()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item: Guid,
    /// Relative to the start of the metadata region.
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

impl MetadataEntry {
    pub fn is_user(&self) -> bool {
        self.flags & META_IS_USER != 0
    }

    pub fn is_required(&self) -> bool {
        self.flags & META_IS_REQUIRED != 0
    }
}

/// Byte offset of table entry `i` within the metadata region.
pub fn metadata_entry_at(i: usize) -> usize {
    32 + i * 32
}

pub fn encode_metadata_entry(e: &MetadataEntry) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&e.item);
    put32(&mut b, 16, e.offset);
    put32(&mut b, 20, e.length);
    put32(&mut b, 24, e.flags);
    b
}

pub fn encode_metadata_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    b[..8].copy_from_slice(METADATA_SIGNATURE);
    put16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let at = metadata_entry_at(i);
        b[at..at + 32].copy_from_slice(&encode_metadata_entry(e));
    }
    b
}

pub fn decode_metadata_table(b: &[u8]) -> Result<Vec<MetadataEntry>, String> {
    if b.len() < METADATA_TABLE_SIZE || &b[..8] != METADATA_SIGNATURE {
        return Err("metadata table signature is wrong".into());
    }
    let count = le16(b, 10) as usize;
    if count > MAX_METADATA_ENTRIES {
        return Err(format!("metadata table claims {count} entries"));
    }
    Ok((0..count)
        .map(|i| {
            let at = metadata_entry_at(i);
            MetadataEntry {
                item: guid_at(b, at),
                offset: le32(b, at + 16),
                length: le32(b, at + 20),
                flags: le32(b, at + 24),
            }
        })
        .collect())
}

/// The parent locator: a typed list of UTF-16 key/value pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// A VHDX parent in the same directory, identified by its DataWriteGuid;
    /// `linkage2` is the identity the parent will have once a merge into it
    /// completes (see the module docs of `vhdx`).
    pub fn new(linkage: &Guid, linkage2: Option<&Guid>, parent_name: &str) -> Self {
        let mut entries = vec![("parent_linkage".to_owned(), guid_string(linkage))];
        if let Some(l2) = linkage2 {
            entries.push(("parent_linkage2".to_owned(), guid_string(l2)));
        }
        entries.push(("relative_path".to_owned(), format!(".\\{parent_name}")));
        Self { entries }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The DataWriteGuids a parent may carry to be this file's parent.
    pub fn linkages(&self) -> Vec<Guid> {
        ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| self.get(k).and_then(parse_guid_string))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .entries
            .iter()
            .map(|(k, v)| (utf16_bytes(k), utf16_bytes(v)))
            .collect();
        let mut b = vec![0u8; 20 + 12 * pairs.len()];
        b[..16].copy_from_slice(&VHDX_PARENT_LOCATOR_TYPE);
        put16(&mut b, 18, pairs.len() as u16);
        for (i, (k, v)) in pairs.iter().enumerate() {
            let at = 20 + 12 * i;
            let key_off = b.len();
            b.extend_from_slice(k);
            let value_off = b.len();
            b.extend_from_slice(v);
            put32(&mut b, at, key_off as u32);
            put32(&mut b, at + 4, value_off as u32);
            put16(&mut b, at + 8, k.len() as u16);
            put16(&mut b, at + 10, v.len() as u16);
        }
        b
    }

    /// `Ok(None)` for a locator type other than VHDX's.
    pub fn decode(b: &[u8]) -> Result<Option<ParentLocator>, String> {
        if b.len() < 20 {
            return Err("parent locator is shorter than its header".into());
        }
        if guid_at(b, 0) != VHDX_PARENT_LOCATOR_TYPE {
            return Ok(None);
        }
        let count = le16(b, 18) as usize;
        if 20 + 12 * count > b.len() {
            return Err(format!("parent locator claims {count} entries"));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + 12 * i;
            let field = |off: usize, len: usize| -> Result<String, String> {
                let end = off
                    .checked_add(len)
                    .filter(|&e| e <= b.len())
                    .ok_or("parent locator entry lies outside the item")?;
                utf16_string(&b[off..end])
                    .ok_or_else(|| "parent locator entry is not UTF-16".to_owned())
            };
            let key = field(le32(b, at) as usize, le16(b, at + 8) as usize)?;
            let value = field(le32(b, at + 4) as usize, le16(b, at + 10) as usize)?;
            entries.push((key, value));
        }
        Ok(Some(ParentLocator { entries }))
    }
}

/// The sizes that fix how a file maps the virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size: u64,
    pub block_size: u64,
    pub logical_sector: u64,
    pub has_parent: bool,
}

impl Geometry {
    /// Payload blocks per sector bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        SECTORS_PER_BITMAP_BLOCK * self.logical_sector / self.block_size
    }

    pub fn payload_blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }

    /// BAT entries the file must hold (the spec's two formulas).
    pub fn bat_entries(&self) -> u64 {
        let blocks = self.payload_blocks();
        if self.has_parent {
            self.bitmap_blocks() * (self.chunk_ratio() + 1)
        } else if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / self.chunk_ratio()
        }
    }

    /// Index in the BAT of payload block `block`.
    pub fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio()) as usize
    }

    /// Index in the BAT of the sector bitmap block of `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()) as usize
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }

    /// Bytes of sector bitmap that describe one payload block.
    pub fn bitmap_bytes_per_block(&self) -> u64 {
        self.sectors_per_block() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_known_vectors() {
        // The check value of CRC-32C, and the iSCSI vectors of RFC 3720 B.4.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&up), 0x46DD_794E);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&down), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn guids_have_the_microsoft_byte_order() {
        // 2DC27766-F623-4200-9D64-115E9BFD4A08 as the spec's binary form.
        assert_eq!(
            BAT_REGION,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(
            guid_string(&PARENT_LOCATOR),
            "{a8d35f2d-b30b-454d-abf7-d3d84834ab0c}"
        );
        assert_eq!(
            parse_guid_string("{A8D35F2D-B30B-454D-ABF7-D3D84834AB0C}"),
            Some(PARENT_LOCATOR)
        );
        assert_eq!(
            parse_guid_string("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"),
            None
        );
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = Header {
            sequence: 7,
            file_write_guid: random_guid(),
            data_write_guid: random_guid(),
            log_guid: ZERO_GUID,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.encode();
        assert_eq!(&b[..4], b"head");
        assert_eq!(Header::decode(&b), Some(h.clone()));
        b[100] ^= 1;
        assert_eq!(Header::decode(&b), None);
    }

    #[test]
    fn current_header_is_the_valid_one_with_the_higher_sequence() {
        let mk = |seq| {
            Header {
                sequence: seq,
                file_write_guid: random_guid(),
                data_write_guid: ZERO_GUID,
                log_guid: ZERO_GUID,
                log_version: 0,
                version: 1,
                log_length: 0,
                log_offset: MIB,
            }
            .encode()
        };
        let (a, b) = (mk(4), mk(5));
        assert_eq!(current_header([&a, &b]).unwrap().0, 1);
        assert_eq!(current_header([&b, &a]).unwrap().0, 0);
        let mut broken = b.clone();
        broken[8] ^= 0xFF;
        assert_eq!(current_header([&a, &broken]).unwrap().0, 0);
        assert!(current_header([&broken, &broken]).is_err());
        assert!(current_header([&mk(5), &b]).is_err());
        assert_eq!(current_header([&b, &b]).unwrap().0, 0);
    }

    #[test]
    fn parent_locator_round_trips() {
        let l = ParentLocator::new(&PAGE83_DATA, Some(&BAT_REGION), "web.vhdx");
        let back = ParentLocator::decode(&l.encode()).unwrap().unwrap();
        assert_eq!(back, l);
        assert_eq!(back.get("relative_path"), Some(".\\web.vhdx"));
        assert_eq!(back.linkages(), vec![PAGE83_DATA, BAT_REGION]);
    }

    #[test]
    fn bat_interleaves_one_bitmap_entry_per_chunk() {
        let g = Geometry {
            disk_size: 10 << 30,
            block_size: 2 * MIB,
            logical_sector: 512,
            has_parent: true,
        };
        assert_eq!(g.chunk_ratio(), 2048);
        assert_eq!(g.payload_blocks(), 5120);
        assert_eq!(g.bitmap_blocks(), 3);
        assert_eq!(g.bat_entries(), 3 * 2049);
        assert_eq!(g.payload_index(2047), 2047);
        assert_eq!(g.bitmap_index(0), 2048);
        assert_eq!(g.payload_index(2048), 2049);
        assert_eq!(g.bitmap_index(2), 3 * 2049 - 1);
        let dynamic = Geometry {
            has_parent: false,
            ..g
        };
        assert_eq!(dynamic.bat_entries(), 5120 + 2);
        assert_eq!(g.bitmap_bytes_per_block(), 512);
    }
}
