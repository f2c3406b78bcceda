//! `ferry boot-points`: list, revert to, or delete the boot points of a
//! target image, through the same agent that writes it. Revert and delete
//! take the image's lock, so they are refused while a sync holds it.
//!
//! [`task`] has the agent boot or export the image on the target host
//! (`ferry boot-test` and `ferry boot-points export` of `ssh://` targets).

use super::{format_code, session::Session, SyncError};
use crate::{
    agent::{task::Task, BootPointList},
    protocol::{self, Hello, Manage, ManageOp, Message},
    transport::{self, ConnectOptions, TargetUrl},
};

pub fn manage(
    target: &TargetUrl,
    connect: &ConnectOptions,
    op: ManageOp,
    name: &str,
) -> Result<BootPointList, SyncError> {
    let mut session = open(target, connect, op == ManageOp::List)?;
    session.send(&Message::Manage(Manage {
        op,
        name: name.to_owned(),
        app_consistent: false,
        max_boot_points: 0,
    }))?;
    let list = session.recv_managed()?;
    session.close()?;
    Ok(list)
}

/// Has `target`'s agent run `task` beside the image, holding its lock;
/// returns the task's report.
pub fn task<T: serde::de::DeserializeOwned>(
    target: &TargetUrl,
    connect: &ConnectOptions,
    task: &Task,
    report: &'static str,
) -> Result<T, SyncError> {
    let mut session = open(target, connect, false)?;
    session.send(&Message::Task {
        json: serde_json::to_string(task).expect("tasks always serialise"),
    })?;
    let out = session.recv_report(report)?;
    session.close()?;
    Ok(out)
}

/// A boot point session: the image must exist; `read_only` takes no lock.
fn open(
    target: &TargetUrl,
    connect: &ConnectOptions,
    read_only: bool,
) -> Result<Session, SyncError> {
    let link = transport::connect(target, connect)?;
    let mut session = Session::new(link, None);
    session.handshake(Hello {
        version: protocol::VERSION,
        source_id: [0; 16],
        device_size: 0,
        chunk_size: 64 << 10,
        image: target.image.clone(),
        force_new_source: false,
        read_only,
        manage: true,
        format: format_code(target),
    })?;
    Ok(session)
}
