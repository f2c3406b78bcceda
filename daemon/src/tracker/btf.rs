//! Reads the few struct offsets and enum values the tracker needs from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`), so nothing is compiled in
//! for one kernel.
//!
//! Only the parts of the format used here are decoded: type records are walked
//! to find their lengths, and struct/union members and enum values are read.

use std::{collections::HashMap, path::Path};

use tracker_common::KernelLayout;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug)]
enum Type {
    Composite { name_off: u32, members: Vec<Member> },
    Enum { values: Vec<(u32, i64)> },
    Other,
}

/// The decoded subset of a BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the implicit `void`.
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let field = |o| {
            u32_at(o)
                .map(|v| v as usize)
                .ok_or(BtfError::Malformed("short header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let types_start = hdr_len + type_off;
        let strs_start = hdr_len + str_off;
        let strings = data
            .get(strs_start..strs_start + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let end = types_start + type_len;
        if end > data.len() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }
        let mut types = vec![Type::Other];
        let mut pos = types_start;
        let short = BtfError::Malformed("truncated type record");
        while pos < end {
            let name_off = u32_at(pos).ok_or(BtfError::Malformed("truncated type record"))?;
            let info = u32_at(pos + 4).ok_or(BtfError::Malformed("truncated type record"))?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let (Some(name_off), Some(type_id), Some(off)) =
                            (u32_at(m), u32_at(m + 4), u32_at(m + 8))
                        else {
                            return Err(short);
                        };
                        let bit_offset = if kind_flag { off & 0xff_ffff } else { off };
                        members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                        });
                    }
                    pos += vlen * 12;
                    Type::Composite { name_off, members }
                }
                KIND_ENUM | KIND_ENUM64 => {
                    let rec = if kind == KIND_ENUM { 8 } else { 12 };
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = pos + i * rec;
                        let (Some(n), Some(lo)) = (u32_at(m), u32_at(m + 4)) else {
                            return Err(short);
                        };
                        let value = if kind == KIND_ENUM {
                            i64::from(lo as i32)
                        } else {
                            let hi =
                                u32_at(m + 8).ok_or(BtfError::Malformed("truncated enum64"))?;
                            ((u64::from(hi) << 32) | u64::from(lo)) as i64
                        };
                        values.push((n, value));
                    }
                    pos += vlen * rec;
                    Type::Enum { values }
                }
                _ => {
                    pos += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_FUNC_PROTO => vlen * 8,
                        KIND_DATASEC => vlen * 12,
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        let mut btf = Self {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name_off, .. } = ty {
                let name = btf.str_at(*name_off);
                if !name.is_empty() {
                    // The first definition wins; forward declarations are not
                    // composites, so this is the real one.
                    btf.by_name.entry(name.to_owned()).or_insert(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// unions and structs.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        self.find_member(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::Missing(format!("{name}.{member}")))
    }

    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let Some(Type::Composite { members, .. }) = self.types.get(id as usize) else {
            return None;
        };
        for m in members {
            let name = self.str_at(m.name_off);
            if name == member {
                return Some(m.bit_offset);
            }
            if name.is_empty() && depth < 8 {
                // Anonymous members point straight at their struct or union.
                if let Some(off) = self.find_member(m.type_id, member, depth + 1) {
                    return Some(m.bit_offset + off);
                }
            }
        }
        None
    }

    /// Value of enumerator `name` in any enum.
    pub fn enum_value(&self, name: &str) -> Result<i64, BtfError> {
        self.types
            .iter()
            .find_map(|ty| match ty {
                Type::Enum { values } => values
                    .iter()
                    .find(|(n, _)| self.str_at(*n) == name)
                    .map(|(_, v)| *v),
                _ => None,
            })
            .ok_or_else(|| BtfError::Missing(format!("enumerator {name}")))
    }

    /// The layout the tracker needs.
    pub fn kernel_layout(&self) -> Result<KernelLayout, BtfError> {
        let iter = self.member_offset("bio", "bi_iter")?;
        let mut write_ops = 0u64;
        for op in [
            "REQ_OP_WRITE",
            "REQ_OP_DISCARD",
            "REQ_OP_SECURE_ERASE",
            "REQ_OP_WRITE_ZEROES",
            "REQ_OP_ZONE_APPEND",
        ] {
            let value = self.enum_value(op)?;
            if !(0..64).contains(&value) {
                return Err(BtfError::Malformed("REQ_OP value out of range"));
            }
            write_ops |= 1 << value;
        }
        Ok(KernelLayout {
            bio_bdev: self.member_offset("bio", "bi_bdev")?,
            bio_opf: self.member_offset("bio", "bi_opf")?,
            bio_sector: iter + self.member_offset("bvec_iter", "bi_sector")?,
            bio_size: iter + self.member_offset("bvec_iter", "bi_size")?,
            bdev_disk: self.member_offset("block_device", "bd_disk")?,
            disk_major: self.member_offset("gendisk", "major")?,
            disk_first_minor: self.member_offset("gendisk", "first_minor")?,
            op_zone_append: self.enum_value("REQ_OP_ZONE_APPEND")? as u32,
            rq_q: self.member_offset("request", "q")?,
            rq_sector: self.member_offset("request", "__sector")?,
            rq_cmd_flags: self.member_offset("request", "cmd_flags")?,
            queue_disk: self.member_offset("request_queue", "disk")?,
            // Not in BTF: the daemon runs on the kernel's own CPU, and x86
            // (TSO) never satisfies a load before an earlier one.
            loads_ordered: u32::from(cfg!(any(target_arch = "x86_64", target_arch = "x86"))),
            _pad: 0,
            write_ops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob with `struct outer { int a; union { int b; long c; }; }`
    /// and `enum req_op { REQ_OP_X = 9 }`.
    fn synthetic() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0int\0REQ_OP_X\0";
        let s = |name: &str| {
            let needle = format!("{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
        };
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: anonymous union { b @0, c @0 }
        push(0);
        push((KIND_UNION << 24) | 2);
        push(8);
        push(s("b"));
        push(1);
        push(0);
        push(s("c"));
        push(1);
        push(0);
        // 3: struct outer { a @0, <anon> @64 bits }
        push(s("outer"));
        push((KIND_STRUCT << 24) | 2);
        push(16);
        push(s("a"));
        push(1);
        push(0);
        push(0);
        push(2);
        push(64);
        // 4: enum { REQ_OP_X = 9 }
        push(0);
        push((KIND_ENUM << 24) | 1);
        push(4);
        push(s("REQ_OP_X"));
        push(9);
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&synthetic()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert!(btf.member_offset("outer", "zz").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
        assert_eq!(btf.enum_value("REQ_OP_X").unwrap(), 9);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        let mut blob = synthetic();
        blob.truncate(40);
        assert!(Btf::parse(&blob).is_err());
    }

    #[test]
    fn running_kernel_layout_is_plausible() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: this kernel exposes no BTF at /sys/kernel/btf/vmlinux");
            return;
        };
        let l = btf.kernel_layout().unwrap();
        // bi_bdev follows bi_next; bi_size follows bi_sector in bvec_iter.
        assert_eq!(l.bio_bdev, 8);
        assert_eq!(l.bio_size, l.bio_sector + 8);
        assert_eq!(l.disk_first_minor, l.disk_major + 4);
        assert_eq!(l.write_ops & 1, 0, "REQ_OP_READ must not count");
        assert_ne!(l.write_ops & 2, 0, "REQ_OP_WRITE must count");
    }
}
