//! Entering a named network namespace for the duration of a synchronous section.
//!
//! `setns(2)` changes only the calling thread, so everything between [`NetnsGuard::enter`] and
//! the guard's drop must run on that thread without yielding to an async runtime. Kernel
//! objects created inside (tc links, sockets) stay bound to the namespace after we leave it.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::constants::NETNS_RUN_DIR;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {path} failed: {source}")]
    Setns {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// While alive, the current thread is inside another network namespace; dropping it returns
/// the thread to the namespace it came from.
#[must_use = "the thread leaves the namespace when the guard is dropped"]
pub struct NetnsGuard {
    original: File,
}

impl NetnsGuard {
    /// Enters the namespace `name` as created by `ip netns add`.
    pub fn enter(name: &str) -> Result<Self, NetnsError> {
        Self::enter_path(&Path::new(NETNS_RUN_DIR).join(name))
    }

    /// Enters the namespace whose nsfs file is `path` (e.g. `/proc/<pid>/ns/net`).
    pub fn enter_path(path: &Path) -> Result<Self, NetnsError> {
        let self_ns = Path::new("/proc/thread-self/ns/net");
        let original = File::open(self_ns).map_err(|source| NetnsError::Open {
            path: self_ns.to_path_buf(),
            source,
        })?;
        let target = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        setns(&target).map_err(|source| NetnsError::Setns {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // A thread stuck in the wrong namespace would send traffic from the wrong place:
            // better to stop the process than to continue.
            tracing::error!(error = %e, "cannot return to the original network namespace");
            std::process::abort();
        }
    }
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open fd.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
