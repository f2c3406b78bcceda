//! Data for the scratch disks of the benches: files that fill a filesystem
//! (half random, half log-like text), random 4 KiB churn and a full
//! overwrite, all from a seeded fast PRNG so that runs write the same bytes.
//! Writes to a device use O_DIRECT, so they reach it (and its tracker) at
//! once rather than sitting in the page cache.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::standby::mib;
use crate::sys;
use crate::util::say;

const BLOCK: u64 = 4096;
/// Write size of the full overwrite.
const OVERWRITE_IO: usize = 1 << 20;

/// Writes files into `dir` until they hold `goal` bytes: sizes from 4 KiB to
/// 32 MiB spread evenly over the powers of two (many small files, most bytes
/// in big ones), half random and half log-like text.
pub fn fill(dir: &Path, goal: u64, seed: u64) -> Result<()> {
    const PER_DIR: u64 = 100;
    let mut rng = Rng::new(seed);
    let pool = text_pool(&mut rng, 8 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let (mut files, mut random, mut text) = (0u64, 0u64, 0u64);
    while random + text < goal {
        if sys::interrupted() {
            bail!("interrupted");
        }
        let subdir = dir.join(format!("d{:03}", files / PER_DIR));
        if files % PER_DIR == 0 {
            fs::create_dir(&subdir)
                .with_context(|| format!("creating {} failed", subdir.display()))?;
        }
        let size = (1u64 << (12 + rng.below(14))).min(goal - random - text);
        let is_text = rng.below(2) == 0;
        let path = subdir.join(format!(
            "f{files:05}.{}",
            if is_text { "log" } else { "bin" }
        ));
        let mut file =
            File::create(&path).with_context(|| format!("creating {} failed", path.display()))?;
        let mut at = usize::try_from(rng.below(pool.len() as u64)).unwrap_or(0);
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let piece = if is_text {
                let end = (at + want).min(pool.len());
                let piece = &pool[at..end];
                at = if end == pool.len() { 0 } else { end };
                piece
            } else {
                rng.fill(&mut buf[..want]);
                &buf[..want]
            };
            file.write_all(piece)
                .with_context(|| format!("writing {} failed", path.display()))?;
            left -= piece.len() as u64;
        }
        if is_text {
            text += size;
        } else {
            random += size;
        }
        files += 1;
    }
    say!(
        "wrote {files} files: {} random, {} text-like",
        mib(random),
        mib(text)
    );
    Ok(())
}

/// Log-like lines: compressible, as text on real disks is, but not trivially.
fn text_pool(rng: &mut Rng, len: usize) -> Vec<u8> {
    const HOSTS: &[&str] = &["web1", "web2", "db1", "cache3", "batch7", "edge11"];
    const PROGRAMS: &[&str] = &["sshd", "nginx", "postgres", "cron", "kernel", "app"];
    const EVENTS: &[&str] = &[
        "accepted publickey for deploy",
        "GET /api/v1/orders HTTP/1.1 200",
        "POST /api/v1/login HTTP/1.1 302",
        "checkpoint complete: wrote pages",
        "session opened for user backup",
        "connection reset by peer",
        "slow query: SELECT * FROM events WHERE id =",
        "cache miss for key user:",
    ];
    let pick = |rng: &mut Rng, list: &[&'static str]| list[rng.below(list.len() as u64) as usize];
    let mut pool = Vec::with_capacity(len + 256);
    while pool.len() < len {
        let (host, program, event) = (pick(rng, HOSTS), pick(rng, PROGRAMS), pick(rng, EVENTS));
        let _ = writeln!(
            pool,
            "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z {host} {program}[{}]: {event} {} from 10.{}.{}.{} port {}",
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1000),
            1000 + rng.below(60000),
            rng.below(100_000),
            rng.below(256),
            rng.below(256),
            rng.below(256),
            1024 + rng.below(64000),
        );
    }
    pool.truncate(len);
    pool
}

/// The distinct 4 KiB blocks a churn of `percent` of `device_bytes`
/// rewrites, in random order.
pub fn churn_blocks(rng: &mut Rng, device_bytes: u64, percent: f64) -> Vec<u64> {
    let total = device_bytes / BLOCK;
    let count = ((total as f64 * percent / 100.0).round() as u64).clamp(1, total);
    let mut blocks: Vec<u64> = (0..total).collect();
    // The first `count` steps of a Fisher-Yates shuffle: a uniform sample.
    for i in 0..count {
        let j = i + rng.below(total - i);
        blocks.swap(i as usize, j as usize);
    }
    blocks.truncate(count as usize);
    blocks
}

fn open_direct(device: &str) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("opening {device} for O_DIRECT writes failed"))
}

/// Writes fresh random data to each 4 KiB block in `blocks`.
pub fn write_blocks(device: &str, blocks: &[u64], rng: &mut Rng) -> Result<()> {
    let file = open_direct(device)?;
    let mut buf = AlignedBuf::new(BLOCK as usize);
    for &block in blocks {
        if sys::interrupted() {
            bail!("interrupted");
        }
        rng.fill(buf.as_mut());
        let offset = block * BLOCK;
        file.write_all_at(buf.as_ref(), offset)
            .with_context(|| format!("writing 4 KiB at {offset} of {device} failed"))?;
    }
    file.sync_all()
        .with_context(|| format!("flushing {device} failed"))
}

/// Overwrites the whole device with fresh random data.
pub fn overwrite(device: &str, bytes: u64, rng: &mut Rng) -> Result<()> {
    let file = open_direct(device)?;
    let mut buf = AlignedBuf::new(OVERWRITE_IO);
    let start = Instant::now();
    let mut offset = 0;
    while offset < bytes {
        if sys::interrupted() {
            bail!("interrupted");
        }
        let len =
            usize::try_from((bytes - offset).min(OVERWRITE_IO as u64)).unwrap_or(OVERWRITE_IO);
        rng.fill(&mut buf.as_mut()[..len]);
        file.write_all_at(&buf.as_ref()[..len], offset)
            .with_context(|| format!("writing {len} bytes at {offset} of {device} failed"))?;
        offset += len as u64;
    }
    file.sync_all()
        .with_context(|| format!("flushing {device} failed"))?;
    say!(
        "wrote {} in {:.1} s",
        mib(bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A buffer aligned for O_DIRECT.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + Self::ALIGN];
        let addr = storage.as_ptr().addr();
        let start = addr.next_multiple_of(Self::ALIGN) - addr;
        Self {
            storage,
            start,
            len,
        }
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// wyrand: fast enough to make gigabytes of incompressible data in a
/// second or two (/dev/urandom is far slower), and seeded so runs repeat.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (product >> 64) as u64 ^ product as u64
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_picks_distinct_blocks_on_the_device() {
        let mut rng = Rng::new(7);
        let blocks = churn_blocks(&mut rng, 64 << 20, 1.0);
        assert_eq!(blocks.len(), 164); // 1% of 16384 blocks, rounded
        let mut sorted = blocks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), blocks.len());
        assert!(sorted.iter().all(|&b| b < 16384));
    }

    #[test]
    fn full_churn_covers_every_block() {
        let mut rng = Rng::new(7);
        let mut blocks = churn_blocks(&mut rng, 1 << 20, 100.0);
        blocks.sort_unstable();
        assert_eq!(blocks, (0..256).collect::<Vec<u64>>());
    }

    #[test]
    fn rng_fills_odd_lengths_and_stays_below_its_bound() {
        let mut rng = Rng::new(1);
        let mut buf = [0u8; 13];
        rng.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
        assert!((0..1000).all(|_| rng.below(3) < 3));
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut buf = AlignedBuf::new(4096);
        assert_eq!(buf.as_mut().as_ptr().addr() % AlignedBuf::ALIGN, 0);
        assert_eq!(buf.as_ref().len(), 4096);
    }
}
