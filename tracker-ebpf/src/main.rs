//! ferry's write tracker: marks every data-changing bio of a tracked block
//! device in that device's dirty bitmap.
//!
//! Three BTF tracepoints:
//! - `block_bio_queue` marks the bio's range at submission; on bio-based disks
//!   it also remembers the range in `INFLIGHT`, keyed by the bio pointer;
//! - `block_rq_complete` marks a request's completed range again once the data
//!   has landed (request-based disks: the block layer traces their completions
//!   here and clears the bio's trace flag, so `block_bio_complete` never fires);
//! - `block_bio_complete` does the same for bio-based disks from the range
//!   remembered in `INFLIGHT` (a bio's iterator is consumed by completion), and
//!   forgets it.
//!
//! The second mark is what makes drains lossless: if the daemon takes and
//! clears a bit while the write is still in flight, it may read the old data,
//! but the completion sets the bit again before the writer is told the write
//! finished, so the chunk is in a later drain.
//!
//! Cheap filters first: `block_bio_queue` looks up the bio's whole disk
//! `dev_t` in `DISKS` before it reads anything else, and `block_rq_complete`
//! drops non-writes before that lookup. Kernel structs are read with plain
//! loads through the tracepoints' BTF-typed pointers (a few nanoseconds each,
//! no helper call), so an untracked disk costs four loads and one hash lookup.
//! Struct offsets are never compiled in: they come from the running kernel's
//! BTF through the `LAYOUT` global, set at load time.
//!
//! The hot path of a tracked write, per program run: one hash lookup, one
//! per-CPU counter add, and per bitmap word a read, plus an atomic OR only
//! when a bit is still clear.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_or is the only atomic OR the BPF target offers"
)]

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, PerCpuArray, RingBuf},
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use tracker_common::{
    chunk_span, is_write_class, kernel_dev, word_mask, DiskEntry, Inflight, KernelLayout, SlotRef,
    SlotStats, WideRecord, BITMAP_MAP_FLAGS, DISK_RQ_BASED, INFLIGHT_MAX, MAX_DISKS, MAX_SLOTS,
    MAX_SLOTS_PER_DISK, MAX_WORDS_PER_MARK, REQ_OP_MASK, SECTOR_SHIFT, WIDE_RING_BYTES,
};

/// Offsets of the running kernel; the loader overrides this before load.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout {
    bio_bdev: 0,
    bio_opf: 0,
    bio_sector: 0,
    bio_size: 0,
    bdev_disk: 0,
    disk_major: 0,
    disk_first_minor: 0,
    op_zone_append: 0,
    rq_q: 0,
    rq_sector: 0,
    rq_cmd_flags: 0,
    queue_disk: 0,
    loads_ordered: 0,
    _pad: 0,
    write_ops: 0,
};

#[btf_map]
static DISKS: HashMap<u32, DiskEntry, { MAX_DISKS as usize }> = HashMap::new();

#[btf_map]
static BITMAPS: ArrayOfMaps<Array<u64, 1, { BITMAP_MAP_FLAGS as usize }>, { MAX_SLOTS as usize }> =
    ArrayOfMaps::new();

#[btf_map]
static INFLIGHT: HashMap<u64, Inflight, { INFLIGHT_MAX as usize }> = HashMap::new();

#[btf_map]
static STATS: PerCpuArray<SlotStats, { MAX_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
static WIDE: RingBuf<WideRecord, { WIDE_RING_BYTES as usize }> = RingBuf::new();

/// One field of `LAYOUT`. The volatile read stops the compiler from folding
/// the zero initialiser the loader replaces; the verifier still sees a
/// constant (`.rodata` is frozen before load). Reading single fields, not
/// the whole struct, keeps each run from loading the offsets it never uses.
macro_rules! layout {
    ($field:ident) => {
        read_layout(&raw const LAYOUT.$field)
    };
}

#[inline(always)]
fn read_layout<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into LAYOUT (see `layout!`), a plain static
    // valid for the program's lifetime.
    unsafe { core::ptr::read_volatile(field) }
}

/// Loads the `T` at `base + off` in kernel memory with a plain load.
///
/// # Safety
///
/// `base` must be a BTF-typed kernel pointer (a tracepoint argument, or a
/// pointer field loaded from one with this function) and `off` a `LAYOUT`
/// offset of a field of type `T` in that pointer's struct. The verifier then
/// checks the access against the kernel's BTF (the offset is a constant:
/// `.rodata` is frozen before load) and the JIT emits a load whose fault
/// handler yields 0, so a NULL or stale pointer reads as 0 instead of
/// faulting. This is what a `bpf_probe_read_kernel` call would do, without the
/// helper call.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: see the function's contract.
    unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize).cast::<T>()) }
}

/// Adds one to a counter of a `STATS` value.
#[inline(always)]
fn count(counter: *mut u64) {
    // SAFETY: the pointer points into a value from a successful `STATS`
    // lookup, valid for this run; the add is atomic because another program
    // (a completion in interrupt context) may run on this CPU between the
    // load and the store of a plain add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// The `STATS` value of `slot` on this CPU.
#[inline(always)]
fn stats(slot: u32) -> *mut SlotStats {
    STATS.get_ptr_mut(slot).unwrap_or(core::ptr::null_mut())
}

/// Counts a lost mark: the slot needs a checksum resync.
#[inline(always)]
fn lost(stats: *mut SlotStats) {
    if !stats.is_null() {
        // SAFETY: non-null pointers come from `stats`, a successful lookup.
        count(unsafe { &raw mut (*stats).overflows });
    }
}

/// Sets the bits of chunks `first..=last` in `slot`'s bitmap.
///
/// With `skip_set`, a word whose bits are all set already is only read, not
/// written: the OR would change nothing, and not writing keeps the cache line
/// shared by the CPUs that submit and complete writes instead of moving it
/// back and forth on every mark (most marks find their bits set: the
/// completion mark follows the submission mark, and hot chunks are written
/// again and again between drains).
///
/// Skipping is always safe at submission: it is the completion mark that
/// makes a drain lossless. At completion it is safe only if this read cannot
/// be satisfied before the completion was observed, so that a bit seen set
/// is taken by a swap that follows this read, and the daemon reads the data
/// after that swap. x86 keeps loads in order (TSO); the daemon sets
/// `loads_ordered` only there, and the completion marks pass it here.
#[inline(always)]
fn mark(slot: &SlotRef, first: u64, last: u64, stats: *mut SlotStats, skip_set: bool) {
    let first_word = first / 64;
    let last_word = last / 64;
    if last_word - first_word >= MAX_WORDS_PER_MARK {
        let rec = WideRecord {
            first_chunk: first,
            last_chunk: last,
            slot: slot.slot,
            _pad: 0,
        };
        if WIDE.output(rec, 0).is_err() {
            lost(stats);
        } else if !stats.is_null() {
            // SAFETY: as in `lost`.
            count(unsafe { &raw mut (*stats).wide });
        }
        return;
    }
    let Some(bitmap) = BITMAPS.get(slot.slot) else {
        lost(stats);
        return;
    };
    for i in 0..MAX_WORDS_PER_MARK {
        let word = first_word + i;
        if word > last_word {
            break;
        }
        let Some(p) = bitmap.get_ptr_mut(word as u32) else {
            lost(stats);
            continue;
        };
        let mask = word_mask(first, last, word);
        // SAFETY: the pointer comes from a successful lookup in an array map
        // that outlives this run. The read may race with the daemon's swap;
        // either value is fine (see above). The OR is atomic, matching the
        // daemon's atomic swap on the mmapped words.
        unsafe {
            if !skip_set || core::ptr::read_volatile(p) & mask != mask {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, mask);
            }
        }
    }
}

/// The entry of whole disk `devt` if the disk is tracked.
#[inline(always)]
fn tracked(devt: u32) -> Option<&'static DiskEntry> {
    // SAFETY: the entry is only read; the map is never mutated in place, the
    // daemon replaces whole values (RCU-protected for this run).
    unsafe { DISKS.get(devt) }
}

/// Kernel `dev_t` of `disk`, a `struct gendisk *`.
///
/// # Safety
///
/// As for `load`: `disk` is a BTF-typed `struct gendisk *`.
#[inline(always)]
unsafe fn disk_devt(disk: *const u8) -> u32 {
    // SAFETY: `major` and `first_minor` are `int` fields of `struct gendisk`
    // (the caller's contract). Two 4-byte loads: the verifier refuses one load
    // that spans two fields.
    let (major, minor) = unsafe {
        (
            load::<i32>(disk, layout!(disk_major)),
            load::<i32>(disk, layout!(disk_first_minor)),
        )
    };
    kernel_dev(major as u32, minor as u32)
}

/// A zone append lands wherever its zone's write pointer is: the range to
/// mark is the whole zone.
#[inline(always)]
fn zone_range(entry: &DiskEntry, opf: u32, sector: u64, nr_sectors: u64) -> (u64, u64) {
    if opf & REQ_OP_MASK == layout!(op_zone_append) && entry.zone_sectors != 0 {
        let zone = u64::from(entry.zone_sectors);
        (sector - sector % zone, zone)
    } else {
        (sector, nr_sectors)
    }
}

#[btf_tracepoint(function = "block_bio_queue")]
pub fn bio_queue(ctx: BtfTracePointContext) -> u32 {
    let bio: *const u8 = ctx.arg(0);
    on_queue(bio);
    0
}

#[inline(always)]
fn on_queue(bio: *const u8) -> Option<()> {
    // SAFETY: `bio` is the tracepoint's `struct bio *`; each offset names a
    // field of the type loaded (`load`'s contract).
    let devt = unsafe {
        let bdev: *const u8 = load(bio, layout!(bio_bdev));
        disk_devt(load(bdev, layout!(bdev_disk)))
    };
    let entry = tracked(devt)?;
    // SAFETY: as above.
    let (opf, sector, size) = unsafe {
        (
            load::<u32>(bio, layout!(bio_opf)),
            load::<u64>(bio, layout!(bio_sector)),
            load::<u32>(bio, layout!(bio_size)),
        )
    };
    let write = is_write_class(layout!(write_ops), opf);
    let (sector, nr_sectors) = if write {
        zone_range(entry, opf, sector, u64::from(size >> SECTOR_SHIFT))
    } else {
        (sector, u64::from(size >> SECTOR_SHIFT))
    };
    let mut untracked = false;
    if write && entry.flags & DISK_RQ_BASED == 0 {
        let rec = Inflight {
            sector,
            nr_sectors,
            disk: devt,
            _pad: 0,
        };
        untracked = INFLIGHT.insert(bio as u64, rec, 0).is_err();
    }
    for i in 0..MAX_SLOTS_PER_DISK {
        if i as u32 >= entry.count {
            break;
        }
        let slot = &entry.slots[i];
        let Some((first, last)) = chunk_span(slot, sector, nr_sectors) else {
            continue;
        };
        let stats = stats(slot.slot);
        if !write {
            if !stats.is_null() {
                // SAFETY: as in `lost`.
                count(unsafe { &raw mut (*stats).others });
            }
            continue;
        }
        if !stats.is_null() {
            // SAFETY: as in `lost`.
            count(unsafe { &raw mut (*stats).writes });
        }
        mark(slot, first, last, stats, true);
        if untracked {
            lost(stats);
        }
    }
    Some(())
}

/// The completion mark of a write to `entry`'s disk.
#[inline(always)]
fn on_completed(entry: &DiskEntry, sector: u64, nr_sectors: u64) {
    let skip_set = layout!(loads_ordered) != 0;
    for i in 0..MAX_SLOTS_PER_DISK {
        if i as u32 >= entry.count {
            break;
        }
        let slot = &entry.slots[i];
        if let Some((first, last)) = chunk_span(slot, sector, nr_sectors) {
            let stats = stats(slot.slot);
            if !stats.is_null() {
                // SAFETY: as in `lost`.
                count(unsafe { &raw mut (*stats).completions });
            }
            mark(slot, first, last, stats, skip_set);
        }
    }
}

#[btf_tracepoint(function = "block_rq_complete")]
pub fn rq_complete(ctx: BtfTracePointContext) -> u32 {
    let rq: *const u8 = ctx.arg(0);
    let nr_bytes: u32 = ctx.arg(2);
    on_rq_complete(rq, nr_bytes);
    0
}

#[inline(always)]
fn on_rq_complete(rq: *const u8, nr_bytes: u32) -> Option<()> {
    // SAFETY: `rq` is the tracepoint's `struct request *`; each offset names
    // a field of the type loaded (`load`'s contract).
    let opf: u32 = unsafe { load(rq, layout!(rq_cmd_flags)) };
    // The op first: reads (and flushes) of every disk stop here, before the
    // disk lookup.
    if !is_write_class(layout!(write_ops), opf) {
        return None;
    }
    // SAFETY: as above.
    let devt = unsafe {
        let q: *const u8 = load(rq, layout!(rq_q));
        disk_devt(load(q, layout!(queue_disk)))
    };
    let entry = tracked(devt)?;
    // SAFETY: as above.
    let sector: u64 = unsafe { load(rq, layout!(rq_sector)) };
    let (sector, nr_sectors) = zone_range(entry, opf, sector, u64::from(nr_bytes >> SECTOR_SHIFT));
    on_completed(entry, sector, nr_sectors);
    Some(())
}

#[btf_tracepoint(function = "block_bio_complete")]
pub fn bio_complete(ctx: BtfTracePointContext) -> u32 {
    let bio: *const u8 = ctx.arg(1);
    on_bio_complete(bio);
    0
}

#[inline(always)]
fn on_bio_complete(bio: *const u8) -> Option<()> {
    let key = bio as u64;
    // SAFETY: read-only access to a value that is copied out at once.
    let rec = *unsafe { INFLIGHT.get(key) }?;
    let _ = INFLIGHT.remove(key);
    on_completed(tracked(rec.disk)?, rec.sector, rec.nr_sectors);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
