//! etcd authorisation of a cluster's kvstore against a real etcd with `--client-cert-auth` and
//! authentication enabled by `strait etcd init`'s code (`kvstore::auth::apply` with the
//! clustermesh plan): what a remote cluster's credentials (CN `remote`, `remote-<peer>`) may
//! read, that they can write and delete nothing, that strait's remote sync works with exactly
//! those rights, and that the agent's credentials write only their own cluster's prefixes.

use std::{path::Path, time::Duration};

use strait::{
    identity::{IdentityRange, LabelArray, MaxConnectedClusters},
    kvstore::{EtcdClient, KvstoreError, Lease, auth},
    mesh::{
        manager::ClusterMesh,
        remote::{LocalCluster, RemoteClusterStatus, RemoteTiming},
    },
    metrics::Metrics,
    publish::{
        allocator::IdentityAllocator,
        publisher::{EndpointPublisher, LocalEndpoint, LocalNode, publish_node},
    },
    state::StateHandle,
    wire::users::clustermesh_plan,
};
use strait_tests::etcd::{CiliumConfigOptions, EtcdServer};

const WAIT: Duration = Duration::from_secs(20);
const EUROPE: &str = "cluster-europe";
const USA: &str = "cluster-usa";

fn is_denied(r: &Result<impl std::fmt::Debug, KvstoreError>) -> bool {
    matches!(r, Err(KvstoreError::Request { reason, .. }) if reason.contains("permission denied"))
}

macro_rules! assert_denied {
    ($what:expr, $r:expr) => {{
        let r = $r;
        assert!(is_denied(&r), "{} must be refused, got {r:?}", $what);
    }};
}

async fn connect(etcd: &EtcdServer, cn: &str) -> EtcdClient {
    EtcdClient::connect(&etcd.config_as(cn))
        .await
        .unwrap_or_else(|e| panic!("connecting as {cn}: {e}"))
}

async fn put(client: &EtcdClient, key: &str, value: &str) {
    client
        .put(key, value.as_bytes().to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

fn node_json(name: &str, ip: &str, cidr_ip: &str) -> String {
    format!(
        r#"{{"Name":"{name}","Cluster":"cluster-europe","IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}],"IPv4AllocCIDR":{{"IP":"{cidr_ip}","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":2,"Source":"custom-resource","EncryptionKey":255,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}}"#
    )
}

async fn snapshot(admin: &EtcdClient) -> Vec<(String, Vec<u8>)> {
    admin
        .list_prefix("cilium/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

/// What europe's kvstore holds: its own state, a KVStoreMesh cache of a third cluster, the
/// cluster configs of both, canaries, the exporter's election key, the heartbeat.
async fn populate_europe(admin: &EtcdClient) {
    put(
        admin,
        "cilium/cluster-config/cluster-europe",
        r#"{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#,
    )
    .await;
    put(
        admin,
        "cilium/cluster-config/cluster-asia",
        r#"{"id":3,"capabilities":{"cached":true,"maxConnectedClusters":255}}"#,
    )
    .await;
    put(
        admin,
        "cilium/state/nodes/v1/cluster-europe/eu-1",
        &node_json("eu-1", "198.18.2.1", "10.2.0.0"),
    )
    .await;
    put(
        admin,
        "cilium/state/identities/v1/id/131073",
        "k8s:app=database;k8s:io.cilium.k8s.policy.cluster=cluster-europe;k8s:io.kubernetes.pod.namespace=default;",
    )
    .await;
    put(
        admin,
        "cilium/state/ip/v1/default/10.2.0.5",
        r#"{"IP":"10.2.0.5","Mask":null,"HostIP":"198.18.2.1","ID":131073,"Key":255,"Metadata":""}"#,
    )
    .await;
    put(
        admin,
        "cilium/cache/nodes/v1/cluster-asia/as-1",
        r#"{"Name":"as-1","Cluster":"cluster-asia"}"#,
    )
    .await;
    for kind in ["nodes", "services", "identities", "ip"] {
        put(
            admin,
            &format!("cilium/synced/cluster-europe/cilium/state/{kind}/v1"),
            "2026-01-01T00:00:00Z",
        )
        .await;
    }
    put(
        admin,
        "cilium/synced/cluster-asia/cilium/cache/nodes/v1",
        "2026-01-01T00:00:00Z",
    )
    .await;
    put(admin, "cilium/.heartbeat", "2026-01-01T00:00:00Z").await;
    put(
        admin,
        "cilium/.strait/service-exporter/cluster-europe",
        "me",
    )
    .await;
}

/// A TLS etcd for europe with its data, users and roles, authentication on.
async fn europe() -> EtcdServer {
    let etcd = EtcdServer::new_tls();
    let admin = connect(&etcd, "admin-cluster-europe").await;
    let plan = clustermesh_plan(EUROPE, &[USA.to_owned()]);
    let first = auth::apply(&admin, &plan).await.expect("first init");
    assert!(first.first_enable, "{first:?}");
    // Populated after the first init: what was there before is purged (its own test below).
    populate_europe(&admin).await;
    etcd
}

/// Reads allowed to a remote cluster and reads, writes and deletes it must not do, for one
/// user name.
async fn check_remote_rights(etcd: &EtcdServer, cn: &str) {
    let admin = connect(etcd, "admin-cluster-europe").await;
    let before = snapshot(&admin).await;
    let remote = connect(etcd, cn).await;
    // Inside: heartbeat, our state, our cluster config, our canaries.
    for key in [
        "cilium/.heartbeat",
        "cilium/cluster-config/cluster-europe",
        "cilium/state/nodes/v1/cluster-europe/eu-1",
    ] {
        let kv = remote
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("{cn} reading {key}: {e}"));
        assert!(kv.is_some(), "{cn}: {key} readable and present");
    }
    for (prefix, n) in [
        ("cilium/state/", 3),
        ("cilium/synced/cluster-europe/", 4),
        ("cilium/.heartbeat", 1),
    ] {
        let kvs = remote
            .list_prefix(prefix)
            .await
            .unwrap_or_else(|e| panic!("{cn} listing {prefix}: {e}"));
        assert_eq!(kvs.len(), n, "{cn} listing {prefix}");
    }

    // Outside: another cluster's config and canaries, the KVStoreMesh cache, strait's own
    // keys, everything at once.
    for key in [
        "cilium/cluster-config/cluster-asia",
        "cilium/cache/nodes/v1/cluster-asia/as-1",
        "cilium/.strait/service-exporter/cluster-europe",
        "cilium/synced/cluster-asia/cilium/cache/nodes/v1",
    ] {
        assert_denied!(format!("{cn} reading {key}"), remote.get(key).await);
    }
    for prefix in [
        "cilium/cache/",
        "cilium/cluster-config/",
        "cilium/synced/",
        "cilium/",
        "cilium/state",
    ] {
        assert_denied!(
            format!("{cn} listing {prefix}"),
            remote.list_prefix(prefix).await
        );
    }

    // Writes: inside the readable ranges and outside, plain, create-only, with a lease.
    for key in [
        "cilium/state/nodes/v1/cluster-europe/evil",
        "cilium/state/ip/v1/default/0.0.0.0/0",
        "cilium/state/identities/v1/id/131099",
        "cilium/cluster-config/cluster-europe",
        "cilium/.heartbeat",
        "cilium/synced/cluster-europe/cilium/state/nodes/v1",
        "cilium/cache/nodes/v1/cluster-asia/evil",
        "cilium/state/nodes/v1/cluster-usa/evil",
        "unrelated",
    ] {
        assert_denied!(
            format!("{cn} writing {key}"),
            remote.put(key, b"x".to_vec(), None).await
        );
        assert_denied!(
            format!("{cn} creating {key}"),
            remote.create_only(key, b"x".to_vec(), None).await
        );
        assert_denied!(
            format!("{cn} updating {key}"),
            remote.update_if_different(key, b"x".to_vec(), None).await
        );
    }
    // A lease is no permission: granting one is allowed, writing with it is not.
    match Lease::grant(&remote, Duration::from_secs(10)).await {
        Ok(lease) => assert_denied!(
            format!("{cn} writing with a lease"),
            remote
                .put(
                    "cilium/state/nodes/v1/cluster-europe/evil",
                    b"x".to_vec(),
                    Some(lease.id()),
                )
                .await
        ),
        Err(e) => panic!("{cn} granting a lease: {e}"),
    }
    for key in [
        "cilium/state/nodes/v1/cluster-europe/eu-1",
        "cilium/cluster-config/cluster-europe",
        "cilium/.heartbeat",
    ] {
        assert_denied!(format!("{cn} deleting {key}"), remote.delete(key).await);
    }
    for prefix in ["cilium/state/", "cilium/", "cilium/synced/cluster-europe/"] {
        assert_denied!(
            format!("{cn} deleting {prefix}"),
            remote.delete_prefix(prefix).await
        );
    }
    assert_eq!(snapshot(&admin).await, before, "{cn} changed nothing");
    assert_eq!(before.len(), 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_credentials_read_only_what_a_clustermesh_reader_needs_and_write_nothing() {
    let etcd = europe().await;
    // Cilium's legacy/migration mode (CN=remote) and its cluster mode (CN=remote-<peer>).
    check_remote_rights(&etcd, "remote").await;
    check_remote_rights(&etcd, "remote-cluster-usa").await;

    // A certificate of the right CA with a name nobody created gets nothing, not even reads.
    let intruder = connect(&etcd, "remote-cluster-mars").await;
    assert_denied!(
        "an unknown user reading",
        intruder.get("cilium/cluster-config/cluster-europe").await
    );
    assert_denied!(
        "an unknown user writing",
        intruder
            .put(
                "cilium/state/nodes/v1/cluster-europe/x",
                b"x".to_vec(),
                None
            )
            .await
    );
    // The local KVStoreMesh reader (Cilium's local-<cluster>) reads the cache, not the state.
    let local = connect(&etcd, "local-cluster-europe").await;
    assert_eq!(local.list_prefix("cilium/cache/").await.unwrap().len(), 1);
    assert_eq!(
        local
            .list_prefix("cilium/cluster-config/")
            .await
            .unwrap()
            .len(),
        2
    );
    assert_denied!(
        "local reading state",
        local.list_prefix("cilium/state/").await
    );
    assert_denied!(
        "local writing the cache",
        local
            .put("cilium/cache/nodes/v1/cluster-asia/x", b"x".to_vec(), None)
            .await
    );
}

fn timing() -> RemoteTiming {
    RemoteTiming {
        config_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        status_interval: Duration::from_millis(100),
    }
}

fn status_of(mesh: &ClusterMesh, name: &str) -> Option<RemoteClusterStatus> {
    mesh.statuses().into_iter().find(|s| s.name == name)
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

fn mesh_reading(dir: &Path, etcd: &EtcdServer, cn: &'static str) -> (ClusterMesh, StateHandle) {
    etcd.write_cilium_config(
        &dir.join(EUROPE),
        CiliumConfigOptions {
            client_cn: Some(cn),
            ..CiliumConfigOptions::default()
        },
    );
    let state = StateHandle::new(USA, 1);
    let mesh = ClusterMesh::spawn(
        dir.into(),
        LocalCluster {
            name: USA.into(),
            id: 1,
            max_connected_clusters: MaxConnectedClusters::Max255,
        },
        state.clone(),
        Metrics::new(),
        timing(),
    );
    (mesh, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_syncs_a_remote_cluster_with_only_the_remote_users_rights() {
    let etcd = europe().await;
    for cn in ["remote", "remote-cluster-usa"] {
        let dir = tempfile::tempdir().unwrap();
        let (mesh, state) = mesh_reading(dir.path(), &etcd, cn);
        let status = wait_for(&format!("cluster-europe ready as {cn}"), || {
            status_of(&mesh, EUROPE).filter(|s| s.ready && s.synced.nodes && s.synced.endpoints)
        })
        .await;
        assert_eq!(
            (
                status.num_nodes,
                status.num_identities,
                status.num_endpoints
            ),
            (1, 1, 1),
            "{cn}: {status:?}"
        );
        let config = status.config.clone().unwrap();
        assert!(config.sync_canaries && !config.kvstoremesh, "{config:?}");
        assert_eq!(status.error, None, "{cn}: {status:?}");
        assert!(state.read().node(EUROPE, "eu-1").is_some());

        // Live changes reach the reader (its watches run under the same rights).
        let admin = connect(&etcd, "admin-cluster-europe").await;
        put(
            &admin,
            "cilium/state/nodes/v1/cluster-europe/eu-2",
            &node_json("eu-2", "198.18.2.2", "10.2.1.0"),
        )
        .await;
        wait_for(&format!("eu-2 seen as {cn}"), || {
            state.read().node(EUROPE, "eu-2").map(|_| ())
        })
        .await;
        admin
            .delete("cilium/state/nodes/v1/cluster-europe/eu-2")
            .await
            .unwrap();
        wait_for(&format!("eu-2 gone as {cn}"), || {
            state.read().node(EUROPE, "eu-2").is_none().then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_credentials_write_their_own_cluster_and_nothing_else() {
    let etcd = EtcdServer::new_tls();
    let admin = connect(&etcd, "admin-cluster-usa").await;
    auth::apply(&admin, &clustermesh_plan(USA, &[]))
        .await
        .expect("init");
    let agent = connect(&etcd, "agent-cluster-usa").await;

    // The real writers of an agent, under the agent's rights: node, endpoint, identity.
    let node = LocalNode {
        cluster: USA.into(),
        cluster_id: 1,
        name: "usa-1".into(),
        internal_ip: "198.18.1.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        wireguard_pubkey: None,
    };
    let publisher = tokio::spawn(publish_node(
        agent.clone(),
        node.clone(),
        Duration::from_secs(10),
    ));
    let endpoints = EndpointPublisher::new(agent.clone(), node, Duration::from_secs(10))
        .await
        .expect("endpoint publisher under the agent's rights");
    endpoints
        .publish(&LocalEndpoint {
            ip: "10.1.0.5".parse().unwrap(),
            identity: 65537,
            namespace: "default".into(),
            pod: "frontend-1".into(),
            endpoint_id: 7,
        })
        .await
        .expect("publishing an endpoint under the agent's rights");
    let allocator = IdentityAllocator::new(
        agent.clone(),
        USA,
        IdentityRange::for_cluster(1, MaxConnectedClusters::Max255),
        "usa-1",
        Duration::from_secs(10),
    )
    .await
    .expect("allocator under the agent's rights");
    let labels = LabelArray::parse_sorted_list(
        "k8s:app=frontend;k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.kubernetes.pod.namespace=default;",
    )
    .unwrap();
    let id = allocator
        .allocate(&labels)
        .await
        .expect("allocating an identity under the agent's rights");
    let deadline = tokio::time::Instant::now() + WAIT;
    while agent
        .get("cilium/state/nodes/v1/cluster-usa/usa-1")
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node never published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in [
        "cilium/state/ip/v1/default/10.1.0.5".to_owned(),
        format!("cilium/state/identities/v1/id/{id}"),
    ] {
        assert!(agent.get(&key).await.unwrap().is_some(), "{key} published");
    }
    // What the agent watches of its own cluster.
    for prefix in [
        "cilium/state/nodes/v1/cluster-usa/",
        "cilium/state/identities/v1/id",
        "cilium/state/ip/v1/default/",
    ] {
        agent
            .list_prefix(prefix)
            .await
            .unwrap_or_else(|e| panic!("agent listing {prefix}: {e}"));
    }

    // What the elected cluster publisher (an agent) writes of its own cluster.
    for key in [
        "cilium/state/services/v1/cluster-usa/default/svc",
        "cilium/cluster-config/cluster-usa",
        "cilium/.heartbeat",
        "cilium/.strait/service-exporter/cluster-usa/694d",
    ] {
        agent
            .put(key, b"x".to_vec(), None)
            .await
            .unwrap_or_else(|e| panic!("agent writing {key}: {e}"));
    }
    // Another cluster's prefixes, and this cluster's keys written by kvstoremesh only.
    for key in [
        "cilium/state/nodes/v1/cluster-europe/eu-1",
        "cilium/state/nodes/v1/cluster-usa2/x",
        "cilium/state/services/v1/cluster-europe/default/svc",
        "cilium/cache/nodes/v1/cluster-europe/eu-1",
        "cilium/cluster-config/cluster-europe",
        "cilium/synced/cluster-usa/cilium/state/nodes/v1",
        "cilium/.strait/service-exporter/cluster-europe",
    ] {
        assert_denied!(
            format!("agent writing {key}"),
            agent.put(key, b"x".to_vec(), None).await
        );
    }
    assert_denied!(
        "agent deleting everything",
        agent.delete_prefix("cilium/").await
    );
    assert_denied!(
        "agent reading another cluster's config",
        agent.get("cilium/cluster-config/cluster-europe").await
    );
    publisher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_is_idempotent_purges_unauthorised_writes_and_repairs_tampering() {
    let etcd = EtcdServer::new_tls();
    // Before authentication anyone with a certificate of the CA writes anything.
    let early = connect(&etcd, "remote").await;
    put(&early, "cilium/state/nodes/v1/cluster-usa/planted", "x").await;
    let lease = Lease::grant(&early, Duration::from_secs(60)).await.unwrap();
    early
        .put(
            "cilium/state/ip/v1/default/0.0.0.0/0",
            b"x".to_vec(),
            Some(lease.id()),
        )
        .await
        .unwrap();

    let admin = connect(&etcd, "admin-cluster-usa").await;
    let plan = clustermesh_plan(USA, &["cluster-europe".into(), "cluster-asia".into()]);
    let first = auth::apply(&admin, &plan).await.expect("first init");
    assert!(first.first_enable, "{first:?}");
    assert_eq!(
        (first.purged_keys, first.purged_leases),
        (2, 1),
        "{first:?}"
    );
    assert!(admin.list_prefix("cilium/").await.unwrap().is_empty());
    assert_denied!(
        "remote writing after init",
        early
            .put(
                "cilium/state/nodes/v1/cluster-usa/planted",
                b"x".to_vec(),
                None
            )
            .await
    );

    let again = auth::apply(&admin, &plan).await.expect("second init");
    assert!(again.unchanged(), "a second run changes nothing: {again:?}");

    // Tampering by someone with root rights: an extra grant, a stale per-cluster user, a
    // role taken away. The next init puts it back to the plan.
    let mut a = admin.raw().auth_client();
    a.role_grant_permission(
        "remote",
        etcd_client::Permission::read_write("cilium/").with_prefix(),
    )
    .await
    .unwrap();
    a.user_add(
        "remote-cluster-gone",
        "",
        Some(etcd_client::UserAddOptions::new().with_no_pwd()),
    )
    .await
    .unwrap();
    a.user_grant_role("remote-cluster-gone", "remote")
        .await
        .unwrap();
    a.user_revoke_role("agent-cluster-usa", "agent")
        .await
        .unwrap();
    let remote = connect(&etcd, "remote").await;
    put(&remote, "cilium/state/nodes/v1/cluster-usa/tampered", "x").await;

    let repair = auth::apply(&admin, &plan).await.expect("repairing init");
    assert_eq!(repair.grants_revoked, 1, "{repair:?}");
    assert_eq!(repair.users_removed, ["remote-cluster-gone"], "{repair:?}");
    assert_eq!(repair.role_memberships_changed, 1, "{repair:?}");
    assert!(!repair.first_enable, "{repair:?}");
    assert_denied!(
        "remote writing after the repair",
        remote
            .put("cilium/state/nodes/v1/cluster-usa/x", b"x".to_vec(), None)
            .await
    );
    let gone = connect(&etcd, "remote-cluster-gone").await;
    assert_denied!(
        "a removed user reading",
        gone.get("cilium/cluster-config/cluster-usa").await
    );
    let agent = connect(&etcd, "agent-cluster-usa").await;
    put(&agent, "cilium/state/nodes/v1/cluster-usa/usa-1", "x").await;
    // Not a first enable: data written under authentication stays.
    assert!(
        admin
            .get("cilium/state/nodes/v1/cluster-usa/tampered")
            .await
            .unwrap()
            .is_some()
    );
    for user in ["remote-cluster-europe", "remote-cluster-asia"] {
        let c = connect(&etcd, user).await;
        c.list_prefix("cilium/state/").await.unwrap();
    }
}
