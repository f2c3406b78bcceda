//! The snapshot table: a contiguous run of variable-length entries, each
//! naming one internal snapshot and the L1 table that maps its content.
//!
//! Entries are kept byte for byte (id, name, extra data) so a table
//! rewritten here still describes snapshots other tools made exactly as
//! they wrote them.

use std::{fs::File, os::unix::fs::FileExt};

use super::{corrupt, MAX_L1_ENTRIES};
use crate::image::ImageError;

/// Fixed part of an entry.
const FIXED_LEN: usize = 40;
/// qemu refuses more extra data than this.
const MAX_EXTRA: usize = 1024;
/// The extra data this implementation writes: `vm_state_size_large` and
/// the disk size, as qemu does.
const EXTRA_LEN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u32,
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// A snapshot of a `disk_size`-byte disk without VM state.
    pub fn new(
        l1_offset: u64,
        l1_size: u32,
        id: String,
        name: &str,
        disk_size: u64,
        now: std::time::Duration,
    ) -> Snapshot {
        let mut extra = vec![0u8; EXTRA_LEN];
        extra[8..16].copy_from_slice(&disk_size.to_be_bytes());
        Snapshot {
            l1_offset,
            l1_size,
            id: id.into_bytes(),
            name: name.as_bytes().to_vec(),
            // The field is 32 bits wide; qemu truncates the same way.
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
        }
    }

    /// Size of the saved VM state; the 64-bit field wins when present.
    pub fn vm_state_size(&self) -> u64 {
        match self.extra.get(0..8) {
            Some(b) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
            None => u64::from(self.vm_state_size),
        }
    }

    /// The disk size recorded with the snapshot, if the entry has one.
    pub fn disk_size(&self) -> Option<u64> {
        self.extra
            .get(8..16)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    fn encoded_len(&self) -> usize {
        (FIXED_LEN + self.extra.len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
}

/// The table as written to the file.
pub(super) fn encode_table(snapshots: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(snapshots.iter().map(Snapshot::encoded_len).sum());
    for s in snapshots {
        s.encode_into(&mut out);
    }
    out
}

/// Reads `count` entries at `offset`, checking each against the file:
/// returns them and the table's length in bytes.
pub(super) fn read_table(
    file: &File,
    name: &str,
    offset: u64,
    count: u32,
    file_len: u64,
    cluster_bits: u32,
) -> Result<(Vec<Snapshot>, u64), ImageError> {
    let cluster = 1u64 << cluster_bits;
    let read = |at: u64, buf: &mut [u8]| -> Result<(), ImageError> {
        if at + buf.len() as u64 > file_len {
            return Err(corrupt(
                name,
                format!("the snapshot table runs past the end of the file at {at:#x}"),
            ));
        }
        file.read_exact_at(buf, at).map_err(ImageError::io(
            name,
            format!("read snapshot table at {at:#x}"),
        ))
    };
    let mut snapshots = Vec::with_capacity(count as usize);
    let mut at = offset;
    for _ in 0..count {
        let mut fixed = [0u8; FIXED_LEN];
        read(at, &mut fixed)?;
        let be32 = |i: usize| u32::from_be_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
        let be16 = |i: usize| u16::from_be_bytes(fixed[i..i + 2].try_into().expect("2 bytes"));
        let be64 = |i: usize| u64::from_be_bytes(fixed[i..i + 8].try_into().expect("8 bytes"));
        let l1_offset = be64(0);
        let l1_size = be32(8);
        let id_len = usize::from(be16(12));
        let name_len = usize::from(be16(14));
        let extra_len = be32(36) as usize;
        if extra_len > MAX_EXTRA {
            return Err(corrupt(
                name,
                format!("a snapshot entry has {extra_len} bytes of extra data"),
            ));
        }
        let mut rest = vec![0u8; extra_len + id_len + name_len];
        read(at + FIXED_LEN as u64, &mut rest)?;
        let id = rest[extra_len..extra_len + id_len].to_vec();
        let snap_name = rest[extra_len + id_len..].to_vec();
        if !l1_offset.is_multiple_of(cluster)
            || u64::from(l1_size) > MAX_L1_ENTRIES
            || (l1_size > 0 && (l1_offset == 0 || l1_offset + u64::from(l1_size) * 8 > file_len))
        {
            return Err(corrupt(
                name,
                format!(
                    "snapshot {:?} has its L1 table at {l1_offset:#x} ({l1_size} entries), outside the file",
                    String::from_utf8_lossy(&snap_name)
                ),
            ));
        }
        let s = Snapshot {
            l1_offset,
            l1_size,
            id,
            name: snap_name,
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            vm_state_size: be32(32),
            extra: rest[..extra_len].to_vec(),
        };
        at += s.encoded_len() as u64;
        snapshots.push(s);
    }
    Ok((snapshots, at - offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_padded_to_eight_bytes() {
        let s = Snapshot::new(
            3 << 16,
            2,
            "1".into(),
            "V1",
            1 << 30,
            std::time::Duration::from_secs(5),
        );
        let t = encode_table(&[s.clone(), s.clone()]);
        // 40 fixed + 16 extra + 1 id + 2 name = 59, padded to 64.
        assert_eq!(t.len(), 128);
        assert_eq!(s.disk_size(), Some(1 << 30));
        assert_eq!(s.vm_state_size(), 0);
    }
}
