//! Decoding with the acceptance rules Cilium applies (§1.3, §2.1–2.4 of the reference), as
//! pure functions. A value that breaks a rule yields a [`Rejection`]: the caller skips it,
//! counts it (`kind`, `reason.as_str()` are Prometheus-safe labels) and logs the Display.
//!
//! Key suffixes are the etcd key minus the watched prefix (`DataKind::key_suffix`): a node
//! name, `<namespace>/<name>`, a numeric identity, an IP or prefix.

use std::net::IpAddr;

use super::config::KvClusterConfig;
use super::ipcache::IpIdentityPair;
use super::node::KvNode;
use super::service::KvClusterService;
use super::{WireError, json};
use crate::identity::cluster::{MaxConnectedClusters, validate_cluster_id};
use crate::identity::labels::{LABEL_SOURCE_K8S, LabelArray, LabelError, POLICY_LABEL_CLUSTER};
use crate::identity::{self, ClusterError, IdentityRange, NumericIdentity};

pub const KIND_NODE: &str = "node";
pub const KIND_SERVICE: &str = "service";
pub const KIND_IDENTITY: &str = "identity";
pub const KIND_IPCACHE: &str = "ipcache";
pub const KIND_CLUSTER_CONFIG: &str = "cluster-config";

/// What we know about the remote cluster whose data is being decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    /// The remote's name as configured locally (its config file name).
    pub name: String,
    /// The `id` of the remote's (validated) cluster config.
    pub cluster_id: u32,
    /// The *local* setting: it decides everyone's identity ranges.
    pub max_connected_clusters: MaxConnectedClusters,
}

impl RemoteContext {
    pub fn new(name: &str, cluster_id: u32, max_connected_clusters: MaxConnectedClusters) -> Self {
        RemoteContext {
            name: name.to_owned(),
            cluster_id,
            max_connected_clusters,
        }
    }

    /// Context from a config accepted by [`decode_remote_cluster_config`].
    pub fn from_config(
        name: &str,
        config: &KvClusterConfig,
        local_max: MaxConnectedClusters,
    ) -> Self {
        RemoteContext::new(name, config.id, local_max)
    }

    /// Identities the remote may allocate.
    pub fn identity_range(&self) -> IdentityRange {
        IdentityRange::for_cluster(self.cluster_id, self.max_connected_clusters)
    }
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("cannot decode value: {0}")]
    Decode(String),
    #[error("empty value")]
    EmptyValue,
    #[error("field {0} is empty")]
    EmptyField(&'static str),
    #[error("name {found:?} does not match key {key:?}")]
    NameMismatch { key: String, found: String },
    #[error("{field} is {found:?}, expected cluster {expected:?}")]
    ClusterMismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("cluster ID {found} does not match the remote cluster ID {expected}")]
    ClusterIdMismatch { expected: u32, found: u32 },
    #[error("{field} {value:?} is not a valid IP")]
    InvalidIp { field: &'static str, value: String },
    #[error("key {0:?} is not a numeric identity")]
    InvalidIdentity(String),
    #[error("identity {id} is outside the range {range} of cluster ID {cluster_id}")]
    IdentityOutOfRange {
        id: NumericIdentity,
        range: IdentityRange,
        cluster_id: u32,
    },
    #[error("labels lack {LABEL_SOURCE_K8S}:{POLICY_LABEL_CLUSTER}=<cluster>")]
    MissingClusterLabel,
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("label {0:?} is not a workload label (only k8s: and generated named ports are)")]
    NonWorkloadLabel(String),
    #[error("IP address {prefix:?} does not match key {key:?}")]
    IpKeyMismatch { key: String, prefix: String },
    #[error("ClusterID 0 is reserved")]
    ReservedClusterId,
    #[error("ClusterID {id} is not supported (max {max})")]
    InvalidClusterId { id: u32, max: u32 },
    #[error("remote maxConnectedClusters {remote} does not match the local setting {local}")]
    MaxConnectedClustersMismatch { local: u32, remote: u32 },
    #[error("clusterID {id} is already used by cluster {by:?}")]
    ClusterIdInUse { id: u32, by: String },
}

impl RejectReason {
    /// Stable short label, e.g. for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Decode(_) => "decode",
            RejectReason::EmptyValue => "empty-value",
            RejectReason::EmptyField(_) => "empty-field",
            RejectReason::NameMismatch { .. } => "name-mismatch",
            RejectReason::ClusterMismatch { .. } => "cluster-mismatch",
            RejectReason::ClusterIdMismatch { .. } => "cluster-id-mismatch",
            RejectReason::InvalidIp { .. } => "invalid-ip",
            RejectReason::InvalidIdentity(_) => "invalid-identity",
            RejectReason::IdentityOutOfRange { .. } => "identity-out-of-range",
            RejectReason::MissingClusterLabel => "missing-cluster-label",
            RejectReason::Labels(LabelError::DuplicateKey(key)) if key == POLICY_LABEL_CLUSTER => {
                "duplicate-cluster-label"
            }
            RejectReason::Labels(LabelError::DuplicateKey(_)) => "duplicate-label",
            RejectReason::Labels(LabelError::EmptyKey(_)) => "empty-label-key",
            RejectReason::NonWorkloadLabel(_) => "non-workload-label",
            RejectReason::IpKeyMismatch { .. } => "ip-key-mismatch",
            RejectReason::ReservedClusterId => "reserved-cluster-id",
            RejectReason::InvalidClusterId { .. } => "invalid-cluster-id",
            RejectReason::MaxConnectedClustersMismatch { .. } => "max-connected-clusters-mismatch",
            RejectReason::ClusterIdInUse { .. } => "cluster-id-in-use",
        }
    }
}

/// A refused value: which kind of data (`node`, `service`, `identity`, `ipcache`,
/// `cluster-config`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} rejected: {reason}")]
pub struct Rejection {
    pub kind: &'static str,
    pub reason: RejectReason,
}

impl Rejection {
    pub fn new(kind: &'static str, reason: RejectReason) -> Self {
        Rejection { kind, reason }
    }
}

/// What to do with a decoded remote service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// Shared: merge its backends.
    Upsert(KvClusterService),
    /// `shared: false`: ignore it, or delete it if it was imported before.
    NotShared(KvClusterService),
}

/// A decoded identity (`…/id/<n>` → labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvIdentity {
    pub id: NumericIdentity,
    pub labels: LabelArray,
}

/// Decodes JSON, mapping empty input and decoder errors to rejections.
fn decode_json<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    value: &[u8],
) -> Result<T, Rejection> {
    if value.is_empty() {
        return Err(Rejection::new(kind, RejectReason::EmptyValue));
    }
    json::from_json(value, kind).map_err(|e| {
        let msg = match e {
            WireError::Decode { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        Rejection::new(kind, RejectReason::Decode(msg))
    })
}

fn require(kind: &'static str, field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        Err(Rejection::new(kind, RejectReason::EmptyField(field)))
    } else {
        Ok(())
    }
}

fn check_cluster(
    kind: &'static str,
    field: &'static str,
    remote: &RemoteContext,
    found: &str,
) -> Result<(), Rejection> {
    if found == remote.name {
        Ok(())
    } else {
        Err(Rejection::new(
            kind,
            RejectReason::ClusterMismatch {
                field,
                expected: remote.name.clone(),
                found: found.to_owned(),
            },
        ))
    }
}

fn check_cluster_id(
    kind: &'static str,
    remote: &RemoteContext,
    found: u32,
) -> Result<(), Rejection> {
    if found == remote.cluster_id {
        Ok(())
    } else {
        Err(Rejection::new(
            kind,
            RejectReason::ClusterIdMismatch {
                expected: remote.cluster_id,
                found,
            },
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Cluster config

/// Decodes a remote's `cilium/cluster-config/<name>` and applies Cilium's checks against the
/// local `maxConnectedClusters`: ID 0 is reserved, IDs above the local maximum are refused,
/// and unless the local setting is the default 255 the remote must use the same setting.
/// (Duplicate IDs across remotes: [`check_cluster_id_available`].)
pub fn decode_remote_cluster_config(
    local_max: MaxConnectedClusters,
    value: &[u8],
) -> Result<KvClusterConfig, Rejection> {
    let kind = KIND_CLUSTER_CONFIG;
    let config: KvClusterConfig = decode_json(kind, value)?;
    validate_cluster_id(config.id, local_max).map_err(|e| {
        let reason = match e {
            ClusterError::ReservedClusterId => RejectReason::ReservedClusterId,
            _ => RejectReason::InvalidClusterId {
                id: config.id,
                max: local_max.cluster_id_max(),
            },
        };
        Rejection::new(kind, reason)
    })?;
    let remote_max = config.capabilities.max_connected_clusters;
    if local_max != MaxConnectedClusters::Max255 && remote_max != local_max.value() {
        return Err(Rejection::new(
            kind,
            RejectReason::MaxConnectedClustersMismatch {
                local: local_max.value(),
                remote: remote_max,
            },
        ));
    }
    Ok(config)
}

/// Refuses a cluster ID already held by another connected remote (`in_use`: name → ID).
/// The remote itself may keep its ID across reconnects.
pub fn check_cluster_id_available<'a>(
    remote_name: &str,
    id: u32,
    in_use: impl IntoIterator<Item = (&'a str, u32)>,
) -> Result<(), Rejection> {
    match in_use
        .into_iter()
        .find(|(name, used)| *used == id && *name != remote_name)
    {
        Some((by, _)) => Err(Rejection::new(
            KIND_CLUSTER_CONFIG,
            RejectReason::ClusterIdInUse {
                id,
                by: by.to_owned(),
            },
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// Decodes a node of our own cluster (kvstore mode): decodable, named, and its name matches
/// the key.
pub fn decode_local_node(key_suffix: &str, value: &[u8]) -> Result<KvNode, Rejection> {
    let kind = KIND_NODE;
    let node: KvNode = decode_json(kind, value)?;
    require(kind, "Name", &node.name)?;
    require(kind, "Cluster", &node.cluster)?;
    if node.name != key_suffix {
        return Err(Rejection::new(
            kind,
            RejectReason::NameMismatch {
                key: key_suffix.to_owned(),
                found: node.name,
            },
        ));
    }
    Ok(node)
}

/// Decodes a remote node: as [`decode_local_node`], plus `Cluster` must be the remote's name
/// and `ClusterID` its config ID.
pub fn decode_remote_node(
    remote: &RemoteContext,
    key_suffix: &str,
    value: &[u8],
) -> Result<KvNode, Rejection> {
    let node = decode_local_node(key_suffix, value)?;
    check_cluster(KIND_NODE, "Cluster", remote, &node.cluster)?;
    check_cluster_id(KIND_NODE, remote, node.cluster_id)?;
    Ok(node)
}

// ---------------------------------------------------------------------------------------
// Services

/// Decodes a service of our own cluster: decodable, non-empty names, `<ns>/<name>` matches
/// the key, and every frontend/backend key is an IP.
pub fn decode_local_service(key_suffix: &str, value: &[u8]) -> Result<KvClusterService, Rejection> {
    let kind = KIND_SERVICE;
    let svc: KvClusterService = decode_json(kind, value)?;
    require(kind, "cluster", &svc.cluster)?;
    require(kind, "namespace", &svc.namespace)?;
    require(kind, "name", &svc.name)?;
    let nn = svc.namespaced_name();
    if nn != key_suffix {
        return Err(Rejection::new(
            kind,
            RejectReason::NameMismatch {
                key: key_suffix.to_owned(),
                found: nn,
            },
        ));
    }
    let addrs = svc
        .frontends
        .keys()
        .map(|a| ("frontend", a))
        .chain(svc.backends.keys().map(|a| ("backend", a)));
    for (field, addr) in addrs {
        if addr.parse::<IpAddr>().is_err() {
            return Err(Rejection::new(
                kind,
                RejectReason::InvalidIp {
                    field,
                    value: addr.clone(),
                },
            ));
        }
    }
    Ok(svc)
}

/// Decodes a remote service: as [`decode_local_service`], plus `cluster` and `clusterID` must
/// be the remote's. A valid service with `shared: false` is not a rejection but
/// [`ServiceOutcome::NotShared`].
pub fn decode_remote_service(
    remote: &RemoteContext,
    key_suffix: &str,
    value: &[u8],
) -> Result<ServiceOutcome, Rejection> {
    let svc = decode_local_service(key_suffix, value)?;
    check_cluster(KIND_SERVICE, "cluster", remote, &svc.cluster)?;
    check_cluster_id(KIND_SERVICE, remote, svc.cluster_id)?;
    Ok(if svc.shared {
        ServiceOutcome::Upsert(svc)
    } else {
        ServiceOutcome::NotShared(svc)
    })
}

// ---------------------------------------------------------------------------------------
// Identities

/// The ID of an identity key (after an optional leading `/`, decimal) and its label list,
/// which must hold each key once and something at all.
fn decode_identity(key_suffix: &str, value: &[u8]) -> Result<KvIdentity, Rejection> {
    let kind = KIND_IDENTITY;
    let digits = key_suffix.strip_prefix('/').unwrap_or(key_suffix);
    // `parse` alone would accept a leading '+'.
    let id = digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse::<NumericIdentity>().ok())
        .flatten()
        .ok_or_else(|| {
            Rejection::new(kind, RejectReason::InvalidIdentity(key_suffix.to_owned()))
        })?;
    if value.is_empty() {
        return Err(Rejection::new(kind, RejectReason::EmptyValue));
    }
    let list = std::str::from_utf8(value)
        .map_err(|e| Rejection::new(kind, RejectReason::Decode(format!("labels: {e}"))))?;
    let labels = LabelArray::parse_sorted_list(list).map_err(|e| Rejection::new(kind, e.into()))?;
    if labels.is_empty() {
        return Err(Rejection::new(kind, RejectReason::EmptyValue));
    }
    Ok(KvIdentity { id, labels })
}

/// Refuses identities carrying labels no workload has (see `Label::is_workload_label`).
fn check_workload_labels(ident: KvIdentity) -> Result<KvIdentity, Rejection> {
    if let Some(l) = ident.labels.iter().find(|l| !l.is_workload_label()) {
        let reason = RejectReason::NonWorkloadLabel(l.to_string());
        return Err(Rejection::new(KIND_IDENTITY, reason));
    }
    Ok(ident)
}

/// Decodes an identity of our own cluster: the key is a decimal ID, the value a non-empty
/// label list with each key once (a repeated key is ambiguous: Cilium matches the first,
/// strait cannot hold both), and every label a workload's: a global identity with
/// `reserved:host` would be treated as the host by entity rules.
pub fn decode_local_identity(key_suffix: &str, value: &[u8]) -> Result<KvIdentity, Rejection> {
    check_workload_labels(decode_identity(key_suffix, value)?)
}

/// Decodes a remote identity: as [`decode_local_identity`], plus the ID must lie in the
/// remote's allocation range and the labels must carry exactly one
/// `io.cilium.k8s.policy.cluster` label, of source `k8s`, naming the remote (Cilium's
/// `clusterIDValidator` and `clusterNameValidator`; the label rules are stricter).
pub fn decode_remote_identity(
    remote: &RemoteContext,
    key_suffix: &str,
    value: &[u8],
) -> Result<KvIdentity, Rejection> {
    let kind = KIND_IDENTITY;
    let ident = decode_identity(key_suffix, value)?;
    let range = remote.identity_range();
    if !range.contains(ident.id) {
        return Err(Rejection::new(
            kind,
            RejectReason::IdentityOutOfRange {
                id: ident.id,
                range,
                cluster_id: remote.cluster_id,
            },
        ));
    }
    match ident.labels.cluster_name() {
        None => Err(Rejection::new(kind, RejectReason::MissingClusterLabel)),
        Some(c) => check_cluster(kind, "label io.cilium.k8s.policy.cluster", remote, c),
    }?;
    check_workload_labels(ident)
}

// ---------------------------------------------------------------------------------------
// ipcache

/// Decodes an ipcache entry of our own cluster: decodable, a usable IP/prefix, and its
/// prefix string equals the key. No identity remapping (see
/// `identity::remote_view_of_identity`).
pub fn decode_local_ipcache(key_suffix: &str, value: &[u8]) -> Result<IpIdentityPair, Rejection> {
    let kind = KIND_IPCACHE;
    let pair: IpIdentityPair = decode_json(kind, value)?;
    if pair.prefix().is_none() {
        let value = match (&pair.ip, &pair.mask) {
            (None, _) => String::new(),
            (Some(ip), mask) => format!("{ip} mask {:?}", mask.as_ref().map(|m| &m.0)),
        };
        return Err(Rejection::new(
            kind,
            RejectReason::InvalidIp { field: "IP", value },
        ));
    }
    let prefix = pair.prefix_string();
    if prefix != key_suffix {
        return Err(Rejection::new(
            kind,
            RejectReason::IpKeyMismatch {
                key: key_suffix.to_owned(),
                prefix,
            },
        ));
    }
    Ok(pair)
}

/// Decodes a remote ipcache entry: as [`decode_local_ipcache`], plus the identity must be
/// reserved (< 256, not cluster-scoped) or in the remote's range. The remote's `host`
/// identity (1) is returned as `remote-node` (6), as Cilium imports it.
pub fn decode_remote_ipcache(
    remote: &RemoteContext,
    key_suffix: &str,
    value: &[u8],
) -> Result<IpIdentityPair, Rejection> {
    let mut pair = decode_local_ipcache(key_suffix, value)?;
    let range = remote.identity_range();
    if !identity::is_reserved(pair.id) && !range.contains(pair.id) {
        return Err(Rejection::new(
            KIND_IPCACHE,
            RejectReason::IdentityOutOfRange {
                id: pair.id,
                range,
                cluster_id: remote.cluster_id,
            },
        ));
    }
    pair.id = identity::remote_view_of_identity(pair.id);
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD};
    use crate::wire::{ipcache, node, service};
    use MaxConnectedClusters::*;

    fn c1() -> RemoteContext {
        RemoteContext::new("c1", 1, Max255)
    }

    fn reason<T: std::fmt::Debug>(r: Result<T, Rejection>) -> &'static str {
        r.expect_err("expected a rejection").reason.as_str()
    }

    fn kind<T: std::fmt::Debug>(r: Result<T, Rejection>) -> &'static str {
        r.expect_err("expected a rejection").kind
    }

    // ---- cluster config

    #[test]
    fn cluster_config_rules() {
        let ok = br#"{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;
        let c = decode_remote_cluster_config(Max255, ok).unwrap();
        assert_eq!(c.id, 1);
        assert_eq!(RemoteContext::from_config("c1", &c, Max255), c1());

        // Pre-1.15 remote without maxConnectedClusters is fine with the default local setting.
        assert!(decode_remote_cluster_config(Max255, br#"{"id":7}"#).is_ok());
        // … and a remote at 511 too: only a non-default *local* setting is enforced.
        let r511 = br#"{"id":300,"capabilities":{"maxConnectedClusters":511}}"#;
        assert_eq!(
            reason(decode_remote_cluster_config(Max255, r511)),
            "invalid-cluster-id"
        );
        assert!(decode_remote_cluster_config(Max511, r511).is_ok());

        let r = decode_remote_cluster_config(Max255, br#"{"capabilities":{}}"#);
        assert_eq!(kind(r.clone()), "cluster-config");
        assert_eq!(reason(r), "reserved-cluster-id");
        assert_eq!(
            reason(decode_remote_cluster_config(Max255, br#"{"id":256}"#)),
            "invalid-cluster-id"
        );
        assert_eq!(
            reason(decode_remote_cluster_config(Max511, br#"{"id":5}"#)),
            "max-connected-clusters-mismatch"
        );
        assert_eq!(
            reason(decode_remote_cluster_config(
                Max511,
                br#"{"id":5,"capabilities":{"maxConnectedClusters":255}}"#
            )),
            "max-connected-clusters-mismatch"
        );
        assert_eq!(
            reason(decode_remote_cluster_config(Max255, b"")),
            "empty-value"
        );
        assert_eq!(reason(decode_remote_cluster_config(Max255, b"{")), "decode");
    }

    #[test]
    fn cluster_id_in_use() {
        let used = [("c1", 1), ("c2", 2)];
        assert!(check_cluster_id_available("c3", 3, used).is_ok());
        assert!(check_cluster_id_available("c1", 1, used).is_ok());
        let r = check_cluster_id_available("c3", 2, used);
        assert_eq!(reason(r.clone()), "cluster-id-in-use");
        assert!(r.unwrap_err().to_string().contains("\"c2\""));
    }

    // ---- nodes

    fn node_json(edit: impl FnOnce(&mut KvNode)) -> Vec<u8> {
        let mut n = node::tests::golden_node();
        edit(&mut n);
        n.encode().unwrap()
    }

    #[test]
    fn node_accepted() {
        let json = node::tests::golden_json();
        let n = decode_remote_node(&c1(), "node-a", json.as_bytes()).unwrap();
        assert_eq!(n, node::tests::golden_node());
        assert!(decode_local_node("node-a", json.as_bytes()).is_ok());
    }

    #[test]
    fn node_rules() {
        let r = c1();
        let d = |suffix: &str, v: Vec<u8>| decode_remote_node(&r, suffix, &v);
        assert_eq!(kind(d("node-b", node_json(|_| {}))), "node");
        assert_eq!(reason(d("node-b", node_json(|_| {}))), "name-mismatch");
        assert_eq!(
            reason(d("node-a", node_json(|n| n.cluster = "c2".into()))),
            "cluster-mismatch"
        );
        assert_eq!(
            reason(d("node-a", node_json(|n| n.cluster_id = 2))),
            "cluster-id-mismatch"
        );
        assert_eq!(
            reason(d("node-a", node_json(|n| n.cluster_id = 0))),
            "cluster-id-mismatch"
        );
        assert_eq!(reason(d("", node_json(|n| n.name.clear()))), "empty-field");
        assert_eq!(
            reason(d("node-a", node_json(|n| n.cluster.clear()))),
            "empty-field"
        );
        assert_eq!(reason(d("node-a", Vec::new())), "empty-value");
        assert_eq!(reason(d("node-a", b"[1]".to_vec())), "decode");
        assert_eq!(
            reason(d(
                "node-a",
                br#"{"Name":"node-a","Cluster":"c1","ClusterID":1,"IPv4HealthIP":"x"}"#.to_vec()
            )),
            "decode"
        );
        // Own cluster: the remote rules do not apply.
        assert!(decode_local_node("node-a", &node_json(|n| n.cluster_id = 9)).is_ok());
        assert_eq!(
            reason(decode_local_node("node-b", &node_json(|_| {}))),
            "name-mismatch"
        );
    }

    // ---- services

    fn svc_json(edit: impl FnOnce(&mut KvClusterService)) -> Vec<u8> {
        let mut s = service::tests::golden_service();
        edit(&mut s);
        s.encode().unwrap()
    }

    #[test]
    fn service_accepted_and_not_shared() {
        let r = c1();
        let out =
            decode_remote_service(&r, "default/rebel-base", service::tests::GOLDEN.as_bytes());
        assert_eq!(
            out,
            Ok(ServiceOutcome::Upsert(service::tests::golden_service()))
        );
        let out = decode_remote_service(&r, "default/rebel-base", &svc_json(|s| s.shared = false));
        assert!(matches!(out, Ok(ServiceOutcome::NotShared(s)) if s.name == "rebel-base"));
        // Not shared but invalid: still a rejection.
        let out = decode_remote_service(
            &r,
            "default/rebel-base",
            &svc_json(|s| {
                s.shared = false;
                s.cluster_id = 3;
            }),
        );
        assert_eq!(reason(out), "cluster-id-mismatch");
    }

    #[test]
    fn service_rules() {
        let r = c1();
        let d = |suffix: &str, v: Vec<u8>| decode_remote_service(&r, suffix, &v);
        let key = "default/rebel-base";
        assert_eq!(kind(d("default/other", svc_json(|_| {}))), "service");
        assert_eq!(
            reason(d("default/other", svc_json(|_| {}))),
            "name-mismatch"
        );
        assert_eq!(reason(d("rebel-base", svc_json(|_| {}))), "name-mismatch");
        assert_eq!(
            reason(d(key, svc_json(|s| s.cluster = "c2".into()))),
            "cluster-mismatch"
        );
        assert_eq!(
            reason(d(key, svc_json(|s| s.cluster_id = 2))),
            "cluster-id-mismatch"
        );
        assert_eq!(
            reason(d(key, svc_json(|s| s.cluster.clear()))),
            "empty-field"
        );
        assert_eq!(
            reason(d("/rebel-base", svc_json(|s| s.namespace.clear()))),
            "empty-field"
        );
        assert_eq!(
            reason(d("default/", svc_json(|s| s.name.clear()))),
            "empty-field"
        );
        let bad_frontend = svc_json(|s| {
            s.frontends.insert("my-host".into(), Default::default());
        });
        assert_eq!(reason(d(key, bad_frontend)), "invalid-ip");
        let bad_backend = svc_json(|s| {
            s.backends.insert("fe80::1%eth0".into(), Default::default());
        });
        assert_eq!(reason(d(key, bad_backend)), "invalid-ip");
        assert_eq!(reason(d(key, Vec::new())), "empty-value");
        assert_eq!(reason(d(key, br#"{"cluster":5}"#.to_vec())), "decode");
        assert!(decode_local_service(key, &svc_json(|s| s.cluster = "mine".into())).is_ok());
    }

    // ---- identities

    const LABELS: &str =
        "k8s:app=foo;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;";

    #[test]
    fn identity_accepted() {
        let r = c1();
        let i = decode_remote_identity(&r, "65538", LABELS.as_bytes()).unwrap();
        assert_eq!(i.id, 65538);
        assert_eq!(i.labels.to_sorted_list(), LABELS);
        // The allocator's prefix has no trailing slash: accept a leading one in the suffix.
        assert_eq!(
            decode_remote_identity(&r, "/65536", LABELS.as_bytes())
                .unwrap()
                .id,
            65536
        );
        assert!(decode_remote_identity(&r, "131071", LABELS.as_bytes()).is_ok());
    }

    #[test]
    fn identity_rules() {
        let r = c1();
        let d = |k: &str, v: &str| decode_remote_identity(&r, k, v.as_bytes());
        assert_eq!(kind(d("x", LABELS)), "identity");
        for bad_key in ["x", "", "+65536", "-1", "65536/1", "99999999999"] {
            assert_eq!(
                reason(d(bad_key, LABELS)),
                "invalid-identity",
                "{bad_key:?}"
            );
        }
        assert_eq!(reason(d("65535", LABELS)), "identity-out-of-range");
        assert_eq!(reason(d("131072", LABELS)), "identity-out-of-range");
        assert_eq!(reason(d("6", LABELS)), "identity-out-of-range");
        assert_eq!(reason(d("65536", "")), "empty-value");
        assert_eq!(reason(d("65536", ";;")), "empty-value");
        assert_eq!(reason(d("65536", "k8s:app=foo;")), "missing-cluster-label");
        // The label must come from the k8s source.
        assert_eq!(
            reason(d("65536", "unspec:io.cilium.k8s.policy.cluster=c1;")),
            "missing-cluster-label"
        );
        assert_eq!(
            reason(d("65536", "k8s:io.cilium.k8s.policy.cluster=c2;")),
            "cluster-mismatch"
        );
        assert_eq!(
            reason(decode_remote_identity(&r, "65536", b"k8s:a=\xff;")),
            "decode"
        );
        // 511-cluster mesh: ranges shrink.
        let r511 = RemoteContext::new("c1", 1, Max511);
        assert!(decode_remote_identity(&r511, "32768", LABELS.as_bytes()).is_ok());
        assert_eq!(
            reason(decode_remote_identity(&r511, "65536", LABELS.as_bytes())),
            "identity-out-of-range"
        );
        // Own cluster: no range or label rule.
        assert!(decode_local_identity("300", "k8s:app=foo;".as_bytes()).is_ok());
        assert_eq!(reason(decode_local_identity("300", b"")), "empty-value");
    }

    /// Each hostile label list next to c1's valid cluster label, with the reason counted.
    #[test]
    fn identity_label_rules() {
        let r = c1();
        let d = |v: &str| reason(decode_remote_identity(&r, "65536", v.as_bytes()));
        let cluster = "k8s:io.cilium.k8s.policy.cluster=c1;";
        // A repeated key: Cilium would match the first occurrence.
        assert_eq!(
            d(&format!("k8s:app=a;k8s:app=b;{cluster}")),
            "duplicate-label"
        );
        assert_eq!(
            d(&format!("{cluster}k8s:app=a;reserved:app=;")),
            "duplicate-label"
        );
        // A second cluster label naming the local cluster, before or after the remote's own,
        // of any source: Cilium rejects these too.
        for second in [
            "k8s:io.cilium.k8s.policy.cluster=cluster-usa;",
            "unspec:io.cilium.k8s.policy.cluster=cluster-usa;",
            "any:io.cilium.k8s.policy.cluster=c1;",
        ] {
            assert_eq!(d(&format!("{cluster}{second}")), "duplicate-cluster-label");
            assert_eq!(d(&format!("{second}{cluster}")), "duplicate-cluster-label");
        }
        // Labels of reserved identities and other non-workload sources.
        for other in [
            "reserved:host=;",
            "$host;",
            "reserved:remote-node=;",
            "reserved:kube-apiserver=;",
            "cidr:0.0.0.0/0=;",
            "fqdn:example.com=;",
            "node:kubernetes.io/hostname=n1;",
            "container:app=x;",
            "unspec:app=x;",
            "any:app=x;",
            "gen:app=x;",
        ] {
            assert_eq!(
                d(&format!("k8s:team=a;{cluster}{other}")),
                "non-workload-label",
                "{other}"
            );
        }
        assert_eq!(d(&format!("k8s:=x;{cluster}")), "empty-label-key");
        // Cilium 1.20's generated named-ports labels are a workload's.
        let named = format!(
            "gen:io.cilium.k8s.named-ports=http:TCP:80;gen:io.cilium.k8s.named-ports-1=dns:UDP:53;k8s:app=a;{cluster}"
        );
        assert!(decode_remote_identity(&r, "65536", named.as_bytes()).is_ok());
        let r = decode_remote_identity(
            &c1(),
            "65536",
            format!("{cluster}reserved:host=;").as_bytes(),
        );
        assert_eq!(
            r.unwrap_err().to_string(),
            "identity rejected: label \"reserved:host=\" is not a workload label (only k8s: and generated named ports are)"
        );
    }

    #[test]
    fn local_identity_label_rules() {
        let d = |v: &str| reason(decode_local_identity("300", v.as_bytes()));
        assert_eq!(d("k8s:app=a;k8s:app=b;"), "duplicate-label");
        assert_eq!(
            d("k8s:io.cilium.k8s.policy.cluster=a;k8s:io.cilium.k8s.policy.cluster=b;"),
            "duplicate-cluster-label"
        );
        assert_eq!(d("k8s:app=a;reserved:host=;"), "non-workload-label");
        assert_eq!(d("k8s:=a;"), "empty-label-key");
    }

    #[test]
    fn identity_ranges_of_other_clusters() {
        let labels = "k8s:io.cilium.k8s.policy.cluster=c2;";
        let r = RemoteContext::new("c2", 2, Max255);
        assert!(decode_remote_identity(&r, "131072", labels.as_bytes()).is_ok());
        assert!(decode_remote_identity(&r, "196607", labels.as_bytes()).is_ok());
        assert_eq!(
            reason(decode_remote_identity(&r, "196608", labels.as_bytes())),
            "identity-out-of-range"
        );
        let labels = "k8s:io.cilium.k8s.policy.cluster=c511;";
        let r = RemoteContext::new("c511", 511, Max511);
        assert!(decode_remote_identity(&r, "16744448", labels.as_bytes()).is_ok());
        assert!(decode_remote_identity(&r, "16777215", labels.as_bytes()).is_ok());
        assert_eq!(
            reason(decode_remote_identity(&r, "16777216", labels.as_bytes())),
            "identity-out-of-range"
        );
    }

    // ---- ipcache

    fn ip_json(edit: impl FnOnce(&mut IpIdentityPair)) -> Vec<u8> {
        let mut p = ipcache::tests::golden_pair();
        p.id = 65540;
        edit(&mut p);
        p.encode().unwrap()
    }

    #[test]
    fn ipcache_accepted_and_remapped() {
        let r = c1();
        let p = decode_remote_ipcache(&r, "10.6.6.43", &ip_json(|_| {})).unwrap();
        assert_eq!(p.id, 65540);
        let p = decode_remote_ipcache(&r, "10.6.6.43", &ip_json(|p| p.id = IDENTITY_HOST)).unwrap();
        assert_eq!(p.id, IDENTITY_REMOTE_NODE);
        let p =
            decode_remote_ipcache(&r, "10.6.6.43", &ip_json(|p| p.id = IDENTITY_WORLD)).unwrap();
        assert_eq!(p.id, IDENTITY_WORLD);
        let p = decode_remote_ipcache(&r, "10.6.6.43", &ip_json(|p| p.id = 255)).unwrap();
        assert_eq!(p.id, 255);
        let prefix = ip_json(|p| {
            p.ip = Some("10.0.0.0".parse().unwrap());
            p.mask = Some(crate::wire::IpMask::from_prefix_len(24, true));
        });
        assert!(decode_remote_ipcache(&r, "10.0.0.0/24", &prefix).is_ok());
        // Own cluster: no range rule, no remap.
        let p = decode_local_ipcache("10.6.6.43", &ip_json(|p| p.id = IDENTITY_HOST)).unwrap();
        assert_eq!(p.id, IDENTITY_HOST);
        assert!(decode_local_ipcache("10.6.6.43", &ip_json(|p| p.id = 9_000_000)).is_ok());
        // The reference example itself (cluster 0 identity 12928) is fine locally.
        assert!(decode_local_ipcache("10.6.6.43", ipcache::tests::GOLDEN.as_bytes()).is_ok());
    }

    #[test]
    fn ipcache_rules() {
        let r = c1();
        let d = |k: &str, v: Vec<u8>| decode_remote_ipcache(&r, k, &v);
        assert_eq!(kind(d("10.6.6.44", ip_json(|_| {}))), "ipcache");
        assert_eq!(reason(d("10.6.6.44", ip_json(|_| {}))), "ip-key-mismatch");
        assert_eq!(
            reason(d("10.6.6.43/32", ip_json(|_| {}))),
            "ip-key-mismatch"
        );
        let prefix = ip_json(|p| p.mask = Some(crate::wire::IpMask::from_prefix_len(32, true)));
        assert_eq!(reason(d("10.6.6.43", prefix)), "ip-key-mismatch");
        assert_eq!(reason(d("", ip_json(|p| p.ip = None))), "invalid-ip");
        let bad_mask = ip_json(|p| p.mask = Some(crate::wire::IpMask(vec![255, 0, 255, 0])));
        assert_eq!(reason(d("10.6.6.43/0", bad_mask)), "invalid-ip");
        // ipcache's own example carries a cluster-0 identity: out of c1's range.
        assert_eq!(
            reason(d("10.6.6.43", ipcache::tests::GOLDEN.as_bytes().to_vec())),
            "identity-out-of-range"
        );
        assert_eq!(
            reason(d("10.6.6.43", ip_json(|p| p.id = 131072))),
            "identity-out-of-range"
        );
        assert_eq!(
            reason(d("10.6.6.43", ip_json(|p| p.id = 256))),
            "identity-out-of-range"
        );
        assert_eq!(
            reason(d(
                "10.6.6.43",
                ip_json(|p| p.id = crate::identity::LOCAL_SCOPE_FLAG | 65540)
            )),
            "identity-out-of-range"
        );
        assert_eq!(reason(d("10.6.6.43", Vec::new())), "empty-value");
        assert_eq!(
            reason(d("10.6.6.43", br#"{"IP":"10.6.6.43","ID":"x"}"#.to_vec())),
            "decode"
        );
    }

    #[test]
    fn displays() {
        let r =
            decode_remote_node(&c1(), "node-b", node::tests::golden_json().as_bytes()).unwrap_err();
        assert_eq!(
            r.to_string(),
            "node rejected: name \"node-a\" does not match key \"node-b\""
        );
        let r = Rejection::new(
            KIND_IDENTITY,
            RejectReason::IdentityOutOfRange {
                id: 5,
                range: IdentityRange::for_cluster(1, Max255),
                cluster_id: 1,
            },
        );
        assert_eq!(
            r.to_string(),
            "identity rejected: identity 5 is outside the range 65536-131071 of cluster ID 1"
        );
    }
}
