//! Invariant 1 under load: writers hammer a tracked device with O_DIRECT
//! writes while a drainer drains in a loop and copies every drained extent
//! into a replica, exactly as a sync would. If a drain could clear a bit while
//! its write is still in flight without the completion marking it again, the
//! replica would keep the stale data it read, and the final comparison fails.
//! The union of the drains must also cover every chunk the writers logged.

use std::{
    collections::BTreeSet,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ferry::{dirty::store::Store, track::Tracking, tracker::linux::LinuxTracker};
use rand::{Rng, SeedableRng};

use crate::util::{open_direct, privileged, AlignedBuf, Ferry, LoopDev};

const DEVICE: u64 = 128 << 20;
/// 64 KiB writes at 4 KiB-aligned offsets straddle chunks and words.
const BLOCK: usize = 64 * 1024;
const CHUNK: u64 = 4096;

fn seconds() -> u64 {
    std::env::var("FERRY_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

#[test]
fn concurrent_writers_and_drainer_lose_nothing() {
    if !privileged("concurrent_writers_and_drainer_lose_nothing") {
        return;
    }
    let dev = LoopDev::new(DEVICE);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg(), "--chunk-size", "4K"]);

    let writers = Writers::start(&dev);
    let mut tracking = Tracking::new(
        LinuxTracker::new(&f.bpf).unwrap(),
        Store::open(&f.state).unwrap(),
    );
    let src = open_direct(&dev.path);
    let mut replica = vec![0u8; DEVICE as usize];
    let mut drained = BTreeSet::new();
    let mut drains = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds());
    while Instant::now() < deadline {
        copy_drained(&mut tracking, &dev, &src, &mut replica, &mut drained);
        drains += 1;
    }
    let (writes, written) = writers.stop();
    copy_drained(&mut tracking, &dev, &src, &mut replica, &mut drained);

    drop(tracking); // releases the state lock for the CLI below

    // Writes marked at submission were marked again at completion: the
    // completion mark is what keeps a drain racing a write lossless. Loop is
    // request-based, so completions count requests; random 64 KiB writes
    // from two threads almost never merge, so the counts nearly match.
    let list = f.json(&["track", "list"]);
    let counters = &list["devices"][0]["counters"];
    let (w, c) = (
        counters["writes"].as_u64().unwrap(),
        counters["completions"].as_u64().unwrap(),
    );
    assert!(
        w > 0 && c * 100 >= w * 99,
        "completions not marked: {counters}"
    );
    assert_eq!(counters["overflows"], 0, "{counters}");

    let missed: Vec<_> = written.difference(&drained).take(10).collect();
    assert!(
        missed.is_empty(),
        "{} written chunks never drained, e.g. {missed:?}",
        written.len()
    );

    let stale = stale_chunks(&src, &replica);
    assert!(
        stale.is_empty(),
        "replica is stale at chunks {stale:?} after {writes} writes, {drains} drains"
    );
    eprintln!(
        "torture: {writes} writes, {drains} drains, {} chunks written, no loss",
        written.len()
    );
    assert!(
        writes > 1000 && drains >= 20,
        "too little load to prove anything: {writes} writes, {drains} drains"
    );
}

/// Two [`writer`]s on a device's first [`DEVICE`] bytes.
struct Writers {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<BTreeSet<u64>>>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Writers {
    fn start(dev: &LoopDev) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(BTreeSet::new()));
        let threads = (0..2u64)
            .map(|id| {
                let (path, stop, written) = (dev.path.clone(), stop.clone(), written.clone());
                std::thread::spawn(move || writer(id, path, &stop, &written))
            })
            .collect();
        Self {
            stop,
            written,
            threads,
        }
    }

    /// Stops them; the writes made, and the chunks they wrote.
    fn stop(mut self) -> (u64, BTreeSet<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut self.threads);
        let writes = threads.into_iter().map(|w| w.join().unwrap()).sum();
        let written = std::mem::take(&mut *self.written.lock().unwrap());
        (writes, written)
    }
}

impl Drop for Writers {
    /// A failed test stops them too, before its device goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.threads.drain(..) {
            let _ = w.join();
        }
    }
}

/// Drains `dev` and copies each drained extent from `src` into `replica`
/// (grown as the extents need), as a sync would; records the chunks.
fn copy_drained(
    tracking: &mut Tracking<LinuxTracker>,
    dev: &LoopDev,
    src: &std::fs::File,
    replica: &mut Vec<u8>,
    drained: &mut BTreeSet<u64>,
) {
    let report = tracking.drain(&dev.path).unwrap();
    assert_eq!(report.state, "tracking", "{:?}", report.reason);
    for [offset, len] in report.extents {
        let end = (offset + len) as usize;
        if replica.len() < end {
            replica.resize(end, 0);
        }
        let mut buf = AlignedBuf::new(len as usize);
        src.read_exact_at(buf.as_mut(), offset).unwrap();
        replica[offset as usize..end].copy_from_slice(buf.as_ref());
        drained.extend((offset / CHUNK)..((offset + len) / CHUNK));
    }
}

/// The first chunks (ten at most) where `replica` differs from the device.
fn stale_chunks(src: &std::fs::File, replica: &[u8]) -> Vec<u64> {
    let mut now = AlignedBuf::new(replica.len());
    src.read_exact_at(now.as_mut(), 0).unwrap();
    (0..replica.len() as u64 / CHUNK)
        .filter(|c| {
            let r = (*c * CHUNK) as usize..((*c + 1) * CHUNK) as usize;
            replica[r.clone()] != now.as_ref()[r]
        })
        .take(10)
        .collect()
}

/// Writes random 64 KiB blocks, each stamped with (writer, sequence), until
/// told to stop; logs every chunk whose write completed. Returns the count.
fn writer(id: u64, path: PathBuf, stop: &AtomicBool, written: &Mutex<BTreeSet<u64>>) -> u64 {
    let file = open_direct(&path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(id);
    let mut buf = AlignedBuf::new(BLOCK);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // 4 KiB-aligned, so writes straddle chunks and bitmap words.
        let offset = rng.gen_range(0..(DEVICE - BLOCK as u64) / 4096) * 4096;
        seq += 1;
        let stamp = (id << 56) | seq;
        for word in buf.as_mut().chunks_exact_mut(8) {
            word.copy_from_slice(&stamp.to_le_bytes());
        }
        file.write_all_at(buf.as_ref(), offset).unwrap();
        written
            .lock()
            .unwrap()
            .extend(offset / CHUNK..(offset + BLOCK as u64) / CHUNK);
    }
    seq
}

/// A volume grown again and again while writers hammer its old space: each
/// growth moves tracking to a new bitmap, and no write may fall between the
/// old bitmap and the new one.
#[test]
fn growing_under_writers_loses_nothing() {
    if !privileged("growing_under_writers_loses_nothing") {
        return;
    }
    const STEP: u64 = 4 << 20;
    const GROWTHS: u64 = 24;
    let dev = LoopDev::new(DEVICE);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg(), "--chunk-size", "4K"]);
    let writers = Writers::start(&dev);
    let mut tracking = Tracking::new(
        LinuxTracker::new(&f.bpf).unwrap(),
        Store::open(&f.state).unwrap(),
    );
    let src = open_direct(&dev.path);
    let mut replica = vec![0u8; DEVICE as usize];
    let mut drained = BTreeSet::new();
    for i in 1..=GROWTHS {
        copy_drained(&mut tracking, &dev, &src, &mut replica, &mut drained);
        dev.grow(DEVICE + i * STEP);
        copy_drained(&mut tracking, &dev, &src, &mut replica, &mut drained);
    }
    let (writes, written) = writers.stop();
    copy_drained(&mut tracking, &dev, &src, &mut replica, &mut drained);

    assert_eq!(
        replica.len() as u64,
        DEVICE + GROWTHS * STEP,
        "the grown space was not all marked dirty"
    );
    let missed: Vec<_> = written.difference(&drained).take(10).collect();
    assert!(
        missed.is_empty(),
        "written chunks never drained: {missed:?}"
    );
    let stale = stale_chunks(&src, &replica);
    assert!(
        stale.is_empty(),
        "replica is stale at chunks {stale:?} after {writes} writes and {GROWTHS} growths"
    );
    assert!(
        writes > 100,
        "too little load to prove anything: {writes} writes"
    );
}
