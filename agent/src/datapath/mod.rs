//! Loading strait's eBPF object and owning what it puts in the kernel.

pub mod counter;
mod endpoints;
pub mod enforcement;
pub mod flows;
pub mod guard;
pub mod ipcache;
pub mod lb;
pub mod loader;
pub mod mirror;
pub mod pins;
pub mod policy;
pub mod reconciler;
pub mod section;

pub use counter::{CounterRow, CounterSnapshot, PacketCounterProgram};
pub use loader::{Datapath, MapSizes};
pub use pins::PinDir;
pub use reconciler::DatapathAgent;
pub use section::DatapathSection;

/// The eBPF object, built from `agent-ebpf/` by build.rs and embedded with 8-byte alignment
/// (the ELF parser reads it in place).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strait"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this strait binary was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild \
         with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the eBPF object or has the wrong type")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object or has the wrong type")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("adding the clsact qdisc to {iface}: {source}")]
    Qdisc {
        iface: String,
        source: aya::programs::tc::TcError,
    },
    #[error("bpffs pin {path}: {source}")]
    Pin {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("no interface named {0}")]
    NoInterface(String),
    #[error("{0}")]
    Config(String),
    #[error("map {map} is full ({max} entries): raise datapath.mapSizes in the agent config")]
    MapFull { map: &'static str, max: u32 },
    #[error("map {name} was not found at {path}: is the agent running with this pin directory?")]
    NotPinned {
        name: &'static str,
        path: std::path::PathBuf,
    },
}

impl DatapathError {
    /// Wraps a map error, recognising a full map (E2BIG from the kernel's hash maps, ENOSPC
    /// from its LPM tries).
    pub fn map(name: &'static str, max: u32, source: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            return Self::MapFull { map: name, max };
        }
        Self::Map { name, source }
    }
}

/// Adds the clsact qdisc tc programs hang off (needed for netlink tc before kernel 6.6).
pub(crate) fn ensure_clsact(iface: &str) -> Result<(), DatapathError> {
    match aya::programs::tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(())
        }
        Err(source) => Err(DatapathError::Qdisc {
            iface: iface.to_owned(),
            source,
        }),
    }
}

/// Opens a map the agent pinned (for `strait bpf ... list` and other readers).
pub fn open_pinned(pins: &PinDir, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    let path = pins.map(name);
    let data =
        aya::maps::MapData::from_pin(&path).map_err(|_| DatapathError::NotPinned { name, path })?;
    aya::maps::Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

/// Loads the embedded object (maps created, programs not yet loaded into the kernel).
pub fn load_object() -> Result<aya::Ebpf, DatapathError> {
    if EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    Ok(aya::EbpfLoader::new().load(EBPF_OBJECT)?)
}

/// What `strait status` shows about the datapath.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DatapathStatus {
    pub pin_dir: String,
    pub cgroup: String,
    pub services: usize,
    pub backends: usize,
    pub ipcache_entries: usize,
    pub endpoints: usize,
    /// Frontends or prefixes that could not be programmed, with why.
    pub errors: Vec<String>,
    /// Local endpoints a policy selects that the datapath does not enforce, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unenforced: Vec<enforcement::UnenforcedEndpoint>,
}
