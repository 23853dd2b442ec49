//! The network namespace the WireGuard device and its routes live in, held open as a file so
//! any thread (tokio workers, the blocking pool) can enter it for the duration of a netlink
//! call, and child processes can be started inside it.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::netns::{NetnsError, NetnsGuard};

/// A handle on one network namespace. Cheap to clone.
#[derive(Clone)]
pub struct TargetNetns {
    file: Arc<File>,
    label: Arc<str>,
}

impl std::fmt::Debug for TargetNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "netns {}", self.label)
    }
}

impl std::fmt::Display for TargetNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

impl TargetNetns {
    /// The namespace of the calling thread (not of the process: `setns` is per thread, and
    /// callers run inside a namespace by entering it on their own thread).
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"), "current")
    }

    /// A namespace file such as `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub fn from_path(path: &Path) -> Result<Self, NetnsError> {
        Self::open(path, &path.display().to_string())
    }

    /// `path` when given, else the calling thread's namespace.
    pub fn from_config(path: Option<&Path>) -> Result<Self, NetnsError> {
        match path {
            Some(p) => Self::from_path(p),
            None => Self::current(),
        }
    }

    fn open(path: &Path, label: &str) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file: Arc::new(file),
            label: label.into(),
        })
    }

    /// Moves the calling thread into the namespace until the guard drops. The section must not
    /// yield to an async runtime.
    pub fn enter(&self) -> Result<NetnsGuard, NetnsError> {
        NetnsGuard::enter_path(&self.fd_path())
    }

    /// The open namespace file's descriptor, e.g. for `setns` in a child before `exec`.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn fd_path(&self) -> PathBuf {
        // The descriptor belongs to the process, so this path is valid from every thread.
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}
