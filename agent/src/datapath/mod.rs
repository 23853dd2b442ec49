//! Loading strait's eBPF object and owning what it puts in the kernel.

pub mod counter;

pub use counter::{CounterRow, CounterSnapshot, PacketCounterProgram};

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
}

/// Loads the embedded object (maps created, programs not yet loaded into the kernel).
pub fn load_object() -> Result<aya::Ebpf, DatapathError> {
    if EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoObject);
    }
    Ok(aya::EbpfLoader::new().load(EBPF_OBJECT)?)
}
