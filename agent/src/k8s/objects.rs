//! Typed Kubernetes objects of the local cluster, whichever source read them (a manifests
//! directory or the API server), and what is derived from them with the same functions for
//! every source: the local cluster's services in the state model, this node's pod CIDRs.
//! A bad document is logged and skipped, never fatal for the others.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    serde::Deserialize as _,
};

use super::services;
use crate::{
    policy::CiliumPolicy,
    state::{ServiceName, StateHandle},
};

/// Everything read from one pass over the source.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    /// CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies that passed validation.
    pub policies: Vec<CiliumPolicy>,
    /// Documents that could not be used: (origin, reason).
    pub skipped: Vec<(String, String)>,
}

impl Objects {
    /// Adds every document of a YAML stream; `origin` names it in reports (file name).
    pub fn add_yaml(&mut self, origin: &str, text: &str) {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    self.skipped
                        .push((format!("{origin} document {}", i + 1), e.to_string()));
                    // A syntax error ends the stream: later documents cannot be located.
                    break;
                }
            };
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let at = format!("{origin} document {} ({kind})", i + 1);
            if let Err(reason) = self.add_value(&kind, value) {
                self.skipped.push((at, reason));
            }
        }
    }

    /// Adds one object of `kind`; other kinds are ignored.
    pub fn add_value(&mut self, kind: &str, value: serde_yaml_ng::Value) -> Result<(), String> {
        let e = |e: serde_yaml_ng::Error| e.to_string();
        match kind {
            "Service" => self
                .services
                .push(serde_yaml_ng::from_value(value).map_err(e)?),
            "EndpointSlice" => self
                .endpoint_slices
                .push(serde_yaml_ng::from_value(value).map_err(e)?),
            "Pod" => {
                let mut pod: Pod = serde_yaml_ng::from_value(value).map_err(e)?;
                // The API server's ServiceAccount admission names `default` when the pod
                // names none; manifests skip admission, so do it here (the pod's identity
                // carries the service account).
                if let Some(spec) = pod.spec.as_mut()
                    && spec
                        .service_account_name
                        .as_deref()
                        .is_none_or(str::is_empty)
                {
                    spec.service_account_name = Some("default".into());
                }
                self.pods.push(pod);
            }
            "Namespace" => self
                .namespaces
                .push(serde_yaml_ng::from_value(value).map_err(e)?),
            "Node" => self
                .nodes
                .push(serde_yaml_ng::from_value(value).map_err(e)?),
            "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
                self.policies.push(CiliumPolicy::from_value(value)?)
            }
            _ => {}
        }
        Ok(())
    }

    /// The pod CIDRs Kubernetes allocated to node `name` (`spec.podCIDRs`, else `podCIDR`).
    pub fn node_pod_cidrs(&self, name: &str) -> Vec<IpNet> {
        let Some(spec) = self
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.spec.as_ref())
        else {
            return Vec::new();
        };
        spec.pod_cidrs
            .iter()
            .flatten()
            .chain(spec.pod_cidr.iter())
            .filter_map(|c| c.parse::<IpNet>().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Makes the local cluster's services in `state` those defined here; returns what is
    /// applied, to pass as `previous` next time (what vanished is deleted).
    pub fn apply_services(
        &self,
        state: &StateHandle,
        cluster_id: u32,
        previous: &BTreeSet<ServiceName>,
    ) -> BTreeSet<ServiceName> {
        state.update(|m| {
            let cluster = m.local_cluster().clone();
            let mut now = BTreeSet::new();
            for svc in &self.services {
                let slices = services::slices_of(svc, &self.endpoint_slices);
                if let Some(cs) =
                    services::cluster_service(svc, &slices, cluster.clone(), cluster_id)
                {
                    now.insert(cs.name.clone());
                    m.upsert_service(cs);
                }
            }
            for gone in previous.difference(&now) {
                m.delete_service(&cluster, gone);
            }
            now
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_and_policies_are_read_and_bad_ones_reported() {
        let mut o = Objects::default();
        o.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: usa-1}\n\
             spec: {podCIDR: 10.1.0.0/24, podCIDRs: [10.1.0.0/24, 'fd00:1::/64']}\n---\n\
             apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
             spec: {endpointSelector: {matchLabels: {app: database}}}\n---\n\
             apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: q}\n\
             spec: {}\n",
        );
        assert_eq!(o.policies.len(), 1);
        assert_eq!(o.skipped.len(), 1, "{:?}", o.skipped);
        assert!(
            o.skipped[0].1.contains("endpointSelector"),
            "{:?}",
            o.skipped
        );
        assert_eq!(
            o.node_pod_cidrs("usa-1")
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.1.0.0/24", "fd00:1::/64"]
        );
        assert!(o.node_pod_cidrs("usa-2").is_empty());
    }

    #[test]
    fn manifest_pods_get_the_default_service_account_as_admission_gives_it() {
        let mut o = Objects::default();
        o.add_yaml(
            "test",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {serviceAccountName: pay, containers: []}\n",
        );
        let sa: Vec<_> = o
            .pods
            .iter()
            .map(|p| {
                p.spec
                    .as_ref()
                    .unwrap()
                    .service_account_name
                    .clone()
                    .unwrap()
            })
            .collect();
        assert_eq!(sa, ["default", "pay"]);
    }
}
