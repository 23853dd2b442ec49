//! `cargo xtask test`: every gate CI runs, in order, stopping at the first failure.

use std::time::Instant;

use crate::cmd::{self, Env};

pub fn run(env: &Env, filter: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();

    cmd::step("rustfmt --check (all crates, the eBPF crate included)");
    cmd::run(env.cargo().args(["fmt", "--all", "--check"]))?;

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

    println!(
        "\nxtask test: all gates passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
