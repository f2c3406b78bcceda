//! An independent VHDX reader: follows a file's parent chain and returns
//! the virtual disk's bytes. Tests check differencing files with it, since
//! qemu cannot read them.
//!
//! It shares no parsing with the writer (`format`, `image`): its own
//! CRC-32C (bit by bit), GUID text parsing, header choice, region table,
//! metadata, parent locator, BAT and sector bitmap decoding, all written
//! from [MS-VHDX] directly. It is strict where the writer is too (checksums,
//! signatures, linkage of each parent) and only reads.
//!
//! [MS-VHDX]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx/

use std::{fs::File, os::unix::fs::FileExt};

use crate::image::{Dir, ImageError};

const ONE_MIB: u64 = 1 << 20;
const GUID_BAT: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const GUID_METADATA: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const GUID_FILE_PARAMS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const GUID_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const GUID_LOGICAL_SECTOR: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const GUID_PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";
const GUID_VHDX_LOCATOR_TYPE: &str = "B04AEFB7-D19E-4A81-B789-25B8E9445913";

fn bad(file: &str, reason: impl Into<String>) -> ImageError {
    ImageError::Corrupt {
        file: file.to_owned(),
        format: "vhdx",
        reason: reason.into(),
    }
}

/// CRC-32C computed one bit at a time: slow, and unlike the writer's table.
fn crc32c_bitwise(bytes: &[u8]) -> u32 {
    let mut crc: u32 = 0xFFFF_FFFF;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    crc ^ 0xFFFF_FFFF
}

/// Whether `block` (whose checksum is at bytes 4..8) checks out.
fn crc_ok(block: &[u8]) -> bool {
    let stored = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let mut copy = block.to_vec();
    copy[4..8].copy_from_slice(&[0; 4]);
    crc32c_bitwise(&copy) == stored
}

/// `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, braces optional, to the on-disk
/// byte order (first three groups little-endian).
fn guid_from_text(text: &str) -> Option<[u8; 16]> {
    let t = text.trim_start_matches('{').trim_end_matches('}');
    let groups: Vec<&str> = t.split('-').collect();
    if groups.len() != 5 || groups.iter().map(|g| g.len()).ne([8, 4, 4, 4, 12]) {
        return None;
    }
    let hex: String = groups.concat();
    let mut raw = [0u8; 16];
    for (i, slot) in raw.iter_mut().enumerate() {
        *slot = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let mut out = raw;
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Some(out)
}

fn g(text: &str) -> [u8; 16] {
    guid_from_text(text).expect("constant GUID")
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

struct Layer {
    name: String,
    file: File,
    disk_size: u64,
    block_size: u64,
    sector: u64,
    chunk_ratio: u64,
    differencing: bool,
    bat: Vec<u64>,
    data_write_guid: [u8; 16],
    /// parent_linkage and parent_linkage2 values.
    accepted_parents: Vec<[u8; 16]>,
    parent_file: Option<String>,
}

impl Layer {
    fn load(dir: &Dir, name: &str) -> Result<Layer, ImageError> {
        let file = dir
            .open_read(name)
            .map_err(ImageError::io(name, "open for reading"))?;
        let get = |at: u64, len: usize| -> Result<Vec<u8>, ImageError> {
            let mut v = vec![0u8; len];
            file.read_exact_at(&mut v, at)
                .map_err(ImageError::io(name, format!("read {len} bytes at {at}")))?;
            Ok(v)
        };
        let first = get(0, ONE_MIB as usize)?;
        if !first.starts_with(b"vhdxfile") {
            return Err(bad(name, "file type identifier missing"));
        }
        // Headers at 64 KiB and 128 KiB; the valid one with the greater
        // sequence number wins.
        let mut best: Option<(u64, &[u8])> = None;
        for at in [0x1_0000usize, 0x2_0000] {
            let h = &first[at..at + 4096];
            if &h[0..4] == b"head" && crc_ok(h) {
                let seq = u64_at(h, 8);
                if best.is_none_or(|(s, _)| seq > s) {
                    best = Some((seq, h));
                }
            }
        }
        let (_, header) = best.ok_or_else(|| bad(name, "no valid header"))?;
        let data_write_guid: [u8; 16] = header[32..48].try_into().expect("16 bytes");
        if header[48..64].iter().any(|&b| b != 0) {
            return Err(ImageError::Unsupported {
                file: name.to_owned(),
                format: "vhdx",
                what: "a log to replay".into(),
            });
        }
        // Region table at 192 KiB, its copy at 256 KiB.
        let regions = [0x3_0000usize, 0x4_0000]
            .iter()
            .map(|&at| &first[at..at + 0x1_0000])
            .find(|t| &t[0..4] == b"regi" && crc_ok(t))
            .ok_or_else(|| bad(name, "no valid region table"))?;
        let (mut bat_at, mut meta_at) = (None, None);
        for i in 0..u32_at(regions, 8) as usize {
            let e = &regions[16 + 32 * i..48 + 32 * i];
            let where_ = (u64_at(e, 16), u64::from(u32_at(e, 24)));
            if e[..16] == g(GUID_BAT) {
                bat_at = Some(where_);
            } else if e[..16] == g(GUID_METADATA) {
                meta_at = Some(where_);
            }
        }
        let (bat_off, bat_len) = bat_at.ok_or_else(|| bad(name, "no BAT region"))?;
        let (meta_off, _) = meta_at.ok_or_else(|| bad(name, "no metadata region"))?;

        let table = get(meta_off, 0x1_0000)?;
        if &table[..8] != b"metadata" {
            return Err(bad(name, "metadata table signature"));
        }
        let mut items = Vec::new();
        for i in 0..u16_at(&table, 10) as usize {
            let e = &table[32 + 32 * i..64 + 32 * i];
            let user = u32_at(e, 24) & 1 != 0;
            if !user {
                items.push((e[..16].to_vec(), u32_at(e, 16), u32_at(e, 20)));
            }
        }
        let item = |id: &str| -> Result<Option<Vec<u8>>, ImageError> {
            match items.iter().find(|(guid, _, _)| guid[..] == g(id)) {
                Some((_, off, len)) => Ok(Some(get(meta_off + u64::from(*off), *len as usize)?)),
                None => Ok(None),
            }
        };
        let must = |id: &str, what: &str| -> Result<Vec<u8>, ImageError> {
            item(id)?.ok_or_else(|| bad(name, format!("no {what} item")))
        };
        let params = must(GUID_FILE_PARAMS, "file parameters")?;
        let block_size = u64::from(u32_at(&params, 0));
        let differencing = u32_at(&params, 4) & 2 != 0;
        let disk_size = u64_at(&must(GUID_DISK_SIZE, "disk size")?, 0);
        let sector = u64::from(u32_at(&must(GUID_LOGICAL_SECTOR, "sector size")?, 0));
        if !block_size.is_power_of_two()
            || block_size < ONE_MIB
            || !(sector == 512 || sector == 4096)
        {
            return Err(bad(name, "impossible block or sector size"));
        }
        let chunk_ratio = (1u64 << 23) * sector / block_size;

        let mut accepted_parents = Vec::new();
        let mut parent_file = None;
        if differencing {
            let loc = must(GUID_PARENT_LOCATOR, "parent locator")?;
            if loc[..16] != g(GUID_VHDX_LOCATOR_TYPE) {
                return Err(bad(name, "parent locator of another type"));
            }
            for i in 0..u16_at(&loc, 18) as usize {
                let e = &loc[20 + 12 * i..32 + 12 * i];
                let text = |off: u32, len: u16| {
                    let (a, b) = (off as usize, off as usize + len as usize);
                    loc.get(a..b).map(utf16le)
                };
                let key =
                    text(u32_at(e, 0), u16_at(e, 8)).ok_or_else(|| bad(name, "locator key"))?;
                let value =
                    text(u32_at(e, 4), u16_at(e, 10)).ok_or_else(|| bad(name, "locator value"))?;
                match key.as_str() {
                    "parent_linkage" | "parent_linkage2" => accepted_parents
                        .push(guid_from_text(&value).ok_or_else(|| bad(name, "linkage GUID"))?),
                    "relative_path" => {
                        let p = value.trim_start_matches(".\\").trim_start_matches("./");
                        if p.contains(['\\', '/']) {
                            return Err(bad(name, "parent outside the directory"));
                        }
                        parent_file = Some(p.to_owned());
                    }
                    _ => {}
                }
            }
            if accepted_parents.is_empty() || parent_file.is_none() {
                return Err(bad(name, "parent locator lacks linkage or relative path"));
            }
        }

        let blocks = disk_size.div_ceil(block_size);
        let entries = if differencing {
            blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            blocks + blocks.saturating_sub(1) / chunk_ratio
        };
        if entries * 8 > bat_len {
            return Err(bad(name, "BAT region too small"));
        }
        let raw = get(bat_off, (entries * 8) as usize)?;
        let bat = (0..entries as usize).map(|i| u64_at(&raw, 8 * i)).collect();
        Ok(Layer {
            name: name.to_owned(),
            file,
            disk_size,
            block_size,
            sector,
            chunk_ratio,
            differencing,
            bat,
            data_write_guid,
            accepted_parents,
            parent_file,
        })
    }

    fn pread(&self, at: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, at).map_err(ImageError::io(
            &self.name,
            format!("read {} bytes at {at}", buf.len()),
        ))
    }
}

/// A VHDX file and its ancestors, read-only.
pub struct ChainReader {
    layers: Vec<Layer>,
}

impl ChainReader {
    /// Opens `name` and follows `relative_path` to each parent, checking
    /// that each parent's DataWriteGuid is one its child accepts.
    pub fn open(dir: &Dir, name: &str) -> Result<Self, ImageError> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut next = Some(name.to_owned());
        while let Some(n) = next {
            if layers.len() > 128 {
                return Err(bad(name, "parent chain too long"));
            }
            let layer = Layer::load(dir, &n)?;
            if let Some(child) = layers.last() {
                if !child.accepted_parents.contains(&layer.data_write_guid) {
                    return Err(bad(&child.name, format!("parent {n} has another identity")));
                }
                if child.disk_size != layer.disk_size || child.sector != layer.sector {
                    return Err(bad(&child.name, format!("parent {n} has another geometry")));
                }
            }
            next = layer.parent_file.clone();
            layers.push(layer);
        }
        Ok(Self { layers })
    }

    pub fn size(&self) -> u64 {
        self.layers[0].disk_size
    }

    /// The chain's file names, the opened file first.
    pub fn files(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        if offset + buf.len() as u64 > self.size() {
            return Err(ImageError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size(),
            });
        }
        self.read_layer(0, offset, buf)
    }

    pub fn read_all(&self) -> Result<Vec<u8>, ImageError> {
        let mut out = vec![0u8; self.size() as usize];
        self.read_at(0, &mut out)?;
        Ok(out)
    }

    fn read_layer(&self, depth: usize, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let Some(l) = self.layers.get(depth) else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / l.block_size;
            let within = pos % l.block_size;
            let n = (buf.len() - done).min((l.block_size - within) as usize);
            let out = &mut buf[done..done + n];
            let entry = l.bat[(block + block / l.chunk_ratio) as usize];
            let file_at = entry & !(ONE_MIB - 1);
            match entry & 7 {
                6 => l.pread(file_at + within, out)?,
                7 => {
                    let chunk = block / l.chunk_ratio;
                    let sb = l.bat[(chunk * (l.chunk_ratio + 1) + l.chunk_ratio) as usize];
                    if sb & 7 != 6 {
                        return Err(bad(&l.name, "partial block without sector bitmap"));
                    }
                    let per_block = l.block_size / l.sector / 8;
                    let mut bits = vec![0u8; per_block as usize];
                    l.pread(
                        (sb & !(ONE_MIB - 1)) + (block % l.chunk_ratio) * per_block,
                        &mut bits,
                    )?;
                    // Sector by sector, in runs of equal presence.
                    let mut k = 0usize;
                    while k < n {
                        let bit = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 == 1;
                        let s = (within + k as u64) / l.sector;
                        let here = bit(s);
                        let mut e = s + 1;
                        while e * l.sector < within + n as u64 && bit(e) == here {
                            e += 1;
                        }
                        let run = ((e * l.sector - within) as usize).min(n) - k;
                        let part = &mut out[k..k + run];
                        if here {
                            l.pread(file_at + within + k as u64, part)?;
                        } else {
                            self.read_layer(depth + 1, pos + k as u64, part)?;
                        }
                        k += run;
                    }
                }
                0 if l.differencing => self.read_layer(depth + 1, pos, out)?,
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitwise_crc32c_matches_the_check_value() {
        assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guid_text_becomes_mixed_endian_bytes() {
        assert_eq!(
            g(GUID_BAT),
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(
            guid_from_text("{2dc27766-f623-4200-9d64-115e9bfd4a08}"),
            Some(g(GUID_BAT))
        );
        assert_eq!(guid_from_text("2dc27766f6234200"), None);
    }
}
