//! The kernel to boot: a Debian package fetched once with `apt-get download` and unpacked
//! under `<target>/vm/kernels/`, or a vmlinuz given by path.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd;

pub(super) struct Kernel {
    pub(super) vmlinuz: PathBuf,
    pub(super) release: String,
    /// `.../lib/modules/<release>`, when known.
    pub(super) modules: Option<PathBuf>,
}

/// `--kernel`: a vmlinuz path, or a Debian kernel version or package (fetched once, cached).
pub(super) fn resolve(spec: &str, vm_dir: &Path) -> anyhow::Result<Kernel> {
    let path = Path::new(spec);
    if path.is_file() {
        return kernel_from_file(path);
    }
    if spec.contains('/') {
        bail!("--kernel {spec}: no such file");
    }
    let name = if spec.starts_with("linux-image-") {
        spec.to_owned()
    } else if spec == "6.1" {
        // bookworm's default kernel has an unversioned meta package.
        "linux-image-amd64".to_owned()
    } else {
        format!("linux-image-{spec}-amd64")
    };
    let (package, version) = concrete_package(&name)?;
    let kernels = vm_dir.join("kernels");
    let dir = kernels.join(format!("{package}_{}", version.replace(':', "%3a")));
    let done = dir.join(".extracted");
    let dir = if done.exists() {
        println!("vm: {package} {version} (cached in {})", dir.display());
        dir
    } else {
        match download_and_extract(&package, &version, vm_dir, &dir) {
            Ok(()) => {
                std::fs::write(&done, b"")
                    .with_context(|| format!("writing {}", done.display()))?;
                dir
            }
            // Offline, or apt's lists name a version the mirror dropped: an earlier download
            // of the same package still tests the same kernel line.
            Err(e) => match cached_version(&kernels, &package) {
                Some(old) => {
                    println!(
                        "vm: warning: {e:#}; using the cached {}",
                        old.file_name().unwrap_or_default().to_string_lossy()
                    );
                    old
                }
                None => return Err(e),
            },
        }
    };
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    kernel_from_file(&vmlinuz)
}

/// The most recently unpacked `<package>_<version>` directory, if any.
fn cached_version(kernels: &Path, package: &str) -> Option<PathBuf> {
    std::fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.join(".extracted").exists()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// A vmlinuz path; modules next to it when it sits in `<root>/boot/`.
fn kernel_from_file(path: &Path) -> anyhow::Result<Kernel> {
    let release = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("unknown")
        .to_owned();
    let modules = path
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "boot"))
        .and_then(Path::parent)
        .and_then(|root| {
            ["lib/modules", "usr/lib/modules"]
                .iter()
                .map(|d| root.join(d).join(&release))
                .find(|d| d.is_dir())
        });
    if modules.is_none() {
        println!(
            "vm: warning: no modules directory found for {} (expected <root>/lib/modules/{release} \
             next to <root>/boot/): only built-in drivers will be there",
            path.display()
        );
    }
    Ok(Kernel {
        vmlinuz: path.to_path_buf(),
        release,
        modules,
    })
}

/// Follows meta packages (`linux-image-amd64` → `linux-image-6.1.0-56-amd64`) to the package
/// holding the kernel; returns it with its candidate version. Reads apt's lists only.
fn concrete_package(name: &str) -> anyhow::Result<(String, String)> {
    let mut name = name.to_owned();
    for _ in 0..4 {
        let out = Command::new("apt-cache")
            .args(["show", "--no-all-versions", &name])
            .output()
            .context(
                "running apt-cache (Debian is needed to fetch kernels; or pass --kernel <vmlinuz>)",
            )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.trim().is_empty() {
            bail!(
                "apt knows no package {name}: run `apt-get update`, list kernels with \
                 `apt-cache search linux-image-`, or pass --kernel <path to vmlinuz>"
            );
        }
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        let version = field("Version:").context("no Version in apt-cache show")?;
        // A meta package depends on the versioned image package; an image package does not.
        let next = field("Depends:").and_then(|deps| {
            deps.split(',')
                .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
                .find(|d| d.starts_with("linux-image-"))
        });
        match next {
            Some(next) => name = next,
            None => return Ok((name, version)),
        }
    }
    bail!("{name}: too many levels of meta packages")
}

fn download_and_extract(
    package: &str,
    version: &str,
    vm_dir: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let debs = vm_dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    println!("vm: apt-get download {package}={version} (once; cached afterwards)");
    let t = Instant::now();
    cmd::run(
        Command::new("apt-get")
            // The download directory belongs to root, not to apt's sandbox user.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{package}={version}"))
            .current_dir(&debs),
    )
    .with_context(|| format!("downloading {package} (stale apt lists? run `apt-get update`)"))?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                debs.display()
            )
        })?;
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    // Unpacked, never installed: the host's /boot and /lib/modules stay untouched.
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_file(&deb);
    println!(
        "vm: fetched and unpacked into {} in {:.1}s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
