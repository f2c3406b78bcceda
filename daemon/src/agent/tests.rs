//! Sessions against a real directory under /var/tmp, driven by in-memory
//! streams or pipes.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::PathBuf,
    process::Command,
};

use super::*;
use crate::protocol::{encode, read_message, Codec, Data, Hello, Message, Welcome};

const A: [u8; 16] = [0xA1; 16];
const B: [u8; 16] = [0xB2; 16];
const MIB: u64 = 1 << 20;

/// `<tmp>/root` is the agent's root, `<tmp>/outside` a sibling that must
/// never be touched. Removed on drop, even on panic.
struct TempRoot {
    base: PathBuf,
}

impl TempRoot {
    fn new(tag: &str) -> Self {
        let base = PathBuf::from("/var/tmp").join(format!(
            "ferry-agent-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(base.join("root")).unwrap();
        fs::create_dir_all(base.join("outside")).unwrap();
        Self { base }
    }

    fn root(&self) -> PathBuf {
        self.base.join("root")
    }

    fn outside(&self) -> PathBuf {
        self.base.join("outside")
    }

    fn names(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn record(&self, image: &str) -> CommitRecord {
        let text = fs::read(self.root().join(commit_record_name(image))).unwrap();
        serde_json::from_slice(&text).unwrap()
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn hello(image: &str, source_id: [u8; 16], device_size: u64) -> Message {
    Message::Hello(Hello {
        version: VERSION,
        source_id,
        device_size,
        chunk_size: 65536,
        image: image.to_owned(),
        force_new_source: false,
        read_only: false,
        manage: false,
        format: 0,
    })
}

fn forced(msg: Message) -> Message {
    match msg {
        Message::Hello(h) => Message::Hello(Hello {
            force_new_source: true,
            ..h
        }),
        other => other,
    }
}

fn raw(offset: u64, bytes: &[u8]) -> Message {
    Message::Data(Data {
        offset,
        raw_len: bytes.len() as u32,
        codec: Codec::Raw,
        data_hash: hash::data_hash(bytes),
        payload: bytes.to_vec(),
    })
}

fn zstd(offset: u64, bytes: &[u8]) -> Message {
    Message::Data(Data {
        offset,
        raw_len: bytes.len() as u32,
        codec: Codec::Zstd,
        data_hash: hash::data_hash(bytes),
        payload: zstd::bulk::compress(bytes, 3).unwrap(),
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs one session over in-memory streams; returns its result and replies.
fn session(root: &Path, frames: &[Message]) -> (Result<SessionSummary, AgentError>, Vec<Message>) {
    let input: Vec<u8> = frames.iter().flat_map(encode).collect();
    session_bytes(root, &input)
}

fn session_bytes(root: &Path, input: &[u8]) -> (Result<SessionSummary, AgentError>, Vec<Message>) {
    let mut output = Vec::new();
    let result = serve(root, input, &mut output);
    (result, parse(&output))
}

fn parse(mut bytes: &[u8]) -> Vec<Message> {
    let mut replies = Vec::new();
    while let Some(m) = read_message(&mut bytes).unwrap() {
        replies.push(m);
    }
    replies
}

#[track_caller]
fn expect_error(
    (result, replies): (Result<SessionSummary, AgentError>, Vec<Message>),
    want: ErrorCode,
) -> String {
    let err = result.expect_err("session should fail");
    assert_eq!(err.code(), Some(want), "{err}");
    match replies.last() {
        Some(Message::Error { code, message }) => {
            assert_eq!(*code, want, "{message}");
            assert_eq!(
                replies
                    .iter()
                    .filter(|m| matches!(m, Message::Error { .. }))
                    .count(),
                1
            );
            message.clone()
        }
        other => panic!("expected an Error reply, got {other:?}"),
    }
}

#[test]
fn a_full_session_applies_data_and_zeros_and_acks_a_durable_commit() {
    let tmp = TempRoot::new("full");
    let root = tmp.root();
    let first = pattern(65536, 1);
    let second = vec![7u8; 65536];
    let frames = [
        hello("disk.raw", A, MIB),
        raw(0, &first),
        zstd(131072, &second),
        Message::Zero {
            offset: 4096,
            len: 8192,
        },
        Message::HashRequest {
            offset: 0,
            len: MIB,
            block: 65536,
        },
        Message::Commit { generation: 1 },
    ];
    let (result, replies) = session(&root, &frames);
    let summary = result.unwrap();
    assert_eq!(
        summary,
        SessionSummary {
            commits: 1,
            bytes_written: 65536 * 2 + 8192
        }
    );

    let mut want = vec![0u8; MIB as usize];
    want[..65536].copy_from_slice(&first);
    want[131072..196608].copy_from_slice(&second);
    want[4096..12288].fill(0);
    let image = root.join("disk.raw");
    assert_eq!(fs::read(&image).unwrap(), want);

    let hashes: Vec<u128> = want
        .chunks(65536)
        .map(xxhash_rust::xxh3::xxh3_128)
        .collect();
    assert_eq!(
        replies,
        vec![
            Message::Welcome(Welcome {
                version: VERSION,
                generation: 0,
                source_id: None,
                image_size: MIB,
                created: true,
                altered: false,
            }),
            Message::HashReply {
                offset: 0,
                block: 65536,
                hashes,
            },
            Message::Ack {
                generation: 1,
                bytes_written: 65536 * 2 + 8192,
            },
        ]
    );

    let rec = tmp.record("disk.raw");
    assert_eq!(rec.source_bytes(), Some(A));
    assert_eq!((rec.generation, rec.bytes), (1, 65536 * 2 + 8192));
    assert_eq!((rec.device_size, rec.chunk_size), (MIB, 65536));
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(root.join("disk.raw.ferry.json")), 0o600);
    assert_eq!(mode(image.clone()), 0o600);
    assert_eq!(
        tmp.names(&root),
        ["disk.raw", "disk.raw.ferry.json", "disk.raw.ferry.lock"],
        "no temp files left (the session lock stays)"
    );

    // The next session finds the commit.
    let (result, replies) = session(&root, &[hello("disk.raw", A, MIB)]);
    assert_eq!(result.unwrap(), SessionSummary::default());
    assert_eq!(
        replies,
        vec![Message::Welcome(Welcome {
            version: VERSION,
            generation: 1,
            source_id: Some(A),
            image_size: MIB,
            created: false,
            altered: false,
        })]
    );
}

#[test]
fn images_may_live_in_existing_subdirectories_only() {
    let tmp = TempRoot::new("subdir");
    let root = tmp.root();
    expect_error(
        session(&root, &[hello("vm/disk.raw", A, MIB)]),
        ErrorCode::Io,
    );
    assert!(tmp.names(&root).is_empty(), "no directory created");
    fs::create_dir(root.join("vm")).unwrap();
    let (result, _) = session(
        &root,
        &[
            hello("vm/disk.raw", A, MIB),
            Message::Commit { generation: 1 },
        ],
    );
    result.unwrap();
    assert_eq!(
        tmp.names(&root.join("vm")),
        ["disk.raw", "disk.raw.ferry.json", "disk.raw.ferry.lock"]
    );
}

#[test]
fn a_version_mismatch_is_refused_and_changes_nothing() {
    let tmp = TempRoot::new("version");
    let root = tmp.root();
    let Message::Hello(h) = hello("disk.raw", A, MIB) else {
        unreachable!()
    };
    let message = expect_error(
        session(
            &root,
            &[
                Message::Hello(Hello {
                    version: crate::protocol::VERSION + 1,
                    ..h
                }),
                raw(0, &[1; 512]),
            ],
        ),
        ErrorCode::Version,
    );
    let expected = format!(
        "agent speaks protocol {}, source speaks {}",
        crate::protocol::VERSION,
        crate::protocol::VERSION + 1
    );
    assert_eq!(message, expected);
    assert!(tmp.names(&root).is_empty());
}

#[test]
fn garbage_or_a_wrong_first_frame_is_refused_and_changes_nothing() {
    let tmp = TempRoot::new("garbage");
    let root = tmp.root();
    expect_error(
        session_bytes(&root, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ErrorCode::Malformed,
    );
    expect_error(session(&root, &[raw(0, &[1; 512])]), ErrorCode::Malformed);
    expect_error(session(&root, &[hello("", A, MIB)]), ErrorCode::Malformed);
    assert!(tmp.names(&root).is_empty());
    // Nothing at all is not a session either, but there is no one to tell.
    let (result, replies) = session_bytes(&root, b"");
    assert!(matches!(result, Err(AgentError::NoHello)));
    assert!(replies.is_empty());
}

#[test]
fn another_source_is_refused_unless_it_takes_the_image_over() {
    let tmp = TempRoot::new("source");
    let root = tmp.root();
    let data = pattern(4096, 3);
    session(
        &root,
        &[
            hello("disk.raw", A, MIB),
            raw(0, &data),
            Message::Commit { generation: 4 },
        ],
    )
    .0
    .unwrap();
    let record_before = fs::read(root.join("disk.raw.ferry.json")).unwrap();
    let image_before = fs::read(root.join("disk.raw")).unwrap();

    let message = expect_error(
        session(&root, &[hello("disk.raw", B, MIB), raw(0, &[9; 4096])]),
        ErrorCode::SourceMismatch,
    );
    assert!(
        message.contains(&uuid::Uuid::from_bytes(A).hyphenated().to_string()),
        "{message}"
    );
    assert_eq!(fs::read(root.join("disk.raw")).unwrap(), image_before);
    assert_eq!(
        fs::read(root.join("disk.raw.ferry.json")).unwrap(),
        record_before
    );

    // Taking over: the old record counts as absent, and the image is claimed
    // for B at once, so A is now the stranger.
    let (result, replies) = session(&root, &[forced(hello("disk.raw", B, MIB))]);
    result.unwrap();
    assert_eq!(
        replies,
        vec![Message::Welcome(Welcome {
            version: VERSION,
            generation: 0,
            source_id: None,
            image_size: MIB,
            created: false,
            altered: false,
        })]
    );
    let rec = tmp.record("disk.raw");
    assert_eq!((rec.source_bytes(), rec.generation), (Some(B), 0));
    expect_error(
        session(&root, &[hello("disk.raw", A, MIB)]),
        ErrorCode::SourceMismatch,
    );
}

#[test]
fn a_new_image_is_claimed_before_its_first_commit() {
    let tmp = TempRoot::new("claim");
    let root = tmp.root();
    session(&root, &[hello("disk.raw", A, MIB), raw(0, &[1; 4096])])
        .0
        .unwrap();
    expect_error(
        session(&root, &[hello("disk.raw", B, MIB)]),
        ErrorCode::SourceMismatch,
    );
}

#[test]
fn a_record_left_by_a_deleted_image_is_not_trusted() {
    let tmp = TempRoot::new("stale");
    let root = tmp.root();
    session(
        &root,
        &[hello("disk.raw", A, MIB), Message::Commit { generation: 9 }],
    )
    .0
    .unwrap();
    fs::remove_file(root.join("disk.raw")).unwrap();
    let (result, replies) = session(&root, &[hello("disk.raw", A, MIB)]);
    result.unwrap();
    assert!(matches!(
        replies[..],
        [Message::Welcome(Welcome {
            generation: 0,
            created: true,
            ..
        })]
    ));
    assert_eq!(tmp.record("disk.raw").generation, 0);
    // Another source still may not take it silently.
    fs::remove_file(root.join("disk.raw")).unwrap();
    expect_error(
        session(&root, &[hello("disk.raw", B, MIB)]),
        ErrorCode::SourceMismatch,
    );
    assert_eq!(
        tmp.names(&root),
        ["disk.raw.ferry.json", "disk.raw.ferry.lock"],
        "refusal created nothing"
    );
}

/// The generation the next session's Welcome reports, and whether it
/// says the image was altered.
fn welcome_of(root: &Path) -> (u64, bool) {
    let (result, replies) = session(root, &[hello("disk.raw", A, MIB)]);
    result.unwrap();
    match replies[..] {
        [Message::Welcome(Welcome {
            generation,
            altered,
            ..
        })] => (generation, altered),
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn an_image_written_behind_ferrys_back_is_no_longer_vouched_for() {
    let tmp = TempRoot::new("altered");
    let root = tmp.root();
    let commit = |generation| {
        session(
            &root,
            &[
                hello("disk.raw", A, MIB),
                raw(0, &pattern(4096, 1)),
                Message::Commit { generation },
            ],
        )
        .0
        .unwrap();
    };
    commit(1);
    assert!(tmp.record("disk.raw").stamp.is_some());
    // Sessions of ferry's own, cut short after writing or not, are no sign
    // of anyone else.
    assert_eq!(welcome_of(&root), (1, false));
    session(
        &root,
        &[hello("disk.raw", A, MIB), raw(8192, &pattern(4096, 2))],
    )
    .0
    .unwrap();
    assert_eq!(welcome_of(&root), (1, false));
    commit(2);
    // Later (past the clock's granularity), something else writes.
    std::thread::sleep(std::time::Duration::from_millis(50));
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(root.join("disk.raw"))
            .unwrap();
        f.write_all_at(b"booted", 65536).unwrap();
    }
    // A boot point session in between (which may stamp its own writes)
    // does not take the change for ferry's.
    let list = Message::Manage(crate::protocol::Manage {
        op: crate::protocol::ManageOp::List,
        name: String::new(),
        app_consistent: false,
        max_boot_points: 7,
    });
    let manage = match hello("disk.raw", [0; 16], 0) {
        Message::Hello(h) => Message::Hello(Hello { manage: true, ..h }),
        _ => unreachable!(),
    };
    session(&root, &[manage, list]).0.unwrap();
    assert_eq!(welcome_of(&root), (0, true));
    // It sticks until a commit: a resync cut short is followed by another.
    let rec = tmp.record("disk.raw");
    assert_eq!((rec.generation, rec.stamp), (0, None));
    assert_eq!(welcome_of(&root), (0, false));
    commit(3);
    assert_eq!(welcome_of(&root), (3, false));
}

#[test]
fn names_leading_outside_the_root_are_refused_and_touch_nothing() {
    let tmp = TempRoot::new("escape");
    let root = tmp.root();
    let outside = tmp.outside();
    fs::write(outside.join("victim.raw"), b"keep").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("out-dir")).unwrap();
    std::os::unix::fs::symlink("../outside/victim.raw", root.join("link.raw")).unwrap();
    std::os::unix::fs::symlink("../outside/new.raw", root.join("dangling.raw")).unwrap();
    std::os::unix::fs::symlink("/proc/self/fd/1", root.join("magic.raw")).unwrap();
    let abs = outside.join("abs.raw");
    for name in [
        "../outside/x.raw",
        abs.to_str().unwrap(),
        "out-dir/x.raw",
        "link.raw",
        "dangling.raw",
        "magic.raw",
    ] {
        let message = expect_error(
            session(&root, &[hello(name, A, 4096), raw(0, &[1; 4096])]),
            ErrorCode::PathEscape,
        );
        assert!(message.contains("outside"), "{name}: {message}");
    }
    assert_eq!(tmp.names(&outside), ["victim.raw"]);
    assert_eq!(fs::read(outside.join("victim.raw")).unwrap(), b"keep");
    assert_eq!(
        tmp.names(&root),
        ["dangling.raw", "link.raw", "magic.raw", "out-dir"]
    );
}

#[test]
fn an_image_smaller_than_the_device_is_refused_unchanged() {
    let tmp = TempRoot::new("small");
    let root = tmp.root();
    fs::write(root.join("disk.raw"), vec![5u8; 4096]).unwrap();
    let message = expect_error(
        session(&root, &[hello("disk.raw", A, MIB), raw(0, &[1; 4096])]),
        ErrorCode::ImageTooSmall,
    );
    assert!(message.contains("4096 bytes"), "{message}");
    assert_eq!(fs::read(root.join("disk.raw")).unwrap(), vec![5u8; 4096]);
    assert_eq!(tmp.names(&root), ["disk.raw"]);
}

#[test]
fn a_grown_source_grows_its_raw_or_qcow2_image() {
    let tmp = TempRoot::new("grow");
    let root = tmp.root();
    let first = |image: &str| {
        session(
            &root,
            &[hello(image, A, MIB), Message::Commit { generation: 1 }],
        )
        .0
        .unwrap();
    };
    // An image of this source, at the size it last had: it grows, and the
    // generation still counts.
    for image in ["disk.raw", "disk.qcow2"] {
        first(image);
        let (result, replies) = session(&root, &[hello(image, A, 2 * MIB)]);
        result.unwrap();
        assert!(
            matches!(
                replies[..],
                [Message::Welcome(Welcome {
                    generation: 1,
                    image_size,
                    altered: false,
                    ..
                })] if image_size == 2 * MIB
            ),
            "{image}: {replies:?}"
        );
    }
    assert_eq!(fs::metadata(root.join("disk.raw")).unwrap().len(), 2 * MIB);
    // Not an image of another size than the source last had.
    fs::OpenOptions::new()
        .write(true)
        .open(root.join("disk.raw"))
        .unwrap()
        .set_len(MIB + 4096)
        .unwrap();
    expect_error(
        session(&root, &[hello("disk.raw", A, 4 * MIB)]),
        ErrorCode::ImageTooSmall,
    );
    assert_eq!(
        fs::metadata(root.join("disk.raw")).unwrap().len(),
        MIB + 4096
    );
    // Nor a format ferry cannot grow: the refusal names the way out.
    first("disk.vmdk");
    let message = expect_error(
        session(&root, &[hello("disk.vmdk", A, 2 * MIB)]),
        ErrorCode::ImageTooSmall,
    );
    assert!(message.contains("smaller than the source"), "{message}");
}

#[test]
fn an_empty_image_is_taken_as_new_even_under_a_stale_record() {
    let tmp = TempRoot::new("empty");
    let root = tmp.root();
    session(
        &root,
        &[hello("disk.raw", A, MIB), Message::Commit { generation: 7 }],
    )
    .0
    .unwrap();
    // As if a session died between creating the file and sizing it.
    fs::write(root.join("disk.raw"), b"").unwrap();
    let (result, replies) = session(&root, &[hello("disk.raw", A, MIB)]);
    result.unwrap();
    assert!(matches!(
        replies[..],
        [Message::Welcome(Welcome {
            generation: 0,
            created: true,
            image_size: MIB,
            ..
        })]
    ));
    assert_eq!(tmp.record("disk.raw").generation, 0);
    assert_eq!(fs::metadata(root.join("disk.raw")).unwrap().len(), MIB);
}

#[test]
fn data_failing_its_content_hash_is_refused_and_nothing_after_it_applied() {
    let tmp = TempRoot::new("hash");
    let root = tmp.root();
    let Message::Data(mut bad) = raw(0, &[0xEE; 4096]) else {
        unreachable!()
    };
    bad.data_hash ^= 1;
    expect_error(
        session(
            &root,
            &[
                hello("disk.raw", A, 65536),
                Message::Data(bad),
                raw(4096, &[0xEE; 4096]),
                Message::Commit { generation: 1 },
            ],
        ),
        ErrorCode::Checksum,
    );
    assert!(fs::read(root.join("disk.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(tmp.record("disk.raw").generation, 0);
}

#[test]
fn a_damaged_frame_is_refused_and_nothing_written() {
    let tmp = TempRoot::new("frame");
    let root = tmp.root();
    let mut input = encode(&hello("disk.raw", A, 65536));
    let mut data = encode(&raw(0, &[0xEE; 4096]));
    data[100] ^= 0x40;
    input.extend(data);
    input.extend(encode(&Message::Commit { generation: 1 }));
    expect_error(session_bytes(&root, &input), ErrorCode::Checksum);
    assert!(fs::read(root.join("disk.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn zstd_data_decoding_to_the_wrong_size_is_refused() {
    let tmp = TempRoot::new("zstd");
    let root = tmp.root();
    let bytes = vec![3u8; 8192];
    // Claims 4096 bytes but decodes to 8192: the output is capped, not grown.
    let bomb = Message::Data(Data {
        offset: 0,
        raw_len: 4096,
        codec: Codec::Zstd,
        data_hash: hash::data_hash(&bytes[..4096]),
        payload: zstd::bulk::compress(&bytes, 3).unwrap(),
    });
    expect_error(
        session(&root, &[hello("disk.raw", A, 65536), bomb]),
        ErrorCode::Malformed,
    );
    // Claims 8192 but decodes to 4096.
    let short = Message::Data(Data {
        offset: 0,
        raw_len: 8192,
        codec: Codec::Zstd,
        data_hash: hash::data_hash(&bytes),
        payload: zstd::bulk::compress(&bytes[..4096], 3).unwrap(),
    });
    expect_error(
        session(&root, &[hello("disk.raw", A, 65536), short]),
        ErrorCode::Malformed,
    );
    assert!(fs::read(root.join("disk.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn writes_beyond_the_device_are_refused() {
    let tmp = TempRoot::new("bounds");
    let root = tmp.root();
    for frame in [
        raw(65536 - 512, &[1; 1024]),
        Message::Zero {
            offset: 4096,
            len: u64::MAX,
        },
        Message::HashRequest {
            offset: 0,
            len: 2 * 65536,
            block: 4096,
        },
    ] {
        expect_error(
            session(&root, &[hello("disk.raw", A, 65536), frame]),
            ErrorCode::Malformed,
        );
    }
    assert_eq!(fs::metadata(root.join("disk.raw")).unwrap().len(), 65536);
}

#[test]
fn commits_must_not_go_backwards() {
    let tmp = TempRoot::new("generation");
    let root = tmp.root();
    session(
        &root,
        &[
            hello("disk.raw", A, 65536),
            Message::Commit { generation: 5 },
        ],
    )
    .0
    .unwrap();
    for generation in [0, 4] {
        expect_error(
            session(
                &root,
                &[hello("disk.raw", A, 65536), Message::Commit { generation }],
            ),
            ErrorCode::Malformed,
        );
    }
    assert_eq!(tmp.record("disk.raw").generation, 5);
}

#[test]
fn a_second_session_on_the_same_image_is_busy() {
    let tmp = TempRoot::new("busy");
    let root = tmp.root();
    let (in_reader, mut in_writer) = std::io::pipe().unwrap();
    let (mut out_reader, out_writer) = std::io::pipe().unwrap();
    let first = {
        let root = root.clone();
        std::thread::spawn(move || serve(&root, in_reader, out_writer))
    };
    write_message(&mut in_writer, &hello("disk.raw", A, MIB)).unwrap();
    assert!(matches!(
        read_message(&mut out_reader).unwrap(),
        Some(Message::Welcome(_))
    ));

    let message = expect_error(
        session(&root, &[hello("disk.raw", A, MIB), raw(0, &[1; 4096])]),
        ErrorCode::Busy,
    );
    assert!(
        message.contains("in use by another ferry session"),
        "{message}"
    );

    write_message(&mut in_writer, &Message::Commit { generation: 1 }).unwrap();
    assert!(matches!(
        read_message(&mut out_reader).unwrap(),
        Some(Message::Ack { generation: 1, .. })
    ));
    drop(in_writer);
    assert_eq!(first.join().unwrap().unwrap().commits, 1);
}

#[test]
fn a_stale_temp_record_is_replaced_and_none_is_left() {
    let tmp = TempRoot::new("atomic");
    let root = tmp.root();
    session(&root, &[hello("disk.raw", A, 65536)]).0.unwrap();
    fs::write(root.join("disk.raw.ferry.json.tmp"), b"half a rec").unwrap();
    for generation in 1..=3 {
        session(
            &root,
            &[
                hello("disk.raw", A, 65536),
                raw(0, &[generation as u8; 4096]),
                Message::Commit { generation },
            ],
        )
        .0
        .unwrap();
        assert_eq!(
            tmp.names(&root),
            ["disk.raw", "disk.raw.ferry.json", "disk.raw.ferry.lock"]
        );
    }
    let rec = tmp.record("disk.raw");
    assert_eq!((rec.generation, rec.bytes), (3, 4096));
}

#[test]
fn a_corrupt_record_is_an_error_not_a_fresh_image() {
    let tmp = TempRoot::new("corrupt");
    let root = tmp.root();
    fs::write(root.join("disk.raw"), vec![0u8; 65536]).unwrap();
    fs::write(root.join("disk.raw.ferry.json"), b"{\"source_id\": 3").unwrap();
    let message = expect_error(
        session(&root, &[hello("disk.raw", A, 65536)]),
        ErrorCode::Io,
    );
    assert!(message.contains("corrupt"), "{message}");
    assert_eq!(
        fs::read(root.join("disk.raw.ferry.json")).unwrap(),
        b"{\"source_id\": 3"
    );
    // Taking the image over does not need the old record.
    session(&root, &[forced(hello("disk.raw", A, 65536))])
        .0
        .unwrap();
    assert_eq!(tmp.record("disk.raw").source_bytes(), Some(A));
}

#[test]
fn a_source_error_stops_the_session_without_a_reply() {
    let tmp = TempRoot::new("source-error");
    let root = tmp.root();
    let (result, replies) = session(
        &root,
        &[
            hello("disk.raw", A, 65536),
            Message::Error {
                code: ErrorCode::Io,
                message: "read failed".into(),
            },
            raw(0, &[1; 4096]),
        ],
    );
    assert!(matches!(result, Err(AgentError::Source { .. })));
    assert_eq!(replies.len(), 1, "only the Welcome: {replies:?}");
    assert!(fs::read(root.join("disk.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

/// A tiny tmpfs, unmounted on drop even if the test panics.
struct TinyFs {
    dir: TempRoot,
}

impl TinyFs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = TempRoot::new("full-fs");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.root())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self { dir })
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.root()).status();
    }
}

#[test]
fn a_full_disk_is_reported_as_disk_full_with_the_offset() {
    let fs_ = match TinyFs::mount("1m") {
        Ok(f) => f,
        Err(why) => {
            eprintln!("skipping: cannot mount a tmpfs: {why}");
            return;
        }
    };
    let root = fs_.dir.root();
    let chunk = pattern(256 << 10, 9);
    let mut frames = vec![hello("disk.raw", A, 8 * MIB)];
    for i in 0..8 {
        frames.push(raw(i * (256 << 10), &chunk));
    }
    frames.push(Message::Commit { generation: 1 });
    let (result, replies) = session(&root, &frames);
    let message = expect_error((result, replies.clone()), ErrorCode::DiskFull);
    assert!(
        message.contains("disk.raw: no space left during write at offset"),
        "{message}"
    );
    assert!(
        !replies.iter().any(|m| matches!(m, Message::Ack { .. })),
        "{replies:?}"
    );
    // Still claimed by A, nothing committed.
    assert_eq!(fs_.dir.record("disk.raw").generation, 0);
    assert!(fs::metadata(root.join("disk.raw")).unwrap().blocks() > 0);
}

#[test]
fn tasks_run_only_in_boot_point_sessions_and_export_beside_the_image() {
    let tmp = TempRoot::new("task");
    let root = tmp.root();
    let task = |json: String| Message::Task { json };
    let export = |out: &str| {
        task(
            serde_json::to_string(&super::task::Task::Export {
                point: "V20261122_000000".into(),
                out: out.into(),
                qemu_img: "qemu-img".into(),
            })
            .unwrap(),
        )
    };
    // A writing session takes no tasks.
    let msg = expect_error(
        session(&root, &[hello("web.img", A, MIB), export("x.raw")]),
        ErrorCode::Malformed,
    );
    assert!(msg.contains("boot point session"), "{msg}");
    let manage = || match hello("web.img", [0; 16], 0) {
        Message::Hello(h) => Message::Hello(Hello { manage: true, ..h }),
        _ => unreachable!(),
    };
    // A boot point session writes an export only beside the image.
    let msg = expect_error(
        session(&root, &[manage(), export("../x.raw")]),
        ErrorCode::PathEscape,
    );
    assert!(msg.contains("not a plain file name"), "{msg}");
    let msg = expect_error(
        session(&root, &[manage(), export("x.raw")]),
        ErrorCode::NoSuchBootPoint,
    );
    assert!(msg.contains("V20261122_000000"), "{msg}");
    let msg = expect_error(
        session(
            &root,
            &[manage(), task("{\"task\":\"format-disk\"}".into())],
        ),
        ErrorCode::Malformed,
    );
    assert!(msg.contains("unreadable task"), "{msg}");
    assert_eq!(
        tmp.names(&root),
        ["web.img", "web.img.ferry.json", "web.img.ferry.lock"]
    );
    assert!(tmp.names(&tmp.outside()).is_empty());
}
