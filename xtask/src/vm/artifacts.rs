//! strait and the privileged test binaries, built on the host, and the test selections run
//! with them.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use anyhow::bail;

use crate::cmd::{self, Env};

pub(super) struct Artifacts {
    pub(super) strait: Option<PathBuf>,
    /// Integration test target name (`counter`) → executable.
    pub(super) tests: BTreeMap<String, PathBuf>,
    /// strait-tests' own binaries (`sockprobe`...): tests run them from next to themselves.
    pub(super) helpers: BTreeMap<String, PathBuf>,
}

/// One `cargo test --no-run` with the same package selection as `cargo xtask test` (so
/// nothing is rebuilt there or here), reading the executables from cargo's JSON messages.
pub(super) fn build(env: &Env, with_agent: bool) -> anyhow::Result<Artifacts> {
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
pub(super) struct TestRun {
    pub(super) label: String,
    pub(super) target: String,
    pub(super) args: Vec<String>,
}

impl TestRun {
    pub(super) fn parse(spec: &str, artifacts: &Artifacts) -> anyhow::Result<Self> {
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
