//! The Kubernetes objects each cluster's agents and kvstoremesh read from their manifests
//! directory: the namespace, pods, the two global services with their EndpointSlices, and the
//! user's policy.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::{
    layout::{
        CLUSTERS, ClusterDef, EUROPE, LEDGER_PORT, PAYMENT_PORT, PODS, USA, cluster, pod_cluster,
        short,
    },
    mesh::Mesh,
};

impl Mesh {
    pub(super) fn manifests(&self) -> anyhow::Result<()> {
        self.progress("manifests: Namespace, Pods, payment-api + ledger (global), the policy");
        for c in &CLUSTERS {
            let dir = self.cluster_dir(c.name).join("manifests");
            std::fs::write(
                dir.join("namespace.yaml"),
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {kubernetes.io/metadata.name: default}\n",
            )?;
            let mut pods = String::new();
            for p in PODS.iter().filter(|p| pod_cluster(p) == c.name) {
                let _ = write!(
                    pods,
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  labels: {{app: {}}}\n\
                     spec:\n  nodeName: {}\n  containers: [{{name: main, image: example/{}}}]\nstatus:\n  podIP: {}\n",
                    p.name, p.app, p.node, p.app, p.ip
                );
            }
            std::fs::write(dir.join("pods.yaml"), pods)?;
            std::fs::write(
                dir.join("payment-api.yaml"),
                service_yaml(c, "payment-api", "local", self.backends(c.name)),
            )?;
            std::fs::write(
                dir.join("ledger.yaml"),
                service_yaml(c, "ledger", "none", self.backends(c.name)),
            )?;
        }
        std::fs::write(
            self.cluster_dir(EUROPE)
                .join("manifests")
                .join("cross-cluster-db-access.yaml"),
            POLICY,
        )?;
        self.connect(USA, EUROPE, cluster(EUROPE).cp_link)?;
        self.connect(EUROPE, USA, cluster(USA).cp_link)?;
        Ok(())
    }

    pub(super) fn backends(&self, cluster: &str) -> Vec<Ipv4Addr> {
        PODS.iter()
            .filter(|p| p.app == "payment-api" && pod_cluster(p) == cluster)
            .map(|p| p.ip)
            .collect()
    }

    pub(super) fn set_payment_backends(
        &self,
        cluster: &str,
        backends: Vec<Ipv4Addr>,
    ) -> anyhow::Result<()> {
        let path = self
            .cluster_dir(cluster)
            .join("manifests")
            .join("payment-api.yaml");
        // Written whole and renamed: the agent never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            service_yaml(self::cluster(cluster), "payment-api", "local", backends),
        )?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

fn service_yaml(c: &ClusterDef, name: &str, affinity: &str, backends: Vec<Ipv4Addr>) -> String {
    let (vip, port) = match name {
        "payment-api" => (c.payment_vip, PAYMENT_PORT),
        _ => (c.ledger_vip, LEDGER_PORT),
    };
    let endpoints = if backends.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        let mut s = String::from("endpoints:\n");
        for b in backends {
            let _ = writeln!(s, "- addresses: [{b}]\n  conditions: {{ready: true}}");
        }
        s
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    \
         service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: \"{affinity}\"\nspec:\n  type: ClusterIP\n  \
         clusterIP: {vip}\n  selector: {{app: payment-api}}\n  ports:\n  - port: {port}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{cluster}\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: {port}, protocol: TCP}}]\n{endpoints}",
        cluster = short(c.name)
    )
}

/// The user's policy, verbatim.
const POLICY: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: cross-cluster-db-access
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: database
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
        io.cilium.k8s.policy.cluster: cluster-usa
"#;
