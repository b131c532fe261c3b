//! Getting a kernel image: resolving a Debian meta package
//! (`linux-image-amd64`) to the image package it depends on with
//! `apt-cache`, `apt-get download` of that package (nothing is installed on
//! the host) into `target/kernels/<package>_<version>/`, and `dpkg-deb -x`
//! of its vmlinuz and config. A directory that already has its vmlinuz is
//! reused. The host's own kernel comes from /boot when it is there.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, say};

/// A kernel image ready to boot.
#[derive(Clone, Debug)]
pub struct Image {
    pub vmlinuz: PathBuf,
    /// `linux-image-6.1.0-57-amd64 6.1.192-3`, or `host /boot/...`.
    pub origin: String,
}

/// The value of `field` in the first stanza of `apt-cache show` output.
pub fn stanza_field<'a>(show: &'a str, field: &str) -> Option<&'a str> {
    show.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The first package a `Depends:` value names: `linux-image-6.1.0-57-amd64
/// (= 6.1.192-3), foo` → `linux-image-6.1.0-57-amd64`.
pub fn first_dependency(depends: &str) -> Option<&str> {
    depends
        .split([',', '|'])
        .next()?
        .split_whitespace()
        .next()
        .filter(|n| !n.is_empty())
}

/// `apt-cache show --no-all-versions PKG` (the candidate's stanza).
fn apt_show(package: &str) -> Result<Option<String>> {
    let (ok, out) = cmd::query(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .arg(package),
    )
    .context("kernels: apt-cache is needed (Debian)")?;
    Ok((ok && !out.trim().is_empty()).then_some(out))
}

/// The image package behind `meta` and its candidate version; runs
/// `apt-get update` once (`updated`) when apt does not know the package.
fn resolve(meta: &str, updated: &mut bool) -> Result<(String, String)> {
    let mut show = apt_show(meta)?;
    if show.is_none() && !*updated {
        say(format_args!(
            "kernels: apt does not know {meta}; updating the package lists"
        ));
        cmd::run_keep_stderr(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "kernels: `apt-get update` failed",
        )?;
        *updated = true;
        show = apt_show(meta)?;
    }
    let show = show.with_context(|| {
        format!("kernels: apt knows no package {meta} (is bookworm-security in the sources?)")
    })?;
    // A meta package depends on the image; an image package has vmlinuz
    // itself (no `linux-image-` dependency).
    let package = match stanza_field(&show, "Depends").and_then(first_dependency) {
        Some(dep) if dep.starts_with("linux-image-") => dep.to_owned(),
        _ => meta.to_owned(),
    };
    let image = if package == meta {
        show
    } else {
        apt_show(&package)?
            .with_context(|| format!("kernels: {meta} depends on {package}, which apt lacks"))?
    };
    let version = stanza_field(&image, "Version")
        .with_context(|| format!("kernels: apt-cache shows no Version for {package}"))?
        .to_owned();
    Ok((package, version))
}

/// The vmlinuz in an extracted package's `boot/`.
fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// A directory name for a package version (`:` of an epoch would upset
/// some tools).
pub fn cache_dir_name(package: &str, version: &str) -> String {
    format!("{package}_{}", version.replace(':', "%3a"))
}

/// Downloads (or reuses) the image package behind `meta` under `cache`.
pub fn debian(cache: &Path, meta: &str, updated: &mut bool) -> Result<Image> {
    let (package, version) = resolve(meta, updated)?;
    let dir = cache.join(cache_dir_name(&package, &version));
    let origin = format!("{package} {version}");
    if let Some(vmlinuz) = find_vmlinuz(&dir) {
        say(format_args!(
            "kernels: {meta} → {origin}: cached ({})",
            vmlinuz.display()
        ));
        return Ok(Image { vmlinuz, origin });
    }
    say(format_args!("kernels: {meta} → {origin}: downloading"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // As root apt warns that its _apt user cannot write here; harmless.
    cmd::run_keep_stderr(
        Command::new("apt-get")
            .current_dir(&dir)
            .arg("download")
            .arg(format!("{package}={version}")),
        &format!("kernels: downloading {package} failed"),
    )?;
    let deb = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "kernels: apt-get download left no .deb in {}",
                dir.display()
            )
        })?;
    let tree = dir.join("tree");
    let _ = fs::remove_dir_all(&tree);
    cmd::run_keep_stderr(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        &format!("kernels: unpacking {} failed", deb.display()),
    )?;
    // Keep boot/ (vmlinuz, config, System.map); the modules (up to 400 MB)
    // are not needed: what the guest uses is built in.
    let boot = dir.join("boot");
    let _ = fs::remove_dir_all(&boot);
    fs::rename(tree.join("boot"), &boot)
        .with_context(|| format!("kernels: {} has no boot/ directory", deb.display()))?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    let vmlinuz = find_vmlinuz(&dir)
        .with_context(|| format!("kernels: {} holds no boot/vmlinuz-*", deb.display()))?;
    say(format_args!("kernels: {origin}: {}", vmlinuz.display()));
    Ok(Image { vmlinuz, origin })
}

/// The running kernel's image, /boot/vmlinuz-$(uname -r), if it is there.
pub fn host() -> Result<std::result::Result<Image, String>> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Ok(Err(format!(
            "{} is not there (the host kernel is covered by `cargo xtask test`)",
            vmlinuz.display()
        )));
    }
    if fs::File::open(&vmlinuz).is_err() {
        bail!("kernels: {} is not readable", vmlinuz.display());
    }
    Ok(Ok(Image {
        origin: format!("host {}", vmlinuz.display()),
        vmlinuz,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)
Description: Linux for 64-bit PCs (meta-package)

Package: linux-image-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)
";

    #[test]
    fn the_first_stanza_of_apt_cache_show_is_read() {
        assert_eq!(stanza_field(META, "Version"), Some("6.1.192-3"));
        assert_eq!(
            stanza_field(META, "Depends").and_then(first_dependency),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(stanza_field(META, "Pre-Depends"), None);
        assert_eq!(stanza_field("", "Version"), None);
    }

    #[test]
    fn the_first_dependency_is_the_name_before_any_version_or_alternative() {
        assert_eq!(
            first_dependency("linux-image-6.12.118+deb12-amd64 (= 6.12.118-1~deb12u1)"),
            Some("linux-image-6.12.118+deb12-amd64")
        );
        assert_eq!(first_dependency("a | b, c"), Some("a"));
        assert_eq!(first_dependency(""), None);
    }

    #[test]
    fn cache_directories_have_no_colon() {
        assert_eq!(
            cache_dir_name("linux-image-6.1.0-57-amd64", "6.1.192-3"),
            "linux-image-6.1.0-57-amd64_6.1.192-3"
        );
        assert_eq!(cache_dir_name("x", "1:2.0-1"), "x_1%3a2.0-1");
    }
}
