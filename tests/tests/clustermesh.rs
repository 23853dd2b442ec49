//! Remote clusters end to end against real etcd servers: config retrieval, list-watch into
//! the state model, Cilium's validation rules (the rest keeps syncing), KVStoreMesh cache
//! prefixes with sync canaries, reconnects with a changed config, drain on removal, and
//! refusal of overlapping pod CIDRs and duplicate cluster IDs.

use std::{path::Path, time::Duration};

use strait::{
    identity::MaxConnectedClusters,
    kvstore::EtcdClient,
    mesh::{
        manager::ClusterMesh,
        remote::{LocalCluster, RemoteClusterStatus, RemoteTiming},
    },
    metrics::Metrics,
    state::{Node, StateHandle},
};
use strait_tests::etcd::{CiliumConfigOptions, EtcdServer};

const WAIT: Duration = Duration::from_secs(20);

fn timing() -> RemoteTiming {
    RemoteTiming {
        config_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        status_interval: Duration::from_millis(100),
    }
}

fn usa() -> (StateHandle, LocalCluster) {
    let state = StateHandle::new("cluster-usa", 1);
    // The local cluster's own pod CIDR, as the local kvstore watch would report it.
    state.update(|m| {
        m.upsert_node(Node {
            cluster: m.cluster_name("cluster-usa"),
            cluster_id: 1,
            name: "usa-1".into(),
            node_ip: Some("198.18.1.1".parse().unwrap()),
            underlay_ips: vec![],
            pod_side_ips: vec![],
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            wireguard_pubkey: None,
            encryption_key: 0,
        })
    });
    let local = LocalCluster {
        name: "cluster-usa".into(),
        id: 1,
        max_connected_clusters: MaxConnectedClusters::Max255,
    };
    (state, local)
}

async fn put(client: &EtcdClient, key: &str, value: &str) {
    client
        .put(key, value.as_bytes().to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

fn node_json(cluster: &str, id: u32, name: &str, ip: &str, cidr_ip: &str) -> String {
    format!(
        r#"{{"Name":"{name}","Cluster":"{cluster}","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":{{"IP":"{cidr_ip}","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":{id},"Source":"custom-resource","EncryptionKey":255,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}}"#
    )
}

fn ip_json(ip: &str, host: &str, id: u32) -> String {
    format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"{host}","ID":{id},"Key":255,"Metadata":""}}"#)
}

fn service_json(cluster: &str, id: u32, shared: bool, backend: &str) -> String {
    format!(
        r#"{{"cluster":"{cluster}","namespace":"default","name":"payment-api","frontends":{{"10.96.0.10":{{"":{{"Protocol":"TCP","Port":8080}}}}}},"backends":{{"{backend}":{{"":{{"Protocol":"TCP","Port":8080}}}}}},"hostnames":{{}},"labels":{{}},"selector":{{"app":"payment-api"}},"includeExternal":true,"shared":{shared},"clusterID":{id}}}"#
    )
}

fn identity_labels(app: &str, cluster: &str) -> String {
    format!(
        "k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=default;"
    )
}

/// Populates a remote cluster's etcd the way a clustermesh-apiserver does (state prefixes),
/// with one invalid value per validation rule next to the valid ones.
async fn populate_europe(client: &EtcdClient, canaries: bool) {
    let config = if canaries {
        r#"{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#
    } else {
        r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#
    };
    put(client, "cilium/cluster-config/cluster-europe", config).await;
    let n = "cilium/state/nodes/v1/cluster-europe";
    put(
        client,
        &format!("{n}/eu-1"),
        &node_json("cluster-europe", 2, "eu-1", "198.18.2.1", "10.2.0.0"),
    )
    .await;
    put(
        client,
        &format!("{n}/eu-2"),
        &node_json("cluster-europe", 2, "eu-2", "198.18.2.2", "10.2.1.0"),
    )
    .await;
    // Invalid: name differs from key; wrong cluster; wrong cluster ID; not JSON.
    put(
        client,
        &format!("{n}/eu-9"),
        &node_json("cluster-europe", 2, "eu-8", "198.18.2.9", "10.2.9.0"),
    )
    .await;
    put(
        client,
        &format!("{n}/eu-10"),
        &node_json("cluster-asia", 2, "eu-10", "198.18.2.10", "10.2.10.0"),
    )
    .await;
    put(
        client,
        &format!("{n}/eu-11"),
        &node_json("cluster-europe", 7, "eu-11", "198.18.2.11", "10.2.11.0"),
    )
    .await;
    put(client, &format!("{n}/eu-12"), "{not json").await;

    let i = "cilium/state/identities/v1/id";
    put(
        client,
        &format!("{i}/131073"),
        &identity_labels("database", "cluster-europe"),
    )
    .await;
    put(
        client,
        &format!("{i}/70000"),
        &identity_labels("frontend", "cluster-europe"),
    )
    .await; // usa's range
    put(client, &format!("{i}/131074"), "k8s:app=nolabel;").await; // no cluster label
    put(
        client,
        &format!("{i}/131075"),
        &identity_labels("spoof", "cluster-usa"),
    )
    .await; // wrong cluster label

    let ip = "cilium/state/ip/v1/default";
    put(
        client,
        &format!("{ip}/10.2.0.5"),
        &ip_json("10.2.0.5", "198.18.2.1", 131073),
    )
    .await;
    put(
        client,
        &format!("{ip}/198.18.2.1"),
        &ip_json("198.18.2.1", "198.18.2.1", 1),
    )
    .await; // host → remote-node
    put(
        client,
        &format!("{ip}/10.2.0.6"),
        &ip_json("10.2.0.7", "198.18.2.1", 131073),
    )
    .await; // key mismatch
    put(
        client,
        &format!("{ip}/10.2.0.8"),
        &ip_json("10.2.0.8", "198.18.2.1", 70000),
    )
    .await; // out of range

    let s = "cilium/state/services/v1/cluster-europe";
    put(
        client,
        &format!("{s}/default/payment-api"),
        &service_json("cluster-europe", 2, true, "10.2.0.5"),
    )
    .await;
    put(
        client,
        &format!("{s}/default/other"),
        &service_json("cluster-europe", 2, true, "10.2.0.9"),
    )
    .await; // name mismatch
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_of(mesh: &ClusterMesh, name: &str) -> Option<RemoteClusterStatus> {
    mesh.statuses().into_iter().find(|s| s.name == name)
}

fn write_config(dir: &Path, name: &str, etcd: &EtcdServer) {
    etcd.write_cilium_config(&dir.join(name), CiliumConfigOptions::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_cluster_syncs_valid_values_and_rejects_each_invalid_one() {
    let europe = EtcdServer::new();
    let client = EtcdClient::connect(&europe.config()).await.unwrap();
    populate_europe(&client, false).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "cluster-europe", &europe);
    // A file for our own cluster is ignored, as Cilium does.
    write_config(dir.path(), "cluster-usa", &europe);

    let (state, local) = usa();
    let metrics = Metrics::new();
    let mesh = ClusterMesh::spawn(
        dir.path().into(),
        local,
        state.clone(),
        metrics.clone(),
        timing(),
    );
    let status = wait_for("cluster-europe ready", || {
        status_of(&mesh, "cluster-europe").filter(|s| s.ready)
    })
    .await;

    assert_eq!(
        mesh.statuses().len(),
        1,
        "own cluster's file must be ignored"
    );
    // A clean first connect is no failure, also once the status has been refreshed.
    tokio::time::sleep(timing().status_interval * 3).await;
    let clean = status_of(&mesh, "cluster-europe").unwrap();
    assert_eq!(
        (clean.num_failures, clean.last_failure.as_deref()),
        (0, None),
        "{clean:?}"
    );
    assert_eq!(
        (
            status.num_nodes,
            status.num_identities,
            status.num_endpoints,
            status.num_shared_services
        ),
        (2, 1, 2, 1),
        "{status:?}"
    );
    let config = status.config.clone().unwrap();
    assert!(
        config.retrieved && config.cluster_id == 2 && !config.kvstoremesh && !config.sync_canaries
    );
    {
        let m = state.read();
        let host = m
            .ipcache()
            .find(|e| e.prefix.to_string() == "198.18.2.1/32")
            .unwrap();
        assert_eq!(
            host.identity, 6,
            "a remote host identity becomes remote-node"
        );
        assert_eq!(
            m.identity(131073).unwrap().cluster.as_ref(),
            "cluster-europe"
        );
        assert!(
            m.node("cluster-europe", "eu-1").unwrap().pod_cidrs[0].to_string() == "10.2.0.0/24"
        );
    }

    let text = metrics.render();
    for (kind, reason, n) in [
        ("node", "name-mismatch", 1),
        ("node", "cluster-mismatch", 1),
        ("node", "cluster-id-mismatch", 1),
        ("node", "decode", 1),
        ("identity", "identity-out-of-range", 1),
        ("identity", "missing-cluster-label", 1),
        ("identity", "cluster-mismatch", 1),
        ("ipcache", "ip-key-mismatch", 1),
        ("ipcache", "identity-out-of-range", 1),
        ("service", "name-mismatch", 1),
    ] {
        let line = format!(
            r#"strait_kvstore_rejected_total{{cluster="cluster-europe",kind="{kind}",reason="{reason}"}} {n}"#
        );
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }

    // Live changes after the list: a delete and a service that stops being shared.
    client
        .delete("cilium/state/nodes/v1/cluster-europe/eu-2")
        .await
        .unwrap();
    put(
        &client,
        "cilium/state/services/v1/cluster-europe/default/payment-api",
        &service_json("cluster-europe", 2, false, "10.2.0.5"),
    )
    .await;
    wait_for("eu-2 deleted and service withdrawn", || {
        let c = state.read().counts("cluster-europe");
        (c.nodes == 1 && c.services == 0).then_some(())
    })
    .await;

    // Removing the config file drains the cluster.
    std::fs::remove_file(dir.path().join("cluster-europe")).unwrap();
    wait_for("cluster-europe drained", || {
        (state.read().cluster("cluster-europe").is_none() && mesh.statuses().is_empty())
            .then_some(())
    })
    .await;
    assert_eq!(state.read().counts("cluster-europe").nodes, 0);
    assert_eq!(
        state.read().counts("cluster-usa").nodes,
        1,
        "the local cluster is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_cache_prefixes_are_read_only_after_their_sync_canary() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    put(&client, "cilium/cluster-config/cluster-europe", r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#).await;
    put(
        &client,
        "cilium/cache/nodes/v1/cluster-europe/eu-1",
        &node_json("cluster-europe", 2, "eu-1", "198.18.2.1", "10.2.0.0"),
    )
    .await;
    put(
        &client,
        "cilium/cache/ip/v1/cluster-europe/10.2.0.5",
        &ip_json("10.2.0.5", "198.18.2.1", 131073),
    )
    .await;
    put(
        &client,
        "cilium/cache/identities/v1/cluster-europe/id/131073",
        &identity_labels("database", "cluster-europe"),
    )
    .await;
    // The state prefix of the same cluster must NOT be read when the config says cached.
    put(
        &client,
        "cilium/state/nodes/v1/cluster-europe/eu-state",
        &node_json("cluster-europe", 2, "eu-state", "198.18.2.9", "10.2.9.0"),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "cluster-europe", &etcd);
    let (state, local) = usa();
    let mesh = ClusterMesh::spawn(
        dir.path().into(),
        local,
        state.clone(),
        Metrics::new(),
        timing(),
    );
    let status = wait_for("config retrieved", || {
        status_of(&mesh, "cluster-europe").filter(|s| s.config.is_some())
    })
    .await;
    assert!(status.config.unwrap().kvstoremesh);

    // No canary yet: nothing may be read, however long we wait.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        state.read().counts("cluster-europe").nodes,
        0,
        "data read before its sync canary"
    );

    put(
        &client,
        "cilium/synced/cluster-europe/cilium/cache/nodes/v1",
        "2025-03-01T10:20:30Z",
    )
    .await;
    wait_for("nodes after their canary", || {
        (state.read().counts("cluster-europe").nodes == 1).then_some(())
    })
    .await;
    assert!(state.read().node("cluster-europe", "eu-1").is_some());
    assert_eq!(
        state.read().counts("cluster-europe").endpoints,
        0,
        "ipcache canary not written yet"
    );

    for kind in ["ip", "identities", "services"] {
        put(
            &client,
            &format!("cilium/synced/cluster-europe/cilium/cache/{kind}/v1"),
            "2025-03-01T10:20:30Z",
        )
        .await;
    }
    let status = wait_for("ready after all canaries", || {
        status_of(&mesh, "cluster-europe").filter(|s| s.ready)
    })
    .await;
    assert_eq!(
        (
            status.num_nodes,
            status.num_endpoints,
            status.num_identities
        ),
        (1, 1, 1),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_changed_config_removes_what_vanished_and_keeps_the_rest() {
    let first = EtcdServer::new();
    let client = EtcdClient::connect(&first.config()).await.unwrap();
    populate_europe(&client, false).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "cluster-europe", &first);
    let (state, local) = usa();
    let mesh = ClusterMesh::spawn(
        dir.path().into(),
        local,
        state.clone(),
        Metrics::new(),
        timing(),
    );
    wait_for("ready on the first etcd", || {
        status_of(&mesh, "cluster-europe").filter(|s| s.ready)
    })
    .await;
    assert!(state.read().node("cluster-europe", "eu-2").is_some());

    // The cluster moves to another etcd that no longer has eu-2.
    let second = EtcdServer::new();
    let client2 = EtcdClient::connect(&second.config()).await.unwrap();
    populate_europe(&client2, false).await;
    client2
        .delete("cilium/state/nodes/v1/cluster-europe/eu-2")
        .await
        .unwrap();
    let mut versions = state.subscribe();
    versions.borrow_and_update();
    write_config(dir.path(), "cluster-europe", &second);

    wait_for("eu-2 removed after the new list", || {
        state
            .read()
            .node("cluster-europe", "eu-2")
            .is_none()
            .then_some(())
    })
    .await;
    let m = state.read();
    assert!(
        m.node("cluster-europe", "eu-1").is_some(),
        "nodes still listed must stay"
    );
    assert_eq!(
        m.counts("cluster-europe").endpoints,
        2,
        "ipcache entries survive the reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pod_cidrs_and_duplicate_cluster_ids_are_refused_while_the_rest_works() {
    let europe = EtcdServer::new();
    let c_eu = EtcdClient::connect(&europe.config()).await.unwrap();
    populate_europe(&c_eu, false).await;

    // asia overlaps usa's 10.1.0.0/16.
    let asia = EtcdServer::new();
    let c_asia = EtcdClient::connect(&asia.config()).await.unwrap();
    put(
        &c_asia,
        "cilium/cluster-config/cluster-asia",
        r#"{"id":3,"capabilities":{"maxConnectedClusters":255}}"#,
    )
    .await;
    put(
        &c_asia,
        "cilium/state/nodes/v1/cluster-asia/asia-1",
        &node_json("cluster-asia", 3, "asia-1", "198.18.3.1", "10.1.7.0"),
    )
    .await;
    put(
        &c_asia,
        "cilium/state/services/v1/cluster-asia/default/payment-api",
        &service_json("cluster-asia", 3, true, "10.1.7.5"),
    )
    .await;

    // africa claims europe's cluster ID.
    let africa = EtcdServer::new();
    let c_af = EtcdClient::connect(&africa.config()).await.unwrap();
    put(
        &c_af,
        "cilium/cluster-config/cluster-africa",
        r#"{"id":2,"capabilities":{"maxConnectedClusters":255}}"#,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "cluster-europe", &europe);
    let (state, local) = usa();
    let mesh = ClusterMesh::spawn(
        dir.path().into(),
        local,
        state.clone(),
        Metrics::new(),
        timing(),
    );
    wait_for("europe ready", || {
        status_of(&mesh, "cluster-europe").filter(|s| s.ready)
    })
    .await;
    write_config(dir.path(), "cluster-asia", &asia);
    write_config(dir.path(), "cluster-africa", &africa);

    let asia_status = wait_for("asia refused", || {
        status_of(&mesh, "cluster-asia").filter(|s| s.error.is_some() && s.synced.nodes)
    })
    .await;
    let error = asia_status.error.clone().unwrap();
    for needle in ["cluster-asia", "cluster-usa", "10.1.7.0/24", "10.1.0.0/16"] {
        assert!(
            error.contains(needle),
            "refusal must name {needle}: {error}"
        );
    }
    assert!(!asia_status.ready);
    let africa_status = wait_for("africa refused", || {
        status_of(&mesh, "cluster-africa").filter(|s| s.error.is_some())
    })
    .await;
    let error = africa_status.error.unwrap();
    assert!(
        error.contains("cluster ID 2") && error.contains("cluster-europe"),
        "{error}"
    );

    let m = state.read();
    assert!(
        m.routable_nodes()
            .all(|n| n.cluster.as_ref() != "cluster-asia"),
        "no routes for a refused cluster"
    );
    assert!(
        status_of(&mesh, "cluster-europe").unwrap().ready,
        "europe keeps working"
    );
    // payment-api is not defined locally in this test, so check asia's backends are unusable.
    assert!(!m.usable("cluster-asia"));
    assert!(m.usable("cluster-europe"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_mirrors_remote_state_into_the_local_cache_that_agents_read() {
    use strait::mesh::kvstoremesh::{KvstoreMesh, MeshOptions};

    // europe's own etcd, as its clustermesh-apiserver fills it, canaries included.
    let europe = EtcdServer::new();
    let c_eu = EtcdClient::connect(&europe.config()).await.unwrap();
    populate_europe(&c_eu, true).await;
    for kind in ["nodes", "services", "identities", "ip"] {
        put(
            &c_eu,
            &format!("cilium/synced/cluster-europe/cilium/state/{kind}/v1"),
            "2025-03-01T10:20:30Z",
        )
        .await;
    }

    // usa's etcd, with strait kvstoremesh mirroring europe into it.
    let usa_etcd = EtcdServer::new();
    let c_usa = EtcdClient::connect(&usa_etcd.config()).await.unwrap();
    let mesh_dir = tempfile::tempdir().unwrap();
    write_config(mesh_dir.path(), "cluster-europe", &europe);
    let options = MeshOptions {
        config_timeout: Duration::from_secs(5),
        drain_grace: Duration::from_secs(1),
        ..MeshOptions::default()
    };
    let kvstoremesh = KvstoreMesh::spawn(
        mesh_dir.path().into(),
        "cluster-usa",
        c_usa.clone(),
        Metrics::new(),
        options,
    );

    // Exactly what a real KVStoreMesh writes for a remote with ID 2.
    let config = wait_key(&c_usa, "cilium/cluster-config/cluster-europe", true)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(config).unwrap(),
        r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#
    );
    wait_key(
        &c_usa,
        "cilium/synced/cluster-europe/cilium/cache/ip/v1",
        true,
    )
    .await;
    // usa's own config is the cluster publisher's (the agents'), not the mirror's.
    assert!(
        get(&c_usa, "cilium/cluster-config/cluster-usa")
            .await
            .is_none()
    );
    // Each kind is mirrored by its own watcher: wait for each, do not assume an order.
    let node = wait_key(&c_usa, "cilium/cache/nodes/v1/cluster-europe/eu-1", true)
        .await
        .expect("node mirrored");
    assert_eq!(
        node,
        node_json("cluster-europe", 2, "eu-1", "198.18.2.1", "10.2.0.0").into_bytes(),
        "mirrored verbatim"
    );
    assert!(
        wait_key(
            &c_usa,
            "cilium/cache/identities/v1/cluster-europe/id/131073",
            true
        )
        .await
        .is_some()
    );
    assert!(
        wait_key(&c_usa, "cilium/cache/ip/v1/cluster-europe/10.2.0.5", true)
            .await
            .is_some()
    );

    // An agent of usa, configured with europe pointing at usa's own etcd, reads the cache.
    let agent_dir = tempfile::tempdir().unwrap();
    write_config(agent_dir.path(), "cluster-europe", &usa_etcd);
    let (state, local) = usa();
    let agent = ClusterMesh::spawn(
        agent_dir.path().into(),
        local,
        state.clone(),
        Metrics::new(),
        timing(),
    );
    let status = wait_for("agent ready through the cache", || {
        status_of(&agent, "cluster-europe").filter(|s| s.ready)
    })
    .await;
    assert!(status.config.as_ref().unwrap().kvstoremesh, "{status:?}");
    assert_eq!(
        (
            status.num_nodes,
            status.num_endpoints,
            status.num_identities,
            status.num_shared_services
        ),
        (2, 2, 1, 1)
    );

    // Live: a change in europe reaches the agent through the mirror.
    c_eu.delete("cilium/state/nodes/v1/cluster-europe/eu-2")
        .await
        .unwrap();
    wait_for("delete propagated", || {
        (state.read().counts("cluster-europe").nodes == 1).then_some(())
    })
    .await;

    // Removal: config gone at once, cache after the grace period.
    std::fs::remove_file(mesh_dir.path().join("cluster-europe")).unwrap();
    wait_key(&c_usa, "cilium/cluster-config/cluster-europe", false).await;
    wait_key(&c_usa, "cilium/cache/nodes/v1/cluster-europe/eu-1", false).await;
    drop(kvstoremesh);
}

async fn get(client: &EtcdClient, key: &str) -> Option<Vec<u8>> {
    client
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .map(|kv| kv.value)
}

/// Waits until `key` exists (returning its value) or, with `present == false`, is gone.
async fn wait_key(client: &EtcdClient, key: &str, present: bool) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = get(client, key).await;
        if value.is_some() == present {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {key} to be {}",
            if present { "written" } else { "deleted" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_publishes_its_node_syncs_the_mesh_and_reports_status_over_its_api() {
    strait_tests::require_privileges();
    // The datapath too: socket LB on a child cgroup of ours, maps pinned in a directory of
    // ours (removed at the end, which detaches the pinned links).
    let cgroup = strait_tests::TestCgroup::new();
    let pin_root =
        std::path::PathBuf::from("/sys/fs/bpf").join(strait_tests::unique_name("strait-test-"));
    struct RemovePins(std::path::PathBuf);
    impl Drop for RemovePins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _pins = RemovePins(pin_root.clone());
    let usa_etcd = EtcdServer::new();
    let c_usa = EtcdClient::connect(&usa_etcd.config()).await.unwrap();
    // Another node of our own cluster, published by its agent.
    put(
        &c_usa,
        "cilium/state/nodes/v1/cluster-usa/usa-2",
        &node_json("cluster-usa", 1, "usa-2", "198.18.1.2", "10.1.1.0"),
    )
    .await;
    let europe = EtcdServer::new();
    let c_eu = EtcdClient::connect(&europe.config()).await.unwrap();
    populate_europe(&c_eu, false).await;

    let dir = tempfile::tempdir().unwrap();
    let mesh_dir = dir.path().join("clustermesh");
    std::fs::create_dir(&mesh_dir).unwrap();
    write_config(&mesh_dir, "cluster-europe", &europe);
    let kvstore = usa_etcd.write_cilium_config(
        &dir.path().join("etcd.yaml"),
        CiliumConfigOptions::default(),
    );
    let socket = dir.path().join("strait.sock");
    let metrics_port = strait_tests::etcd::free_port();
    // The local payment-api, global with affinity local, from a manifests directory.
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("payment-api.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment-api\n  namespace: default\n  annotations:\n    \
         service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: \"local\"\nspec:\n  clusterIP: 10.96.0.10\n  \
         ports:\n  - port: 8080\n",
    )
    .unwrap();
    let yaml = format!(
        "cluster: {{name: cluster-usa, id: 1}}\nnode: {{name: usa-1, internalIP: 198.18.1.1, podCIDRs: [10.1.0.0/24]}}\n\
         kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nmetricsAddress: 127.0.0.1:{metrics_port}\n\
         wireguard: {{enabled: false}}\nmanifestsDir: {}\ndatapath: {{pinRoot: {}, cgroup: {}}}\n",
        kvstore.display(),
        mesh_dir.display(),
        dir.path().display(),
        socket.display(),
        manifests.display(),
        pin_root.display(),
        cgroup.path().display()
    );
    let config = strait::config::AgentConfig::parse(Path::new("agent.yaml"), &yaml).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(strait::daemon::run(config, async move {
        let _ = stop_rx.await;
    }));

    let status = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(s) = strait::api::fetch_status(&socket).await
                && s.cluster_mesh.clusters.iter().all(|c| c.ready)
                && !s.cluster_mesh.clusters.is_empty()
                && s.cluster.num_nodes == 2
                && s.cluster_mesh.num_global_services == 1
            {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent never reported a synced mesh"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(status.cluster.kvstore_synced);
    let europe_status = &status.cluster_mesh.clusters[0];
    assert_eq!(
        (europe_status.name.as_str(), europe_status.num_nodes),
        ("cluster-europe", 2)
    );
    let text = status.render();
    assert!(
        text.contains("ClusterMesh:   1/1 remote clusters ready"),
        "{text}"
    );
    assert!(
        text.contains("cluster-europe: ready, 2 nodes, 2 endpoints, 1 identities, 1 services"),
        "{text}"
    );
    // The JSON document keeps Cilium's RemoteCluster field names.
    let json = serde_json::to_value(&status).unwrap();
    let cluster = &json["cluster-mesh"]["clusters"][0];
    for field in [
        "num-nodes",
        "num-shared-services",
        "num-endpoints",
        "num-identities",
        "num-failures",
        "synced",
        "config",
        "connected",
        "ready",
    ] {
        assert!(cluster.get(field).is_some(), "missing {field} in {cluster}");
    }
    assert_eq!(cluster["config"]["cluster-id"], 2);

    // The datapath is loaded, pinned, and programmed from the state model: the local
    // payment-api frontend (global, affinity local) has no local backend, so europe's
    // exported backend serves it.
    let dp = status.datapath.as_ref().expect("datapath status");
    assert_eq!(dp.cgroup, cgroup.path().display().to_string());
    assert!(text.contains("Datapath:      eBPF"), "{text}");
    let pins = strait::datapath::PinDir::new(&pin_root);
    let open = |name| strait::datapath::open_pinned(&pins, name).unwrap();
    let lb = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let lb = strait::datapath::lb::list(
                open(strait_common::names::MAP_LB4_SERVICES),
                open(strait_common::names::MAP_LB4_BACKENDS),
            )
            .unwrap();
            if !lb.is_empty() || tokio::time::Instant::now() > deadline {
                break lb;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(lb.len(), 1, "{lb:?}");
    assert_eq!(
        (
            lb[0].frontend.address.to_string(),
            lb[0].frontend.port,
            lb[0].global
        ),
        ("10.96.0.10".to_string(), 8080, true)
    );
    let backends: Vec<(String, u16, &str)> = lb[0]
        .backends
        .iter()
        .map(|b| {
            let a = b.backend.expect("backend entry");
            (a.address.to_string(), a.cluster_id, b.state)
        })
        .collect();
    assert_eq!(backends, [("10.2.0.5".to_string(), 2, "active")], "{lb:?}");

    // Our node is in our kvstore, as a Cilium agent in kvstore mode writes it.
    let node = wait_key(&c_usa, "cilium/state/nodes/v1/cluster-usa/usa-1", true)
        .await
        .unwrap();
    let node: serde_json::Value = serde_json::from_slice(&node).unwrap();
    assert_eq!(
        (
            node["Name"].as_str(),
            node["Cluster"].as_str(),
            node["ClusterID"].as_u64()
        ),
        (Some("usa-1"), Some("cluster-usa"), Some(1))
    );
    assert_eq!(node["IPv4AllocCIDR"]["IP"], "10.1.0.0");

    // Metrics are served.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(
        body.contains(r#"strait_remote_cluster_ready{cluster="cluster-europe"} 1"#),
        "{body}"
    );

    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert!(!socket.exists(), "the API socket is removed on stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_services_are_exported_by_exactly_one_elected_writer() {
    use strait::{k8s::ManifestsSource, mesh::exporter};

    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let payment = "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment-api\n  namespace: default\n  annotations:\n    \
                   service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 8080\n---\n\
                   apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: payment-api-1\n  namespace: default\n  \
                   labels: {kubernetes.io/service-name: payment-api}\naddressType: IPv4\nports: [{port: 8080, protocol: TCP}]\n\
                   endpoints:\n- addresses: [10.1.0.5]\n  conditions: {ready: true}\n---\n\
                   apiVersion: v1\nkind: Service\nmetadata:\n  name: internal\n  namespace: default\nspec:\n  clusterIP: 10.96.0.11\n  \
                   ports:\n  - port: 80\n";
    std::fs::write(manifests.path().join("services.yaml"), payment).unwrap();

    // Two replicas, each with its own view of the manifests, campaigning for the same role.
    let replica = |identity: &str| {
        let state = StateHandle::new("cluster-usa", 1);
        let source = ManifestsSource::spawn(
            manifests.path().into(),
            state.clone(),
            1,
            Duration::from_millis(50),
        );
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(exporter::run(
            client.clone(),
            exporter::Publication {
                cluster: "cluster-usa".into(),
                cluster_id: 1,
                max_connected_clusters: 255,
            },
            identity.into(),
            state,
            Duration::from_secs(2),
            source.synced(),
            stop,
        ));
        (source, task, stop_tx)
    };
    let (_source_a, task_a, _stop_a) = replica("replica-a");
    let (_source_b, task_b, _stop_b) = replica("replica-b");

    // The cluster's config and heartbeat, so other clusters can read this etcd directly.
    let config_key = "cilium/cluster-config/cluster-usa";
    let own_config =
        r#"{"id":1,"capabilities":{"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;
    let own = wait_key(&client, config_key, true).await.unwrap();
    assert_eq!(String::from_utf8(own).unwrap(), own_config);
    wait_key(&client, "cilium/.heartbeat", true).await;

    let key = "cilium/state/services/v1/cluster-usa/default/payment-api";
    let value = wait_key(&client, key, true).await.unwrap();
    assert_eq!(
        String::from_utf8(value).unwrap(),
        r#"{"cluster":"cluster-usa","namespace":"default","name":"payment-api","frontends":{"10.96.0.10":{"":{"Protocol":"TCP","Port":8080}}},"backends":{"10.1.0.5":{"":{"Protocol":"TCP","Port":8080}}},"hostnames":{},"labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":1}"#
    );
    assert!(
        get(
            &client,
            "cilium/state/services/v1/cluster-usa/default/internal"
        )
        .await
        .is_none(),
        "non-global services are not exported"
    );

    // Exactly one leader; when it goes away, the other takes over and the export stays.
    let leader = || async {
        let mut election = client.raw().election_client();
        let resp = election
            .leader(exporter::election_name("cluster-usa"))
            .await
            .unwrap();
        String::from_utf8(resp.kv().unwrap().value().to_vec()).unwrap()
    };
    let first = leader().await;
    let (gone, survivor) = if first == "replica-a" {
        (task_a, "replica-b")
    } else {
        (task_b, "replica-a")
    };
    gone.abort();
    let deadline = tokio::time::Instant::now() + WAIT;
    while leader().await != survivor {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{survivor} never took over from {first}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_key(&client, key, true).await;
    // The config went with the old leader's lease only when that expired; the new leader
    // wrote it again on its own lease.
    let own = wait_key(&client, config_key, true).await.unwrap();
    assert_eq!(String::from_utf8(own).unwrap(), own_config);

    // The service stops being global: the new leader withdraws it.
    std::fs::write(
        manifests.path().join("services.yaml"),
        payment.replace("service.cilium.io/global: \"true\"", "other: x"),
    )
    .unwrap();
    wait_key(&client, key, false).await;
}

/// Direct mode: two clusters running agents only (no kvstoremesh, no mirror), each agent
/// reading the other cluster's etcd directly. Each cluster's config and global services are
/// published by its elected agent, so both remotes turn ready and share their services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_clusters_of_agents_alone_connect_and_share_global_services() {
    struct Cluster {
        name: &'static str,
        id: u32,
        cidr: &'static str,
        ip: &'static str,
    }
    let clusters = [
        Cluster {
            name: "cluster-usa",
            id: 1,
            cidr: "10.1.0.0/24",
            ip: "198.18.1.1",
        },
        Cluster {
            name: "cluster-europe",
            id: 2,
            cidr: "10.2.0.0/24",
            ip: "198.18.2.1",
        },
    ];
    let etcds = [EtcdServer::new(), EtcdServer::new()];
    let dir = tempfile::tempdir().unwrap();
    let mut stops = Vec::new();
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let cdir = dir.path().join(c.name);
        let mesh_dir = cdir.join("clustermesh");
        let manifests = cdir.join("manifests");
        std::fs::create_dir_all(&mesh_dir).unwrap();
        std::fs::create_dir_all(&manifests).unwrap();
        let other = 1 - i;
        write_config(&mesh_dir, clusters[other].name, &etcds[other]);
        let kvstore =
            etcds[i].write_cilium_config(&cdir.join("etcd.yaml"), CiliumConfigOptions::default());
        std::fs::write(
            manifests.join("payment-api.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment-api\n  namespace: default\n  annotations:\n    \
             service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 8080\n",
        )
        .unwrap();
        let socket = cdir.join("strait.sock");
        let yaml = format!(
            "cluster: {{name: {}, id: {}}}\nnode: {{name: node-1, internalIP: {}, podCIDRs: [{}]}}\n\
             kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\n\
             metricsAddress: 127.0.0.1:{}\nwireguard: {{enabled: false}}\nmanifestsDir: {}\n",
            c.name,
            c.id,
            c.ip,
            c.cidr,
            kvstore.display(),
            mesh_dir.display(),
            cdir.display(),
            socket.display(),
            strait_tests::etcd::free_port(),
            manifests.display(),
        );
        let config = strait::config::AgentConfig::parse(Path::new("agent.yaml"), &yaml).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        agents.push(tokio::spawn(strait::daemon::run(config, async move {
            let _ = stop_rx.await;
        })));
        stops.push(stop_tx);
        sockets.push(socket);
    }

    for (i, socket) in sockets.iter().enumerate() {
        let remote = clusters[1 - i].name;
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            let s = strait::api::fetch_status(socket).await.ok();
            if let Some(s) = &s
                && s.cluster_mesh.clusters.len() == 1
                && s.cluster_mesh.clusters[0].ready
                && s.cluster_mesh.num_global_services == 1
            {
                break s.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {remote} never turned ready with its global service: {:?}",
                clusters[i].name,
                s.map(|s| s.cluster_mesh)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let r = &status.cluster_mesh.clusters[0];
        assert_eq!(r.name, remote);
        assert_eq!((r.num_nodes, r.num_shared_services), (1, 1), "{r:?}");
        let config = r.config.as_ref().unwrap();
        assert!(config.retrieved && !config.kvstoremesh, "{config:?}");
        assert_eq!(config.cluster_id, clusters[1 - i].id);
    }

    for stop in stops {
        let _ = stop.send(());
    }
    for agent in agents {
        agent.await.unwrap().unwrap();
    }
}
