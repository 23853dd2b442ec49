//! What goes into the initramfs: busybox, strait, the tests and their helpers, host tools
//! with their shared libraries, kernel modules and `/init`.

use std::{
    collections::BTreeSet,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{
    VmArgs,
    artifacts::{Artifacts, TestRun},
    init::init_script,
    kernel::Kernel,
    modules::{module_plan, read_module},
    tree::{Source, Tree},
};
use crate::cmd;

/// Host tools the tests call, copied with the shared libraries `ldd` lists.
const TOOLS: &[&str] = &["ip", "wg", "tcpdump", "ping"];

/// Writes the initramfs to `out`; returns its size in bytes.
pub(super) fn build(
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
    fs.write_cpio(&mut w)?;
    w.flush()?;
    Ok(std::fs::metadata(out)?.len())
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
