//! Boot points as internal snapshots: create, revert (goto), delete.
//!
//! Each operation starts from committed metadata and ends by committing,
//! and never rewrites a snapshot's L1 table or the snapshot table in place.
//! Refcounts follow qemu's rule: taking a snapshot adds one to every L2
//! table and data cluster the active L1 reaches; dropping an L1 table
//! (a deleted snapshot, or the active one replaced by a revert) takes one
//! from each, after the header no longer points at it.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    snapshot::{self, Snapshot},
    unsupported, Qcow2, COMPRESSED, COPIED, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
};
use crate::image::ImageError;

impl Qcow2 {
    /// Every cluster an L1 table reaches: its L2 tables and their data
    /// clusters, once per reference.
    fn reachable(&mut self, l1: &[u64]) -> Result<Vec<u64>, ImageError> {
        let mut out = Vec::new();
        for &e in l1 {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            out.push(off);
            self.trim_cache()?;
            let table = self.l2_table(off)?.entries.clone();
            if table.iter().any(|e| e & COMPRESSED != 0) {
                return Err(unsupported(&self.name, "compressed clusters"));
            }
            out.extend(
                table
                    .iter()
                    .map(|e| e & L2E_OFFSET_MASK)
                    .filter(|&host| host != 0),
            );
        }
        Ok(out)
    }

    /// The clusters of an L1 table of `entries` entries at `offset`.
    pub(super) fn l1_table_clusters(&self, offset: u64, entries: u32) -> impl Iterator<Item = u64> {
        let cluster = self.cluster_size();
        (0..self.l1_clusters(u64::from(entries))).map(move |k| offset + k * cluster)
    }

    /// Writes an L1 table to new clusters; returns their offset.
    pub(super) fn write_new_l1(&mut self, l1: &[u64]) -> Result<u64, ImageError> {
        let clusters = self.l1_clusters(l1.len() as u64);
        if clusters == 0 {
            return Ok(0);
        }
        let at = self.alloc_run(clusters)?;
        let mut buf: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        buf.resize((clusters * self.cluster_size()) as usize, 0);
        self.write(at, &buf, "write L1 table")?;
        Ok(at)
    }

    /// Writes `snapshots` as a new snapshot table and makes it current;
    /// the old table is freed once the header points at the new one.
    fn replace_snapshot_table(&mut self, snapshots: Vec<Snapshot>) -> Result<(), ImageError> {
        let table = snapshot::encode_table(&snapshots);
        let cluster = self.cluster_size();
        let offset = if table.is_empty() {
            0
        } else {
            let clusters = (table.len() as u64).div_ceil(cluster);
            let at = self.alloc_run(clusters)?;
            let mut buf = table.clone();
            buf.resize((clusters * cluster) as usize, 0);
            self.write(at, &buf, "write snapshot table")?;
            at
        };
        for k in 0..self.snap_len.div_ceil(cluster) {
            self.pending.push(self.snap_offset + k * cluster);
        }
        self.snapshots = snapshots;
        self.snap_offset = offset;
        self.snap_len = table.len() as u64;
        self.header_dirty = true;
        Ok(())
    }

    pub(super) fn snapshot_create(&mut self, name: &str) -> Result<(), ImageError> {
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(unsupported(
                &self.name,
                format!("a boot point name of {} bytes", name.len()),
            ));
        }
        self.commit()?;

        // First clear COPIED everywhere the active L1 reaches: a crash
        // after this only costs needless copies. Raising refcounts first
        // would leave COPIED on shared clusters.
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if e & COPIED != 0 {
                self.l1[i] &= !COPIED;
                self.l1_dirty = true;
            }
            self.trim_cache()?;
            let t = self.l2_table(off)?;
            if t.entries.iter().any(|e| e & COPIED != 0) {
                for e in &mut t.entries {
                    *e &= !COPIED;
                }
                t.dirty = true;
            }
        }
        self.commit()?;

        let active = self.l1.clone();
        for off in self.reachable(&active)? {
            self.incref(off)?;
        }
        let l1_offset = self.write_new_l1(&active)?;
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| std::str::from_utf8(&s.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut snapshots = self.snapshots.clone();
        snapshots.push(Snapshot::new(
            l1_offset,
            active.len() as u32,
            next_id.to_string(),
            name,
            self.size,
            now,
        ));
        self.replace_snapshot_table(snapshots)?;
        self.commit()
    }

    pub(super) fn snapshot_delete(&mut self, index: usize) -> Result<(), ImageError> {
        self.commit()?;
        let snap = self.snapshots[index].clone();
        let l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        let mut drop = self.reachable(&l1)?;
        drop.extend(self.l1_table_clusters(snap.l1_offset, snap.l1_size));
        let mut snapshots = self.snapshots.clone();
        snapshots.remove(index);
        self.replace_snapshot_table(snapshots)?;
        self.pending.extend(drop);
        self.commit()?;
        self.refresh_copied()?;
        self.commit()
    }

    pub(super) fn snapshot_goto(&mut self, index: usize) -> Result<(), ImageError> {
        let snap = self.snapshots[index].clone();
        if snap.vm_state_size() != 0 {
            return Err(unsupported(&self.name, "snapshots with VM state"));
        }
        if snap.disk_size().is_some_and(|s| s != self.size) {
            return Err(unsupported(
                &self.name,
                "reverting to a snapshot of another disk size",
            ));
        }
        self.commit()?;
        let mut l1 = self.read_l1_at(snap.l1_offset, snap.l1_size)?;
        if l1.len() > self.l1.len() {
            if l1[self.l1.len()..].iter().any(|&e| e != 0) {
                return Err(unsupported(
                    &self.name,
                    "a snapshot mapping more than the disk",
                ));
            }
            l1.truncate(self.l1.len());
        }
        l1.resize(self.l1.len(), 0);
        for e in &mut l1 {
            *e &= !COPIED;
        }
        let gain = self.reachable(&l1)?;
        let old = self.l1.clone();
        let mut drop = self.reachable(&old)?;
        drop.extend(self.l1_table_clusters(self.l1_offset, old.len() as u32));
        for off in gain {
            self.incref(off)?;
        }
        let offset = self.write_new_l1(&l1)?;
        self.l1 = l1;
        self.l1_offset = offset;
        self.l1_dirty = false;
        self.header_dirty = true;
        self.pending.extend(drop);
        self.commit()?;
        self.refresh_copied()?;
        self.commit()
    }

    /// Sets COPIED in the active tables exactly where the refcount is 1,
    /// after references were dropped.
    fn refresh_copied(&mut self) -> Result<(), ImageError> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let sole = self.refcount(off >> self.cluster_bits)? == 1;
            if (e & COPIED != 0) != sole {
                self.l1[i] = e ^ COPIED;
                self.l1_dirty = true;
            }
            self.trim_cache()?;
            let mut entries = self.l2_table(off)?.entries.clone();
            let mut changed = false;
            for e in &mut entries {
                let host = *e & L2E_OFFSET_MASK;
                if host == 0 || *e & COMPRESSED != 0 {
                    continue;
                }
                let sole = self.refcount(host >> self.cluster_bits)? == 1;
                if (*e & COPIED != 0) != sole {
                    *e ^= COPIED;
                    changed = true;
                }
            }
            if changed {
                let t = self.l2_table(off)?;
                t.entries = entries;
                t.dirty = true;
            }
        }
        Ok(())
    }
}
