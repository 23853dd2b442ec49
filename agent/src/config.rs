//! The agent's configuration file (YAML, as mounted from a ConfigMap). Every field has a
//! default except the cluster identity and the local kvstore, which a node cannot guess.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    constants, datapath::DatapathSection, k8s::LocalSourceConfig, masquerade::MasqueradeSection,
    mesh::limits::RemoteLimits,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid agent config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid agent config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub cluster: ClusterConfig,
    pub node: NodeConfig,
    /// Cilium-format etcd config file of this cluster's kvstore.
    pub kvstore_config: PathBuf,
    #[serde(default = "default_clustermesh_dir")]
    pub clustermesh_config_dir: PathBuf,
    #[serde(default)]
    pub clustermesh: ClustermeshSection,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    #[serde(default = "default_metrics_addr")]
    pub metrics_address: SocketAddr,
    #[serde(default)]
    pub wireguard: WireguardSection,
    /// Where health probes may go and how many (`underlayCIDRs`, `maxProbesPerCluster`).
    #[serde(default)]
    pub health: crate::health::HealthSection,
    /// Read this cluster's Services and EndpointSlices from YAML files in this directory
    /// (demo, dev VMs, tests) instead of the Kubernetes API.
    #[serde(default)]
    pub manifests_dir: Option<PathBuf>,
    /// The eBPF datapath (socket load balancer, ipcache, policy). Absent: not loaded, and
    /// the agent only syncs state and runs encryption.
    #[serde(default)]
    pub datapath: Option<DatapathSection>,
    /// Where this cluster's Kubernetes objects come from (`kubernetes: {source: api}` for the
    /// API server). Absent: the manifests directory if set, else no local source.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// SNAT of pod egress leaving the mesh (`masquerade: {enabled: true}`).
    #[serde(default)]
    pub masquerade: MasqueradeSection,
}

/// `clustermesh:` — how remote clusters are consumed.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClustermeshSection {
    /// What each remote cluster may make this agent hold.
    #[serde(default)]
    pub limits: RemoteLimits,
    /// Cilium's `clustermesh-sync-timeout` (e.g. `1m`, `30s`): how long the initial sync
    /// waits for remote clusters; after it, stale state is cleaned up without the laggards.
    #[serde(default = "default_sync_timeout", deserialize_with = "human_duration")]
    pub sync_timeout: std::time::Duration,
}

impl Default for ClustermeshSection {
    fn default() -> Self {
        Self {
            limits: RemoteLimits::default(),
            sync_timeout: default_sync_timeout(),
        }
    }
}

fn default_sync_timeout() -> std::time::Duration {
    constants::CLUSTERMESH_SYNC_TIMEOUT
}

/// A duration written as Go and Cilium spell them in flags (`1m`, `90s`, `1m30s`).
fn human_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
}

/// `kubernetes:` — the local source of Services, EndpointSlices, Pods, Namespaces, this Node
/// and Cilium policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSection {
    #[serde(default = "default_k8s_source")]
    pub source: K8sSourceKind,
    /// API server URL overriding the in-cluster address (`KUBERNETES_SERVICE_HOST`), which is
    /// a ClusterIP nothing translates before the agent runs without kube-proxy. Talos:
    /// KubePrism, `https://localhost:7445`; kind: `https://<cluster>-control-plane:6443`.
    #[serde(default)]
    pub api_server: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum K8sSourceKind {
    /// Watch the Kubernetes API server (in-cluster credentials).
    Api,
    /// Poll YAML manifests in `manifestsDir`.
    Manifests,
}

fn default_k8s_source() -> K8sSourceKind {
    K8sSourceKind::Api
}

/// Transparent encryption between nodes (Cilium's WireGuard mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireguardSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_wg_device")]
    pub device: String,
    /// `auto` (kernel module if present, else wireguard-go), `kernel` or `userspace`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Also encrypt node-IP traffic (peers' node IPs in their AllowedIPs).
    #[serde(default)]
    pub node_encryption: bool,
    /// Drop traffic to remote pod CIDRs that has no peer yet instead of sending it in clear.
    #[serde(default = "yes")]
    pub strict: bool,
    /// Prefixes that must never leave unencrypted, e.g. the mesh-wide pod supernet.
    #[serde(default, rename = "strictCIDRs")]
    pub strict_cidrs: Vec<IpNet>,
    /// Underlay MTU (default: read from the interface holding the node IP); the device gets
    /// this minus 80.
    #[serde(default, rename = "underlayMTU")]
    pub underlay_mtu: Option<u32>,
}

impl Default for WireguardSection {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").expect("every field has a default")
    }
}

fn yes() -> bool {
    true
}
fn default_wg_device() -> String {
    constants::WIREGUARD_DEVICE.into()
}
fn default_backend() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    pub id: u32,
    #[serde(default = "default_max_connected")]
    pub max_connected_clusters: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Defaults to the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// The address other nodes reach this one at (WireGuard endpoint).
    /// May be left out of a ConfigMap shared by all nodes and given per node with
    /// `--node-ip` / `STRAIT_NODE_IP` (the DaemonSet passes `status.hostIP`).
    #[serde(default, rename = "internalIP")]
    pub internal_ip: Option<std::net::IpAddr>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
}

fn default_clustermesh_dir() -> PathBuf {
    constants::DEFAULT_CLUSTERMESH_CONFIG_DIR.into()
}
fn default_state_dir() -> PathBuf {
    constants::STATE_DIR.into()
}
fn default_api_socket() -> PathBuf {
    constants::DEFAULT_API_SOCKET.into()
}
fn default_metrics_addr() -> SocketAddr {
    constants::DEFAULT_METRICS_ADDR
        .parse()
        .expect("constant is a valid address")
}
fn default_max_connected() -> u32 {
    constants::DEFAULT_MAX_CONNECTED_CLUSTERS
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.into(),
            reason,
        };
        if config.cluster.id == 0 {
            return Err(invalid(
                "cluster.id 0 is reserved: ClusterMesh needs an ID from 1 to maxConnectedClusters"
                    .into(),
            ));
        }
        if ![255, 511].contains(&config.cluster.max_connected_clusters) {
            return Err(invalid(format!(
                "cluster.maxConnectedClusters must be 255 or 511, not {}",
                config.cluster.max_connected_clusters
            )));
        }
        if let Ok(max) =
            crate::identity::MaxConnectedClusters::from_u32(config.cluster.max_connected_clusters)
            && let Err(e) = crate::identity::cluster::validate_local_cluster(
                &config.cluster.name,
                config.cluster.id,
                max,
            )
        {
            return Err(invalid(format!("cluster: {e}")));
        }
        if let Err(e) = config
            .wireguard
            .backend
            .parse::<crate::wireguard::BackendChoice>()
        {
            return Err(invalid(format!("wireguard.backend: {e}")));
        }
        if config.cluster.id > config.cluster.max_connected_clusters {
            return Err(invalid(format!(
                "cluster.id {} exceeds maxConnectedClusters {}",
                config.cluster.id, config.cluster.max_connected_clusters
            )));
        }
        config.local_source().map_err(invalid)?;
        Ok(config)
    }

    /// The local source of Kubernetes objects, checked for contradictions.
    pub fn local_source(&self) -> Result<LocalSourceConfig, String> {
        match (&self.kubernetes, &self.manifests_dir) {
            (None, None) => Ok(LocalSourceConfig::None),
            (None, Some(dir)) => Ok(LocalSourceConfig::Manifests(dir.clone())),
            (Some(k), dir) => match (k.source, dir) {
                (K8sSourceKind::Manifests, Some(dir)) => {
                    Ok(LocalSourceConfig::Manifests(dir.clone()))
                }
                (K8sSourceKind::Manifests, None) => {
                    Err("kubernetes.source is manifests but manifestsDir is not set".into())
                }
                (K8sSourceKind::Api, Some(_)) => Err(
                    "kubernetes.source is api but manifestsDir is set too: choose one source"
                        .into(),
                ),
                (K8sSourceKind::Api, None) => {
                    let api_server = match &k.api_server {
                        None => None,
                        Some(url) => Some(parse_api_server(url)?),
                    };
                    Ok(LocalSourceConfig::Api { api_server })
                }
            },
        }
    }

    /// The node name: configured, else the host name.
    pub fn node_name(&self) -> String {
        self.node.name.clone().unwrap_or_else(hostname)
    }
}

fn parse_api_server(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("kubernetes.apiServer {url:?}: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "kubernetes.apiServer {url:?}: expected https://host:port (e.g. https://localhost:7445)"
        )),
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
cluster: {name: cluster-usa, id: 1}
node: {name: usa-1, internalIP: 198.18.1.1, podCIDRs: [10.1.0.0/24]}
kvstoreConfig: /etc/strait/etcd.yaml
";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse(Path::new("t.yaml"), MINIMAL).unwrap();
        assert_eq!(c.cluster.max_connected_clusters, 255);
        assert_eq!(
            c.clustermesh_config_dir,
            Path::new(constants::DEFAULT_CLUSTERMESH_CONFIG_DIR)
        );
        assert_eq!(
            c.node.pod_cidrs,
            vec!["10.1.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(c.node_name(), "usa-1");
        assert!(c.wireguard.enabled && c.wireguard.strict && !c.wireguard.node_encryption);
        assert_eq!(c.wireguard.device, constants::WIREGUARD_DEVICE);
        assert_eq!(c.clustermesh.limits, RemoteLimits::default());
    }

    #[test]
    fn clustermesh_sync_timeout_defaults_to_ciliums_and_is_configurable() {
        let parse =
            |extra: &str| AgentConfig::parse(Path::new("t.yaml"), &format!("{MINIMAL}{extra}"));
        let c = parse("").unwrap();
        assert_eq!(
            c.clustermesh.sync_timeout,
            std::time::Duration::from_secs(60)
        );
        let c = parse("clustermesh: {syncTimeout: 1m30s}\n").unwrap();
        assert_eq!(
            c.clustermesh.sync_timeout,
            std::time::Duration::from_secs(90)
        );
        let err = parse("clustermesh: {syncTimeout: soon}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"soon\" is not a duration"), "{err}");
    }

    #[test]
    fn clustermesh_limits_are_configurable() {
        let parse =
            |extra: &str| AgentConfig::parse(Path::new("t.yaml"), &format!("{MINIMAL}{extra}"));
        let c = parse("clustermesh: {limits: {maxIdentities: 10, maxValueBytes: 512}}\n").unwrap();
        assert_eq!(
            c.clustermesh.limits,
            RemoteLimits {
                max_identities: 10,
                max_value_bytes: 512,
                ..RemoteLimits::default()
            }
        );
        assert!(parse("clustermesh: {limits: {maxPods: 1}}\n").is_err());
    }

    #[test]
    fn kubernetes_source_selection() {
        let parse =
            |extra: &str| AgentConfig::parse(Path::new("t.yaml"), &format!("{MINIMAL}{extra}"));
        assert_eq!(
            parse("").unwrap().local_source().unwrap(),
            LocalSourceConfig::None
        );
        assert_eq!(
            parse("manifestsDir: /m\n").unwrap().local_source().unwrap(),
            LocalSourceConfig::Manifests("/m".into())
        );
        assert_eq!(
            parse("kubernetes: {}\n").unwrap().local_source().unwrap(),
            LocalSourceConfig::Api { api_server: None }
        );
        let LocalSourceConfig::Api {
            api_server: Some(url),
        } = parse("kubernetes: {source: api, apiServer: \"https://localhost:7445\"}\n")
            .unwrap()
            .local_source()
            .unwrap()
        else {
            panic!("expected the API source with an override");
        };
        assert_eq!(
            (url.host(), url.port_u16()),
            (Some("localhost"), Some(7445))
        );
        for (bad, why) in [
            (
                "kubernetes: {source: manifests}\n",
                "manifestsDir is not set",
            ),
            ("kubernetes: {}\nmanifestsDir: /m\n", "choose one source"),
            (
                "kubernetes: {apiServer: localhost:7445}\n",
                "expected https://",
            ),
            ("kubernetes: {source: etcd}\n", "etcd"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        // internalIP may come from the command line instead.
        let c = AgentConfig::parse(
            Path::new("t.yaml"),
            "cluster: {name: cluster-usa, id: 1}\nnode: {}\nkvstoreConfig: /e.yaml\n",
        )
        .unwrap();
        assert_eq!(c.node.internal_ip, None);
    }

    #[test]
    fn bad_values_are_named() {
        let err = AgentConfig::parse(Path::new("t.yaml"), &MINIMAL.replace("id: 1", "id: 0"))
            .unwrap_err();
        assert!(
            err.to_string().contains("cluster.id 0 is reserved"),
            "{err}"
        );
        let err = AgentConfig::parse(
            Path::new("t.yaml"),
            &MINIMAL.replace("id: 1}", "id: 1, maxConnectedClusters: 300}"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("255 or 511"), "{err}");
        let err =
            AgentConfig::parse(Path::new("t.yaml"), &format!("{MINIMAL}typo: 1\n")).unwrap_err();
        assert!(err.to_string().contains("typo"), "{err}");
        let err = AgentConfig::parse(
            Path::new("t.yaml"),
            &format!("{MINIMAL}wireguard: {{backend: magic}}\n"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("wireguard.backend"), "{err}");
        let err = AgentConfig::parse(
            Path::new("t.yaml"),
            &MINIMAL.replace("cluster-usa", "Cluster_USA"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("Cluster_USA"), "{err}");
    }
}
