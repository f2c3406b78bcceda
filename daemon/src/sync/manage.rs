//! `ferry boot-points`: list, revert to, or delete the boot points of a
//! target image, through the same agent that writes it. Revert and delete
//! take the image's lock, so they are refused while a sync holds it.

use super::{format_code, session::Session, SyncError};
use crate::{
    agent::BootPointList,
    protocol::{self, Hello, Manage, ManageOp, Message},
    transport::{self, ConnectOptions, TargetUrl},
};

pub fn manage(
    target: &TargetUrl,
    connect: &ConnectOptions,
    op: ManageOp,
    name: &str,
) -> Result<BootPointList, SyncError> {
    let link = transport::connect(target, connect)?;
    let mut session = Session::new(link, None);
    session.handshake(Hello {
        version: protocol::VERSION,
        source_id: [0; 16],
        device_size: 0,
        chunk_size: 64 << 10,
        image: target.image.clone(),
        force_new_source: false,
        read_only: op == ManageOp::List,
        manage: true,
        format: format_code(target),
    })?;
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
