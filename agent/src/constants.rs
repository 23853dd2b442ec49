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
