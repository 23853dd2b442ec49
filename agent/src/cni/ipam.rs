//! Address allocations from the node's pod CIDR, kept on disk so they survive restarts of the
//! plugin and the node: one file per allocated address (named by the address, holding
//! `<container id>\n<ifname>`) in `<data dir>/<network name>/`, like host-local. Every
//! operation holds an exclusive `flock` on the directory's lock file: runtimes call plugins
//! for different containers in parallel.

use std::{
    fs::{self, File},
    io::Write as _,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

use super::spec::{Attachment, CniError, code};

const LOCK_FILE: &str = "lock";
/// The last address handed out, so addresses are not reused right after release.
const LAST_FILE: &str = "last_reserved_ip";

/// One allocation: the address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

pub struct Store {
    dir: PathBuf,
    pool: Ipv4Net,
}

/// Held while the directory is locked.
pub struct Locked<'a> {
    store: &'a Store,
    _lock: File,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::new(
        code::IO,
        format!("{what} {}", path.display()),
        e.to_string(),
    )
}

impl Store {
    pub fn new(data_dir: &Path, network: &str, pool: Ipv4Net) -> Self {
        Self {
            dir: data_dir.join(network),
            pool: pool.trunc(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The gateway the pods route through: the pool's first address, never handed out.
    pub fn gateway(&self) -> Ipv4Addr {
        self.pool.hosts().next().unwrap_or(self.pool.network())
    }

    pub fn lock(&self) -> Result<Locked<'_>, CniError> {
        fs::create_dir_all(&self.dir).map_err(|e| io_err("creating", &self.dir, e))?;
        let path = self.dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        // SAFETY: plain syscall on an open fd; the lock goes with the fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("locking", &path, std::io::Error::last_os_error()));
        }
        Ok(Locked {
            store: self,
            _lock: file,
        })
    }
}

impl Locked<'_> {
    /// Every allocation in the store (files that are not addresses are skipped).
    pub fn list(&self) -> Result<Vec<Allocation>, CniError> {
        let dir = &self.store.dir;
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))? {
            let entry = entry.map_err(|e| io_err("reading", dir, e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            out.push(Allocation {
                ip,
                container_id: lines.next().unwrap_or_default().trim().to_owned(),
                ifname: lines.next().unwrap_or_default().trim().to_owned(),
            });
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The attachment's address: the one it already holds, or the next free one.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr, CniError> {
        let taken = self.list()?;
        if let Some(a) = taken
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        {
            return Ok(a.ip);
        }
        let pool = self.store.pool;
        let gateway = self.store.gateway();
        let last: Option<Ipv4Addr> = fs::read_to_string(self.store.dir.join(LAST_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let candidates: Vec<Ipv4Addr> = pool.hosts().filter(|ip| *ip != gateway).collect();
        // Start after the last one handed out, wrapping around.
        let start = last
            .and_then(|l| candidates.iter().position(|c| *c == l))
            .map_or(0, |i| i + 1);
        let free = (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .find(|ip| !taken.iter().any(|a| a.ip == *ip));
        let Some(ip) = free else {
            return Err(CniError::new(
                code::POOL_EXHAUSTED,
                format!("no free address in pod CIDR {pool}"),
                format!(
                    "{} of {} addresses allocated",
                    taken.len(),
                    candidates.len()
                ),
            ));
        };
        let path = self.store.dir.join(ip.to_string());
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err("creating", &path, e))?;
        file.write_all(format!("{container_id}\n{ifname}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                let _ = fs::remove_file(&path);
                io_err("writing", &path, e)
            })?;
        let last = self.store.dir.join(LAST_FILE);
        fs::write(&last, ip.to_string()).map_err(|e| io_err("writing", &last, e))?;
        Ok(ip)
    }

    /// The attachment's allocation, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Allocation>, CniError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname))
    }

    /// Frees the attachment's addresses; nothing to free is fine (DEL is idempotent).
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        for a in self.list()? {
            if a.container_id == container_id && a.ifname == ifname {
                self.remove(a.ip)?;
            }
        }
        Ok(())
    }

    fn remove(&self, ip: Ipv4Addr) -> Result<(), CniError> {
        let path = self.store.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path, e)),
        }
    }

    /// Allocations not in `valid` (GC's input), which GC then releases.
    pub fn stale(&self, valid: &[Attachment]) -> Result<Vec<Allocation>, CniError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|a| {
                !valid
                    .iter()
                    .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
            })
            .collect())
    }

    pub fn release_allocation(&self, a: &Allocation) -> Result<(), CniError> {
        self.remove(a.ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, cidr: &str) -> Store {
        Store::new(dir, "strait", cidr.parse().unwrap())
    }

    #[test]
    fn allocations_skip_the_gateway_survive_reopening_and_exhaust() {
        let tmp = tempfile::tempdir().unwrap();
        // A /29: 6 hosts, one the gateway.
        let s = store(tmp.path(), "10.9.0.0/29");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(
                s.lock()
                    .unwrap()
                    .allocate(&format!("c{i}"), "eth0")
                    .unwrap(),
            );
        }
        assert!(!got.contains(&s.gateway()), "{got:?}");
        assert_eq!(got[0], Ipv4Addr::new(10, 9, 0, 2));
        // Asking again for the same attachment gives the same address.
        assert_eq!(s.lock().unwrap().allocate("c0", "eth0").unwrap(), got[0]);
        // A new store over the same directory (a restart) sees the same allocations.
        let again = store(tmp.path(), "10.9.0.0/29");
        let e = again.lock().unwrap().allocate("c9", "eth0").unwrap_err();
        assert_eq!(e.code, code::POOL_EXHAUSTED, "{e}");
        again.lock().unwrap().release("c3", "eth0").unwrap();
        again.lock().unwrap().release("c3", "eth0").unwrap();
        assert_eq!(
            again.lock().unwrap().allocate("c9", "eth0").unwrap(),
            got[3]
        );
    }

    #[test]
    fn released_addresses_are_not_reused_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path(), "10.9.0.0/24");
        let a = s.lock().unwrap().allocate("a", "eth0").unwrap();
        s.lock().unwrap().release("a", "eth0").unwrap();
        let b = s.lock().unwrap().allocate("b", "eth0").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn stale_is_everything_not_listed_valid() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path(), "10.9.0.0/24");
        let l = s.lock().unwrap();
        l.allocate("keep", "eth0").unwrap();
        l.allocate("drop", "eth0").unwrap();
        l.allocate("keep", "eth1").unwrap();
        let valid = [Attachment {
            container_id: "keep".into(),
            ifname: "eth0".into(),
        }];
        let stale: Vec<(String, String)> = l
            .stale(&valid)
            .unwrap()
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        assert_eq!(
            stale,
            [
                ("drop".into(), "eth0".into()),
                ("keep".into(), "eth1".into())
            ]
        );
    }
}
