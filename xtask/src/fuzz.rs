//! `cargo xtask fuzz [TARGET] [--seconds N]`: libFuzzer runs of the decoders of untrusted
//! input. The targets live in `fuzz/` (a workspace of its own, built by cargo-fuzz on the
//! nightly toolchain, so its flags never reach a normal build); seeds in `fuzz/seeds/<target>`
//! come from the project's fixtures, the growing corpus and any crash in `<target dir>/fuzz/`.

use std::{path::PathBuf, process::Stdio, time::Instant};

use anyhow::{Context as _, bail};

use crate::cmd::{self, Env};

/// Every target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "kv_node",
    "kv_service",
    "kv_identity",
    "kv_ipcache",
    "kv_cluster_config",
    "kv_keys",
    "gonet_cidr",
    "identity_labels",
    "k8s_manifests",
    "policy_translate",
    "agent_config",
    "flow_records",
];

const TARGET_HELP: &str = "Targets:
  kv_node            remote/local node values through validation and KindSync
  kv_service         remote global services through validation and KindSync
  kv_identity        identity keys and label lists through validation and KindSync
  kv_ipcache         ipcache entries through validation, KindSync and ownership
  kv_cluster_config  remote cluster configs
  kv_keys            etcd keys: state/cache forms, canaries, suffixes, KVStoreMesh mirroring
  gonet_cidr         Go net.IP / IPMask / cidr.CIDR JSON forms
  identity_labels    identity label strings, the label filter, selectors
  k8s_manifests      Kubernetes manifests and what is derived from them
  policy_translate   CNP/CCNP documents and their translation
  agent_config       the agent's YAML configuration
  flow_records       raw ring-buffer flow events

A crash stops the run with the input saved under <target dir>/fuzz/artifacts/<target>/;
replay it with `cargo +nightly fuzz run -O -a -s none --fuzz-dir fuzz <target> <file>`.";

#[derive(Debug, clap::Args)]
#[command(after_help = TARGET_HELP)]
pub struct FuzzArgs {
    /// The target to run; every target, one after the other, when omitted.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS.iter().copied()))]
    pub target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// List the targets and exit.
    #[arg(long)]
    pub list: bool,
}

/// What one run did.
#[derive(Debug)]
pub struct RunStats {
    pub target: String,
    pub seconds: u64,
    pub execs: u64,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace_root().join("target"))
}

/// `cargo fuzz <sub>` on the eBPF toolchain (nightly, or stable with RUSTC_BOOTSTRAP).
/// Always the same build flags, so building and running share one build: release with debug
/// assertions and overflow checks, no sanitizer (the decoders are safe Rust: what is looked
/// for is panics, overflows, failed invariants, hangs and runaway memory).
fn cargo_fuzz(env: &Env, sub: &str) -> std::process::Command {
    let mut c = env.ebpf_cargo();
    c.args(["fuzz", sub, "-O", "-a", "-s", "none", "--fuzz-dir"])
        .arg(cmd::workspace_root().join("fuzz"))
        // The agent's build script would build the eBPF object; the targets never load it.
        .env("AYA_BUILD_SKIP", "1");
    c
}

/// `--list`: needs no set-up.
pub fn main_list() {
    println!("{TARGET_HELP}");
}

pub fn main(env: &Env, args: &FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let stats = run(env, &targets, args.seconds)?;
    for s in &stats {
        println!(
            "fuzz: {:<18} {:>10} runs in {:>4} s, no crash",
            s.target, s.execs, s.seconds
        );
    }
    Ok(())
}

/// Builds the targets, then runs each for `seconds`; fails on the first crash.
pub fn run(env: &Env, targets: &[&str], seconds: u64) -> anyhow::Result<Vec<RunStats>> {
    let started = Instant::now();
    cmd::step("fuzz: building the targets (cargo-fuzz, nightly)");
    cmd::run(&mut cargo_fuzz(env, "build")).context("building the fuzz targets")?;
    println!("fuzz: built in {:.0}s", started.elapsed().as_secs_f64());
    let root = target_dir().join("fuzz");
    let mut stats = Vec::new();
    for target in targets {
        let corpus = root.join("corpus").join(target);
        let artifacts = root.join("artifacts").join(target);
        let log = root.join(format!("{target}.log"));
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let seeds = cmd::workspace_root().join("fuzz/seeds").join(target);
        cmd::step(&format!("fuzz: {target} for {seconds}s"));
        let mut c = cargo_fuzz(env, "run");
        c.arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A slow or huge input is a finding (a remote could send it), not a wait.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stderr(Stdio::from(
                std::fs::File::create(&log)
                    .with_context(|| format!("creating {}", log.display()))?,
            ));
        let status = c.status().with_context(|| format!("starting {target}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} failed ({status}); input in {}, log in {}",
                artifacts.display(),
                log.display()
            );
        }
        // libFuzzer's last words: "Done 123456 runs in 10 second(s)".
        let (execs, ran) = text
            .lines()
            .rev()
            .find_map(|l| {
                let rest = l.strip_prefix("Done ")?;
                let (runs, rest) = rest.split_once(" runs in ")?;
                let secs = rest.split_whitespace().next()?;
                Some((runs.parse().ok()?, secs.parse().ok()?))
            })
            .with_context(|| format!("{target}: no libFuzzer summary in {}", log.display()))?;
        println!("fuzz: {target}: {execs} runs in {ran} s, no crash");
        stats.push(RunStats {
            target: target.to_string(),
            seconds: ran,
            execs,
        });
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_file_is_listed_with_help_and_seeds() {
        let dir = cmd::workspace_root().join("fuzz/fuzz_targets");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".rs").unwrap().to_owned()
            })
            .collect();
        files.sort();
        let mut listed: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        listed.sort();
        assert_eq!(files, listed);
        for t in TARGETS {
            assert!(
                TARGET_HELP.contains(&format!("\n  {t} ")),
                "{t} missing in the help"
            );
            let seeds = cmd::workspace_root().join("fuzz/seeds").join(t);
            assert!(
                std::fs::read_dir(&seeds).unwrap().count() > 0,
                "{t} has no seeds"
            );
        }
    }
}
