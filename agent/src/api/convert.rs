//! The agent's types ⇄ their API messages. The agent side never fails (`From`); what a client
//! receives is checked (`TryFrom`), so a message the model cannot hold is an error, not a
//! silently different document.

use std::fmt::Display;

use super::pb;
use crate::{
    datapath::{
        DatapathStatus,
        enforcement::UnenforcedEndpoint,
        flows::{FlowPeer, FlowRecord},
    },
    health::RefusedTarget,
    mesh::remote::{RemoteClusterStatus, RemoteConfigStatus, SyncedStatus},
    status::{AgentStatus, ClusterMeshStatus, IpcacheRefusedStatus, LocalStatus},
    wireguard::{BackendKind, DeviceStatus, PeerStatus},
};

/// A message from the agent that does not map onto the agent's types.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(field: &'static str, value: impl Display, reason: impl Display) -> ConvertError {
    ConvertError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A message field proto3 cannot mark required.
fn required<T>(field: &'static str, value: Option<T>) -> Result<T, ConvertError> {
    value.ok_or(ConvertError::Missing(field))
}

fn count(field: &'static str, n: u64) -> Result<usize, ConvertError> {
    usize::try_from(n).map_err(|e| invalid(field, n, e))
}

fn parse<T: std::str::FromStr>(field: &'static str, s: &str) -> Result<T, ConvertError>
where
    T::Err: Display,
{
    s.parse().map_err(|e| invalid(field, s, e))
}

impl From<AgentStatus> for pb::AgentStatus {
    fn from(s: AgentStatus) -> Self {
        Self {
            version: s.version,
            cluster: Some(s.cluster.into()),
            cluster_mesh: Some(s.cluster_mesh.into()),
            encryption: s.encryption.map(Into::into),
            datapath: s.datapath.map(Into::into),
        }
    }
}

impl TryFrom<pb::AgentStatus> for AgentStatus {
    type Error = ConvertError;
    fn try_from(s: pb::AgentStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            version: s.version,
            cluster: required("cluster", s.cluster)?.try_into()?,
            cluster_mesh: required("cluster_mesh", s.cluster_mesh)?.try_into()?,
            encryption: s.encryption.map(TryInto::try_into).transpose()?,
            datapath: s.datapath.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<LocalStatus> for pb::LocalStatus {
    fn from(s: LocalStatus) -> Self {
        Self {
            name: s.name,
            id: s.id,
            node: s.node,
            kvstore: s.kvstore,
            kvstore_synced: s.kvstore_synced,
            num_nodes: s.num_nodes as u64,
            num_endpoints: s.num_endpoints as u64,
            num_identities: s.num_identities as u64,
        }
    }
}

impl TryFrom<pb::LocalStatus> for LocalStatus {
    type Error = ConvertError;
    fn try_from(s: pb::LocalStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            name: s.name,
            id: s.id,
            node: s.node,
            kvstore: s.kvstore,
            kvstore_synced: s.kvstore_synced,
            num_nodes: count("cluster.num_nodes", s.num_nodes)?,
            num_endpoints: count("cluster.num_endpoints", s.num_endpoints)?,
            num_identities: count("cluster.num_identities", s.num_identities)?,
        })
    }
}

impl From<ClusterMeshStatus> for pb::ClusterMeshStatus {
    fn from(s: ClusterMeshStatus) -> Self {
        Self {
            clusters: s.clusters.into_iter().map(Into::into).collect(),
            num_global_services: s.num_global_services as u64,
            datapath_down: s.datapath_down,
            num_ipcache_refused: s.num_ipcache_refused as u64,
            ipcache_refused: s.ipcache_refused.into_iter().map(Into::into).collect(),
            num_health_refused: s.num_health_refused as u64,
            health_refused: s
                .health_refused
                .into_iter()
                .map(|r| pb::HealthRefused {
                    cluster: r.cluster,
                    address: r.address.to_string(),
                    reason: r.reason,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::ClusterMeshStatus> for ClusterMeshStatus {
    type Error = ConvertError;
    fn try_from(s: pb::ClusterMeshStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            clusters: s
                .clusters
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            num_global_services: count("cluster_mesh.num_global_services", s.num_global_services)?,
            datapath_down: s.datapath_down,
            num_ipcache_refused: count("cluster_mesh.num_ipcache_refused", s.num_ipcache_refused)?,
            ipcache_refused: s
                .ipcache_refused
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            num_health_refused: count("cluster_mesh.num_health_refused", s.num_health_refused)?,
            health_refused: s
                .health_refused
                .into_iter()
                .map(|r| {
                    Ok(RefusedTarget {
                        address: parse("cluster_mesh.health_refused.address", &r.address)?,
                        cluster: r.cluster,
                        reason: r.reason,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
        })
    }
}

impl From<IpcacheRefusedStatus> for pb::IpcacheRefused {
    fn from(r: IpcacheRefusedStatus) -> Self {
        Self {
            cluster: r.cluster,
            prefix: r.prefix.to_string(),
            reason: r.reason,
            detail: r.detail,
        }
    }
}

impl TryFrom<pb::IpcacheRefused> for IpcacheRefusedStatus {
    type Error = ConvertError;
    fn try_from(r: pb::IpcacheRefused) -> Result<Self, ConvertError> {
        Ok(Self {
            cluster: r.cluster,
            prefix: parse("cluster_mesh.ipcache_refused.prefix", &r.prefix)?,
            reason: r.reason,
            detail: r.detail,
        })
    }
}

impl From<RemoteClusterStatus> for pb::RemoteClusterStatus {
    fn from(s: RemoteClusterStatus) -> Self {
        Self {
            name: s.name,
            ready: s.ready,
            connected: s.connected,
            status: s.status,
            num_nodes: s.num_nodes as u64,
            num_shared_services: s.num_shared_services as u64,
            num_endpoints: s.num_endpoints as u64,
            num_identities: s.num_identities as u64,
            num_failures: s.num_failures,
            last_failure: s.last_failure,
            synced: Some(s.synced.into()),
            config: s.config.map(Into::into),
            error: s.error,
        }
    }
}

impl TryFrom<pb::RemoteClusterStatus> for RemoteClusterStatus {
    type Error = ConvertError;
    fn try_from(s: pb::RemoteClusterStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            name: s.name,
            ready: s.ready,
            connected: s.connected,
            status: s.status,
            num_nodes: count("clusters.num_nodes", s.num_nodes)?,
            num_shared_services: count("clusters.num_shared_services", s.num_shared_services)?,
            num_endpoints: count("clusters.num_endpoints", s.num_endpoints)?,
            num_identities: count("clusters.num_identities", s.num_identities)?,
            num_failures: s.num_failures,
            last_failure: s.last_failure,
            synced: required("clusters.synced", s.synced)?.into(),
            config: s.config.map(Into::into),
            error: s.error,
        })
    }
}

impl From<SyncedStatus> for pb::SyncedStatus {
    fn from(s: SyncedStatus) -> Self {
        Self {
            nodes: s.nodes,
            services: s.services,
            identities: s.identities,
            endpoints: s.endpoints,
        }
    }
}

impl From<pb::SyncedStatus> for SyncedStatus {
    fn from(s: pb::SyncedStatus) -> Self {
        Self {
            nodes: s.nodes,
            services: s.services,
            identities: s.identities,
            endpoints: s.endpoints,
        }
    }
}

impl From<RemoteConfigStatus> for pb::RemoteConfigStatus {
    fn from(s: RemoteConfigStatus) -> Self {
        Self {
            required: s.required,
            retrieved: s.retrieved,
            cluster_id: s.cluster_id,
            kvstoremesh: s.kvstoremesh,
            sync_canaries: s.sync_canaries,
            service_exports_enabled: s.service_exports_enabled,
        }
    }
}

impl From<pb::RemoteConfigStatus> for RemoteConfigStatus {
    fn from(s: pb::RemoteConfigStatus) -> Self {
        Self {
            required: s.required,
            retrieved: s.retrieved,
            cluster_id: s.cluster_id,
            kvstoremesh: s.kvstoremesh,
            sync_canaries: s.sync_canaries,
            service_exports_enabled: s.service_exports_enabled,
        }
    }
}

impl From<DeviceStatus> for pb::DeviceStatus {
    fn from(s: DeviceStatus) -> Self {
        let backend = match s.backend {
            BackendKind::Kernel => pb::WireguardBackend::Kernel,
            BackendKind::Userspace => pb::WireguardBackend::Userspace,
        };
        Self {
            device: s.device,
            backend: backend.into(),
            netns: s.netns,
            public_key: s.public_key,
            listen_port: s.listen_port.map(u32::from),
            peers: s.peers.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::DeviceStatus> for DeviceStatus {
    type Error = ConvertError;
    fn try_from(s: pb::DeviceStatus) -> Result<Self, ConvertError> {
        let backend = match pb::WireguardBackend::try_from(s.backend) {
            Ok(pb::WireguardBackend::Kernel) => BackendKind::Kernel,
            Ok(pb::WireguardBackend::Userspace) => BackendKind::Userspace,
            Ok(pb::WireguardBackend::Unspecified) | Err(_) => {
                return Err(invalid(
                    "encryption.backend",
                    s.backend,
                    "not kernel or userspace",
                ));
            }
        };
        Ok(Self {
            device: s.device,
            backend,
            netns: s.netns,
            public_key: s.public_key,
            listen_port: s
                .listen_port
                .map(|p| u16::try_from(p).map_err(|e| invalid("encryption.listen_port", p, e)))
                .transpose()?,
            peers: s
                .peers
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<PeerStatus> for pb::PeerStatus {
    fn from(s: PeerStatus) -> Self {
        Self {
            node: s.node,
            cluster: s.cluster,
            public_key: s.public_key,
            endpoint: s.endpoint.map(|e| e.to_string()),
            last_handshake_unix: s.last_handshake_unix,
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
            allowed_ips: s.allowed_ips as u64,
        }
    }
}

impl TryFrom<pb::PeerStatus> for PeerStatus {
    type Error = ConvertError;
    fn try_from(s: pb::PeerStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            node: s.node,
            cluster: s.cluster,
            public_key: s.public_key,
            endpoint: s
                .endpoint
                .map(|e| parse("encryption.peers.endpoint", &e))
                .transpose()?,
            last_handshake_unix: s.last_handshake_unix,
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
            allowed_ips: count("encryption.peers.allowed_ips", s.allowed_ips)?,
        })
    }
}

impl From<DatapathStatus> for pb::DatapathStatus {
    fn from(s: DatapathStatus) -> Self {
        Self {
            pin_dir: s.pin_dir,
            cgroup: s.cgroup,
            services: s.services as u64,
            backends: s.backends as u64,
            ipcache_entries: s.ipcache_entries as u64,
            endpoints: s.endpoints as u64,
            errors: s.errors,
            unenforced: s
                .unenforced
                .into_iter()
                .map(|u| pb::UnenforcedEndpoint {
                    pod: u.pod,
                    ip: u.ip.to_string(),
                    reason: u.reason,
                    detail: u.detail,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::DatapathStatus> for DatapathStatus {
    type Error = ConvertError;
    fn try_from(s: pb::DatapathStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            pin_dir: s.pin_dir,
            cgroup: s.cgroup,
            services: count("datapath.services", s.services)?,
            backends: count("datapath.backends", s.backends)?,
            ipcache_entries: count("datapath.ipcache_entries", s.ipcache_entries)?,
            endpoints: count("datapath.endpoints", s.endpoints)?,
            errors: s.errors,
            unenforced: s
                .unenforced
                .into_iter()
                .map(|u| {
                    Ok(UnenforcedEndpoint {
                        ip: u
                            .ip
                            .parse()
                            .map_err(|e| invalid("datapath.unenforced.ip", &u.ip, e))?,
                        pod: u.pod,
                        reason: u.reason,
                        detail: u.detail,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
        })
    }
}

impl From<FlowRecord> for pb::Flow {
    fn from(f: FlowRecord) -> Self {
        Self {
            time: f.time,
            verdict: f.verdict,
            drop_reason: f.drop_reason,
            traffic_direction: f.traffic_direction,
            protocol: f.protocol,
            source: Some(f.source.into()),
            destination: Some(f.destination.into()),
            endpoint: f.endpoint,
            remote_unknown: f.remote_unknown,
        }
    }
}

impl TryFrom<pb::Flow> for FlowRecord {
    type Error = ConvertError;
    fn try_from(f: pb::Flow) -> Result<Self, ConvertError> {
        Ok(Self {
            time: f.time,
            verdict: f.verdict,
            drop_reason: f.drop_reason,
            traffic_direction: f.traffic_direction,
            protocol: f.protocol,
            source: required("source", f.source)?.try_into()?,
            destination: required("destination", f.destination)?.try_into()?,
            endpoint: f.endpoint,
            remote_unknown: f.remote_unknown,
        })
    }
}

impl From<FlowPeer> for pb::FlowPeer {
    fn from(p: FlowPeer) -> Self {
        Self {
            address: p.address.to_string(),
            identity: p.identity,
            cluster: p.cluster,
            labels: p.labels,
        }
    }
}

impl TryFrom<pb::FlowPeer> for FlowPeer {
    type Error = ConvertError;
    fn try_from(p: pb::FlowPeer) -> Result<Self, ConvertError> {
        Ok(Self {
            address: parse("flow.address", &p.address)?,
            identity: p.identity,
            cluster: p.cluster,
            labels: p.labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field set, every optional both present and absent somewhere.
    fn agent_status() -> AgentStatus {
        AgentStatus {
            version: "0.1.0".into(),
            cluster: LocalStatus {
                name: "cluster-usa".into(),
                id: 1,
                node: "usa-1".into(),
                kvstore: "https://10.0.0.1:2379,https://10.0.0.2:2379".into(),
                kvstore_synced: true,
                num_nodes: 2,
                num_endpoints: 7,
                num_identities: 4,
            },
            cluster_mesh: ClusterMeshStatus {
                clusters: vec![
                    RemoteClusterStatus {
                        name: "cluster-europe".into(),
                        ready: true,
                        connected: true,
                        status: "ready".into(),
                        num_nodes: 2,
                        num_shared_services: 1,
                        num_endpoints: 5,
                        num_identities: 3,
                        num_failures: 2,
                        last_failure: Some("2024-05-01T10:00:00Z".into()),
                        synced: SyncedStatus {
                            nodes: true,
                            services: true,
                            identities: true,
                            endpoints: true,
                        },
                        config: Some(RemoteConfigStatus {
                            required: true,
                            retrieved: true,
                            cluster_id: 2,
                            kvstoremesh: true,
                            sync_canaries: false,
                            service_exports_enabled: Some(false),
                        }),
                        error: None,
                    },
                    RemoteClusterStatus {
                        name: "cluster-mars".into(),
                        status: "refused".into(),
                        synced: SyncedStatus {
                            nodes: false,
                            services: true,
                            identities: false,
                            endpoints: true,
                        },
                        error: Some("cluster ID 1 is ours".into()),
                        ..Default::default()
                    },
                ],
                num_global_services: 3,
                datapath_down: vec!["cluster-mars".into()],
                num_ipcache_refused: 2,
                ipcache_refused: vec![IpcacheRefusedStatus {
                    cluster: "cluster-mars".into(),
                    prefix: "0.0.0.0/0".parse().unwrap(),
                    reason: "outside-pod-cidrs".into(),
                    detail: "outside the pod CIDRs and addresses of the cluster's nodes".into(),
                }],
                num_health_refused: 1,
                health_refused: vec![crate::health::RefusedTarget {
                    cluster: "cluster-mars".into(),
                    address: "8.8.8.8".parse().unwrap(),
                    reason: "outside-underlay".into(),
                }],
            },
            encryption: Some(DeviceStatus {
                device: "strait0".into(),
                backend: BackendKind::Userspace,
                netns: "usa-1".into(),
                public_key: "aGVsbG8=".into(),
                listen_port: Some(51871),
                peers: vec![
                    PeerStatus {
                        node: Some("europe-1".into()),
                        cluster: Some("cluster-europe".into()),
                        public_key: "d29ybGQ=".into(),
                        endpoint: Some("[2001:db8::7]:51871".parse().unwrap()),
                        last_handshake_unix: Some(1_714_557_600),
                        rx_bytes: 1024,
                        tx_bytes: 2048,
                        allowed_ips: 3,
                    },
                    PeerStatus {
                        node: None,
                        cluster: None,
                        public_key: "bGVmdG92ZXI=".into(),
                        endpoint: None,
                        last_handshake_unix: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        allowed_ips: 0,
                    },
                ],
            }),
            datapath: Some(DatapathStatus {
                pin_dir: "/sys/fs/bpf/strait".into(),
                cgroup: "/sys/fs/cgroup".into(),
                services: 4,
                backends: 9,
                ipcache_entries: 12,
                endpoints: 2,
                errors: vec!["10.96.0.10:80: no backends fit".into()],
                unenforced: vec![UnenforcedEndpoint {
                    pod: "shop/db".into(),
                    ip: "10.1.1.5".parse().unwrap(),
                    reason: "map-write-failed".into(),
                    detail: "POLICY4 is full".into(),
                }],
            }),
        }
    }

    #[test]
    fn status_round_trips() {
        let status = agent_status();
        let back = AgentStatus::try_from(pb::AgentStatus::from(status.clone())).unwrap();
        assert_eq!(back, status);
        // And with the optional sections left out.
        let bare = AgentStatus {
            encryption: None,
            datapath: None,
            ..status
        };
        let back = AgentStatus::try_from(pb::AgentStatus::from(bare.clone())).unwrap();
        assert_eq!(back, bare);
    }

    #[test]
    fn flow_round_trips() {
        let flow = FlowRecord {
            time: "2024-05-01T10:00:00.123Z".into(),
            verdict: "DROPPED".into(),
            drop_reason: Some("POLICY_DENIED".into()),
            traffic_direction: "ingress".into(),
            protocol: "TCP".into(),
            source: FlowPeer {
                address: "10.2.0.5:43512".parse().unwrap(),
                identity: 2000,
                cluster: Some("cluster-europe".into()),
                labels: vec![
                    "k8s:app=other".into(),
                    "k8s:io.kubernetes.pod.namespace=default".into(),
                ],
            },
            destination: FlowPeer {
                address: "10.1.0.7:5432".parse().unwrap(),
                identity: 2,
                cluster: None,
                labels: vec![],
            },
            endpoint: 17,
            remote_unknown: true,
        };
        let back = FlowRecord::try_from(pb::Flow::from(flow.clone())).unwrap();
        assert_eq!(back, flow);
    }

    #[test]
    fn missing_and_invalid_fields_are_errors() {
        let mut status = pb::AgentStatus::from(agent_status());
        status.cluster = None;
        assert!(matches!(
            AgentStatus::try_from(status),
            Err(ConvertError::Missing("cluster"))
        ));
        let mut status = pb::AgentStatus::from(agent_status());
        if let Some(wg) = &mut status.encryption {
            wg.backend = pb::WireguardBackend::Unspecified.into();
        }
        assert!(matches!(
            AgentStatus::try_from(status),
            Err(ConvertError::Invalid {
                field: "encryption.backend",
                ..
            })
        ));
    }
}
