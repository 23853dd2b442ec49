//! What an agent writes to its own cluster's etcd, against a real etcd: identities with
//! Cilium's kvstore allocator semantics, and endpoints (ip/v1) that remote clusters accept.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use strait::{
    identity::{IdentityRange, LabelArray, MaxConnectedClusters},
    k8s::labels::pod_identity_labels,
    kvstore::EtcdClient,
    publish::{
        allocator::{AllocatorError, IdentityAllocator},
        publisher::{EndpointPublisher, LocalEndpoint, LocalNode},
    },
    wire::{RemoteContext, validate},
};
use strait_tests::etcd::EtcdServer;

const TTL: Duration = Duration::from_secs(60);

fn range() -> IdentityRange {
    IdentityRange::for_cluster(1, MaxConnectedClusters::Max255)
}

fn labels(app: &str) -> LabelArray {
    LabelArray::parse_sorted_list(&format!(
        "k8s:app={app};k8s:io.kubernetes.pod.namespace=default;"
    ))
    .unwrap()
}

async fn get(client: &EtcdClient, key: &str) -> Option<String> {
    client
        .get(key)
        .await
        .unwrap()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

/// Two nodes starting pods with the same labels at the same moment (two replicas of one
/// Deployment) must get one identity, not one each: found by the end-to-end test, where
/// europe's two payment-api pods got 131073 and 131074.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_of_the_same_labels_settle_on_one_identity() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let mut nodes = Vec::new();
    for node in ["usa-1", "usa-2", "usa-3"] {
        nodes.push(std::sync::Arc::new(
            IdentityAllocator::new(client.clone(), "cluster-usa", range(), node, TTL)
                .await
                .unwrap(),
        ));
    }
    for round in 0..20 {
        let app = format!("app-{round}");
        let tasks: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (n, l) = (n.clone(), labels(&app));
                tokio::spawn(async move { n.allocate(&l).await.unwrap() })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "round {round}: one label set, several identities {ids:?}"
        );
        // Exactly one master key holds these labels, and every node references it.
        let sorted = labels(&app).to_sorted_list().replace(
            "k8s:io.kubernetes",
            "k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.kubernetes",
        );
        let masters = client
            .list_prefix("cilium/state/identities/v1/id/")
            .await
            .unwrap()
            .into_iter()
            .filter(|kv| kv.value == sorted.as_bytes())
            .count();
        assert_eq!(masters, 1, "round {round}: master keys for {sorted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_allocated_in_range_shared_across_nodes_and_released() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let usa1 = IdentityAllocator::new(client.clone(), "cluster-usa", range(), "usa-1", TTL)
        .await
        .unwrap();
    let usa2 = IdentityAllocator::new(client.clone(), "cluster-usa", range(), "usa-2", TTL)
        .await
        .unwrap();

    let frontend = usa1.allocate(&labels("frontend")).await.unwrap();
    assert!(range().contains(frontend), "{frontend} outside {}", range());
    let sorted = "k8s:app=frontend;k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.kubernetes.pod.namespace=default;";
    let master = format!("cilium/state/identities/v1/id/{frontend}");
    assert_eq!(
        get(&client, &master).await.as_deref(),
        Some(sorted),
        "master key holds the sorted labels with the cluster label"
    );
    let reference = format!("cilium/state/identities/v1/value/{sorted}/usa-1");
    assert_eq!(get(&client, &reference).await, Some(frontend.to_string()));
    assert_ne!(
        client.get(&reference).await.unwrap().unwrap().lease,
        0,
        "references live on the node's lease"
    );
    assert_eq!(
        client.get(&master).await.unwrap().unwrap().lease,
        0,
        "master keys outlive any one agent"
    );

    // The same labels on another node reuse the identity; other labels get another one.
    assert_eq!(usa2.allocate(&labels("frontend")).await.unwrap(), frontend);
    let database = usa2.allocate(&labels("database")).await.unwrap();
    assert_ne!(database, frontend);
    assert!(range().contains(database));

    // What we wrote is what a remote Cilium agent accepts for cluster-usa.
    let ctx = RemoteContext::new("cluster-usa", 1, MaxConnectedClusters::Max255);
    let decoded =
        validate::decode_remote_identity(&ctx, &frontend.to_string(), sorted.as_bytes()).unwrap();
    assert_eq!(decoded.labels.cluster_name(), Some("cluster-usa"));

    // Labels naming another cluster are refused.
    let foreign =
        LabelArray::parse_sorted_list("k8s:app=x;k8s:io.cilium.k8s.policy.cluster=cluster-europe;")
            .unwrap();
    assert!(matches!(
        usa1.allocate(&foreign).await,
        Err(AllocatorError::ForeignCluster { .. })
    ));

    // Release drops this node's reference only; master keys are left to the identity GC.
    usa1.release(&labels("frontend")).await.unwrap();
    assert!(get(&client, &reference).await.is_none());
    assert!(get(&client, &master).await.is_some(), "usa-2 still uses it");
    usa2.release(&labels("frontend")).await.unwrap();
    assert!(
        client
            .list_prefix(&format!("cilium/state/identities/v1/value/{sorted}/"))
            .await
            .unwrap()
            .is_empty(),
        "no references left"
    );
    assert!(
        get(&client, &master).await.is_some(),
        "agents never delete masters"
    );
}

/// A pod labelled with Cilium's own keys (another cluster, another service account) gets an
/// identity carrying this cluster's values instead: it is allocated (a foreign cluster label
/// used to be refused on every retry, leaving the pod without policy) and remote clusters
/// accept it as cluster-usa's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_claiming_ciliums_labels_gets_an_identity_of_this_cluster() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let usa1 = IdentityAllocator::new(client.clone(), "cluster-usa", range(), "usa-1", TTL)
        .await
        .unwrap();
    let pod: Pod = serde_yaml_ng::from_str(
        "metadata:\n  name: evil\n  namespace: default\n  labels:\n    app: evil\n    \
         io.cilium.k8s.policy.cluster: cluster-europe\n    \
         io.cilium.k8s.policy.serviceaccount: admin\n\
         spec: {serviceAccountName: default, containers: []}",
    )
    .unwrap();
    let id = usa1
        .allocate(&pod_identity_labels(&pod, &BTreeMap::new(), "cluster-usa"))
        .await
        .unwrap();
    assert!(range().contains(id));
    let sorted = "k8s:app=evil;k8s:io.cilium.k8s.policy.cluster=cluster-usa;\
                  k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=default;";
    let master = format!("cilium/state/identities/v1/id/{id}");
    assert_eq!(get(&client, &master).await.as_deref(), Some(sorted));
    let ctx = RemoteContext::new("cluster-usa", 1, MaxConnectedClusters::Max255);
    assert!(validate::decode_remote_identity(&ctx, &id.to_string(), sorted.as_bytes()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_published_as_remote_clusters_expect_and_survive_lease_loss() {
    let etcd = EtcdServer::new();
    let client = EtcdClient::connect(&etcd.config()).await.unwrap();
    let node = LocalNode {
        cluster: "cluster-usa".into(),
        cluster_id: 1,
        name: "usa-1".into(),
        internal_ip: "198.18.1.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        wireguard_pubkey: Some("kkmwQ0G5ZrUAnvVHqW8pWQbJ1YLQzH2T3Xk7f9L0yxU=".into()),
    };
    let publisher = std::sync::Arc::new(
        EndpointPublisher::new(client.clone(), node, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let keeper = tokio::spawn({
        let p = publisher.clone();
        async move { p.keep_published().await }
    });
    let ep = LocalEndpoint {
        ip: "10.1.0.5".parse().unwrap(),
        identity: 65537,
        namespace: "default".into(),
        pod: "frontend-1".into(),
        endpoint_id: 7,
    };
    publisher.publish(&ep).await.unwrap();
    let key = "cilium/state/ip/v1/default/10.1.0.5";
    let value = get(&client, key).await.expect("endpoint published");
    assert_eq!(
        value,
        r#"{"IP":"10.1.0.5","Mask":null,"HostIP":"198.18.1.1","ID":65537,"Key":255,"Metadata":"cilium-global:cluster-usa:usa-1:7","K8sNamespace":"default","K8sPodName":"frontend-1"}"#
    );
    let ctx = RemoteContext::new("cluster-usa", 1, MaxConnectedClusters::Max255);
    let pair = validate::decode_remote_ipcache(&ctx, "10.1.0.5", value.as_bytes())
        .expect("remote clusters accept it");
    assert_eq!(pair.host_ip, Some("198.18.1.1".parse().unwrap()));

    // The lease is revoked behind our back (etcd deletes the key): published again.
    let lease = client.get(key).await.unwrap().unwrap().lease;
    client.revoke_lease(lease).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(kv) = client.get(key).await.unwrap()
            && kv.lease != lease
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoint not published again after lease loss"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    publisher.withdraw(ep.ip).await.unwrap();
    assert!(get(&client, key).await.is_none());
    keeper.abort();
}
