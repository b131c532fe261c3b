//! `cargo xtask build`, `run` and `bench`: the userspace side, built by the
//! rustup toolchain that runs this xtask, with the eBPF object from
//! `build-ebpf` embedded through LLM_EGRESS_EBPF_OBJ.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    Workspace,
    cmd::{self, say, secs},
    ebpf, setup,
};

pub const AGENT_PACKAGE: &str = "llm-egress";
pub const AGENT_BIN: &str = "llm-egress";
pub const TESTS_PACKAGE: &str = "llm-egress-tests";
const BENCH_BIN: &str = "bench-connect";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// A cargo command for the userspace crates, run from the workspace root,
/// with the eBPF object to embed.
pub fn cargo(ws: &Workspace, obj: &Path) -> Command {
    let mut c = Command::new(crate::outer_cargo());
    c.current_dir(&ws.root).env("LLM_EGRESS_EBPF_OBJ", obj);
    if std::env::var_os("CARGO_TARGET_DIR").is_some() {
        // Made absolute: the children run from the root, maybe not our cwd.
        c.env("CARGO_TARGET_DIR", &ws.target_dir);
    }
    c
}

/// Builds the agent and the test binaries (the eBPF object first). Returns
/// the eBPF object and the agent binary.
pub fn build(ws: &Workspace, profile: Profile) -> Result<(PathBuf, PathBuf)> {
    setup::setup()?;
    let obj = ebpf::build_ebpf(&ws.root)?;
    let bin = build_agent(ws, &obj, profile, true)?;
    Ok((obj, bin))
}

/// `cargo build -p llm-egress [-p llm-egress-tests] --bins [--release]`.
pub fn build_agent(
    ws: &Workspace,
    obj: &Path,
    profile: Profile,
    with_tests: bool,
) -> Result<PathBuf> {
    let mut c = cargo(ws, obj);
    c.args(["build", "-p", AGENT_PACKAGE]);
    if with_tests {
        c.args(["-p", TESTS_PACKAGE]);
    }
    c.arg("--bins");
    if profile == Profile::Release {
        c.arg("--release");
    }
    say(format_args!(
        "build: building the agent{} ({}) with the eBPF object embedded",
        if with_tests {
            " and the test binaries"
        } else {
            ""
        },
        profile.dir()
    ));
    let took = cmd::run(&mut c).context("build: the userspace build failed")?;
    let bin = ws.bin(profile, AGENT_BIN);
    say(format_args!(
        "build: agent {} ({})",
        bin.display(),
        secs(took)
    ));
    Ok(bin)
}

/// Builds in release and replaces this process with the agent, so that
/// signals (Ctrl-C) reach it directly.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "run: the agent loads BPF programs and attaches them to cgroups, which needs root: run `sudo cargo xtask run -- ...` (or as root)"
        );
    }
    let (_, bin) = build(ws, Profile::Release)?;
    let mut c = Command::new(&bin);
    c.arg("run").args(args);
    say(format_args!("run: exec {}", cmd::show(&c)));
    let err = c.exec();
    Err(err).with_context(|| format!("run: could not exec {}", bin.display()))
}

/// Runs the tests package's `bench-connect` against the release agent (docs/benchmarks.md).
pub fn bench(ws: &Workspace, args: &[String]) -> Result<()> {
    if !has_bin(ws, TESTS_PACKAGE, BENCH_BIN)? {
        bail!(
            "bench: the {TESTS_PACKAGE} package has no `{BENCH_BIN}` binary yet (tests/src/bin/{BENCH_BIN}.rs); nothing to run"
        );
    }
    let (obj, bin) = build(ws, Profile::Release)?;
    let mut c = cargo(ws, &obj);
    c.args(["run", "--release", "-p", TESTS_PACKAGE, "--bin", BENCH_BIN])
        .env("LLM_EGRESS_BIN", &bin);
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    let took = cmd::run(&mut c).context("bench: bench-connect failed")?;
    say(format_args!("bench: done ({})", secs(took)));
    Ok(())
}

fn has_bin(ws: &Workspace, package: &str, bin: &str) -> Result<bool> {
    let (ok, out) = cmd::query(
        Command::new(crate::outer_cargo())
            .current_dir(&ws.root)
            .args(["metadata", "--no-deps", "--format-version", "1"]),
    )?;
    if !ok {
        bail!("`cargo metadata` failed; is the workspace's Cargo.toml valid?");
    }
    metadata_has_bin(&out, package, bin)
}

/// Whether `cargo metadata` output lists a `bin` target `bin` in `package`.
pub fn metadata_has_bin(metadata: &str, package: &str, bin: &str) -> Result<bool> {
    let meta: serde_json::Value =
        serde_json::from_str(metadata).context("parsing `cargo metadata` output")?;
    let packages = meta["packages"]
        .as_array()
        .context("`cargo metadata`: no packages")?;
    Ok(packages
        .iter()
        .filter(|p| p["name"] == package)
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .any(|t| {
            t["name"] == bin
                && t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"{"packages":[
        {"name":"llm-egress-tests","targets":[
            {"name":"llm-egress-tests","kind":["lib"]},
            {"name":"egress-probe","kind":["bin"]}]},
        {"name":"other","targets":[{"name":"bench-connect","kind":["bin"]}]}
    ]}"#;

    #[test]
    fn bins_are_found_in_their_own_package_only() {
        assert!(metadata_has_bin(META, "llm-egress-tests", "egress-probe").unwrap());
        assert!(!metadata_has_bin(META, "llm-egress-tests", "bench-connect").unwrap());
        assert!(!metadata_has_bin(META, "llm-egress-tests", "llm-egress-tests").unwrap());
        assert!(metadata_has_bin(META, "other", "bench-connect").unwrap());
    }

    #[test]
    fn bad_metadata_is_an_error() {
        assert!(metadata_has_bin("not json", "a", "b").is_err());
        assert!(metadata_has_bin("{}", "a", "b").is_err());
    }
}
