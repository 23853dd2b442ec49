//! Where the datapath lives on bpffs: `<pin root>/strait-v<schema>/{maps,links}/…`. The schema
//! version in the name keeps an agent from ever reusing maps written with another layout;
//! directories of other versions are removed once the new datapath is attached. And who holds
//! those pins open (`strait bpf cleanup` refuses while a process does).

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use crate::constants;

#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
    dir: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let dir = root.join(constants::pin_dir_name());
        Self { root, dir }
    }

    /// The versioned directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.dir.join("maps"))?;
        std::fs::create_dir_all(self.dir.join("links"))
    }

    /// Versioned directories of other schema versions under the same root.
    pub fn stale_versions(&self) -> Vec<PathBuf> {
        let mut dirs = versioned_dirs(&self.root);
        dirs.retain(|d| *d != self.dir);
        dirs
    }

    /// Removes every pin (which detaches pinned links no process holds) of this version.
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.dir)
    }
}

/// strait's pin directories under `root`, of every schema version (`strait-v*`), sorted.
pub fn versioned_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("strait-v"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// A process holding one of strait's pinned maps open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its `comm`.
    pub command: String,
    /// One pinned map it holds.
    pub map: PathBuf,
}

/// Processes other than this one holding open a map pinned under `dirs` (a running agent
/// holds every map of its datapath), one entry per process. Found by map ID: each pin's ID
/// from the kernel, each process's map descriptors' IDs from `/proc/<pid>/fdinfo`. Processes
/// this one may not inspect are not seen.
pub fn holders(dirs: &[PathBuf]) -> Vec<Holder> {
    let pinned: HashMap<u32, PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d.join("maps")).ok())
        .flatten()
        .flatten()
        .filter_map(|e| {
            let info = aya::maps::MapInfo::from_pin(e.path()).ok()?;
            Some((info.id(), e.path()))
        })
        .collect();
    if pinned.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc = entry.path();
        let held = std::fs::read_dir(proc.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf-map")
            })
            .find_map(|fd| {
                let info =
                    std::fs::read_to_string(proc.join("fdinfo").join(fd.file_name())).ok()?;
                let id = info
                    .lines()
                    .find_map(|l| l.strip_prefix("map_id:"))?
                    .trim()
                    .parse::<u32>()
                    .ok()?;
                pinned.get(&id).cloned()
            });
        if let Some(map) = held {
            let command = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
            out.push(Holder {
                pid,
                command: command.trim().to_owned(),
                map,
            });
        }
    }
    out
}

/// Removes a pin tree. bpffs supports unlink and rmdir, which is all this needs.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
