//! Where the datapath lives on bpffs: `<pin root>/strait-v<schema>/{maps,links}/…`. The schema
//! version in the name keeps an agent from ever reusing maps written with another layout;
//! directories of other versions are removed once the new datapath is attached.

use std::{
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
        let prefix = "strait-v";
        let own = constants::pin_dir_name();
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(prefix) && *name != own
            })
            .map(|e| e.path())
            .collect()
    }

    /// Removes every pin (which detaches pinned links no process holds) of this version.
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.dir)
    }
}

/// Removes a pin tree. bpffs supports unlink and rmdir, which is all this needs.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
