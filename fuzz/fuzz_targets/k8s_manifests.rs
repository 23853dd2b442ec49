//! Kubernetes manifests (a YAML stream, as the manifests directory or the API server gives
//! them): Services, EndpointSlices, Pods, Namespaces, Nodes, Cilium policies, and what the
//! agent derives from them: the local cluster's services, node pod CIDRs, pod identities.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use strait::identity::labels::{LABEL_SOURCE_K8S, POD_NAMESPACE_LABEL};
use strait::k8s::{Objects, labels::pod_identity_labels};
use strait::state::StateHandle;

const CLUSTER: &str = "cluster-usa";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = Objects::default();
    objects.add_yaml("fuzz.yaml", text);

    let state = StateHandle::new(CLUSTER, 1);
    let applied = objects.apply_services(&state, 1, &BTreeSet::new());
    let _ = state.read().service_views();
    // Everything applied goes away with the manifests.
    assert!(
        Objects::default()
            .apply_services(&state, 1, &applied)
            .is_empty()
    );
    assert_eq!(state.read().local_services().count(), 0);

    for node in &objects.nodes {
        let _ = objects.node_pod_cidrs(node.metadata.name.as_deref().unwrap_or_default());
    }
    for pod in &objects.pods {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let ns_labels: BTreeMap<String, String> = objects
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(namespace))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        let labels = pod_identity_labels(pod, &ns_labels, CLUSTER);
        // Whatever the pod says about itself: our cluster, its own namespace.
        assert_eq!(labels.cluster_name(), Some(CLUSTER), "{labels:?}");
        assert!(
            labels.contains(LABEL_SOURCE_K8S, POD_NAMESPACE_LABEL, namespace),
            "{labels:?}"
        );
        let _ = labels.to_sorted_list();
    }
});
