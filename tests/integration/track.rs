//! The tracker on real block devices.

use std::process::Command;

use crate::util::{privileged, write_buffered, write_direct, Ferry, LoopDev};

const MIB: u64 = 1 << 20;
const K64: u64 = 64 * 1024;

#[test]
fn writes_at_known_offsets_are_tracked() {
    if !privileged("writes_at_known_offsets_are_tracked") {
        return;
    }
    let dev = LoopDev::new(64 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    assert!(
        f.extents(dev.arg()).is_empty(),
        "a fresh device has no dirty chunks"
    );

    // O_DIRECT: 4 KiB inside chunk 3, and 8 KiB straddling chunks 9 and 10.
    write_direct(&dev.path, 3 * K64 + 4096, 4096, 0xaa);
    write_direct(&dev.path, 10 * K64 - 4096, 8192, 0xbb);
    // Buffered then fsync: chunk 100.
    write_buffered(&dev.path, 100 * K64 + 512, 1024, 0xcc);

    let v = f.json(&["track", "dirty", dev.arg()]);
    assert_eq!(v["device"], dev.arg());
    assert_eq!(v["chunk_size"], 65536);
    assert_eq!(v["state"], "tracking");
    assert_eq!(
        crate::util::extents_of(&v),
        vec![(3 * K64, K64), (9 * K64, 2 * K64), (100 * K64, K64)]
    );
    assert_eq!(v["dirty_bytes"], 4 * K64);

    // Peeking does not clear; draining returns the same and then clears.
    let drained = f.json(&["track", "drain", dev.arg()]);
    assert_eq!(
        crate::util::extents_of(&drained),
        crate::util::extents_of(&v)
    );
    assert!(f.extents(dev.arg()).is_empty());

    // Chunk size 4K is finer.
    f.ok(&["track", "remove", dev.arg()]);
    f.ok(&["track", "add", dev.arg(), "--chunk-size", "4K"]);
    write_direct(&dev.path, 3 * K64 + 4096, 4096, 0x11);
    assert_eq!(f.extents(dev.arg()), vec![(3 * K64 + 4096, 4096)]);
}

#[test]
fn reads_do_not_count() {
    if !privileged("reads_do_not_count") {
        return;
    }
    let dev = LoopDev::new(32 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    write_direct(&dev.path, 0, 4096, 1);
    let before = f.json(&["track", "list"]);
    // Read the whole device, direct and buffered.
    crate::util::run(
        "dd",
        &[
            &format!("if={}", dev.arg()),
            "of=/dev/null",
            "bs=1M",
            "iflag=direct",
            "status=none",
        ],
    );
    crate::util::run(
        "dd",
        &[
            &format!("if={}", dev.arg()),
            "of=/dev/null",
            "bs=1M",
            "status=none",
        ],
    );
    let after = f.json(&["track", "list"]);
    assert_eq!(f.extents(dev.arg()), vec![(0, K64)]);
    let b = &before["devices"][0]["counters"];
    let a = &after["devices"][0]["counters"];
    assert_eq!(a["writes"], b["writes"], "reads were recorded as writes");
    assert!(
        a["events"].as_u64().unwrap() > b["events"].as_u64().unwrap(),
        "the reads should have been seen (and ignored): {a}"
    );
}

#[test]
fn blkdiscard_is_tracked() {
    if !privileged("blkdiscard_is_tracked") {
        return;
    }
    let dev = LoopDev::new(256 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg(), "--chunk-size", "4K"]);
    // Small discard: marked inline. Large one (32 MiB = 8192 chunks of 4K):
    // too wide to mark inline, it goes through the ring and must still show.
    crate::util::run("blkdiscard", &["-o", "1048576", "-l", "65536", dev.arg()]);
    crate::util::run(
        "blkdiscard",
        &[
            "-o",
            &(128 * MIB).to_string(),
            "-l",
            &(32 * MIB).to_string(),
            dev.arg(),
        ],
    );
    let ext = f.extents(dev.arg());
    assert_eq!(ext.first(), Some(&(MIB, K64)), "{ext:?}");
    let covered: u64 = ext.iter().filter(|e| e.0 >= 128 * MIB).map(|e| e.1).sum();
    assert_eq!(covered, 32 * MIB, "{ext:?}");
    let list = f.json(&["track", "list"]);
    assert!(
        list["devices"][0]["counters"]["wide"].as_u64().unwrap() >= 1,
        "{list}"
    );
    // write-zeroes counts too.
    crate::util::run(
        "blkdiscard",
        &[
            "-z",
            "-o",
            &(200 * MIB).to_string(),
            "-l",
            "8192",
            dev.arg(),
        ],
    );
    assert!(f.extents(dev.arg()).contains(&(200 * MIB, 8192)));
}

#[test]
fn partition_bitmap_is_relative_to_the_partition() {
    if !privileged("partition_bitmap_is_relative_to_the_partition") {
        return;
    }
    let dev = LoopDev::partitioned(64 * MIB);
    let p1 = dev.partition(1);
    let p1s = p1.to_str().unwrap();
    let f = Ferry::new();
    f.ok(&["track", "add", p1s]);
    // Through the partition, at partition offset 5 chunks.
    write_direct(&p1, 5 * K64, 4096, 7);
    // Through the whole disk, inside the partition (which starts at 1 MiB):
    // partition chunk 8.
    write_direct(&dev.path, MIB + 8 * K64, 4096, 8);
    // Through the whole disk, before the partition: not the partition's.
    write_direct(&dev.path, 0, 4096, 9);
    assert_eq!(f.extents(p1s), vec![(5 * K64, K64), (8 * K64, K64)]);
    let size = f.json(&["track", "list"])["devices"][0]["size"]
        .as_u64()
        .unwrap();
    assert_eq!(size, 32 * MIB);

    // The whole disk tracked too: both see their own view of the same write.
    f.ok(&["track", "add", dev.arg()]);
    write_direct(&p1, 0, 4096, 10);
    assert_eq!(f.extents(dev.arg()), vec![(MIB, K64)]);
    assert_eq!(f.extents(p1s)[0], (0, K64));
}

#[test]
fn two_devices_are_tracked_independently() {
    if !privileged("two_devices_are_tracked_independently") {
        return;
    }
    let a = LoopDev::new(32 * MIB);
    let b = LoopDev::new(32 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", a.arg()]);
    f.ok(&["track", "add", b.arg(), "--chunk-size", "1M"]);
    write_direct(&a.path, 2 * K64, 4096, 1);
    write_direct(&b.path, 5 * MIB + 4096, 4096, 2);
    assert_eq!(f.extents(a.arg()), vec![(2 * K64, K64)]);
    assert_eq!(f.extents(b.arg()), vec![(5 * MIB, MIB)]);
    f.ok(&["track", "drain", a.arg()]);
    assert!(f.extents(a.arg()).is_empty());
    assert_eq!(
        f.extents(b.arg()),
        vec![(5 * MIB, MIB)],
        "draining a must not touch b"
    );
    let list = f.json(&["track", "list"]);
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for d in devices {
        assert!(d["bitmap_bytes"].as_u64().unwrap() >= 8, "{d}");
        assert_eq!(d["state"], "tracking");
    }
}

#[test]
fn restart_keeps_the_bits() {
    if !privileged("restart_keeps_the_bits") {
        return;
    }
    let dev = LoopDev::new(32 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    let program = || {
        ferry::tracker::linux::LinuxTracker::new(&f.bpf)
            .unwrap()
            .program_id()
    };
    let id = program().expect("tracker loaded");
    // No ferry process runs while these writes happen.
    write_direct(&dev.path, 7 * K64, 4096, 1);
    write_direct(&dev.path, 9 * K64, 4096, 1);
    // A new process finds the same program and every bit.
    assert_eq!(f.extents(dev.arg()), vec![(7 * K64, K64), (9 * K64, K64)]);
    assert_eq!(program(), Some(id));
    // Nothing about the hand-over between processes looks like lost tracking.
    let state = f.json(&["track", "dirty", dev.arg()]);
    assert_eq!(state["state"], "tracking");
}

#[test]
fn remove_detaches_the_program_with_the_last_device() {
    if !privileged("remove_detaches_the_program_with_the_last_device") {
        return;
    }
    let a = LoopDev::new(16 * MIB);
    let b = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", a.arg()]);
    f.ok(&["track", "add", b.arg()]);
    let id = ferry::tracker::linux::LinuxTracker::new(&f.bpf)
        .unwrap()
        .program_id()
        .unwrap();
    let loaded = |id: u32| {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .any(|p| p.id() == id)
    };
    assert!(loaded(id));
    f.ok(&["track", "remove", a.arg()]);
    assert!(loaded(id), "one device is still tracked");
    assert!(f.bpf.exists());
    f.ok(&["track", "remove", b.arg()]);
    assert!(!f.bpf.exists(), "pins should be gone");
    // The kernel frees the program once its last reference is gone.
    let mut gone = false;
    for _ in 0..100 {
        if !loaded(id) {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone, "program {id} is still loaded");
    assert!(f.json(&["track", "list"])["devices"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn lost_tracking_is_needs_resync_never_an_empty_set() {
    if !privileged("lost_tracking_is_needs_resync_never_an_empty_set") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    write_direct(&dev.path, 0, 4096, 1);
    // The pinned state disappears (as after a reboot or a careless rm).
    std::fs::remove_dir_all(&f.bpf).unwrap();
    let v = f.json(&["track", "dirty", dev.arg()]);
    assert_eq!(v["state"], "needs-resync", "{v}");
    assert_eq!(v["reason"], "tracking-lost", "{v}");
    // Tracking is re-armed at once: new writes are seen again, and the
    // state stays needs-resync until a checksum resync.
    write_direct(&dev.path, 3 * K64, 4096, 2);
    let v = f.json(&["track", "dirty", dev.arg()]);
    assert_eq!(crate::util::extents_of(&v), vec![(3 * K64, K64)]);
    assert_eq!(v["state"], "needs-resync");
    let list = f.json(&["track", "list"]);
    assert_eq!(list["devices"][0]["reason"], "tracking-lost");
}

#[test]
fn interrupted_drain_is_needs_resync() {
    if !privileged("interrupted_drain_is_needs_resync") {
        return;
    }
    let dev = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    // A drain killed between taking the kernel's bits and persisting them
    // leaves its in-use flag behind.
    let rec = std::fs::read_dir(f.state.join("devices"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let text = std::fs::read_to_string(&rec)
        .unwrap()
        .replace("\"draining\": false", "\"draining\": true");
    std::fs::write(&rec, text).unwrap();
    let v = f.json(&["track", "dirty", dev.arg()]);
    assert_eq!(v["state"], "needs-resync");
    assert_eq!(v["reason"], "interrupted-drain");
}

#[test]
fn state_is_root_only() {
    if !privileged("state_is_root_only") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dev = LoopDev::new(16 * MIB);
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg()]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&f.state), 0o700);
    let out = Command::new("stat")
        .args(["-c", "%a", f.bpf.to_str().unwrap()])
        .output()
        .unwrap();
    let bpf_mode = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        bpf_mode.ends_with('0') || bpf_mode == "700",
        "pin dir mode {bpf_mode}"
    );
}

/// A device grown past what its bitmap can index stays listed, in
/// `needs-resync` with the way out, instead of failing every command.
#[test]
fn a_device_grown_past_its_bitmap_is_resynced_not_fatal() {
    if !privileged("a_device_grown_past_its_bitmap_is_resynced_not_fatal") {
        return;
    }
    const TIB: u64 = 1 << 40;
    let dev = LoopDev::new(TIB); // sparse: nothing is written
    let f = Ferry::new();
    f.ok(&["track", "add", dev.arg(), "--chunk-size", "4K"]);
    // 2^32 4 KiB chunks is 16 TiB.
    dev.grow(16 * TIB + 4096);
    for _ in 0..2 {
        let list = f.json(&["track", "list"]);
        let d = &list["devices"][0];
        assert_eq!(d["state"], "needs-resync", "{list}");
        let reason = d["reason"].as_str().unwrap();
        assert!(reason.contains("tracking cannot follow"), "{reason}");
        assert!(reason.contains("--chunk-size"), "{reason}");
    }
}
