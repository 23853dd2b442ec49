//! Every path, port and fixed name strait uses, in one place.

/// Where bpffs is normally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Directory (under the bpffs root) holding strait's pins. The schema version is part of the
/// name so an agent never reuses pins written with another map layout.
pub fn pin_dir_name() -> String {
    format!("strait-v{}", strait_common::SCHEMA_VERSION)
}

/// Kernel BTF, needed for CO-RE relocations.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Named network namespaces created by `ip netns add`.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// WireGuard UDP port, Cilium's, so Cilium nodes can peer with strait nodes.
pub const WIREGUARD_PORT: u16 = 51871;

/// Default agent configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/strait/agent.yaml";

/// Default directory of remote-cluster etcd configs, one file per cluster (Cilium's layout).
pub const DEFAULT_CLUSTERMESH_CONFIG_DIR: &str = "/var/lib/cilium/clustermesh";

/// Default unix socket of the agent API (`strait status`, `observe`, `bpf ...`).
pub const DEFAULT_API_SOCKET: &str = "/var/run/strait/strait.sock";

/// Default Prometheus metrics address (Cilium's agent uses 9962; strait sits next to it).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9964";

/// Cilium's default and only other accepted MaxConnectedClusters.
pub const DEFAULT_MAX_CONNECTED_CLUSTERS: u32 = 255;

/// Default name of strait's WireGuard device (Cilium's is `cilium_wg0`). Userspace devices
/// need machine-wide unique names (wireguard-go's UAPI sockets share one directory).
pub const WIREGUARD_DEVICE: &str = "strait_wg0";

/// File holding the WireGuard private key (raw 32 bytes, mode 0600) in the state directory.
pub const WIREGUARD_KEY_FILE: &str = "strait_wg0.key";

/// Default state directory (persistent, so the node keeps its public key across restarts).
pub const STATE_DIR: &str = "/var/lib/strait";

/// Bytes WireGuard adds to every packet (outer IPv6 40 + UDP 8 + WireGuard 32): the device MTU
/// is the underlay MTU minus this, as Cilium does.
pub const WIREGUARD_MTU_OVERHEAD: u32 = 80;

/// Where wireguard-go puts its UAPI sockets (`<ifname>.sock`); one directory for every
/// network namespace.
pub const WIREGUARD_RUN_DIR: &str = "/var/run/wireguard";

/// wireguard-go refuses to start on Linux unless this is set in its environment.
pub const WIREGUARD_GO_ENV: &str = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD";

/// Route protocol (`rtm_protocol`) marking routes strait owns, so its reconciler never
/// deletes or replaces a route someone else created. Shown as `proto 161` by `ip route`.
pub const RTPROT_STRAIT: u8 = 0xa1;

/// Metric of strict mode's `unreachable` fallback under every route into the WireGuard
/// device: when the device vanishes (wireguard-go died) its routes go with it and this one
/// drops the traffic instead of the default route sending it in clear.
pub const STRICT_FALLBACK_METRIC: u32 = 0xa1a1;

/// How often the encryption agent checks that its wireguard-go is alive, so a dead one is
/// restarted (and its peers and routes restored) without waiting for the next resync.
pub const WIREGUARD_LIVENESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Priority (metric) of strait's routes per family: IPv4 keeps 0; IPv6 the kernel turns 0
/// into 1024 (`IP6_RT_PRIO_USER`), so strait asks for 1024 and expects it back (reading the
/// route back as "priority 0 missing" made every second pass re-add and then delete it).
pub const ROUTE_PRIORITY_V4: u32 = 0;
pub const ROUTE_PRIORITY_V6: u32 = 1024;

/// How often the elected cluster publisher re-writes this cluster's config (Cilium's
/// `EnforceClusterConfig`: every 5 minutes).
pub const CLUSTER_CONFIG_ENFORCE_INTERVAL: std::time::Duration =
    std::time::Duration::from_secs(5 * 60);

/// Cilium's kvstore lease TTL (15 min); shorter in tests.
pub const NODE_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// strait-cni's address allocations, one directory per network name (like host-local's
/// `/var/lib/cni/networks`).
pub const CNI_DATA_DIR: &str = "/var/lib/cni/strait";

/// How long strait-cni's ADD waits for the agent to report the pod's endpoint ready.
pub const CNI_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Underlay MTU strait-cni assumes when the node has no default route to read it from.
pub const CNI_FALLBACK_UNDERLAY_MTU: u32 = 1500;

/// nftables table of the egress masquerade (`masquerade`), family `ip`.
pub const MASQUERADE_NFT_TABLE: &str = "strait_nat";

/// The nftables CLI (Debian's `nftables`), found on PATH.
pub const NFT_BIN: &str = "nft";

/// Cilium's lock lease TTL (`defaults.LockLeaseTTL`): the lease under kvstore locks.
pub const LOCK_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(25);

/// How long an identity allocation or GC step waits for a lock another holder has.
pub const LOCK_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Cilium's `maxAllocAttempts`: tries of one identity allocation before giving up.
pub const IDENTITY_ALLOC_ATTEMPTS: u32 = 16;

/// Cilium's allocator `DefaultSyncInterval`: how often used identities' master keys and this
/// node's references are checked and re-created.
pub const IDENTITY_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Cilium's `identity-gc-interval` default (the kvstore lease TTL).
pub const IDENTITY_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Cilium's `identity-gc-rate-limit` per `identity-gc-rate-interval`.
pub const IDENTITY_GC_RATE_LIMIT: u32 = 2500;
pub const IDENTITY_GC_RATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a graceful shutdown may take (SIGTERM → exit): Kubernetes waits 30 s before
/// SIGKILL, a rolling restart should not wait on us that long.
pub const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long in-flight API calls get to finish once the agent stops (a followed `strait
/// observe` stream never does on its own).
pub const API_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Cilium's `clustermesh-sync-timeout` default: the initial wait for every remote cluster.
pub const CLUSTERMESH_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// TTL of the service exporter's election lease: a crashed leader's successor takes over
/// within this (Cilium's clustermesh-apiserver uses a lease of the same order).
pub const EXPORTER_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
