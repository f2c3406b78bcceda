//! The VHDX image against an in-memory model: qemu-img checks the base
//! files (it reads dynamic VHDX), the independent [`reader`] checks every
//! file of the chain (qemu cannot read differencing VHDX).

use std::{os::unix::fs::FileExt, path::Path, process::Command};

use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    format::{self as f, MIB},
    image::Image,
    reader::ChainReader,
    Vhdx,
};
use crate::image::{ImageError, Standby};

use crate::testutil::{have_qemu_img, TempDir};

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img check` is clean and `qemu-img compare` finds the file equal
/// to `model`.
fn qemu_agrees(tmp: &TempDir, name: &str, model: &[u8]) {
    if !have_qemu_img() {
        return;
    }
    let path = tmp.path(name);
    let path = path.to_str().unwrap();
    let (ok, out) = qemu_img(&["check", "-f", "vhdx", path]);
    assert!(ok, "qemu-img check {name}: {out}");
    let raw = tmp.path("model.raw");
    write_sparse(&raw, model);
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        path,
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "qemu-img compare {name}: {out}");
}

/// Writes `model` as a raw file, leaving zero MiBs as holes.
fn write_sparse(path: &Path, model: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(model.len() as u64).unwrap();
    for (i, piece) in model.chunks(MIB as usize).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            f.write_all_at(piece, i as u64 * MIB).unwrap();
        }
    }
}

fn read_through(tmp: &TempDir, file: &str) -> Vec<u8> {
    ChainReader::open(&tmp.dir(), file)
        .unwrap()
        .read_all()
        .unwrap()
}

fn read_image(v: &mut Vhdx) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

/// A write of random bytes at a random place, mirrored in the model.
fn random_write(rng: &mut StdRng, v: &mut Vhdx, model: &mut [u8], max_len: usize) {
    let len = rng.gen_range(1..=max_len);
    let off = rng.gen_range(0..=model.len() - len);
    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    v.write_at(off as u64, &data).unwrap();
    model[off..off + len].copy_from_slice(&data);
}

/// `n` random writes of up to 100,000 bytes.
fn random_writes(rng: &mut StdRng, v: &mut Vhdx, model: &mut [u8], n: usize) {
    for _ in 0..n {
        random_write(rng, v, model, 100_000);
    }
}

fn random_zero(rng: &mut StdRng, v: &mut Vhdx, model: &mut [u8], max_len: usize) {
    let len = rng.gen_range(1..=max_len);
    let off = rng.gen_range(0..=model.len() - len);
    v.write_zeroes(off as u64, len as u64).unwrap();
    model[off..off + len].fill(0);
}

/// Every boot point through the reader, and the working image through both
/// the image and the reader, equal their models.
fn check_everything(tmp: &TempDir, v: &mut Vhdx, top: &[u8], points: &[(String, Vec<u8>)]) {
    assert_eq!(
        v.boot_points(),
        points.iter().map(|p| p.0.clone()).collect::<Vec<_>>()
    );
    assert!(read_image(v) == top, "working image differs from the model");
    v.flush().unwrap();
    assert!(
        read_through(tmp, v.top_file()) == top,
        "the reader sees another working image"
    );
    for (name, model) in points {
        let file = v.boot_point_file(name).unwrap().to_owned();
        assert!(
            read_through(tmp, &file) == *model,
            "boot point {name} ({file}) differs from its model"
        );
    }
}

const SIZE: u64 = 24 * MIB + 7 * 512;

#[test]
fn base_writes_match_the_model_and_qemu() {
    let tmp = TempDir::new("vhdx-base");
    let mut rng = StdRng::seed_from_u64(1);
    let mut model = vec![0u8; SIZE as usize];
    {
        let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
        assert_eq!(v.size(), SIZE);
        for i in 0..200 {
            if i % 7 == 0 {
                random_zero(&mut rng, &mut v, &mut model, 3 * MIB as usize);
            } else {
                random_write(&mut rng, &mut v, &mut model, 300 << 10);
            }
        }
        // The last, partial block.
        v.write_at(SIZE - 1000, &[0xAB; 1000]).unwrap();
        model[SIZE as usize - 1000..].fill(0xAB);
        assert!(read_image(&mut v) == model);
        assert!(matches!(
            v.write_at(SIZE - 10, &[1; 11]),
            Err(ImageError::OutOfRange { .. })
        ));
        v.flush().unwrap();
    }
    qemu_agrees(&tmp, "web.vhdx", &model);
    assert!(read_through(&tmp, "web.vhdx") == model);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    assert!(read_image(&mut v) == model);
    random_write(&mut rng, &mut v, &mut model, 100_000);
    drop(v);
    qemu_agrees(&tmp, "web.vhdx", &model);
}

#[test]
fn an_image_qemu_created_takes_writes() {
    if !have_qemu_img() {
        return;
    }
    let tmp = TempDir::new("vhdx-qemu");
    let path = tmp.path("q.vhdx");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=dynamic",
        path.to_str().unwrap(),
        "40M",
    ]);
    assert!(ok, "{out}");
    let mut model = vec![0u8; 40 * MIB as usize];
    let mut rng = StdRng::seed_from_u64(2);
    {
        let mut v = Vhdx::open(&tmp.dir(), "q.vhdx").unwrap();
        for _ in 0..60 {
            random_write(&mut rng, &mut v, &mut model, 1 << 20);
        }
        random_zero(&mut rng, &mut v, &mut model, 5 << 20);
        assert!(read_image(&mut v) == model);
        v.flush().unwrap();
    }
    qemu_agrees(&tmp, "q.vhdx", &model);
    // And boot points on top of it.
    let mut v = Vhdx::open(&tmp.dir(), "q.vhdx").unwrap();
    v.create_boot_point("V1").unwrap();
    let v1 = model.clone();
    random_write(&mut rng, &mut v, &mut model, 1 << 20);
    check_everything(&tmp, &mut v, &model, &[("V1".into(), v1)]);
}

#[test]
fn boot_points_keep_their_content_through_the_chain() {
    let tmp = TempDir::new("vhdx-chain");
    let mut rng = StdRng::seed_from_u64(3);
    let mut model = vec![0u8; SIZE as usize];
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    for _ in 0..40 {
        random_write(&mut rng, &mut v, &mut model, 200_000);
    }
    // A lone base is what qemu can boot.
    assert_eq!(v.boot_file(None).unwrap().path, "web.vhdx");
    v.create_boot_point("V20260101_000000").unwrap();
    let m1 = model.clone();
    assert_eq!(v.top_file(), "web-000001.avhdx");
    // Overlapping writes, unaligned ones (read-modify-write of sectors the
    // parent holds), sector-sized ones (partial blocks) and a whole block.
    for i in 0..60 {
        if i % 10 == 0 {
            random_zero(&mut rng, &mut v, &mut model, 700_000);
        } else {
            random_write(&mut rng, &mut v, &mut model, 50_000);
        }
    }
    v.write_at(4 * MIB, &vec![7; 2 * MIB as usize]).unwrap();
    model[4 * MIB as usize..6 * MIB as usize].fill(7);
    v.write_at(9 * MIB + 3, &[9; 5]).unwrap();
    model[9 * MIB as usize + 3..9 * MIB as usize + 8].fill(9);
    v.create_boot_point("V20260102_000000").unwrap();
    let m2 = model.clone();
    for _ in 0..60 {
        random_write(&mut rng, &mut v, &mut model, 30_000);
    }
    random_zero(&mut rng, &mut v, &mut model, 4 * MIB as usize);
    let points = vec![
        ("V20260101_000000".to_owned(), m1.clone()),
        ("V20260102_000000".to_owned(), m2),
    ];
    check_everything(&tmp, &mut v, &model, &points);
    assert!(matches!(
        v.create_boot_point("V20260101_000000"),
        Err(ImageError::BootPointExists { .. })
    ));
    // The first boot point froze the base, which qemu boots; the others
    // and the top are differencing disks, which it cannot read.
    let b = v.boot_file(Some("V20260101_000000")).unwrap();
    assert_eq!((b.path.as_str(), b.format), ("web.vhdx", "vhdx"));
    for point in [None, Some("V20260102_000000")] {
        let e = v.boot_file(point).unwrap_err();
        assert!(
            matches!(e, ImageError::Unsupported { .. })
                && e.to_string().contains("qemu cannot read AVHDX"),
            "{e}"
        );
    }
    assert!(matches!(
        v.boot_file(Some("V19990101_000000")),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
    drop(v);
    // The frozen base is still a plain dynamic VHDX qemu reads.
    qemu_agrees(&tmp, "web.vhdx", &m1);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    check_everything(&tmp, &mut v, &model, &points);
    assert_eq!(
        ChainReader::open(&tmp.dir(), v.top_file()).unwrap().files(),
        vec!["web-000002.avhdx", "web-000001.avhdx", "web.vhdx"]
    );
}

#[test]
fn merges_and_deletions_keep_the_rest() {
    let tmp = TempDir::new("vhdx-merge");
    let mut rng = StdRng::seed_from_u64(4);
    let mut model = vec![0u8; SIZE as usize];
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    let mut points: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 1..=4 {
        for _ in 0..30 {
            random_write(&mut rng, &mut v, &mut model, 100_000);
        }
        random_zero(&mut rng, &mut v, &mut model, 1 << 20);
        let name = format!("V{n}");
        v.create_boot_point(&name).unwrap();
        points.push((name, model.clone()));
    }
    for _ in 0..30 {
        random_write(&mut rng, &mut v, &mut model, 100_000);
    }
    check_everything(&tmp, &mut v, &model, &points);

    v.merge_oldest().unwrap();
    points.remove(0);
    check_everything(&tmp, &mut v, &model, &points);
    // V2's content now lives in the base file, which stays the root.
    assert_eq!(v.boot_point_file("V2"), Some("web.vhdx"));
    assert_eq!(v.files().len(), 4);

    // A boot point in the middle.
    v.delete_boot_point("V3").unwrap();
    points.remove(1);
    check_everything(&tmp, &mut v, &model, &points);
    assert_eq!(v.files().len(), 3);

    random_write(&mut rng, &mut v, &mut model, 100_000);
    drop(v);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    check_everything(&tmp, &mut v, &model, &points);

    // The newest: the top is pulled into its parent.
    v.delete_boot_point("V4").unwrap();
    points.pop();
    check_everything(&tmp, &mut v, &model, &points);
    // One boot point: nothing to merge.
    v.merge_oldest().unwrap();
    check_everything(&tmp, &mut v, &model, &points);
    v.delete_boot_point("V2").unwrap();
    check_everything(&tmp, &mut v, &model, &[]);
    assert_eq!(v.top_file(), "web.vhdx");
    assert_eq!(v.files(), ["web.vhdx"]);
    for n in 1..=4 {
        assert!(!tmp.path(&format!("web-00000{n}.avhdx")).exists());
    }
    drop(v);
    qemu_agrees(&tmp, "web.vhdx", &model);
}

#[test]
fn revert_makes_the_top_a_boot_point_again() {
    let tmp = TempDir::new("vhdx-revert");
    let mut rng = StdRng::seed_from_u64(5);
    let mut model = vec![0u8; SIZE as usize];
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.create_boot_point("V1").unwrap();
    let m1 = model.clone();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.create_boot_point("V2").unwrap();
    let m2 = model.clone();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.revert_to("V1").unwrap();
    model.clone_from(&m1);
    let mut points = vec![("V1".to_owned(), m1.clone()), ("V2".to_owned(), m2.clone())];
    check_everything(&tmp, &mut v, &model, &points);
    // Now a tree: V1's file has two children (V2's file and the top).
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.create_boot_point("V3").unwrap();
    points.push(("V3".to_owned(), model.clone()));
    v.revert_to("V2").unwrap();
    model.clone_from(&m2);
    check_everything(&tmp, &mut v, &model, &points);
    // The shared ancestor loses its name but stays for its two children.
    v.merge_oldest().unwrap();
    points.remove(0);
    check_everything(&tmp, &mut v, &model, &points);
    assert!(v.files().contains(&"web.vhdx".to_owned()));
    v.delete_boot_point("V3").unwrap();
    points.pop();
    check_everything(&tmp, &mut v, &model, &points);
    assert!(matches!(
        v.revert_to("V3"),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
    drop(v);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    check_everything(&tmp, &mut v, &model, &points);
}

#[test]
fn zeroes_in_a_differencing_top_hide_the_parent_and_cost_nothing_elsewhere() {
    let tmp = TempDir::new("vhdx-zero");
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    v.write_at(0, &vec![0x55; 6 * MIB as usize]).unwrap();
    v.create_boot_point("V1").unwrap();
    let top = v.top_file().to_owned();
    let before = std::fs::metadata(tmp.path(&top)).unwrap().len();
    // Where the parent holds nothing, zeroing allocates nothing.
    v.write_zeroes(10 * MIB, 8 * MIB).unwrap();
    v.flush().unwrap();
    assert_eq!(std::fs::metadata(tmp.path(&top)).unwrap().len(), before);
    // Where it does, the zeroes shadow it: whole blocks, part of a block,
    // and an unaligned edge.
    v.write_zeroes(MIB + 100, 4 * MIB).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    model[..6 * MIB as usize].fill(0x55);
    model[MIB as usize + 100..5 * MIB as usize + 100].fill(0);
    let m1 = {
        let mut m = vec![0u8; SIZE as usize];
        m[..6 * MIB as usize].fill(0x55);
        m
    };
    check_everything(&tmp, &mut v, &model, &[("V1".into(), m1)]);
}

#[test]
fn bitmaps_past_the_first_chunk_are_found() {
    // 2 MiB blocks of 512-byte sectors: one sector bitmap block per 4 GiB.
    let size: u64 = 9 << 30;
    let tmp = TempDir::new("vhdx-chunks");
    let mut v = Vhdx::create(&tmp.dir(), "big.vhdx", size).unwrap();
    let spots: [u64; 5] = [
        0,
        (4 << 30) - 4096,
        (4 << 30) + 16384,
        (8 << 30) + 12_345,
        size - 4096,
    ];
    let mut base = Vec::new();
    for (i, &at) in spots.iter().enumerate() {
        let data = vec![i as u8 + 1; 8192.min((size - at) as usize)];
        v.write_at(at, &data).unwrap();
        base.push((at, data));
    }
    v.create_boot_point("V1").unwrap();
    let mut top = base.clone();
    for (i, &at) in spots.iter().enumerate() {
        let at = at + 512;
        let data = vec![0xF0 | i as u8; 1024.min((size - at) as usize)];
        v.write_at(at, &data).unwrap();
        top.push((at, data));
    }
    v.flush().unwrap();
    let expect = |writes: &[(u64, Vec<u8>)], at: u64, len: usize| {
        let mut m = vec![0u8; len];
        for (w, d) in writes {
            for (k, b) in d.iter().enumerate() {
                let p = w + k as u64;
                if p >= at && p < at + len as u64 {
                    m[(p - at) as usize] = *b;
                }
            }
        }
        m
    };
    let v1 = ChainReader::open(&tmp.dir(), v.boot_point_file("V1").unwrap()).unwrap();
    let now = ChainReader::open(&tmp.dir(), v.top_file()).unwrap();
    for &at in &spots {
        let at = at.saturating_sub(8192).min(size - 32768);
        let mut buf = vec![0u8; 32768];
        v1.read_at(at, &mut buf).unwrap();
        assert!(buf == expect(&base, at, buf.len()), "V1 at {at}");
        now.read_at(at, &mut buf).unwrap();
        assert!(buf == expect(&top, at, buf.len()), "top at {at} (reader)");
        v.read_at(at, &mut buf).unwrap();
        assert!(buf == expect(&top, at, buf.len()), "top at {at} (image)");
    }
    drop((v, v1, now));
    if have_qemu_img() {
        let path = tmp.path("big.vhdx");
        let path = path.to_str().unwrap();
        let (ok, out) = qemu_img(&["check", "-f", "vhdx", path]);
        assert!(ok, "{out}");
        // qemu-img compare would read all 9 GiB; qemu-io reads just the
        // spots (with the pattern they must hold) and zeroes past them.
        let mut cmds = Vec::new();
        for (at, d) in &base {
            cmds.push(format!("read -P {} {at} {}", d[0], d.len()));
            if at + 16384 <= size {
                cmds.push(format!("read -P 0 {} 8192", at + 8192));
            }
        }
        let mut args = vec!["-f", "vhdx", "-r"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(path);
        let out = Command::new("qemu-io").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{text}"
        );
        assert_eq!(text.matches("read ").count(), cmds.len(), "{text}");
    }
}

/// Rewrites the header in `slot` of `file` through `change`, with a valid
/// checksum and a sequence number that makes it current.
fn forge_header(tmp: &TempDir, file: &str, slot: usize, change: impl FnOnce(&mut f::Header)) {
    let fh = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path(file))
        .unwrap();
    let mut raw = [vec![0u8; 4096], vec![0u8; 4096]];
    for (i, r) in raw.iter_mut().enumerate() {
        fh.read_exact_at(r, f::HEADER_OFFSETS[i]).unwrap();
    }
    let (_, mut h) = f::current_header([&raw[0], &raw[1]]).unwrap();
    h.sequence += 10;
    change(&mut h);
    fh.write_all_at(&h.encode(), f::HEADER_OFFSETS[slot])
        .unwrap();
}

fn poke(tmp: &TempDir, file: &str, at: u64, bytes: &[u8]) {
    let fh = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp.path(file))
        .unwrap();
    fh.write_all_at(bytes, at).unwrap();
}

/// Inverts the byte at `at`: damage that is damage whatever was there (a
/// fixed value would leave a byte that already held it intact).
fn flip(tmp: &TempDir, file: &str, at: u64) {
    let fh = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path(file))
        .unwrap();
    let mut byte = [0u8];
    fh.read_exact_at(&mut byte, at).unwrap();
    fh.write_all_at(&[!byte[0]], at).unwrap();
}

fn copy_of(tmp: &TempDir, from: &str, to: &str) {
    std::fs::copy(tmp.path(from), tmp.path(to)).unwrap();
}

#[test]
fn damaged_files_are_refused() {
    let tmp = TempDir::new("vhdx-damage");
    {
        let mut v = Vhdx::create(&tmp.dir(), "good.vhdx", SIZE).unwrap();
        v.write_at(3 * MIB, &[1; 4096]).unwrap();
    }
    let open = |name: &str| Vhdx::open(&tmp.dir(), name).map(|_| ());
    let is_corrupt = |r: Result<(), ImageError>| matches!(r, Err(ImageError::Corrupt { .. }));
    let is_unsupported =
        |r: Result<(), ImageError>| matches!(r, Err(ImageError::Unsupported { .. }));

    // One damaged header: the other one carries on.
    copy_of(&tmp, "good.vhdx", "one.vhdx");
    // Byte 30 is in the header's random FileWriteGuid.
    flip(&tmp, "one.vhdx", f::HEADER_OFFSETS[0] + 30);
    open("one.vhdx").unwrap();
    // Both: refused.
    flip(&tmp, "one.vhdx", f::HEADER_OFFSETS[1] + 30);
    assert!(is_corrupt(open("one.vhdx")));

    copy_of(&tmp, "good.vhdx", "sig.vhdx");
    poke(&tmp, "sig.vhdx", 0, b"vhdxfilX");
    assert!(is_corrupt(open("sig.vhdx")));

    copy_of(&tmp, "good.vhdx", "regions.vhdx");
    for at in f::REGION_TABLE_OFFSETS {
        flip(&tmp, "regions.vhdx", at + 20);
    }
    assert!(is_corrupt(open("regions.vhdx")));

    // Regions that overlap: the BAT moved onto the metadata region.
    copy_of(&tmp, "good.vhdx", "overlap.vhdx");
    let table = f::encode_region_table(&[
        f::RegionEntry {
            guid: f::BAT_REGION,
            offset: 2 * MIB,
            length: MIB as u32,
            required: true,
        },
        f::RegionEntry {
            guid: f::METADATA_REGION,
            offset: 2 * MIB,
            length: MIB as u32,
            required: true,
        },
    ]);
    for at in f::REGION_TABLE_OFFSETS {
        poke(&tmp, "overlap.vhdx", at, &table);
    }
    assert!(is_corrupt(open("overlap.vhdx")));

    // A region nobody knows, marked required.
    copy_of(&tmp, "good.vhdx", "region-req.vhdx");
    let table = f::encode_region_table(&[
        f::RegionEntry {
            guid: f::BAT_REGION,
            offset: 3 * MIB,
            length: MIB as u32,
            required: true,
        },
        f::RegionEntry {
            guid: f::METADATA_REGION,
            offset: 2 * MIB,
            length: MIB as u32,
            required: true,
        },
        f::RegionEntry {
            guid: f::random_guid(),
            offset: 4 * MIB,
            length: MIB as u32,
            required: true,
        },
    ]);
    for at in f::REGION_TABLE_OFFSETS {
        poke(&tmp, "region-req.vhdx", at, &table);
    }
    assert!(is_unsupported(open("region-req.vhdx")));

    // A non-empty log.
    copy_of(&tmp, "good.vhdx", "log.vhdx");
    forge_header(&tmp, "log.vhdx", 0, |h| h.log_guid = f::random_guid());
    let err = Vhdx::open(&tmp.dir(), "log.vhdx").err().unwrap();
    assert!(err.to_string().contains("log replay"), "{err}");

    // Metadata: a required item missing, an unknown required item.
    let meta = 2 * MIB;
    copy_of(&tmp, "good.vhdx", "missing.vhdx");
    // Entry 1 is the virtual disk size: rename its GUID to an optional unknown one.
    let mut e = f::MetadataEntry {
        item: f::random_guid(),
        offset: 64 * 1024 + 8,
        length: 8,
        flags: 0,
    };
    poke(
        &tmp,
        "missing.vhdx",
        meta + f::metadata_entry_at(1) as u64,
        &f::encode_metadata_entry(&e),
    );
    assert!(is_corrupt(open("missing.vhdx")));
    copy_of(&tmp, "good.vhdx", "unknown.vhdx");
    e.offset = 64 * 1024 + 512;
    e.flags = f::META_IS_REQUIRED;
    let count = 6u16;
    poke(&tmp, "unknown.vhdx", meta + 10, &count.to_le_bytes());
    poke(
        &tmp,
        "unknown.vhdx",
        meta + f::metadata_entry_at(5) as u64,
        &f::encode_metadata_entry(&e),
    );
    assert!(is_unsupported(open("unknown.vhdx")));

    // A BAT entry past the end of the file.
    copy_of(&tmp, "good.vhdx", "bat.vhdx");
    let entry = f::bat_entry(f::PAYLOAD_FULLY_PRESENT, 4096 * MIB);
    poke(&tmp, "bat.vhdx", 3 * MIB + 8 * 5, &entry.to_le_bytes());
    assert!(is_corrupt(open("bat.vhdx")));
    // A partially present block in a dynamic file.
    copy_of(&tmp, "good.vhdx", "partial.vhdx");
    poke(
        &tmp,
        "partial.vhdx",
        3 * MIB + 8,
        &[f::PAYLOAD_PARTIALLY_PRESENT as u8],
    );
    assert!(is_corrupt(open("partial.vhdx")));

    // The independent reader refuses the same damage.
    assert!(ChainReader::open(&tmp.dir(), "one.vhdx").is_err());
    assert!(ChainReader::open(&tmp.dir(), "good.vhdx").is_ok());
}

#[test]
fn a_parent_that_changed_is_refused() {
    let tmp = TempDir::new("vhdx-linkage");
    {
        let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
        v.write_at(0, &[1; 512]).unwrap();
        v.create_boot_point("V1").unwrap();
    }
    forge_header(&tmp, "web.vhdx", 1, |h| {
        h.data_write_guid = f::random_guid()
    });
    assert!(matches!(
        Vhdx::open(&tmp.dir(), "web.vhdx"),
        Err(ImageError::Corrupt { .. })
    ));
    assert!(ChainReader::open(&tmp.dir(), "web-000001.avhdx").is_err());
}

#[test]
fn leftovers_of_a_crash_are_cleaned_up() {
    let tmp = TempDir::new("vhdx-leftover");
    let mut model = vec![0u8; SIZE as usize];
    {
        let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
        v.write_at(0, &[1; 4096]).unwrap();
        model[..4096].fill(1);
    }
    // A child created before the sidecar recorded it, and a half-written one.
    std::fs::write(tmp.path("web-000001.avhdx"), b"garbage").unwrap();
    std::fs::write(tmp.path("web-000001.avhdx.tmp"), b"garbage").unwrap();
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    v.create_boot_point("V1").unwrap();
    let m1 = model.clone();
    v.write_at(512, &[2; 512]).unwrap();
    model[512..1024].fill(2);
    check_everything(&tmp, &mut v, &model, &[("V1".into(), m1.clone())]);
    assert!(!tmp.path("web-000001.avhdx.tmp").exists());
    drop(v);
    // A deletion the sidecar announced but a crash prevented.
    std::fs::write(tmp.path("web-000009.avhdx"), b"old").unwrap();
    let json = tmp.path("web.vhdx.chain.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    state["pending_delete"] = serde_json::json!(["web-000009.avhdx"]);
    std::fs::write(&json, serde_json::to_vec(&state).unwrap()).unwrap();
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    assert!(!tmp.path("web-000009.avhdx").exists());
    check_everything(&tmp, &mut v, &model, &[("V1".into(), m1)]);
}

/// A merge interrupted after step 3 (the parent carries the child's
/// identity, nothing else moved) is finished by the next open.
#[test]
fn an_interrupted_merge_finishes_on_open() {
    let tmp = TempDir::new("vhdx-resume");
    let mut rng = StdRng::seed_from_u64(6);
    let mut model = vec![0u8; SIZE as usize];
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.create_boot_point("V1").unwrap();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.create_boot_point("V2").unwrap();
    let m2 = model.clone();
    random_writes(&mut rng, &mut v, &mut model, 20);
    v.flush().unwrap();
    // Do by hand what merge_oldest does, up to the crash.
    v.state.boot_points.remove(0);
    v.state.store(&v.dir, &v.json).unwrap();
    let (c_name, x_name) = ("web-000001.avhdx", "web.vhdx");
    let dir = tmp.dir();
    let mut x = Image::open(dir.open_rw(x_name).unwrap(), x_name, true, true).unwrap();
    let mut c = Image::open(dir.open_rw(c_name).unwrap(), c_name, true, true).unwrap();
    let g = c.data_write_guid();
    x.begin_session(false).unwrap();
    super::copy_into(&mut c, &mut x).unwrap();
    x.flush().unwrap();
    c.set_parent_locator(&f::ParentLocator::new(
        &x.data_write_guid(),
        Some(&g),
        x_name,
    ))
    .unwrap();
    // Between the two steps every file still opens, V2 reads the same.
    assert!(read_through(&tmp, c_name) == m2);
    x.set_data_write_guid(g).unwrap();
    assert!(read_through(&tmp, c_name) == m2);
    assert!(read_through(&tmp, "web-000002.avhdx") == model);
    drop((x, c, v));

    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    check_everything(&tmp, &mut v, &model, &[("V2".into(), m2)]);
    assert_eq!(v.files(), ["web.vhdx", "web-000002.avhdx"]);
    assert!(!tmp.path(c_name).exists());
}

#[test]
fn boot_points_are_limited() {
    let tmp = TempDir::new("vhdx-limit");
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", 4 * MIB).unwrap();
    for n in 0..30 {
        v.write_at(n * 4096, &[n as u8; 4096]).unwrap();
        v.create_boot_point(&format!("V{n:02}")).unwrap();
    }
    assert!(matches!(
        v.create_boot_point("V99"),
        Err(ImageError::TooManyBootPoints { max: 30, .. })
    ));
    v.merge_oldest().unwrap();
    v.create_boot_point("V99").unwrap();
    let file = v.boot_point_file("V05").unwrap().to_owned();
    let content = read_through(&tmp, &file);
    for n in 0..30u64 {
        let expect = if n <= 5 { n as u8 } else { 0 };
        assert_eq!(
            content[(n * 4096) as usize],
            expect,
            "V05 sector of write {n}"
        );
    }
}

/// What a crash before `flush` leaves: allocations made since the last
/// flush are not referenced yet (their BAT entries and bitmap bits live in
/// memory until then), so the files still open, clean, with the content of
/// the last flush.
#[test]
fn a_crash_before_flush_leaves_valid_files() {
    let tmp = TempDir::new("vhdx-crash");
    let mut model = vec![0u8; SIZE as usize];
    let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", SIZE).unwrap();
    v.write_at(0, &[1; 8192]).unwrap();
    model[..8192].fill(1);
    v.flush().unwrap();
    // Fresh blocks only, then no flush and no Drop.
    v.write_at(8 * MIB, &[2; 4096]).unwrap();
    v.write_zeroes(0, 512).unwrap();
    model[..512].fill(0);
    std::mem::forget(v);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    assert!(read_image(&mut v) == model);
    v.create_boot_point("V1").unwrap();
    let m1 = model.clone();
    v.write_at(4 * MIB, &[3; 1024]).unwrap();
    model[4 * MIB as usize..4 * MIB as usize + 1024].fill(3);
    v.flush().unwrap();
    // A partially present block and a new sector bitmap block, unflushed.
    v.write_at(12 * MIB + 512, &[4; 512]).unwrap();
    v.write_at(4 * MIB + 1024, &[4; 512]).unwrap();
    std::mem::forget(v);
    let mut v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
    check_everything(&tmp, &mut v, &model, &[("V1".into(), m1.clone())]);
    drop(v);
    qemu_agrees(&tmp, "web.vhdx", &m1);
}

#[test]
fn the_image_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<Vhdx>();
}

#[derive(Clone, Debug)]
enum Op {
    Write { at: u64, len: usize, seed: u8 },
    Zero { at: u64, len: u64 },
    BootPoint,
    Revert(usize),
    Delete(usize),
    Merge,
    Reopen,
}

const PROP_SIZE: u64 = 7 * MIB + 512 * 3;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PROP_SIZE, 1usize..300_000, any::<u8>())
            .prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        2 => (0..PROP_SIZE, 1u64..3_000_000).prop_map(|(at, len)| Op::Zero { at, len }),
        3 => Just(Op::BootPoint),
        1 => (0usize..8).prop_map(Op::Revert),
        1 => (0usize..8).prop_map(Op::Delete),
        1 => Just(Op::Merge),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let tmp = TempDir::new("vhdx-prop");
        let mut v = Vhdx::create(&tmp.dir(), "web.vhdx", PROP_SIZE).unwrap();
        let mut model = vec![0u8; PROP_SIZE as usize];
        let mut points: Vec<(String, Vec<u8>)> = Vec::new();
        let mut next = 0;
        for op in ops {
            match op {
                Op::Write { at, len, seed } => {
                    let len = len.min((PROP_SIZE - at) as usize);
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8 / 7)).collect();
                    v.write_at(at, &data).unwrap();
                    model[at as usize..at as usize + len].copy_from_slice(&data);
                }
                Op::Zero { at, len } => {
                    let len = len.min(PROP_SIZE - at);
                    v.write_zeroes(at, len).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
                Op::BootPoint
                    if points.len() < 30 => {
                        next += 1;
                        let name = format!("V{next:03}");
                        v.create_boot_point(&name).unwrap();
                        points.push((name, model.clone()));
                    }
                Op::Revert(i) if !points.is_empty() => {
                    let (name, content) = &points[i % points.len()];
                    v.revert_to(name).unwrap();
                    model.clone_from(content);
                }
                Op::Delete(i) if !points.is_empty() => {
                    let (name, _) = points.remove(i % points.len());
                    v.delete_boot_point(&name).unwrap();
                }
                Op::Merge if points.len() >= 2 => {
                    v.merge_oldest().unwrap();
                    points.remove(0);
                }
                Op::Reopen => {
                    drop(v);
                    v = Vhdx::open(&tmp.dir(), "web.vhdx").unwrap();
                }
                _ => {}
            }
        }
        check_everything(&tmp, &mut v, &model, &points);
        if points.is_empty() {
            prop_assert_eq!(v.top_file(), "web.vhdx");
            drop(v);
            qemu_agrees(&tmp, "web.vhdx", &model);
        }
    }
}

#[test]
fn the_hyperv_script_is_written_once_and_never_overwritten() {
    let tmp = TempDir::new("vhdx-script");
    let v = Vhdx::create(&tmp.dir(), "web.vhdx", 4 * MIB).unwrap();
    drop(v);
    let script = tmp.path("web.hyperv.ps1");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("'web.vhdx.chain.json'"), "{text}");
    // An admin's edit survives every later open.
    std::fs::write(&script, "# mine\n").unwrap();
    drop(Vhdx::open(&tmp.dir(), "web.vhdx").unwrap());
    assert_eq!(std::fs::read_to_string(&script).unwrap(), "# mine\n");
    // A missing one (an image from before, or removed) is written again.
    std::fs::remove_file(&script).unwrap();
    drop(Vhdx::open(&tmp.dir(), "web.vhdx").unwrap());
    assert!(std::fs::read_to_string(&script).unwrap().contains("New-VM"));
}
