//! `cargo xtask kernels`: the agent on other kernels, each booted in QEMU.
//!
//! Owns the kernel table and the run: install QEMU and busybox-static when
//! missing, build the agent and egress-probe, get each kernel image
//! ([`fetch`]), pack one initramfs ([`initramfs`]) whose /init
//! (xtask/guest/init.sh) runs `llm-egress verify --json` and the agent
//! with `programs = "all"` and `"connect"` against a test cgroup, boot each
//! kernel under a deadline ([`qemu`]), and report what the guest printed
//! ([`results`]). Fails when any check fails on any kernel. docs/kernels.md
//! says what is checked and how long it takes.

mod fetch;
mod initramfs;
mod qemu;
mod results;

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    Workspace,
    agent::{self, Profile},
    cmd::{say, secs},
    setup::{self, Package},
};
use qemu::Accel;
use results::{GuestReport, Status, VerifyTable};

/// Where a kernel image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package (usually a meta package that depends on the image
    /// package, resolved with apt-cache at run time).
    Debian(&'static str),
    /// The running kernel's /boot/vmlinuz-$(uname -r).
    Host,
}

#[derive(Debug)]
pub struct Kernel {
    /// What `--kernel` selects.
    pub name: &'static str,
    pub source: Source,
    pub what: &'static str,
}

/// The kernel matrix.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        source: Source::Debian("linux-image-amd64"),
        what: "Debian 12's own kernel (bookworm / bookworm-security)",
    },
    Kernel {
        name: "6.12",
        source: Source::Debian("linux-image-6.12-amd64"),
        what: "Debian 12's 6.12 (bookworm-security / backports)",
    },
    Kernel {
        name: "host",
        source: Source::Host,
        what: "the running kernel, if /boot has its image",
    },
];

/// The release a machine's backports QEMU pieces come from, and its source.
const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_SOURCE: &str = "deb http://deb.debian.org/debian bookworm-backports main\n";

/// Installs [`PACKAGES`] when missing. `--no-remove` always: on a machine
/// with a newer QEMU piece (the project's machines come with a backports
/// `qemu-utils` 10.x, which Breaks Debian 12's `qemu-system-common` 7.2)
/// apt would otherwise remove it to install `qemu-system-x86`. When apt
/// refuses for that reason, the same QEMU is installed from
/// bookworm-backports, through a source list and package lists of the
/// task's own under `apt_dir` (the host's apt configuration is not changed).
fn install_packages(apt_dir: &Path) -> Result<()> {
    let Err(e) = setup::install_missing("kernels", PACKAGES, true) else {
        return Ok(());
    };
    if !format!("{e:#}").contains("remove is disabled") {
        return Err(e);
    }
    say(format_args!(
        "kernels: Debian 12's qemu-system-x86 would remove installed packages (a newer QEMU piece from {BACKPORTS}); installing it from {BACKPORTS}"
    ));
    let lists = apt_dir.join("lists");
    fs::create_dir_all(lists.join("partial"))
        .with_context(|| format!("creating {}", lists.display()))?;
    let source = apt_dir.join("backports.list");
    fs::write(&source, BACKPORTS_SOURCE)
        .with_context(|| format!("writing {}", source.display()))?;
    let opts = [
        "-o".to_owned(),
        format!("Dir::Etc::SourceList={}", source.display()),
        "-o".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
        "-t".to_owned(),
        BACKPORTS.to_owned(),
    ];
    setup::install_missing_with("kernels", PACKAGES, true, &opts).map_err(|e| {
        e.context(format!(
            "kernels: installing qemu-system-x86 from {BACKPORTS} failed too; install a qemu-system-x86 that fits the installed QEMU packages yourself (docs/kernels.md)"
        ))
    })
}

/// Debian packages the task needs on the host.
const PACKAGES: &[Package] = &[
    Package {
        name: "qemu-system-x86",
        why: "qemu-system-x86_64, which boots each kernel",
        build_only: false,
    },
    Package {
        name: "busybox-static",
        why: "the guest's shell and tools (/bin/busybox, statically linked)",
        build_only: false,
    },
    Package {
        name: "openssl",
        why: "the guest's TLS client and server (`openssl s_client`/`s_server` over the shared libssl): the uprobe check",
        build_only: false,
    },
    Package {
        name: "gcc",
        why: "builds the guest's memory-BIO client (xtask/guest/membio.c): the plaintext-join check",
        build_only: false,
    },
    Package {
        name: "libssl-dev",
        why: "OpenSSL's headers for the guest's memory-BIO client",
        build_only: false,
    },
    Package {
        name: "golang-go",
        why: "builds the guest's Go TLS client (xtask/guest/goclient.go): the plaintext-go check",
        build_only: false,
    },
];

pub struct Options {
    /// `--kernel NAME`, repeatable; empty: all.
    pub kernels: Vec<String>,
    /// Use TCG even when KVM is there.
    pub tcg: bool,
    /// Per-kernel deadline, seconds; default by accelerator.
    pub timeout: Option<u64>,
    pub release: bool,
}

/// Default per-kernel deadlines: a boot with both program sets takes well
/// under a minute with KVM; TCG is many times slower, and the verifier's
/// work on the DNS program most of all.
const TIMEOUT_KVM: Duration = Duration::from_secs(300);
const TIMEOUT_TCG: Duration = Duration::from_secs(1200);
/// A KVM guest reaches /init in a few seconds; one that has not after this
/// is not going to (nested KVM that cannot emulate an instruction pauses
/// the guest): the kernel is booted again with TCG.
const KVM_INIT_DEADLINE: Duration = Duration::from_secs(30);

/// Why a KVM boot did not reach /init, in one line: QEMU's own complaint
/// (`KVM internal error`, a failed MSR write) or the last console line.
fn kvm_failure(boot: &qemu::Boot) -> String {
    let text = format!("{}\n{}", boot.stderr, boot.console);
    text.lines()
        .find(|l| l.contains("KVM internal error") || l.contains("error:"))
        .or_else(|| boot.console.lines().rev().find(|l| !l.trim().is_empty()))
        .map_or_else(|| "no console output".to_owned(), |l| l.trim().to_owned())
}

/// The kernels `names` select, in table order; all when `names` is empty.
pub fn select(names: &[String]) -> Result<Vec<&'static Kernel>> {
    for n in names {
        if !KERNELS.iter().any(|k| k.name == n) {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            bail!(
                "kernels: no kernel {n:?} in the table; known: {}",
                known.join(", ")
            );
        }
    }
    Ok(KERNELS
        .iter()
        .filter(|k| names.is_empty() || names.iter().any(|n| n == k.name))
        .collect())
}

/// How long the guest waits at most for each step (verify, an agent's
/// start, its stop): a quarter of the deadline, so that all of them fit.
pub fn step_for(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_secs(20))
}

/// One kernel's outcome, for the summary.
struct Outcome {
    name: &'static str,
    line: String,
    failed: bool,
}

pub fn kernels(ws: &Workspace, opts: &Options) -> Result<()> {
    let chosen = select(&opts.kernels)?;
    let start = Instant::now();
    if setup::installed_packages(&["busybox"])?.contains_key("busybox")
        && !setup::installed_packages(&["busybox-static"])?.contains_key("busybox-static")
    {
        bail!(
            "kernels: the dynamic `busybox` package is installed, and installing busybox-static would remove it; \
             replace it yourself (`apt-get install busybox-static`) if nothing needs it"
        );
    }
    install_packages(&ws.target_dir.join("kernels").join("apt"))?;
    let profile = if opts.release {
        Profile::Release
    } else {
        Profile::Debug
    };
    let (_, bin) = agent::build(ws, profile)?;
    let probe = ws.bin(profile, "egress-probe");
    let dir = ws.target_dir.join("kernels");
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let mut images = Vec::new();
    let mut updated = false;
    let mut skipped = Vec::new();
    for k in &chosen {
        match k.source {
            Source::Debian(meta) => {
                let image = fetch::debian(&dir, meta, &mut updated)
                    .with_context(|| format!("kernels: kernel {}", k.name))?;
                images.push((*k, image));
            }
            Source::Host => match fetch::host()? {
                Ok(image) => images.push((*k, image)),
                Err(why) => {
                    say(format_args!("kernels: skipping host: {why}"));
                    skipped.push(format!("host: skipped, {why}"));
                }
            },
        }
    }
    let initrd = initramfs::build(&dir, &bin, &probe)?;

    let (mut accel, why) = if opts.tcg {
        (Accel::Tcg, "--tcg".to_owned())
    } else {
        Accel::detect()
    };
    let deadline = |accel| {
        opts.timeout.map_or(
            match accel {
                Accel::Kvm => TIMEOUT_KVM,
                Accel::Tcg => TIMEOUT_TCG,
            },
            Duration::from_secs,
        )
    };
    say(format_args!(
        "kernels: {} ({why}); deadline {} per kernel, {} per guest step",
        accel.name(),
        secs(deadline(accel)),
        secs(step_for(deadline(accel)))
    ));

    let mut kvm_fallback = None;
    let mut outcomes = Vec::new();
    for (k, image) in &images {
        say(format_args!(
            "kernels: booting {} ({}): {}",
            k.name, k.what, image.origin
        ));
        let log = logs.join(format!("{}.log", k.name));
        let run = |accel| {
            let timeout = deadline(accel);
            qemu::boot(
                qemu::command(&image.vmlinuz, &initrd, accel, step_for(timeout)),
                timeout,
                (accel == Accel::Kvm).then_some(KVM_INIT_DEADLINE),
                &log,
                k.name,
            )
        };
        let mut boot = run(accel)?;
        if accel == Accel::Kvm && boot.to_init.is_none() {
            let why = kvm_failure(&boot);
            say(format_args!(
                "kernels: KVM could not run {}: {why}; falling back to TCG for it and the kernels after it",
                k.name
            ));
            accel = Accel::Tcg;
            kvm_fallback = Some(why);
            say(format_args!(
                "kernels: TCG: deadline {} per kernel, {} per guest step",
                secs(deadline(accel)),
                secs(step_for(deadline(accel)))
            ));
            boot = run(accel)?;
        }
        outcomes.push(report(k, image, accel, &boot, &log));
    }

    println!("\n=== kernel matrix ({}) ===", accel.name());
    if let Some(why) = &kvm_fallback {
        println!("(KVM was tried first and could not run the guests: {why})");
    }
    for o in &outcomes {
        println!("{:<6} {}", o.name, o.line);
    }
    for s in &skipped {
        println!("{s}");
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failed)
        .map(|o| o.name)
        .collect();
    say(format_args!("kernels: done in {}", secs(start.elapsed())));
    if !failed.is_empty() {
        bail!(
            "kernels: checks failed on {} (logs in {})",
            failed.join(", "),
            logs.display()
        );
    }
    if outcomes.is_empty() {
        bail!("kernels: no kernel was booted");
    }
    Ok(())
}

/// Prints one kernel's report; returns its summary line.
fn report(
    k: &Kernel,
    image: &fetch::Image,
    accel: Accel,
    boot: &qemu::Boot,
    log: &Path,
) -> Outcome {
    let r = GuestReport::parse(&boot.console);
    let checks = r.checks(accel == Accel::Tcg);
    println!("\n=== kernel {} ({}) ===", k.name, image.origin);
    println!(
        "guest kernel {}, {}; /init after {} (host clock; guest uptime {}), whole run {}{}",
        r.kernel.as_deref().unwrap_or("?"),
        accel.name(),
        boot.to_init.map_or_else(|| "-".into(), secs),
        r.init_uptime
            .map_or_else(|| "-".into(), |u| format!("{u:.1} s")),
        secs(boot.total),
        if boot.timed_out {
            " (deadline reached, QEMU killed)".to_owned()
        } else {
            format!("; QEMU {}", boot.exit)
        }
    );
    if let (Some(v), Some(rc)) = (r.verify_secs, r.verify_rc()) {
        println!("llm-egress verify --json: exit status {rc} after {v:.1} s");
    }
    for (set, s) in &r.start_secs {
        println!("programs = {set:?}: {s:.1} s from `llm-egress run` to ready (or giving up)");
    }
    for c in &checks {
        println!(
            "  {:<8} {:<16} {:<7} {}",
            c.set,
            c.name,
            c.status.word(),
            c.detail
        );
        if c.name == "start" && c.status == Status::Fail {
            let log = r.log_of(&c.set);
            let progs = results::failed_programs(&log);
            if !progs.is_empty() {
                println!(
                    "           program(s) that did not load: {}",
                    progs.join(", ")
                );
            }
            if !log.is_empty() {
                println!("           what the agent's log says:");
                for l in &log {
                    println!("             {l}");
                }
            }
        }
    }
    for set in results::SETS {
        if checks
            .iter()
            .any(|c| c.set == *set && c.name == "stop" && c.status == Status::Fail)
        {
            for l in r.log_of(set) {
                println!("             {l}");
            }
        }
    }
    match r.verify_table() {
        VerifyTable::Rows(rows) => {
            println!("verifier table (llm-egress verify --json):");
            for line in results::render_verify(&rows).lines() {
                println!("  {line}");
            }
        }
        VerifyTable::Missing(why) => println!("verifier table: missing: {why}"),
        VerifyTable::Broken(why) => println!("verifier table: none: {why}"),
    }
    if boot.timed_out || !r.ended {
        let tail: Vec<&str> = boot.console.lines().rev().take(15).collect();
        println!("last console lines:");
        for l in tail.into_iter().rev() {
            println!("  {l}");
        }
        if !boot.stderr.trim().is_empty() {
            println!("QEMU stderr: {}", boot.stderr.trim());
        }
    }
    println!("console log: {}", log.display());

    let failed = checks.iter().any(|c| c.status == Status::Fail);
    let of = |set: &str| -> String {
        let in_set: Vec<_> = checks.iter().filter(|c| c.set == set).collect();
        if in_set.is_empty() {
            return format!("{set}: -");
        }
        let bad: Vec<&str> = in_set
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.name.as_str())
            .collect();
        if bad.is_empty() {
            format!("{set}: pass")
        } else {
            format!("{set}: FAIL ({})", bad.join(", "))
        }
    };
    let verify = checks
        .iter()
        .find(|c| c.set == "verify")
        .map_or("?", |c| c.status.word());
    let line = format!(
        "{:<24} init {:>7}  total {:>7}  verify: {verify}  {}  {}  {}",
        r.kernel.as_deref().unwrap_or("?"),
        boot.to_init.map_or_else(|| "-".into(), secs),
        secs(boot.total),
        of("none").replace("none", "baseline"),
        of("all"),
        of("connect")
    );
    Outcome {
        name: k.name,
        line,
        failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_unique_names_and_the_required_kernels() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(
            KERNELS
                .iter()
                .any(|k| k.source == Source::Debian("linux-image-amd64"))
        );
        assert!(
            KERNELS
                .iter()
                .any(|k| k.source == Source::Debian("linux-image-6.12-amd64"))
        );
        assert!(KERNELS.iter().any(|k| k.source == Source::Host));
    }

    #[test]
    fn kernels_are_selected_by_name_in_table_order() {
        let all = select(&[]).unwrap();
        assert_eq!(all.len(), KERNELS.len());
        let some = select(&["host".into(), "6.1".into()]).unwrap();
        let names: Vec<&str> = some.iter().map(|k| k.name).collect();
        assert_eq!(names, ["6.1", "host"]);
        let err = select(&["5.10".into()]).unwrap_err().to_string();
        assert!(err.contains("5.10") && err.contains("6.12"), "{err}");
    }

    #[test]
    fn each_guest_step_gets_a_quarter_of_the_deadline() {
        assert_eq!(step_for(TIMEOUT_KVM), Duration::from_secs(75));
        assert_eq!(step_for(Duration::from_secs(10)), Duration::from_secs(20));
    }
}
