//! The agent's status document (built by [`StatusSources`] from the agent's parts, served by
//! the API, printed by `strait status`), modelled on `cilium-dbg status`: the remote-cluster
//! entries use Cilium's RemoteCluster JSON names.

use std::{fmt::Write as _, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::DatapathAgent,
    health::{HealthReport, RefusedTarget},
    mesh::{manager::ClusterMesh, remote::RemoteClusterStatus, sync::SyncFlags},
    state::{self, StateHandle},
    wireguard::{DeviceStatus, EncryptionAgent},
};

/// Refused ipcache entries listed in the document (all are counted): a hostile remote can
/// publish any number of them.
const MAX_LISTED_REFUSALS: usize = 100;

/// What the status document is read from: the agent's parts, as the daemon started them.
pub struct StatusSources {
    pub cluster: String,
    pub cluster_id: u32,
    pub node: String,
    /// The local kvstore's endpoints, comma-separated.
    pub kvstore: String,
    /// Whether the local cluster's kvstore has been listed.
    pub local_synced: Arc<SyncFlags>,
    pub state: StateHandle,
    pub mesh: Arc<ClusterMesh>,
    pub encryption: Option<Arc<EncryptionAgent>>,
    pub datapath: Option<Arc<DatapathAgent>>,
    /// The health prober's report, when it runs.
    pub health: Option<tokio::sync::watch::Receiver<HealthReport>>,
}

impl StatusSources {
    /// The current document. May block: it reads the WireGuard device.
    pub fn build(&self) -> AgentStatus {
        let encryption = self.encryption.as_ref().and_then(|e| e.status().ok());
        // Before the read lock: both read the state model themselves, and a second read on
        // this thread while a writer waits deadlocks the agent (std's RwLock).
        let clusters = self.mesh.statuses();
        let datapath = self.datapath.as_ref().map(|d| d.status());
        let model = self.state.read();
        let counts = model.counts(&self.cluster);
        let refusals = state::owned_endpoints(&model).refusals;
        let health = self
            .health
            .as_ref()
            .map(|h| h.borrow().clone())
            .unwrap_or_default();
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            cluster: LocalStatus {
                name: self.cluster.clone(),
                id: self.cluster_id,
                node: self.node.clone(),
                kvstore: self.kvstore.clone(),
                kvstore_synced: self.local_synced.all(),
                num_nodes: counts.nodes,
                num_endpoints: counts.endpoints,
                num_identities: counts.identities,
            },
            cluster_mesh: ClusterMeshStatus {
                clusters,
                num_global_services: model.num_remote_global_services(),
                datapath_down: model
                    .clusters()
                    .filter(|c| c.datapath_down)
                    .map(|c| c.name.to_string())
                    .collect(),
                num_ipcache_refused: refusals.len(),
                ipcache_refused: refusals
                    .iter()
                    .take(MAX_LISTED_REFUSALS)
                    .map(|r| IpcacheRefusedStatus {
                        cluster: r.cluster.to_string(),
                        prefix: r.prefix,
                        reason: r.reason.as_str().into(),
                        detail: r.reason.to_string(),
                    })
                    .collect(),
                num_health_refused: health.num_refused,
                health_refused: health.refused,
            },
            encryption,
            datapath,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct AgentStatus {
    pub version: String,
    pub cluster: LocalStatus,
    pub cluster_mesh: ClusterMeshStatus,
    /// WireGuard device and peers; `None` when encryption is off or not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<DeviceStatus>,
    /// The eBPF datapath; `None` when it is not enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<crate::datapath::DatapathStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct LocalStatus {
    pub name: String,
    pub id: u32,
    pub node: String,
    /// The local kvstore (our own cluster's etcd).
    pub kvstore: String,
    pub kvstore_synced: bool,
    pub num_nodes: usize,
    pub num_endpoints: usize,
    pub num_identities: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterMeshStatus {
    pub clusters: Vec<RemoteClusterStatus>,
    /// Global services remote clusters share with us (Cilium's meaning: its global-service
    /// cache holds what remotes export), by name.
    pub num_global_services: usize,
    /// Remote clusters whose nodes all stopped answering health probes: their backends are
    /// out of every global service until one answers again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datapath_down: Vec<String>,
    /// Remote ipcache entries the datapath does not program (the ownership rule of
    /// `state::ipcache`), and the first of them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_ipcache_refused: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipcache_refused: Vec<IpcacheRefusedStatus>,
    /// Remote node addresses the health prober refuses (outside the underlay ranges, not
    /// unicast, this node), and the first of them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_health_refused: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_refused: Vec<RefusedTarget>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A remote ipcache entry the datapath does not program.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct IpcacheRefusedStatus {
    pub cluster: String,
    pub prefix: IpNet,
    /// local | outside-pod-cidrs | conflict (the metric's label).
    pub reason: String,
    pub detail: String,
}

impl AgentStatus {
    /// Human form, in the shape of `cilium-dbg status --all-clusters`: every cluster that is
    /// not ready says why.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = &self.cluster;
        let _ = writeln!(
            out,
            "Cluster:       {} (id {}), node {}",
            c.name, c.id, c.node
        );
        let _ = writeln!(
            out,
            "KVStore:       {} ({}synced: {} nodes, {} endpoints, {} identities)",
            c.kvstore,
            if c.kvstore_synced { "" } else { "not " },
            c.num_nodes,
            c.num_endpoints,
            c.num_identities
        );
        let mesh = &self.cluster_mesh;
        let ready = mesh.clusters.iter().filter(|r| r.ready).count();
        let _ = writeln!(
            out,
            "ClusterMesh:   {ready}/{} remote clusters ready, {} global-services",
            mesh.clusters.len(),
            mesh.num_global_services
        );
        for r in &mesh.clusters {
            let _ = writeln!(
                out,
                "   {}: {}, {} nodes, {} endpoints, {} identities, {} services, {} reconnections (last: {})",
                r.name,
                if r.ready { "ready" } else { "not-ready" },
                r.num_nodes,
                r.num_endpoints,
                r.num_identities,
                r.num_shared_services,
                r.num_failures,
                r.last_failure.as_deref().unwrap_or("never"),
            );
            let _ = writeln!(out, "   └  {}", r.status);
            match &r.config {
                Some(cfg) => {
                    let exports = match cfg.service_exports_enabled {
                        None => "unsupported",
                        Some(true) => "enabled",
                        Some(false) => "disabled",
                    };
                    let _ = writeln!(
                        out,
                        "   └  remote configuration: expected=true, retrieved={}, cluster-id={}, kvstoremesh={}, sync-canaries={}, service-exports={exports}",
                        cfg.retrieved, cfg.cluster_id, cfg.kvstoremesh, cfg.sync_canaries
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "   └  remote configuration: expected=true, retrieved=false"
                    );
                }
            }
            let s = &r.synced;
            let _ = writeln!(
                out,
                "   └  synchronization status: nodes={}, endpoints={}, identities={}, services={}",
                s.nodes, s.endpoints, s.identities, s.services
            );
            if let Some(error) = &r.error {
                let _ = writeln!(out, "   └  error: {error}");
            }
            if mesh.datapath_down.contains(&r.name) {
                let _ = writeln!(
                    out,
                    "   └  datapath: down (no node answers health probes; backends not used)"
                );
            }
        }
        if mesh.num_ipcache_refused > 0 {
            let listed: Vec<String> = mesh
                .ipcache_refused
                .iter()
                .take(3)
                .map(|r| format!("{} {} ({})", r.cluster, r.prefix, r.detail))
                .collect();
            let more = mesh.num_ipcache_refused - listed.len();
            let _ = writeln!(
                out,
                "IPCache:       {} remote entries refused: {}{}",
                mesh.num_ipcache_refused,
                listed.join(", "),
                if more > 0 {
                    format!(", and {more} more")
                } else {
                    String::new()
                }
            );
        }
        if mesh.num_health_refused > 0 {
            let listed: Vec<String> = mesh
                .health_refused
                .iter()
                .take(3)
                .map(|r| format!("{} {} ({})", r.cluster, r.address, r.reason))
                .collect();
            let more = mesh.num_health_refused - listed.len();
            let _ = writeln!(
                out,
                "Health:        {} remote node addresses not probed: {}{}",
                mesh.num_health_refused,
                listed.join(", "),
                if more > 0 {
                    format!(", and {more} more")
                } else {
                    String::new()
                }
            );
        }
        match &self.datapath {
            None => {
                let _ = writeln!(out, "Datapath:      disabled");
            }
            Some(d) => {
                let _ = writeln!(
                    out,
                    "Datapath:      eBPF [pins {}, socket LB on {}]: {} service frontends, {} backends, {} ipcache entries, {} endpoints",
                    d.pin_dir, d.cgroup, d.services, d.backends, d.ipcache_entries, d.endpoints
                );
                for e in &d.errors {
                    let _ = writeln!(out, "   └  error: {e}");
                }
                if !d.unenforced.is_empty() {
                    let _ = writeln!(
                        out,
                        "   └  {} endpoints selected by policy are NOT enforced:",
                        d.unenforced.len()
                    );
                    for u in &d.unenforced {
                        let _ = writeln!(
                            out,
                            "      {} ({}): {}: {}",
                            u.pod, u.ip, u.reason, u.detail
                        );
                    }
                }
            }
        }
        match &self.encryption {
            None => {
                let _ = writeln!(out, "Encryption:    disabled");
            }
            Some(wg) => {
                let _ = writeln!(
                    out,
                    "Encryption:    WireGuard [{} ({}), port {}, {} peers, pubkey {}]",
                    wg.device,
                    wg.backend,
                    wg.listen_port.map_or("-".into(), |p| p.to_string()),
                    wg.peers.len(),
                    wg.public_key
                );
                for p in &wg.peers {
                    let _ = writeln!(
                        out,
                        "   {}/{}: endpoint {}, {} allowed IPs, last handshake {}, rx {} B, tx {} B",
                        p.cluster.as_deref().unwrap_or("?"),
                        p.node.as_deref().unwrap_or("unknown"),
                        p.endpoint.map_or("-".into(), |e| e.to_string()),
                        p.allowed_ips,
                        p.last_handshake_unix.map_or("never".into(), |t| {
                            crate::wire::timestamp::format_rfc3339(
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                            )
                        }),
                        p.rx_bytes,
                        p.tx_bytes
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(refused: usize) -> AgentStatus {
        AgentStatus {
            version: "0.1.0".into(),
            cluster: LocalStatus {
                name: "cluster-usa".into(),
                id: 1,
                node: "usa-1".into(),
                kvstore: "https://10.0.0.1:2379".into(),
                kvstore_synced: true,
                num_nodes: 1,
                num_endpoints: 1,
                num_identities: 1,
            },
            cluster_mesh: ClusterMeshStatus {
                clusters: vec![],
                num_global_services: 0,
                datapath_down: vec![],
                num_ipcache_refused: refused,
                ipcache_refused: (0..refused.min(MAX_LISTED_REFUSALS))
                    .map(|i| IpcacheRefusedStatus {
                        cluster: "cluster-mars".into(),
                        prefix: format!("10.9.0.{i}/32").parse().unwrap(),
                        reason: "outside-pod-cidrs".into(),
                        detail: "outside".into(),
                    })
                    .collect(),
                num_health_refused: 0,
                health_refused: vec![],
            },
            encryption: None,
            datapath: None,
        }
    }

    /// One key style in `strait status --json`: Cilium's (kebab-case, as in its
    /// RemoteCluster and ClusterMeshStatus models), in every part of the document.
    #[test]
    fn every_json_key_is_kebab_case() {
        let mut full = status(1);
        full.cluster_mesh.clusters.push(RemoteClusterStatus {
            name: "cluster-europe".into(),
            last_failure: Some("2026-01-01T00:00:00Z".into()),
            config: Some(Default::default()),
            error: Some("x".into()),
            ..Default::default()
        });
        full.cluster_mesh.datapath_down = vec!["cluster-europe".into()];
        full.encryption = Some(crate::wireguard::DeviceStatus {
            device: "cilium_wg0".into(),
            backend: crate::wireguard::BackendKind::Kernel,
            netns: "self".into(),
            public_key: "k".into(),
            listen_port: Some(51871),
            peers: vec![crate::wireguard::PeerStatus {
                node: Some("eu-1".into()),
                cluster: Some("cluster-europe".into()),
                public_key: "k".into(),
                endpoint: Some("198.18.2.1:51871".parse().unwrap()),
                last_handshake_unix: Some(1),
                rx_bytes: 1,
                tx_bytes: 1,
                allowed_ips: 1,
            }],
        });
        full.datapath = Some(crate::datapath::DatapathStatus::default());
        fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let json = serde_json::to_value(&full).unwrap();
        let mut all = Vec::new();
        keys(&json, &mut all);
        for k in [
            "public-key",
            "pin-dir",
            "num-nodes",
            "listen-port",
            "rx-bytes",
        ] {
            assert!(all.iter().any(|a| a == k), "{k} missing: {all:?}");
        }
        let bad: Vec<&String> = all
            .iter()
            .filter(|k| {
                !k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
            .collect();
        assert!(bad.is_empty(), "keys not in Cilium's style: {bad:?}");
        // And it reads back.
        let back: AgentStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn unenforced_endpoints_are_listed_with_their_reason() {
        use crate::datapath::{DatapathStatus, enforcement::UnenforcedEndpoint};
        let mut s = status(0);
        s.datapath = Some(DatapathStatus::default());
        let clean = s.render();
        assert!(!clean.contains("NOT enforced"), "{clean}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("unenforced"), "{json}");

        s.datapath.as_mut().unwrap().unenforced = vec![UnenforcedEndpoint {
            pod: "shop/db".into(),
            ip: "10.1.1.5".parse().unwrap(),
            reason: "no-host-route".into(),
            detail: "no /32 route to 10.1.1.5 on this node".into(),
        }];
        let text = s.render();
        assert!(
            text.contains(
                "   └  1 endpoints selected by policy are NOT enforced:\n      shop/db (10.1.1.5): \
                 no-host-route: no /32 route to 10.1.1.5 on this node\n"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["datapath"]["unenforced"][0]["reason"], "no-host-route",
            "{json}"
        );
        let back: AgentStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn refused_ipcache_entries_add_one_line_only_when_there_are_some() {
        let none = status(0).render();
        assert!(!none.contains("IPCache:"), "{none}");
        let json = serde_json::to_string(&status(0)).unwrap();
        assert!(!json.contains("ipcache-refused"), "{json}");

        let some = status(5).render();
        assert_eq!(some.lines().count(), none.lines().count() + 1, "{some}");
        assert!(
            some.contains(
                "IPCache:       5 remote entries refused: cluster-mars 10.9.0.0/32 (outside), \
                 cluster-mars 10.9.0.1/32 (outside), cluster-mars 10.9.0.2/32 (outside), and 2 more"
            ),
            "{some}"
        );
    }
}
