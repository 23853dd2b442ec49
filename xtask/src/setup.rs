//! `cargo xtask setup`: make this machine able to build, load and test strait, idempotently.
//! Every check prints what it found; anything missing is installed; what cannot be fixed here
//! stops with an explanation.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, Env};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz drives the libFuzzer targets in fuzz/ (`cargo xtask fuzz`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests, the demo and later work use. `iputils-ping` and `procps` are
/// small tools the demo and harness call; `protobuf-compiler` and `libprotobuf-dev` (well-known .proto files) build the etcd gRPC client.
/// `qemu-system-x86` and `busybox-static` boot other kernels for `cargo xtask vm` (apt replaces
/// the dynamic `busybox` with the static one, which the initramfs needs). `shellcheck` lints
/// the project's shell scripts in `cargo xtask test`.
const DEBIAN_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "wireguard-go",
    "wireguard-tools",
    "iproute2",
    "iputils-ping",
    "procps",
    "tcpdump",
    "iperf3",
    "iptables",
    "nftables",
    "bpftool",
    "protobuf-compiler",
    "libprotobuf-dev",
    "qemu-system-x86",
    "busybox-static",
    "shellcheck",
];

pub fn run() -> anyhow::Result<Env> {
    let started = Instant::now();
    cmd::step("setup: checking this machine");
    check_platform()?;
    ensure_bpffs()?;
    report_cgroup2()?;
    ensure_debian_packages()?;
    report_kubectl();
    let ebpf_toolchain = ensure_rust_src()?;
    let bin_dir = ensure_bpf_linker(&ebpf_toolchain)?;
    ensure_cargo_fuzz(&bin_dir)?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(Env {
        bin_dir,
        ebpf_toolchain,
    })
}

fn check_platform() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!(
            "strait needs Linux (eBPF, network namespaces, WireGuard); this is {}",
            std::env::consts::OS
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "strait's setup, tests and demo need root (loading eBPF, creating namespaces, installing \
             packages): run as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel:       Linux {}", release.trim());
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        bail!(
            "{} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF). strait needs \
             Linux >= 5.10 with BTF",
            btf.display()
        );
    }
    println!("BTF:          {}", btf.display());
    Ok(())
}

fn mounts() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next()?;
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect())
}

fn ensure_bpffs() -> anyhow::Result<()> {
    const BPFFS: &str = "/sys/fs/bpf";
    if mounts()?.iter().any(|(p, t)| p == BPFFS && t == "bpf") {
        println!("bpffs:        {BPFFS}");
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!(
            "bpffs is not mounted at {BPFFS} and mounting it failed ({status}); mount it with `mount -t bpf bpf {BPFFS}`"
        );
    }
    println!("bpffs:        {BPFFS} (was not mounted: mounted it)");
    Ok(())
}

fn report_cgroup2() -> anyhow::Result<()> {
    match mounts()?.into_iter().find(|(_, t)| t == "cgroup2") {
        Some((path, _)) => {
            println!("cgroup v2:    {path}");
            Ok(())
        }
        None => {
            bail!("no cgroup v2 mount found in /proc/mounts: socket load balancing needs cgroup v2")
        }
    }
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "packages:     {} Debian packages present",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    println!("packages:     installing {}", missing.join(" "));
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages")?;
    Ok(())
}

fn debian_package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Returns the toolchain that builds the eBPF crate: nightly when it exists (or can be
/// installed), otherwise stable with RUSTC_BOOTSTRAP=1. Either way with rust-src, which
/// `-Z build-std=core` needs.
fn ensure_rust_src() -> anyhow::Result<String> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let has_nightly = toolchains.lines().any(|l| l.starts_with("nightly"));
    let toolchain = if has_nightly {
        "nightly"
    } else {
        println!("rust:         no nightly toolchain; installing it (minimal profile)");
        let installed = Command::new("rustup")
            .args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "-c",
                "rust-src",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if installed {
            "nightly"
        } else {
            println!("rust:         nightly unavailable; using stable with RUSTC_BOOTSTRAP=1");
            "stable"
        }
    };
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("rust:         adding rust-src to {toolchain}");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    let version =
        cmd::output(Command::new("rustup").args(["run", toolchain, "rustc", "--version"]))?;
    println!("rust (eBPF):  {} + rust-src", version.trim());
    Ok(toolchain.to_owned())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// bpf-linker, built from crates.io against the eBPF toolchain's own LLVM (no prebuilt
/// binaries can be fetched here). Installed into $CARGO_HOME/bin; its rpath points at a small
/// prefix directory of symlinks to the toolchain's libLLVM.
fn ensure_bpf_linker(toolchain: &str) -> anyhow::Result<PathBuf> {
    let bin_dir = cargo_home().join("bin");
    let linker = bin_dir.join("bpf-linker");
    if let Ok(out) = Command::new(&linker).arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        println!(
            "bpf-linker:   {} ({})",
            linker.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        return Ok(bin_dir);
    }

    let sysroot = cmd::output(
        Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]),
    )?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: cannot build bpf-linker against the toolchain's LLVM",
                lib_dir.display()
            )
        })?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    // libLLVM.so.22.1-rust-... → major 22, which selects bpf-linker's llvm-22 feature.
    let major = file_name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();

    let prefix = cargo_home().join("strait-llvm").join(&major);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", file_name.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }

    println!(
        "bpf-linker:   building {BPF_LINKER_VERSION} against LLVM {major} ({}); takes ~4 min on 2 cores, cargo's progress follows",
        libllvm.display()
    );
    let started = Instant::now();
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(cargo_home())
            .arg("--force")
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker")?;
    println!(
        "bpf-linker:   built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin_dir)
}

/// cargo-fuzz from crates.io into $CARGO_HOME/bin (a plain cargo subcommand: any toolchain
/// builds it; the fuzz targets themselves build on the eBPF toolchain).
fn ensure_cargo_fuzz(bin_dir: &Path) -> anyhow::Result<()> {
    let bin = bin_dir.join("cargo-fuzz");
    if let Ok(out) = Command::new(&bin).arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION)
    {
        println!(
            "cargo-fuzz:   {} ({})",
            bin.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        return Ok(());
    }
    println!("cargo-fuzz:   installing {CARGO_FUZZ_VERSION} (~1 min), cargo's progress follows");
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(cargo_home())
            .arg("--force"),
    )
    .context("installing cargo-fuzz")
}

/// kubectl renders deploy/'s kustomize overlays in tests/tests/deploy.rs (which fails under
/// CI=true without it). It is not a Debian bookworm package and no other registry may be used
/// here: the machine image ships it (/usr/bin/kubectl). Reported, not installed.
fn report_kubectl() {
    let found = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    match found {
        Some(path) => {
            let version = Command::new(path)
                .args(["version", "--client"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', ", "))
                .unwrap_or_default();
            println!("kubectl:      {path} ({})", version.trim_end_matches(", "));
        }
        None => println!(
            "kubectl:      MISSING — the deploy/ manifest test needs it to render the kustomize \
             overlays; install kubectl >= 1.27 (e.g. from the Kubernetes apt repository)"
        ),
    }
}
