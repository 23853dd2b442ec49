//! etcd keys and prefixes exactly as Cilium lays them out (§1 of the wire-format reference):
//! `cilium/state/…` written by a cluster's own publisher, `cilium/cache/…` written by
//! KVStoreMesh for remote clusters, sync canaries under `cilium/synced/…`.

use std::fmt;

use crate::identity::NumericIdentity;

pub const BASE_KEY_PREFIX: &str = "cilium";
pub const STATE_PREFIX: &str = "cilium/state";
pub const CACHE_PREFIX: &str = "cilium/cache";
pub const INIT_LOCK_PATH: &str = "cilium/.initlock";
pub const HEARTBEAT_PATH: &str = "cilium/.heartbeat";
/// etcd election under which one process of a cluster publishes its config, heartbeat and
/// global services (strait's own key, outside Cilium's trees).
pub const PUBLISHER_ELECTION_PREFIX: &str = "cilium/.strait/service-exporter";
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config";
pub const SYNCED_PREFIX: &str = "cilium/synced";
/// Only Cilium ≤ v1.14 used it: its presence made a missing cluster config fatal.
pub const HAS_CLUSTER_CONFIG_PATH: &str = "cilium/.has-cluster-config";

pub const NODE_STORE_PREFIX: &str = "cilium/state/nodes/v1";
pub const SERVICE_STORE_PREFIX: &str = "cilium/state/services/v1";
pub const IDENTITIES_PATH: &str = "cilium/state/identities/v1";
pub const IP_IDENTITIES_PATH: &str = "cilium/state/ip/v1";
pub const SERVICE_EXPORT_STORE_PREFIX: &str = "cilium/state/serviceexports/v1";
/// Cilium main only (zstd protobuf values); listed for completeness.
pub const ENDPOINT_SLICE_STORE_PREFIX: &str = "cilium/state/endpointslices/v1";

/// The ipcache "address space" segment of state keys: always `default`, not a cluster name.
pub const DEFAULT_ADDRESS_SPACE: &str = "default";

/// Identity master keys live under `<base>/id/<n>`; kvstore-mode agents also write
/// `<base>/value/<labels>/<node>` and take locks under `<base>/locks/`.
pub const IDENTITY_ID_SEGMENT: &str = "id";
pub const IDENTITY_VALUE_SEGMENT: &str = "value";
pub const IDENTITY_LOCKS_SEGMENT: &str = "locks";

/// Cilium's `StateToCachePrefix`: a leading `cilium/state` becomes `cilium/cache` (first
/// occurrence only); anything else is returned unchanged.
pub fn state_to_cache_prefix(prefix: &str) -> String {
    match prefix.strip_prefix(STATE_PREFIX) {
        Some(rest) => format!("{CACHE_PREFIX}{rest}"),
        None => prefix.to_owned(),
    }
}

/// `cilium/cluster-config/<name>`.
pub fn cluster_config_key(cluster: &str) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}/{cluster}")
}

/// Cluster name of a `cilium/cluster-config/<name>` key.
pub fn parse_cluster_config_key(key: &str) -> Option<&str> {
    let name = key.strip_prefix(CLUSTER_CONFIG_PREFIX)?.strip_prefix('/')?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// `cilium/synced/<cluster>/` — everything a reader list-watches for canaries.
pub fn synced_prefix(cluster: &str) -> String {
    format!("{SYNCED_PREFIX}/{cluster}/")
}

/// `cilium/synced/<cluster>/<synced_key>` (Go `path.Join`, so no doubled slashes).
pub fn synced_canary_key(cluster: &str, synced_key: &str) -> String {
    format!(
        "{SYNCED_PREFIX}/{cluster}/{}",
        synced_key.trim_start_matches('/')
    )
}

/// The registered prefix a canary announces: the key minus `cilium/synced/<remote>/`.
/// Readers compare it with [`DataKind::canary_prefix`] for exact equality.
pub fn canary_registration<'a>(key: &'a str, remote: &str) -> Option<&'a str> {
    key.strip_prefix(SYNCED_PREFIX)?
        .strip_prefix('/')?
        .strip_prefix(remote)?
        .strip_prefix('/')
}

/// `cilium/state/nodes/v1/<cluster>/<node>`.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{NODE_STORE_PREFIX}/{cluster}/{node}")
}

/// `cilium/state/services/v1/<cluster>/<namespace>/<name>`.
pub fn service_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{SERVICE_STORE_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`.
pub fn service_export_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{SERVICE_EXPORT_STORE_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/identities/v1/id/<n>`.
pub fn identity_id_key(id: NumericIdentity) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_ID_SEGMENT}/{id}")
}

/// `cilium/state/identities/v1/id/` (every master key).
pub fn identity_id_prefix() -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_ID_SEGMENT}/")
}

/// `cilium/state/identities/v1/value/<labels>/`: the references of one label set (labels in
/// sorted-list form, which ends with `;`).
pub fn identity_value_prefix(labels: &str) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_VALUE_SEGMENT}/{labels}/")
}

/// `cilium/state/identities/v1/value/<labels>/<suffix>`: one node's reference.
pub fn identity_value_key(labels: &str, suffix: &str) -> String {
    format!("{}{suffix}", identity_value_prefix(labels))
}

/// Cilium's `prefixMatchesKey`: a reference key belongs to `labels` only if its last `/` ends
/// the prefix (labels may hold `/`, suffixes may not, so `value/<labels>/x/y` belongs to
/// longer labels).
pub fn identity_value_belongs_to(labels: &str, key: &str) -> bool {
    key.strip_prefix(&identity_value_prefix(labels))
        .is_some_and(|suffix| !suffix.contains('/'))
}

/// The allocation lock of a label set: `cilium/state/identities/v1/locks/<labels>`.
pub fn identity_lock_path(labels: &str) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_LOCKS_SEGMENT}/{labels}")
}

/// The GC lock of a master key: `cilium/state/identities/v1/locks/id/<n>`.
pub fn identity_gc_lock_path(id: NumericIdentity) -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_LOCKS_SEGMENT}/{IDENTITY_ID_SEGMENT}/{id}")
}

/// `cilium/state/identities/v1/locks/` (every allocation and GC lock).
pub fn identity_locks_prefix() -> String {
    format!("{IDENTITIES_PATH}/{IDENTITY_LOCKS_SEGMENT}/")
}

/// The numeric identity of a master key (`…/id/<n>`).
pub fn parse_identity_id_key(key: &str) -> Option<NumericIdentity> {
    key.strip_prefix(&identity_id_prefix())?.parse().ok()
}

/// `cilium/state/ip/v1/default/<ip-or-prefix>` (see `IpIdentityPair::prefix_string`).
pub fn ip_key(prefix_string: &str) -> String {
    format!("{IP_IDENTITIES_PATH}/{DEFAULT_ADDRESS_SPACE}/{prefix_string}")
}

/// The kinds of clustermesh data, each with its own prefix and sync canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataKind {
    Nodes,
    Services,
    Identities,
    IpCache,
    /// MCS-API service exports (Cilium ≥ v1.17).
    ServiceExports,
}

impl DataKind {
    pub const ALL: [DataKind; 5] = [
        DataKind::Nodes,
        DataKind::Services,
        DataKind::Identities,
        DataKind::IpCache,
        DataKind::ServiceExports,
    ];

    /// The path segment: `nodes`, `services`, `identities`, `ip`, `serviceexports`.
    pub fn segment(self) -> &'static str {
        match self {
            DataKind::Nodes => "nodes",
            DataKind::Services => "services",
            DataKind::Identities => "identities",
            DataKind::IpCache => "ip",
            DataKind::ServiceExports => "serviceexports",
        }
    }

    /// `cilium/state/<type>/v1`.
    pub fn state_prefix(self) -> &'static str {
        match self {
            DataKind::Nodes => NODE_STORE_PREFIX,
            DataKind::Services => SERVICE_STORE_PREFIX,
            DataKind::Identities => IDENTITIES_PATH,
            DataKind::IpCache => IP_IDENTITIES_PATH,
            DataKind::ServiceExports => SERVICE_EXPORT_STORE_PREFIX,
        }
    }

    /// `cilium/cache/<type>/v1`.
    pub fn cache_prefix(self) -> &'static str {
        match self {
            DataKind::Nodes => "cilium/cache/nodes/v1",
            DataKind::Services => "cilium/cache/services/v1",
            DataKind::Identities => "cilium/cache/identities/v1",
            DataKind::IpCache => "cilium/cache/ip/v1",
            DataKind::ServiceExports => "cilium/cache/serviceexports/v1",
        }
    }

    /// State prefix, or cache prefix when the remote is served by KVStoreMesh.
    pub fn base_prefix(self, cached: bool) -> &'static str {
        if cached {
            self.cache_prefix()
        } else {
            self.state_prefix()
        }
    }

    /// The prefix a reader registers for sync canaries: `cilium/{state,cache}/<type>/v1`.
    pub fn canary_prefix(self, cached: bool) -> &'static str {
        self.base_prefix(cached)
    }

    /// `cilium/synced/<cluster>/cilium/{state,cache}/<type>/v1`: the canary a writer of this
    /// data for `cluster` puts once its initial sync is complete.
    pub fn canary_key(self, cluster: &str, cached: bool) -> String {
        synced_canary_key(cluster, self.canary_prefix(cached))
    }

    /// The kind a canary announces, from its registered prefix (see [`canary_registration`]),
    /// with whether it is the cache variant.
    pub fn from_canary_prefix(prefix: &str) -> Option<(DataKind, bool)> {
        DataKind::ALL.into_iter().find_map(|k| {
            if prefix == k.state_prefix() {
                Some((k, false))
            } else if prefix == k.cache_prefix() {
                Some((k, true))
            } else {
                None
            }
        })
    }

    /// The prefix to list-watch for `cluster`'s data (§1.5). Always ends in `/` so `c1` does
    /// not match `c10`, except for identities: Cilium's allocator watches `<base>/id`
    /// without the slash. The state form of ipcache uses the address space, not the name.
    /// The same prefixes serve the agent's own cluster in kvstore mode (`cached = false`).
    pub fn watch_prefix(self, cluster: &str, cached: bool) -> String {
        let base = self.base_prefix(cached);
        match (self, cached) {
            (DataKind::Identities, false) => format!("{base}/{IDENTITY_ID_SEGMENT}"),
            (DataKind::Identities, true) => format!("{base}/{cluster}/{IDENTITY_ID_SEGMENT}"),
            (DataKind::IpCache, false) => format!("{base}/{DEFAULT_ADDRESS_SPACE}/"),
            _ => format!("{base}/{cluster}/"),
        }
    }

    /// The full key of a value whose decoder suffix is `suffix` (node name, `<ns>/<name>`,
    /// numeric identity, IP prefix string).
    pub fn key(self, cluster: &str, cached: bool, suffix: &str) -> String {
        let prefix = self.watch_prefix(cluster, cached);
        if self == DataKind::Identities {
            format!("{prefix}/{suffix}")
        } else {
            format!("{prefix}{suffix}")
        }
    }

    /// The decoder suffix of a key under [`DataKind::watch_prefix`]: the key with the prefix
    /// removed, and for identities also the optional leading `/` (as Cilium's allocator does).
    pub fn key_suffix<'a>(self, key: &'a str, cluster: &str, cached: bool) -> Option<&'a str> {
        let rest = key.strip_prefix(self.watch_prefix(cluster, cached).as_str())?;
        Some(if self == DataKind::Identities {
            rest.strip_prefix('/').unwrap_or(rest)
        } else {
            rest
        })
    }

    /// Name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::IpCache => "ipcache",
            other => other.segment(),
        }
    }
}

impl fmt::Display for DataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a reader of one remote cluster watches for one kind of data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchPrefix {
    pub kind: DataKind,
    /// Prefix to list-watch; strip it (and see [`DataKind::key_suffix`]) for the decoder key.
    pub prefix: String,
    /// Canary registration prefix: with `syncedCanaries`, start watching `prefix` only once
    /// `cilium/synced/<remote>/<canary>` exists.
    pub canary: &'static str,
}

/// The watch and canary prefixes of every data kind for `remote`, reading its own etcd
/// (`cached = false`) or a KVStoreMesh cache (`cached = true`, the config's `cached`
/// capability). Service exports are only to be watched when the remote config's
/// `serviceExportsEnabled` is non-null (`KvClusterConfig::exports_services_capability`).
pub fn watch_prefixes(remote: &str, cached: bool) -> [WatchPrefix; 5] {
    DataKind::ALL.map(|kind| WatchPrefix {
        kind,
        prefix: kind.watch_prefix(remote, cached),
        canary: kind.canary_prefix(cached),
    })
}

/// Splits a `cilium/state/<type>/v1/<rest>` key into its kind and `<rest>`.
pub fn parse_state_key(key: &str) -> Option<(DataKind, &str)> {
    DataKind::ALL.into_iter().find_map(|k| {
        let rest = key.strip_prefix(k.state_prefix())?.strip_prefix('/')?;
        Some((k, rest))
    })
}

/// Splits a `cilium/cache/<type>/v1/<remote>/<rest>` key into kind, remote and `<rest>`.
pub fn parse_cache_key(key: &str) -> Option<(DataKind, &str, &str)> {
    DataKind::ALL.into_iter().find_map(|k| {
        let rest = key.strip_prefix(k.cache_prefix())?.strip_prefix('/')?;
        let (remote, rest) = rest.split_once('/')?;
        (!remote.is_empty()).then_some((k, remote, rest))
    })
}

/// Where KVStoreMesh mirrors a state key read from `remote`'s etcd: the cluster segment
/// stays (nodes, services, exports), identities gain `<remote>/` before `id/`, and ipcache's
/// `default` address space is replaced by `<remote>`. `None` for keys outside those trees
/// or, for per-cluster kinds, owned by another cluster.
pub fn state_key_to_cache_key(remote: &str, state_key: &str) -> Option<String> {
    let (kind, rest) = parse_state_key(state_key)?;
    let cache = kind.cache_prefix();
    match kind {
        DataKind::Identities => Some(format!("{cache}/{remote}/{rest}")),
        DataKind::IpCache => {
            let ip = rest
                .strip_prefix(DEFAULT_ADDRESS_SPACE)?
                .strip_prefix('/')?;
            Some(format!("{cache}/{remote}/{ip}"))
        }
        _ => {
            let (owner, _) = rest.split_once('/')?;
            (owner == remote).then(|| format!("{cache}/{rest}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_reference_keys_follow_ciliums_prefix_rule() {
        let labels = "k8s:io.kubernetes.pod.namespace=default;k8s:kubernetes.io/name=x;";
        let key = identity_value_key(labels, "10.0.0.1");
        assert_eq!(
            key,
            "cilium/state/identities/v1/value/k8s:io.kubernetes.pod.namespace=default;\
             k8s:kubernetes.io/name=x;/10.0.0.1"
        );
        assert!(identity_value_belongs_to(labels, &key));
        // A reference of longer labels that start with these.
        assert!(!identity_value_belongs_to(
            "k8s:a=1;",
            "cilium/state/identities/v1/value/k8s:a=1;/b=2;/node"
        ));
        assert_eq!(
            identity_lock_path(labels),
            format!("cilium/state/identities/v1/locks/{labels}")
        );
        assert_eq!(
            identity_gc_lock_path(65536),
            "cilium/state/identities/v1/locks/id/65536"
        );
        assert_eq!(
            parse_identity_id_key("cilium/state/identities/v1/id/65536"),
            Some(65536)
        );
        assert_eq!(
            parse_identity_id_key("cilium/state/identities/v1/id/x"),
            None
        );
    }

    #[test]
    fn state_to_cache() {
        assert_eq!(
            state_to_cache_prefix("cilium/state/nodes/v1"),
            "cilium/cache/nodes/v1"
        );
        assert_eq!(
            state_to_cache_prefix("cilium/state/ip/v1/cilium/state"),
            "cilium/cache/ip/v1/cilium/state"
        );
        assert_eq!(state_to_cache_prefix("cilium/synced/x"), "cilium/synced/x");
        for k in DataKind::ALL {
            assert_eq!(state_to_cache_prefix(k.state_prefix()), k.cache_prefix());
        }
    }

    #[test]
    fn builders() {
        assert_eq!(cluster_config_key("c1"), "cilium/cluster-config/c1");
        assert_eq!(
            parse_cluster_config_key("cilium/cluster-config/c1"),
            Some("c1")
        );
        assert_eq!(parse_cluster_config_key("cilium/cluster-config/"), None);
        assert_eq!(parse_cluster_config_key("cilium/cluster-configx/c1"), None);
        assert_eq!(node_key("c1", "node-a"), "cilium/state/nodes/v1/c1/node-a");
        assert_eq!(
            service_key("c1", "default", "rebel-base"),
            "cilium/state/services/v1/c1/default/rebel-base"
        );
        assert_eq!(
            service_export_key("c1", "ns", "s"),
            "cilium/state/serviceexports/v1/c1/ns/s"
        );
        assert_eq!(
            identity_id_key(65538),
            "cilium/state/identities/v1/id/65538"
        );
        assert_eq!(ip_key("10.0.1.5"), "cilium/state/ip/v1/default/10.0.1.5");
        assert_eq!(synced_prefix("c1"), "cilium/synced/c1/");
    }

    #[test]
    fn canaries() {
        let expected_state = [
            "cilium/synced/c1/cilium/state/nodes/v1",
            "cilium/synced/c1/cilium/state/services/v1",
            "cilium/synced/c1/cilium/state/identities/v1",
            "cilium/synced/c1/cilium/state/ip/v1",
            "cilium/synced/c1/cilium/state/serviceexports/v1",
        ];
        for (k, want) in DataKind::ALL.into_iter().zip(expected_state) {
            assert_eq!(k.canary_key("c1", false), want);
            let reg = canary_registration(want, "c1").unwrap();
            assert_eq!(DataKind::from_canary_prefix(reg), Some((k, false)));
        }
        assert_eq!(
            DataKind::Identities.canary_key("r", true),
            "cilium/synced/r/cilium/cache/identities/v1"
        );
        assert_eq!(
            DataKind::from_canary_prefix("cilium/cache/ip/v1"),
            Some((DataKind::IpCache, true))
        );
        // Exact match only.
        assert_eq!(DataKind::from_canary_prefix("cilium/state/nodes/v1/"), None);
        assert_eq!(
            canary_registration("cilium/synced/c10/cilium/state/nodes/v1", "c1"),
            None
        );
        assert_eq!(synced_canary_key("c1", "/x/y"), "cilium/synced/c1/x/y");
    }

    #[test]
    fn watch_prefix_table() {
        let direct: Vec<(String, &str)> = watch_prefixes("r", false)
            .into_iter()
            .map(|w| (w.prefix, w.canary))
            .collect();
        assert_eq!(
            direct,
            [
                ("cilium/state/nodes/v1/r/".into(), "cilium/state/nodes/v1"),
                (
                    "cilium/state/services/v1/r/".into(),
                    "cilium/state/services/v1"
                ),
                (
                    "cilium/state/identities/v1/id".into(),
                    "cilium/state/identities/v1"
                ),
                ("cilium/state/ip/v1/default/".into(), "cilium/state/ip/v1"),
                (
                    "cilium/state/serviceexports/v1/r/".into(),
                    "cilium/state/serviceexports/v1"
                ),
            ]
        );
        let cached: Vec<(String, &str)> = watch_prefixes("r", true)
            .into_iter()
            .map(|w| (w.prefix, w.canary))
            .collect();
        assert_eq!(
            cached,
            [
                ("cilium/cache/nodes/v1/r/".into(), "cilium/cache/nodes/v1"),
                (
                    "cilium/cache/services/v1/r/".into(),
                    "cilium/cache/services/v1"
                ),
                (
                    "cilium/cache/identities/v1/r/id".into(),
                    "cilium/cache/identities/v1"
                ),
                ("cilium/cache/ip/v1/r/".into(), "cilium/cache/ip/v1"),
                (
                    "cilium/cache/serviceexports/v1/r/".into(),
                    "cilium/cache/serviceexports/v1"
                ),
            ]
        );
    }

    #[test]
    fn keys_and_suffixes() {
        let cases = [
            (
                DataKind::Nodes,
                false,
                "node-1",
                "cilium/state/nodes/v1/r/node-1",
            ),
            (
                DataKind::Services,
                true,
                "default/svc",
                "cilium/cache/services/v1/r/default/svc",
            ),
            (
                DataKind::Identities,
                false,
                "65538",
                "cilium/state/identities/v1/id/65538",
            ),
            (
                DataKind::Identities,
                true,
                "65538",
                "cilium/cache/identities/v1/r/id/65538",
            ),
            (
                DataKind::IpCache,
                false,
                "10.0.1.5",
                "cilium/state/ip/v1/default/10.0.1.5",
            ),
            (
                DataKind::IpCache,
                true,
                "10.0.0.0/24",
                "cilium/cache/ip/v1/r/10.0.0.0/24",
            ),
        ];
        for (kind, cached, suffix, key) in cases {
            assert_eq!(kind.key("r", cached, suffix), key);
            assert_eq!(kind.key_suffix(key, "r", cached), Some(suffix));
        }
        // The identity prefix has no slash: the remainder may or may not start with one.
        assert_eq!(
            DataKind::Identities.key_suffix("cilium/state/identities/v1/id5", "r", false),
            Some("5")
        );
        assert_eq!(
            DataKind::Nodes.key_suffix("cilium/state/nodes/v1/r10/n", "r", false),
            None
        );
    }

    #[test]
    fn parse_and_mirror() {
        assert_eq!(
            parse_state_key("cilium/state/services/v1/c1/ns/s"),
            Some((DataKind::Services, "c1/ns/s"))
        );
        assert_eq!(parse_state_key("cilium/state/nodesx/v1/c1"), None);
        assert_eq!(
            parse_cache_key("cilium/cache/identities/v1/r/id/5"),
            Some((DataKind::Identities, "r", "id/5"))
        );
        assert_eq!(parse_cache_key("cilium/cache/nodes/v1/r"), None);

        let m = |k| state_key_to_cache_key("r", k);
        assert_eq!(
            m("cilium/state/nodes/v1/r/node-1").as_deref(),
            Some("cilium/cache/nodes/v1/r/node-1")
        );
        assert_eq!(
            m("cilium/state/services/v1/r/ns/s").as_deref(),
            Some("cilium/cache/services/v1/r/ns/s")
        );
        assert_eq!(
            m("cilium/state/identities/v1/id/65538").as_deref(),
            Some("cilium/cache/identities/v1/r/id/65538")
        );
        assert_eq!(
            m("cilium/state/ip/v1/default/10.0.0.0/24").as_deref(),
            Some("cilium/cache/ip/v1/r/10.0.0.0/24")
        );
        assert_eq!(m("cilium/state/nodes/v1/other/node-1"), None);
        assert_eq!(m("cilium/state/ip/v1/other/10.0.0.1"), None);
        assert_eq!(m("cilium/.heartbeat"), None);
    }
}
