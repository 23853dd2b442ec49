//! `cargo xtask test`: every gate CI runs, in order, stopping at the first failure.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use crate::cmd::{self, Env};

/// Seconds each fuzz target runs in the gate: a smoke run (crashes the seeds or their first
/// mutations find); the long runs are `cargo xtask fuzz`.
const FUZZ_SECONDS: u64 = 3;

pub fn run(env: &Env, filter: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();

    cmd::step("rustfmt --check (all crates, the eBPF crate included)");
    cmd::run(env.cargo().args(["fmt", "--all", "--check"]))?;

    let scripts = shell_scripts()?;
    cmd::step(&format!("shellcheck: {} shell scripts", scripts.len()));
    cmd::run(Command::new("shellcheck").args(&scripts))?;

    cmd::step("clippy -D warnings: userspace crates (builds the eBPF object from source)");
    cmd::run(env.cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "strait-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    cmd::step("clippy -D warnings: eBPF crate (bpfel-unknown-none)");
    cmd::run(env.ebpf_cargo().args([
        "clippy",
        "-p",
        "strait-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;

    // One cargo invocation for unit and privileged tests: a second one with another package
    // selection would unify features differently and rebuild the agent and its eBPF object.
    // One test at a time: privileged tests share kernel state (bpffs, cgroups).
    cmd::step("tests: unit tests, then privileged tests (real eBPF programs, namespaces, veths)");
    let mut tests = env.cargo();
    tests.args([
        "test",
        "--workspace",
        "--exclude",
        "strait-ebpf",
        "--",
        "--test-threads=1",
    ]);
    if let Some(f) = filter {
        tests.arg(f);
    }
    cmd::run(&mut tests)?;

    if filter.is_none() {
        cmd::step("fuzz: rustfmt --check of fuzz/, then every target briefly");
        cmd::run(
            env.cargo()
                .args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]),
        )?;
        crate::fuzz::run(env, crate::fuzz::TARGETS, FUZZ_SECONDS)?;
    }

    vm_step(env, filter)?;

    println!(
        "\nxtask test: all gates passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The VM tests (`cargo xtask vm` with its defaults: Debian's 6.1 kernel, the VM test list):
/// other verifiers and kernel WireGuard. A test failing there always fails; with CI=true so
/// does a VM that cannot be fetched or booted, elsewhere that is a printed warning.
fn vm_step(env: &Env, filter: Option<&str>) -> anyhow::Result<()> {
    let args = crate::vm::VmArgs::for_ci();
    cmd::step(&format!(
        "VM tests: Linux {} under qemu ({})",
        args.kernel,
        crate::vm::DEFAULT_TESTS.join(", ")
    ));
    if let Some(f) = filter {
        println!("VM tests: not run with --filter {f:?} (run `cargo xtask vm --test ...`)");
        return Ok(());
    }
    let started = Instant::now();
    match crate::vm::run(env, &args) {
        Ok(()) => {
            println!(
                "VM tests: passed in {:.0}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(crate::vm::VmError::Failed(rc)) => {
            anyhow::bail!("VM tests failed (rc={rc}); rerun with `cargo xtask vm`")
        }
        Err(crate::vm::VmError::Broke(e)) => Err(e.context("VM tests failed")),
        Err(crate::vm::VmError::Infra(e)) if std::env::var_os("CI").is_none() => {
            println!("VM tests: WARNING, could not run ({e:#}); with CI=true this fails the run");
            Ok(())
        }
        Err(crate::vm::VmError::Infra(e)) => Err(e.context("VM tests could not run (CI=true)")),
    }
}

/// Tracked files that are shell scripts: `*.sh`, or a `#!` line naming sh or bash.
fn shell_scripts() -> anyhow::Result<Vec<PathBuf>> {
    let root = cmd::workspace_root();
    let listed = cmd::output(Command::new("git").arg("-C").arg(&root).arg("ls-files"))?;
    let is_shell = |path: &Path| {
        let Ok(text) = std::fs::read(path) else {
            return false;
        };
        let first = String::from_utf8_lossy(text.split(|b| *b == b'\n').next().unwrap_or_default());
        first.starts_with("#!")
            && first
                .split(|c: char| c == '/' || c.is_whitespace())
                .any(|word| word == "sh" || word == "bash")
    };
    let scripts: Vec<PathBuf> = listed
        .lines()
        .map(|p| root.join(p))
        .filter(|p| p.extension().is_some_and(|e| e == "sh") || is_shell(p))
        .collect();
    anyhow::ensure!(
        !scripts.is_empty(),
        "no shell scripts found (is this a git checkout?)"
    );
    Ok(scripts)
}
