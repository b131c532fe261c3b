//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to find a
//! struct member's byte offset: the plaintext kprobe reads the socket
//! cookie at `sk + offset` (ebpf/src/plaintext.rs), and aya-obj keeps its
//! BTF types private. Format: include/uapi/linux/btf.h.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One struct or union: name, and its members (name offset, type id, bit
/// offset).
struct Composite {
    members: Vec<(u32, u32, u32)>,
}

pub struct Btf<'a> {
    strings: &'a [u8],
    /// Type id → composite (structs and unions only).
    composites: HashMap<u32, Composite>,
    /// Struct name → type id (the first struct of that name).
    structs: HashMap<&'a str, u32>,
    /// Type id → the type it refers to, for typedefs and qualifiers.
    refs: HashMap<u32, u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses little-endian BTF.
    pub fn parse(raw: &'a [u8]) -> Result<Self, String> {
        let bad = |what: &str| format!("malformed BTF: {what}");
        if u16_at(raw, 0) != Some(MAGIC) {
            return Err(bad("magic"));
        }
        let hdr_len = u32_at(raw, 4).ok_or_else(|| bad("header"))? as usize;
        let type_off = u32_at(raw, 8).ok_or_else(|| bad("header"))? as usize;
        let type_len = u32_at(raw, 12).ok_or_else(|| bad("header"))? as usize;
        let str_off = u32_at(raw, 16).ok_or_else(|| bad("header"))? as usize;
        let str_len = u32_at(raw, 20).ok_or_else(|| bad("header"))? as usize;
        let types = raw
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| bad("type section"))?;
        let strings = raw
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| bad("string section"))?;
        let mut btf = Btf {
            strings,
            composites: HashMap::new(),
            structs: HashMap::new(),
            refs: HashMap::new(),
        };
        let mut at = 0;
        let mut id = 1u32;
        while at < types.len() {
            let name_off = u32_at(types, at).ok_or_else(|| bad("type"))?;
            let info = u32_at(types, at + 4).ok_or_else(|| bad("type"))?;
            let size_or_type = u32_at(types, at + 8).ok_or_else(|| bad("type"))?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,                                // INT, VAR, DECL_TAG
                3 => 12,                                         // ARRAY
                KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen, // members, DATASEC, ENUM64
                6 | 13 => 8 * vlen,                              // ENUM, FUNC_PROTO
                _ => 0,
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = at + 12 * m;
                    let name = u32_at(types, base).ok_or_else(|| bad("member"))?;
                    let ty = u32_at(types, base + 4).ok_or_else(|| bad("member"))?;
                    let off = u32_at(types, base + 8).ok_or_else(|| bad("member"))?;
                    let bits = if kind_flag { off & 0x00ff_ffff } else { off };
                    members.push((name, ty, bits));
                }
                if kind == KIND_STRUCT
                    && let Some(name) = btf.string(name_off)
                    && !name.is_empty()
                {
                    btf.structs.entry(name).or_insert(id);
                }
                btf.composites.insert(id, Composite { members });
            } else if matches!(kind, 8..=11 | 18) {
                // TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
                btf.refs.insert(id, size_or_type);
            }
            at += extra;
            id += 1;
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> Option<&'a str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// Byte offset of `member` in struct `name`, looking into anonymous
    /// struct and union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let id = *self.structs.get(name)?;
        self.find(id, member, 0).map(|bits| bits / 8)
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let c = self.composites.get(&id)?;
        for &(name, ty, bits) in &c.members {
            let n = self.string(name).unwrap_or("");
            if n == member {
                return Some(bits);
            }
            if n.is_empty() {
                let mut t = ty;
                while let Some(&next) = self.refs.get(&t) {
                    t = next;
                }
                if let Some(inner) = self.find(t, member, depth + 1) {
                    return Some(bits + inner);
                }
            }
        }
        None
    }
}
