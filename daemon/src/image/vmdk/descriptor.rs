//! The VMDK descriptor: the text that names a disk's extents and its parent.
//!
//! Virtual Disk Format 5.0, "The Descriptor File": a header of `key=value`
//! lines (`version`, `CID`, `parentCID`, `parentFileNameHint`, `createType`),
//! extent lines (`RW <sectors> <TYPE> "<file>" [<offset>]`) and the disk
//! database (`ddb.<key> = "<value>"`). The format is case-insensitive; `#`
//! starts a comment.
//!
//! Only what ferry writes is accepted: one extent, `monolithicFlat` (a text
//! descriptor beside a raw `FLAT` extent) or `monolithicSparse` (a hosted
//! sparse extent carrying this text inside). Everything else is refused as
//! unsupported rather than half-understood.
//!
//! [`Descriptor::render`] puts `CID=` before `parentCID=` and writes
//! `createType="…"` and `parentFileNameHint="…"` without blanks: QEMU finds
//! these with `strstr` and would otherwise read the wrong CID.

/// `parentCID` of a disk without a parent.
pub(super) const NO_PARENT: u32 = 0xffff_ffff;

/// What a descriptor says is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DescError {
    Corrupt(String),
    Unsupported(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CreateType {
    MonolithicFlat,
    MonolithicSparse,
}

impl CreateType {
    fn name(self) -> &'static str {
        match self {
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::MonolithicSparse => "monolithicSparse",
        }
    }
}

/// The one extent of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExtentLine {
    pub sectors: u64,
    pub file: String,
    /// `Some(start sector)` for a `FLAT` extent, `None` for `SPARSE`.
    pub flat_offset: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Descriptor {
    pub cid: u32,
    pub parent_cid: u32,
    /// Name of the parent's descriptor, beside this one.
    pub parent_hint: Option<String>,
    pub create_type: CreateType,
    pub extent: ExtentLine,
    /// Disk database entries, kept in order so a rewrite preserves them.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// A descriptor for a new disk of `sectors` sectors, with the geometry
    /// and adapter an ESXi VM with an LSI Logic controller expects.
    pub fn new(
        cid: u32,
        create_type: CreateType,
        extent: ExtentLine,
        parent: Option<(u32, String)>,
    ) -> Self {
        let (parent_cid, parent_hint) = match parent {
            Some((cid, hint)) => (cid, Some(hint)),
            None => (NO_PARENT, None),
        };
        let cylinders = (extent.sectors / (255 * 63)).clamp(1, 65_535);
        let ddb = [
            ("ddb.virtualHWVersion", "14".to_owned()),
            ("ddb.adapterType", "lsilogic".to_owned()),
            ("ddb.geometry.cylinders", cylinders.to_string()),
            ("ddb.geometry.heads", "255".to_owned()),
            ("ddb.geometry.sectors", "63".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Self {
            cid,
            parent_cid,
            parent_hint,
            create_type,
            extent,
            ddb,
        }
    }

    /// Parses descriptor text; an embedded descriptor ends at its first NUL.
    pub fn parse(text: &str) -> Result<Self, DescError> {
        let text = text.split('\0').next().unwrap_or("");
        let corrupt = |s: String| DescError::Corrupt(s);
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut parent_hint = None;
        let mut create_type = None;
        let mut extents = Vec::new();
        let mut ddb = Vec::new();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if ["RW", "RDONLY", "NOACCESS"]
                .iter()
                .any(|a| first.eq_ignore_ascii_case(a))
            {
                extents.push(parse_extent(line).map_err(|e| match e {
                    DescError::Corrupt(r) => corrupt(format!("line {}: {r}", no + 1)),
                    other => other,
                })?);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(corrupt(format!(
                    "line {}: neither key=value nor extent",
                    no + 1
                )));
            };
            let key = key.trim();
            let value = unquote(value.trim());
            let hex = |v: &str| {
                u32::from_str_radix(v, 16)
                    .map_err(|_| corrupt(format!("{key} {v:?} is not a 32-bit hex number")))
            };
            match key.to_ascii_lowercase().as_str() {
                "version" => version = Some(value.to_owned()),
                "cid" => cid = Some(hex(value)?),
                "parentcid" => parent_cid = Some(hex(value)?),
                "parentfilenamehint" => parent_hint = Some(value.to_owned()),
                "createtype" => create_type = Some(value.to_owned()),
                k if k.starts_with("ddb.") => ddb.push((key.to_owned(), value.to_owned())),
                _ => {}
            }
        }
        match version.as_deref() {
            Some("1" | "2" | "3") => {}
            Some(v) => return Err(corrupt(format!("descriptor version {v:?}"))),
            None => return Err(corrupt("no version line".into())),
        }
        let cid = cid.ok_or_else(|| corrupt("no CID".into()))?;
        let parent_cid = parent_cid.ok_or_else(|| corrupt("no parentCID".into()))?;
        let create_type = match create_type.as_deref() {
            None => return Err(corrupt("no createType".into())),
            Some(t) if t.eq_ignore_ascii_case("monolithicFlat") => CreateType::MonolithicFlat,
            Some(t) if t.eq_ignore_ascii_case("monolithicSparse") => CreateType::MonolithicSparse,
            Some(t) if t.eq_ignore_ascii_case("streamOptimized") => {
                return Err(DescError::Unsupported(
                    "streamOptimized (compressed) disks".into(),
                ))
            }
            Some(t) => return Err(DescError::Unsupported(format!("createType {t:?}"))),
        };
        let extent = match extents.len() {
            0 => return Err(corrupt("no extent line".into())),
            1 => extents.pop().expect("one extent"),
            n => return Err(DescError::Unsupported(format!("{n} extents"))),
        };
        match (create_type, extent.flat_offset) {
            (CreateType::MonolithicFlat, Some(_)) | (CreateType::MonolithicSparse, None) => {}
            _ => {
                return Err(corrupt(format!(
                    "extent type does not match createType {}",
                    create_type.name()
                )))
            }
        }
        match (&parent_hint, parent_cid) {
            (None, NO_PARENT) => {}
            (Some(_), NO_PARENT) => {
                return Err(corrupt("parentFileNameHint without parentCID".into()))
            }
            (None, _) => return Err(corrupt("parentCID without parentFileNameHint".into())),
            (Some(hint), _) => single_name(hint)?,
        }
        if parent_hint.is_some() && create_type != CreateType::MonolithicSparse {
            return Err(DescError::Unsupported(
                "a monolithicFlat disk with a parent".into(),
            ));
        }
        Ok(Self {
            cid,
            parent_cid,
            parent_hint,
            create_type,
            extent,
            ddb,
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::from("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n");
        s += &format!("CID={:08x}\nparentCID={:08x}\n", self.cid, self.parent_cid);
        if let Some(hint) = &self.parent_hint {
            s += &format!("parentFileNameHint=\"{hint}\"\n");
        }
        s += &format!(
            "createType=\"{}\"\n\n# Extent description\n",
            self.create_type.name()
        );
        let e = &self.extent;
        match e.flat_offset {
            Some(off) => s += &format!("RW {} FLAT \"{}\" {off}\n", e.sectors, e.file),
            None => s += &format!("RW {} SPARSE \"{}\"\n", e.sectors, e.file),
        }
        s += "\n# The Disk Data Base\n#DDB\n\n";
        for (k, v) in &self.ddb {
            s += &format!("{k} = \"{v}\"\n");
        }
        s
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Names a descriptor may refer to: files beside it, nothing else.
fn single_name(name: &str) -> Result<(), DescError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(DescError::Unsupported(format!(
            "file {name:?} outside the image's directory"
        )));
    }
    Ok(())
}

fn parse_extent(line: &str) -> Result<ExtentLine, DescError> {
    let corrupt = |s: &str| DescError::Corrupt(format!("extent {line:?}: {s}"));
    let (head, rest) = line
        .split_once('"')
        .ok_or_else(|| corrupt("no quoted file name"))?;
    let (file, tail) = rest
        .split_once('"')
        .ok_or_else(|| corrupt("unterminated file name"))?;
    let head: Vec<&str> = head.split_whitespace().collect();
    let [access, sectors, kind] = head[..] else {
        return Err(corrupt("expected access, size and type before the name"));
    };
    let sectors: u64 = sectors.parse().map_err(|_| corrupt("bad size"))?;
    if sectors == 0 {
        return Err(corrupt("empty extent"));
    }
    if !access.eq_ignore_ascii_case("RW") {
        return Err(DescError::Unsupported(format!("{access} extents")));
    }
    single_name(file)?;
    let tail: Vec<&str> = tail.split_whitespace().collect();
    let flat_offset = match (kind.to_ascii_uppercase().as_str(), &tail[..]) {
        ("FLAT", [off]) => Some(off.parse().map_err(|_| corrupt("bad offset"))?),
        ("FLAT", _) => return Err(corrupt("FLAT extent needs one offset")),
        ("SPARSE", []) => None,
        ("SPARSE", _) => return Err(corrupt("trailing fields")),
        (k, _) => return Err(DescError::Unsupported(format!("{k} extents"))),
    };
    Ok(ExtentLine {
        sectors,
        file: file.to_owned(),
        flat_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(parent: Option<(u32, String)>) -> Descriptor {
        Descriptor::new(
            0x1234_abcd,
            CreateType::MonolithicSparse,
            ExtentLine {
                sectors: 20480,
                file: "web.vmdk".into(),
                flat_offset: None,
            },
            parent,
        )
    }

    #[test]
    fn render_parses_back() {
        let d = sparse(Some((0xdead_beef, "web-base.vmdk".into())));
        assert_eq!(Descriptor::parse(&d.render()).unwrap(), d);
        let flat = Descriptor::new(
            7,
            CreateType::MonolithicFlat,
            ExtentLine {
                sectors: 8,
                file: "web-flat.vmdk".into(),
                flat_offset: Some(0),
            },
            None,
        );
        let text = flat.render();
        assert!(text.contains("RW 8 FLAT \"web-flat.vmdk\" 0\n"), "{text}");
        assert_eq!(Descriptor::parse(&text).unwrap(), flat);
    }

    #[test]
    fn cid_comes_before_parent_cid() {
        // QEMU takes the first "CID" in the text as the disk's own.
        let text = sparse(Some((1, "p.vmdk".into()))).render();
        let cid = text.find("CID=").unwrap();
        assert!(cid < text.find("parentCID=").unwrap());
        assert_eq!(&text[cid..cid + 12], "CID=1234abcd");
        assert!(text.contains("parentFileNameHint=\"p.vmdk\"\n"));
        assert!(text.contains("createType=\"monolithicSparse\"\n"));
    }

    #[test]
    fn parses_qemu_and_vmware_text() {
        let text = "# Disk DescriptorFile\r\nversion=1\r\nCID=a7b54ff8\r\n\
            parentCID=29cb90e5\r\ncreateType=\"monolithicSparse\"\r\n\
            parentFileNameHint=\"base.vmdk\"\r\n# Extent description\r\n\
            RW 20480 SPARSE \"d1.vmdk\"\r\n\r\n#DDB\r\nddb.adapterType = \"ide\"\r\n\0\0garbage";
        let d = Descriptor::parse(text).unwrap();
        assert_eq!(d.cid, 0xa7b5_4ff8);
        assert_eq!(d.parent_cid, 0x29cb_90e5);
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extent.file, "d1.vmdk");
        assert_eq!(d.ddb, vec![("ddb.adapterType".into(), "ide".into())]);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let base = sparse(None).render();
        let corrupt = |t: &str| matches!(Descriptor::parse(t), Err(DescError::Corrupt(_)));
        let unsupported = |t: &str| matches!(Descriptor::parse(t), Err(DescError::Unsupported(_)));
        assert!(corrupt(&base.replace("CID=1234abcd", "CID=xyz")));
        assert!(corrupt(&base.replace("version=1", "version=9")));
        assert!(corrupt(&base.replace("RW 20480 SPARSE \"web.vmdk\"\n", "")));
        assert!(corrupt(
            &base.replace("parentCID=ffffffff", "parentCID=00000001")
        ));
        assert!(corrupt("random bytes\n"));
        assert!(unsupported(
            &base.replace("monolithicSparse", "streamOptimized")
        ));
        assert!(unsupported(
            &base.replace("monolithicSparse", "twoGbMaxExtentSparse")
        ));
        assert!(unsupported(
            &base.replace("\"web.vmdk\"", "\"../web.vmdk\"")
        ));
        let two = base.replace(
            "RW 20480 SPARSE \"web.vmdk\"\n",
            "RW 10240 SPARSE \"a.vmdk\"\nRW 10240 SPARSE \"b.vmdk\"\n",
        );
        assert!(unsupported(&two));
    }
}
