//! Guest clusters to host clusters: reading, writing with copy-on-write,
//! and zeroing through the active L1 and L2 tables.
//!
//! Invariant: before an L2 entry is changed, its table is reached through
//! the active L1 table alone ([`Qcow2::l2_for_write`]); before guest data is
//! written in place, its cluster is too ([`Qcow2::write_chunk`]). Anything
//! shared with a snapshot is copied, and the copy's old cluster loses the
//! active table's reference only after the new mapping is durable.

use super::{
    corrupt, unsupported, L2Table, Qcow2, COMPRESSED, COPIED, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
    L2E_RESERVED, L2_CACHE_BYTES, ZERO_FLAG,
};
use crate::image::ImageError;

/// What a guest cluster reads as.
enum Mapping {
    Zero,
    Data(u64),
}

impl Qcow2 {
    /// Entries per L2 table.
    pub(super) fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The L2 table at `offset`, read and checked on first use.
    pub(super) fn l2_table(&mut self, offset: u64) -> Result<&mut L2Table, ImageError> {
        if !self.l2.contains_key(&offset) {
            let mut buf = vec![0u8; self.cluster_size() as usize];
            self.read_meta(offset, &mut buf, "L2 table")?;
            let entries = super::be64s(&buf);
            for (i, &e) in entries.iter().enumerate() {
                self.check_l2_entry(e, offset, i)?;
            }
            self.l2.insert(
                offset,
                L2Table {
                    entries,
                    dirty: false,
                },
            );
        }
        Ok(self.l2.get_mut(&offset).expect("loaded above"))
    }

    fn check_l2_entry(&self, e: u64, table: u64, i: usize) -> Result<(), ImageError> {
        if e & COMPRESSED != 0 {
            // Refused where used.
            return Ok(());
        }
        let host = e & L2E_OFFSET_MASK;
        if e & L2E_RESERVED != 0
            || (self.version < 3 && e & ZERO_FLAG != 0)
            || !host.is_multiple_of(self.cluster_size())
            || host >> self.cluster_bits >= self.end
            || (host == 0 && e & COPIED != 0)
        {
            return Err(corrupt(
                &self.name,
                format!("L2 table at {table:#x}: entry {i} ({e:#x}) is invalid"),
            ));
        }
        Ok(())
    }

    fn compressed(&self) -> ImageError {
        unsupported(&self.name, "compressed clusters")
    }

    /// Where guest byte `pos` lives.
    fn lookup(&mut self, pos: u64) -> Result<Mapping, ImageError> {
        let g = pos >> self.cluster_bits;
        let l2e = self.l2_entries();
        let l2_off = self.l1[(g / l2e) as usize] & L1E_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Zero);
        }
        let e = self.l2_table(l2_off)?.entries[(g % l2e) as usize];
        if e & COMPRESSED != 0 {
            return Err(self.compressed());
        }
        let host = e & L2E_OFFSET_MASK;
        if host == 0 || (self.version >= 3 && e & ZERO_FLAG != 0) {
            return Ok(Mapping::Zero);
        }
        Ok(Mapping::Data(host))
    }

    /// Reads `buf.len()` bytes at `pos`, all within one cluster.
    pub(super) fn read_chunk(&mut self, pos: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        match self.lookup(pos)? {
            Mapping::Zero => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data(host) => self.read_data(host + pos % self.cluster_size(), buf),
        }
    }

    /// The active L2 table for L1 index `i`, made private to the active L1
    /// table: allocated if missing, copied if a snapshot shares it.
    fn l2_for_write(&mut self, i: usize) -> Result<u64, ImageError> {
        let e = self.l1[i];
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            let entries = vec![0; self.l2_entries() as usize];
            return self.install_l2(i, entries);
        }
        if e & COPIED != 0 {
            return Ok(off);
        }
        match self.refcount(off >> self.cluster_bits)? {
            0 => Err(corrupt(
                &self.name,
                format!("L2 table at {off:#x} is in use but its refcount is 0"),
            )),
            1 => {
                self.l1[i] |= COPIED;
                self.l1_dirty = true;
                Ok(off)
            }
            _ => {
                // Every cluster in a shared table is shared as well: the
                // copy marks none of them COPIED. Their refcounts stay: the
                // active L1 still reaches each once, through the copy now.
                let mut entries = self.l2_table(off)?.entries.clone();
                for e in &mut entries {
                    *e &= !COPIED;
                }
                let new = self.install_l2(i, entries)?;
                self.pending.push(off);
                Ok(new)
            }
        }
    }

    /// Allocates a cluster for a new L2 table holding `entries` (written at
    /// the next flush) and points L1 entry `i` at it.
    fn install_l2(&mut self, i: usize, entries: Vec<u64>) -> Result<u64, ImageError> {
        let new = self.alloc_cluster()?;
        self.l2.insert(
            new,
            L2Table {
                entries,
                dirty: true,
            },
        );
        self.l1[i] = new | COPIED;
        self.l1_dirty = true;
        Ok(new)
    }

    /// Writes `data` at guest offset `pos`, all within one cluster.
    pub(super) fn write_chunk(&mut self, pos: u64, data: &[u8]) -> Result<(), ImageError> {
        let cluster = self.cluster_size();
        let g = pos >> self.cluster_bits;
        let within = pos % cluster;
        let l2e = self.l2_entries();
        let l2_off = self.l2_for_write((g / l2e) as usize)?;
        let i = (g % l2e) as usize;
        let e = self.l2_table(l2_off)?.entries[i];
        if e & COMPRESSED != 0 {
            return Err(self.compressed());
        }
        let host = e & L2E_OFFSET_MASK;
        let reads_zero = self.version >= 3 && e & ZERO_FLAG != 0;
        if host != 0 && !reads_zero {
            if e & COPIED != 0 {
                return self.write(host + within, data, "write data");
            }
            match self.refcount(host >> self.cluster_bits)? {
                0 => {
                    return Err(corrupt(
                        &self.name,
                        format!("data cluster at {host:#x} is in use but its refcount is 0"),
                    ))
                }
                1 => {
                    let t = self.l2_table(l2_off)?;
                    t.entries[i] |= COPIED;
                    t.dirty = true;
                    return self.write(host + within, data, "write data");
                }
                _ => {}
            }
        }
        // A new cluster: the old content (shared, so copied) or zeroes
        // around the new data, written whole so no stale bytes of a reused
        // cluster show through.
        let new = self.alloc_cluster()?;
        if data.len() as u64 == cluster {
            self.write(new, data, "write data")?;
        } else {
            let mut buf = vec![0u8; cluster as usize];
            if host != 0 && !reads_zero {
                self.read_data(host, &mut buf)?;
            }
            buf[within as usize..within as usize + data.len()].copy_from_slice(data);
            self.write(new, &buf, "write data")?;
        }
        let t = self.l2_table(l2_off)?;
        t.entries[i] = new | COPIED;
        t.dirty = true;
        if host != 0 {
            self.pending.push(host);
        }
        Ok(())
    }

    /// Whether guest byte `pos` is backed by a host cluster that does not
    /// read as zeroes.
    fn is_allocated(&mut self, pos: u64) -> Result<bool, ImageError> {
        match self.lookup(pos) {
            Ok(Mapping::Data(_)) => Ok(true),
            Ok(Mapping::Zero) => Ok(false),
            // Let the write refuse it.
            Err(ImageError::Unsupported { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Zeroes `[offset, offset + len)`: whole clusters become unallocated
    /// (without a backing file they read as zeroes) and lose the active
    /// table's reference; partial ones get zeroes written.
    pub(super) fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        let cluster = self.cluster_size();
        let l2_span = cluster * self.l2_entries();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            self.trim_cache()?;
            let within = pos % cluster;
            let n = (cluster - within).min(end - pos);
            if n < cluster {
                if self.is_allocated(pos)? {
                    let zeroes = vec![0u8; n as usize];
                    self.write_chunk(pos, &zeroes)?;
                }
                pos += n;
                continue;
            }
            let g = pos >> self.cluster_bits;
            let l1i = (g / self.l2_entries()) as usize;
            let l2_off = self.l1[l1i] & L1E_OFFSET_MASK;
            if l2_off == 0 {
                // The whole table's span is unallocated.
                pos = ((pos / l2_span + 1) * l2_span).min(end);
                continue;
            }
            let i = (g % self.l2_entries()) as usize;
            let e = self.l2_table(l2_off)?.entries[i];
            if e & COMPRESSED != 0 {
                return Err(self.compressed());
            }
            // An entry without a host cluster already reads as zeroes.
            if e & L2E_OFFSET_MASK != 0 {
                let l2_off = self.l2_for_write(l1i)?;
                let t = self.l2_table(l2_off)?;
                let old = std::mem::replace(&mut t.entries[i], 0);
                t.dirty = true;
                let host = old & L2E_OFFSET_MASK;
                if host != 0 {
                    self.pending.push(host);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Keeps the L2 cache near its budget: drops clean tables, writing
    /// metadata out first if most are dirty. Called only between chunks,
    /// never while a table offset is held.
    pub(super) fn trim_cache(&mut self) -> Result<(), ImageError> {
        let max = (L2_CACHE_BYTES / self.cluster_size()).max(16) as usize;
        if self.l2.len() <= max {
            return Ok(());
        }
        if self.l2.values().filter(|t| t.dirty).count() > max / 2 {
            self.commit()?;
        }
        let excess = self.l2.len().saturating_sub(max * 3 / 4);
        let drop: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| !t.dirty)
            .map(|(&o, _)| o)
            .take(excess)
            .collect();
        for o in drop {
            self.l2.remove(&o);
        }
        Ok(())
    }
}
