//! Boot points as the agent keeps them: the format holds their content, and
//! `IMAGE.ferry-bootpoints.json` beside the image holds what the format cannot:
//! when each was taken, whether it is crash- or app-consistent, and the
//! source generation it holds.

use serde::{Deserialize, Serialize};

use super::AgentError;
use crate::{
    image::{is_boot_point_name, Dir, Format, Standby},
    protocol::{ErrorCode, Manage, ManageOp},
};

/// One boot point, as `ferry boot-points list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootPointInfo {
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `crash`, `app`, or `unknown` for one ferry did not take.
    pub kind: String,
    /// The source generation it holds (0 if unknown).
    pub generation: u64,
    /// Size of the disk it holds, in bytes.
    pub size: u64,
}

/// The reply to every boot point request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootPointList {
    pub format: String,
    pub boot_points: Vec<BootPointInfo>,
    /// What a Create merged to stay within the limit, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<String>,
}

fn sidecar(file_name: &str) -> String {
    format!("{file_name}.ferry-bootpoints.json")
}

fn load(dir: &Dir, file_name: &str) -> Vec<BootPointInfo> {
    let Ok(mut f) = dir.open_read(&sidecar(file_name)) else {
        return Vec::new();
    };
    let mut text = Vec::new();
    use std::io::Read;
    if f.read_to_end(&mut text).is_err() {
        return Vec::new();
    }
    serde_json::from_slice(&text).unwrap_or_default()
}

/// The boot points the format has, with what the sidecar knows of them.
fn list(dir: &Dir, file_name: &str, standby: &dyn Standby, format: Format) -> BootPointList {
    let known = load(dir, file_name);
    let boot_points = standby
        .boot_points()
        .into_iter()
        .map(|name| {
            known
                .iter()
                .find(|k| k.name == name)
                .cloned()
                .unwrap_or(BootPointInfo {
                    name,
                    created_at: 0,
                    kind: "unknown".to_owned(),
                    generation: 0,
                    size: standby.size(),
                })
        })
        .collect();
    BootPointList {
        format: format.name().to_owned(),
        boot_points,
        merged: None,
    }
}

fn save(dir: &Dir, file_name: &str, points: &[BootPointInfo]) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(points).expect("boot points always serialise");
    let name = sidecar(file_name);
    dir.write_atomic(&name, &bytes)
        .map_err(|e| AgentError::refused_by(ErrorCode::Io, format!("{name}: write failed"), e))
}

/// What a session may do with boot points.
pub struct Rights {
    /// Create: the session committed and applied nothing since.
    pub committed: Option<u64>,
    /// Revert and Delete: a `ferry boot-points` session holding the lock.
    pub manage: bool,
    /// The boot point this session created: it may delete that one (to
    /// undo it), and no other.
    pub created: Option<String>,
}

/// A Delete of the boot point this session took.
fn undoing(req: &Manage, rights: &Rights) -> bool {
    req.op == ManageOp::Delete && rights.created.as_deref() == Some(req.name.as_str())
}

/// Carries out one request; returns the boot points afterwards.
pub fn apply(
    req: &Manage,
    rights: &Rights,
    dir: &Dir,
    file_name: &str,
    standby: &mut dyn Standby,
    format: Format,
) -> Result<BootPointList, AgentError> {
    let refuse = |code, message: String| Err(AgentError::refused(code, message));
    let exists = standby.boot_points().contains(&req.name);
    let mut merged = None;
    match req.op {
        ManageOp::List => {}
        ManageOp::Create => {
            let Some(generation) = rights.committed else {
                return refuse(
                    ErrorCode::Malformed,
                    "a boot point is taken only right after a commit".to_owned(),
                );
            };
            if !is_boot_point_name(&req.name) {
                return refuse(
                    ErrorCode::Malformed,
                    format!("{:?} is not a boot point name (VYYYYMMDD_hhmmss)", req.name),
                );
            }
            let max = usize::from(req.max_boot_points);
            if max == 0 || max > format.max_boot_points() {
                return refuse(
                    ErrorCode::Malformed,
                    format!(
                        "{} images keep 1 to {} boot points, not {max}",
                        format.name(),
                        format.max_boot_points()
                    ),
                );
            }
            // Make room: merge the two oldest into the newer one; with a
            // limit of one, the only boot point gives way to the new one.
            while let Some(oldest) = standby
                .boot_points()
                .first()
                .filter(|_| standby.boot_points().len() >= max)
                .cloned()
            {
                if standby.boot_points().len() >= 2 {
                    standby.merge_oldest().map_err(super::image_error)?;
                } else {
                    standby
                        .delete_boot_point(&oldest)
                        .map_err(super::image_error)?;
                }
                merged = Some(oldest);
            }
            standby
                .create_boot_point(&req.name)
                .map_err(super::image_error)?;
            let mut points = list(dir, file_name, standby, format).boot_points;
            if let Some(p) = points.iter_mut().find(|p| p.name == req.name) {
                p.created_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                p.kind = if req.app_consistent { "app" } else { "crash" }.to_owned();
                p.generation = generation;
            }
            save(dir, file_name, &points)?;
        }
        ManageOp::Revert | ManageOp::Delete if !(rights.manage || undoing(req, rights)) => {
            return refuse(
                ErrorCode::Malformed,
                "boot points are reverted or deleted only by `ferry boot-points`".to_owned(),
            );
        }
        ManageOp::Revert | ManageOp::Delete if !exists => {
            return refuse(
                ErrorCode::NoSuchBootPoint,
                format!("no boot point named {:?}", req.name),
            );
        }
        ManageOp::Revert => standby.revert_to(&req.name).map_err(super::image_error)?,
        ManageOp::Delete => {
            standby
                .delete_boot_point(&req.name)
                .map_err(super::image_error)?;
            let points = list(dir, file_name, standby, format).boot_points;
            save(dir, file_name, &points)?;
        }
    }
    let mut out = list(dir, file_name, standby, format);
    out.merged = merged;
    Ok(out)
}
