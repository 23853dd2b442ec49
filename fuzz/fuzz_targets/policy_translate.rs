//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy documents (YAML or JSON stream) and
//! their translation to per-endpoint policy entries, for every endpoint of a small universe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::identity::labels::LabelArray;
use strait::policy::{self, Direction, PROTO_ANY};

const LOCAL: &str = "cluster-europe";

fn universe() -> Vec<(u32, LabelArray)> {
    let pod = |app: &str, cluster: &str, ns: &str| {
        LabelArray::parse_sorted_list(&format!(
            "k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};\
             k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace={ns};"
        ))
        .expect("valid labels")
    };
    vec![
        (70001, pod("frontend", "cluster-usa", "default")),
        (1001, pod("frontend", LOCAL, "default")),
        (1002, pod("database", LOCAL, "default")),
        (1003, pod("web", LOCAL, "shop")),
        (1004, pod("kube-dns", LOCAL, "kube-system")),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = policy::parse_documents(text);
    for p in &parsed.policies {
        let _ = (p.display_name(), p.scope_namespace(), p.validate());
    }
    let universe = universe();
    for (_, endpoint) in &universe {
        let out = policy::translate(&parsed.policies, endpoint, &universe, LOCAL);
        for e in &out.entries {
            // The map's key cannot hold a port under a wildcard protocol.
            assert!(e.protocol != PROTO_ANY || e.port == 0, "{e:?}");
            // Peers are known identities, reserved ones or the wildcard.
            assert!(
                e.identity < 256 || universe.iter().any(|(id, _)| *id == e.identity),
                "{e:?}"
            );
        }
        let _ = out.allows(Direction::Ingress, 70001, 6, 80);
        let _ = out.allows(Direction::Egress, 2, 17, 53);
    }
});
