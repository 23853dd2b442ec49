//! A remote cluster whose kvstore is written by an attacker, against a real etcd: each value
//! that would widen access is rejected and counted per reason, the remote's valid values keep
//! syncing, and policy never sees what was rejected. A remote that floods keys is held to
//! the configured limits, and its ipcache entries are programmed only where it owns the
//! addresses.

use std::time::Duration;

use strait::{
    identity::{LabelArray, MaxConnectedClusters},
    kvstore::EtcdClient,
    mesh::{
        limits::RemoteLimits,
        manager::ClusterMesh,
        remote::{LocalCluster, RemoteTiming},
    },
    metrics::Metrics,
    policy::{self, Direction, PROTO_TCP},
    state::{self, StateHandle},
};
use strait_tests::etcd::{CiliumConfigOptions, EtcdServer};

const WAIT: Duration = Duration::from_secs(20);
const IDS: &str = "cilium/state/identities/v1/id";
const CLUSTER: &str = "k8s:io.cilium.k8s.policy.cluster=cluster-europe;";

async fn put(client: &EtcdClient, key: &str, value: &str) {
    client
        .put(key, value.as_bytes().to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Identities the state model holds, as policy translation sees them.
fn universe(state: &StateHandle) -> Vec<(u32, LabelArray)> {
    state
        .read()
        .identities()
        .map(|i| {
            let labels = LabelArray::parse_sorted_list(&i.labels.join(";")).unwrap();
            (i.id, labels)
        })
        .collect()
}

/// Whether an endpoint of ours, under `fromEntities: [host]`, admits `id`.
fn host_rule_admits(state: &StateHandle, id: u32) -> bool {
    let policies = policy::parse_documents(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
         metadata: {name: from-host, namespace: default}\n\
         spec: {endpointSelector: {}, ingress: [{fromEntities: [host]}]}",
    );
    assert!(policies.errors.is_empty(), "{:?}", policies.errors);
    let endpoint = LabelArray::parse_sorted_list(
        "k8s:app=db;k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.kubernetes.pod.namespace=default;",
    )
    .unwrap();
    policy::translate(
        &policies.policies,
        &endpoint,
        &universe(state),
        "cluster-usa",
    )
    .allows(Direction::Ingress, id, PROTO_TCP, 5432)
}

/// cluster-usa's mesh reading the remotes configured in `dir`, with fast test timings.
fn spawn_mesh(
    dir: &std::path::Path,
    state: &StateHandle,
    metrics: &Metrics,
    limits: RemoteLimits,
) -> ClusterMesh {
    let local = LocalCluster {
        name: "cluster-usa".into(),
        id: 1,
        max_connected_clusters: MaxConnectedClusters::Max255,
    };
    let timing = RemoteTiming {
        config_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        status_interval: Duration::from_millis(100),
    };
    ClusterMesh::spawn_with_limits(
        dir.into(),
        local,
        state.clone(),
        metrics.clone(),
        timing,
        limits,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_remote_identities_are_rejected_and_counted_while_valid_ones_sync() {
    let europe = EtcdServer::new();
    let client = EtcdClient::connect(&europe.config()).await.unwrap();
    put(
        &client,
        "cilium/cluster-config/cluster-europe",
        r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#,
    )
    .await;
    let valid = [
        (131073, format!("k8s:app=database;{CLUSTER}")),
        // Cilium 1.20 adds generated named-ports labels to pod identities.
        (
            131074,
            format!("gen:io.cilium.k8s.named-ports=http:TCP:80;k8s:app=web;{CLUSTER}"),
        ),
    ];
    let hostile = [
        (
            131080,
            format!("k8s:app=a;k8s:app=admin;{CLUSTER}"),
            "duplicate-label",
        ),
        (
            131081,
            format!("k8s:app=b;{CLUSTER}k8s:io.cilium.k8s.policy.cluster=cluster-usa;"),
            "duplicate-cluster-label",
        ),
        (
            131082,
            format!("k8s:app=c;{CLUSTER}reserved:host=;"),
            "non-workload-label",
        ),
        (
            131083,
            format!("{CLUSTER}reserved:kube-apiserver=;"),
            "non-workload-label",
        ),
        (
            131084,
            format!("{CLUSTER}cidr:0.0.0.0/0=;"),
            "non-workload-label",
        ),
        (131085, format!("k8s:=x;{CLUSTER}"), "empty-label-key"),
    ];
    for (id, labels) in &valid {
        put(&client, &format!("{IDS}/{id}"), labels).await;
    }
    for (id, labels, _) in &hostile {
        put(&client, &format!("{IDS}/{id}"), labels).await;
    }

    let dir = tempfile::tempdir().unwrap();
    europe.write_cilium_config(
        &dir.path().join("cluster-europe"),
        CiliumConfigOptions::default(),
    );
    let state = StateHandle::new("cluster-usa", 1);
    let metrics = Metrics::new();
    let mesh = spawn_mesh(dir.path(), &state, &metrics, RemoteLimits::default());
    wait_for("cluster-europe ready", || {
        mesh.statuses()
            .iter()
            .any(|s| s.name == "cluster-europe" && s.ready)
    })
    .await;

    let ids: Vec<u32> = state.read().identities().map(|i| i.id).collect();
    assert_eq!(ids, [131073, 131074], "only the valid identities sync");
    let text = metrics.render();
    for reason in [
        "duplicate-label",
        "duplicate-cluster-label",
        "non-workload-label",
        "empty-label-key",
    ] {
        let n = hostile.iter().filter(|(_, _, r)| *r == reason).count();
        let line = format!(
            r#"strait_kvstore_rejected_total{{cluster="cluster-europe",kind="identity",reason="{reason}"}} {n}"#
        );
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
    // The rejected reserved:host identity is no host to entity rules.
    assert!(!host_rule_admits(&state, 131082));
    assert!(
        host_rule_admits(&state, 1),
        "the rule itself admits the host"
    );

    // A valid identity turned hostile is dropped, not kept in its old form; its neighbour stays.
    put(
        &client,
        &format!("{IDS}/131073"),
        &format!("k8s:app=database;{CLUSTER}reserved:host=;"),
    )
    .await;
    wait_for("131073 withdrawn", || {
        state.read().identity(131073).is_none()
    })
    .await;
    assert!(state.read().identity(131074).is_some());
    assert!(!host_rule_admits(&state, 131073));
    assert!(metrics.render().contains(
        r#"strait_kvstore_rejected_total{cluster="cluster-europe",kind="identity",reason="non-workload-label"} 4"#
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_flooding_identities_is_held_to_the_cap_while_other_kinds_sync() {
    const CAP: usize = 10;
    const FLOOD: u32 = 25;
    let europe = EtcdServer::new();
    let client = EtcdClient::connect(&europe.config()).await.unwrap();
    put(
        &client,
        "cilium/cluster-config/cluster-europe",
        r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#,
    )
    .await;
    for id in 131073..131073 + FLOOD {
        put(
            &client,
            &format!("{IDS}/{id}"),
            &format!("k8s:app=a{id};{CLUSTER}"),
        )
        .await;
    }
    let ip = "cilium/state/ip/v1/default";
    for n in 1..=3 {
        let addr = format!("10.2.0.{n}");
        put(
            &client,
            &format!("{ip}/{addr}"),
            &format!(r#"{{"IP":"{addr}","Mask":null,"HostIP":"198.18.2.1","ID":131073,"Key":255,"Metadata":""}}"#),
        )
        .await;
    }
    // One endpoint whose value is over maxValueBytes.
    let padding = "x".repeat(600);
    put(
        &client,
        &format!("{ip}/10.2.0.9"),
        &format!(r#"{{"IP":"10.2.0.9","Mask":null,"HostIP":"198.18.2.1","ID":131073,"Key":255,"Metadata":"{padding}"}}"#),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    europe.write_cilium_config(
        &dir.path().join("cluster-europe"),
        CiliumConfigOptions::default(),
    );
    let state = StateHandle::new("cluster-usa", 1);
    let metrics = Metrics::new();
    let limits = RemoteLimits {
        max_identities: CAP,
        max_value_bytes: 512,
        ..RemoteLimits::default()
    };
    let mesh = spawn_mesh(dir.path(), &state, &metrics, limits);
    let status = || {
        mesh.statuses()
            .into_iter()
            .find(|s| s.name == "cluster-europe")
    };
    // Refused keys are shown, but the cluster stays in use.
    wait_for("cluster-europe ready", || status().is_some_and(|s| s.ready)).await;

    let europe_ids = || {
        state
            .read()
            .identities()
            .filter(|i| i.cluster.as_ref() == "cluster-europe")
            .count()
    };
    assert_eq!(europe_ids(), CAP, "exactly the cap is held");
    let s = status().unwrap();
    assert_eq!(s.num_identities, CAP);
    assert_eq!(s.num_endpoints, 3, "the endpoints under their own cap sync");
    let error = s.error.unwrap_or_default();
    assert!(
        error.contains("identities: 15 keys over maxIdentities (10)")
            && error.contains("ipcache: 1 values over maxValueBytes (512)"),
        "{error}"
    );
    let text = metrics.render();
    for line in [
        r#"strait_kvstore_rejected_total{cluster="cluster-europe",kind="identity",reason="over-limit"} 15"#,
        r#"strait_kvstore_rejected_total{cluster="cluster-europe",kind="ipcache",reason="value-too-large"} 1"#,
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }

    // A delete frees room for the next new identity; other kinds keep syncing meanwhile.
    let held = state
        .read()
        .identities()
        .find(|i| i.cluster.as_ref() == "cluster-europe")
        .map(|i| i.id)
        .unwrap();
    client.delete(&format!("{IDS}/{held}")).await.unwrap();
    wait_for("deleted identity gone", || {
        state.read().identity(held).is_none()
    })
    .await;
    put(
        &client,
        &format!("{IDS}/131200"),
        &format!("k8s:app=new;{CLUSTER}"),
    )
    .await;
    put(
        &client,
        &format!("{ip}/10.2.0.4"),
        r#"{"IP":"10.2.0.4","Mask":null,"HostIP":"198.18.2.1","ID":131073,"Key":255,"Metadata":""}"#,
    )
    .await;
    wait_for("new identity admitted", || {
        state.read().identity(131200).is_some()
    })
    .await;
    wait_for("new endpoint synced", || {
        status().is_some_and(|s| s.num_endpoints == 4)
    })
    .await;
    assert_eq!(europe_ids(), CAP);
}

fn node_json(name: &str, ip: &str, cidr_ip: &str) -> String {
    format!(
        r#"{{"Name":"{name}","Cluster":"cluster-europe","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":{{"IP":"{cidr_ip}","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":2,"Source":"custom-resource","EncryptionKey":255,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}}"#
    )
}

fn ip_json(ip: &str, mask: &str, id: u32) -> String {
    format!(
        r#"{{"IP":"{ip}","Mask":{mask},"HostIP":"198.18.2.1","ID":{id},"Key":255,"Metadata":""}}"#
    )
}

/// The datapath's ipcache holds a hostile remote's entries only where that remote owns the
/// addresses: its pods (inside its nodes' pod CIDRs) and its nodes (as remote-node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_remote_ipcache_entries_outside_its_node_space_are_refused() {
    let europe = EtcdServer::new();
    let client = EtcdClient::connect(&europe.config()).await.unwrap();
    put(
        &client,
        "cilium/cluster-config/cluster-europe",
        r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#,
    )
    .await;
    put(
        &client,
        "cilium/state/nodes/v1/cluster-europe/eu-1",
        &node_json("eu-1", "198.18.2.1", "10.2.0.0"),
    )
    .await;
    let ip = "cilium/state/ip/v1/default";
    // Valid: a pod of europe's, europe's node.
    put(
        &client,
        &format!("{ip}/10.2.0.5"),
        &ip_json("10.2.0.5", "null", 131073),
    )
    .await;
    put(
        &client,
        &format!("{ip}/198.18.2.1"),
        &ip_json("198.18.2.1", "null", 1),
    )
    .await;
    // Hostile: the whole internet, a local pod, an address outside europe's pod CIDRs.
    put(
        &client,
        &format!("{ip}/0.0.0.0/0"),
        &ip_json("0.0.0.0", r#""AAAAAA==""#, 2),
    )
    .await;
    put(
        &client,
        &format!("{ip}/10.1.0.7"),
        &ip_json("10.1.0.7", "null", 131073),
    )
    .await;
    put(
        &client,
        &format!("{ip}/10.9.0.7"),
        &ip_json("10.9.0.7", "null", 131073),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    europe.write_cilium_config(
        &dir.path().join("cluster-europe"),
        CiliumConfigOptions::default(),
    );
    let state = StateHandle::new("cluster-usa", 1);
    // The local cluster's own node and one of its pods.
    state.update(|m| {
        m.upsert_node(state::Node {
            cluster: "cluster-usa".into(),
            cluster_id: 1,
            name: "usa-1".into(),
            node_ip: Some("198.18.1.1".parse().unwrap()),
            underlay_ips: vec!["198.18.1.1".parse().unwrap()],
            pod_side_ips: vec![],
            pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
            wireguard_pubkey: None,
            encryption_key: 255,
        });
        m.upsert_endpoint(state::Endpoint {
            prefix: "10.1.0.7/32".parse().unwrap(),
            cluster: "cluster-usa".into(),
            identity: 65537,
            host_ip: None,
            encryption_key: 255,
        });
    });
    let metrics = Metrics::new();
    let mesh = spawn_mesh(dir.path(), &state, &metrics, RemoteLimits::default());
    wait_for("cluster-europe ready", || {
        mesh.statuses()
            .iter()
            .any(|s| s.name == "cluster-europe" && s.ready)
    })
    .await;
    // Every entry reached the model: the refusal is the ownership rule's, not validation's.
    wait_for("europe's 5 entries in the model", || {
        state.read().counts("cluster-europe").endpoints == 5
    })
    .await;

    let (map, _) = strait::datapath::ipcache::desired(&state.read());
    let programmed: Vec<(String, u32)> = map
        .iter()
        .map(|(p, v)| (p.to_string(), v.identity))
        .collect();
    assert_eq!(
        programmed,
        [
            ("10.1.0.7/32".into(), 65537),
            ("10.2.0.5/32".into(), 131073),
            ("198.18.2.1/32".into(), 6),
        ]
    );
    let refused: Vec<(String, String, &str)> = state::owned_endpoints(&state.read())
        .refusals
        .iter()
        .map(|r| {
            (
                r.cluster.to_string(),
                r.prefix.to_string(),
                r.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (
                "cluster-europe".into(),
                "0.0.0.0/0".into(),
                "outside-pod-cidrs"
            ),
            ("cluster-europe".into(), "10.1.0.7/32".into(), "local"),
            (
                "cluster-europe".into(),
                "10.9.0.7/32".into(),
                "outside-pod-cidrs"
            ),
        ]
    );
}
