//! Which kernel modules go into the VM, in load order, and their decompressed bytes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Modules loaded in the VM (with their dependencies, in load order); built-in ones are
/// skipped. tc on kernels before 6.6 needs clsact (`sch_ingress`) and `cls_bpf`.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "wireguard"];

/// The modules to load, dependencies first, as (name, file). Reads `depends=` from each
/// module's modinfo, so nothing is written next to the modules (they may be the host's).
pub(super) fn module_plan(modules_dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
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
pub(super) fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_depends() {
        let name = |p: &str| module_name(Path::new(p));
        assert_eq!(
            name("kernel/net/wireguard/wireguard.ko.xz").as_deref(),
            Some("wireguard")
        );
        assert_eq!(
            name("kernel/net/sched/cls-bpf.ko").as_deref(),
            Some("cls_bpf")
        );
        assert_eq!(name("modules.builtin"), None);

        let modinfo = b"\x7fELF...\0license=GPL\0depends=udp_tunnel,ip6-udp-tunnel\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(modinfo), ["udp_tunnel", "ip6_udp_tunnel"]);
        assert!(modinfo_depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }
}
