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
//! Device filter first: the bio's whole disk `dev_t` is looked up in `DISKS`
//! before anything else is read, so untracked devices pay three probe reads
//! and one hash lookup. Struct offsets are never compiled in: they come from
//! the running kernel's BTF through the `LAYOUT` global, set at load time.
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

#[inline(always)]
fn layout() -> KernelLayout {
    // SAFETY: LAYOUT is a plain static; the volatile read stops the compiler
    // from folding the zero initialiser the loader replaces.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
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

#[inline(always)]
fn bump(slot: u32, field: fn(&mut SlotStats) -> &mut u64) {
    if let Some(stats) = STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful map lookup and stays
        // valid for this program run; the add is atomic because a completion
        // in interrupt context may nest inside a submission on the same CPU.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field(&mut *stats), 1) };
    }
}

/// Sets the bits of chunks `first..=last` in `slot`'s bitmap.
#[inline(always)]
fn mark(slot: &SlotRef, first: u64, last: u64) {
    let first_word = first / 64;
    let last_word = last / 64;
    if last_word - first_word >= MAX_WORDS_PER_MARK {
        let rec = WideRecord {
            first_chunk: first,
            last_chunk: last,
            slot: slot.slot,
            _pad: 0,
        };
        if WIDE.output(rec, 0).is_ok() {
            bump(slot.slot, |s| &mut s.wide);
        } else {
            bump(slot.slot, |s| &mut s.overflows);
        }
        return;
    }
    let Some(bitmap) = BITMAPS.get(slot.slot) else {
        bump(slot.slot, |s| &mut s.overflows);
        return;
    };
    for i in 0..MAX_WORDS_PER_MARK {
        let word = first_word + i;
        if word > last_word {
            break;
        }
        match bitmap.get_ptr_mut(word as u32) {
            // SAFETY: the pointer comes from a successful lookup in an array
            // map that outlives this run; the OR is atomic, matching the
            // daemon's atomic swap on the mmapped words.
            Some(p) => unsafe {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, word_mask(first, last, word));
            },
            None => bump(slot.slot, |s| &mut s.overflows),
        }
    }
}

/// Whole-disk `dev_t` of the bio, and its entry if the disk is tracked.
#[inline(always)]
fn tracked_disk(l: &KernelLayout, bio: *const u8) -> Option<(u32, &'static DiskEntry)> {
    // SAFETY: `bio` is the tracepoint's `struct bio *`; each offset names a
    // field of the type loaded (`load`'s contract).
    let (major, minor) = unsafe {
        let bdev: *const u8 = load(bio, l.bio_bdev);
        let disk: *const u8 = load(bdev, l.bdev_disk);
        (load::<i32>(disk, l.disk_major), load::<i32>(disk, l.disk_first_minor))
    };
    let devt = kernel_dev(major as u32, minor as u32);
    // SAFETY: the entry is only read; the map is never mutated in place, the
    // daemon replaces whole values (RCU-protected for this run).
    let entry = unsafe { DISKS.get(devt) }?;
    Some((devt, entry))
}

#[btf_tracepoint(function = "block_bio_queue")]
pub fn bio_queue(ctx: BtfTracePointContext) -> u32 {
    let bio: *const u8 = ctx.arg(0);
    on_queue(bio);
    0
}

#[inline(always)]
fn on_queue(bio: *const u8) -> Option<()> {
    let l = layout();
    let (devt, entry) = tracked_disk(&l, bio)?;
    // SAFETY: as in `tracked_disk`.
    let (opf, mut sector, size) = unsafe {
        (
            load::<u32>(bio, l.bio_opf),
            load::<u64>(bio, l.bio_sector),
            load::<u32>(bio, l.bio_size),
        )
    };
    let mut nr_sectors = u64::from(size >> SECTOR_SHIFT);
    let write = is_write_class(l.write_ops, opf);
    if write && opf & REQ_OP_MASK == l.op_zone_append && entry.zone_sectors != 0 {
        // A zone append lands wherever the zone's write pointer is.
        let zone = u64::from(entry.zone_sectors);
        sector -= sector % zone;
        nr_sectors = zone;
    }
    let mut lost = false;
    if write && entry.flags & DISK_RQ_BASED == 0 {
        let rec = Inflight {
            sector,
            nr_sectors,
            disk: devt,
            _pad: 0,
        };
        lost = INFLIGHT.insert(bio as u64, rec, 0).is_err();
    }
    for i in 0..MAX_SLOTS_PER_DISK {
        if i as u32 >= entry.count {
            break;
        }
        let slot = &entry.slots[i];
        let Some((first, last)) = chunk_span(slot, sector, nr_sectors) else {
            continue;
        };
        bump(slot.slot, |s| &mut s.events);
        if write {
            bump(slot.slot, |s| &mut s.writes);
            mark(slot, first, last);
            if lost {
                bump(slot.slot, |s| &mut s.overflows);
            }
        }
    }
    Some(())
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
    let l = layout();
    // SAFETY: `rq` is the tracepoint's `struct request *`; each offset names
    // a field of the type loaded (`load`'s contract).
    let (major, minor) = unsafe {
        let q: *const u8 = load(rq, l.rq_q);
        let disk: *const u8 = load(q, l.queue_disk);
        (load::<i32>(disk, l.disk_major), load::<i32>(disk, l.disk_first_minor))
    };
    // SAFETY: as in `tracked_disk`.
    let entry = unsafe { DISKS.get(kernel_dev(major as u32, minor as u32)) }?;
    // SAFETY: as above.
    let opf: u32 = unsafe { load(rq, l.rq_cmd_flags) };
    if !is_write_class(l.write_ops, opf) {
        return Some(());
    }
    // SAFETY: as above.
    let mut sector: u64 = unsafe { load(rq, l.rq_sector) };
    let mut nr_sectors = u64::from(nr_bytes >> SECTOR_SHIFT);
    if opf & REQ_OP_MASK == l.op_zone_append && entry.zone_sectors != 0 {
        let zone = u64::from(entry.zone_sectors);
        sector -= sector % zone;
        nr_sectors = zone;
    }
    for i in 0..MAX_SLOTS_PER_DISK {
        if i as u32 >= entry.count {
            break;
        }
        let slot = &entry.slots[i];
        if let Some((first, last)) = chunk_span(slot, sector, nr_sectors) {
            bump(slot.slot, |s| &mut s.completions);
            mark(slot, first, last);
        }
    }
    Some(())
}

#[btf_tracepoint(function = "block_bio_complete")]
pub fn bio_complete(ctx: BtfTracePointContext) -> u32 {
    let bio: *const u8 = ctx.arg(1);
    on_complete(bio);
    0
}

#[inline(always)]
fn on_complete(bio: *const u8) -> Option<()> {
    let key = bio as u64;
    // SAFETY: read-only access to a value that is copied out at once.
    let rec = *unsafe { INFLIGHT.get(key) }?;
    let _ = INFLIGHT.remove(key);
    // SAFETY: as in `tracked_disk`.
    let entry = unsafe { DISKS.get(rec.disk) }?;
    for i in 0..MAX_SLOTS_PER_DISK {
        if i as u32 >= entry.count {
            break;
        }
        let slot = &entry.slots[i];
        if let Some((first, last)) = chunk_span(slot, rec.sector, rec.nr_sectors) {
            bump(slot.slot, |s| &mut s.completions);
            mark(slot, first, last);
        }
    }
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
