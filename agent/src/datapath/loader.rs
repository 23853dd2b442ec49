//! Loading the datapath (maps pinned and sized from config, programs verified) and attaching
//! it: socket LB to a cgroup, policy to pods' host-side interfaces. Links are pinned next to
//! the maps, so the datapath keeps working while the agent is down and a restarted agent
//! replaces programs make-before-break.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, Link as _, PinnedLink},
    },
};
use serde::{Deserialize, Serialize};
use strait_common::{flow, ipcache, lb, names, policy};

use super::{DatapathError, EBPF_OBJECT, ensure_clsact, pins::PinDir};

/// Map sizes (entries). A full map is reported as an error and counted; raise these for very
/// large meshes. A pinned map is reused as it is (the kernel cannot resize a map), so a new
/// size takes effect once the pins are gone: stop the agent, run
/// `strait bpf cleanup --pin-root <pinRoot>`, start the agent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct MapSizes {
    pub lb_services: u32,
    pub lb_backends: u32,
    pub lb_revnat: u32,
    pub sock_revnat: u32,
    pub ipcache: u32,
    pub endpoints: u32,
    pub policy: u32,
    pub conntrack: u32,
    /// Fragmented datagrams in flight (their first fragment's ports).
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            lb_services: lb::DEFAULT_LB_SERVICES_MAX,
            lb_backends: lb::DEFAULT_LB_BACKENDS_MAX,
            lb_revnat: lb::DEFAULT_LB_REVNAT_MAX,
            sock_revnat: lb::DEFAULT_SOCK_REVNAT_MAX,
            ipcache: ipcache::DEFAULT_IPCACHE_MAX,
            endpoints: policy::DEFAULT_ENDPOINTS_MAX,
            policy: policy::DEFAULT_POLICY_MAX,
            conntrack: policy::DEFAULT_CT_MAX,
            fragments: policy::DEFAULT_FRAG_MAX,
        }
    }
}

impl MapSizes {
    fn entries(&self) -> [(&'static str, u32); 9] {
        [
            (names::MAP_LB4_SERVICES, self.lb_services),
            (names::MAP_LB4_BACKENDS, self.lb_backends),
            (names::MAP_LB4_REVNAT, self.lb_revnat),
            (names::MAP_SOCK_REVNAT, self.sock_revnat),
            (names::MAP_IPCACHE, self.ipcache),
            (names::MAP_ENDPOINTS, self.endpoints),
            (names::MAP_POLICY, self.policy),
            (names::MAP_CT, self.conntrack),
            (names::MAP_FRAG, self.fragments),
        ]
    }
}

const SOCK_PROGRAMS: [&str; 4] = [
    names::PROG_SOCK_CONNECT4,
    names::PROG_SOCK_SENDMSG4,
    names::PROG_SOCK_RECVMSG4,
    names::PROG_SOCK_GETPEERNAME4,
];
const POLICY_PROGRAMS: [(&str, TcAttachType); 2] = [
    (names::PROG_POLICY_FROM_POD, TcAttachType::Ingress),
    (names::PROG_POLICY_TO_POD, TcAttachType::Egress),
];

/// The loaded datapath. Without pins (tests, benchmarks) every map is private to this value
/// and every link detaches when it is dropped.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    /// Links that cannot be pinned (netlink tc before kernel 6.6): attached while we live.
    unpinned: Vec<Box<dyn std::any::Any + Send>>,
}

impl Datapath {
    /// Loads the object and verifies every datapath program. With `pins`, maps are reused
    /// from (or created at) the versioned pin directory.
    pub fn load(pins: Option<PinDir>, sizes: &MapSizes) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        for (name, size) in sizes.entries() {
            if size == 0 {
                return Err(DatapathError::Config(format!("map size of {name} is 0")));
            }
            loader.map_max_entries(name, size);
        }
        let map_paths: Vec<(&str, std::path::PathBuf)> = match &pins {
            Some(p) => {
                p.create().map_err(|source| DatapathError::Pin {
                    path: p.dir().to_owned(),
                    source,
                })?;
                names::PINNED_MAPS.iter().map(|n| (*n, p.map(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in SOCK_PROGRAMS {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for (name, _) in POLICY_PROGRAMS {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            pins,
            unpinned: Vec::new(),
        })
    }

    /// Takes a map out of the object (each map has one owner: its writer).
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, DatapathError> {
        self.ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))
    }

    /// Attaches the socket load balancer to every process in `cgroup` (a cgroup v2
    /// directory) and its descendants.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = cgroup_inode(cgroup)?;
        for name in SOCK_PROGRAMS {
            let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let err = |source| DatapathError::Program { name, source };
            // bpf_link attachments to a cgroup always coexist with others (the ALLOW_MULTI
            // flag is for the legacy prog_attach and is rejected by link_create).
            let id = prog
                .attach(file.as_fd(), CgroupAttachMode::Single)
                .map_err(err)?;
            let link = prog.take_link(id).map_err(err)?;
            match FdLink::try_from(link) {
                Ok(fd) => self.keep_pinned(fd, &format!("{name}-cg{cgroup_id}"))?,
                Err(_) => {
                    return Err(DatapathError::Config(
                        "this kernel has no bpf_link for cgroup programs (needs ≥ 5.7)".into(),
                    ));
                }
            }
        }
        tracing::info!(cgroup = %cgroup.display(), "socket load balancer attached");
        Ok(())
    }

    /// Attaches the policy programs to a pod's host-side interface (in the calling thread's
    /// network namespace): tc ingress sees what the pod sends, tc egress what it receives.
    pub fn attach_endpoint(&mut self, iface: &str) -> Result<(), DatapathError> {
        ensure_clsact(iface)?;
        let ifindex = ifindex(iface)?;
        for (name, attach_type) in POLICY_PROGRAMS {
            let prog = program::<SchedClassifier>(&mut self.ebpf, name)?;
            let err = |source| DatapathError::Program { name, source };
            let id = prog.attach(iface, attach_type).map_err(err)?;
            let link = prog.take_link(id).map_err(err)?;
            match FdLink::try_from(link) {
                Ok(fd) => self.keep_pinned(fd, &format!("{name}-if{ifindex}"))?,
                // Netlink tc (kernels before 6.6) links cannot be pinned.
                Err(link) => self.unpinned.push(Box::new(link)),
            }
        }
        Ok(())
    }

    /// Removes the pinned policy links of an interface (a deleted pod's interface takes its
    /// links with it; this clears the pins).
    pub fn detach_endpoint(&mut self, ifindex: u32) {
        if let Some(pins) = &self.pins {
            for (name, _) in POLICY_PROGRAMS {
                let _ = std::fs::remove_file(pins.link(&format!("{name}-if{ifindex}")));
            }
        }
    }

    /// Pins `link` under `pin_name`, replacing (and so detaching) what a previous agent pinned
    /// there: the new program is attached before the old one goes, so nothing is ever
    /// unprotected or untranslated.
    fn keep_pinned(&mut self, link: FdLink, pin_name: &str) -> Result<(), DatapathError> {
        let Some(pins) = &self.pins else {
            self.unpinned.push(Box::new(link));
            return Ok(());
        };
        let path = pins.link(pin_name);
        if let Ok(old) = PinnedLink::from_pin(&path) {
            match old.unpin() {
                Ok(old) => {
                    let _ = old.detach();
                }
                Err(source) => return Err(DatapathError::Pin { path, source }),
            }
        }
        link.pin(&path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(())
    }

    /// Removes pin directories of other schema versions (their links detach with them). Call
    /// after attaching, so traffic is never left without a datapath.
    pub fn remove_stale_versions(&self) {
        let Some(pins) = &self.pins else { return };
        for stale in pins.stale_versions() {
            match super::pins::remove_tree(&stale) {
                Ok(()) => {
                    tracing::info!(dir = %stale.display(), "removed the datapath of another schema version")
                }
                Err(e) => {
                    tracing::warn!(dir = %stale.display(), error = %e, "could not remove an old datapath")
                }
            }
        }
    }

    /// The XDP wrapper of the LB selection, loaded on first use (tests and benchmarks).
    pub fn lb_test_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        let name = names::PROG_LB_TEST;
        let prog = program::<Xdp>(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// A policy classifier (for `BPF_PROG_TEST_RUN`).
    pub fn policy_program(
        &mut self,
        from_pod: bool,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        program::<SchedClassifier>(
            &mut self.ebpf,
            if from_pod {
                names::PROG_POLICY_FROM_POD
            } else {
                names::PROG_POLICY_TO_POD
            },
        )
    }

    /// Flags in the `DP_CONFIG` array (e.g. trace allowed flows).
    pub fn set_config_flags(&mut self, flags: u32) -> Result<(), DatapathError> {
        let name = names::MAP_DP_CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut array = aya::maps::Array::<_, u32>::try_from(map)
            .map_err(|source| DatapathError::Map { name, source })?;
        array
            .set(flow::CONFIG_SLOT_FLAGS, flags, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

fn cgroup_inode(path: &Path) -> Result<u64, DatapathError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| DatapathError::Cgroup {
            path: path.to_owned(),
            source,
        })
}

/// Interface index in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Result<u32, DatapathError> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| DatapathError::Config(format!("bad interface name {iface:?}")))?;
    // SAFETY: valid NUL-terminated string; the call only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DatapathError::NoInterface(iface.to_owned())),
        i => Ok(i),
    }
}
