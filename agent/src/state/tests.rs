use std::collections::BTreeMap;

use super::*;

fn node(cluster: &str, id: u32, name: &str, ip: &str, cidr: &str) -> Node {
    Node {
        cluster: cluster.into(),
        cluster_id: id,
        name: name.into(),
        node_ip: Some(ip.parse().unwrap()),
        underlay_ips: vec![ip.parse().unwrap()],
        pod_side_ips: vec![],
        pod_cidrs: vec![cidr.parse().unwrap()],
        wireguard_pubkey: None,
        encryption_key: 255,
    }
}

fn endpoint(cluster: &str, ip: &str, identity: u32) -> Endpoint {
    Endpoint {
        prefix: format!("{ip}/32").parse().unwrap(),
        cluster: cluster.into(),
        identity,
        host_ip: None,
        encryption_key: 255,
    }
}

fn service(cluster: &str, id: u32, backend: &str) -> ClusterService {
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
        backends: vec![Backend {
            ip: backend.parse().unwrap(),
            ports: PortMap::from([(String::new(), (Protocol::Tcp, 8080))]),
            state: BackendState::Active,
        }],
        global: true,
        shared: true,
        affinity: Affinity::None,
    }
}

fn mesh() -> StateHandle {
    let state = StateHandle::new("usa", 1);
    state.update(|m| {
        m.register_cluster("europe", 2).unwrap();
        m.upsert_node(node("usa", 1, "usa-1", "198.18.1.1", "10.1.0.0/24"));
        m.upsert_node(node("europe", 2, "eu-1", "198.18.2.1", "10.2.0.0/24"));
        m.upsert_endpoint(endpoint("usa", "10.1.0.5", 65537));
        m.upsert_endpoint(endpoint("europe", "10.2.0.5", 131073));
        m.upsert_service(service("usa", 1, "10.1.0.5"));
        m.upsert_service(service("europe", 2, "10.2.0.5"));
    });
    state
}

#[test]
fn identical_upserts_do_not_notify_and_changes_bump_only_their_kind() {
    let state = mesh();
    let before = state.versions();
    state.update(|m| m.upsert_node(node("europe", 2, "eu-1", "198.18.2.1", "10.2.0.0/24")));
    assert_eq!(
        state.versions(),
        before,
        "re-listing an unchanged node must not wake reconcilers"
    );

    state.update(|m| m.upsert_endpoint(endpoint("europe", "10.2.0.6", 131073)));
    let after = state.versions();
    assert_eq!(after.endpoints, before.endpoints + 1);
    assert_eq!(
        (after.nodes, after.services, after.identities),
        (before.nodes, before.services, before.identities)
    );
}

#[test]
fn overlapping_remote_is_refused_and_accepted_again_when_the_overlap_goes() {
    let state = mesh();
    state.update(|m| {
        m.register_cluster("asia", 3).unwrap();
        m.upsert_node(node("asia", 3, "asia-1", "198.18.3.1", "10.1.0.0/16"));
        m.upsert_endpoint(endpoint("asia", "10.1.9.9", 196609));
        m.upsert_service(service("asia", 3, "10.1.9.9"));
    });
    {
        let m = state.read();
        let refused = m
            .cluster("asia")
            .unwrap()
            .refused
            .clone()
            .expect("asia must be refused");
        assert_eq!(refused.other_cluster.as_ref(), "usa");
        assert!(m.routable_nodes().all(|n| n.cluster.as_ref() != "asia"));
        assert!(m.ipcache().all(|e| e.cluster.as_ref() != "asia"));
        let view = m.service_views().pop().unwrap();
        assert!(view.active.iter().all(|b| b.cluster.as_ref() != "asia"));
        // The rest of the mesh keeps working.
        assert!(m.usable("europe"));
        assert_eq!(view.active.len(), 2);
    }
    state.update(|m| m.upsert_node(node("asia", 3, "asia-1", "198.18.3.1", "10.3.0.0/16")));
    let m = state.read();
    assert!(m.cluster("asia").unwrap().refused.is_none());
    assert_eq!(m.service_views().pop().unwrap().active.len(), 3);
}

#[test]
fn duplicate_cluster_ids_and_names_are_refused() {
    let state = mesh();
    state.update(|m| {
        assert_eq!(
            m.register_cluster("asia", 2),
            Err(ClusterConflict::DuplicateId {
                name: "asia".into(),
                id: 2,
                other: "europe".into()
            })
        );
        assert_eq!(
            m.register_cluster("europe", 7),
            Err(ClusterConflict::DuplicateName {
                name: "europe".into(),
                id: 2
            })
        );
        assert_eq!(m.register_cluster("europe", 2), Ok(()));
    });
}

#[test]
fn draining_a_cluster_removes_everything_it_published() {
    let state = mesh();
    assert_eq!(
        state.read().counts("europe"),
        Counts {
            nodes: 1,
            endpoints: 1,
            identities: 0,
            services: 1
        }
    );
    state.update(|m| {
        m.upsert_identity(Identity {
            id: 131073,
            cluster: "europe".into(),
            labels: vec!["k8s:app=db".into()],
        });
        m.drain_cluster("europe");
    });
    let m = state.read();
    assert_eq!(m.counts("europe"), Counts::default());
    assert!(m.cluster("europe").is_none());
    assert_eq!(
        m.counts("usa"),
        Counts {
            nodes: 1,
            endpoints: 1,
            identities: 0,
            services: 1
        }
    );
    let view = m.service_views().pop().unwrap();
    assert_eq!(view.active.len(), 1);
}

#[test]
fn datapath_down_cluster_loses_backends_but_keeps_routes() {
    let state = mesh();
    state.update(|m| m.set_datapath_down("europe", true));
    let m = state.read();
    let view = m.service_views().pop().unwrap();
    assert!(view.active.iter().all(|b| b.cluster.as_ref() == "usa"));
    assert!(m.routable_nodes().any(|n| n.cluster.as_ref() == "europe"));
}

/// Cilium's `num-global-services`: services remote clusters share with us, not ours.
#[test]
fn num_global_services_counts_what_remotes_share() {
    let mut m = StateModel::new("usa", 1);
    m.register_cluster("europe", 2).unwrap();
    m.register_cluster("asia", 3).unwrap();
    // A local global service nobody else exports: not counted.
    m.upsert_service(service("usa", 1, "10.1.0.5"));
    assert_eq!(m.num_remote_global_services(), 0);
    // Two remotes export it: one service.
    m.upsert_service(service("europe", 2, "10.2.0.5"));
    m.upsert_service(service("asia", 3, "10.3.0.5"));
    assert_eq!(m.num_remote_global_services(), 1);
    // A remote service we do not define counts too; a non-shared one does not.
    let mut other = service("europe", 2, "10.2.0.6");
    other.name = ServiceName::new("default", "catalog");
    m.upsert_service(other.clone());
    let mut hidden = service("asia", 3, "10.3.0.6");
    hidden.name = ServiceName::new("default", "hidden");
    hidden.shared = false;
    m.upsert_service(hidden);
    assert_eq!(m.num_remote_global_services(), 2);
    m.delete_service("europe", &other.name);
    assert_eq!(m.num_remote_global_services(), 1);
}
