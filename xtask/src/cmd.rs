//! Running commands with the environment setup decided on.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// What `setup` found, needed by every later step.
#[derive(Debug, Clone)]
pub struct Env {
    /// Directory holding `bpf-linker`, put first on PATH for builds.
    pub bin_dir: PathBuf,
    /// rustup toolchain used for the eBPF crate (`nightly`, or `stable` with RUSTC_BOOTSTRAP).
    pub ebpf_toolchain: String,
}

impl Env {
    /// A `cargo` command (the workspace's default toolchain) that finds bpf-linker.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        self.apply(&mut cmd);
        cmd.current_dir(workspace_root());
        cmd
    }

    /// A `cargo` command on the eBPF toolchain, for the eBPF crate itself.
    pub fn ebpf_cargo(&self) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &self.ebpf_toolchain, "cargo"]);
        self.apply(&mut cmd);
        // rustup run sets its own toolchain; a CARGO/RUSTC from the outer cargo would win.
        for key in ["CARGO", "RUSTC", "RUSTDOC", "RUSTC_WORKSPACE_WRAPPER"] {
            cmd.env_remove(key);
        }
        cmd.current_dir(workspace_root());
        cmd
    }

    fn apply(&self, cmd: &mut Command) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin_dir.clone()];
        paths.extend(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries are valid"),
        );
        cmd.env("STRAIT_EBPF_TOOLCHAIN", &self.ebpf_toolchain);
        if self.ebpf_toolchain != "nightly" {
            // -Z build-std on a stable toolchain (toolchain.md).
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cmd`, streaming its output; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is passed through.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{} failed ({})", describe(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Prints a step header so long runs show where they are.
pub fn step(title: &str) {
    println!("\n==> {title}");
}

pub fn build_agent(env: &Env, release: bool) -> anyhow::Result<()> {
    step("building strait (the eBPF object is built from source by agent/build.rs)");
    let mut cmd = env.cargo();
    cmd.args(["build", "-p", "strait"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Path of the built `strait` binary.
pub fn strait_bin(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target
        .join(if release { "release" } else { "debug" })
        .join("strait")
}
