//! Identities and this node's other lease-bound keys through a real lifecycle, against a real
//! etcd: replicas sharing an identity, concurrent allocators behind a slow etcd, pods whose
//! labels or IP change, lost leases, an etcd restarting empty, and the identity GC of
//! `strait kvstoremesh`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use strait::{
    identity::{IdentityRange, LabelArray, MaxConnectedClusters},
    k8s::Objects,
    kvstore::{EtcdClient, Lease},
    mesh::identity_gc::{self, GcMemory},
    publish::{
        allocator::IdentityAllocator,
        endpoints::EndpointSource,
        publisher::{self, EndpointPublisher, LocalEndpoint, LocalNode},
    },
    state::StateHandle,
};
use strait_tests::etcd::{EtcdServer, SlowProxy};

const TTL: Duration = Duration::from_secs(60);
/// Bound on "comes back" waits; failing it means it did not come back.
const PATIENCE: Duration = Duration::from_secs(60);
const MASTERS: &str = "cilium/state/identities/v1/id/";
const REFERENCES: &str = "cilium/state/identities/v1/value/";

fn range() -> IdentityRange {
    IdentityRange::for_cluster(1, MaxConnectedClusters::Max255)
}

fn labels(app: &str) -> LabelArray {
    LabelArray::parse_sorted_list(&format!(
        "k8s:app={app};k8s:io.kubernetes.pod.namespace=default;"
    ))
    .unwrap()
}

/// `labels(app)` as stored: sorted, with the cluster label.
fn stored(app: &str) -> String {
    format!(
        "k8s:app={app};k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.kubernetes.pod.namespace=default;"
    )
}

fn reference(app: &str, suffix: &str) -> String {
    format!("{REFERENCES}{}/{suffix}", stored(app))
}

async fn get(client: &EtcdClient, key: &str) -> Option<String> {
    client
        .get(key)
        .await
        .ok()
        .flatten()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

/// Master keys: ID → labels.
async fn masters(client: &EtcdClient) -> BTreeMap<u32, String> {
    // Empty while etcd restarts: callers compare with what they expect.
    client
        .list_prefix(MASTERS)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|kv| {
            (
                kv.key.rsplit('/').next().unwrap().parse().unwrap(),
                String::from_utf8(kv.value).unwrap(),
            )
        })
        .collect()
}

/// Waits until `cond` holds (checked every 100 ms), failing with `what` after [`PATIENCE`].
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn allocator(client: &EtcdClient, suffix: &str, ttl: Duration) -> Arc<IdentityAllocator> {
    Arc::new(
        IdentityAllocator::new(client.clone(), "cluster-usa", range(), suffix, ttl)
            .await
            .unwrap(),
    )
}

/// Runs the allocator's keeper until the returned handle is dropped.
fn keep(a: &Arc<IdentityAllocator>) -> strait::task::AbortOnDrop {
    let a = a.clone();
    strait::task::AbortOnDrop(tokio::spawn(async move { a.run().await }))
}

/// Two replicas with the same labels on one node share one identity: deleting one keeps the
/// node's reference (main deleted the reference and the master key, denying the survivor's
/// traffic mesh-wide). Agents never delete master keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_reference_until_the_last_one_goes() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let node = allocator(&client, "198.18.1.1", TTL).await;
    let a = node.allocate(&labels("web")).await.unwrap();
    let b = node.allocate(&labels("web")).await.unwrap();
    assert_eq!(a, b);
    let master = format!("{MASTERS}{a}");

    node.release(&labels("web")).await.unwrap();
    assert_eq!(
        get(&client, &reference("web", "198.18.1.1")).await,
        Some(a.to_string()),
        "one replica still uses the identity"
    );
    assert_eq!(get(&client, &master).await, Some(stored("web")));

    node.release(&labels("web")).await.unwrap();
    assert_eq!(get(&client, &reference("web", "198.18.1.1")).await, None);
    assert_eq!(
        get(&client, &master).await,
        Some(stored("web")),
        "agents leave master keys to the GC"
    );
    // Released once more than allocated: nothing happens (no negative count).
    node.release(&labels("web")).await.unwrap();
    assert_eq!(
        node.allocate(&labels("web")).await.unwrap(),
        a,
        "the master is reused"
    );
}

/// Several nodes allocating and releasing the same label sets at once, each through an etcd
/// round trip slowed to ≥ 20 ms: every allocation of one label set gets the same ID (no GC runs
/// here, and agents never delete masters), one master key per label set, and every reference
/// left points at its label set's master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocation_through_a_slow_etcd_gives_one_identity_per_label_set() {
    let etcd = EtcdServer::new();
    let direct = EtcdClient::connect(&etcd.config()).await.unwrap();
    let upstream = etcd.endpoint().trim_start_matches("http://").to_owned();
    let proxy = SlowProxy::start(upstream, Duration::from_millis(10)).await;
    let mut nodes = Vec::new();
    for n in 0..4 {
        // One connection each, as separate agents have.
        let client = EtcdClient::connect(&proxy.config()).await.unwrap();
        nodes.push(allocator(&client, &format!("198.18.1.{n}"), TTL).await);
    }
    let apps = ["a", "b", "c"];
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let node = node.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for round in 0..4 {
                    for (i, app) in apps.iter().enumerate() {
                        got.push((*app, node.allocate(&labels(app)).await.unwrap()));
                        // Nodes hold and drop at different moments.
                        if (round + i + n) % 2 == 0 {
                            node.release(&labels(app)).await.unwrap();
                        }
                    }
                }
                got
            })
        })
        .collect();
    let mut ids: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for t in tasks {
        for (app, id) in t.await.unwrap() {
            ids.entry(app).or_default().insert(id);
        }
    }
    for (app, set) in &ids {
        assert_eq!(
            set.len(),
            1,
            "label set {app} got several identities: {set:?}"
        );
    }
    let masters = masters(&direct).await;
    for app in apps {
        let holding: Vec<_> = masters.iter().filter(|(_, l)| **l == stored(app)).collect();
        assert_eq!(holding.len(), 1, "master keys of {app}: {holding:?}");
    }
    for kv in direct.list_prefix(REFERENCES).await.unwrap() {
        let id: u32 = String::from_utf8(kv.value).unwrap().parse().unwrap();
        let labels = masters.get(&id);
        assert!(
            labels.is_some_and(|l| kv.key.starts_with(&format!("{REFERENCES}{l}/"))),
            "reference {} points at {id}, whose master is {labels:?}",
            kv.key
        );
    }
}

/// The references' lease is revoked (or expires in an outage longer than its TTL): every
/// reference is written again on a new lease, and allocation keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_references_come_back_after_their_lease_is_lost() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let node = allocator(&client, "198.18.1.1", TTL).await;
    let _keeper = keep(&node);
    let web = node.allocate(&labels("web")).await.unwrap();
    let key = reference("web", "198.18.1.1");
    let lease = client.get(&key).await.unwrap().unwrap().lease;
    client.revoke_lease(lease).await.unwrap();
    eventually("the reference is written again on a new lease", || async {
        client
            .get(&key)
            .await
            .unwrap()
            .is_some_and(|kv| kv.lease != lease && kv.value == web.to_string().as_bytes())
    })
    .await;
    let db = node.allocate(&labels("db")).await.unwrap();
    assert_eq!(
        get(&client, &reference("db", "198.18.1.1")).await,
        Some(db.to_string())
    );
}

/// Master-key protection: a master key deleted while the identity is in use here is created
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_deleted_while_in_use_is_created_again() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let node = allocator(&client, "198.18.1.1", TTL).await;
    let _keeper = keep(&node);
    let web = node.allocate(&labels("web")).await.unwrap();
    let master = format!("{MASTERS}{web}");
    // The keeper's watch has listed the master before it goes.
    eventually("the master exists", || async {
        get(&client, &master).await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.delete(&master).await.unwrap();
    eventually("the master key is back", || async {
        get(&client, &master).await == Some(stored("web"))
    })
    .await;
}

fn local_node() -> LocalNode {
    LocalNode {
        cluster: "cluster-usa".into(),
        cluster_id: 1,
        name: "usa-1".into(),
        internal_ip: "198.18.1.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        wireguard_pubkey: None,
    }
}

/// The shipped kvstore keeps its data in memory: when it restarts it is empty. Everything this
/// node keeps there comes back by itself: its node, its endpoints, its identity references and
/// the master keys of the identities it uses, with the same IDs; and new allocations work.
/// Leases are Cilium's 15 min, so nothing here waits for a lease to expire or a keepalive
/// period (5 min) to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_comes_back_after_the_kvstore_restarts_empty() {
    let mut etcd = EtcdServer::new();
    assert!(
        etcd.is_memory_backed(),
        "the test etcd must run from tmpfs, as the shipped one does"
    );
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let ttl = strait::constants::NODE_LEASE_TTL;
    let node = local_node();
    let node_key = node.key();
    let _node_task = strait::task::AbortOnDrop(tokio::spawn(publisher::publish_node(
        client.clone(),
        node.clone(),
        ttl,
    )));
    let endpoints = Arc::new(
        EndpointPublisher::new(client.clone(), node, ttl)
            .await
            .unwrap(),
    );
    let _endpoints_task = strait::task::AbortOnDrop(tokio::spawn({
        let e = endpoints.clone();
        async move { e.keep_published().await }
    }));
    let identities = allocator(&client, "198.18.1.1", ttl).await;
    let _keeper = keep(&identities);
    let web = identities.allocate(&labels("web")).await.unwrap();
    identities.allocate(&labels("web")).await.unwrap();
    let db = identities.allocate(&labels("db")).await.unwrap();
    endpoints
        .publish(&LocalEndpoint {
            ip: "10.1.0.5".parse().unwrap(),
            identity: web,
            namespace: "default".into(),
            pod: "web-1".into(),
            endpoint_id: 1,
        })
        .await
        .unwrap();
    let ip_key = "cilium/state/ip/v1/default/10.1.0.5";
    eventually("the node is published", || async {
        get(&client, &node_key).await.is_some()
    })
    .await;
    let want_masters = BTreeMap::from([(web, stored("web")), (db, stored("db"))]);
    assert_eq!(masters(&client).await, want_masters);

    let node_lease = client.get(&node_key).await.unwrap().unwrap().lease;

    etcd.restart_empty();

    eventually(
        "node, endpoint, references and masters are back",
        || async {
            client
                .get(&node_key)
                .await
                .ok()
                .flatten()
                .is_some_and(|kv| kv.lease != node_lease)
                && get(&client, ip_key)
                    .await
                    .is_some_and(|v| v.contains(&format!("\"ID\":{web}")))
                && get(&client, &reference("web", "198.18.1.1")).await == Some(web.to_string())
                && get(&client, &reference("db", "198.18.1.1")).await == Some(db.to_string())
                && masters(&client).await == want_masters
        },
    )
    .await;
    // Allocation works again (main's allocator kept writing with its dead lease).
    let api = identities.allocate(&labels("api")).await.unwrap();
    assert!(!want_masters.contains_key(&api));
    assert_eq!(
        get(&client, &reference("api", "198.18.1.1")).await,
        Some(api.to_string())
    );
    // The two web users are still counted: one release keeps the reference.
    identities.release(&labels("web")).await.unwrap();
    assert_eq!(
        get(&client, &reference("web", "198.18.1.1")).await,
        Some(web.to_string())
    );
}

fn pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: usa-1, serviceAccountName: default, containers: [{{name: c, image: x}}]}}\n\
         status: {{podIP: {ip}}}\n---\n"
    )
}

fn objects(pods: &[(&str, &str, &str)]) -> Objects {
    let mut o = Objects::default();
    let yaml: String = pods.iter().map(|(n, a, ip)| pod(n, a, ip)).collect();
    o.add_yaml("pods.yaml", &yaml);
    o
}

/// The node's endpoint source through a pod lifecycle: scale-down of one of two replicas keeps
/// the shared identity; a label change releases the old identity's reference; an IP change
/// withdraws the old ipcache entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_changes_release_and_withdraw_what_they_no_longer_use() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let node = local_node();
    let allocator = allocator(&client, "198.18.1.1", TTL).await;
    let publisher = Arc::new(
        EndpointPublisher::new(client.clone(), node, TTL)
            .await
            .unwrap(),
    );
    let (tx, rx) = tokio::sync::watch::channel(objects(&[
        ("web-1", "web", "10.1.0.5"),
        ("web-2", "web", "10.1.0.6"),
    ]));
    let source = EndpointSource {
        cluster: "cluster-usa".into(),
        node: "usa-1".into(),
        allocator: allocator.clone(),
        publisher,
        state: StateHandle::new("cluster-usa", 1),
        cni: Default::default(),
    };
    let (_listed_tx, listed) = tokio::sync::watch::channel(true);
    let _source = strait::task::AbortOnDrop(tokio::spawn(source.run(rx, listed)));
    // Pod labels as the source derives them (namespace labels, service account, cluster).
    let web_ref = || async {
        let refs = client.list_prefix(REFERENCES).await.unwrap();
        refs.into_iter()
            .filter(|kv| kv.key.contains("k8s:app=web;"))
            .map(|kv| String::from_utf8(kv.value).unwrap())
            .next()
    };
    let ip = |last: u8| format!("cilium/state/ip/v1/default/10.1.0.{last}");
    eventually("both replicas published", || async {
        get(&client, &ip(5)).await.is_some() && get(&client, &ip(6)).await.is_some()
    })
    .await;
    let web: u32 = web_ref().await.expect("web's reference").parse().unwrap();

    // Scale-down: web-2 goes, web-1 keeps the identity.
    tx.send_replace(objects(&[("web-1", "web", "10.1.0.5")]));
    eventually("web-2's entry withdrawn", || async {
        get(&client, &ip(6)).await.is_none()
    })
    .await;
    assert_eq!(
        web_ref().await,
        Some(web.to_string()),
        "web-1 still uses the identity"
    );
    assert!(masters(&client).await.contains_key(&web));

    // Label change: web-1 becomes api; web's reference goes (nobody here uses it).
    tx.send_replace(objects(&[("web-1", "api", "10.1.0.5")]));
    eventually("web's reference released", || async {
        web_ref().await.is_none()
    })
    .await;
    let entry = get(&client, &ip(5)).await.unwrap();
    assert!(!entry.contains(&format!("\"ID\":{web}")), "{entry}");
    assert_eq!(
        allocator.in_use().await.len(),
        1,
        "{:?}",
        allocator.in_use().await
    );

    // IP change: the old entry is withdrawn, the new one published.
    tx.send_replace(objects(&[("web-1", "api", "10.1.0.7")]));
    eventually("new entry published, old one withdrawn", || async {
        get(&client, &ip(7)).await.is_some() && get(&client, &ip(5)).await.is_none()
    })
    .await;
    let in_use = allocator.in_use().await;
    assert_eq!(
        in_use.values().map(|(_, users)| users).sum::<usize>(),
        1,
        "{in_use:?}"
    );
}

/// The GC of `strait kvstoremesh` follows Cilium's rules: unused masters of this cluster's
/// range go in the second round that sees them unused; a master reused in between, one a
/// reference holds, and one of another cluster's range stay; a reference holding another ID
/// does not keep a master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_deletes_unused_masters_in_the_second_round() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let lease = Lease::grant(&client, TTL).await.unwrap();
    let node = allocator(&client, "198.18.1.1", TTL).await;
    let used = node.allocate(&labels("used")).await.unwrap();
    let put = |id: u32, app: &str| {
        let client = client.clone();
        let value = stored(app);
        async move {
            client
                .put(&format!("{MASTERS}{id}"), value, None)
                .await
                .unwrap()
        }
    };
    let (unused, reused, wrong_ref) = (65600, 65601, 65602);
    put(unused, "unused").await;
    put(reused, "reused").await;
    put(wrong_ref, "wrong").await;
    client
        .put(&reference("wrong", "198.18.1.9"), "65000", Some(lease.id()))
        .await
        .unwrap();
    // Cluster 2's range: not ours to collect.
    client
        .put(
            &format!("{MASTERS}131100"),
            "k8s:io.cilium.k8s.policy.cluster=other;",
            None,
        )
        .await
        .unwrap();

    let lock_lease = Lease::grant(&client, Duration::from_secs(25))
        .await
        .unwrap();
    let mut memory = GcMemory::default();
    let first = identity_gc::gc_round(&client, range(), lock_lease.id(), &mut memory)
        .await
        .unwrap();
    assert_eq!(
        (first.alive, first.candidates, first.deleted),
        (4, 3, 0),
        "{first:?}"
    );
    assert_eq!(
        masters(&client).await.len(),
        5,
        "nothing goes in the first round"
    );

    // Reused between the rounds (written again): its mod revision changed.
    put(reused, "reused").await;
    let second = identity_gc::gc_round(&client, range(), lock_lease.id(), &mut memory)
        .await
        .unwrap();
    assert_eq!(second.deleted, 2, "{second:?}");
    let left: BTreeSet<u32> = masters(&client).await.into_keys().collect();
    assert_eq!(left, BTreeSet::from([used, reused, 131100]));

    let third = identity_gc::gc_round(&client, range(), lock_lease.id(), &mut memory)
        .await
        .unwrap();
    assert_eq!(third.deleted, 1, "{third:?}");
    let left: BTreeSet<u32> = masters(&client).await.into_keys().collect();
    assert_eq!(left, BTreeSet::from([used, 131100]));
    // No lock keys are left behind.
    assert!(
        client
            .list_prefix("cilium/state/identities/v1/locks/")
            .await
            .unwrap()
            .is_empty()
    );
}

/// One elected GC per cluster: a second candidate waits; when the leader is gone (its lease
/// expires), it takes over and collects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_runs_on_the_elected_instance_and_fails_over() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let gc = |name: &str| {
        strait::task::AbortOnDrop(tokio::spawn(identity_gc::run(
            client.clone(),
            "cluster-usa".into(),
            name.into(),
            range(),
            Duration::from_millis(200),
            Duration::from_secs(2),
        )))
    };
    let leader = || async {
        let mut election = client.raw().election_client();
        election
            .leader(identity_gc::election_name("cluster-usa"))
            .await
            .ok()
            .and_then(|r| {
                r.kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            })
    };
    let first = gc("first");
    eventually("first elected", || async {
        leader().await.as_deref() == Some("first")
    })
    .await;
    let _second = gc("second");
    client
        .put(&format!("{MASTERS}65600"), stored("gone"), None)
        .await
        .unwrap();
    eventually("the leader collects", || async {
        masters(&client).await.is_empty()
    })
    .await;
    assert_eq!(
        leader().await.as_deref(),
        Some("first"),
        "the second candidate waits"
    );

    drop(first);
    eventually("second elected", || async {
        leader().await.as_deref() == Some("second")
    })
    .await;
    client
        .put(&format!("{MASTERS}65601"), stored("gone2"), None)
        .await
        .unwrap();
    eventually("the new leader collects", || async {
        masters(&client).await.is_empty()
    })
    .await;
}
