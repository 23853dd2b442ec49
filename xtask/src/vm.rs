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

mod artifacts;
mod init;
mod initramfs;
mod kernel;
mod modules;
mod qemu;
mod tree;

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;

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
    // Conntrack following policy changes, ICMP errors and fragments of known flows.
    "conntrack",
    // strait's WireGuard reconciler on the kernel backend, pod traffic through the tunnel.
    "wireguard::kernel_backend_carries_pod_traffic_through_the_tunnel",
];

/// The kernel `cargo xtask vm` boots by default: Debian bookworm's `linux-image-amd64`.
pub const DEFAULT_KERNEL: &str = "6.1";

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
    let kernel = kernel::resolve(&args.kernel, &vm_dir)?;
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
    let artifacts = artifacts::build(env, !args.command.is_empty() || args.shell)?;
    let specs: Vec<String> = if !args.tests.is_empty() {
        args.tests.clone()
    } else if args.command.is_empty() && !args.shell {
        DEFAULT_TESTS.iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    };
    let runs = specs
        .iter()
        .map(|s| artifacts::TestRun::parse(s, &artifacts))
        .collect::<anyhow::Result<Vec<_>>>()?;

    cmd::step("vm: initramfs (busybox, strait, tests, modules, tools)");
    let t = Instant::now();
    let initrd = vm_dir.join("initramfs.cpio");
    let size = initramfs::build(&initrd, &vm_dir, &kernel, &artifacts, &runs, args)?;
    println!(
        "vm: {} ({} MiB) in {:.1}s",
        initrd.display(),
        size >> 20,
        t.elapsed().as_secs_f64()
    );

    let accel = match args.accel {
        Accel::Auto if qemu::kvm_usable(&kernel, &vm_dir) => Accel::Kvm,
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
    let outcome = qemu::boot(&kernel, &initrd, args, accel)?;

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
