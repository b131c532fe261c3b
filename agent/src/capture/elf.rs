//! OpenSSL linked into an executable (or any other ELF file a process
//! maps), found by symbol (docs/plaintext.md, "Which clients are
//! visible"): the file offsets of `SSL_write`, `SSL_read`, `SSL_write_ex`
//! and `SSL_read_ex` from its `.dynsym`, else its `.symtab`, for uprobes
//! attached by offset.
//!
//! The reading is bounded: the ELF header, the program and section headers
//! (at most [`MAX_HEADERS`] each) and then the symbol tables and their
//! string tables in pieces of [`CHUNK`] bytes, each table at most
//! [`MAX_TABLE`] bytes; never the file's code or data. Memory stays at
//! two pieces and [`MAX_NAME_COPIES`] places per name; time grows with
//! the tables' size (once per file version: the attacher caches). A file that is not
//! a 64-bit little-endian ELF, or whose headers point outside it, is an
//! [`ElfError`], never a panic (unit tests below with truncated and
//! garbage input; `fuzz/fuzz_targets/elf_symbols.rs`).
//!
//! Only defined `STT_FUNC` symbols count: an executable that links the
//! shared libssl has `SSL_write` in its `.dynsym` as undefined, and is not
//! a static OpenSSL. A stripped file has no `.symtab`; unless it exports
//! the functions in `.dynsym` (Node.js does) they are not found.
//!
//! [`dynamic_strings_hold`] reads the dynamic string table the same way:
//! whether an executable names a library (GnuTLS) it will load.
//!
//! Who can change the input: whoever can write the file (the workload's
//! image). A file that lies about its symbols gets uprobes at wrong
//! offsets in its own process only (the uprobes are per process); the
//! plaintext it yields is evidence from that process, as any other.

use std::{fs::File, io, os::unix::fs::FileExt};

/// Bytes read per piece of a symbol or string table.
pub const CHUNK: usize = 256 * 1024;
/// The largest symbol or string table read (a larger one is an error).
pub const MAX_TABLE: u64 = 256 * 1024 * 1024;
/// Places in one string table kept per wanted name (a real one has it
/// once or twice; a hostile one could repeat it millions of times).
pub const MAX_NAME_COPIES: usize = 64;
/// The most program or section headers read.
pub const MAX_HEADERS: u16 = 4096;

const SHT_SYMTAB: u32 = 2;
const SHT_DYNSYM: u32 = 11;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const STT_FUNC: u8 = 2;
const SYM_SIZE: usize = 24;

/// Something to read an ELF file from at offsets: a file, or bytes (tests,
/// fuzzing).
pub trait Source {
    /// Its length in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A file and its length at open.
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    #[error("malformed ELF: {0}")]
    Malformed(&'static str),
    #[error("{0} is larger than the limit")]
    TooLarge(&'static str),
    #[error("read: {0}")]
    Io(String),
}

impl From<io::Error> for ElfError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Malformed("a header or table points past the end of the file")
        } else {
            Self::Io(e.to_string())
        }
    }
}

/// What a file holds of the wanted functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Every wanted function, each with its file offset (in the order asked).
    All(Vec<u64>),
    /// Some of them (their names), not all: nothing is attached.
    Some(Vec<String>),
    /// None of them (no OpenSSL, or stripped).
    None,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

struct Section {
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

/// An executable segment: (vaddr, file offset, file size).
type Segment = (u64, u64, u64);

/// The executable segments and the sections of `src`.
fn headers<S: Source + ?Sized>(src: &S) -> Result<(Vec<Segment>, Vec<Section>), ElfError> {
    let mut eh = [0u8; 64];
    if src.size() < 64 {
        return Err(ElfError::NotElf);
    }
    src.read_exact_at(&mut eh, 0)?;
    if &eh[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(ElfError::Unsupported);
    }
    let (phoff, shoff) = (u64_at(&eh, 32), u64_at(&eh, 40));
    let (phentsize, phnum) = (u16_at(&eh, 54), u16_at(&eh, 56));
    let (shentsize, shnum) = (u16_at(&eh, 58), u16_at(&eh, 60));
    if phnum > MAX_HEADERS || shnum > MAX_HEADERS {
        return Err(ElfError::TooLarge("the header table"));
    }
    if (phnum > 0 && phentsize != 56) || (shnum > 0 && shentsize != 64) {
        return Err(ElfError::Malformed("unexpected header entry size"));
    }
    let mut ph = vec![0u8; usize::from(phnum) * 56];
    src.read_exact_at(&mut ph, phoff)?;
    let segments: Vec<Segment> = ph
        .chunks_exact(56)
        .filter(|p| u32_at(p, 0) == PT_LOAD && u32_at(p, 4) & PF_X != 0)
        .map(|p| (u64_at(p, 16), u64_at(p, 8), u64_at(p, 32)))
        .collect();
    let mut sh = vec![0u8; usize::from(shnum) * 64];
    src.read_exact_at(&mut sh, shoff)?;
    let sections: Vec<Section> = sh
        .chunks_exact(64)
        .map(|s| Section {
            kind: u32_at(s, 4),
            offset: u64_at(s, 24),
            size: u64_at(s, 32),
            link: u32_at(s, 40),
        })
        .collect();
    Ok((segments, sections))
}

/// Whether the dynamic symbols' string table of `src` holds each of
/// `names` as a whole string: the libraries a dynamically linked
/// executable needs (`DT_NEEDED`) are named there, as are the symbols it
/// imports. No `.dynsym` (a static file): none.
pub fn dynamic_strings_hold<S: Source + ?Sized>(
    src: &S,
    names: &[&str],
) -> Result<Vec<bool>, ElfError> {
    let (_, sections) = headers(src)?;
    let mut held = vec![false; names.len()];
    for table in sections.iter().filter(|s| s.kind == SHT_DYNSYM) {
        let strtab = sections
            .get(table.link as usize)
            .ok_or(ElfError::Malformed("a symbol table links no string table"))?;
        for (h, places) in held.iter_mut().zip(name_offsets(src, strtab, names)?) {
            // A whole string: at the table's start or after a NUL.
            *h |= places
                .iter()
                .any(|&at| at == 0 || whole_string_at(src, strtab, at));
        }
    }
    Ok(held)
}

/// Whether the string at `at` of `strtab` starts there (a NUL before it).
fn whole_string_at<S: Source + ?Sized>(src: &S, strtab: &Section, at: u64) -> bool {
    let mut b = [1u8];
    src.read_exact_at(&mut b, strtab.offset + at - 1).is_ok() && b[0] == 0
}

/// The file offsets of the `wanted` functions in `src`, or which of them
/// it has.
pub fn find_functions<S: Source + ?Sized>(src: &S, wanted: &[&str]) -> Result<Lookup, ElfError> {
    Ok(lookup(wanted, &find_function_ranges(src, wanted)?))
}

/// What `found` (the [`find_function_ranges`] of `wanted`) holds of them.
pub fn lookup(wanted: &[&str], found: &[Option<(u64, u64)>]) -> Lookup {
    let found: Vec<Option<u64>> = found.iter().map(|r| r.map(|(offset, _)| offset)).collect();
    if found.iter().all(Option::is_some) {
        return Lookup::All(found.into_iter().flatten().collect());
    }
    let some: Vec<String> = wanted
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_some())
        .map(|(n, _)| n.to_string())
        .collect();
    if some.is_empty() {
        Lookup::None
    } else {
        Lookup::Some(some)
    }
}

/// The file offset and size (`st_size`) of each of the `wanted` functions
/// `src` defines.
pub fn find_function_ranges<S: Source + ?Sized>(
    src: &S,
    wanted: &[&str],
) -> Result<Vec<Option<(u64, u64)>>, ElfError> {
    let (segments, sections) = headers(src)?;
    let mut found: Vec<Option<(u64, u64)>> = vec![None; wanted.len()];
    // .dynsym first: it is small, and where the functions are exported
    // (Node.js) .symtab need not be read.
    for kind in [SHT_DYNSYM, SHT_SYMTAB] {
        for table in sections.iter().filter(|s| s.kind == kind) {
            if found.iter().all(Option::is_some) {
                break;
            }
            let strtab = sections
                .get(table.link as usize)
                .ok_or(ElfError::Malformed("a symbol table links no string table"))?;
            let names = name_offsets(src, strtab, wanted)?;
            if names.iter().all(Vec::is_empty) {
                continue;
            }
            scan_symbols(src, table, &names, &segments, &mut found)?;
        }
    }
    Ok(found)
}

fn check_table(s: &Section, src_len: u64, what: &'static str) -> Result<(), ElfError> {
    if s.size > MAX_TABLE {
        return Err(ElfError::TooLarge(what));
    }
    if s.offset.checked_add(s.size).is_none_or(|end| end > src_len) {
        return Err(ElfError::Malformed(
            "a table points past the end of the file",
        ));
    }
    Ok(())
}

/// For each wanted name, the offsets in `strtab` where it starts as a
/// NUL-terminated string (a linker may share a name's tail with a longer
/// one: `SSL_write` may start inside `XSSL_write`). Read in pieces that
/// overlap by the longest name.
fn name_offsets<S: Source + ?Sized>(
    src: &S,
    strtab: &Section,
    wanted: &[&str],
) -> Result<Vec<Vec<u64>>, ElfError> {
    check_table(strtab, src.size(), "a string table")?;
    let longest = wanted.iter().map(|w| w.len()).max().unwrap_or(0);
    let mut out = vec![Vec::new(); wanted.len()];
    let mut buf = vec![0u8; CHUNK + longest];
    // `pos` is the table offset of buf[0].
    let mut pos = 0u64;
    while pos < strtab.size {
        let n = usize::try_from((strtab.size - pos).min(buf.len() as u64)).unwrap_or(CHUNK);
        src.read_exact_at(&mut buf[..n], strtab.offset + pos)?;
        let piece = &buf[..n];
        // NULs at or after `longest` in this piece (before that, the
        // previous piece saw them), or all of them in the first piece.
        let from = if pos == 0 { 0 } else { longest };
        for (i, _) in piece
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, b)| **b == 0)
        {
            for (k, w) in wanted.iter().enumerate() {
                if i >= w.len()
                    && out[k].len() < MAX_NAME_COPIES
                    && &piece[i - w.len()..i] == w.as_bytes()
                {
                    out[k].push(pos + (i - w.len()) as u64);
                }
            }
        }
        if pos + n as u64 >= strtab.size {
            break;
        }
        pos += (n - longest) as u64;
    }
    Ok(out)
}

/// Defined functions of `table` whose name offset is a wanted name's:
/// their file offsets and sizes into `found`.
fn scan_symbols<S: Source + ?Sized>(
    src: &S,
    table: &Section,
    names: &[Vec<u64>],
    segments: &[Segment],
    found: &mut [Option<(u64, u64)>],
) -> Result<(), ElfError> {
    check_table(table, src.size(), "a symbol table")?;
    let per = CHUNK / SYM_SIZE * SYM_SIZE;
    let mut buf = vec![0u8; per];
    let mut pos = 0u64;
    let whole = table.size / SYM_SIZE as u64 * SYM_SIZE as u64;
    while pos < whole {
        let n = usize::try_from((whole - pos).min(per as u64)).unwrap_or(per);
        src.read_exact_at(&mut buf[..n], table.offset + pos)?;
        for sym in buf[..n].chunks_exact(SYM_SIZE) {
            let (name, info, shndx, value, size) = (
                u64::from(u32_at(sym, 0)),
                sym[4],
                u16_at(sym, 6),
                u64_at(sym, 8),
                u64_at(sym, 16),
            );
            if info & 0xf != STT_FUNC || shndx == 0 || value == 0 {
                continue;
            }
            for (k, offsets) in names.iter().enumerate() {
                if found[k].is_none()
                    && offsets.contains(&name)
                    && let Some(off) = file_offset(segments, value)
                {
                    found[k] = Some((off, size));
                }
            }
        }
        pos += n as u64;
    }
    Ok(())
}

/// The file offset of virtual address `vaddr`, if an executable segment
/// maps it from the file.
fn file_offset(segments: &[Segment], vaddr: u64) -> Option<u64> {
    segments.iter().find_map(|&(start, offset, filesz)| {
        let rel = vaddr.checked_sub(start)?;
        (rel < filesz).then(|| offset.checked_add(rel)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: [&str; 4] = ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"];

    /// A minimal ELF: one executable PT_LOAD (vaddr 0x1000 from file
    /// offset 0x1000, 0x1000 bytes), a .symtab of `syms` (name, type,
    /// shndx, value) and its string table. `shared` shares the tail of
    /// the first name with a longer string.
    fn elf(syms: &[(&str, u8, u16, u64)]) -> Vec<u8> {
        let mut strtab = b"\0XSSL_write\0".to_vec();
        let mut symtab = vec![0u8; SYM_SIZE];
        for (name, typ, shndx, value) in syms {
            let off = if *name == "SSL_write" {
                2
            } else {
                let o = strtab.len();
                strtab.extend_from_slice(name.as_bytes());
                strtab.push(0);
                o
            };
            let mut s = vec![0u8; SYM_SIZE];
            s[0..4].copy_from_slice(&(off as u32).to_le_bytes());
            s[4] = 0x10 | typ;
            s[6..8].copy_from_slice(&shndx.to_le_bytes());
            s[8..16].copy_from_slice(&value.to_le_bytes());
            symtab.extend(s);
        }
        let mut f = vec![0u8; 0x2000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        let phoff = 64u64;
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes());
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&0x1000u64.to_le_bytes());
        let sym_off = f.len() as u64;
        f.extend(&symtab);
        let str_off = f.len() as u64;
        f.extend(&strtab);
        let shoff = f.len() as u64;
        f[40..48].copy_from_slice(&shoff.to_le_bytes());
        f[58..60].copy_from_slice(&64u16.to_le_bytes());
        f[60..62].copy_from_slice(&3u16.to_le_bytes());
        let mut sh = vec![0u8; 64 * 3];
        let s1 = &mut sh[64..128];
        s1[4..8].copy_from_slice(&SHT_SYMTAB.to_le_bytes());
        s1[24..32].copy_from_slice(&sym_off.to_le_bytes());
        s1[32..40].copy_from_slice(&(symtab.len() as u64).to_le_bytes());
        s1[40..44].copy_from_slice(&2u32.to_le_bytes());
        let s2 = &mut sh[128..192];
        s2[4..8].copy_from_slice(&3u32.to_le_bytes());
        s2[24..32].copy_from_slice(&str_off.to_le_bytes());
        s2[32..40].copy_from_slice(&(strtab.len() as u64).to_le_bytes());
        f.extend(sh);
        f
    }

    fn all_four() -> Vec<u8> {
        elf(&[
            ("SSL_write", STT_FUNC, 1, 0x1100),
            ("SSL_read", STT_FUNC, 1, 0x1200),
            ("SSL_write_ex", STT_FUNC, 1, 0x1300),
            ("SSL_read_ex", STT_FUNC, 1, 0x1400),
            ("other", STT_FUNC, 1, 0x1500),
        ])
    }

    #[test]
    fn all_four_functions_are_found_at_their_file_offsets() {
        // SSL_write's name is the tail of "XSSL_write".
        assert_eq!(
            find_functions(all_four().as_slice(), &WANTED),
            Ok(Lookup::All(vec![0x1100, 0x1200, 0x1300, 0x1400]))
        );
    }

    #[test]
    fn some_functions_are_named_and_undefined_ones_do_not_count() {
        let f = elf(&[
            ("SSL_write", STT_FUNC, 1, 0x1100),
            ("SSL_read", STT_FUNC, 1, 0x1200),
            // undefined (a client of the shared libssl), and not a function
            ("SSL_write_ex", STT_FUNC, 0, 0),
            ("SSL_read_ex", 1, 1, 0x1400),
        ]);
        assert_eq!(
            find_functions(f.as_slice(), &WANTED),
            Ok(Lookup::Some(vec!["SSL_write".into(), "SSL_read".into()]))
        );
        let none = elf(&[("main", STT_FUNC, 1, 0x1100)]);
        assert_eq!(find_functions(none.as_slice(), &WANTED), Ok(Lookup::None));
        // outside the executable segment: not found
        let out = elf(&[("SSL_write", STT_FUNC, 1, 0x9000)]);
        assert_eq!(find_functions(out.as_slice(), &WANTED), Ok(Lookup::None));
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        let f = all_four();
        for n in 0..f.len() {
            let r = find_functions(&f[..n], &WANTED);
            assert!(r.is_err() || r == Ok(Lookup::None), "{n}: {r:?}");
        }
        assert_eq!(
            find_functions(&b"hello"[..], &WANTED),
            Err(ElfError::NotElf)
        );
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut g = f.clone();
            // flip bytes of the headers and tables
            for _ in 0..(1 + round % 8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % g.len();
                g[i] = (seed >> 32) as u8;
            }
            let _ = find_functions(g.as_slice(), &WANTED);
        }
        let mut big = f.clone();
        big[60..62].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            find_functions(big.as_slice(), &WANTED),
            Err(ElfError::TooLarge("the header table"))
        );
    }

    /// A real linker's output: the fuzz seed, four functions in a static
    /// non-PIE executable (`cc -nostdlib -static`; text at 0x401000 from
    /// file offset 0x1000).
    #[test]
    fn a_linked_executable_gives_the_file_offsets() {
        let f = include_bytes!("../../../fuzz/seeds/elf_symbols/four_functions");
        assert_eq!(
            find_functions(&f[..], &WANTED),
            Ok(Lookup::All(vec![0x1000, 0x1006, 0x100c, 0x1012]))
        );
        let cut = include_bytes!("../../../fuzz/seeds/elf_symbols/truncated");
        assert!(find_functions(&cut[..], &WANTED).is_err());
    }

    /// Reads this machine's own binaries when present: a shared-libssl
    /// client (curl) has no defined SSL_write; libssl.so.3 has all four.
    #[test]
    fn real_files_read_as_expected() {
        let curl = std::path::Path::new("/usr/bin/curl");
        if curl.exists() {
            let s = FileSource::open(curl).unwrap();
            assert_eq!(find_functions(&s, &WANTED), Ok(Lookup::None));
        }
        let lib = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if lib.exists() {
            let s = FileSource::open(lib).unwrap();
            assert!(matches!(find_functions(&s, &WANTED), Ok(Lookup::All(v)) if v.len() == 4));
        }
        // NodeSource's node (~100 MB) exports its OpenSSL in .dynsym.
        let node = std::path::Path::new("/usr/bin/node");
        if node.exists() && std::fs::metadata(node).unwrap().len() > 50 << 20 {
            let s = FileSource::open(node).unwrap();
            let t = std::time::Instant::now();
            let r = find_functions(&s, &WANTED);
            eprintln!("node: {r:?} in {:?}", t.elapsed());
            assert!(matches!(r, Ok(Lookup::All(v)) if v.len() == 4));
        }
        // wget needs GnuTLS, curl does not.
        let gnutls = ["libgnutls.so.30", "gnutls_record_send"];
        for (file, needs) in [("/usr/bin/wget", true), ("/usr/bin/curl", false)] {
            let path = std::path::Path::new(file);
            if path.exists() {
                let s = FileSource::open(path).unwrap();
                assert_eq!(
                    dynamic_strings_hold(&s, &gnutls),
                    Ok(vec![needs; 2]),
                    "{file}"
                );
            }
        }
    }

    #[test]
    fn dynamic_strings_count_whole_strings_of_the_dynamic_table_only() {
        let mut f = elf(&[("gnutls_record_send", STT_FUNC, 0, 0)]);
        let names = ["gnutls_record_send", "SSL_write", "libgnutls.so.30"];
        // In .symtab: not a dynamic string.
        assert_eq!(dynamic_strings_hold(&f[..], &names), Ok(vec![false; 3]));
        // The same table as .dynsym: the import is named; `SSL_write` only
        // as the tail of `XSSL_write`, not a whole string.
        let shoff = u64_at(&f, 40) as usize;
        f[shoff + 64 + 4..shoff + 64 + 8].copy_from_slice(&SHT_DYNSYM.to_le_bytes());
        assert_eq!(
            dynamic_strings_hold(&f[..], &names),
            Ok(vec![true, false, false])
        );
        assert_eq!(
            dynamic_strings_hold(&b"garbage"[..], &names),
            Err(ElfError::NotElf)
        );
    }
}
