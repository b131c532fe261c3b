//! Booting one kernel in QEMU: the command line (KVM when /dev/kvm opens,
//! else TCG; no disk, no network device, serial console on stdio), and the
//! run itself under a deadline, with the console streamed to the terminal
//! and a log file and kept for parsing.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::results::MARKER;
use crate::cmd::{self, say, secs};

pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when /dev/kvm opens read-write, else TCG.
    pub fn detect() -> (Accel, String) {
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => (Accel::Kvm, "/dev/kvm opens".into()),
            Err(e) => (Accel::Tcg, format!("/dev/kvm does not open: {e}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

/// The kernel command line: serial console, reboot (= QEMU exits, with
/// -no-reboot) on panic, few kernel messages, and the guest's step bound.
pub fn kernel_cmdline(step: Duration) -> String {
    format!(
        "console=ttyS0 panic=-1 quiet loglevel=3 llme.step={}",
        step.as_secs().max(1)
    )
}

/// The QEMU command for one boot.
pub fn command(vmlinuz: &Path, initrd: &Path, accel: Accel, step: Duration) -> Command {
    let mut c = Command::new(QEMU);
    match accel {
        Accel::Kvm => c.args(["-enable-kvm", "-cpu", "host"]),
        Accel::Tcg => c.args(["-accel", "tcg", "-cpu", "max"]),
    };
    c.args([
        "-m",
        "1G",
        "-smp",
        "2",
        // No default devices (no NIC, no VGA, no disk), then only what we
        // need: the serial console on stdio.
        "-nodefaults",
        "-nic",
        "none",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(kernel_cmdline(step));
    c
}

/// What one boot gave.
pub struct Boot {
    pub console: String,
    /// From starting QEMU to the guest's `@@LLME begin`.
    pub to_init: Option<Duration>,
    pub total: Duration,
    pub timed_out: bool,
    /// QEMU's exit status, or why there is none; and its stderr.
    pub exit: String,
    pub stderr: String,
}

/// Runs `cmd` until QEMU exits or `timeout` passes (then kills it); with
/// `init_deadline`, also kills it when the guest's /init has not reported
/// by then (a KVM that cannot run the guest hangs or stops it early).
/// Console lines are echoed as `[label] line` and written to `log`.
pub fn boot(
    mut cmd: Command,
    timeout: Duration,
    init_deadline: Option<Duration>,
    log: &Path,
    label: &str,
) -> Result<Boot> {
    let shown = cmd::show(&cmd);
    say(format_args!("running {shown}"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe: QEMU goes when xtask dies.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{shown}` (Debian package qemu-system-x86)"))?;
    let stdout = child.stdout.take().context("QEMU stdout")?;
    let mut stderr = child.stderr.take().context("QEMU stderr")?;
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let deadline = start + timeout;
    let mut console = String::new();
    let mut to_init = None;
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        let mut until = deadline;
        if let Some(d) = init_deadline.filter(|_| to_init.is_none()) {
            until = until.min(start + d);
        }
        let left = until.saturating_duration_since(now);
        match rx.recv_timeout(left) {
            Ok(line) => {
                if to_init.is_none() && line.contains(&format!("{MARKER}begin")) {
                    to_init = Some(start.elapsed());
                }
                eprintln!("[{label}] {line}");
                let _ = writeln!(file, "{line}");
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout)
                if to_init.is_none() && Instant::now() < deadline =>
            {
                say(format_args!(
                    "kernels: {label}: the guest's /init did not report within {}; killing QEMU",
                    secs(init_deadline.unwrap_or_default())
                ));
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                say(format_args!(
                    "kernels: {label}: no poweroff within {}; killing QEMU",
                    secs(timeout)
                ));
                let _ = child.kill();
                break;
            }
        }
    }
    let exit = match child.wait() {
        Ok(status) => status.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    let total = start.elapsed();
    let stderr = err_reader.join().unwrap_or_default();
    let _ = file.write_all(stderr.as_bytes());
    Ok(Boot {
        console,
        to_init,
        total,
        timed_out,
        exit,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_has_no_network_and_no_disk() {
        let c = command(
            Path::new("/k/vmlinuz"),
            Path::new("/k/initrd.gz"),
            Accel::Tcg,
            Duration::from_secs(90),
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("-nodefaults -nic none"), "{line}");
        assert!(line.contains("-accel tcg -cpu max"), "{line}");
        assert!(!line.contains("-enable-kvm"));
        assert!(!line.contains("-drive") && !line.contains("-netdev"));
        assert!(line.ends_with("console=ttyS0 panic=-1 quiet loglevel=3 llme.step=90"));
        let kvm = command(
            Path::new("/k"),
            Path::new("/i"),
            Accel::Kvm,
            Duration::from_secs(1),
        );
        assert_eq!(
            kvm.get_args().take(3).collect::<Vec<_>>(),
            ["-enable-kvm", "-cpu", "host"]
        );
    }
}
