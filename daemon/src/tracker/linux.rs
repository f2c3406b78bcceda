//! The Linux tracker backend: loads the eBPF program, pins it, and reads and
//! drains the per-device bitmaps.
//!
//! Everything lives under one bpffs directory (default `/sys/fs/bpf/ferry`):
//!
//! | pin | what |
//! |---|---|
//! | `prog_bio_queue`, `prog_bio_complete`, `prog_rq_complete` | the programs |
//! | `link_bio_queue`, `link_bio_complete`, `link_rq_complete` | their tracepoint links |
//! | `DISKS`, `BITMAPS`, `INFLIGHT`, `STATS`, `WIDE` | the maps |
//!
//! Because links and maps are pinned, tracking goes on while no ferry process
//! runs, and the next process picks up every bit. The directory is populated
//! under a temporary name and renamed into place, so a crash mid-load never
//! leaves half a tracker behind. With the last device removed, the pins are
//! removed and the kernel unloads the program.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use aya::{
    maps::{ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{links::FdLink, BtfTracePoint, ProgramInfo},
    EbpfLoader,
};
use roaring::RoaringBitmap;
use tracker_common::{
    DiskEntry, SlotRef, SlotStats, WideRecord, BITMAP_MAP_FLAGS, MAX_SLOTS, MAX_SLOTS_PER_DISK,
};

use super::{
    bitmap, btf::Btf, ChunkSize, Counters, Epoch, ProgramStats, Resized, SlotStatus, TrackSpec,
    Tracker, TrackerError,
};
use crate::{device::DevNum, sys};

/// Where the tracker is pinned unless told otherwise.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/ferry";

static TRACKER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracker"));

/// (program name in the object, tracepoint).
const PROGRAMS: [(&str, &str); 3] = [
    ("bio_queue", "block_bio_queue"),
    ("bio_complete", "block_bio_complete"),
    ("rq_complete", "block_rq_complete"),
];
const MAPS: [&str; 5] = ["DISKS", "BITMAPS", "INFLIGHT", "STATS", "WIDE"];

fn map_err<E: std::error::Error + Send + Sync + 'static>(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(E) -> TrackerError {
    move |e| TrackerError::Map {
        map,
        op,
        source: Box::new(e),
    }
}

/// The chunks `spec` needs, refused past what a bitmap can index.
fn checked_chunks(spec: &TrackSpec) -> Result<u64, TrackerError> {
    let chunks = spec.nr_chunks();
    if chunks > 1 << 32 {
        return Err(TrackerError::TooLarge {
            dev: spec.device.dev,
            chunks,
            chunk_size: spec.chunk.bytes(),
        });
    }
    Ok(chunks)
}

/// The program's view of `spec` tracked in `slot`.
fn slot_ref(spec: &TrackSpec, slot: u32) -> SlotRef {
    SlotRef {
        start_sector: spec.device.start_sector,
        nr_sectors: spec.device.nr_sectors,
        slot,
        chunk_shift: spec.chunk.shift(),
        dev: spec.device.dev.kernel(),
        _pad: 0,
    }
}

/// Handles on the pinned maps of a loaded tracker.
struct Loaded {
    disks: HashMap<MapData, u32, DiskEntry>,
    bitmaps: ArrayOfMaps<MapData>,
    /// A second handle on `BITMAPS` for the delete aya does not offer.
    bitmaps_raw: MapData,
    stats: PerCpuArray<MapData, SlotStats>,
    wide: RingBuf<MapData>,
    /// Mappings of slot bitmaps, opened on first use.
    mapped: StdHashMap<u32, sys::mmap::SharedWords>,
}

pub struct LinuxTracker {
    dir: PathBuf,
    loaded: Option<Loaded>,
}

impl LinuxTracker {
    /// A tracker pinned under `dir`. Nothing is loaded until needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, TrackerError> {
        if !sys::is_root() {
            return Err(TrackerError::NotRoot);
        }
        let dir = dir.into();
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            return Err(TrackerError::BpfUnavailable {
                reason: format!(
                    "{} is not on a bpf filesystem (mount it: mount -t bpf bpf /sys/fs/bpf)",
                    parent.display()
                ),
            });
        }
        Ok(Self { dir, loaded: None })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens the pinned tracker if there is one.
    fn open(&mut self) -> Result<Option<&mut Loaded>, TrackerError> {
        if self.loaded.is_none() {
            if !self.pin("link_bio_queue").exists() {
                return Ok(None);
            }
            let map = |name: &'static str| {
                MapData::from_pin(self.pin(name)).map_err(map_err(name, "open pinned map"))
            };
            let disks =
                HashMap::try_from(Map::HashMap(map("DISKS")?)).map_err(map_err("DISKS", "open"))?;
            let bitmaps = ArrayOfMaps::try_from(Map::ArrayOfMaps(map("BITMAPS")?))
                .map_err(map_err("BITMAPS", "open"))?;
            let stats = PerCpuArray::try_from(Map::PerCpuArray(map("STATS")?))
                .map_err(map_err("STATS", "open"))?;
            let wide =
                RingBuf::try_from(Map::RingBuf(map("WIDE")?)).map_err(map_err("WIDE", "open"))?;
            let bitmaps_raw = map("BITMAPS")?;
            self.loaded = Some(Loaded {
                disks,
                bitmaps,
                bitmaps_raw,
                stats,
                wide,
                mapped: StdHashMap::new(),
            });
        }
        Ok(self.loaded.as_mut())
    }

    /// Opens the pinned tracker, loading and pinning it first if needed.
    fn ensure_loaded(&mut self) -> Result<&mut Loaded, TrackerError> {
        if self.open()?.is_none() {
            // Leftovers of an interrupted load or a half-removed tracker hold
            // no usable state: clear them before loading afresh.
            self.unpin_all()?;
            self.load_and_pin()?;
        }
        let path = self.dir.display().to_string();
        self.open()?.ok_or_else(|| TrackerError::Pin {
            path,
            op: "open after load",
            source: std::io::Error::other("pins vanished"),
        })
    }

    fn load_and_pin(&self) -> Result<(), TrackerError> {
        let layout = Btf::from_sys_fs()?.kernel_layout()?;
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| TrackerError::BpfUnavailable {
            reason: format!("no kernel BTF: {e}"),
        })?;
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .load(TRACKER_OBJ)
            .map_err(|e| TrackerError::Load(Box::new(e)))?;
        let staging = self.dir.with_file_name(format!(
            "{}_loading_{}",
            self.dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("ferry"),
            std::process::id()
        ));
        let pin_err = |path: &Path, op| {
            let path = path.display().to_string();
            move |source| TrackerError::Pin { path, op, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            // Root-only: the pins give access to every bitmap.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&staging)
                .map_err(pin_err(&staging, "create directory"))?;
        }
        let result = (|| {
            for name in MAPS {
                let map = ebpf.map_mut(name).ok_or_else(|| TrackerError::Map {
                    map: name_static(name),
                    op: "find in object",
                    source: "missing".into(),
                })?;
                map.pin(staging.join(name))
                    .map_err(|e| TrackerError::Load(Box::new(e)))?;
            }
            for (name, tracepoint) in PROGRAMS {
                let prog: &mut BtfTracePoint = ebpf
                    .program_mut(name)
                    .ok_or_else(|| TrackerError::Load(format!("no program {name}").into()))?
                    .try_into()
                    .map_err(|e| TrackerError::Load(Box::new(e)))?;
                prog.load(tracepoint, &kernel_btf)
                    .map_err(|e| TrackerError::Load(Box::new(e)))?;
                prog.pin(staging.join(format!("prog_{name}")))
                    .map_err(|e| TrackerError::Load(Box::new(e)))?;
                let id = prog.attach().map_err(|e| TrackerError::Load(Box::new(e)))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(|e| TrackerError::Load(Box::new(e)))?
                    .into();
                link.pin(staging.join(format!("link_{name}")))
                    .map_err(|e| TrackerError::Load(Box::new(e)))?;
            }
            std::fs::rename(&staging, &self.dir).map_err(pin_err(&self.dir, "rename into place"))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    /// Removes every pin this tracker owns, and the directory. The kernel
    /// detaches the programs once their last pin and fd are gone.
    fn unpin_all(&mut self) -> Result<(), TrackerError> {
        self.loaded = None;
        if !self.dir.exists() {
            return Ok(());
        }
        let names = PROGRAMS
            .iter()
            .flat_map(|(p, _)| [format!("link_{p}"), format!("prog_{p}")])
            .chain(MAPS.iter().map(|m| m.to_string()));
        for name in names {
            let path = self.pin(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(TrackerError::Pin {
                        path: path.display().to_string(),
                        op: "unpin",
                        source,
                    })
                }
            }
        }
        std::fs::remove_dir(&self.dir).map_err(|source| TrackerError::Pin {
            path: self.dir.display().to_string(),
            op: "remove directory",
            source,
        })
    }

    fn program_info(&self, name: &str) -> Result<ProgramInfo, TrackerError> {
        ProgramInfo::from_pin(self.pin(&format!("prog_{name}"))).map_err(|e| TrackerError::Pin {
            path: self.pin(&format!("prog_{name}")).display().to_string(),
            op: "read program info",
            source: std::io::Error::other(e),
        })
    }

    /// Id of the loaded `bio_queue` program, if any (tests use it to check
    /// that removing the last device unloads the program).
    pub fn program_id(&self) -> Option<u32> {
        self.program_info("bio_queue").ok().map(|i| i.id())
    }
}

fn name_static(name: &str) -> &'static str {
    MAPS.iter().find(|m| **m == name).copied().unwrap_or("?")
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    // The longest mount point that contains `dir` decides its filesystem.
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(point)
                .then(|| (point.len(), fstype == "bpf"))
        })
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, bpf)| bpf)
}

impl Loaded {
    fn entries(&self) -> Result<Vec<(u32, DiskEntry)>, TrackerError> {
        self.disks
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("DISKS", "iterate"))
    }

    fn find(&self, dev: DevNum) -> Result<Option<(u32, SlotRef)>, TrackerError> {
        Ok(self.entries()?.into_iter().find_map(|(disk, e)| {
            e.slots[..e.count as usize]
                .iter()
                .find(|s| s.dev == dev.kernel())
                .map(|s| (disk, *s))
        }))
    }

    fn words(&mut self, slot: u32) -> Result<&sys::mmap::SharedWords, TrackerError> {
        if !self.mapped.contains_key(&slot) {
            let inner: MapData = self
                .bitmaps
                .get(&slot, 0)
                .map_err(map_err("BITMAPS", "look up bitmap"))?;
            let len = inner
                .info()
                .map_err(map_err("BITMAPS", "read bitmap info"))?
                .max_entries();
            let words = sys::mmap::SharedWords::map(inner.fd().as_fd(), len as usize)
                .map_err(map_err("BITMAPS", "mmap bitmap"))?;
            self.mapped.insert(slot, words);
        }
        Ok(&self.mapped[&slot])
    }

    /// The slots some disk entry refers to.
    fn used_slots(&self) -> Result<BTreeSet<u32>, TrackerError> {
        Ok(self
            .entries()?
            .iter()
            .flat_map(|(_, e)| {
                e.slots[..e.count as usize]
                    .iter()
                    .map(|s| s.slot)
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// Moves ranges the program could not mark inline into their bitmaps, so
    /// that a following peek or drain sees them.
    fn fold_wide(&mut self) -> Result<(), TrackerError> {
        self.fold_wide_with(None)
    }

    /// [`Self::fold_wide`], also folding the records of `retired`, a slot
    /// just taken out of the disk entries, into its bitmap.
    fn fold_wide_with(
        &mut self,
        retired: Option<(u32, &sys::mmap::SharedWords)>,
    ) -> Result<(), TrackerError> {
        let mut records = Vec::new();
        while let Some(item) = self.wide.next() {
            if item.len() >= std::mem::size_of::<WideRecord>() {
                // SAFETY: the ring item holds at least one WideRecord written
                // by the program; read_unaligned copes with any alignment.
                records.push(unsafe { item.as_ptr().cast::<WideRecord>().read_unaligned() });
            }
        }
        let live = self.used_slots()?;
        for rec in records {
            let words = match retired {
                Some((slot, words)) if slot == rec.slot => words,
                _ if live.contains(&rec.slot) => self.words(rec.slot)?,
                _ => continue,
            };
            bitmap::set_range(words.words(), rec.first_chunk, rec.last_chunk);
        }
        Ok(())
    }

    /// Takes a free slot and gives it an empty bitmap of `chunks` bits and
    /// zeroed counters; no disk entry refers to it yet.
    fn install_slot(&mut self, chunks: u64) -> Result<u32, TrackerError> {
        let used = self.used_slots()?;
        let slot = (0..MAX_SLOTS)
            .find(|s| !used.contains(s))
            .ok_or(TrackerError::TooManyDevices { max: MAX_SLOTS })?;
        let words = tracker_common::words_for_chunks(chunks).max(1) as u32;
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        let def = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 8, words, BITMAP_MAP_FLAGS);
        let inner = MapData::create(def, "ferry_bitmap", None)
            .map_err(map_err("BITMAPS", "create bitmap"))?;
        self.bitmaps
            .set(slot, &inner, 0)
            .map_err(map_err("BITMAPS", "install bitmap"))?;
        let ncpus = sys::possible_cpus().map_err(map_err("STATS", "count CPUs"))?;
        let zero = PerCpuValues::try_from(vec![SlotStats::default(); ncpus])
            .map_err(map_err("STATS", "reset"))?;
        self.stats
            .set(slot, zero, 0)
            .map_err(map_err("STATS", "reset"))?;
        self.mapped.remove(&slot);
        Ok(slot)
    }

    fn counters(&self, slot: u32) -> Result<Counters, TrackerError> {
        let values = self.stats.get(&slot, 0).map_err(map_err("STATS", "read"))?;
        Ok(values.iter().fold(Counters::default(), |c, s| Counters {
            events: c.events + s.others + s.writes,
            writes: c.writes + s.writes,
            completions: c.completions + s.completions,
            overflows: c.overflows + s.overflows,
            wide: c.wide + s.wide,
        }))
    }
}

impl Tracker for LinuxTracker {
    fn add(&mut self, spec: &TrackSpec) -> Result<Epoch, TrackerError> {
        let dev = spec.device.dev;
        let chunks = checked_chunks(spec)?;
        if let Some(loaded) = self.open()? {
            if loaded.find(dev)?.is_some() {
                return Err(TrackerError::AlreadyTracked { dev });
            }
        }
        let loaded = self.ensure_loaded()?;
        let disk = spec.device.disk.kernel();
        let mut entry = loaded
            .entries()?
            .into_iter()
            .find(|(d, _)| *d == disk)
            .map(|(_, e)| e)
            .unwrap_or_default();
        if entry.count as usize >= MAX_SLOTS_PER_DISK {
            return Err(TrackerError::TooManyDevices {
                max: MAX_SLOTS_PER_DISK as u32,
            });
        }
        // Bitmap and counters first, then the disk entry: the program only
        // finds the slot once everything it needs exists.
        let slot = loaded.install_slot(chunks)?;
        entry.slots[entry.count as usize] = slot_ref(spec, slot);
        entry.count += 1;
        entry.zone_sectors = spec.device.zone_sectors;
        if spec.device.request_based {
            entry.flags |= tracker_common::DISK_RQ_BASED;
        }
        loaded
            .disks
            .insert(disk, entry, 0)
            .map_err(map_err("DISKS", "insert"))?;
        self.epoch()?
            .ok_or_else(|| TrackerError::Load("tracker vanished after load".into()))
    }

    fn resize(&mut self, spec: &TrackSpec) -> Result<Resized, TrackerError> {
        let dev = spec.device.dev;
        let chunks = checked_chunks(spec)?;
        let loaded = self.open()?.ok_or(TrackerError::NotTracked { dev })?;
        let (disk, old) = loaded.find(dev)?.ok_or(TrackerError::NotTracked { dev })?;
        let slot = loaded.install_slot(chunks)?;
        // The old bitmap stays mapped (and so alive) after it leaves BITMAPS.
        loaded.words(old.slot)?;
        let old_words = loaded.mapped.remove(&old.slot).expect("mapped just now");
        let mut entry = loaded
            .disks
            .get(&disk, 0)
            .map_err(map_err("DISKS", "read"))?;
        for s in &mut entry.slots[..entry.count as usize] {
            if s.slot == old.slot {
                *s = slot_ref(spec, slot);
            }
        }
        // One update replaces the whole entry: a program run sees the old
        // slot or the new one, and from here on every mark, the completion
        // marks of writes already in flight included, lands in the new one.
        loaded
            .disks
            .insert(disk, entry, 0)
            .map_err(map_err("DISKS", "update"))?;
        // Deleting from an array of maps returns only once every program
        // run that began before it has ended (the kernel waits for an RCU
        // grace period), so no run still holds the old bitmap after this.
        sys::bpf::delete_array_entry(loaded.bitmaps_raw.fd().as_fd(), old.slot)
            .map_err(map_err("BITMAPS", "free bitmap"))?;
        loaded.fold_wide_with(Some((old.slot, &old_words)))?;
        Ok(Resized {
            bits: bitmap::take(old_words.words()),
            overflows: loaded.counters(old.slot)?.overflows,
        })
    }

    fn remove(&mut self, dev: DevNum) -> Result<(), TrackerError> {
        let Some(loaded) = self.open()? else {
            return Err(TrackerError::NotTracked { dev });
        };
        let (disk, slot) = loaded.find(dev)?.ok_or(TrackerError::NotTracked { dev })?;
        let mut entry = loaded
            .disks
            .get(&disk, 0)
            .map_err(map_err("DISKS", "read"))?;
        let kept: Vec<SlotRef> = entry.slots[..entry.count as usize]
            .iter()
            .copied()
            .filter(|s| s.slot != slot.slot)
            .collect();
        if kept.is_empty() {
            loaded
                .disks
                .remove(&disk)
                .map_err(map_err("DISKS", "remove"))?;
        } else {
            entry.slots = [SlotRef::default(); MAX_SLOTS_PER_DISK];
            entry.slots[..kept.len()].copy_from_slice(&kept);
            entry.count = kept.len() as u32;
            loaded
                .disks
                .insert(disk, entry, 0)
                .map_err(map_err("DISKS", "update"))?;
        }
        loaded.mapped.remove(&slot.slot);
        sys::bpf::delete_array_entry(loaded.bitmaps_raw.fd().as_fd(), slot.slot)
            .map_err(map_err("BITMAPS", "free bitmap"))?;
        if loaded.entries()?.is_empty() {
            self.unpin_all()?;
        }
        Ok(())
    }

    fn list(&mut self) -> Result<Vec<SlotStatus>, TrackerError> {
        let Some(loaded) = self.open()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (disk, e) in loaded.entries()? {
            for s in &e.slots[..e.count as usize] {
                let words = loaded.words(s.slot)?.words().len() as u64;
                out.push(SlotStatus {
                    dev: DevNum::from_kernel(s.dev),
                    disk: DevNum::from_kernel(disk),
                    start_sector: s.start_sector,
                    nr_sectors: s.nr_sectors,
                    chunk: ChunkSize::from_shift(s.chunk_shift).unwrap_or(ChunkSize::DEFAULT),
                    slot: s.slot,
                    counters: loaded.counters(s.slot)?,
                    bitmap_bytes: (words * 8).div_ceil(4096) * 4096,
                });
            }
        }
        out.sort_by_key(|s| s.dev);
        Ok(out)
    }

    fn epoch(&mut self) -> Result<Option<Epoch>, TrackerError> {
        if self.open()?.is_none() {
            return Ok(None);
        }
        let info = self.program_info("bio_queue")?;
        let boot_id = sys::boot_id().map_err(|source| TrackerError::Pin {
            path: "/proc/sys/kernel/random/boot_id".into(),
            op: "read",
            source,
        })?;
        let loaded_at_ns = info
            .loaded_at()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Some(Epoch {
            boot_id,
            program_id: info.id(),
            loaded_at_ns,
        }))
    }

    fn peek(&mut self, dev: DevNum) -> Result<RoaringBitmap, TrackerError> {
        let loaded = self.open()?.ok_or(TrackerError::NotTracked { dev })?;
        let (_, slot) = loaded.find(dev)?.ok_or(TrackerError::NotTracked { dev })?;
        loaded.fold_wide()?;
        Ok(bitmap::peek(loaded.words(slot.slot)?.words()))
    }

    fn drain(&mut self, dev: DevNum) -> Result<RoaringBitmap, TrackerError> {
        let loaded = self.open()?.ok_or(TrackerError::NotTracked { dev })?;
        let (_, slot) = loaded.find(dev)?.ok_or(TrackerError::NotTracked { dev })?;
        loaded.fold_wide()?;
        Ok(bitmap::take(loaded.words(slot.slot)?.words()))
    }

    fn reclaim(&mut self, dev: DevNum, set: &RoaringBitmap) -> Result<(), TrackerError> {
        let loaded = self.open()?.ok_or(TrackerError::NotTracked { dev })?;
        let (_, slot) = loaded.find(dev)?.ok_or(TrackerError::NotTracked { dev })?;
        bitmap::set_all(loaded.words(slot.slot)?.words(), set);
        Ok(())
    }

    fn missed_runs(&mut self) -> Result<u64, TrackerError> {
        if self.open()?.is_none() {
            return Ok(0);
        }
        let mut total = 0;
        for (name, _) in PROGRAMS {
            let pin = self.pin(&format!("prog_{name}"));
            total += crate::sys::bpf::prog_recursion_misses(&pin).map_err(|source| {
                TrackerError::Pin {
                    path: pin.display().to_string(),
                    op: "read program info",
                    source,
                }
            })?;
        }
        Ok(total)
    }

    fn stats(&mut self) -> Result<Vec<ProgramStats>, TrackerError> {
        if self.open()?.is_none() {
            return Ok(Vec::new());
        }
        PROGRAMS
            .iter()
            .map(|(name, _)| {
                let info = self.program_info(name)?;
                Ok(ProgramStats {
                    name: (*name).to_owned(),
                    id: info.id(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
}
