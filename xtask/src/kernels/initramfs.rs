//! The guest's initramfs: which files go in (busybox-static, the agent,
//! egress-probe, their shared libraries from `ldd`, the guest init script),
//! and writing them as a gzip-compressed cpio archive in the `newc` format
//! the kernel unpacks.
//!
//! The cpio writer is a few lines of our own (the format is fixed and
//! simple), so nothing beyond Debian's `gzip` and `strip` is needed; the
//! Debian kernels need no modules for what the guest does (cgroup2, bpf,
//! bpffs, tracefs, loopback and the 8250 serial console are built in).

use std::{
    collections::BTreeSet,
    fs,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, say};

/// The guest's /init.
pub const INIT_SCRIPT: &str = include_str!("../../guest/init.sh");
/// The openssl command (Debian package openssl).
const OPENSSL: &str = "/usr/bin/openssl";
/// The memory-BIO client's source, built here with `cc` against the shared
/// libssl (Debian packages gcc, libssl-dev).
const MEMBIO_C: &str = include_str!("../../guest/membio.c");
/// The Go client's source, built here with Debian's Go (static, with its
/// symbols).
const GOCLIENT_GO: &str = include_str!("../../guest/goclient.go");

/// Where busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// What one archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Dir,
    /// A regular file with the contents of a host file.
    Host(PathBuf),
    /// A regular file with these bytes.
    Bytes(Vec<u8>),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits (the type bits come from `content`).
    pub perm: u32,
    pub content: Content,
}

/// The libraries an `ldd` output names, as absolute paths (the dynamic
/// loader included, the vDSO left out). Errors when ldd could not find one.
pub fn parse_ldd(out: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.is_empty()
            || line.contains("statically linked")
            || line.contains("not a dynamic executable")
        {
            continue;
        }
        if line.contains("=> not found") {
            bail!("ldd: a library is not found: {line}");
        }
        // `name => /path (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
        // `linux-vdso.so.1 (0x...)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_owned());
        }
    }
    Ok(libs)
}

/// The whole file list: the fixed skeleton, `/init`, and `binaries`
/// (guest path, host file) with their `libs` (absolute paths, put at the
/// same path in the guest). Parent directories are added for every file.
pub fn file_list(binaries: &[(&str, PathBuf)], libs: &[String]) -> Vec<Entry> {
    let mut files = vec![
        Entry {
            path: "/init".into(),
            perm: 0o755,
            content: Content::Bytes(INIT_SCRIPT.as_bytes().to_vec()),
        },
        Entry {
            path: "/dev/console".into(),
            perm: 0o600,
            content: Content::CharDev(5, 1),
        },
    ];
    for (guest, host) in binaries {
        files.push(Entry {
            path: (*guest).to_owned(),
            perm: 0o755,
            content: Content::Host(host.clone()),
        });
    }
    let mut seen = BTreeSet::new();
    for lib in libs {
        if seen.insert(lib.clone()) {
            files.push(Entry {
                path: lib.clone(),
                perm: 0o755,
                content: Content::Host(PathBuf::from(lib)),
            });
        }
    }
    let mut dirs: BTreeSet<String> = [
        "/bin", "/dev", "/etc", "/proc", "/root", "/run", "/sys", "/tmp", "/var",
    ]
    .iter()
    .map(|d| d.to_string())
    .collect();
    for f in &files {
        let mut p = Path::new(&f.path).parent();
        while let Some(dir) = p.filter(|d| *d != Path::new("/")) {
            dirs.insert(dir.display().to_string());
            p = dir.parent();
        }
    }
    // BTreeSet order puts every parent before its children.
    let mut entries: Vec<Entry> = dirs
        .into_iter()
        .map(|path| Entry {
            perm: if path == "/tmp" { 0o1777 } else { 0o755 },
            path,
            content: Content::Dir,
        })
        .collect();
    entries.extend(files);
    entries
}

/// Writes `entries` as a `newc` cpio archive (with its trailer).
pub fn write_cpio(out: &mut impl Write, entries: &[Entry]) -> Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let name = e.path.trim_start_matches('/');
        match &e.content {
            Content::Dir => header(out, ino, 0o040000 | e.perm, 2, 0, (0, 0), name, &[])?,
            Content::Bytes(b) => header(out, ino, 0o100000 | e.perm, 1, 0, (0, 0), name, b)?,
            Content::CharDev(major, minor) => header(
                out,
                ino,
                0o020000 | e.perm,
                1,
                0,
                (*major, *minor),
                name,
                &[],
            )?,
            Content::Host(p) => {
                let data = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                header(out, ino, 0o100000 | e.perm, 1, 0, (0, 0), name, &data)?
            }
        }
    }
    header(out, 0, 0, 1, 0, (0, 0), "TRAILER!!!", &[])?;
    Ok(())
}

fn pad4(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

/// One `newc` header, the name (NUL-terminated, padded to 4) and the data
/// (padded to 4). uid, gid and mtime are 0: the archive is reproducible.
#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> Result<()> {
    let size = u32::try_from(data.len()).context("a file of 4 GiB or more does not fit cpio")?;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        mtime,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    let mut h = String::from("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, h.len() + name.len() + 1)?;
    out.write_all(data)?;
    pad4(out, data.len())?;
    Ok(())
}

/// The shared libraries of a host binary, from `ldd`.
fn libs_of(binary: &Path) -> Result<Vec<String>> {
    let mut c = Command::new("ldd");
    c.arg(binary);
    say(format_args!("running {}", cmd::show(&c)));
    let output = c
        .output()
        .with_context(|| format!("could not run `{}`", cmd::show(&c)))?;
    // A static binary: ldd says so on stderr and exits 1.
    let out = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && !out.contains("not a dynamic executable") {
        bail!("`ldd {}` failed: {}", binary.display(), out.trim());
    }
    parse_ldd(&out).with_context(|| format!("libraries of {}", binary.display()))
}

/// A copy of `src` without debug info at `dst` (`strip --strip-debug`), so
/// the archive stays small; a plain copy if strip fails.
fn stripped(src: &Path, dst: &Path) -> Result<()> {
    let mut c = Command::new("strip");
    c.arg("--strip-debug").arg("-o").arg(dst).arg(src);
    if let Err(e) = cmd::run(&mut c) {
        say(format_args!(
            "kernels: {e:#}; putting {} in unstripped",
            src.display()
        ));
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

/// Builds `<dir>/initramfs.cpio.gz` with the agent and egress-probe;
/// returns its path.
pub fn build(dir: &Path, agent: &Path, probe: &Path) -> Result<PathBuf> {
    for (what, p) in [
        ("the agent", agent),
        ("egress-probe", probe),
        ("busybox-static", Path::new(BUSYBOX)),
        ("openssl", Path::new(OPENSSL)),
    ] {
        if !p.is_file() {
            bail!("kernels: {what} ({}) is missing", p.display());
        }
    }
    let stage = dir.join("stage");
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let agent_copy = stage.join("llm-egress");
    let probe_copy = stage.join("egress-probe");
    stripped(agent, &agent_copy)?;
    stripped(probe, &probe_copy)?;
    let mut libs = libs_of(agent)?;
    libs.extend(libs_of(probe)?);
    // The uprobe check's TLS client and server, over the shared libssl
    // (it comes with openssl's libraries), and a key and certificate for
    // the server made here (key generation under TCG is slow).
    libs.extend(libs_of(Path::new(OPENSSL))?);
    // The memory-BIO client, over the same libssl (its libraries are
    // openssl's).
    let membio = stage.join("membio-client");
    let membio_c = stage.join("membio.c");
    fs::write(&membio_c, MEMBIO_C).with_context(|| format!("writing {}", membio_c.display()))?;
    cmd::run(
        Command::new("cc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&membio)
            .arg(&membio_c)
            .args(["-lssl", "-lcrypto"]),
    )
    .context("kernels: building the memory-BIO client failed (Debian packages gcc, libssl-dev)")?;
    libs.extend(libs_of(&membio)?);
    // The Go client: static (no cgo), symbols kept.
    let goclient = stage.join("go-client");
    let goclient_go = stage.join("goclient.go");
    fs::write(&goclient_go, GOCLIENT_GO)
        .with_context(|| format!("writing {}", goclient_go.display()))?;
    cmd::run(
        Command::new("go")
            .args(["build", "-trimpath", "-o"])
            .arg(&goclient)
            .arg(&goclient_go)
            .env("GOCACHE", stage.join("go-cache"))
            .env("GOPATH", stage.join("go-path"))
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", "0"),
    )
    .context("kernels: building the Go client failed (Debian package golang-go)")?;
    let (key, cert) = (stage.join("matrix-key.pem"), stage.join("matrix-cert.pem"));
    cmd::run(
        Command::new(OPENSSL)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=matrix", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )
    .context("kernels: making the guest's TLS certificate failed (Debian package openssl)")?;
    let busybox_libs = libs_of(Path::new(BUSYBOX))?;
    if !busybox_libs.is_empty() {
        bail!(
            "kernels: {BUSYBOX} is not static (it needs {}); install busybox-static",
            busybox_libs.join(" ")
        );
    }
    let entries = file_list(
        &[
            ("/bin/busybox", PathBuf::from(BUSYBOX)),
            ("/bin/llm-egress", agent_copy),
            ("/bin/egress-probe", probe_copy),
            ("/bin/openssl", PathBuf::from(OPENSSL)),
            ("/bin/membio-client", membio),
            ("/bin/go-client", goclient),
            ("/etc/matrix-key.pem", key),
            ("/etc/matrix-cert.pem", cert),
        ],
        &libs,
    );
    let cpio = dir.join("initramfs.cpio");
    let file = fs::File::create(&cpio).with_context(|| format!("creating {}", cpio.display()))?;
    let mut w = BufWriter::new(file);
    write_cpio(&mut w, &entries).with_context(|| format!("writing {}", cpio.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", cpio.display()))?;
    drop(w);
    let files: Vec<&str> = entries
        .iter()
        .filter(|e| !matches!(e.content, Content::Dir))
        .map(|e| e.path.as_str())
        .collect();
    say(format_args!(
        "kernels: initramfs files: {}",
        files.join(" ")
    ));
    cmd::run(Command::new("gzip").args(["-f", "-n", "-1"]).arg(&cpio))
        .context("kernels: compressing the initramfs failed (Debian package gzip)")?;
    let gz = dir.join("initramfs.cpio.gz");
    let size = fs::metadata(&gz)
        .with_context(|| format!("{} was not written", gz.display()))?
        .len();
    say(format_args!(
        "kernels: {} ({:.1} MB)",
        gz.display(),
        size as f64 / 1e6
    ));
    Ok(gz)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd4b3f5000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c0a0000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f0c1bfc0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1bde0000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1d2f0000)
";

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        assert_eq!(
            parse_ldd(LDD).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_file_list_has_init_console_binaries_libraries_and_their_directories() {
        let libs = parse_ldd(LDD).unwrap();
        let mut twice = libs.clone();
        twice.extend(libs.clone());
        let entries = file_list(
            &[
                ("/bin/busybox", PathBuf::from("/bin/busybox")),
                ("/bin/llm-egress", PathBuf::from("/x/llm-egress")),
            ],
            &twice,
        );
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "/init",
            "/dev/console",
            "/bin/busybox",
            "/bin/llm-egress",
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ] {
            assert_eq!(paths.iter().filter(|x| **x == p).count(), 1, "{p}");
        }
        for dir in [
            "/lib",
            "/lib/x86_64-linux-gnu",
            "/lib64",
            "/proc",
            "/sys",
            "/tmp",
        ] {
            let e = entries.iter().find(|e| e.path == dir).expect(dir);
            assert_eq!(e.content, Content::Dir, "{dir}");
        }
        // Every parent comes before its children.
        for (i, e) in entries.iter().enumerate() {
            if let Some(parent) = Path::new(&e.path).parent().filter(|p| *p != Path::new("/")) {
                let at = paths
                    .iter()
                    .position(|p| Path::new(p) == parent)
                    .expect("parent listed");
                assert!(at < i, "{} before its parent", e.path);
            }
        }
        let init = entries.iter().find(|e| e.path == "/init").unwrap();
        assert_eq!(init.perm, 0o755);
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh"));
        assert!(INIT_SCRIPT.contains("poweroff -f"));
    }

    #[test]
    fn cpio_newc_records_are_aligned_and_end_with_the_trailer() {
        let entries = vec![
            Entry {
                path: "/bin".into(),
                perm: 0o755,
                content: Content::Dir,
            },
            Entry {
                path: "/bin/hello".into(),
                perm: 0o755,
                content: Content::Bytes(b"hi!\n\x01".to_vec()),
            },
            Entry {
                path: "/dev/console".into(),
                perm: 0o600,
                content: Content::CharDev(5, 1),
            },
        ];
        let mut out = Vec::new();
        write_cpio(&mut out, &entries).unwrap();
        assert_eq!(out.len() % 4, 0);
        // First record: a directory named "bin".
        assert!(out.starts_with(b"070701"));
        let field = |rec: &[u8], i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&rec[6 + 8 * i..14 + 8 * i]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(&out, 1), 0o040755);
        assert_eq!(field(&out, 11), 4, "namesize counts the NUL");
        assert_eq!(&out[110..114], b"bin\0");
        // Second record starts 4-aligned right after: header 110 + "bin\0".
        let second = &out[116..];
        assert!(second.starts_with(b"070701"));
        assert_eq!(field(second, 1), 0o100755);
        assert_eq!(field(second, 6), 5, "file size");
        assert_eq!(&second[110..120], b"bin/hello\0");
        // name ends at 120: padded to 120 (already aligned), then the data.
        assert_eq!(&second[120..125], b"hi!\n\x01");
        let third = &second[128..];
        assert_eq!(field(third, 1), 0o020600);
        assert_eq!((field(third, 9), field(third, 10)), (5, 1));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!\0"));
    }
}
