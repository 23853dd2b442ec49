//! Who may read and write which keys of a cluster's kvstore etcd: the users and roles of
//! Cilium's clustermesh-apiserver (`ClusterMeshEtcdInit`, cilium-behaviour reference §6), so a
//! Cilium cluster's client certificate (CN = user name) works against strait's etcd, plus
//! strait's own agent user. Pure: [`crate::kvstore::auth`] applies a [`AuthPlan`].
//!
//! * `root`, `admin-<cluster>` → etcd's built-in `root` role (strait kvstoremesh and `strait
//!   etcd init` run as `admin-<cluster>`).
//! * `local-<cluster>` → `local`: read-only `cilium/.heartbeat`, `cilium/cache/`,
//!   `cilium/cluster-config/`, `cilium/synced/` (agents reading the KVStoreMesh cache).
//! * `remote` and `remote-<peer>` → `remote`: read-only `cilium/.heartbeat`, `cilium/state/`,
//!   the single key `cilium/cluster-config/<cluster>` and `cilium/synced/<cluster>/`.
//! * `agent-<cluster>` (strait only) → `agent`: read-write exactly what a strait agent
//!   publishes and reads of its own cluster: `cilium/state/nodes/v1/<cluster>/`,
//!   `cilium/state/ip/v1/default/`, `cilium/state/identities/v1/`, and what the elected
//!   cluster publisher (an agent) writes: `cilium/state/services/v1/<cluster>/`, the key
//!   `cilium/cluster-config/<cluster>`, `cilium/.heartbeat` and its election.
//!
//! Cilium's `externalworkload` user is left out: strait has no external workloads.

use super::keys::{
    CACHE_PREFIX, CLUSTER_CONFIG_PREFIX, HEARTBEAT_PATH, IDENTITIES_PATH, IP_IDENTITIES_PATH,
    NODE_STORE_PREFIX, PUBLISHER_ELECTION_PREFIX, SERVICE_STORE_PREFIX, STATE_PREFIX,
    SYNCED_PREFIX, cluster_config_key,
};

pub const ROOT_USER: &str = "root";
/// etcd's built-in role: every permission, and the auth API.
pub const ROOT_ROLE: &str = "root";
pub const LOCAL_ROLE: &str = "local";
pub const REMOTE_ROLE: &str = "remote";
/// The user every remote cluster authenticates as in Cilium's `legacy`/`migration` modes.
pub const REMOTE_USER: &str = "remote";
/// strait's agent role (not Cilium's: Cilium agents in CRD mode never write etcd).
pub const AGENT_ROLE: &str = "agent";
/// Per-cluster users of Cilium's `cluster` auth mode are `remote-<peer>`; users under this
/// prefix that no longer match a configured peer are removed.
pub const REMOTE_USER_PREFIX: &str = "remote-";

/// One etcd permission range: `[start, end)`, or the single key `start` when `end` is empty
/// (etcd's own encoding).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeyRange {
    /// Exactly `key`.
    pub fn key(key: &str) -> Self {
        Self {
            start: key.as_bytes().to_vec(),
            end: Vec::new(),
        }
    }

    /// Every key starting with `prefix` as given (Cilium's `rangeForPrefix(…,
    /// withoutTrailingSlash)`).
    pub fn raw_prefix(prefix: &str) -> Self {
        Self {
            start: prefix.as_bytes().to_vec(),
            end: prefix_end(prefix.as_bytes()),
        }
    }

    /// Every key under the directory `prefix/` (a trailing slash is added when missing, as
    /// Cilium's `rangeForPrefix` does, so `cilium/state` does not cover `cilium/statex`).
    pub fn dir(prefix: &str) -> Self {
        if prefix.ends_with('/') {
            Self::raw_prefix(prefix)
        } else {
            Self::raw_prefix(&format!("{prefix}/"))
        }
    }

    /// Whether `key` falls in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            key == self.start.as_slice()
        } else {
            key >= self.start.as_slice() && (self.end == [0] || key < self.end.as_slice())
        }
    }
}

/// etcd's prefix end: the prefix with its last byte below 0xff incremented and the rest cut
/// (`"\0"`, no upper bound, when there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    pub access: Access,
    pub range: KeyRange,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub roles: Vec<String>,
}

/// The users and roles an etcd must hold, exactly. Users named `root` are created last, right
/// before authentication is enabled (see [`crate::kvstore::auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPlan {
    /// Roles to create and hold exactly these grants (the built-in `root` is never listed).
    pub roles: Vec<Role>,
    pub users: Vec<User>,
    /// Existing users with one of these prefixes that are not in `users` are deleted.
    pub managed_user_prefixes: Vec<String>,
}

impl AuthPlan {
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Whether `user` may read (`write = false`) or write `key` under this plan.
    pub fn permits(&self, user: &str, key: &[u8], write: bool) -> bool {
        let Some(user) = self.user(user) else {
            return false;
        };
        user.roles.iter().any(|role| {
            role == ROOT_ROLE
                || self.role(role).is_some_and(|r| {
                    r.grants
                        .iter()
                        .any(|g| (!write || g.access == Access::ReadWrite) && g.range.contains(key))
                })
        })
    }
}

/// `<base>-<cluster>`, or plain `<base>` for an empty cluster name (Cilium's
/// `usernameForClusterName`).
pub fn user_for_cluster(base: &str, cluster: &str) -> String {
    if cluster.is_empty() {
        base.to_owned()
    } else {
        format!("{base}-{cluster}")
    }
}

fn read(range: KeyRange) -> Grant {
    Grant {
        access: Access::Read,
        range,
    }
}

fn read_write(range: KeyRange) -> Grant {
    Grant {
        access: Access::ReadWrite,
        range,
    }
}

/// Cilium's `rangesForLocalRole`.
pub fn local_role_ranges() -> Vec<KeyRange> {
    vec![
        KeyRange::raw_prefix(HEARTBEAT_PATH),
        KeyRange::dir(CACHE_PREFIX),
        KeyRange::dir(CLUSTER_CONFIG_PREFIX),
        KeyRange::dir(SYNCED_PREFIX),
    ]
}

/// Cilium's `rangesForRemoteRole(cluster)`.
pub fn remote_role_ranges(cluster: &str) -> Vec<KeyRange> {
    vec![
        KeyRange::raw_prefix(HEARTBEAT_PATH),
        KeyRange::dir(STATE_PREFIX),
        KeyRange::key(&cluster_config_key(cluster)),
        KeyRange::dir(&format!("{SYNCED_PREFIX}/{cluster}")),
    ]
}

/// What a strait agent of `cluster` writes (its node, its pods' ipcache entries, identities
/// and their references) and watches of its own cluster (the same three trees), and what it
/// writes when elected cluster publisher (global services, cluster config, heartbeat).
pub fn agent_role_ranges(cluster: &str) -> Vec<KeyRange> {
    vec![
        KeyRange::dir(&format!("{SERVICE_STORE_PREFIX}/{cluster}")),
        KeyRange::key(&cluster_config_key(cluster)),
        KeyRange::raw_prefix(HEARTBEAT_PATH),
        KeyRange::dir(&format!("{PUBLISHER_ELECTION_PREFIX}/{cluster}")),
        KeyRange::dir(&format!("{NODE_STORE_PREFIX}/{cluster}")),
        KeyRange::dir(&format!(
            "{IP_IDENTITIES_PATH}/{}",
            super::keys::DEFAULT_ADDRESS_SPACE
        )),
        KeyRange::dir(IDENTITIES_PATH),
    ]
}

/// The plan for the kvstore etcd of `cluster`: Cilium's users and roles, a `remote-<peer>`
/// user for each of `remote_users` (Cilium's `cluster` auth mode; the local cluster's own name
/// is skipped, as Cilium does), and strait's agent user.
pub fn clustermesh_plan(cluster: &str, remote_users: &[String]) -> AuthPlan {
    let roles = vec![
        Role {
            name: LOCAL_ROLE.into(),
            grants: local_role_ranges().into_iter().map(read).collect(),
        },
        Role {
            name: REMOTE_ROLE.into(),
            grants: remote_role_ranges(cluster).into_iter().map(read).collect(),
        },
        Role {
            name: AGENT_ROLE.into(),
            grants: agent_role_ranges(cluster)
                .into_iter()
                .map(read_write)
                .collect(),
        },
    ];
    let user = |name: String, role: &str| User {
        name,
        roles: vec![role.to_owned()],
    };
    let mut users = vec![
        user(ROOT_USER.into(), ROOT_ROLE),
        user(user_for_cluster("admin", cluster), ROOT_ROLE),
        user(user_for_cluster("local", cluster), LOCAL_ROLE),
        user(REMOTE_USER.into(), REMOTE_ROLE),
        user(user_for_cluster("agent", cluster), AGENT_ROLE),
    ];
    let mut peers: Vec<&String> = remote_users
        .iter()
        .filter(|p| !p.is_empty() && p.as_str() != cluster)
        .collect();
    peers.sort();
    peers.dedup();
    users.extend(
        peers
            .into_iter()
            .map(|p| user(format!("{REMOTE_USER_PREFIX}{p}"), REMOTE_ROLE)),
    );
    AuthPlan {
        roles,
        users,
        managed_user_prefixes: vec![REMOTE_USER_PREFIX.into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> AuthPlan {
        clustermesh_plan("c1", &["c2".into(), "c1".into(), "c2".into()])
    }

    #[test]
    fn ranges_match_cilium() {
        assert_eq!(
            KeyRange::raw_prefix("cilium/.heartbeat"),
            KeyRange {
                start: b"cilium/.heartbeat".to_vec(),
                end: b"cilium/.heartbeau".to_vec()
            }
        );
        assert_eq!(
            KeyRange::dir("cilium/state"),
            KeyRange {
                start: b"cilium/state/".to_vec(),
                end: b"cilium/state0".to_vec()
            }
        );
        assert_eq!(
            KeyRange::dir("cilium/state/"),
            KeyRange::dir("cilium/state")
        );
        assert_eq!(
            remote_role_ranges("c1")[2],
            KeyRange {
                start: b"cilium/cluster-config/c1".to_vec(),
                end: Vec::new()
            }
        );
    }

    #[test]
    fn user_names_as_cilium_names_them() {
        let plan = plan();
        let names: Vec<&str> = plan.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "root",
                "admin-c1",
                "local-c1",
                "remote",
                "agent-c1",
                "remote-c2"
            ]
        );
        assert_eq!(user_for_cluster("admin", ""), "admin");
    }

    #[test]
    fn remote_reads_only_what_a_clustermesh_reader_needs() {
        let p = plan();
        let can_read = |k: &str| p.permits("remote", k.as_bytes(), false);
        assert!(can_read("cilium/.heartbeat"));
        assert!(can_read("cilium/state/nodes/v1/c1/n1"));
        assert!(can_read("cilium/cluster-config/c1"));
        assert!(can_read("cilium/synced/c1/cilium/state/nodes/v1"));
        assert!(!can_read("cilium/cluster-config/c2"));
        assert!(!can_read("cilium/cluster-config/c10"));
        assert!(!can_read("cilium/synced/c10/x"));
        assert!(!can_read("cilium/cache/nodes/v1/c2/n"));
        assert!(!can_read("cilium/statex"));
        assert!(!can_read("cilium/.strait/service-exporter/c1"));
        for key in ["cilium/state/nodes/v1/c1/n1", "cilium/.heartbeat"] {
            assert!(!p.permits("remote", key.as_bytes(), true));
            assert!(!p.permits("remote-c2", key.as_bytes(), true));
        }
    }

    #[test]
    fn agent_writes_only_its_own_cluster() {
        let p = plan();
        let can_write = |k: &str| p.permits("agent-c1", k.as_bytes(), true);
        assert!(can_write("cilium/state/nodes/v1/c1/n1"));
        assert!(can_write("cilium/state/ip/v1/default/10.0.0.1"));
        assert!(can_write("cilium/state/identities/v1/id/65537"));
        assert!(!can_write("cilium/state/nodes/v1/c2/n1"));
        assert!(!can_write("cilium/state/nodes/v1/c10/n1"));
        // The elected cluster publisher is an agent.
        assert!(can_write("cilium/state/services/v1/c1/ns/s"));
        assert!(can_write("cilium/cluster-config/c1"));
        assert!(can_write("cilium/.heartbeat"));
        assert!(can_write("cilium/.strait/service-exporter/c1/694d"));
        assert!(!can_write("cilium/state/services/v1/c2/ns/s"));
        assert!(!can_write("cilium/cluster-config/c2"));
        assert!(!can_write("cilium/.strait/service-exporter/c2/694d"));
        assert!(!can_write("cilium/cache/nodes/v1/c2/n"));
        assert!(!p.permits("nobody", b"cilium/state/nodes/v1/c1/n1", false));
        assert!(p.permits("admin-c1", b"anything", true));
    }
}
