//! `ferry boot-points export`: a standalone image of one boot point, in
//! the format the output name asks for (`.raw`/`.img`, `.qcow2`, `.vmdk`,
//! `.vhdx`), for a host that should run it without the rest of the chain.
//!
//! The boot point is read where the hypervisor would read it
//! ([`Standby::boot_file`]) and written by `qemu-img convert`; an AVHDX
//! chain, which qemu cannot read, is first flattened to raw by ferry's own
//! VHDX reader. The image's session lock is held meanwhile, so no sync
//! changes the files being read.
//!
//! [`Standby::boot_file`]: crate::image::Standby::boot_file

use std::{
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    boottest::{first_line, lock_session, BootTestError, Scratch},
    image::{self, vhdx, Dir, Format, ImageError, Standby},
    transport::{Endpoint, TargetUrl},
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export runs on the target host, beside the image: run it there with file://{path}")]
    Remote { path: String },
    #[error("{path} exists; export never overwrites")]
    Exists { path: PathBuf },
    #[error("{path}: the output name must end in .raw, .img, .qcow2, .vmdk or .vhdx")]
    OutputFormat { path: PathBuf },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Session(#[from] BootTestError),
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img convert to {path} failed: {detail}")]
    Convert { path: PathBuf, detail: String },
}

/// Writes boot point `point` of `target` to `out`; returns the format written.
/// A remote target's export runs in its agent ([`crate::sync::manage::task`]).
pub fn export(
    target: &TargetUrl,
    point: &str,
    out: &Path,
    qemu_img: &Path,
) -> Result<&'static str, ExportError> {
    if target.endpoint != Endpoint::Local {
        return Err(ExportError::Remote {
            path: target.root.join(&target.image).display().to_string(),
        });
    }
    let io = |what: String| move |source| ExportError::Io { what, source };
    let open_dir =
        || Dir::open(&target.root).map_err(io(format!("{}: open", target.root.display())));
    let dir = open_dir()?;
    let _lock = lock_session(&dir, &target.image)?;
    let standby = image::open(target.format(), open_dir()?, &target.image)?;
    export_standby(
        &LockedImage {
            path: &target.root,
            dir: &dir,
            name: &target.image,
            format: target.format(),
            standby: standby.as_ref(),
        },
        point,
        out,
        qemu_img,
    )
}

/// An image whose session lock the caller holds.
pub struct LockedImage<'a> {
    /// The image's directory, as qemu-img names it.
    pub path: &'a Path,
    /// The same directory, open.
    pub dir: &'a Dir,
    /// The image's file name in it.
    pub name: &'a str,
    pub format: Format,
    pub standby: &'a dyn Standby,
}

/// The output format `out`'s extension asks for.
pub fn output_format(out: &Path) -> Result<&'static str, ExportError> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("raw" | "img") => Ok("raw"),
        Some("qcow2") => Ok("qcow2"),
        Some("vmdk") => Ok("vmdk"),
        Some("vhdx") => Ok("vhdx"),
        _ => Err(ExportError::OutputFormat {
            path: out.to_owned(),
        }),
    }
}

/// Writes boot point `point` of `image` to `out`, as [`export`] does.
pub fn export_standby(
    image: &LockedImage,
    point: &str,
    out: &Path,
    qemu_img: &Path,
) -> Result<&'static str, ExportError> {
    let out_format = output_format(out)?;
    if out.exists() {
        return Err(ExportError::Exists {
            path: out.to_owned(),
        });
    }
    let scratch = Scratch::new()?;
    let (input, input_format, snapshot) = match image.standby.boot_file(Some(point)) {
        Ok(boot) => (image.path.join(&boot.path), boot.format, boot.snapshot),
        // qemu cannot read an AVHDX chain: flatten it with our reader.
        Err(ImageError::Unsupported { .. }) if image.format == Format::Vhdx => {
            let chain = vhdx::Vhdx::open(image.dir, image.name)?;
            let file = chain
                .boot_point_file(point)
                .ok_or_else(|| ImageError::NoSuchBootPoint {
                    name: point.to_owned(),
                })?
                .to_owned();
            let reader = vhdx::reader::ChainReader::open(image.dir, &file)?;
            let raw = scratch.0.join("boot-point.raw");
            flatten(&reader, &raw)?;
            (raw, "raw", None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut cmd = Command::new(qemu_img);
    cmd.args(["convert", "-f", input_format]);
    if let Some(s) = &snapshot {
        cmd.arg("-l").arg(format!("snapshot.name={s}"));
    }
    cmd.args(["-O", out_format]);
    if out_format == "vhdx" {
        cmd.args(["-o", "subformat=dynamic"]);
    }
    let done = cmd
        .arg(&input)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ExportError::Io {
            what: format!("run {}", qemu_img.display()),
            source,
        })?;
    if !done.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(ExportError::Convert {
            path: out.to_owned(),
            detail: first_line(&done.stderr),
        });
    }
    Ok(out_format)
}

/// Writes a VHDX chain's content into the raw file `to`, skipping zeroes.
fn flatten(reader: &vhdx::reader::ChainReader, to: &Path) -> Result<(), ExportError> {
    let io = |what: &str| {
        let what = format!("{}: {what}", to.display());
        move |source| ExportError::Io { what, source }
    };
    let mut file = std::fs::File::create(to).map_err(io("create"))?;
    let size = reader.size();
    file.set_len(size).map_err(io("size"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        reader.read_at(at, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            file.write_all_at(&buf[..n], at).map_err(io("write"))?;
        }
        at += n as u64;
    }
    file.flush().map_err(io("flush"))?;
    Ok(())
}
