//! VMDK images against an in-memory model, with `qemu-img` as the outside
//! reader: what it sees in each boot point's file and in `web.vmdk` must be
//! what the model holds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

use super::*;
use crate::image::boot_point_name;

use crate::testutil::{have_qemu_img, TempDir};

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?} failed:\n{text}");
    text
}

/// `qemu-img compare` of `file` (opened as vmdk, with its backing chain)
/// against `model`.
fn qemu_compare(dir: &Path, file: &str, model: &[u8]) {
    let raw = format!("model-{file}.raw");
    std::fs::write(dir.join(&raw), model).unwrap();
    qemu_img(dir, &["compare", "-f", "vmdk", "-F", "raw", file, &raw]);
    std::fs::remove_file(dir.join(&raw)).unwrap();
}

/// `qemu-img check` on every sparse extent in the tree.
fn qemu_check(dir: &Path, v: &Vmdk) {
    for (key, layer) in &v.layers {
        if let Data::Sparse(_) = layer.data {
            qemu_img(dir, &["check", "-f", "vmdk", key]);
        }
    }
}

/// The image and what it must hold: the working image and each boot point.
struct Model {
    work: Vec<u8>,
    boot_points: Vec<(String, Vec<u8>)>,
    clock: u64,
}

impl Model {
    fn new(size: u64) -> Self {
        Self {
            work: vec![0; size as usize],
            boot_points: Vec::new(),
            clock: 1_795_297_625,
        }
    }

    fn write(&mut self, v: &mut Vmdk, offset: u64, data: &[u8]) {
        v.write_at(offset, data).unwrap();
        self.work[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, v: &mut Vmdk, offset: u64, len: u64) {
        v.write_zeroes(offset, len).unwrap();
        self.work[offset as usize..(offset + len) as usize].fill(0);
    }

    fn random_write(&mut self, v: &mut Vmdk, rng: &mut StdRng) {
        let size = self.work.len() as u64;
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..2048),
            1 => 64 << 10,
            _ => rng.gen_range(1..300 << 10),
        }
        .min(size);
        let mut offset = rng.gen_range(0..=size - len);
        if rng.gen_bool(0.3) {
            offset -= offset % (64 << 10);
        }
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        self.write(v, offset, &data);
    }

    fn random_zero(&mut self, v: &mut Vmdk, rng: &mut StdRng) {
        let size = self.work.len() as u64;
        let len = rng.gen_range(1..400 << 10).min(size);
        let offset = rng.gen_range(0..=size - len);
        self.zero(v, offset, len);
    }

    fn boot_point(&mut self, v: &mut Vmdk) -> String {
        self.clock += 3600;
        let name = boot_point_name(self.clock);
        v.create_boot_point(&name).unwrap();
        self.boot_points.push((name.clone(), self.work.clone()));
        name
    }

    fn revert(&mut self, v: &mut Vmdk, i: usize) {
        let (name, content) = &self.boot_points[i];
        v.revert_to(name).unwrap();
        self.work.clone_from(content);
    }

    fn delete(&mut self, v: &mut Vmdk, i: usize) {
        let (name, _) = self.boot_points.remove(i);
        v.delete_boot_point(&name).unwrap();
    }

    fn merge_oldest(&mut self, v: &mut Vmdk) {
        v.merge_oldest().unwrap();
        if self.boot_points.len() >= 2 {
            self.boot_points.remove(0);
        }
    }

    /// Checks the image through its own reader.
    fn check(&self, v: &mut Vmdk) {
        let mut buf = vec![0u8; self.work.len()];
        v.read_at(0, &mut buf).unwrap();
        assert!(buf == self.work, "working image differs from the model");
        let names: Vec<String> = self.boot_points.iter().map(|b| b.0.clone()).collect();
        assert_eq!(v.boot_points(), names);
        check_no_strays(v);
    }

    /// Checks every boot point's file and the working image with qemu-img.
    fn check_with_qemu(&self, tmp: &TempDir, v: &mut Vmdk) {
        v.flush().unwrap();
        qemu_compare(&tmp.0, "web.vmdk", &self.work);
        for (name, content) in &self.boot_points {
            let file = &v.boot_points.iter().find(|b| &b.name == name).unwrap().file;
            qemu_compare(&tmp.0, file, content);
        }
        qemu_check(&tmp.0, v);
    }
}

/// Where the image's directory is (tests only).
fn v_path(v: &Vmdk) -> PathBuf {
    let fd = v.dir.open_read(".").unwrap();
    std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .unwrap()
}

/// The directory holds the tree's files and the companions, nothing else.
fn check_no_strays(v: &Vmdk) {
    let mut expected: HashSet<String> = v.layers.keys().cloned().collect();
    for f in [
        "web.vmdk",
        "web-flat.vmdk",
        "web-base.vmdk",
        "web.vmx",
        "web.vmdk.bootpoints.json",
    ] {
        expected.insert(f.to_owned());
    }
    for entry in std::fs::read_dir(v_path(v)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("model-") {
            assert!(expected.contains(&name), "stray file {name}");
        }
    }
}

const SIZE: u64 = (8 << 20) + 3 * 512;

#[test]
fn random_writes_match_the_model_and_qemu() {
    let tmp = TempDir::new("vmdk-random");
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(1);
    for i in 0..60 {
        if i % 7 == 6 {
            m.random_zero(&mut v, &mut rng);
        } else {
            m.random_write(&mut v, &mut rng);
        }
    }
    // The partial last grain.
    m.write(&mut v, SIZE - 700, &[0xee; 700]);
    m.check(&mut v);
    let qemu = have_qemu_img();
    if qemu {
        m.check_with_qemu(&tmp, &mut v);
    }
    m.boot_point(&mut v);
    for i in 0..60 {
        if i % 5 == 4 {
            m.random_zero(&mut v, &mut rng);
        } else {
            m.random_write(&mut v, &mut rng);
        }
    }
    m.write(&mut v, SIZE - 100, &[0x11; 100]);
    m.check(&mut v);
    if qemu {
        m.check_with_qemu(&tmp, &mut v);
        let info = qemu_img(&tmp.0, &["info", "--backing-chain", "web.vmdk"]);
        assert!(info.contains("backing file: web-base.vmdk"), "{info}");
        assert!(info.contains("create type: monolithicSparse"), "{info}");
        assert!(info.contains("create type: monolithicFlat"), "{info}");
    }
}

#[test]
fn boot_points_keep_their_content() {
    let tmp = TempDir::new("vmdk-bootpoints");
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..20 {
        m.random_write(&mut v, &mut rng);
    }
    let v1 = m.boot_point(&mut v);
    // Overlapping writes, partial grains over the base, zeroes over data.
    m.write(&mut v, 1000, &[1; 70_000]);
    m.zero(&mut v, 64 << 10, 128 << 10);
    m.zero(&mut v, 5000, 10);
    let v2 = m.boot_point(&mut v);
    m.write(&mut v, 30_000, &[2; 100_000]);
    m.zero(&mut v, 0, 64 << 10);
    for _ in 0..10 {
        m.random_write(&mut v, &mut rng);
    }
    m.check(&mut v);
    assert_eq!(v.boot_points[0].file, "web-base.vmdk");
    assert_eq!(v.boot_points[1].file, "web-000001.vmdk");
    assert!(matches!(
        v.create_boot_point(&v1),
        Err(ImageError::BootPointExists { .. })
    ));
    assert!(matches!(
        v.revert_to("V19990101_000000"),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
    if have_qemu_img() {
        m.check_with_qemu(&tmp, &mut v);
        let info = qemu_img(&tmp.0, &["info", "--backing-chain", "web.vmdk"]);
        let chain: Vec<&str> = info
            .lines()
            .filter_map(|l| l.strip_prefix("image: "))
            .collect();
        assert_eq!(
            chain,
            ["web.vmdk", "web-000001.vmdk", "web-base.vmdk"],
            "{info}"
        );
    }
    // What qemu boots: the top the VMX names, and each frozen layer.
    let file = |p: Option<&str>| v.boot_file(p).map(|b| (b.path, b.format));
    assert_eq!(file(None).unwrap(), ("web.vmdk".into(), "vmdk"));
    assert_eq!(file(Some(&v1)).unwrap(), ("web-base.vmdk".into(), "vmdk"));
    assert_eq!(file(Some(&v2)).unwrap(), ("web-000001.vmdk".into(), "vmdk"));
    assert!(matches!(
        file(Some("V19990101_000000")),
        Err(ImageError::NoSuchBootPoint { .. })
    ));
}

#[test]
fn merge_and_delete_keep_every_other_content() {
    let tmp = TempDir::new("vmdk-merge");
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..5 {
        for _ in 0..8 {
            m.random_write(&mut v, &mut rng);
        }
        m.random_zero(&mut v, &mut rng);
        m.boot_point(&mut v);
    }
    m.random_write(&mut v, &mut rng);
    let qemu = have_qemu_img();
    let check = |m: &Model, v: &mut Vmdk| {
        m.check(v);
        if qemu {
            m.check_with_qemu(&tmp, v);
        }
    };
    check(&m, &mut v);
    // Base + d1 → base holds the second boot point.
    m.merge_oldest(&mut v);
    assert_eq!(v.boot_points[0].file, "web-base.vmdk");
    assert!(!tmp.0.join("web-000001.vmdk").exists());
    check(&m, &mut v);
    // A middle one.
    m.delete(&mut v, 1);
    check(&m, &mut v);
    // The newest: the working delta is committed into its layer.
    m.delete(&mut v, 2);
    check(&m, &mut v);
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    check(&m, &mut v);
    while !m.boot_points.is_empty() {
        m.delete(&mut v, 0);
        check(&m, &mut v);
    }
    // Everything is back in the flat base.
    assert_eq!(v.layers.len(), 1);
    let text = std::fs::read_to_string(tmp.0.join("web.vmdk")).unwrap();
    assert!(text.contains("createType=\"monolithicFlat\""), "{text}");
    m.merge_oldest(&mut v);
    check(&m, &mut v);
}

#[test]
fn revert_restores_a_boot_point_and_keeps_the_others() {
    let tmp = TempDir::new("vmdk-revert");
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..10 {
        m.random_write(&mut v, &mut rng);
    }
    m.boot_point(&mut v);
    for _ in 0..10 {
        m.random_write(&mut v, &mut rng);
    }
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    m.revert(&mut v, 0);
    m.check(&mut v);
    // A branch off the oldest boot point, with its own boot point.
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    m.check(&mut v);
    let qemu = have_qemu_img();
    if qemu {
        m.check_with_qemu(&tmp, &mut v);
    }
    // The base has two children now: deleting its name keeps it.
    m.merge_oldest(&mut v);
    m.check(&mut v);
    m.revert(&mut v, 0);
    m.random_write(&mut v, &mut rng);
    m.check(&mut v);
    if qemu {
        m.check_with_qemu(&tmp, &mut v);
    }
    m.delete(&mut v, 1);
    m.check(&mut v);
    m.delete(&mut v, 0);
    m.check(&mut v);
    assert_eq!(v.layers.len(), 1, "all committed into the base");
    if qemu {
        m.check_with_qemu(&tmp, &mut v);
    }
}

#[test]
fn reopen_after_flush_reads_the_same() {
    let tmp = TempDir::new("vmdk-reopen");
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(5);
    {
        let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
        m.random_write(&mut v, &mut rng);
        v.flush().unwrap();
    }
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    m.check(&mut v);
    m.boot_point(&mut v);
    for _ in 0..20 {
        m.random_write(&mut v, &mut rng);
    }
    m.random_zero(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    v.flush().unwrap();
    drop(v);
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    assert_eq!(v.size(), SIZE);
    m.check(&mut v);
    m.merge_oldest(&mut v);
    drop(v);
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    m.check(&mut v);
    assert!(
        Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).is_err(),
        "create never clobbers"
    );
    let vmx = std::fs::read_to_string(tmp.0.join("web.vmx")).unwrap();
    assert!(vmx.contains("scsi0:0.fileName = \"web.vmdk\""), "{vmx}");
}

#[test]
fn a_crash_between_the_boot_point_renames_is_finished_on_open() {
    let tmp = TempDir::new("vmdk-crash");
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(6);
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    drop(v);
    // As if the last boot point had stopped after its first rename, with a
    // stale temporary file and an orphaned delta from an earlier crash.
    let p = |f: &str| tmp.0.join(f);
    std::fs::rename(p("web.vmdk"), p("web.vmdk.new")).unwrap();
    std::fs::write(p("web.vmdk.bootpoints.json.tmp"), b"{").unwrap();
    std::fs::copy(p("web-000001.vmdk"), p("web-000002.vmdk")).unwrap();
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    m.check(&mut v);
    assert!(!p("web-000002.vmdk").exists());
}

#[test]
fn an_anonymous_layer_a_crash_left_is_committed_later() {
    let tmp = TempDir::new("vmdk-anon");
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(9);
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    for _ in 0..3 {
        m.random_write(&mut v, &mut rng);
        m.boot_point(&mut v);
    }
    m.random_write(&mut v, &mut rng);
    drop(v);
    // As if deleting the second boot point had stopped after the sidecar.
    let (name, _) = m.boot_points.remove(1);
    let path = tmp.0.join("web.vmdk.bootpoints.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["boot_points"]
        .as_array_mut()
        .unwrap()
        .retain(|b| b["name"] != name.as_str());
    std::fs::write(&path, json.to_string()).unwrap();
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    m.check(&mut v);
    assert_eq!(v.layers.len(), 4, "open does not merge");
    m.delete(&mut v, 0);
    m.check(&mut v);
    assert_eq!(v.layers.len(), 2, "the next retention step commits both");
    if have_qemu_img() {
        m.check_with_qemu(&tmp, &mut v);
    }
}

#[test]
fn bad_calls_are_refused() {
    let tmp = TempDir::new("vmdk-bad");
    assert!(matches!(
        Vmdk::create(&tmp.dir(), "web.img", SIZE),
        Err(ImageError::Unsupported { .. })
    ));
    assert!(matches!(
        Vmdk::create(&tmp.dir(), "web.vmdk", 1000),
        Err(ImageError::Unsupported { .. })
    ));
    assert!(matches!(
        Vmdk::create(&tmp.dir(), "web.vmdk", 4 << 40),
        Err(ImageError::Unsupported { .. })
    ));
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", 1 << 20).unwrap();
    assert!(matches!(
        v.write_at((1 << 20) - 1, &[0, 0]),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(u64::MAX, &mut [0]),
        Err(ImageError::OutOfRange { .. })
    ));
    for i in 0..Format::Vmdk.max_boot_points() {
        v.create_boot_point(&format!("b{i}")).unwrap();
    }
    assert!(matches!(
        v.create_boot_point("one-too-many"),
        Err(ImageError::TooManyBootPoints { max: 30, .. })
    ));
    assert!(v.delete_boot_point("nope").is_err());
}

/// Writes one byte pattern at `at` of `file`.
fn poke(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn damaged_files_are_refused() {
    let tmp = TempDir::new("vmdk-corrupt");
    let mut m = Model::new(SIZE);
    let mut rng = StdRng::seed_from_u64(7);
    let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", SIZE).unwrap();
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.write(&mut v, 0, &[5; 4096]);
    drop(v);
    let top = tmp.0.join("web.vmdk");
    let good = std::fs::read(&top).unwrap();
    let open = || Vmdk::open(&tmp.dir(), "web.vmdk");
    let corrupt = |what: &str, at: u64, bytes: &[u8]| {
        poke(&top, at, bytes);
        match open() {
            Err(ImageError::Corrupt { .. }) => {}
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what}: opened"),
        }
        std::fs::write(&top, &good).unwrap();
    };
    corrupt("magic", 0, b"XDMV");
    corrupt("version", 4, &7u32.to_le_bytes());
    corrupt("grain size", 20, &100u64.to_le_bytes());
    corrupt("gd offset", 56, &(1u64 << 40).to_le_bytes());
    corrupt("newline bytes", 73, b"\n \n\n");
    corrupt("descriptor", 512, b"hello\0");
    corrupt("parent CID", 512, b"# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=00000002\nparentFileNameHint=\"web-base.vmdk\"\ncreateType=\"monolithicSparse\"\nRW 16387 SPARSE \"web.vmdk\"\n\0");
    // A grain table entry pointing past the end of the file: found on read.
    let gd = u64::from_le_bytes(good[56..64].try_into().unwrap());
    let gt = u32::from_le_bytes(
        good[gd as usize * 512..gd as usize * 512 + 4]
            .try_into()
            .unwrap(),
    );
    poke(&top, u64::from(gt) * 512, &u32::MAX.to_le_bytes());
    let mut v = open().unwrap();
    assert!(matches!(
        v.read_at(0, &mut [0; 512]),
        Err(ImageError::Corrupt { .. })
    ));
    drop(v);
    std::fs::write(&top, &good).unwrap();
    poke(&top, 8, &(1u32 << 16).to_le_bytes());
    assert!(matches!(open(), Err(ImageError::Unsupported { .. })));
    std::fs::write(&top, &good).unwrap();
    assert!(open().is_ok());
    std::fs::remove_file(tmp.0.join("web-base.vmdk")).unwrap();
    assert!(matches!(open(), Err(ImageError::Corrupt { .. })));
}

#[test]
fn qemu_img_images_open_and_stream_optimized_is_unsupported() {
    if !have_qemu_img() {
        return;
    }
    let tmp = TempDir::new("vmdk-qemu");
    qemu_img(
        &tmp.0,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "web.vmdk",
            "4M",
        ],
    );
    let mut m = Model::new(4 << 20);
    let mut rng = StdRng::seed_from_u64(8);
    let mut v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
    m.random_write(&mut v, &mut rng);
    m.boot_point(&mut v);
    m.random_write(&mut v, &mut rng);
    m.check_with_qemu(&tmp, &mut v);
    drop(v);
    qemu_img(
        &tmp.0,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "s.vmdk",
            "4M",
        ],
    );
    assert!(matches!(
        Vmdk::open(&tmp.dir(), "s.vmdk"),
        Err(ImageError::Unsupported { .. })
    ));
}

#[derive(Clone, Debug)]
enum Op {
    Write { at: u64, len: u64, seed: u64 },
    Zero { at: u64, len: u64 },
    BootPoint,
    Revert(usize),
    Delete(usize),
    MergeOldest,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    const PSIZE: u64 = (1 << 20) + 1536;
    prop_oneof![
        4 => (0..PSIZE, 1..200_000u64, any::<u64>()).prop_map(|(at, len, seed)| Op::Write {
            at,
            len: len.min(PSIZE - at),
            seed
        }),
        1 => (0..PSIZE, 1..300_000u64).prop_map(|(at, len)| Op::Zero { at, len: len.min(PSIZE - at) }),
        2 => Just(Op::BootPoint),
        1 => (0..8usize).prop_map(Op::Revert),
        1 => (0..8usize).prop_map(Op::Delete),
        1 => Just(Op::MergeOldest),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        const PSIZE: u64 = (1 << 20) + 1536;
        let tmp = TempDir::new("vmdk-prop");
        let mut v = Vmdk::create(&tmp.dir(), "web.vmdk", PSIZE).unwrap();
        let mut m = Model::new(PSIZE);
        for op in ops {
            match op {
                Op::Write { at, len, seed } => {
                    let mut data = vec![0u8; len as usize];
                    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
                    m.write(&mut v, at, &data);
                }
                Op::Zero { at, len } => m.zero(&mut v, at, len),
                Op::BootPoint => {
                    if m.boot_points.len() < 30 {
                        m.boot_point(&mut v);
                    }
                }
                Op::Revert(i) if i < m.boot_points.len() => m.revert(&mut v, i),
                Op::Delete(i) if i < m.boot_points.len() => m.delete(&mut v, i),
                Op::Revert(_) | Op::Delete(_) => {}
                Op::MergeOldest => m.merge_oldest(&mut v),
                Op::Reopen => {
                    drop(v);
                    v = Vmdk::open(&tmp.dir(), "web.vmdk").unwrap();
                }
            }
            m.check(&mut v);
        }
        if have_qemu_img() {
            m.check_with_qemu(&tmp, &mut v);
        }
    }
}

#[test]
fn names_follow_the_image() {
    let n = Names::new("web.vmdk").unwrap();
    assert_eq!(n.flat(), "web-flat.vmdk");
    assert_eq!(n.base(), "web-base.vmdk");
    assert_eq!(n.delta(7), "web-000007.vmdk");
    assert_eq!(n.delta_number("web-000007.vmdk"), Some(7));
    assert_eq!(n.delta_number("web-base.vmdk"), None);
    assert_eq!(n.delta_number("other-000007.vmdk"), None);
    for bad in ["web", ".vmdk", "a/b.vmdk", "x\".vmdk", "web.vmdk.new"] {
        assert!(Names::new(bad).is_err(), "{bad}");
    }
}
