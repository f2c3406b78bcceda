//! Work a boot point session does on the target host, beside the image:
//! boot it under qemu, or export one boot point. This is how `ferry
//! boot-test` and `ferry boot-points export` reach an `ssh://` target; a
//! `file://` target runs the same functions in-process.
//!
//! The source sends a [`Task`] as JSON in a `Task` frame, and the agent
//! answers with the task's report as JSON in a `Managed` frame. The session
//! already holds the image's lock, so no sync changes the files meanwhile.
//! An export is written beside the image, under a plain file name that must
//! not exist yet: nothing is written anywhere else, nothing is overwritten.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{chain_text, AgentError};
use crate::{
    boottest::{self, BootTestError, BootTestOptions},
    export::{self, ExportError, LockedImage},
    image::{Dir, Format, ImageError, Standby},
    protocol::ErrorCode,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "kebab-case")]
pub enum Task {
    /// Boot the working image or a boot point; answered with a
    /// [`boottest::BootTestReport`].
    BootTest(BootTestOptions),
    /// Write boot point `point` to `out`, a file name beside the image;
    /// answered with an [`ExportReport`].
    Export {
        point: String,
        out: String,
        qemu_img: PathBuf,
    },
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportReport {
    /// The output's path on the target host.
    pub path: PathBuf,
    pub format: String,
}

/// The image a task works on; its session lock is held.
pub(super) struct Beside<'a> {
    pub dir_path: &'a Path,
    pub dir: Dir,
    pub name: &'a str,
    pub format: Format,
    pub standby: &'a dyn Standby,
}

/// Runs `task`; returns its report as JSON.
pub(super) fn run(task: &Task, image: &Beside) -> Result<String, AgentError> {
    let json = match task {
        Task::BootTest(opts) => {
            let report = boottest::boot_standby(image.dir_path, image.standby, opts)
                .map_err(boot_test_error)?;
            serde_json::to_string(&report)
        }
        Task::Export {
            point,
            out,
            qemu_img,
        } => {
            check_out_name(out)?;
            let path = image.dir_path.join(out);
            let format = export::export_standby(
                &LockedImage {
                    path: image.dir_path,
                    dir: &image.dir,
                    name: image.name,
                    format: image.format,
                    standby: image.standby,
                },
                point,
                &path,
                qemu_img,
            )
            .map_err(export_error)?;
            serde_json::to_string(&ExportReport {
                path,
                format: format.to_owned(),
            })
        }
    };
    Ok(json.expect("reports always serialise"))
}

/// An export's output is one new file beside the image: a plain name.
fn check_out_name(out: &str) -> Result<(), AgentError> {
    if out.is_empty() || out == "." || out == ".." || out.contains(['/', '\0']) {
        return Err(AgentError::refused(
            ErrorCode::PathEscape,
            format!(
                "export output {out:?} is not a plain file name (it is written beside the image)"
            ),
        ));
    }
    Ok(())
}

fn code_of(e: &ImageError) -> ErrorCode {
    match e {
        ImageError::NoSuchBootPoint { .. } => ErrorCode::NoSuchBootPoint,
        _ => ErrorCode::Io,
    }
}

fn boot_test_error(e: BootTestError) -> AgentError {
    let code = match &e {
        BootTestError::Image(i) => code_of(i),
        BootTestError::Busy { .. } => ErrorCode::Busy,
        BootTestError::Spawn { .. }
        | BootTestError::Convert { .. }
        | BootTestError::Qemu { .. } => ErrorCode::Tool,
        _ => ErrorCode::Io,
    };
    AgentError::refused(code, chain_text(&e))
}

fn export_error(e: ExportError) -> AgentError {
    if let ExportError::Session(b) = e {
        return boot_test_error(b);
    }
    let code = match &e {
        ExportError::Image(i) => code_of(i),
        ExportError::Exists { .. } => ErrorCode::Exists,
        ExportError::OutputFormat { .. } => ErrorCode::Malformed,
        ExportError::Convert { .. } => ErrorCode::Tool,
        _ => ErrorCode::Io,
    };
    AgentError::refused(code, chain_text(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_goes_beside_the_image_only() {
        for bad in [
            "",
            ".",
            "..",
            "../x.qcow2",
            "sub/x.qcow2",
            "/tmp/x.raw",
            "a\0b.raw",
        ] {
            let err = check_out_name(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    AgentError::Refused {
                        code: ErrorCode::PathEscape,
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        check_out_name("web-monday.qcow2").unwrap();
    }

    #[test]
    fn tasks_round_trip_as_json() {
        let task = Task::BootTest(BootTestOptions::new(Some("V20261122_010203".into())));
        let json = serde_json::to_string(&task).unwrap();
        assert!(json.contains("\"task\":\"boot-test\""), "{json}");
        let back: Task = serde_json::from_str(&json).unwrap();
        assert!(
            matches!(back, Task::BootTest(o) if o.point.as_deref() == Some("V20261122_010203"))
        );
    }
}
