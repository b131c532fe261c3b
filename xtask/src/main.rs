//! `cargo xtask`: build, run, test and bench tasks for llm-egress.
//!
//! The kernel crate needs a different toolchain from the rest of the
//! workspace (docs/build.md), so plain `cargo build` cannot build the whole
//! project; these tasks do, and print every command they run on a line
//! starting with `xtask:`.

mod agent;
mod cmd;
mod demo;
mod ebpf;
mod kernels;
mod setup;
mod testing;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::agent::Profile;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test and bench llm-egress (see docs/build.md)"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (Debian packages, bpf-linker); fast when all is present.
    Setup,
    /// Build the eBPF programs (target/bpfel-unknown-none/release/llm-egress-ebpf).
    BuildEbpf,
    /// setup, build-ebpf, then the agent and the test binaries with the eBPF object embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build in release and run the agent (as root): `cargo xtask run -- --config policy.toml`.
    Run {
        /// Arguments for `llm-egress run`; without --config the agent uses its built-in default policy.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "AGENT ARGS"
        )]
        args: Vec<String>,
    },
    /// Build, then run the unit tests and (as root) the integration tests and the kernel matrix.
    Test {
        /// Only the unprivileged unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Run only the integration tests whose name contains NAME.
        #[arg(long, value_name = "NAME")]
        filter: Option<String>,
    },
    /// Run the connect benchmark (tests' bench-connect) against the release agent.
    Bench {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "BENCH ARGS"
        )]
        args: Vec<String>,
    },
    /// Build, then show the agent allowing and blocking sample connections in a throw-away cgroup and network namespace (as root; removes everything it made).
    Demo,
    /// Boot Debian's 6.1 and 6.12 kernels (and the host's, if /boot has it) in QEMU and run the verifier table and the agent's connect checks in each (docs/kernels.md).
    Kernels {
        /// Only this kernel of the table (6.1, 6.12, host); repeatable. Default: all.
        #[arg(long = "kernel", value_name = "NAME")]
        kernels: Vec<String>,
        /// Use TCG (software emulation) even when /dev/kvm opens.
        #[arg(long)]
        tcg: bool,
        /// Deadline per kernel, in seconds (default 300 with KVM, 1200 with TCG).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Put the release build of the agent in the guests (default: debug).
        #[arg(long)]
        release: bool,
    },
    /// Remove what setup installed for the build (toolchain packages, bpf-linker), to prove the fresh-machine path.
    CleanSetup {
        /// Really remove them (without it, only says what would go).
        #[arg(long)]
        yes: bool,
    },
}

/// Where things are: the workspace root and the userspace target dir.
pub struct Workspace {
    pub root: PathBuf,
    /// CARGO_TARGET_DIR if set (made absolute), else `<root>/target`.
    pub target_dir: PathBuf,
}

impl Workspace {
    fn locate() -> Self {
        // This crate lives in <root>/xtask.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask has a parent directory")
            .to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => {
                std::path::absolute(PathBuf::from(dir)).unwrap_or_else(|_| root.join("target"))
            }
            None => root.join("target"),
        };
        Workspace { root, target_dir }
    }

    /// A userspace binary of the given profile.
    pub fn bin(&self, profile: Profile, name: &str) -> PathBuf {
        self.target_dir.join(profile.dir()).join(name)
    }
}

/// The cargo that runs this xtask (`cargo xtask` sets CARGO), for the
/// userspace builds: rustup's stable toolchain.
pub fn outer_cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cmd::say(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let ws = Workspace::locate();
    match task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => ebpf::build_ebpf(&ws.root).map(drop),
        Task::Build { release } => {
            let profile = if release {
                Profile::Release
            } else {
                Profile::Debug
            };
            agent::build(&ws, profile).map(drop)
        }
        Task::Run { args } => agent::run(&ws, &args),
        Task::Test { unit_only, filter } => {
            testing::test(&ws, &testing::Options { unit_only, filter })
        }
        Task::Bench { args } => agent::bench(&ws, &args),
        Task::Demo => demo::demo(&ws),
        Task::Kernels {
            kernels,
            tcg,
            timeout,
            release,
        } => kernels::kernels(
            &ws,
            &kernels::Options {
                kernels,
                tcg,
                timeout,
                release,
            },
        ),
        Task::CleanSetup { yes } => setup::clean_setup(yes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_everything_after_the_separator_to_the_agent() {
        let cli = Cli::try_parse_from(["xtask", "run", "--", "--config", "policy.toml"]).unwrap();
        match cli.task {
            Task::Run { args } => assert_eq!(args, ["--config", "policy.toml"]),
            _ => panic!("expected run"),
        }
    }

    #[test]
    fn test_takes_a_filter_and_unit_only() {
        let cli = Cli::try_parse_from(["xtask", "test", "--unit-only", "--filter", "dns"]).unwrap();
        match cli.task {
            Task::Test { unit_only, filter } => {
                assert!(unit_only);
                assert_eq!(filter.as_deref(), Some("dns"));
            }
            _ => panic!("expected test"),
        }
    }

    #[test]
    fn kernels_takes_repeated_kernel_names() {
        let cli = Cli::try_parse_from([
            "xtask", "kernels", "--kernel", "6.1", "--kernel", "host", "--tcg",
        ])
        .unwrap();
        match cli.task {
            Task::Kernels {
                kernels,
                tcg,
                timeout,
                release,
            } => {
                assert_eq!(kernels, ["6.1", "host"]);
                assert!(tcg && !release);
                assert_eq!(timeout, None);
            }
            _ => panic!("expected kernels"),
        }
    }

    #[test]
    fn the_workspace_root_holds_the_workspace_manifest() {
        let ws = Workspace::locate();
        assert!(ws.root.join("Cargo.toml").is_file());
        assert!(ws.root.join("xtask").is_dir());
    }
}
