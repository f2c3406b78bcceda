//! The qcow2 file header (the first bytes of cluster 0): parsing with every
//! check that needs nothing but the header and the file length, and the v3
//! header a new image starts with.
//!
//! Only fields this implementation changes are ever rewritten, each in place
//! ([`field`]), so header extensions and fields written by other tools
//! survive.

use super::{corrupt, unsupported, MAX_L1_ENTRIES};
use crate::image::ImageError;

pub(super) const MAGIC: u32 = 0x5146_49fb;
/// Smallest header: version 2 ends at byte 72.
pub(super) const V2_LEN: usize = 72;
/// Smallest version 3 header.
const V3_MIN_LEN: usize = 104;
/// The v3 header this implementation writes: through `compression_type`,
/// padded to a multiple of 8 (what qemu writes).
const V3_LEN: usize = 112;

/// Byte offsets of the fields rewritten in place.
pub(super) mod field {
    /// `size` (u64): the virtual disk size in bytes.
    pub const SIZE: u64 = 24;
    /// `l1_size` (u32) and `l1_table_offset` (u64).
    pub const L1: u64 = 36;
    /// `refcount_table_offset` (u64) and `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE: u64 = 48;
    /// `nb_snapshots` (u32) and `snapshots_offset` (u64).
    pub const SNAPSHOTS: u64 = 60;
    /// `autoclear_features` (u64).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bits (byte 72).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types that matter here.
const EXT_END: u32 = 0;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// Autoclear bit 0: persistent dirty bitmaps are consistent.
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// The header fields this implementation uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub rt_offset: u64,
    pub rt_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// Auto-clear feature bits; the opener clears them before writing.
    pub autoclear: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// L1 entries needed to map `size` bytes with `cluster_bits`-sized clusters.
pub(super) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let l2_span = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(l2_span)
}

impl Header {
    /// Parses and checks the header. `head` is the start of the file (at
    /// least the first cluster, or the whole file if it is shorter).
    pub fn parse(head: &[u8], file_len: u64, file: &str) -> Result<Header, ImageError> {
        if head.len() < V2_LEN {
            return Err(corrupt(file, "the file is shorter than a qcow2 header"));
        }
        if be32(head, 0) != MAGIC {
            return Err(corrupt(file, "bad magic (not a qcow2 image)"));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(file, format!("version {version}")));
        }
        if be64(head, 8) != 0 {
            return Err(unsupported(file, "backing files"));
        }
        let cluster_bits = be32(head, 20);
        if cluster_bits < 9 {
            return Err(corrupt(
                file,
                format!("cluster_bits {cluster_bits} below 9"),
            ));
        }
        if cluster_bits > 21 {
            return Err(unsupported(
                file,
                format!("clusters larger than 2 MiB (cluster_bits {cluster_bits})"),
            ));
        }
        let cluster = 1u64 << cluster_bits;
        let crypt = be32(head, 32);
        if crypt != 0 {
            return Err(unsupported(file, format!("encryption (method {crypt})")));
        }

        let (header_len, autoclear) = if version == 3 {
            if head.len() < V3_MIN_LEN {
                return Err(corrupt(file, "the file is shorter than a v3 header"));
            }
            check_incompatible(be64(head, 72), file)?;
            let refcount_order = be32(head, 96);
            if refcount_order != 4 {
                return Err(unsupported(
                    file,
                    format!(
                        "{}-bit refcounts (only 16-bit)",
                        1u64 << refcount_order.min(63)
                    ),
                ));
            }
            let len = be32(head, 100) as usize;
            if len < V3_MIN_LEN || !len.is_multiple_of(8) || len as u64 > cluster {
                return Err(corrupt(file, format!("header_length {len}")));
            }
            (len, be64(head, 88))
        } else {
            (V2_LEN, 0)
        };
        check_extensions(head, header_len, cluster, autoclear, file)?;

        let h = Header {
            version,
            cluster_bits,
            size: be64(head, 24),
            l1_size: be32(head, 36),
            l1_offset: be64(head, 40),
            rt_offset: be64(head, 48),
            rt_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            autoclear,
        };
        h.check_tables(file_len, file)?;
        Ok(h)
    }

    /// The tables the header points to are aligned, inside the file, and the
    /// L1 table is big enough for the disk.
    fn check_tables(&self, file_len: u64, file: &str) -> Result<(), ImageError> {
        let cluster = 1u64 << self.cluster_bits;
        let inside = |what: &str, offset: u64, len: u64| -> Result<(), ImageError> {
            if !offset.is_multiple_of(cluster) {
                return Err(corrupt(
                    file,
                    format!("{what} offset {offset:#x} is not cluster-aligned"),
                ));
            }
            if offset == 0 || offset.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(corrupt(
                    file,
                    format!("{what} at {offset:#x} ({len} bytes) lies outside the file ({file_len} bytes)"),
                ));
            }
            Ok(())
        };

        let needed = l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(
                file,
                format!(
                    "the L1 table has {} entries, a {}-byte disk needs {needed}",
                    self.l1_size, self.size
                ),
            ));
        }
        if u64::from(self.l1_size) > MAX_L1_ENTRIES {
            return Err(unsupported(
                file,
                format!("an L1 table of {} entries", self.l1_size),
            ));
        }
        if self.l1_size > 0 || self.l1_offset != 0 {
            inside("L1 table", self.l1_offset, u64::from(self.l1_size) * 8)?;
        }
        if self.rt_clusters == 0 {
            return Err(corrupt(file, "the refcount table has no clusters"));
        }
        inside(
            "refcount table",
            self.rt_offset,
            u64::from(self.rt_clusters) * cluster,
        )?;
        if self.nb_snapshots > 65_536 {
            return Err(corrupt(
                file,
                format!("{} snapshots (qemu's limit is 65536)", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes; the entries are checked as
            // they are read.
            inside(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            )?;
        }
        Ok(())
    }

    /// A new version 3 header (no snapshots, 16-bit refcounts, zlib).
    pub fn encode_new(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.rt_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.rt_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&(V3_LEN as u32).to_be_bytes());
        // Byte 104, compression_type 0 (zlib), and the padding stay zero; so
        // do the 8 bytes after the header that end the extension area.
        b
    }
}

fn check_incompatible(bits: u64, file: &str) -> Result<(), ImageError> {
    if bits & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt(file, "qemu marked the image corrupt"));
    }
    if bits & INCOMPAT_DIRTY != 0 {
        return Err(unsupported(
            file,
            "the dirty bit (lazy refcounts left unrepaired; run `qemu-img check -r all`)",
        ));
    }
    if bits & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(file, "external data files"));
    }
    if bits & INCOMPAT_COMPRESSION != 0 {
        return Err(unsupported(file, "non-zlib compression"));
    }
    if bits & INCOMPAT_EXTL2 != 0 {
        return Err(unsupported(file, "extended L2 entries"));
    }
    let unknown = bits & !0x1f;
    if unknown != 0 {
        return Err(unsupported(
            file,
            format!("unknown incompatible features {unknown:#x}"),
        ));
    }
    Ok(())
}

/// Walks the header extensions: they must fit in cluster 0, and none may
/// ask for something this implementation would have to maintain.
fn check_extensions(
    head: &[u8],
    header_len: usize,
    cluster: u64,
    autoclear: u64,
    file: &str,
) -> Result<(), ImageError> {
    let limit = (cluster as usize).min(head.len());
    let mut at = header_len;
    while at + 8 <= limit {
        let kind = be32(head, at);
        let len = be32(head, at + 4) as usize;
        if kind == EXT_END {
            return Ok(());
        }
        let next = at + 8 + len.div_ceil(8) * 8;
        if next as u64 > cluster {
            return Err(corrupt(
                file,
                format!("header extension {kind:#x} runs past cluster 0"),
            ));
        }
        if kind == EXT_BITMAPS && autoclear & AUTOCLEAR_BITMAPS != 0 {
            return Err(unsupported(file, "persistent dirty bitmaps"));
        }
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_offset: 3 << 16,
            rt_offset: 1 << 16,
            rt_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            autoclear: 0,
        }
    }

    #[test]
    fn encoded_header_parses_back() {
        let h = sample();
        let mut b = h.encode_new();
        b.resize(1 << 16, 0);
        assert_eq!(Header::parse(&b, 4 << 16, "t").unwrap(), h);
    }

    #[test]
    fn refuses_what_it_cannot_handle() {
        let h = sample();
        let base = {
            let mut b = h.encode_new();
            b.resize(1 << 16, 0);
            b
        };
        let parse = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = base.clone();
            edit(&mut b);
            Header::parse(&b, 4 << 16, "t").unwrap_err()
        };
        assert!(matches!(
            parse(&|b| b[0] = b'X'),
            ImageError::Corrupt { .. }
        ));
        assert!(matches!(
            parse(&|b| b[7] = 4),
            ImageError::Unsupported { .. }
        ));
        assert!(matches!(
            parse(&|b| b[79] = 1 << 5),
            ImageError::Unsupported { .. }
        ));
        assert!(matches!(parse(&|b| b[79] = 2), ImageError::Corrupt { .. }));
        // L1 table past the end of the file.
        assert!(matches!(
            parse(&|b| b[40..48].copy_from_slice(&(9u64 << 16).to_be_bytes())),
            ImageError::Corrupt { .. }
        ));
        // L1 table too small for the size.
        assert!(matches!(
            parse(&|b| b[36..40].copy_from_slice(&1u32.to_be_bytes())),
            ImageError::Corrupt { .. }
        ));
        // Unaligned refcount table.
        assert!(matches!(
            parse(&|b| b[48..56].copy_from_slice(&0x10200u64.to_be_bytes())),
            ImageError::Corrupt { .. }
        ));
        assert!(matches!(
            parse(&|b| b[8..16].copy_from_slice(&0x200u64.to_be_bytes())),
            ImageError::Unsupported { .. }
        ));
    }
}
