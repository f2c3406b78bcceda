//! Images under /var/tmp checked against an in-memory model of the disk and
//! against qemu-img itself (`check`, `compare`, `snapshot -l`, `convert`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;

const MIB: u64 = 1 << 20;
const IMG: &str = "disk.qcow2";

/// A directory under /var/tmp, removed on drop, even on panic.
struct TempDir {
    path: PathBuf,
    dir: Dir,
}

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = PathBuf::from("/var/tmp").join(format!(
            "ferry-qcow2-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&path).unwrap();
        let dir = Dir::open(&path).unwrap();
        Self { path, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn img(&self) -> PathBuf {
        self.file(IMG)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img check` finds neither corruptions nor leaks.
fn assert_clean(path: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        path.display(),
        text(&out)
    );
}

/// `qemu-img compare` finds the image's working content equal to `model`.
fn assert_same(tmp: &TempDir, model: &[u8]) {
    let raw = tmp.file("model.raw");
    fs::write(&raw, model).unwrap();
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        tmp.img().to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "qemu-img compare: {}", text(&out));
}

/// A snapshot's content as qemu-img reads it.
fn snapshot_content(tmp: &TempDir, name: &str) -> Vec<u8> {
    let out_path = tmp.file("snapshot.raw");
    let _ = fs::remove_file(&out_path);
    let out = qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        &format!("snapshot.name={name}"),
        tmp.img().to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    fs::read(&out_path).unwrap()
}

fn assert_snapshot(tmp: &TempDir, name: &str, model: &[u8]) {
    let got = snapshot_content(tmp, name);
    assert_bytes(&format!("snapshot {name}"), &got, model);
}

/// Snapshot names as `qemu-img snapshot -l` lists them.
fn qemu_snapshot_names(path: &Path) -> Vec<String> {
    let out = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]);
    assert!(out.status.success(), "qemu-img snapshot -l: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

fn assert_reads(img: &mut Qcow2, model: &[u8]) {
    assert_bytes("the working image", &read_all(img), model);
}

/// Deterministic, incompressible bytes for a write (splitmix64: cheap even
/// in debug builds).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Panics naming the first byte where `got` and `want` differ.
fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "size of {what}");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!("{what} differs from its model at byte {i}");
    }
}

fn write(img: &mut Qcow2, model: &mut [u8], offset: u64, data: &[u8]) {
    img.write_at(offset, data).unwrap();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn zero(img: &mut Qcow2, model: &mut [u8], offset: u64, len: u64) {
    img.write_zeroes(offset, len).unwrap();
    model[offset as usize..(offset + len) as usize].fill(0);
}

#[test]
fn random_writes_read_back_and_pass_qemu_check() {
    let tmp = TempDir::new("random");
    let size = 40 * MIB;
    let mut img = Qcow2::create(&tmp.dir, IMG, size).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(1);
    for i in 0..200 {
        let len = rng.gen_range(1..200_000u64);
        let offset = rng.gen_range(0..size - len);
        write(&mut img, &mut model, offset, &pattern(len as usize, i));
        let mut back = vec![0u8; len as usize];
        img.read_at(offset, &mut back).unwrap();
        assert_bytes(
            "a write",
            &back,
            &model[offset as usize..(offset + len) as usize],
        );
    }
    assert_reads(&mut img, &model);
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &model);
    assert!(matches!(
        img.write_at(size - 1, &[1, 2]),
        Err(ImageError::OutOfRange { .. })
    ));
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    // 512-byte clusters: a refcount block counts 128 KiB, the first table
    // cluster 8 MiB, so 20 MiB of data needs a bigger table.
    let tmp = TempDir::new("grow");
    let size = 24 * MIB;
    let mut img = Qcow2::create_with(&tmp.dir, IMG, size, 9).unwrap();
    let mut model = vec![0u8; size as usize];
    let first_table = img.rt_offset;
    for (i, offset) in (0..20 * MIB).step_by(MIB as usize).enumerate() {
        write(
            &mut img,
            &mut model,
            offset,
            &pattern(MIB as usize, i as u64),
        );
    }
    img.create_boot_point("V1").unwrap();
    write(
        &mut img,
        &mut model,
        3 * MIB + 100,
        &pattern(3 * MIB as usize, 99),
    );
    assert_ne!(img.rt_offset, first_table, "the refcount table moved");
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &model);
    drop(img);
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    assert_reads(&mut img, &model);
}

/// Write A, boot point V1, write B, boot point V2, write C; returns the
/// models at V1, V2 and now.
fn three_generations(img: &mut Qcow2) -> [Vec<u8>; 3] {
    let size = img.size();
    let mut model = vec![0u8; size as usize];
    write(img, &mut model, 0, &pattern(3 * MIB as usize, 1));
    write(img, &mut model, 5 * MIB + 1000, &pattern(100_000, 2));
    img.create_boot_point("V1").unwrap();
    let v1 = model.clone();
    write(img, &mut model, MIB / 2 + 7, &pattern(MIB as usize, 3));
    write(img, &mut model, 6 * MIB, &pattern(70_000, 4));
    img.create_boot_point("V2").unwrap();
    let v2 = model.clone();
    write(img, &mut model, 10, &pattern(2 * MIB as usize, 5));
    write(img, &mut model, size - 65_536 - 3, &pattern(65_539, 6));
    [v1, v2, model]
}

#[test]
fn boot_points_are_snapshots_qemu_reads() {
    let tmp = TempDir::new("snap");
    let mut img = Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap();
    let [v1, v2, now] = three_generations(&mut img);
    assert_eq!(img.boot_points(), ["V1", "V2"]);
    assert!(matches!(
        img.create_boot_point("V1"),
        Err(ImageError::BootPointExists { .. })
    ));
    assert_reads(&mut img, &now);
    img.flush().unwrap();
    assert_eq!(qemu_snapshot_names(&tmp.img()), ["V1", "V2"]);
    assert_snapshot(&tmp, "V1", &v1);
    assert_snapshot(&tmp, "V2", &v2);
    assert_same(&tmp, &now);
    assert_clean(&tmp.img());
}

#[test]
fn merge_and_delete_keep_the_rest() {
    let tmp = TempDir::new("merge");
    let mut img = Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap();
    let [_, v2, now] = three_generations(&mut img);
    img.create_boot_point("V3").unwrap();
    img.merge_oldest().unwrap();
    assert_eq!(img.boot_points(), ["V2", "V3"]);
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_snapshot(&tmp, "V2", &v2);
    assert_snapshot(&tmp, "V3", &now);
    assert_same(&tmp, &now);

    img.delete_boot_point("V3").unwrap();
    assert!(matches!(
        img.delete_boot_point("V3"),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
    let before = img.boot_points();
    img.merge_oldest().unwrap();
    assert_eq!(
        img.boot_points(),
        before,
        "one boot point has nothing to merge"
    );
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_snapshot(&tmp, "V2", &v2);
    assert_same(&tmp, &now);

    img.delete_boot_point("V2").unwrap();
    assert!(img.boot_points().is_empty());
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &now);
    assert_reads(&mut img, &now);
    // With no snapshot left everything is COPIED again: overwriting in
    // place allocates nothing.
    let end = img.end;
    img.write_at(0, &[7; 4096]).unwrap();
    assert_eq!(img.end, end);
}

#[test]
fn revert_restores_a_boot_point_that_later_writes_leave_alone() {
    let tmp = TempDir::new("revert");
    let mut img = Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap();
    let [v1, v2, _] = three_generations(&mut img);
    img.revert_to("V1").unwrap();
    assert_reads(&mut img, &v1);
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &v1);

    let mut model = v1.clone();
    write(&mut img, &mut model, 100, &pattern(MIB as usize, 7));
    zero(&mut img, &mut model, 2 * MIB, MIB);
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_snapshot(&tmp, "V1", &v1);
    assert_snapshot(&tmp, "V2", &v2);
    assert_same(&tmp, &model);
    assert!(matches!(
        img.revert_to("V9"),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
}

#[test]
fn write_zeroes_over_shared_and_private_clusters() {
    let tmp = TempDir::new("zero");
    let mut img = Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    write(&mut img, &mut model, 0, &pattern(4 * MIB as usize, 1));
    img.create_boot_point("V1").unwrap();
    let v1 = model.clone();
    // Shared clusters, whole and partial at both ends.
    zero(&mut img, &mut model, 1000, MIB);
    write(&mut img, &mut model, 2 * MIB, &pattern(MIB as usize, 2));
    // Private clusters (just written), and a range never allocated.
    zero(&mut img, &mut model, 2 * MIB + 5000, 300_000);
    zero(&mut img, &mut model, 5 * MIB, 2 * MIB);
    assert_reads(&mut img, &model);
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_snapshot(&tmp, "V1", &v1);
    assert_same(&tmp, &model);
    // Zeroing everything then dropping the boot point frees every data
    // cluster without leaking one.
    zero(&mut img, &mut model, 0, 8 * MIB);
    img.delete_boot_point("V1").unwrap();
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &model);
}

#[test]
fn reopen_keeps_everything() {
    let tmp = TempDir::new("reopen");
    let mut img = Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap();
    let [v1, v2, mut now] = three_generations(&mut img);
    img.flush().unwrap();
    drop(img);
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    assert_eq!(img.boot_points(), ["V1", "V2"]);
    assert_eq!(img.size(), 8 * MIB);
    assert_reads(&mut img, &now);
    write(&mut img, &mut now, 4 * MIB, &pattern(MIB as usize, 9));
    // Dropping without flush still writes the metadata out.
    drop(img);
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    assert_reads(&mut img, &now);
    img.revert_to("V2").unwrap();
    assert_reads(&mut img, &v2);
    drop(img);
    assert_clean(&tmp.img());
    assert_snapshot(&tmp, "V1", &v1);
}

#[test]
fn damaged_headers_are_refused() {
    let tmp = TempDir::new("damaged");
    drop(Qcow2::create(&tmp.dir, IMG, 8 * MIB).unwrap());
    let good = fs::read(tmp.img()).unwrap();
    let open_with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        edit(&mut bytes);
        fs::write(tmp.img(), &bytes).unwrap();
        Qcow2::open(&tmp.dir, IMG).err().expect("refused")
    };
    let bad_magic = open_with(&|b| b[0..4].copy_from_slice(b"QFI\0"));
    assert!(
        matches!(bad_magic, ImageError::Corrupt { .. }),
        "{bad_magic}"
    );
    let unknown_bit = open_with(&|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes()));
    assert!(
        matches!(unknown_bit, ImageError::Unsupported { .. }),
        "{unknown_bit}"
    );
    let dirty = open_with(&|b| b[79] = 1);
    assert!(matches!(dirty, ImageError::Unsupported { .. }), "{dirty}");
    let l1_past_end = open_with(&|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes()));
    assert!(
        matches!(l1_past_end, ImageError::Corrupt { .. }),
        "{l1_past_end}"
    );
    let v4 = open_with(&|b| b[4..8].copy_from_slice(&4u32.to_be_bytes()));
    assert!(matches!(v4, ImageError::Unsupported { .. }), "{v4}");
    // An L1 entry pointing past the end of the file.
    let l1_entry = open_with(&|b| {
        b[3 << 16..(3 << 16) + 8].copy_from_slice(&(1u64 << 30).to_be_bytes());
    });
    assert!(matches!(l1_entry, ImageError::Corrupt { .. }), "{l1_entry}");
    // Truncated.
    let short = open_with(&|b| b.truncate(50));
    assert!(matches!(short, ImageError::Corrupt { .. }), "{short}");
    fs::write(tmp.img(), &good).unwrap();
    Qcow2::open(&tmp.dir, IMG).unwrap();
}

#[test]
fn images_made_by_qemu_img_open_and_stay_clean() {
    for (tag, opts) in [
        ("v3", "cluster_size=65536"),
        ("v2", "cluster_size=65536,compat=0.10"),
        ("c512", "cluster_size=512"),
    ] {
        let tmp = TempDir::new(tag);
        let size = 6 * MIB;
        // Start from data qemu wrote, with a snapshot qemu took.
        let mut model = pattern(size as usize, 11);
        model[2 * MIB as usize..3 * MIB as usize].fill(0);
        let raw = tmp.file("src.raw");
        fs::write(&raw, &model).unwrap();
        let img_path = tmp.img();
        let out = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            raw.to_str().unwrap(),
            img_path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{tag}: {}", text(&out));
        let out = qemu_img(&["snapshot", "-c", "S0", img_path.to_str().unwrap()]);
        assert!(out.status.success(), "{tag}: {}", text(&out));
        let s0 = model.clone();

        let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
        assert_eq!(img.boot_points(), ["S0"], "{tag}");
        assert_reads(&mut img, &model);
        write(&mut img, &mut model, 12_345, &pattern(MIB as usize, 12));
        zero(&mut img, &mut model, 4 * MIB, MIB + 512);
        img.create_boot_point("V1").unwrap();
        let v1 = model.clone();
        write(&mut img, &mut model, 2 * MIB - 4096, &pattern(8192, 13));
        img.flush().unwrap();
        assert_clean(&img_path);
        assert_snapshot(&tmp, "S0", &s0);
        assert_snapshot(&tmp, "V1", &v1);
        assert_same(&tmp, &model);

        img.delete_boot_point("S0").unwrap();
        img.revert_to("V1").unwrap();
        img.flush().unwrap();
        assert_clean(&img_path);
        assert_eq!(qemu_snapshot_names(&img_path), ["V1"], "{tag}");
        assert_same(&tmp, &v1);
    }
    // A fresh qemu image, never written.
    let tmp = TempDir::new("fresh");
    let out = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        tmp.img().to_str().unwrap(),
        "64M",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    let mut model = vec![0u8; 64 * MIB as usize];
    write(&mut img, &mut model, 33 * MIB + 3, &pattern(300_000, 14));
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_same(&tmp, &model);
}

#[test]
fn too_many_boot_points_are_refused() {
    let tmp = TempDir::new("many");
    let mut img = Qcow2::create(&tmp.dir, IMG, MIB).unwrap();
    for i in 0..22 {
        img.write_at(i * 4096, &[i as u8 + 1; 4096]).unwrap();
        img.create_boot_point(&format!("V{i}")).unwrap();
    }
    assert!(matches!(
        img.create_boot_point("V22"),
        Err(ImageError::TooManyBootPoints { max: 22, .. })
    ));
    img.merge_oldest().unwrap();
    img.create_boot_point("V22").unwrap();
    img.flush().unwrap();
    assert_clean(&tmp.img());
    assert_eq!(qemu_snapshot_names(&tmp.img()).len(), 22);
}

/// Whether `qemu-img check` found at worst leaks, and COPIED flags clear
/// on clusters with refcount 1 (harmless: they only cost a copy).
fn only_harmless_damage(path: &Path) -> Result<(), String> {
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    match out.status.code() {
        Some(0 | 3) => Ok(()),
        Some(2) => {
            let report = text(&out);
            let bad: Vec<&str> = report
                .lines()
                .filter(|l| l.starts_with("ERROR"))
                .filter(|l| !(l.contains("OFLAG_COPIED") && l.ends_with("refcount=1")))
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(report)
            }
        }
        _ => Err(text(&out)),
    }
}

/// Boot points by name, with their models.
type Points = Vec<(String, Vec<u8>)>;

/// The starting point of the crash tests: an image with boot point V0 and
/// later writes, flushed.
struct CrashBase {
    file: Vec<u8>,
    v0: Vec<u8>,
}

/// What a crash run did.
struct CrashRun {
    writes: u64,
    points: Points,
    /// Writes made when a commit began writing a moved refcount table.
    table_moved: Option<u64>,
}

fn crash_base(cluster_bits: u32, size: u64) -> CrashBase {
    let tmp = TempDir::new("crash-base");
    let q = size / 4;
    let mut img = Qcow2::create_with(&tmp.dir, IMG, size, cluster_bits).unwrap();
    let mut model = vec![0u8; size as usize];
    write(&mut img, &mut model, 0, &pattern(3 * q as usize, 1));
    img.create_boot_point("V0").unwrap();
    let v0 = model.clone();
    write(&mut img, &mut model, q, &pattern(q as usize, 2));
    img.flush().unwrap();
    drop(img);
    CrashBase {
        file: fs::read(tmp.img()).unwrap(),
        v0,
    }
}

/// Opens `base` and runs snapshot work, copy-on-write and frees on it,
/// stopped after write number `crash_after`.
fn crash_run(tmp: &TempDir, base: &CrashBase, crash_after: u64) -> CrashRun {
    fs::write(tmp.img(), &base.file).unwrap();
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    img.skip_sync = true;
    img.crash_after = Some(crash_after);
    let size = img.size();
    let q = size / 4;
    let mut points = vec![("V0".to_owned(), base.v0.clone())];
    let steps = |img: &mut Qcow2, points: &mut Points| {
        img.write_at(10_000, &pattern(q as usize, 3))?;
        img.write_zeroes(2 * q - 5000, q)?;
        let mut m = vec![0u8; size as usize];
        img.read_at(0, &mut m)?;
        // Pushed first: a boot point whose creation the crash cut short
        // may be there or not, but if it is, it must be whole.
        points.push(("V1".to_owned(), m));
        img.create_boot_point("V1")?;
        img.write_at(3 * q, &pattern(q as usize, 4))?;
        img.revert_to("V0")?;
        img.write_at(500, &pattern(100_000, 5))?;
        img.delete_boot_point("V0")?;
        img.flush()
    };
    let result = steps(&mut img, &mut points);
    let left = img.crash_after.unwrap();
    assert_eq!(result.is_err(), left == 0, "{result:?}");
    let table_moved = img.table_moved_at.map(|at| crash_after - at);
    drop(img);
    CrashRun {
        writes: crash_after - left,
        points,
        table_moved,
    }
}

/// Crashes the run after each write number in `crash_points` and checks
/// what reached the file: a sound image whose boot points hold what they
/// held, and that stays usable.
fn crash_at(base: &CrashBase, crash_points: impl Iterator<Item = u64>) {
    for n in crash_points {
        let tmp = TempDir::new("crash");
        let points = crash_run(&tmp, base, n).points;
        if let Err(report) = only_harmless_damage(&tmp.img()) {
            panic!("crash after write {n}: {report}");
        }
        let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
        let names = img.boot_points();
        for (name, model) in &points {
            if names.contains(name) {
                assert_snapshot(&tmp, name, model);
            }
        }
        assert!(names.iter().all(|n| n == "V0" || n == "V1"), "{names:?}");
        img.write_at(0, &[1; 70_000]).unwrap();
        img.flush().unwrap();
        drop(img);
        if let Err(report) = only_harmless_damage(&tmp.img()) {
            panic!("after a crash after write {n} and a write: {report}");
        }
    }
}

#[test]
fn a_crash_at_any_write_leaves_only_leaks() {
    let base = crash_base(12, 4 * MIB);
    let total = crash_run(&TempDir::new("crash-count"), &base, u64::MAX / 2).writes;
    assert!(total > 20, "{total} writes");
    let step = (total / 40).max(1) as usize;
    crash_at(&base, (0..total).step_by(step).chain([total - 1]));
}

#[test]
fn a_crash_while_the_refcount_table_moves_leaves_only_leaks() {
    // 512-byte clusters: the first refcount table counts 8 MiB of file,
    // which the run outgrows.
    let base = crash_base(9, 6 * MIB);
    let run = crash_run(&TempDir::new("crash-count"), &base, u64::MAX / 2);
    let total = run.writes;
    let moved = run.table_moved.expect("the refcount table moved");
    // Every write of the commit that moves the table up to its header
    // switch, then a sample of the rest.
    let dense = moved..(moved + 40).min(total);
    let sparse = (moved + 40..(moved + 400).min(total)).step_by(10);
    let spread = (0..total).step_by((total / 8).max(1) as usize);
    crash_at(&base, dense.chain(sparse).chain(spread));
}

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u64 },
    Zero { offset: u64, len: u64 },
    Snap,
    Delete(usize),
    Revert(usize),
    Merge,
    Reopen,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let span = (0..size, 1..size / 4);
    prop_oneof![
        6 => (span.clone(), any::<u64>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => span.prop_map(|(offset, len)| Op::Zero { offset, len }),
        2 => Just(Op::Snap),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Revert),
        1 => Just(Op::Merge),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(
        cluster_bits in prop_oneof![Just(9u32), Just(12), Just(16)],
        ops in proptest::collection::vec(op(MIB), 1..40),
    ) {
        let tmp = TempDir::new("prop");
        let size = MIB;
        let mut img = Qcow2::create_with(&tmp.dir, IMG, size, cluster_bits).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut points: Vec<(String, Vec<u8>)> = Vec::new();
        let mut next = 0;
        for op in ops {
            match op {
                Op::Write { offset, len, seed } => {
                    let len = len.min(size - offset);
                    write(&mut img, &mut model, offset, &pattern(len as usize, seed));
                }
                Op::Zero { offset, len } => {
                    zero(&mut img, &mut model, offset, len.min(size - offset));
                }
                Op::Snap => {
                    let name = format!("S{next}");
                    next += 1;
                    img.create_boot_point(&name).unwrap();
                    points.push((name, model.clone()));
                }
                Op::Delete(i) if !points.is_empty() => {
                    let (name, _) = points.remove(i % points.len());
                    img.delete_boot_point(&name).unwrap();
                }
                Op::Revert(i) if !points.is_empty() => {
                    let (name, content) = &points[i % points.len()];
                    img.revert_to(name).unwrap();
                    model.clone_from(content);
                }
                Op::Merge if points.len() >= 2 => {
                    img.merge_oldest().unwrap();
                    points.remove(0);
                }
                Op::Reopen => {
                    drop(img);
                    img = Qcow2::open(&tmp.dir, IMG).unwrap();
                }
                Op::Delete(_) | Op::Revert(_) | Op::Merge => {}
            }
        }
        let names: Vec<String> = points.iter().map(|(n, _)| n.clone()).collect();
        prop_assert_eq!(img.boot_points(), names);
        assert_reads(&mut img, &model);
        img.flush().unwrap();
        assert_clean(&tmp.img());
        assert_same(&tmp, &model);
        for (name, content) in &points {
            assert_snapshot(&tmp, name, content);
        }
    }
}

#[test]
fn growing_keeps_data_and_boot_points_and_reads_zeroes_past_the_old_end() {
    // 512-byte clusters: an L1 entry maps 32 KiB and an L1 cluster holds
    // 64 entries (2 MiB), so 1 MiB -> 1.5 MiB stays in the table's cluster
    // and 1.5 MiB -> 5 MiB moves the table.
    let tmp = TempDir::new("resize");
    let mut img = Qcow2::create_with(&tmp.dir, IMG, MIB, 9).unwrap();
    let mut model = vec![0u8; MIB as usize];
    write(&mut img, &mut model, 1000, &pattern(300_000, 1));
    img.create_boot_point("V1").unwrap();
    let at_v1 = model.clone();
    write(&mut img, &mut model, MIB - 4096, &pattern(4096, 2));
    let first_l1 = img.l1_offset;
    for size in [MIB + MIB / 2, 5 * MIB] {
        img.grow(size).unwrap();
        model.resize(size as usize, 0);
        assert_reads(&mut img, &model);
        write(&mut img, &mut model, size - 5000, &pattern(5000, size));
        img.flush().unwrap();
        assert_clean(&tmp.img());
        assert_same(&tmp, &model);
    }
    assert_ne!(img.l1_offset, first_l1, "the L1 table moved");
    // qemu-img reads a boot point at the image's size now, zeroes past the
    // size it was taken at (and `qemu-img snapshot -a` restores that size).
    let mut at_v1 = at_v1;
    at_v1.resize(5 * MIB as usize, 0);
    assert_snapshot(&tmp, "V1", &at_v1);
    drop(img);
    let mut img = Qcow2::open(&tmp.dir, IMG).unwrap();
    assert_eq!(img.size(), 5 * MIB);
    assert_reads(&mut img, &model);
    assert!(matches!(img.grow(MIB), Err(ImageError::Unsupported { .. })));
}
