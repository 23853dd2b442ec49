//! The packet-counter classifier: attach to an interface, read per-protocol counters.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType},
};
use serde::Serialize;
use strait_common::{Direction, PacketClass, PacketCounter, counter_index, names};

use super::{DatapathError, ensure_clsact, load_object};

/// Owns the loaded counter programs and their map. Dropping it detaches every link it made.
pub struct PacketCounterProgram {
    ebpf: Ebpf,
}

impl PacketCounterProgram {
    /// Loads the object and both classifiers into the kernel (verifier runs here).
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = load_object()?;
        for name in [names::PROG_COUNT_INGRESS, names::PROG_COUNT_EGRESS] {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    /// The classifier for one direction, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program_mut(
        &mut self,
        direction: Direction,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, program_name(direction))
    }

    /// Attaches ingress and egress classifiers to `iface` in the calling thread's network
    /// namespace (see [`crate::netns::NetnsGuard`]).
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        ensure_clsact(iface)?;
        for direction in Direction::ALL {
            let attach_type = match direction {
                Direction::Ingress => TcAttachType::Ingress,
                Direction::Egress => TcAttachType::Egress,
            };
            let name = program_name(direction);
            self.program_mut(direction)?
                .attach(iface, attach_type)
                .map_err(|source| DatapathError::Program { name, source })?;
            tracing::info!(
                iface,
                direction = direction.as_str(),
                program = name,
                "attached"
            );
        }
        Ok(())
    }

    /// Reads every counter slot, summed over CPUs.
    pub fn snapshot(&self) -> Result<CounterSnapshot, DatapathError> {
        let name = names::MAP_PACKET_COUNTERS;
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let array = PerCpuArray::<_, PacketCounter>::try_from(map)
            .map_err(|source| DatapathError::Map { name, source })?;
        let mut rows = Vec::with_capacity(Direction::ALL.len() * PacketClass::ALL.len());
        for direction in Direction::ALL {
            for class in PacketClass::ALL {
                let per_cpu = array
                    .get(&counter_index(direction, class), 0)
                    .map_err(|source| DatapathError::Map { name, source })?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                rows.push(CounterRow {
                    direction: direction.as_str(),
                    class: class.as_str(),
                    packets,
                    bytes,
                });
            }
        }
        Ok(CounterSnapshot { rows })
    }
}

fn program_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => names::PROG_COUNT_INGRESS,
        Direction::Egress => names::PROG_COUNT_EGRESS,
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

/// TCX (kernel ≥ 6.6) needs no qdisc; older kernels attach through clsact, which may exist
/// already.
/// Counters read at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct CounterSnapshot {
    pub rows: Vec<CounterRow>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CounterRow {
    pub direction: &'static str,
    pub class: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

impl CounterSnapshot {
    /// Packets counted for one direction and class.
    pub fn packets(&self, direction: Direction, class: PacketClass) -> u64 {
        self.row(direction, class).map_or(0, |r| r.packets)
    }

    pub fn row(&self, direction: Direction, class: PacketClass) -> Option<&CounterRow> {
        self.rows
            .iter()
            .find(|r| r.direction == direction.as_str() && r.class == class.as_str())
    }
}

impl std::fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<9} {:<11} {:>10} {:>12}",
            "DIRECTION", "CLASS", "PACKETS", "BYTES"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<9} {:<11} {:>10} {:>12}",
                r.direction, r.class, r.packets, r.bytes
            )?;
        }
        Ok(())
    }
}
