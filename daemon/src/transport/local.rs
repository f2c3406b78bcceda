//! `file://` targets: the agent runs on a thread of this process.

use std::path::Path;

use super::{pipe, to_agent, Link, LinkEnd, TransportError};

pub fn start(root: &Path) -> Result<Link, TransportError> {
    let (to_agent_rx, to_agent_tx) = to_agent()?;
    let (from_agent_rx, from_agent_tx) = pipe()?;
    let root = root.to_owned();
    let worker = std::thread::Builder::new()
        .name("ferry-agent".into())
        .spawn(move || {
            // The agent's result is also in its reply frames; this is for
            // errors it could not send (a closed pipe).
            match crate::agent::serve(&root, to_agent_rx, from_agent_tx) {
                Ok(_) => Ok(LinkEnd::default()),
                Err(source) => Err(TransportError::LocalAgent { source }),
            }
        })
        .map_err(|source| TransportError::Io {
            op: "start the local agent",
            source,
        })?;
    Ok(Link {
        tx: to_agent_tx,
        rx: Box::new(from_agent_rx),
        worker: Some(worker),
        peer: "local agent".into(),
    })
}
