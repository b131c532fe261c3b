//! `cargo xtask build-ebpf`: builds the kernel crate with Debian's toolchain.
//!
//! The kernel crate is built by /usr/bin/cargo and /usr/bin/rustc (Debian's
//! rustc-web 1.96, which ships a prebuilt `core` for bpfel-unknown-none),
//! not by the rustup toolchain that runs this xtask: rustup's stable has no
//! BPF `core` and rust-src cannot be downloaded here (docs/build.md). One
//! release build serves every agent profile.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{
    cmd::{self, say, secs},
    setup,
};

pub const EBPF_PACKAGE: &str = "llm-egress-ebpf";
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// The flags aya-build would pass: the architecture the programs read
/// registers for, and BTF (aya-log needs it).
pub const EBPF_RUSTFLAGS: &[&str] = &[
    "--cfg=bpf_target_arch=\"x86_64\"",
    "-Cdebuginfo=2",
    "-Clink-arg=--btf",
];

/// Lets only aya-ebpf (`#![feature(asm_experimental_arch)]`) and our kernel
/// programs (`#![feature(core_intrinsics)]`, for an atomic add) use unstable
/// features on the stable Debian rustc. Not `1`: aya-build would then force
/// `-Z build-std`.
const RUSTC_BOOTSTRAP: &str = "aya_ebpf,llm_egress_ebpf";

/// `CARGO_ENCODED_RUSTFLAGS`: flags separated by 0x1f, so that a flag may
/// hold spaces or quotes.
pub fn encode_rustflags(flags: &[&str]) -> String {
    flags.join("\x1f")
}

/// Whether an inherited variable would steer the inner (Debian) cargo wrong:
/// everything the outer `cargo run` and rustup set for this xtask (CARGO,
/// CARGO_PKG_*, CARGO_MANIFEST_*, RUSTUP_TOOLCHAIN, ...) and any flags,
/// wrappers or target dir meant for the host build. Kept: where cargo keeps
/// its registry and how it reaches it (CARGO_HOME, CARGO_NET_*, CARGO_HTTP_*,
/// CARGO_REGISTRIES_*, CARGO_REGISTRY_*) and terminal settings.
pub fn confuses_inner_cargo(name: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_BOOTSTRAP",
    ];
    if name.starts_with("CARGO") {
        return !KEEP
            .iter()
            .any(|k| name == *k || (k.ends_with('_') && name.starts_with(k)));
    }
    DROP.contains(&name)
}

/// The inner build command, environment included.
pub fn command(root: &Path) -> Command {
    let mut c = Command::new(setup::DEBIAN_CARGO);
    c.current_dir(root);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(confuses_inner_cargo) {
            c.env_remove(&name);
        }
    }
    c.args([
        "build",
        "-p",
        EBPF_PACKAGE,
        "--bins",
        "--release",
        "--target",
        EBPF_TARGET,
    ])
    .env("RUSTC", setup::DEBIAN_RUSTC)
    .env("RUSTC_BOOTSTRAP", RUSTC_BOOTSTRAP)
    .env("CARGO_ENCODED_RUSTFLAGS", encode_rustflags(EBPF_RUSTFLAGS))
    .env("PATH", setup::ebpf_path());
    c
}

/// Where the inner build leaves the object (the default target dir: the
/// agent's build.rs looks there too when LLM_EGRESS_EBPF_OBJ is unset).
pub fn object_path(root: &Path) -> PathBuf {
    root.join("target")
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE)
}

pub fn build_ebpf(root: &Path) -> Result<PathBuf> {
    if !Path::new(setup::DEBIAN_CARGO).is_file() || !Path::new(setup::DEBIAN_RUSTC).is_file() {
        bail!(
            "build-ebpf: {} / {} missing (Debian's rustc-web, cargo-web): run `cargo xtask setup` as root",
            setup::DEBIAN_CARGO,
            setup::DEBIAN_RUSTC
        );
    }
    if setup::find_bpf_linker().is_none() {
        bail!("build-ebpf: bpf-linker not found in ~/.cargo/bin or PATH: run `cargo xtask setup`");
    }
    say(
        "build-ebpf: building the kernel programs with Debian's rustc and bpf-linker from ~/.cargo/bin or PATH",
    );
    let took = cmd::run(&mut command(root))?;
    let obj = object_path(root);
    let size = match std::fs::metadata(&obj) {
        Ok(m) if m.len() > 0 => m.len(),
        _ => bail!(
            "build-ebpf: the build succeeded but left no object at {}",
            obj.display()
        ),
    };
    say(format_args!(
        "build-ebpf: eBPF object {} ({} KiB, {})",
        obj.display(),
        size.div_ceil(1024),
        secs(took)
    ));
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn rustflags_are_joined_with_the_unit_separator() {
        assert_eq!(
            encode_rustflags(EBPF_RUSTFLAGS),
            "--cfg=bpf_target_arch=\"x86_64\"\u{1f}-Cdebuginfo=2\u{1f}-Clink-arg=--btf"
        );
        assert_eq!(encode_rustflags(&[]), "");
        assert_eq!(encode_rustflags(&["a b"]), "a b");
    }

    #[test]
    fn the_outer_cargos_variables_are_dropped() {
        for name in [
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER",
            "CARGO_MAKEFLAGS",
            "RUSTUP_TOOLCHAIN",
            "RUSTC_WRAPPER",
            "RUSTFLAGS",
            "RUSTC",
        ] {
            assert!(confuses_inner_cargo(name), "{name} should be dropped");
        }
    }

    #[test]
    fn registry_access_and_unrelated_variables_are_kept() {
        for name in [
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_PROXY",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "CARGO_TERM_COLOR",
            "RUSTUP_HOME",
            "HOME",
            "PATH",
            "RUST_BACKTRACE",
        ] {
            assert!(!confuses_inner_cargo(name), "{name} should be kept");
        }
    }

    #[test]
    fn the_inner_build_uses_debians_toolchain_and_the_bpf_target() {
        let c = command(Path::new("/ws"));
        assert_eq!(c.get_program(), OsStr::new(setup::DEBIAN_CARGO));
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "build",
                "-p",
                EBPF_PACKAGE,
                "--bins",
                "--release",
                "--target",
                EBPF_TARGET
            ]
        );
        let env = |k: &str| {
            c.get_envs()
                .find(|(n, _)| *n == OsStr::new(k))
                .and_then(|(_, v)| v)
                .map(|v| v.to_string_lossy().into_owned())
        };
        assert_eq!(env("RUSTC").as_deref(), Some("/usr/bin/rustc"));
        assert_eq!(
            env("RUSTC_BOOTSTRAP").as_deref(),
            Some("aya_ebpf,llm_egress_ebpf")
        );
        assert_eq!(
            object_path(Path::new("/ws")),
            Path::new("/ws/target/bpfel-unknown-none/release/llm-egress-ebpf")
        );
    }
}
