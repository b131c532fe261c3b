//! `cargo xtask setup` and `cargo xtask clean-setup`: the machine-level
//! things the build and the tests need, installed idempotently.
//!
//! Two toolchains build this project (docs/build.md): rustup's stable for
//! userspace, and Debian's rustc-web with its prebuilt BPF `core` for the
//! kernel crate, linked by bpf-linker built against Debian's LLVM 22. Setup
//! checks with dpkg-query and `--version` first, so that it takes well under
//! a second when everything is present, and installs only what is missing.

use std::{
    collections::BTreeMap,
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, say, secs};

/// A Debian package setup installs, and why.
pub struct Package {
    pub name: &'static str,
    pub why: &'static str,
    /// Removed again by `clean-setup` (nothing else on the machine needs it).
    pub build_only: bool,
}

pub const PACKAGES: &[Package] = &[
    Package {
        name: "rustc-web",
        why: "rustc 1.96 that builds the eBPF crate (/usr/bin/rustc)",
        build_only: true,
    },
    Package {
        name: "cargo-web",
        why: "cargo that drives the eBPF build (/usr/bin/cargo)",
        build_only: true,
    },
    Package {
        name: "libstd-rust-web-dev-bpf",
        why: "prebuilt `core` for bpfel-unknown-none (no nightly, no build-std)",
        build_only: true,
    },
    Package {
        name: "llvm-22-dev",
        why: "LLVM 22 that bpf-linker is built against",
        build_only: true,
    },
    Package {
        name: "bpftool",
        why: "inspect loaded programs and maps, probe kernel features",
        build_only: false,
    },
    Package {
        name: "iproute2",
        why: "`ip netns` for the integration tests' network namespaces",
        build_only: false,
    },
    Package {
        name: "dnsmasq",
        why: "a real DNS server for the DNS tests",
        build_only: false,
    },
    Package {
        name: "prometheus",
        why: "prometheus server and promtool, for the metrics tests",
        build_only: false,
    },
    Package {
        name: "curl",
        why: "HTTP client for the integration tests",
        build_only: false,
    },
    Package {
        name: "golang-go",
        why: "Debian's Go (1.19), which builds the tests' Go HTTPS client (tests/src/go_client.rs): Go's crypto/tls probed by symbol",
        build_only: false,
    },
    Package {
        name: "wget",
        why: "a client over GnuTLS (libgnutls.so.30) for the exact-token tests (tests/tests/exact_tokens.rs)",
        build_only: false,
    },
    Package {
        name: "redis-server",
        why: "the fleet ledger of the fleet-budget and fleet-rate tests (tests/tests/fleet.rs, fleet_rate.rs, and the fleet dollar budgets of tests/tests/exact_budgets.rs), run on free loopback ports by the tests themselves (redis-cli comes with it); where systemd is PID 1 Debian's package also starts its own redis on 127.0.0.1:6379, which the tests never use and setup leaves alone (tests/tests/redis_systemd.rs, docs/fleet.md)",
        build_only: false,
    },
    Package {
        name: "procps",
        why: "ps/pgrep/sysctl for the integration tests",
        build_only: false,
    },
    Package {
        name: "systemd",
        why: "systemd-analyze, which verifies deploy/systemd/llm-egress.service; installing it starts nothing and does not change PID 1 (its postinst only calls systemctl when systemd already runs; /sbin/init comes from systemd-sysv, not installed)",
        build_only: false,
    },
    Package {
        name: "mmdebstrap",
        why: "builds the minimal Debian 12 root file system (from Debian's archive, cached under the target dir) that the real-systemd deploy test boots",
        build_only: false,
    },
    Package {
        name: "systemd-container",
        why: "systemd-nspawn, which boots that root file system with systemd 252 as PID 1 for the deploy test (tests/tests/deploy_systemd.rs); installing it starts nothing",
        build_only: false,
    },
    Package {
        name: "podman",
        why: "runs the container image with the DaemonSet's security context in the deploy test (tests/tests/deploy_container.rs), always with --network=none and a private store; it pulls iptables in as a dependency, which the tests never use",
        build_only: false,
    },
    Package {
        name: "runc",
        why: "the OCI runtime podman uses in the deploy test (crun refuses the hybrid cgroup layout)",
        build_only: false,
    },
    Package {
        name: "libssl-dev",
        why: "libssl.a and libcrypto.a: the tests build a C client with OpenSSL linked in (tests/src/openssl_static.rs, tests/tests/linked_openssl.rs)",
        build_only: false,
    },
    Package {
        name: "gcc",
        why: "cc, which builds that client (and links the Rust binaries)",
        build_only: false,
    },
    Package {
        name: "binutils",
        why: "readelf and strip for that client (its stripped copy must stay invisible)",
        build_only: false,
    },
    Package {
        name: "python3-venv",
        why: "a Python venv under the target dir for kubernetes-validate (the Kubernetes manifest tests) and the official OpenAI and Anthropic SDKs (the token calibration's sdk/ run); nothing goes into the system Python",
        build_only: false,
    },
];

/// Python packages the tests run, pinned with all their dependencies, in a
/// venv at `<target dir>/pyenv` (made with Debian's /usr/bin/python3): the
/// tools and their reasons, then everything (tools first) with what they
/// pull in. Setup installs only when a pin's `dist-info` is missing.
pub const PYTHON_TOOLS: &[(&str, &str)] = &[
    (
        "kubernetes-validate==1.37.0",
        "validates deploy/kubernetes/*.yaml against the Kubernetes API schemas",
    ),
    (
        "openai==3.57.0",
        "the official OpenAI SDK: the sdk/ token calibration run (tests/tests/tokens.rs)",
    ),
    (
        "anthropic==2.14.0",
        "the official Anthropic SDK: the sdk/ token calibration run (tests/tests/tokens.rs)",
    ),
];
pub const PYTHON_PINS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "openai==3.57.0",
    "anthropic==2.14.0",
    // kubernetes-validate's
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
    // the SDKs' (`pip freeze` of a venv with only openai and anthropic)
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "docstring_parser==0.18.0",
    "h11==0.16.0",
    "httpcore2==2.16.2",
    "httpx2==2.16.2",
    "idna==3.20",
    "jiter==0.19.0",
    "opentelemetry-api==1.45.2",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "sniffio==1.3.1",
    "truststore==0.10.5",
    "typing-inspection==0.4.5",
];

/// The package whose prebuilt `core` must come from the same rustc release
/// as /usr/bin/rustc.
const BPF_CORE_PACKAGE: &str = "libstd-rust-web-dev-bpf";
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> Result<()> {
    let start = Instant::now();
    install_packages()?;
    check_rustc_matches_bpf_core()?;
    install_bpf_linker()?;
    install_python_tools()?;
    say(format_args!("setup: done ({})", secs(start.elapsed())));
    Ok(())
}

fn install_packages() -> Result<()> {
    install_missing("setup", PACKAGES, false)
}

/// Installs those of `packages` that dpkg does not list as installed
/// (`apt-get update` once, then one `apt-get install`); `task` names the
/// caller in messages (`setup`, `kernels`). With `no_remove`, apt refuses
/// (`--no-remove`) rather than remove an installed package to make room.
pub fn install_missing(task: &str, packages: &[Package], no_remove: bool) -> Result<()> {
    install_missing_with(task, packages, no_remove, &[])
}

/// [`install_missing`] with options for every apt-get call (`-o KEY=VALUE`,
/// `-t RELEASE`), e.g. a private source list.
pub fn install_missing_with(
    task: &str,
    packages: &[Package],
    no_remove: bool,
    apt_opts: &[String],
) -> Result<()> {
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    let installed = installed_packages(&names)?;
    let missing: Vec<&Package> = packages
        .iter()
        .filter(|p| !installed.contains_key(p.name))
        .collect();
    if missing.is_empty() {
        say(format_args!(
            "{task}: all {} Debian packages present ({})",
            packages.len(),
            names.join(" ")
        ));
        return Ok(());
    }
    let missing_names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let install_line = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        missing_names.join(" ")
    );
    if !cmd::is_root() {
        bail!(
            "{task}: missing Debian packages: {}; installing them needs root: run `sudo cargo xtask {task}`, or as root: {install_line}",
            missing_names.join(" ")
        );
    }
    for p in &missing {
        say(format_args!("{task}: will install {}: {}", p.name, p.why));
    }
    if missing.iter().any(|p| p.build_only) {
        say(format_args!(
            "{task}: the eBPF toolchain packages take ~25 s and +1.1 GB"
        ));
    }
    cmd::run_keep_stderr(
        apt().args(apt_opts).arg("update"),
        &format!("{task}: `apt-get update` (needed to install the missing packages) failed"),
    )?;
    let mut install = apt();
    install
        .args(apt_opts)
        .args(["install", "-y", "--no-install-recommends"]);
    if no_remove {
        install.arg("--no-remove");
    }
    let installed = cmd::run_keep_stderr(
        install.args(&missing_names),
        &format!("{task}: installing Debian packages failed"),
    )
    .map_err(|e| {
        let blamed = blame_packages(&format!("{e:#}"), &missing_names);
        if blamed.is_empty() {
            e
        } else {
            e.context(format!(
                "{task}: apt-get could not install {}",
                blamed.join(", ")
            ))
        }
    })?;
    say(format_args!(
        "{task}: installed {} ({})",
        missing_names.join(" "),
        secs(installed)
    ));
    Ok(())
}

fn apt() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Installed packages among `names`, with their versions.
pub fn installed_packages(names: &[&str]) -> Result<BTreeMap<String, String>> {
    let (_, out) = cmd::query(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package}\t${Status}\t${Version}\n"])
            .args(names),
    )
    .context("setup: dpkg-query is needed (setup supports Debian and its derivatives only)")?;
    Ok(parse_dpkg_query(&out))
}

/// Parses `dpkg-query -W -f='${Package}\t${Status}\t${Version}\n'` output
/// into the packages that are really installed ("install ok installed"; a
/// removed package whose configuration remains is listed too, but is not
/// installed).
pub fn parse_dpkg_query(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?.trim();
            let status = fields.next()?;
            let version = fields.next()?.trim();
            let name = name.split(':').next()?; // drop a `:arch` qualifier
            (status.split_whitespace().last() == Some("installed") && !name.is_empty())
                .then(|| (name.to_owned(), version.to_owned()))
        })
        .collect()
}

/// Which of `packages` apt's error lines name (`E: Unable to locate package
/// X`, `E: Package 'X' has no installation candidate`, ...).
pub fn blame_packages<'a>(stderr: &str, packages: &[&'a str]) -> Vec<&'a str> {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("E:"))
        .collect();
    packages
        .iter()
        .copied()
        .filter(|p| {
            errors.iter().any(|l| {
                l.split(|c: char| c.is_whitespace() || "'\",:".contains(c))
                    .any(|w| w == *p)
            })
        })
        .collect()
}

/// The upstream part of a Debian version: no epoch, no Debian revision.
/// `1:22.1.8-1~deb12u1` → `22.1.8`, `1.96.0+dfsg1-1~deb12u2` → `1.96.0+dfsg1`.
pub fn deb_upstream(version: &str) -> &str {
    let v = version.split_once(':').map_or(version, |(_, v)| v);
    v.rsplit_once('-').map_or(v, |(v, _)| v)
}

/// The release an upstream version names, without repack suffixes:
/// `1.96.0+dfsg1` → `1.96.0`.
pub fn release(upstream: &str) -> &str {
    upstream.split(['+', '~']).next().unwrap_or(upstream)
}

/// `rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)` → `1.96.0`
pub fn parse_rustc_version(out: &str) -> Option<&str> {
    let mut words = out.split_whitespace();
    (words.next()? == "rustc").then_some(())?;
    words.next()
}

/// `bpf-linker 0.13.0` → `0.13.0`
pub fn parse_bpf_linker_version(out: &str) -> Option<&str> {
    let mut words = out.split_whitespace();
    (words.next()? == "bpf-linker").then_some(())?;
    words.next()
}

/// The prebuilt BPF `core` only loads in the rustc that built it, and apt
/// does not tie rustc-web and libstd-rust-web-dev-bpf together.
fn check_rustc_matches_bpf_core() -> Result<()> {
    let pkgs = installed_packages(&["rustc-web", BPF_CORE_PACKAGE])?;
    let core_version = pkgs
        .get(BPF_CORE_PACKAGE)
        .with_context(|| format!("setup: {BPF_CORE_PACKAGE} is not installed"))?;
    let (ok, out) = cmd::query(Command::new(DEBIAN_RUSTC).arg("-V"))
        .with_context(|| format!("setup: {DEBIAN_RUSTC} (package rustc-web) does not run"))?;
    let rustc = parse_rustc_version(&out)
        .filter(|_| ok)
        .with_context(|| format!("setup: cannot read the version of {DEBIAN_RUSTC}: {out:?}"))?;
    let core = release(deb_upstream(core_version));
    if rustc != core {
        bail!(
            "setup: {DEBIAN_RUSTC} is {rustc} but {BPF_CORE_PACKAGE} ({core_version}) holds a BPF `core` built by rustc {core}; \
             they only work together at the same version. Bring them together as root with \
             `apt-get update && apt-get install -y --no-install-recommends rustc-web cargo-web {BPF_CORE_PACKAGE}`"
        );
    }
    match pkgs.get("rustc-web") {
        Some(rustc_pkg) if rustc_pkg != core_version => say(format_args!(
            "setup: warning: rustc-web {rustc_pkg} and {BPF_CORE_PACKAGE} {core_version} are different Debian revisions of rustc {rustc}"
        )),
        _ => {}
    }
    say(format_args!(
        "setup: {DEBIAN_RUSTC} {rustc} matches the BPF core of {BPF_CORE_PACKAGE} {core_version}"
    ));
    Ok(())
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`: where `cargo install` puts
/// bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// PATH with the cargo bin directory first: the search path the eBPF build
/// uses to find bpf-linker.
pub fn ebpf_path() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = cargo_bin_dir().into_iter().collect();
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

/// The bpf-linker the eBPF build would run, if any.
pub fn find_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&ebpf_path())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn bpf_linker_version(path: &Path) -> Option<String> {
    let (ok, out) = cmd::query(Command::new(path).arg("--version")).ok()?;
    ok.then_some(())?;
    parse_bpf_linker_version(&out).map(str::to_owned)
}

fn install_bpf_linker() -> Result<()> {
    let found = find_bpf_linker();
    let version = found.as_deref().and_then(bpf_linker_version);
    if let (Some(path), Some(v)) = (&found, &version)
        && v == BPF_LINKER_VERSION
    {
        say(format_args!(
            "setup: bpf-linker {v} present ({})",
            path.display()
        ));
        return Ok(());
    }
    let reason = match (&found, &version) {
        (None, _) => "not found in ~/.cargo/bin or PATH".to_owned(),
        (Some(p), None) => format!("{} does not report a version", p.display()),
        (Some(p), Some(v)) => format!("{} is {v}", p.display()),
    };
    say(format_args!(
        "setup: will install bpf-linker {BPF_LINKER_VERSION} against LLVM 22 ({reason}); it links the eBPF crate; ~80 s"
    ));
    // --force: replace a bpf-linker of another version, or one cargo still
    // records as installed although its file is gone.
    let took = cmd::run_keep_stderr(
        Command::new(crate::outer_cargo())
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
        "setup: building bpf-linker failed (it needs llvm-22-dev and crates.io)",
    )?;
    let now = find_bpf_linker().as_deref().and_then(bpf_linker_version);
    if now.as_deref() != Some(BPF_LINKER_VERSION) {
        bail!(
            "setup: installed bpf-linker {BPF_LINKER_VERSION}, but the first bpf-linker on PATH reports {now:?}; remove the other one"
        );
    }
    say(format_args!(
        "setup: installed bpf-linker {BPF_LINKER_VERSION} ({})",
        secs(took)
    ));
    Ok(())
}

/// The tests' Python venv: `<target dir>/pyenv`.
pub fn pyenv_dir() -> PathBuf {
    crate::Workspace::locate().target_dir.join("pyenv")
}

/// The venv's interpreter, which has the SDKs (`LLM_EGRESS_TOKENS_PYTHON`
/// of the token calibration's `sdk/` run).
pub fn pyenv_python() -> PathBuf {
    pyenv_dir().join("bin/python")
}

/// Whether `pin` (`name==version`) is installed in the venv: its
/// `name-version.dist-info` directory exists (compared the way pip
/// normalises names), which costs no Python start.
fn pin_installed(site_packages: &[PathBuf], pin: &str) -> bool {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '.'], "_");
    let Some((name, version)) = pin.split_once("==") else {
        return false;
    };
    let want = format!("{}-{version}.dist-info", norm(name));
    site_packages.iter().any(|dir| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_ascii_lowercase();
                n.strip_suffix(".dist-info").is_some_and(|stem| {
                    let (n, v) = stem.rsplit_once('-').unwrap_or((stem, ""));
                    format!("{}-{v}.dist-info", norm(n)) == want
                })
            })
    })
}

fn install_python_tools() -> Result<()> {
    let venv = pyenv_dir();
    let site_packages: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .collect();
    let missing: Vec<&str> = PYTHON_PINS
        .iter()
        .copied()
        .filter(|p| !pin_installed(&site_packages, p))
        .collect();
    let tools: Vec<&str> = PYTHON_TOOLS.iter().map(|(pin, _)| *pin).collect();
    if missing.is_empty() {
        say(format_args!(
            "setup: {} present ({})",
            tools.join(" "),
            venv.display()
        ));
        return Ok(());
    }
    for (pin, why) in PYTHON_TOOLS {
        say(format_args!("setup: {pin}: {why}"));
    }
    say(format_args!(
        "setup: will install {} into {}; missing: {}",
        tools.join(" "),
        venv.display(),
        missing.join(" ")
    ));
    if !venv.join("bin/pip").is_file() {
        cmd::run_keep_stderr(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "setup: creating the Python venv failed (Debian package python3-venv)",
        )?;
    }
    let took = cmd::run_keep_stderr(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_PINS),
        "setup: installing the tests' Python packages from PyPI failed",
    )?;
    say(format_args!(
        "setup: installed {} ({})",
        tools.join(" "),
        secs(took)
    ));
    Ok(())
}

/// Undoes what setup installed for the build, to prove the fresh-machine
/// path. Test tools (bpftool, dnsmasq, ...) stay: other things may use them.
pub fn clean_setup(yes: bool) -> Result<()> {
    let build_only: Vec<&str> = PACKAGES
        .iter()
        .filter(|p| p.build_only)
        .map(|p| p.name)
        .collect();
    let installed = installed_packages(&build_only)?;
    let remove: Vec<&str> = build_only
        .iter()
        .copied()
        .filter(|p| installed.contains_key(*p))
        .collect();
    let linker = cargo_bin_dir()
        .map(|d| d.join("bpf-linker"))
        .filter(|p| p.is_file());
    if remove.is_empty() && linker.is_none() {
        say("clean-setup: nothing to remove");
        return Ok(());
    }
    if !remove.is_empty() {
        say(format_args!(
            "clean-setup: would remove Debian packages {}",
            remove.join(" ")
        ));
    }
    if let Some(l) = &linker {
        say(format_args!("clean-setup: would remove {}", l.display()));
    }
    if !yes {
        bail!("clean-setup: nothing removed; pass --yes to remove the above");
    }
    if !remove.is_empty() {
        if !cmd::is_root() {
            bail!(
                "clean-setup: removing Debian packages needs root: run `sudo cargo xtask clean-setup --yes`"
            );
        }
        cmd::run_keep_stderr(
            apt().args(["remove", "-y"]).args(&remove),
            "clean-setup: removing Debian packages failed",
        )?;
    }
    if linker.is_some() {
        // `cargo uninstall` also forgets the install record; a plain `rm`
        // is the fallback for a bpf-linker cargo does not know about.
        let uninstalled =
            cmd::run(Command::new(crate::outer_cargo()).args(["uninstall", "bpf-linker"]));
        if let (Err(e), Some(l)) = (uninstalled, &linker)
            && l.exists()
        {
            say(format_args!(
                "clean-setup: {e:#}; removing {} instead",
                l.display()
            ));
            std::fs::remove_file(l).with_context(|| format!("removing {}", l.display()))?;
        }
    }
    say("clean-setup: done; `cargo xtask setup` installs it all again");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_output_lists_only_installed_packages() {
        let out = "rustc-web\tinstall ok installed\t1.96.0+dfsg1-1~deb12u2\n\
                   llvm-22-dev\tinstall ok installed\t1:22.1.8-1~deb12u1\n\
                   dnsmasq\tdeinstall ok config-files\t2.90-4~deb12u2\n\
                   libfoo:amd64\tinstall ok installed\t1.0-1\n\
                   curl\tinstall ok half-configured\t7.88.1-10\n";
        let got = parse_dpkg_query(out);
        assert_eq!(
            got.get("rustc-web").map(String::as_str),
            Some("1.96.0+dfsg1-1~deb12u2")
        );
        assert_eq!(
            got.get("llvm-22-dev").map(String::as_str),
            Some("1:22.1.8-1~deb12u1")
        );
        assert_eq!(got.get("libfoo").map(String::as_str), Some("1.0-1"));
        assert!(
            !got.contains_key("dnsmasq"),
            "config-files only is not installed"
        );
        assert!(
            !got.contains_key("curl"),
            "half-configured is not installed"
        );
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn empty_dpkg_query_output_means_nothing_installed() {
        assert!(parse_dpkg_query("").is_empty());
    }

    #[test]
    fn debian_versions_reduce_to_the_upstream_release() {
        assert_eq!(deb_upstream("1.96.0+dfsg1-1~deb12u2"), "1.96.0+dfsg1");
        assert_eq!(deb_upstream("1:22.1.8-1~deb12u1"), "22.1.8");
        assert_eq!(deb_upstream("2:4.0.2-3"), "4.0.2");
        assert_eq!(deb_upstream("1.2.3"), "1.2.3");
        assert_eq!(deb_upstream("1.0-beta-2"), "1.0-beta");
        assert_eq!(release("1.96.0+dfsg1"), "1.96.0");
        assert_eq!(release("1.96.0~beta.1"), "1.96.0");
        assert_eq!(release(deb_upstream("1.96.0+dfsg1-1~deb12u2")), "1.96.0");
    }

    #[test]
    fn rustc_version_lines_parse() {
        assert_eq!(
            parse_rustc_version(
                "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)\n"
            ),
            Some("1.96.0")
        );
        assert_eq!(
            parse_rustc_version("rustc 1.95.0 (59807616e 2026-03-26)"),
            Some("1.95.0")
        );
        assert_eq!(parse_rustc_version("cargo 1.96.0"), None);
        assert_eq!(parse_rustc_version(""), None);
    }

    #[test]
    fn bpf_linker_version_lines_parse() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.13.0\n"),
            Some("0.13.0")
        );
        assert_eq!(parse_bpf_linker_version("bpf-linker"), None);
        assert_eq!(parse_bpf_linker_version("something 0.13.0"), None);
    }

    #[test]
    fn apt_errors_blame_the_packages_they_name() {
        let stderr = "W: some warning about curl\n\
                      E: Unable to locate package llvm-22-dev\n\
                      E: Package 'rustc-web' has no installation candidate\n";
        let pkgs = ["rustc-web", "cargo-web", "llvm-22-dev", "curl"];
        assert_eq!(
            blame_packages(stderr, &pkgs),
            vec!["rustc-web", "llvm-22-dev"]
        );
        assert!(blame_packages("E: dpkg was interrupted", &pkgs).is_empty());
    }

    #[test]
    fn a_package_name_is_not_blamed_for_a_longer_name() {
        let stderr = "E: Unable to locate package rustc-web-extra";
        assert!(blame_packages(stderr, &["rustc-web"]).is_empty());
    }

    #[test]
    fn python_pins_are_found_by_their_dist_info_directory() {
        let dir = std::env::temp_dir().join(format!("xtask-pins-{}", std::process::id()));
        for d in [
            "kubernetes_validate-1.37.0.dist-info",
            "PyYAML-6.0.4.dist-info",
            "rpds_py-2026.9.1.dist-info",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let sp = [dir.clone()];
        assert!(pin_installed(&sp, "kubernetes-validate==1.37.0"));
        assert!(pin_installed(&sp, "PyYAML==6.0.4"));
        assert!(pin_installed(&sp, "rpds-py==2026.9.1"));
        assert!(!pin_installed(&sp, "kubernetes-validate==1.36.0"));
        assert!(!pin_installed(&sp, "jsonschema==4.26.0"));
        std::fs::remove_dir_all(&dir).unwrap();
        for (i, (tool, _)) in PYTHON_TOOLS.iter().enumerate() {
            assert_eq!(PYTHON_PINS[i], *tool, "tools come first, in order");
        }
        assert!(PYTHON_PINS.iter().all(|p| p.contains("==")));
        let mut names: Vec<String> = PYTHON_PINS
            .iter()
            .map(|p| {
                p.split("==")
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase()
                    .replace('_', "-")
            })
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PYTHON_PINS.len(), "a package pinned twice");
    }

    #[test]
    fn clean_setup_removes_exactly_the_toolchain_packages() {
        let names: Vec<&str> = PACKAGES
            .iter()
            .filter(|p| p.build_only)
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "rustc-web",
                "cargo-web",
                "libstd-rust-web-dev-bpf",
                "llvm-22-dev"
            ]
        );
    }
}
