//! The running mesh: where its pieces live (namespace names, directories, sockets, cgroups),
//! its narration, and the build that brings it all up in order.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::ensure;

use super::{
    Options,
    layout::{CLUSTERS, NODES, NodeDef, PodDef, short},
    resources::Resources,
};
use crate::cgroup2_mount;

/// A running mesh.
pub struct Mesh {
    pub(super) opts: Options,
    /// Short, machine-unique tag for names (the process id).
    pub(super) tag: String,
    pub(super) dir: PathBuf,
    pub(super) cgroup_root: PathBuf,
    pub(super) pin_root: PathBuf,
    pub(super) res: Arc<Mutex<Resources>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.res.lock().unwrap_or_else(|e| e.into_inner()).cleanup();
    }
}

impl Mesh {
    pub(super) fn res(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.res.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The resources, for a Ctrl-C handler to clean up.
    pub fn resources(&self) -> Arc<Mutex<Resources>> {
        self.res.clone()
    }

    pub(super) fn say(&self, text: &str) {
        if self.opts.narrate {
            println!("{text}");
        }
    }

    pub(super) fn progress(&self, text: &str) {
        println!("    {text}");
    }

    pub(super) fn ns(&self, member: &str) -> String {
        format!("se{}-{member}", self.tag)
    }

    pub(super) fn router(&self) -> String {
        self.ns("router")
    }

    pub(super) fn cp_ns(&self, cluster: &str) -> String {
        self.ns(&format!("cp-{}", short(cluster)))
    }

    pub(super) fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    pub(super) fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.dir.join(short(cluster))
    }

    pub(super) fn api_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("api.sock")
    }

    pub(super) fn wg_device(&self, node: &NodeDef) -> String {
        format!("wg{}{}", self.tag, node.tag)
    }

    pub(super) fn pod_cgroup(&self, pod: &PodDef) -> PathBuf {
        self.cgroup_root.join(pod.node).join(pod.name)
    }

    pub(super) fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Builds the whole mesh and waits until it is up.
    pub fn build(opts: Options, res: Arc<Mutex<Resources>>) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the scenario needs root (namespaces, eBPF, cgroups)"
        );
        ensure!(
            opts.strait.exists(),
            "strait binary {} missing",
            opts.strait.display()
        );
        for tool in ["/usr/bin/etcd", "/usr/bin/etcdctl", "/usr/bin/wireguard-go"] {
            ensure!(
                Path::new(tool).exists(),
                "{tool} missing: run `cargo xtask setup`"
            );
        }
        let tag = (std::process::id() % 100_000).to_string();
        let dir = std::env::temp_dir().join(format!("strait-e2e-{tag}"));
        let cgroup_root = cgroup2_mount()?.join(format!("strait-e2e-{tag}"));
        let pin_root =
            PathBuf::from(strait::constants::BPFFS_ROOT).join(format!("strait-e2e-{tag}"));
        let mesh = Self {
            opts,
            tag,
            dir: dir.clone(),
            cgroup_root: cgroup_root.clone(),
            pin_root: pin_root.clone(),
            res,
        };
        {
            let mut res = mesh.res();
            res.dirs.push(dir.clone());
            res.pin_root = Some(pin_root.clone());
        }
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(&pin_root)?;
        mesh.add_cgroup(cgroup_root)?;
        mesh.underlay()?;
        mesh.pods()?;
        for c in &CLUSTERS {
            mesh.control_plane(c.name, c.cp_link)?;
        }
        mesh.manifests()?;
        for c in &CLUSTERS {
            mesh.say(&format!(
                "    {}: strait kvstoremesh --cluster-id {} (mirrors the other cluster's etcd into \
                 its own, exports its global services)",
                c.name, c.id
            ));
            mesh.start_kvstoremesh(c.name, Some(c.id))?;
        }
        for n in &NODES {
            mesh.write_agent_config(n)?;
            mesh.start_agent(n.name)?;
        }
        Ok(mesh)
    }
}

pub(super) fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
