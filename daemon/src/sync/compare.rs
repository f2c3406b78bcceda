//! Checksum comparison of the source and the target image, for a resync
//! and for `ferry verify`. Both sides hash fixed-size blocks (the chunk
//! size) in parallel; the target hashes its own image, so only hashes
//! cross the link. Requests run a few windows ahead of the local hashing so
//! both sides work at once.

use std::{collections::VecDeque, fs::File};

use roaring::RoaringBitmap;

use super::{session::Session, SyncError};
use crate::{hash, protocol::Message};

/// Bytes covered by one hash request.
const WINDOW: u64 = 64 << 20;
/// Requests kept in flight.
const AHEAD: usize = 4;

/// Chunks (of `block` bytes) whose content differs between `device`
/// (opened O_DIRECT) and the target image. `progress` gets the bytes
/// compared so far.
pub fn differing_chunks(
    session: &mut Session,
    device: &File,
    device_size: u64,
    block: u32,
    mut progress: impl FnMut(u64),
) -> Result<RoaringBitmap, SyncError> {
    let window = WINDOW - WINDOW % u64::from(block);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut windows = (0..device_size.div_ceil(window)).map(|i| {
        let offset = i * window;
        (offset, window.min(device_size - offset))
    });
    let mut asked = VecDeque::new();
    let mut differ = RoaringBitmap::new();
    let mut done = 0;
    loop {
        while asked.len() < AHEAD {
            let Some((offset, len)) = windows.next() else {
                break;
            };
            session.send(&Message::HashRequest { offset, len, block })?;
            asked.push_back((offset, len));
        }
        let Some((offset, len)) = asked.pop_front() else {
            break;
        };
        let ours = hash::hash_blocks(device, offset, len, block, threads).map_err(|source| {
            SyncError::Source {
                op: "hash",
                offset,
                source,
            }
        })?;
        let theirs = match session.recv()? {
            Message::HashReply {
                offset: o,
                block: b,
                hashes,
            } if o == offset && b == block && hashes.len() == ours.len() => hashes,
            _ => {
                return Err(SyncError::Unexpected {
                    peer: session.peer.clone(),
                    wanted: "HashReply for the window asked",
                    got: "another reply".into(),
                })
            }
        };
        let first = offset / u64::from(block);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if a != b {
                let chunk = u32::try_from(first + i as u64).map_err(|_| SyncError::TooLarge)?;
                differ.insert(chunk);
            }
        }
        done += len;
        progress(done);
    }
    Ok(differ)
}
