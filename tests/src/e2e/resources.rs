//! The record of everything the scenario created, so that one call removes it all: at the end,
//! on failure (the mesh's drop) and on Ctrl-C (the binary's handler).

use std::{
    path::PathBuf,
    process::{Child, Command},
};

use super::processes::{stop_child, stop_wireguard_go};
use crate::{
    datapath::{BackendServer, EchoServer},
    remove_cgroup,
};

/// Everything the scenario created, removed once by [`Resources::cleanup`].
#[derive(Default)]
pub struct Resources {
    /// Processes by name (agents, etcds, kvstoremeshes, captures), started with
    /// PR_SET_PDEATHSIG so even a killed harness takes them along.
    pub(super) procs: Vec<(String, Child)>,
    /// WireGuard device names: a wireguard-go serving one of them is ended by the PID its UAPI
    /// socket reports (an agent restarted after SIGKILL adopts the old one and leaves it).
    pub(super) wg_devices: Vec<String>,
    /// Network namespaces, deleted last-created first.
    pub(super) netns: Vec<String>,
    /// cgroups, removed deepest first.
    pub(super) cgroups: Vec<PathBuf>,
    /// bpffs directory holding every agent's pins.
    pub(super) pin_root: Option<PathBuf>,
    /// The work directory (configs, manifests, logs, etcd data).
    pub(super) dirs: Vec<PathBuf>,
    /// Servers running as threads inside pod namespaces.
    pub(super) servers: Vec<Server>,
    cleaned: bool,
}

pub(super) enum Server {
    Backend(#[allow(dead_code)] BackendServer),
    Echo(#[allow(dead_code)] EchoServer),
}

impl Resources {
    /// Removes everything; idempotent.
    pub fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        for (_, child) in self.procs.iter_mut().rev() {
            stop_child(child, libc::SIGTERM);
        }
        self.procs.clear();
        for dev in self.wg_devices.drain(..) {
            stop_wireguard_go(&dev);
        }
        self.servers.clear();
        for ns in self.netns.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Some(pins) = self.pin_root.take() {
            let _ = std::fs::remove_dir_all(&pins);
        }
        for cg in self.cgroups.drain(..).rev() {
            remove_cgroup(&cg);
        }
        for dir in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
