//! Reference counts and cluster allocation.
//!
//! Refcounts are 16 bits wide (refcount_order 4). Every refcount block that
//! was touched stays in memory; the refcount table is always in memory.
//!
//! A cluster's refcount is the number of L1 tables (the active one and one
//! per snapshot) through which it is reached, plus one for each metadata
//! structure that owns it directly; that is what qemu counts and what
//! `qemu-img check` compares against.
//!
//! Invariants:
//! - the in-memory count of a cluster is never below its count on disk:
//!   increments apply at once, decrements wait in `pending` until the
//!   structures that stopped pointing at the cluster are durable
//!   ([`Qcow2::commit`]). So a freed cluster is never reused while the file
//!   on disk still points at it;
//! - every cluster at or past `end` has refcount 0 and is not pointed at.

use super::{corrupt, unsupported, Qcow2, RefBlock};
use crate::image::ImageError;

/// Largest refcount a 16-bit entry holds.
const MAX_REFCOUNT: u16 = u16::MAX;

impl Qcow2 {
    /// Refcount entries per refcount block.
    pub(super) fn block_entries(&self) -> u64 {
        1 << (self.cluster_bits - 1)
    }

    /// Loads refcount block `t` if the table has one; `None` if all the
    /// clusters it would cover are free.
    pub(super) fn block(&mut self, t: u64) -> Result<Option<&mut RefBlock>, ImageError> {
        let Some(&entry) = self.rt.get(t as usize) else {
            return Ok(None);
        };
        if entry == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&t) {
            let mut buf = vec![0u8; self.cluster_size() as usize];
            self.read_meta(entry, &mut buf, "refcount block")?;
            let counts = buf
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            self.blocks.insert(
                t,
                RefBlock {
                    counts,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&t))
    }

    /// Refcount of cluster number `c`.
    pub(super) fn refcount(&mut self, c: u64) -> Result<u16, ImageError> {
        let per = self.block_entries();
        Ok(match self.block(c / per)? {
            Some(b) => b.counts[(c % per) as usize],
            None => 0,
        })
    }

    /// Sets the refcount of cluster `c`, whose refcount block must exist.
    fn set_refcount(&mut self, c: u64, value: u16) -> Result<(), ImageError> {
        let per = self.block_entries();
        let name = self.name.clone();
        let Some(b) = self.block(c / per)? else {
            return Err(corrupt(
                &name,
                format!("cluster {c} is in use but has no refcount block"),
            ));
        };
        b.counts[(c % per) as usize] = value;
        b.dirty = true;
        Ok(())
    }

    /// One more reference to the cluster at byte offset `offset`, which
    /// must already be in use.
    pub(super) fn incref(&mut self, offset: u64) -> Result<(), ImageError> {
        let c = offset >> self.cluster_bits;
        match self.refcount(c)? {
            0 => Err(corrupt(
                &self.name,
                format!("cluster at {offset:#x} is in use but its refcount is 0"),
            )),
            MAX_REFCOUNT => Err(unsupported(
                &self.name,
                format!("more than {MAX_REFCOUNT} references to one cluster"),
            )),
            n => self.set_refcount(c, n + 1),
        }
    }

    /// One reference less to the cluster at `offset`; returns the new count.
    /// Only [`Qcow2::commit`] calls this, once nothing durable points at
    /// the cluster through the reference dropped.
    pub(super) fn decref(&mut self, offset: u64) -> Result<u16, ImageError> {
        let c = offset >> self.cluster_bits;
        match self.refcount(c)? {
            0 => Err(corrupt(
                &self.name,
                format!("freeing the cluster at {offset:#x}, whose refcount is already 0"),
            )),
            n => {
                self.set_refcount(c, n - 1)?;
                if n == 1 {
                    self.free_hint = self.free_hint.min(c);
                }
                Ok(n - 1)
            }
        }
    }

    /// A free cluster, now with refcount 1; returns its byte offset. Holes
    /// left by freed clusters are reused before the file grows.
    pub(super) fn alloc_cluster(&mut self) -> Result<u64, ImageError> {
        let per = self.block_entries();
        let mut c = self.free_hint;
        while c < self.end {
            let t = c / per;
            if self.rt.get(t as usize).is_none_or(|&e| e == 0) {
                // Nothing in this block's range is in use. Only possible
                // below `end` in images written by others; use the first
                // cluster as the block itself.
                if t as usize >= self.rt.len() {
                    break;
                }
                self.rt[t as usize] = c << self.cluster_bits;
                self.rt_dirty = true;
                self.blocks.insert(
                    t,
                    RefBlock {
                        counts: vec![0; per as usize],
                        dirty: true,
                    },
                );
                self.set_refcount(c, 1)?;
                c += 1;
                continue;
            }
            // Skip a full block quickly.
            let block = self.block(t)?.expect("the table entry is set");
            let from = (c % per) as usize;
            match block.counts[from..].iter().position(|&n| n == 0) {
                Some(i) => {
                    let found = c + i as u64;
                    if found < self.end {
                        self.set_refcount(found, 1)?;
                        self.free_hint = found + 1;
                        return Ok(found << self.cluster_bits);
                    }
                    break;
                }
                None => c = (t + 1) * per,
            }
        }
        self.free_hint = self.end;
        let at = self.reserve_at_end(1)?;
        self.free_hint = self.end;
        Ok(at)
    }

    /// `n` contiguous new clusters, refcount 1 each; returns the byte offset
    /// of the first. Taken from the end of the file.
    pub(super) fn alloc_run(&mut self, n: u64) -> Result<u64, ImageError> {
        if n == 1 {
            return self.alloc_cluster();
        }
        self.reserve_at_end(n)
    }

    /// Claims `n` clusters at the end of the file, preceded by whatever
    /// refcount blocks are needed to count them (and themselves).
    fn reserve_at_end(&mut self, n: u64) -> Result<u64, ImageError> {
        let per = self.block_entries();
        'retry: loop {
            let start = self.end;
            let mut blocks = 0u64;
            let missing = loop {
                let last = start + blocks + n - 1;
                let t_last = last / per;
                if t_last as usize >= self.rt.len() {
                    self.grow_table(t_last + 1)?;
                    continue 'retry;
                }
                let missing: Vec<u64> = (start / per..=t_last)
                    .filter(|&t| self.rt[t as usize] == 0)
                    .collect();
                if missing.len() as u64 == blocks {
                    break missing;
                }
                blocks = missing.len() as u64;
            };
            for (k, &t) in missing.iter().enumerate() {
                self.rt[t as usize] = (start + k as u64) << self.cluster_bits;
                self.blocks.insert(
                    t,
                    RefBlock {
                        counts: vec![0; per as usize],
                        dirty: true,
                    },
                );
                self.rt_dirty = true;
            }
            self.claim(start, blocks + n)?;
            return Ok((start + blocks) << self.cluster_bits);
        }
    }

    /// Sets refcount 1 on `count` clusters from `start`, which must be at
    /// `end`, and moves `end` past them.
    fn claim(&mut self, start: u64, count: u64) -> Result<(), ImageError> {
        for c in start..start + count {
            if self.refcount(c)? != 0 {
                return Err(corrupt(
                    &self.name,
                    format!("cluster {c} past the end of the image is in use"),
                ));
            }
            self.set_refcount(c, 1)?;
        }
        self.end = start + count;
        Ok(())
    }

    /// Replaces the refcount table with one of at least `min_len` entries,
    /// placed at the end of the file together with the refcount blocks that
    /// count it. The old table's clusters are freed once the header points
    /// at the new one.
    fn grow_table(&mut self, min_len: u64) -> Result<(), ImageError> {
        let per_cluster = self.cluster_size() / 8;
        let per = self.block_entries();
        let old_len = self.rt.len() as u64;
        let mut len = min_len.max(old_len * 2).div_ceil(per_cluster) * per_cluster;
        let start = self.end;
        let (table_clusters, missing) = 'size: loop {
            let table_clusters = len / per_cluster;
            let mut blocks = 0u64;
            loop {
                let last = start + table_clusters + blocks - 1;
                let t_last = last / per;
                if t_last >= len {
                    len = (t_last + 1).div_ceil(per_cluster) * per_cluster;
                    continue 'size;
                }
                let missing: Vec<u64> = (start / per..=t_last)
                    .filter(|&t| t >= old_len || self.rt[t as usize] == 0)
                    .collect();
                if missing.len() as u64 == blocks {
                    break 'size (table_clusters, missing);
                }
                blocks = missing.len() as u64;
            }
        };
        if len > super::MAX_REFCOUNT_TABLE_ENTRIES {
            return Err(unsupported(
                &self.name,
                "a refcount table larger than qemu's 8 MiB limit",
            ));
        }
        let old_offset = self.rt_offset;
        let old_clusters = u64::from(self.rt_clusters);
        self.rt.resize(len as usize, 0);
        for (k, &t) in missing.iter().enumerate() {
            self.rt[t as usize] = (start + table_clusters + k as u64) << self.cluster_bits;
            self.blocks.insert(
                t,
                RefBlock {
                    counts: vec![0; per as usize],
                    dirty: true,
                },
            );
        }
        self.claim(start, table_clusters + missing.len() as u64)?;
        self.rt_offset = start << self.cluster_bits;
        self.rt_clusters = u32::try_from(table_clusters).expect("bounded by the 8 MiB limit");
        self.rt_dirty = true;
        self.rt_moved = true;
        for k in 0..old_clusters {
            self.pending.push(old_offset + (k << self.cluster_bits));
        }
        Ok(())
    }

    /// Writes the refcount blocks changed since the last call.
    pub(super) fn write_blocks(&mut self) -> Result<bool, ImageError> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&t, _)| t)
            .collect();
        dirty.sort_unstable();
        for &t in &dirty {
            let block = &self.blocks[&t];
            let buf: Vec<u8> = block.counts.iter().flat_map(|n| n.to_be_bytes()).collect();
            let at = self.rt[t as usize];
            self.write(at, &buf, "write refcount block")?;
            self.blocks.get_mut(&t).expect("listed above").dirty = false;
        }
        Ok(!dirty.is_empty())
    }

    /// The refcount table as it goes to disk, padded to whole clusters.
    pub(super) fn encode_table(&self) -> Vec<u8> {
        let mut buf: Vec<u8> = self.rt.iter().flat_map(|e| e.to_be_bytes()).collect();
        buf.resize(
            (u64::from(self.rt_clusters) * self.cluster_size()) as usize,
            0,
        );
        buf
    }
}
