//! The ABI shared by ferry's kernel tracker (`tracker-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields, so both sides
//! agree on every byte. The pure functions (chunk spans, word masks, write-class
//! tests) are what the kernel program runs on every bio; they live here so they
//! can be unit- and property-tested on the host.
//!
//! Map layout, as pinned under the BPF pin directory:
//! - `DISKS`: hash, key = kernel `dev_t` of the *whole disk*, value = [`DiskEntry`]
//!   listing the tracked slots (the disk itself and/or its partitions).
//! - `BITMAPS`: array of maps, index = slot, value = an mmappable `u64` array
//!   holding one bit per chunk of that slot.
//! - `INFLIGHT`: hash, key = `struct bio *`, value = [`Inflight`]; lets the
//!   completion hook mark the range a bio had when it was queued.
//! - `STATS`: per-CPU array, index = slot, value = [`SlotStats`].
//! - `WIDE`: ring buffer of [`WideRecord`]s for ranges too wide to mark inline.
#![no_std]

/// Slots (tracked disks or partitions) the program can hold at once.
pub const MAX_SLOTS: u32 = 256;
/// Tracked slots on one whole disk (the disk plus partitions).
pub const MAX_SLOTS_PER_DISK: usize = 8;
/// Whole disks with at least one tracked slot.
pub const MAX_DISKS: u32 = 256;
/// Write bios that may be in flight at once on tracked disks.
pub const INFLIGHT_MAX: u32 = 65_536;
/// Bitmap words the program marks inline for one bio; wider ranges go to `WIDE`.
pub const MAX_WORDS_PER_MARK: u64 = 64;
/// Size of the `WIDE` ring buffer in bytes (a power of two, a page multiple).
pub const WIDE_RING_BYTES: u32 = 1 << 18;

/// Smallest chunk: 4 KiB.
pub const MIN_CHUNK_SHIFT: u32 = 12;
/// Largest chunk: 1 MiB.
pub const MAX_CHUNK_SHIFT: u32 = 20;
/// Default chunk: 64 KiB.
pub const DEFAULT_CHUNK_SHIFT: u32 = 16;

/// The block layer's sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// `REQ_OP_BITS` in `include/linux/blk_types.h`: the low 8 bits of `bi_opf`.
pub const REQ_OP_MASK: u32 = 0xff;

/// `BPF_F_MMAPABLE`: the bitmap arrays are drained through an mmap.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP`: inner arrays of one outer map may differ in size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Flags of every bitmap array (the outer map's template carries the same).
pub const BITMAP_MAP_FLAGS: u32 = BPF_F_MMAPABLE | BPF_F_INNER_MAP;

/// One tracked slot as seen from its whole disk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRef {
    /// First sector of the slot on the whole disk (0 for the disk itself).
    pub start_sector: u64,
    /// Length of the slot in sectors.
    pub nr_sectors: u64,
    /// Index into `BITMAPS` and `STATS`.
    pub slot: u32,
    /// log2 of the chunk size in bytes.
    pub chunk_shift: u32,
    /// Kernel `dev_t` of the tracked device (the partition, or the disk).
    pub dev: u32,
    pub _pad: u32,
}

/// The tracked slots of one whole disk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskEntry {
    /// How many entries of `slots` are in use.
    pub count: u32,
    /// Zone size in sectors for zoned disks, 0 otherwise. A zone append lands
    /// somewhere in its zone, so the whole zone is marked.
    pub zone_sectors: u32,
    /// [`DISK_RQ_BASED`] and friends.
    pub flags: u32,
    pub _pad: u32,
    pub slots: [SlotRef; MAX_SLOTS_PER_DISK],
}

/// The disk is request-based (blk-mq): its completions are traced by
/// `block_rq_complete` with the request's range, not by `block_bio_complete`
/// (the block layer clears the bio's trace flag first), so its bios need no
/// in-flight entry.
pub const DISK_RQ_BASED: u32 = 1;

/// What the completion hook needs to know about a queued write bio.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    pub sector: u64,
    pub nr_sectors: u64,
    /// Whole-disk `dev_t` (kernel encoding).
    pub disk: u32,
    pub _pad: u32,
}

/// Per-slot counters (one copy per CPU; the daemon sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Bios that overlap the slot but change no data (reads, flushes): seen
    /// and ignored. Every bio the program sees is counted once, here or in
    /// `writes`, so their sum is all bios seen on the slot.
    pub others: u64,
    /// Write-class bios marked at submission.
    pub writes: u64,
    /// Write-class bios marked again at completion.
    pub completions: u64,
    /// Marks that could not be recorded (full in-flight table or ring):
    /// the slot needs a checksum resync.
    pub overflows: u64,
    /// Ranges handed to the `WIDE` ring instead of being marked inline.
    pub wide: u64,
}

/// A range of chunks too wide to mark inline.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WideRecord {
    pub first_chunk: u64,
    pub last_chunk: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// Struct offsets and enum values of the running kernel, read from its BTF by
/// the daemon and written into the program's `.rodata` before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `offsetof(struct bio, bi_bdev)`.
    pub bio_bdev: u32,
    /// `offsetof(struct bio, bi_opf)`.
    pub bio_opf: u32,
    /// `offsetof(struct bio, bi_iter) + offsetof(struct bvec_iter, bi_sector)`.
    pub bio_sector: u32,
    /// `offsetof(struct bio, bi_iter) + offsetof(struct bvec_iter, bi_size)`.
    pub bio_size: u32,
    /// `offsetof(struct block_device, bd_disk)`.
    pub bdev_disk: u32,
    /// `offsetof(struct gendisk, major)`.
    pub disk_major: u32,
    /// `offsetof(struct gendisk, first_minor)`.
    pub disk_first_minor: u32,
    /// `REQ_OP_ZONE_APPEND`.
    pub op_zone_append: u32,
    /// `offsetof(struct request, q)`.
    pub rq_q: u32,
    /// `offsetof(struct request, __sector)`.
    pub rq_sector: u32,
    /// `offsetof(struct request, cmd_flags)`.
    pub rq_cmd_flags: u32,
    /// `offsetof(struct request_queue, disk)`.
    pub queue_disk: u32,
    /// 1 when the CPU never satisfies a load before an earlier one (x86's
    /// TSO). Set by the daemon for its own architecture, not read from BTF.
    /// The completion mark then skips words whose bits are already set; see
    /// `mark` in `tracker-ebpf`.
    pub loads_ordered: u32,
    pub _pad: u32,
    /// Bit `n` set when `REQ_OP` value `n` changes data (write, write-zeroes,
    /// discard, secure-erase, zone-append).
    pub write_ops: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], holds only integers and arrays of
    // integers, and has no implicit padding (explicit `_pad` fields instead),
    // so every bit pattern is valid and no uninitialised byte is exposed.
    unsafe impl aya::Pod for SlotRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DiskEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Inflight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for WideRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelLayout {}
}

/// Kernel `dev_t` encoding (`MKDEV` in `include/linux/kdev_t.h`), which differs
/// from glibc's.
#[inline(always)]
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Whether `opf` (a bio's `bi_opf`) is a data-changing operation.
#[inline(always)]
pub const fn is_write_class(write_ops: u64, opf: u32) -> bool {
    let op = opf & REQ_OP_MASK;
    op < 64 && (write_ops >> op) & 1 == 1
}

/// The chunks of `slot` (inclusive, relative to the slot) touched by the
/// absolute sector range `[sector, sector + nr_sectors)`, or `None` when the
/// range misses the slot or is empty.
#[inline(always)]
pub const fn chunk_span(slot: &SlotRef, sector: u64, nr_sectors: u64) -> Option<(u64, u64)> {
    if nr_sectors == 0 {
        return None;
    }
    let start = slot.start_sector;
    let end = start.saturating_add(slot.nr_sectors);
    let io_end = sector.saturating_add(nr_sectors);
    if sector >= end || io_end <= start {
        return None;
    }
    let lo = if sector > start { sector } else { start } - start;
    let hi = if io_end < end { io_end } else { end } - start;
    let shift = slot.chunk_shift - SECTOR_SHIFT;
    Some((lo >> shift, (hi - 1) >> shift))
}

/// The bits of bitmap word `word` covered by chunks `first..=last`.
#[inline(always)]
pub const fn word_mask(first: u64, last: u64, word: u64) -> u64 {
    let word_first = word * 64;
    let word_last = word_first + 63;
    if last < word_first || first > word_last {
        return 0;
    }
    let lo = first.saturating_sub(word_first);
    let hi = if last < word_last {
        last - word_first
    } else {
        63
    };
    // Bits lo..=hi: shift in two steps so hi = 63 does not overflow.
    ((u64::MAX >> (63 - hi)) >> lo) << lo
}

/// Bitmap words needed for `nr_chunks` chunks.
#[inline(always)]
pub const fn words_for_chunks(nr_chunks: u64) -> u64 {
    nr_chunks.div_ceil(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(start: u64, len: u64, shift: u32) -> SlotRef {
        SlotRef {
            start_sector: start,
            nr_sectors: len,
            slot: 0,
            chunk_shift: shift,
            dev: 0,
            _pad: 0,
        }
    }

    #[test]
    fn kernel_layout_has_no_hidden_padding() {
        // 14 u32 fields, then the u64 `write_ops`: the Pod impl and the
        // loader's `.rodata` override rely on every byte being a field.
        assert_eq!(core::mem::size_of::<KernelLayout>(), 14 * 4 + 8);
        assert_eq!(core::mem::offset_of!(KernelLayout, write_ops), 14 * 4);
    }

    #[test]
    fn kernel_dev_matches_mkdev() {
        assert_eq!(kernel_dev(7, 3), (7 << 20) | 3);
        assert_eq!(kernel_dev(259, 0x12345), (259 << 20) | 0x12345);
    }

    #[test]
    fn write_class_uses_low_byte_only() {
        let ops = (1 << 1) | (1 << 3);
        assert!(is_write_class(ops, 1));
        assert!(is_write_class(ops, 1 | (1 << 11))); // REQ_SYNC-like flag bits
        assert!(!is_write_class(ops, 0)); // read
        assert!(!is_write_class(ops, 2)); // flush
        assert!(is_write_class(ops, 3));
        assert!(!is_write_class(ops, 200));
    }

    #[test]
    fn chunk_span_clips_to_slot() {
        // 64 KiB chunks = 128 sectors; slot from sector 2048, 1 MiB long.
        let s = slot(2048, 2048, 16);
        assert_eq!(chunk_span(&s, 0, 2048), None);
        assert_eq!(chunk_span(&s, 4096, 8), None);
        assert_eq!(chunk_span(&s, 2048, 1), Some((0, 0)));
        assert_eq!(chunk_span(&s, 2048 + 127, 2), Some((0, 1)));
        assert_eq!(chunk_span(&s, 0, 100_000), Some((0, 15)));
        assert_eq!(chunk_span(&s, 2048, 0), None);
    }

    #[test]
    fn word_mask_edges() {
        assert_eq!(word_mask(0, 63, 0), u64::MAX);
        assert_eq!(word_mask(0, 0, 0), 1);
        assert_eq!(word_mask(63, 63, 0), 1 << 63);
        assert_eq!(word_mask(60, 67, 0), 0xf << 60);
        assert_eq!(word_mask(60, 67, 1), 0xf);
        assert_eq!(word_mask(60, 67, 2), 0);
        assert_eq!(word_mask(130, 200, 1), 0);
    }

    #[test]
    fn word_mask_matches_bit_model() {
        for first in 0..192u64 {
            for last in first..192u64 {
                for word in 0..3u64 {
                    let mut want = 0u64;
                    for bit in 0..64 {
                        let chunk = word * 64 + bit;
                        if chunk >= first && chunk <= last {
                            want |= 1 << bit;
                        }
                    }
                    assert_eq!(word_mask(first, last, word), want, "{first} {last} {word}");
                }
            }
        }
    }
}
