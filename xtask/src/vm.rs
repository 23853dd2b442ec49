//! `cargo xtask vm`: boots another kernel under qemu with `strait`, the privileged test
//! binaries, the kernel modules they need and a few host tools in an initramfs, runs the
//! selected tests (or a command) there and reports their status.
//!
//! Why: this machine runs one kernel (no WireGuard module, module loading disabled); users run
//! strait on others (Debian's 6.1 LTS, Talos...). Booting those kernels checks that the
//! verifier accepts every program there and lets the kernel WireGuard backend be tested.
//!
//! Kernels are Debian packages fetched once with `apt-get download` and unpacked with
//! `dpkg-deb -x` under `<target>/vm/` (never installed: nothing touches /boot or /lib/modules).
//! The VM has no network card: test traffic stays between namespaces inside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufWriter, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, Env};

/// Tests the VM runs when none is named. `<target>` runs every non-ignored test of
/// `tests/tests/<target>.rs`; `<target>::<name>` runs that one test, even an ignored one.
pub const DEFAULT_TESTS: &[&str] = &[
    // Every program of strait's object through the verifier of the VM's kernel.
    "verifier",
    // tc attach (netlink + clsact before 6.6, TCX after) with real packets, and TestRun.
    "counter",
    // Socket LB (cgroup sock_addr programs, real connect()), policy with conntrack, flow
    // events, restart from pins.
    "datapath",
    // strait's WireGuard reconciler on the kernel backend, pod traffic through the tunnel.
    "wireguard::kernel_backend_carries_pod_traffic_through_the_tunnel",
];

/// The kernel `cargo xtask vm` boots by default: Debian bookworm's `linux-image-amd64`.
pub const DEFAULT_KERNEL: &str = "6.1";

/// Modules loaded in the VM (with their dependencies, in load order); built-in ones are
/// skipped. tc on kernels before 6.6 needs clsact (`sch_ingress`) and `cls_bpf`.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "wireguard"];

/// Host tools the tests call, copied with the shared libraries `ldd` lists.
const TOOLS: &[&str] = &["ip", "wg", "tcpdump", "ping"];

/// Marker lines the VM's init prints; everything else on the console is passed through.
const BOOTED: &str = "STRAIT-VM-BOOTED";
const RESULT: &str = "STRAIT-VM-RESULT rc=";
const TEST_START: &str = "STRAIT-VM-TEST-START ";
const TEST_END: &str = "STRAIT-VM-TEST-END ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm exists and a guest actually boots on it within a few seconds
    /// (nested virtualisation often exposes a KVM that hangs), else TCG.
    Auto,
    Kvm,
    /// qemu's emulator: slow but works everywhere.
    Tcg,
}

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Kernel to boot: a Debian kernel version (`6.1`: bookworm's linux-image-amd64; `6.12`:
    /// linux-image-6.12-amd64; `6.1.0-56`: linux-image-6.1.0-56-amd64), a package name
    /// (`linux-image-...`), or the path of a vmlinuz (modules are taken from
    /// `<root>/lib/modules/<release>` when the path is `<root>/boot/vmlinuz-<release>`).
    #[arg(long, value_name = "VERSION|PACKAGE|VMLINUZ", default_value = DEFAULT_KERNEL)]
    pub kernel: String,
    /// Test to run, repeatable: `counter` (every test of tests/tests/counter.rs) or
    /// `wireguard::<name>` (one test, ignored ones included). Default: the VM test list
    /// (`DEFAULT_TESTS` in xtask/src/vm.rs) unless a command is given.
    #[arg(long = "test", value_name = "TARGET[::NAME]")]
    pub tests: Vec<String>,
    /// Give up (and kill qemu) after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub timeout: u64,
    /// Guest memory (the initramfs lives in it).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Extra file for the VM, repeatable: `HOST_PATH[:GUEST_PATH]` (default: the same path);
    /// executables bring their shared libraries, e.g. `--include /usr/bin/etcd` or
    /// `--include agent.yaml:/etc/strait/agent.yaml`.
    #[arg(long, value_name = "HOST[:GUEST]")]
    pub include: Vec<String>,
    /// Then an interactive bash on the console (this terminal): `exit` powers the VM off,
    /// Ctrl-A X kills it. No timeout.
    #[arg(long)]
    pub shell: bool,
    /// Show every kernel message on the console (default: warnings and worse).
    #[arg(long)]
    pub verbose: bool,
    /// Command to run in the VM after the named tests (alone when no `--test` is given), not
    /// interactively, e.g. `-- sh -c 'strait count --help; wg --version'`. `strait`, `ip`,
    /// `wg`, `tcpdump`, `ping` and busybox's applets are on PATH; its status is the VM's.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl VmArgs {
    /// The arguments `cargo xtask test` uses: default kernel and tests.
    pub fn for_ci() -> Self {
        Self {
            kernel: DEFAULT_KERNEL.into(),
            tests: Vec::new(),
            timeout: 600,
            memory: 2048,
            cpus: 2,
            accel: Accel::Auto,
            include: Vec::new(),
            shell: false,
            verbose: false,
            command: Vec::new(),
        }
    }
}

/// Why a VM run did not pass.
#[derive(Debug)]
pub enum VmError {
    /// The VM could not be prepared or booted (download, qemu, no result line, timeout).
    Infra(anyhow::Error),
    /// The VM ran; the tests or the command exited with this status.
    Failed(i32),
    /// The VM booted, then hung or died before its result line (a test took the kernel down,
    /// or overran the timeout): a failure like a failing test.
    Broke(anyhow::Error),
}

impl From<anyhow::Error> for VmError {
    fn from(e: anyhow::Error) -> Self {
        Self::Infra(e)
    }
}

/// `cargo xtask vm`. Returns the process exit status.
pub fn main(env: &Env, args: &VmArgs) -> anyhow::Result<u8> {
    match run(env, args) {
        Ok(()) => Ok(0),
        Err(VmError::Infra(e) | VmError::Broke(e)) => Err(e),
        Err(VmError::Failed(rc)) => {
            eprintln!("\nxtask vm: the VM's tests/command failed (rc={rc})");
            Ok(u8::try_from(rc).ok().filter(|rc| *rc != 0).unwrap_or(1))
        }
    }
}

/// Builds, boots and runs; the timing and every test's status are printed.
pub fn run(env: &Env, args: &VmArgs) -> Result<(), VmError> {
    let started = Instant::now();
    let vm_dir = target_dir().join("vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    cmd::step(&format!("vm: kernel {}", args.kernel));
    let kernel = resolve_kernel(&args.kernel, &vm_dir)?;
    println!(
        "vm: kernel {} ({}), modules {}",
        kernel.release,
        kernel.vmlinuz.display(),
        kernel
            .modules
            .as_deref()
            .map_or("none".into(), |m| m.display().to_string())
    );

    cmd::step("vm: building strait and the privileged test binaries");
    let artifacts = build(env, !args.command.is_empty() || args.shell)?;
    let specs: Vec<String> = if !args.tests.is_empty() {
        args.tests.clone()
    } else if args.command.is_empty() && !args.shell {
        DEFAULT_TESTS.iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    };
    let runs = specs
        .iter()
        .map(|s| TestRun::parse(s, &artifacts))
        .collect::<anyhow::Result<Vec<_>>>()?;

    cmd::step("vm: initramfs (busybox, strait, tests, modules, tools)");
    let t = Instant::now();
    let initrd = vm_dir.join("initramfs.cpio");
    let size = build_initramfs(&initrd, &vm_dir, &kernel, &artifacts, &runs, args)?;
    println!(
        "vm: {} ({} MiB) in {:.1}s",
        initrd.display(),
        size >> 20,
        t.elapsed().as_secs_f64()
    );

    let accel = match args.accel {
        Accel::Auto if kvm_usable(&kernel, &vm_dir) => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        other => other,
    };
    cmd::step(&format!(
        "vm: booting Linux {} under qemu ({}, {} vCPU, {} MiB; {})",
        kernel.release,
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        args.cpus,
        args.memory,
        if args.shell {
            "no timeout with --shell".to_owned()
        } else {
            format!("timeout {}s", args.timeout)
        }
    ));
    let outcome = boot(&kernel, &initrd, args, accel)?;

    println!("\nvm: summary (Linux {}):", kernel.release);
    for (name, rc) in &outcome.tests {
        println!(
            "  {:<4} {name}",
            if *rc == 0 {
                "ok".to_string()
            } else {
                format!("FAIL rc={rc}")
            }
        );
    }
    println!(
        "vm: booted in {}, VM ran {:.1}s, total {:.1}s (with build)",
        outcome
            .boot
            .map_or("?".into(), |b| format!("{:.1}s", b.as_secs_f64())),
        outcome.vm.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if outcome.rc != 0 {
        return Err(VmError::Failed(outcome.rc));
    }
    Ok(())
}

/// `$CARGO_TARGET_DIR`, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace_root().join("target"))
}

// ---------------------------------------------------------------------------------------------
// Kernel

struct Kernel {
    vmlinuz: PathBuf,
    release: String,
    /// `.../lib/modules/<release>`, when known.
    modules: Option<PathBuf>,
}

fn resolve_kernel(spec: &str, vm_dir: &Path) -> anyhow::Result<Kernel> {
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

/// The modules to load, dependencies first, as (name, file). Reads `depends=` from each
/// module's modinfo, so nothing is written next to the modules (they may be the host's).
fn module_plan(modules_dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();

    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        plan: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if plan.iter().any(|(n, _)| n == name) || builtin.contains(name) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            println!("vm: warning: module {name} is neither built in nor shipped with this kernel");
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in modinfo_depends(&data) {
            visit(&dep, index, builtin, plan)?;
        }
        plan.push((name.to_owned(), path.clone()));
        Ok(())
    }
    let mut plan = Vec::new();
    for m in MODULES {
        visit(m, &index, &builtin, &mut plan)?;
    }
    Ok(plan)
}

/// `kernel/net/wireguard/wireguard.ko.xz` → `wireguard` (`-` and `_` are one in module names).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// A module's bytes, decompressed (busybox insmod loads plain ELF only).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=a,b` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &module[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Binaries

struct Artifacts {
    strait: Option<PathBuf>,
    /// Integration test target name (`counter`) → executable.
    tests: BTreeMap<String, PathBuf>,
    /// strait-tests' own binaries (`sockprobe`...): tests run them from next to themselves.
    helpers: BTreeMap<String, PathBuf>,
}

/// One `cargo test --no-run` with the same package selection as `cargo xtask test` (so
/// nothing is rebuilt there or here), reading the executables from cargo's JSON messages.
fn build(env: &Env, with_agent: bool) -> anyhow::Result<Artifacts> {
    let out = cmd::output(env.cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "strait-ebpf",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let mut strait = None;
    let mut tests = BTreeMap::new();
    let mut helpers = BTreeMap::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let target = &msg["target"];
        let name = target["name"].as_str().unwrap_or_default();
        let kinds: Vec<&str> = target["kind"]
            .as_array()
            .map(|k| k.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        let is_test_profile = msg["profile"]["test"].as_bool().unwrap_or(false);
        let package = msg["package_id"].as_str().unwrap_or_default();
        if kinds == ["bin"] && name == "strait" && !is_test_profile {
            strait = Some(PathBuf::from(exe));
        } else if kinds == ["test"] && package.contains("strait-tests") {
            tests.insert(name.to_owned(), PathBuf::from(exe));
        } else if kinds == ["bin"] && package.contains("strait-tests") && !is_test_profile {
            helpers.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    // The tests link strait's library; the binary is only needed for a command, and building
    // it takes another feature set (a rebuild), so it is built only then, as `xtask build` does.
    let strait = match strait {
        Some(s) => Some(s),
        None if with_agent => {
            cmd::build_agent(env, false)?;
            Some(cmd::strait_bin(false))
        }
        None => None,
    };
    println!(
        "vm: {}{} test binaries ({})",
        if strait.is_some() { "strait and " } else { "" },
        tests.len(),
        tests.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(Artifacts {
        strait,
        tests,
        helpers,
    })
}

/// One test selection, checked against the binary's own `--list` before booting (a
/// misspelt name would otherwise run zero tests and pass).
struct TestRun {
    label: String,
    target: String,
    args: Vec<String>,
}

impl TestRun {
    fn parse(spec: &str, artifacts: &Artifacts) -> anyhow::Result<Self> {
        let (target, name) = match spec.split_once("::") {
            Some((t, n)) => (t, Some(n)),
            None => (spec, None),
        };
        let Some(exe) = artifacts.tests.get(target) else {
            bail!(
                "--test {spec}: no test target {target:?} in strait-tests (known: {})",
                artifacts
                    .tests
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        // One at a time: privileged tests share kernel state (bpffs, cgroups).
        let mut args = vec!["--test-threads=1".to_owned()];
        if let Some(name) = name {
            let list = cmd::output(Command::new(exe).args(["--list", "--include-ignored"]))?;
            let known = list
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .any(|t| t == name);
            if !known {
                bail!("--test {spec}: {target} has no test named {name:?}");
            }
            args.extend(["--exact", "--include-ignored", name].map(String::from));
        }
        Ok(Self {
            label: spec.to_owned(),
            target: target.to_owned(),
            args,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Initramfs

fn build_initramfs(
    out: &Path,
    vm_dir: &Path,
    kernel: &Kernel,
    artifacts: &Artifacts,
    runs: &[TestRun],
    args: &VmArgs,
) -> anyhow::Result<u64> {
    let mut fs = Tree::default();
    let busybox = which("busybox")?;
    if !is_static(&busybox)? {
        bail!(
            "{} is dynamically linked: install busybox-static (`cargo xtask setup` does)",
            busybox.display()
        );
    }
    fs.file("bin/busybox", Source::Host(busybox), 0o755);
    fs.char_dev("dev/console", 5, 1);
    for dir in [
        "proc", "sys", "dev", "tmp", "run", "root", "etc", "usr/sbin",
    ] {
        fs.dir(dir);
    }
    fs.symlink("var/run", "/run");
    // tcpdump drops privileges to its own user, even when only reading a file.
    fs.bytes(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:100:100::/nonexistent:/bin/false\n",
        0o644,
    );
    fs.bytes("etc/group", "root:x:0:\ntcpdump:x:100:\n", 0o644);
    fs.bytes("etc/hosts", "127.0.0.1 localhost\n", 0o644);

    // Binaries are copied without their debug info: test binaries are hundreds of MiB with it,
    // and panics still name file and line.
    let stripped = vm_dir.join("stripped");
    std::fs::create_dir_all(&stripped)?;
    let mut needs_libs = Vec::new();
    if let Some(strait) = &artifacts.strait {
        let strait = strip_cached(strait, &stripped)?;
        fs.file("usr/bin/strait", Source::Host(strait.clone()), 0o755);
        needs_libs.push(strait);
    }
    let mut targets: Vec<&str> = runs.iter().map(|r| r.target.as_str()).collect();
    targets.dedup();
    for target in targets {
        let exe = strip_cached(&artifacts.tests[target], &stripped)?;
        fs.file(&format!("tests/{target}"), Source::Host(exe.clone()), 0o755);
        needs_libs.push(exe);
    }
    if !runs.is_empty() {
        for (name, path) in &artifacts.helpers {
            let exe = strip_cached(path, &stripped)?;
            fs.file(&format!("tests/{name}"), Source::Host(exe.clone()), 0o755);
            needs_libs.push(exe);
        }
    }
    // busybox's sh runs its own applets before anything on PATH (its `ip` is not iproute2):
    // /bin/sh is Debian's dash, so commands and scripts get the real tools.
    let dash = which("dash")?;
    fs.file("bin/sh", Source::Host(dash.clone()), 0o755);
    needs_libs.push(dash);
    if args.shell {
        let bash = which("bash")?;
        fs.file("bin/bash", Source::Host(bash.clone()), 0o755);
        needs_libs.push(bash);
        let term = std::env::var("TERM").unwrap_or_else(|_| "vt100".into());
        for t in [term.as_str(), "vt100"] {
            let Some(first) = t.chars().next() else {
                continue;
            };
            if let Some(info) = ["/lib/terminfo", "/usr/share/terminfo"]
                .iter()
                .map(|d| Path::new(d).join(first.to_string()).join(t))
                .find(|p| p.is_file())
            {
                let rel = info.to_string_lossy().trim_start_matches('/').to_owned();
                fs.file(&rel, Source::Host(info), 0o644);
                fs.bytes("etc/strait-vm-term", t, 0o644);
                break;
            }
        }
    }
    for tool in TOOLS {
        let path = which(tool)?;
        fs.file(
            &format!("usr/sbin/{tool}"),
            Source::Host(path.clone()),
            0o755,
        );
        needs_libs.push(path);
    }
    for inc in &args.include {
        let (host, guest) = inc.split_once(':').unwrap_or((inc, inc));
        let host = std::fs::canonicalize(host).with_context(|| format!("--include {inc}"))?;
        if !host.is_file() {
            bail!("--include {inc}: only files can be included");
        }
        let guest = if guest == inc {
            host.to_string_lossy().into_owned()
        } else {
            guest.to_owned()
        };
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&host)?.permissions());
        if mode & 0o111 != 0 && !is_static(&host)? {
            needs_libs.push(host.clone());
        }
        fs.file(
            guest.trim_start_matches('/'),
            Source::Host(host),
            mode & 0o7777,
        );
    }
    for lib in shared_libraries(&needs_libs)? {
        let rel = lib.to_string_lossy().trim_start_matches('/').to_owned();
        fs.file(&rel, Source::Host(lib), 0o755);
    }

    let mut modules = Vec::new();
    if let Some(dir) = &kernel.modules {
        for (name, path) in module_plan(dir)? {
            fs.file(
                &format!("modules/{name}.ko"),
                Source::Bytes(read_module(&path)?),
                0o644,
            );
            modules.push(name);
        }
        println!("vm: modules, in load order: {}", modules.join(" "));
    }
    fs.bytes(
        "init",
        &init_script(&modules, runs, &args.command, args.shell),
        0o755,
    );

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let size = fs.write_cpio(&mut w)?;
    w.flush()?;
    Ok(size)
}

/// The VM's PID 1 (busybox sh): mounts, modules, the tests, a result line, power off.
fn init_script(modules: &[String], runs: &[TestRun], command: &[String], shell: bool) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CI=true RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/wireguard /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up
echo "STRAIT-VM-BOOTED kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)s"
"#,
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /modules/{m}.ko || echo \"STRAIT-VM-WARN insmod {m} failed\"\n"
        ));
    }
    s.push_str(
        r#"rc=0
run() {
    label=$1; shift
    echo "STRAIT-VM-TEST-START $label"
    "$@"
    r=$?
    echo "STRAIT-VM-TEST-END $label rc=$r"
    [ $r -eq 0 ] || rc=$r
}
"#,
    );
    for r in runs {
        let mut line = format!("run {} /tests/{}", quote(&r.label), r.target);
        for a in &r.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        s.push_str(&line);
        s.push('\n');
    }
    if !command.is_empty() {
        // Through dash (a path, so not a busybox applet), which looks the command up on PATH.
        let joined: Vec<String> = command.iter().map(|a| quote(a)).collect();
        s.push_str(&format!(
            "run {} /bin/sh -c 'exec \"$@\"' sh {}\n",
            quote(&format!("command: {}", command.join(" "))),
            joined.join(" ")
        ));
    }
    if shell {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        // A session with the console as controlling terminal, so Ctrl-C reaches the command.
        s.push_str(&format!(
            r#"echo "STRAIT-VM-SHELL: exit (or Ctrl-D) powers the VM off; Ctrl-A X kills it"
export TERM=$(cat /etc/strait-vm-term 2>/dev/null || echo vt100)
stty rows {rows} cols {cols} </dev/ttyS0
setsid -c /bin/bash -i </dev/ttyS0 >/dev/ttyS0 2>&1
"#
        ));
    }
    s.push_str(
        r#"echo "STRAIT-VM-RESULT rc=$rc"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#,
    );
    s
}

/// Rows and columns of the terminal on stdin, for the VM's shell.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize we pass; it fails harmlessly on a non-terminal.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("{tool} not found on PATH (`cargo xtask setup` installs it)"))
}

fn is_static(path: &Path) -> anyhow::Result<bool> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    Ok(text.contains("not a dynamic executable") || text.contains("statically linked"))
}

/// Every shared library (and the dynamic loader) `ldd` lists for `binaries`, as real paths
/// on the host; the initramfs keeps those paths.
fn shared_libraries(binaries: &[PathBuf]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for bin in binaries {
        let out = cmd::output(Command::new("ldd").arg(bin))?;
        for line in out.lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

/// `objcopy --strip-debug` into `dir`, redone only when the source changed. Keyed by the
/// source's file name, which for test binaries carries cargo's hash (`counter-1a2b...`), so
/// worktrees sharing a target directory do not get each other's binaries.
fn strip_cached(src: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let dst = dir.join(src.file_name().context("binary without a file name")?);
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(a), Some(b)) if a > b)
    };
    if !dst.exists() || newer(src, &dst) {
        cmd::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(&dst),
        )?;
    }
    Ok(dst)
}

enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

enum Node {
    Dir,
    File(Source, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// The initramfs as a path-sorted tree (parents before children), written as a newc cpio.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            self.nodes
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            p = dir.parent();
        }
    }
    fn insert(&mut self, path: &str, node: Node) {
        self.parents(path);
        self.nodes.insert(path.to_owned(), node);
    }
    fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }
    fn file(&mut self, path: &str, src: Source, mode: u32) {
        self.insert(path, Node::File(src, mode));
    }
    fn bytes(&mut self, path: &str, content: &str, mode: u32) {
        self.file(path, Source::Bytes(content.as_bytes().to_vec()), mode);
    }
    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()));
    }
    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Node::CharDev(major, minor));
    }

    /// Writes the archive; returns its size.
    fn write_cpio(&self, w: &mut impl std::io::Write) -> anyhow::Result<u64> {
        let mut size = 0u64;
        let mut ino = 1u32;
        let mut entry = |w: &mut dyn std::io::Write,
                         name: &str,
                         mode: u32,
                         rdev: (u32, u32),
                         data: &[u8]|
         -> std::io::Result<()> {
            let header = format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            );
            ino += 1;
            let pad = |n: usize| (4 - n % 4) % 4;
            w.write_all(header.as_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0u8; 4][..1 + pad(header.len() + name.len() + 1)])?;
            w.write_all(data)?;
            w.write_all(&[0u8; 3][..pad(data.len())])?;
            size += (header.len() + name.len() + 1 + pad(header.len() + name.len() + 1)) as u64
                + (data.len() + pad(data.len())) as u64;
            Ok(())
        };
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => entry(w, path, 0o040755, (0, 0), &[])?,
                Node::Symlink(t) => entry(w, path, 0o120777, (0, 0), t.as_bytes())?,
                Node::CharDev(ma, mi) => entry(w, path, 0o020600, (*ma, *mi), &[])?,
                Node::File(Source::Bytes(b), mode) => entry(w, path, 0o100000 | mode, (0, 0), b)?,
                Node::File(Source::Host(p), mode) => {
                    let mut data = Vec::new();
                    std::fs::File::open(p)
                        .and_then(|mut f| f.read_to_end(&mut data))
                        .with_context(|| format!("reading {}", p.display()))?;
                    entry(w, path, 0o100000 | mode, (0, 0), &data)?;
                }
            }
        }
        entry(w, "TRAILER!!!", 0, (0, 0), &[])?;
        Ok(size)
    }
}

// ---------------------------------------------------------------------------------------------
// Booting

/// PID of the running qemu, for the Ctrl-C handler.
static QEMU_PID: AtomicU32 = AtomicU32::new(0);

/// Kills qemu (by PID) when the run ends in any way.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
        QEMU_PID.store(0, Ordering::SeqCst);
    }
}

fn qemu_command(
    kernel: &Kernel,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: u32,
    cpus: u32,
    accel: Accel,
) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        _ => qemu.args(["-accel", "tcg", "-cpu", "max"]),
    };
    qemu.args(["-m", &memory.to_string()])
        .args(["-smp", &cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .args(["-append", cmdline])
        // No network card, no display: the serial console on stdio is the only way out.
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(initrd) = initrd {
        qemu.arg("-initrd").arg(initrd);
    }
    qemu
}

/// KVM is used only if a guest really runs on it: nested setups can expose a /dev/kvm on
/// which the kernel never gets going. The answer is cached for this boot of the host.
fn kvm_usable(kernel: &Kernel, vm_dir: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = vm_dir.join("kvm-probe");
    if let Some(ok) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|c| c.strip_prefix(boot_id.trim()).map(|r| r.trim() == "ok"))
        .filter(|_| !boot_id.trim().is_empty())
    {
        println!(
            "vm: /dev/kvm {} (probed earlier this boot; {})",
            if ok {
                "works"
            } else {
                "is unusable: using TCG"
            },
            cache.display()
        );
        return ok;
    }
    let ok = probe_kvm(kernel);
    let _ = std::fs::write(
        &cache,
        format!(
            "{} {}\n",
            boot_id.trim(),
            if ok { "ok" } else { "unusable" }
        ),
    );
    ok
}

fn probe_kvm(kernel: &Kernel) -> bool {
    const PROBE: Duration = Duration::from_secs(10);
    // `earlyprintk` prints "Linux version" within milliseconds of entering the kernel.
    let mut probe = qemu_command(
        kernel,
        None,
        "console=ttyS0 earlyprintk=ttyS0 panic=-1",
        256,
        1,
        Accel::Kvm,
    );
    probe.args(["-serial", "stdio"]).stderr(Stdio::null());
    let Ok(child) = probe.spawn() else {
        return false;
    };
    let mut child = Qemu(child);
    let lines = console_lines(child.0.stdout.take().expect("piped"), false);
    let deadline = Instant::now() + PROBE;
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("Linux version") => {
                ok = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(child);
    if ok {
        println!("vm: /dev/kvm works (the kernel started on it)");
    } else {
        println!("vm: /dev/kvm is unusable (no kernel output within {PROBE:?}): using TCG");
    }
    ok
}

/// Console lines (`\r` removed) from qemu's stdout, on a thread.
/// With `echo`, bytes are also copied to stdout as they arrive (an interactive shell's prompt
/// has no newline).
fn console_lines(
    mut out: impl std::io::Read + Send + 'static,
    echo: bool,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let mut stdout = std::io::stdout().lock();
                        let _ = stdout.write_all(&buf[..n]);
                        let _ = stdout.flush();
                    }
                    for &b in &buf[..n] {
                        match b {
                            b'\n' => {
                                let text = String::from_utf8_lossy(&line).into_owned();
                                line.clear();
                                if tx.send(text).is_err() {
                                    return;
                                }
                            }
                            b'\r' => {}
                            _ => line.push(b),
                        }
                    }
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    rx
}

struct Outcome {
    rc: i32,
    boot: Option<Duration>,
    vm: Duration,
    tests: Vec<(String, i32)>,
}

fn boot(kernel: &Kernel, initrd: &Path, args: &VmArgs, accel: Accel) -> Result<Outcome, VmError> {
    let mut cmdline = String::from("console=ttyS0 panic=-1 mitigations=off rdinit=/init");
    if !args.verbose {
        cmdline.push_str(" loglevel=4");
    }
    let mut qemu = qemu_command(
        kernel,
        Some(initrd),
        &cmdline,
        args.memory,
        args.cpus,
        accel,
    );
    qemu.stderr(Stdio::inherit());
    if !args.shell {
        qemu.args(["-serial", "stdio"]);
    } else {
        // The terminal drives the console: Ctrl-C goes to the guest, Ctrl-A X quits qemu.
        qemu.stdin(Stdio::inherit()).args([
            "-chardev",
            "stdio,id=con,mux=on,signal=off",
            "-serial",
            "chardev:con",
            "-mon",
            "chardev=con,mode=readline",
        ]);
    }
    let started = Instant::now();
    let child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs qemu-system-x86)")?;
    QEMU_PID.store(child.id(), Ordering::SeqCst);
    // Ctrl-C: the terminal signals qemu too, but kill it by PID in case it ignores SIGINT.
    let _ = ctrlc::set_handler(|| {
        let pid = QEMU_PID.load(Ordering::SeqCst);
        if pid != 0 {
            eprintln!("\ninterrupted: stopping qemu (pid {pid})");
            // SAFETY: signalling the qemu child we started and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::process::exit(130);
    });
    let mut qemu = Qemu(child);
    let lines = console_lines(qemu.0.stdout.take().expect("piped"), args.shell);

    let deadline = started
        + if args.shell {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            Duration::from_secs(args.timeout)
        };
    let mut outcome = Outcome {
        rc: -1,
        boot: None,
        vm: Duration::ZERO,
        tests: Vec::new(),
    };
    let mut result = None;
    let mut test_started = Instant::now();
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            let e = anyhow::anyhow!(
                "the VM did not finish within {}s: killed qemu (pid {}); raise --timeout?",
                args.timeout,
                qemu.0.id()
            );
            return Err(booted(&outcome, e));
        };
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let at = started.elapsed().as_secs_f64();
        if let Some(rest) = line.strip_prefix(BOOTED) {
            outcome.boot = Some(started.elapsed());
            println!("==> vm: booted in {at:.1}s ({})", rest.trim());
        } else if let Some(label) = line.strip_prefix(TEST_START) {
            test_started = Instant::now();
            println!("\n==> vm [{at:.0}s]: {label}");
        } else if let Some(rest) = line.strip_prefix(TEST_END) {
            let (label, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, "-1"));
            let rc = rc.trim().parse().unwrap_or(-1);
            println!(
                "==> vm [{at:.0}s]: {label}: {} in {:.1}s",
                if rc == 0 { "ok" } else { "FAILED" },
                test_started.elapsed().as_secs_f64()
            );
            outcome.tests.push((label.to_owned(), rc));
        } else if let Some(rc) = line.strip_prefix(RESULT) {
            result = rc.trim().parse::<i32>().ok();
            if !args.shell {
                println!("{line}");
            }
        } else if !args.shell {
            println!("  | {line}");
        }
    }
    let status = qemu.0.wait().context("waiting for qemu")?;
    outcome.vm = started.elapsed();
    match result {
        Some(rc) => {
            outcome.rc = rc;
            Ok(outcome)
        }
        None => {
            let e = anyhow::anyhow!(
                "the VM stopped ({status}) without a {RESULT}<n> line: it did not boot, or its \
                 init or kernel died (kernel panic? see the console above)"
            );
            Err(booted(&outcome, e))
        }
    }
}

/// After the VM booted a hang or crash is the tests' failure, before it the VM's.
fn booted(outcome: &Outcome, e: anyhow::Error) -> VmError {
    if outcome.boot.is_some() {
        VmError::Broke(e)
    } else {
        VmError::Infra(e)
    }
}
