//! Identity labels of a pod, derived as Cilium does, so the same pod gets the same identity
//! (and matches the same policies) under strait and Cilium:
//! - the pod's labels, source `k8s`, filtered by Cilium's default label filter;
//! - the namespace's labels as `io.cilium.k8s.namespace.labels.<key>`;
//! - `io.kubernetes.pod.namespace`, `io.cilium.k8s.policy.serviceaccount`,
//!   `io.cilium.k8s.policy.cluster`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::identity::labels::{
    LABEL_SOURCE_K8S, Label, LabelArray, POD_NAMESPACE_LABEL, POLICY_LABEL_CLUSTER,
    POLICY_LABEL_SERVICE_ACCOUNT,
};

pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Cilium's default filter drops labels that change per pod instance or carry no workload
/// meaning (they would explode the number of identities): anything in the `kubernetes.io`,
/// `k8s.io` and `io.kubernetes` domains, `*.beta.kubernetes.io`, `pod-template-hash`,
/// `pod-template-generation`, `controller-revision-hash`, `controller-uid`, `job-name`,
/// `annotation.*` and `etcd_node`. `app.kubernetes.io/*` labels are workload labels and kept.
pub fn keep_pod_label(key: &str) -> bool {
    const DROP_EXACT: [&str; 6] = [
        "pod-template-hash",
        "pod-template-generation",
        "controller-revision-hash",
        "controller-uid",
        "job-name",
        "etcd_node",
    ];
    if key.starts_with("app.kubernetes.io/") {
        return true;
    }
    let domain = key.split_once('/').map(|(d, _)| d).unwrap_or("");
    !(DROP_EXACT.contains(&key)
        || key.starts_with("annotation.")
        || key.starts_with("io.kubernetes")
        || domain == "kubernetes.io"
        || domain.ends_with(".kubernetes.io")
        || domain == "k8s.io"
        || domain.ends_with(".k8s.io"))
}

/// The identity labels of `pod` in namespace `ns_labels`, in cluster `cluster`.
pub fn pod_identity_labels(
    pod: &Pod,
    ns_labels: &BTreeMap<String, String>,
    cluster: &str,
) -> LabelArray {
    let mut labels = LabelArray::default();
    let k8s = |key: &str, value: &str| Label::new(LABEL_SOURCE_K8S, key, value);
    for (key, value) in pod.metadata.labels.iter().flatten() {
        if keep_pod_label(key) {
            labels.push(k8s(key, value));
        }
    }
    for (key, value) in ns_labels {
        labels.push(k8s(&format!("{NAMESPACE_LABELS_PREFIX}{key}"), value));
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    labels.push(k8s(POD_NAMESPACE_LABEL, namespace));
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    labels.push(k8s(POLICY_LABEL_SERVICE_ACCOUNT, sa));
    labels.push(k8s(POLICY_LABEL_CLUSTER, cluster));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_keeps_workload_labels_only() {
        for keep in ["app", "tier", "app.kubernetes.io/name", "example.com/team"] {
            assert!(keep_pod_label(keep), "{keep}");
        }
        for drop in [
            "pod-template-hash",
            "controller-revision-hash",
            "statefulset.kubernetes.io/pod-name",
            "batch.kubernetes.io/job-name",
            "kubernetes.io/hostname",
            "io.kubernetes.pod.namespace",
            "failure-domain.beta.kubernetes.io/zone",
            "annotation.foo",
        ] {
            assert!(!keep_pod_label(drop), "{drop}");
        }
    }

    #[test]
    fn pod_labels_match_ciliums_sorted_list() {
        let pod: Pod = serde_yaml_ng::from_str(
            "metadata: {name: fe-1, namespace: shop, labels: {app: frontend, pod-template-hash: abc}}\n\
             spec: {serviceAccountName: fe, containers: []}",
        )
        .unwrap();
        let ns = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "shop".to_owned())]);
        assert_eq!(
            pod_identity_labels(&pod, &ns, "cluster-usa").to_sorted_list(),
            "k8s:app=frontend;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;\
             k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.cilium.k8s.policy.serviceaccount=fe;\
             k8s:io.kubernetes.pod.namespace=shop;"
        );
    }
}
