//! Merging a service's backends across clusters, with Cilium's global-service semantics:
//! remote backends count only when the LOCAL service is global (and the remote exported it
//! as shared); affinity `local` uses remote backends only while no active local backend
//! exists, `remote` is the mirror image, `none` uses all.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use super::types::{
    Affinity, Backend, BackendState, ClusterName, ClusterService, PortMap, ServiceName,
};

/// A backend with the cluster it lives in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelectedBackend {
    pub cluster: ClusterName,
    pub cluster_id: u32,
    pub backend: Backend,
}

/// What the load balancer programs for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub name: ServiceName,
    pub frontends: BTreeMap<IpAddr, PortMap>,
    pub global: bool,
    pub affinity: Affinity,
    /// Backends new connections may be sent to, after affinity.
    pub active: Vec<SelectedBackend>,
    /// Terminating backends: kept so existing connections can finish, never chosen anew.
    pub terminating: Vec<SelectedBackend>,
}

/// Builds the view of one service from every cluster's version of it. `usable(cluster)`
/// says whether a remote cluster's backends may be used at all (not refused, datapath up).
/// Returns `None` when the local cluster does not define the service (no VIP to serve).
pub fn select(
    local_cluster: &str,
    versions: &BTreeMap<ClusterName, ClusterService>,
    usable: impl Fn(&str) -> bool,
) -> Option<ServiceView> {
    let local = versions.get(local_cluster)?;
    let mut local_backends = Vec::new();
    let mut remote_backends = Vec::new();
    for (cluster, svc) in versions {
        let is_local = cluster.as_ref() == local_cluster;
        let imported = local.global && svc.global && svc.shared && usable(cluster);
        if !is_local && !imported {
            continue;
        }
        let target = if is_local {
            &mut local_backends
        } else {
            &mut remote_backends
        };
        target.extend(svc.backends.iter().map(|b| SelectedBackend {
            cluster: cluster.clone(),
            cluster_id: svc.cluster_id,
            backend: b.clone(),
        }));
    }

    let has_active =
        |v: &[SelectedBackend]| v.iter().any(|b| b.backend.state == BackendState::Active);
    let (use_local, use_remote) = match (local.global, local.affinity) {
        (false, _) => (true, false),
        (true, Affinity::None) => (true, true),
        (true, Affinity::Local) => (true, !has_active(&local_backends)),
        (true, Affinity::Remote) => (!has_active(&remote_backends), true),
    };

    let mut view = ServiceView {
        name: local.name.clone(),
        frontends: local.frontends.clone(),
        global: local.global,
        affinity: local.affinity,
        active: Vec::new(),
        terminating: Vec::new(),
    };
    for (used, backends) in [(use_local, local_backends), (use_remote, remote_backends)] {
        for b in backends {
            match b.backend.state {
                BackendState::Active if used => view.active.push(b),
                BackendState::Active => {}
                BackendState::Terminating => view.terminating.push(b),
            }
        }
    }
    Some(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::types::Protocol;

    fn svc(
        cluster: &str,
        id: u32,
        global: bool,
        affinity: Affinity,
        backends: &[(&str, BackendState)],
    ) -> ClusterService {
        ClusterService {
            name: ServiceName {
                namespace: "default".into(),
                name: "payment-api".into(),
            },
            cluster: cluster.into(),
            cluster_id: id,
            frontends: BTreeMap::from([(
                "10.96.0.10".parse().unwrap(),
                PortMap::from([(String::new(), (Protocol::Tcp, 8080))]),
            )]),
            backends: backends
                .iter()
                .map(|(ip, state)| Backend {
                    ip: ip.parse().unwrap(),
                    ports: PortMap::from([(String::new(), (Protocol::Tcp, 8080))]),
                    state: *state,
                })
                .collect(),
            global,
            shared: true,
            affinity,
        }
    }

    fn ips(v: &[SelectedBackend]) -> Vec<String> {
        v.iter().map(|b| b.backend.ip.to_string()).collect()
    }

    use BackendState::{Active, Terminating};

    fn versions(
        local: ClusterService,
        remote: ClusterService,
    ) -> BTreeMap<ClusterName, ClusterService> {
        BTreeMap::from([
            (local.cluster.clone(), local),
            (remote.cluster.clone(), remote),
        ])
    }

    #[test]
    fn affinity_local_prefers_local_then_fails_over() {
        let remote = svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]);
        let v = versions(
            svc("usa", 1, true, Affinity::Local, &[("10.1.0.5", Active)]),
            remote.clone(),
        );
        assert_eq!(
            ips(&select("usa", &v, |_| true).unwrap().active),
            ["10.1.0.5"]
        );

        // Only a terminating local backend left: remote takes new connections.
        let v = versions(
            svc(
                "usa",
                1,
                true,
                Affinity::Local,
                &[("10.1.0.5", Terminating)],
            ),
            remote.clone(),
        );
        let view = select("usa", &v, |_| true).unwrap();
        assert_eq!(ips(&view.active), ["10.2.0.5"]);
        assert_eq!(ips(&view.terminating), ["10.1.0.5"]);
    }

    #[test]
    fn affinity_remote_is_the_mirror_image() {
        let v = versions(
            svc("usa", 1, true, Affinity::Remote, &[("10.1.0.5", Active)]),
            svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]),
        );
        assert_eq!(
            ips(&select("usa", &v, |_| true).unwrap().active),
            ["10.2.0.5"]
        );
        let v = versions(
            svc("usa", 1, true, Affinity::Remote, &[("10.1.0.5", Active)]),
            svc("europe", 2, true, Affinity::None, &[]),
        );
        assert_eq!(
            ips(&select("usa", &v, |_| true).unwrap().active),
            ["10.1.0.5"]
        );
    }

    #[test]
    fn affinity_none_uses_all_and_unusable_clusters_are_skipped() {
        let v = versions(
            svc("usa", 1, true, Affinity::None, &[("10.1.0.5", Active)]),
            svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]),
        );
        assert_eq!(
            ips(&select("usa", &v, |_| true).unwrap().active),
            ["10.1.0.5", "10.2.0.5"]
        );
        assert_eq!(
            ips(&select("usa", &v, |c| c != "europe").unwrap().active),
            ["10.1.0.5"]
        );
    }

    #[test]
    fn remote_backends_need_a_global_local_service_and_a_shared_remote() {
        let v = versions(
            svc("usa", 1, false, Affinity::None, &[("10.1.0.5", Active)]),
            svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]),
        );
        assert_eq!(
            ips(&select("usa", &v, |_| true).unwrap().active),
            ["10.1.0.5"]
        );
        let mut unshared = svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]);
        unshared.shared = false;
        let v = versions(svc("usa", 1, true, Affinity::None, &[]), unshared);
        assert!(select("usa", &v, |_| true).unwrap().active.is_empty());
    }

    #[test]
    fn no_local_definition_means_no_view() {
        let v = BTreeMap::from([(
            "europe".into(),
            svc("europe", 2, true, Affinity::None, &[("10.2.0.5", Active)]),
        )]);
        assert!(select("usa", &v, |_| true).is_none());
    }
}
