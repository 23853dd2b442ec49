//! Identity labels of a pod, derived as Cilium does (`GetPodMetadata` → `SanitizePodLabels`
//! → source `k8s` → label filter), so the same pod gets the same identity, and matches the
//! same policies, under strait and Cilium:
//! 1. the pod's own labels whose key starts with `io.cilium.k8s` are dropped: those are
//!    Cilium's to set, and a pod must not claim another service account, namespace labels
//!    or cluster;
//! 2. then, replacing whatever the pod said: the namespace's labels as
//!    `io.cilium.k8s.namespace.labels.<key>`, `io.kubernetes.pod.namespace`,
//!    `io.cilium.k8s.policy.serviceaccount` (absent when the pod names none) and
//!    `io.cilium.k8s.policy.cluster`;
//! 3. all with source `k8s`, kept when Cilium's default label filter keeps them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::identity::filter::is_identity_label;
use crate::identity::labels::{
    CILIUM_OWNED_PREFIX, LABEL_SOURCE_K8S, Label, LabelArray, NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL, POLICY_LABEL_CLUSTER, POLICY_LABEL_SERVICE_ACCOUNT,
};

/// The identity labels of `pod` in a namespace labelled `ns_labels`, in cluster `cluster`.
pub fn pod_identity_labels(
    pod: &Pod,
    ns_labels: &BTreeMap<String, String>,
    cluster: &str,
) -> LabelArray {
    let mut labels: BTreeMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(key, _)| !key.starts_with(CILIUM_OWNED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in ns_labels {
        labels.insert(format!("{NAMESPACE_LABELS_PREFIX}{key}"), value.clone());
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    labels.insert(POD_NAMESPACE_LABEL.into(), namespace.into());
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_ref());
    if let Some(sa) = service_account.filter(|sa| !sa.is_empty()) {
        labels.insert(POLICY_LABEL_SERVICE_ACCOUNT.into(), sa.clone());
    }
    labels.insert(POLICY_LABEL_CLUSTER.into(), cluster.into());
    labels
        .into_iter()
        .map(|(key, value)| Label::new(LABEL_SOURCE_K8S, key, value))
        .filter(is_identity_label)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LabelSelector, Selector};

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn shop_ns() -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "shop".to_owned())])
    }

    #[test]
    fn pod_labels_match_ciliums_sorted_list() {
        let pod = pod(
            "metadata: {name: fe-1, namespace: shop, labels: {app: frontend, pod-template-hash: abc}}\n\
             spec: {serviceAccountName: fe, containers: []}",
        );
        assert_eq!(
            pod_identity_labels(&pod, &shop_ns(), "cluster-usa").to_sorted_list(),
            "k8s:app=frontend;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;\
             k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.cilium.k8s.policy.serviceaccount=fe;\
             k8s:io.kubernetes.pod.namespace=shop;"
        );
    }

    #[test]
    fn a_pod_cannot_claim_ciliums_labels() {
        // Another service account, another namespace's labels, another cluster, another
        // namespace, and keys merely starting with the prefix: all replaced or dropped.
        let pod = pod(r#"
metadata:
  name: evil
  namespace: shop
  labels:
    app: evil
    io.cilium.k8s.policy.serviceaccount: admin
    io.cilium.k8s.namespace.labels.team: platform
    io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: kube-system
    io.cilium.k8s.policy.cluster: cluster-europe
    io.kubernetes.pod.namespace: kube-system
    io.cilium.k8sfoo: x
spec: {serviceAccountName: default, containers: []}
"#);
        assert_eq!(
            pod_identity_labels(&pod, &shop_ns(), "cluster-usa").to_sorted_list(),
            "k8s:app=evil;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;\
             k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.cilium.k8s.policy.serviceaccount=default;\
             k8s:io.kubernetes.pod.namespace=shop;"
        );
        // So selectors for what the pod claimed do not select it.
        let labels = pod_identity_labels(&pod, &shop_ns(), "cluster-usa");
        for claimed in [
            "io.cilium.k8s.policy.serviceaccount: admin",
            "io.cilium.k8s.namespace.labels.team: platform",
            "k8s:io.cilium.k8s.policy.cluster: cluster-europe",
        ] {
            let selector: LabelSelector =
                serde_yaml_ng::from_str(&format!("matchLabels: {{{claimed}}}")).unwrap();
            assert!(!Selector::new(&selector).matches(&labels), "{claimed}");
        }
    }

    #[test]
    fn no_service_account_label_without_a_service_account() {
        // Cilium removes the key (even one the pod set) when spec.serviceAccountName is empty.
        for spec in [
            "{containers: []}",
            "{serviceAccountName: '', containers: []}",
        ] {
            let pod = pod(&format!(
                "metadata: {{name: a, labels: {{io.cilium.k8s.policy.serviceaccount: admin}}}}\n\
                 spec: {spec}"
            ));
            let labels = pod_identity_labels(&pod, &BTreeMap::new(), "c1");
            assert_eq!(
                labels.to_sorted_list(),
                "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;",
                "{spec}"
            );
        }
    }

    #[test]
    fn the_label_filter_applies_to_pod_and_namespace_labels() {
        let pod = pod(r#"
metadata:
  name: worker-0
  namespace: batch
  labels:
    job-name: nightly
    batch.kubernetes.io/job-name: nightly
    batch.kubernetes.io/job-completion-index: "0"
    batch.kubernetes.io/controller-uid: "1234"
    controller-uid: "1234"
    statefulset.kubernetes.io/pod-name: worker-0
    team.k8s.io/owner: data
spec: {containers: []}
"#);
        // Namespace labels keep their names after the prefix: the filter sees the full key.
        let ns = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "batch".to_owned())]);
        assert_eq!(
            pod_identity_labels(&pod, &ns, "c1").to_sorted_list(),
            "k8s:batch.kubernetes.io/job-name=nightly;\
             k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=batch;\
             k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=batch;\
             k8s:job-name=nightly;k8s:team.k8s.io/owner=data;"
        );
    }
}
