//! Flow events from the datapath's ring buffer, decoded and enriched for `strait observe`,
//! plus the per-CPU drop counters.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use serde::{Deserialize, Serialize};
use strait_common::{
    flow::{DropReason, FLOW_FLAG_REMOTE_UNKNOWN, FlowEvent, VERDICT_DROPPED},
    names,
    policy::DIR_INGRESS,
};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use super::DatapathError;

/// One side of a flow, with what the agent knows about its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub address: SocketAddrV4,
    pub identity: u32,
    /// Cluster name, when the identity (or the local endpoint) tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Identity labels (Cilium form, `k8s:app=frontend`), when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// A decoded flow event, modelled on Hubble's flow (source, destination, verdict, reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339 wall-clock time.
    pub time: String,
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// `ingress` / `egress`, from the local pod's point of view.
    pub traffic_direction: String,
    pub protocol: String,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// Host-side ifindex of the local endpoint.
    pub endpoint: u32,
    /// The remote address was unknown to the ipcache and treated as `world`: it may belong
    /// to a cluster not synced yet.
    #[serde(default)]
    pub remote_unknown: bool,
}

impl std::fmt::Display for FlowRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer = |p: &FlowPeer| {
            let mut s = format!("{} (ID:{}", p.address, p.identity);
            if let Some(c) = &p.cluster {
                s.push_str(&format!(" {c}"));
            }
            let app: Vec<&str> = p
                .labels
                .iter()
                .filter(|l| !l.contains("io.cilium.") && !l.contains("io.kubernetes."))
                .map(String::as_str)
                .collect();
            if !app.is_empty() {
                s.push_str(&format!(" {}", app.join(",")));
            }
            s.push(')');
            s
        };
        write!(
            f,
            "{}: {} -> {} {} {} {}",
            self.time,
            peer(&self.source),
            peer(&self.destination),
            self.protocol,
            self.traffic_direction,
            self.verdict
        )?;
        if let Some(r) = &self.drop_reason {
            write!(f, " ({r})")?;
        }
        if self.remote_unknown {
            write!(f, " [remote not in ipcache: treated as world]")?;
        }
        Ok(())
    }
}

/// Looks up what the agent knows about an identity: (cluster name, labels).
pub type IdentityLookup = Arc<dyn Fn(u32) -> (Option<String>, Vec<String>) + Send + Sync>;

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        other => format!("proto-{other}"),
    }
}

/// Size of one raw flow event in the ring buffer.
pub const EVENT_SIZE: usize = std::mem::size_of::<FlowEvent>();

/// The event in one ring-buffer record; `None` when the record is too short (bytes past the
/// event are ignored).
pub fn parse_event(record: &[u8]) -> Option<FlowEvent> {
    let bytes = record.get(..EVENT_SIZE)?;
    // SAFETY: `bytes` holds EVENT_SIZE bytes, FlowEvent is plain integers (any bit pattern
    // is valid), and read_unaligned copes with the ring's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// Decodes one raw event. `boot_offset` converts the kernel's monotonic ns to wall time.
pub fn decode(ev: &FlowEvent, boot_offset: Duration, lookup: &IdentityLookup) -> FlowRecord {
    let wall = SystemTime::UNIX_EPOCH + boot_offset + Duration::from_nanos(ev.ts_ns);
    let addr = |a: u32, p: u16| SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p));
    let peer = |address, identity| {
        let (cluster, labels) = lookup(identity);
        FlowPeer {
            address,
            identity,
            cluster,
            labels,
        }
    };
    let dropped = ev.verdict == VERDICT_DROPPED;
    FlowRecord {
        time: humantime::format_rfc3339_millis(wall).to_string(),
        verdict: if dropped { "DROPPED" } else { "FORWARDED" }.into(),
        drop_reason: dropped.then(|| {
            DropReason::from_u8(ev.reason)
                .map(|r| r.as_str().to_owned())
                .unwrap_or_else(|| format!("reason {}", ev.reason))
        }),
        traffic_direction: if ev.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .into(),
        protocol: proto_name(ev.proto),
        source: peer(addr(ev.saddr, ev.sport), ev.src_identity),
        destination: peer(addr(ev.daddr, ev.dport), ev.dst_identity),
        endpoint: ev.endpoint,
        remote_unknown: ev.flags & FLOW_FLAG_REMOTE_UNKNOWN != 0,
    }
}

/// Wall time minus the monotonic clock: added to `bpf_ktime_get_ns()` values.
pub fn boot_offset() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(mono)
}

/// Recent flows plus a live feed, shared by the reader task and the API.
#[derive(Clone)]
pub struct FlowHub {
    recent: Arc<Mutex<VecDeque<FlowRecord>>>,
    live: broadcast::Sender<FlowRecord>,
    capacity: usize,
}

impl FlowHub {
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            live: broadcast::channel(1024).0,
            capacity,
        }
    }

    pub fn publish(&self, record: FlowRecord) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(record.clone());
        }
        let _ = self.live.send(record);
    }

    /// The last `n` flows, oldest first.
    pub fn last(&self, n: usize) -> Vec<FlowRecord> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FlowRecord> {
        self.live.subscribe()
    }
}

/// Reads the ring buffer until the task is dropped.
pub async fn read_events(
    map: Map,
    hub: FlowHub,
    lookup: IdentityLookup,
) -> Result<(), DatapathError> {
    let name = names::MAP_FLOW_EVENTS;
    let ring: RingBuf<MapData> =
        RingBuf::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // AsyncFd (which owns the ring) is dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| DatapathError::Io {
            what: "registering the flow ring buffer",
            source: e.into_parts().1,
        })?;
    let offset = boot_offset();
    loop {
        let mut guard = fd
            .readable_mut()
            .await
            .map_err(|source| DatapathError::Pin {
                path: name.into(),
                source,
            })?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = parse_event(&item) {
                hub.publish(decode(&ev, offset, &lookup));
            }
        }
        guard.clear_ready();
    }
}

/// Drop counters summed over CPUs, by reason.
pub fn drop_counts(map: &Map) -> Result<Vec<(DropReason, u64)>, DatapathError> {
    let name = names::MAP_DROP_COUNTERS;
    let array = PerCpuArray::<_, u64>::try_from(map)
        .map_err(|source| DatapathError::Map { name, source })?;
    DropReason::ALL
        .iter()
        .skip(1)
        .map(|r| {
            let per_cpu = array
                .get(&(*r as u32), 0)
                .map_err(|source| DatapathError::Map { name, source })?;
            Ok((*r, per_cpu.iter().sum()))
        })
        .collect()
}
