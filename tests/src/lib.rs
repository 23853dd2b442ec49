//! Harness for strait's privileged tests: real eBPF programs, namespaces, veths and cgroups.
//!
//! Every resource a test creates is owned by a guard that removes it on drop, so cleanup
//! happens on success and on failure (panics unwind through the guards). Names carry the
//! process id and a counter, so parallel or leftover runs never collide. Tests run one at a
//! time (`--test-threads=1`) because they share kernel state such as bpffs.
//!
//! A test that cannot run here (not root, no bpffs, no BTF) fails with the reason: strait's
//! tests never skip silently.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use strait::netns::NetnsGuard;

/// Fails the calling test, with the reason, unless this process can load eBPF programs and
/// create namespaces.
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test needs root (euid is {euid}); run `cargo xtask test` as root"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf")),
        "privileged test needs bpffs mounted (`cargo xtask setup` mounts it at /sys/fs/bpf)"
    );
    assert!(
        Path::new(strait::constants::KERNEL_BTF).exists(),
        "privileged test needs kernel BTF at {}",
        strait::constants::KERNEL_BTF
    );
}

/// A short name unique to this process and call: `<prefix><pid>x<n>` (fits IFNAMSIZ when the
/// prefix is ≤ 4 bytes).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "`ip {}` failed: {status}", args.join(" "));
}

/// A named network namespace (`ip netns add`), deleted on drop with everything inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique_name("st-");
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            let _inside = NetnsGuard::enter(&name).expect("entering the test namespace");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Writes a sysctl inside this namespace (e.g. `net/ipv6/conf/all/disable_ipv6`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = PathBuf::from("/proc/sys").join(key);
        let value = value.to_owned();
        self.run(move || {
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()))
        });
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair with one end in each namespace, addressed and up. Removed with the namespaces.
pub struct VethPair {
    pub a: String,
    pub b: String,
}

impl VethPair {
    /// `addr_a`/`addr_b` in CIDR form, e.g. `198.18.0.1/30`.
    pub fn new(ns_a: &Netns, addr_a: &str, ns_b: &Netns, addr_b: &str) -> Self {
        let a = unique_name("va");
        let b = unique_name("vb");
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            ns_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            ns_b.name(),
        ]);
        for (ns, dev, addr) in [(ns_a, &a, addr_a), (ns_b, &b, addr_b)] {
            ip(&["-n", ns.name(), "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns.name(), "link", "set", dev, "up"]);
        }
        Self { a, b }
    }
}

/// A child cgroup under the cgroup v2 mount (found in /proc/mounts, never assumed), removed on
/// drop after moving any process left in it back to the parent.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let root = cgroup2_mount().unwrap_or_else(|e| panic!("{e:#}"));
        let path = root.join(unique_name("strait-test-"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// The cgroup v2 mount, from /proc/mounts.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .context("no cgroup v2 mount in /proc/mounts")
}

/// Removes a cgroup after moving any process left in it back to the parent (rmdir fails on a
/// populated cgroup).
pub fn remove_cgroup(path: &Path) {
    if let (Some(parent), Ok(procs)) = (
        path.parent(),
        std::fs::read_to_string(path.join("cgroup.procs")),
    ) {
        for pid in procs.lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(path);
}

pub mod cni;
pub mod datapath;
pub mod e2e;
pub mod etcd;

pub mod wireguard;
