//! Translation tests with real-world manifests.

use std::collections::BTreeSet;

use super::*;
use crate::identity::labels::{LabelArray, POD_NAMESPACE_LABEL, POLICY_LABEL_CLUSTER};

const FRONTEND_USA: u32 = 70001;
const FRONTEND_EUROPE: u32 = 1001;
const BACKEND_USA: u32 = 70002;
const FRONTEND_USA_OTHER_NS: u32 = 70003;
const DATABASE_EUROPE: u32 = 1002;
const WEB_EUROPE: u32 = 1003;
const DNS_EUROPE: u32 = 1004;

fn labels(list: &str) -> LabelArray {
    LabelArray::parse_sorted_list(list).unwrap()
}

fn pod(app: &str, cluster: &str, ns: &str) -> LabelArray {
    labels(&format!(
        "k8s:app={app};k8s:{POD_NAMESPACE_LABEL}={ns};k8s:{POLICY_LABEL_CLUSTER}={cluster};"
    ))
}

fn universe() -> Vec<(u32, LabelArray)> {
    vec![
        (FRONTEND_USA, pod("frontend", "cluster-usa", "default")),
        (
            FRONTEND_EUROPE,
            pod("frontend", "cluster-europe", "default"),
        ),
        (BACKEND_USA, pod("backend", "cluster-usa", "default")),
        (
            FRONTEND_USA_OTHER_NS,
            pod("frontend", "cluster-usa", "shop"),
        ),
        (
            DATABASE_EUROPE,
            pod("database", "cluster-europe", "default"),
        ),
        (WEB_EUROPE, pod("web", "cluster-europe", "default")),
        (DNS_EUROPE, pod("kube-dns", "cluster-europe", "kube-system")),
    ]
}

fn database() -> LabelArray {
    pod("database", "cluster-europe", "default")
}

fn policies(yaml: &str) -> Vec<CiliumPolicy> {
    let parsed = parse_documents(yaml);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    parsed.policies
}

fn run(yaml: &str, endpoint: &LabelArray) -> EndpointPolicy {
    translate(&policies(yaml), endpoint, &universe(), "cluster-europe")
}

fn entry(identity: u32, direction: Direction, protocol: u8, port: u16, deny: bool) -> PolicyEntry {
    PolicyEntry {
        identity,
        direction,
        protocol,
        port,
        deny,
    }
}

fn allow_in(identity: u32) -> PolicyEntry {
    entry(identity, Direction::Ingress, PROTO_ANY, 0, false)
}

fn ids(p: &EndpointPolicy, direction: Direction, deny: bool) -> BTreeSet<u32> {
    p.entries_for(direction)
        .filter(|e| e.deny == deny)
        .map(|e| e.identity)
        .collect()
}

fn reported(p: &EndpointPolicy, needle: &str) -> bool {
    p.unsupported.iter().any(|u| u.rule.contains(needle))
}

const SCENARIO: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: cross-cluster-db-access
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

#[test]
fn scenario_cross_cluster_db_access() {
    let p = run(SCENARIO, &database());
    assert!(p.ingress_enforced);
    assert!(!p.egress_enforced);
    assert_eq!(p.entries, BTreeSet::from([allow_in(FRONTEND_USA)]));
    assert!(p.unsupported.is_empty());
    // The datapath verdicts that follow from it.
    assert!(p.allows(Direction::Ingress, FRONTEND_USA, PROTO_TCP, 5432));
    for other in [FRONTEND_EUROPE, BACKEND_USA, FRONTEND_USA_OTHER_NS, 2] {
        assert!(
            !p.allows(Direction::Ingress, other, PROTO_TCP, 5432),
            "{other}"
        );
    }
    assert!(p.allows(Direction::Egress, 2, PROTO_TCP, 443));

    // An endpoint the selector does not pick is left alone.
    let web = run(SCENARIO, &pod("web", "cluster-europe", "default"));
    assert_eq!(web, EndpointPolicy::default());
    // So is a database in another namespace (the policy lives in `default`).
    let other_ns = run(SCENARIO, &pod("database", "cluster-europe", "prod"));
    assert!(!other_ns.ingress_enforced && other_ns.entries.is_empty());
    assert_eq!(
        policies(SCENARIO)[0].display_name(),
        "default/cross-cluster-db-access"
    );
}

#[test]
fn ingress_deny_beats_allow() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.policy.cluster: cluster-europe, app: frontend}
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"#;
    let p = run(yaml, &database());
    assert!(p.ingress_enforced);
    assert!(p.entries.contains(&allow_in(FRONTEND_EUROPE)));
    assert!(p.entries.contains(&allow_in(FRONTEND_USA)));
    assert!(p.entries.contains(&entry(
        FRONTEND_EUROPE,
        Direction::Ingress,
        PROTO_TCP,
        5432,
        true
    )));
    assert_eq!(p.entries.len(), 3);
    assert!(!p.allows(Direction::Ingress, FRONTEND_EUROPE, PROTO_TCP, 5432));
    assert!(p.allows(Direction::Ingress, FRONTEND_EUROPE, PROTO_TCP, 80));
    assert!(p.allows(Direction::Ingress, FRONTEND_USA, PROTO_TCP, 5432));
}

#[test]
fn deny_only_policy_enforces_its_direction() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-world}
spec:
  endpointSelector: {}
  egressDeny:
  - toEntities: [world]
"#;
    let p = run(yaml, &database());
    assert!(p.egress_enforced && !p.ingress_enforced);
    assert_eq!(ids(&p, Direction::Egress, true), BTreeSet::from([2, 9, 10]));
}

#[test]
fn match_expressions() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: exprs, namespace: default}
specs:
- endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: app, operator: In, values: [frontend, backend]}
      - {key: k8s:io.cilium.k8s.policy.cluster, operator: NotIn, values: [cluster-europe]}
- endpointSelector:
    matchExpressions:
    - {key: app, operator: Exists}
    - {key: tier, operator: DoesNotExist}
  egress:
  - toEndpoints:
    - matchExpressions:
      - {key: app, operator: NotIn, values: [frontend, database]}
"#;
    let p = run(yaml, &database());
    assert_eq!(
        ids(&p, Direction::Ingress, false),
        BTreeSet::from([FRONTEND_USA, BACKEND_USA])
    );
    // NotIn, defaulted to the policy namespace (kube-dns lives in kube-system).
    assert_eq!(
        ids(&p, Direction::Egress, false),
        BTreeSet::from([WEB_EUROPE, BACKEND_USA])
    );
    assert!(p.ingress_enforced && p.egress_enforced);

    // DoesNotExist: an endpoint with a `tier` label is not selected by the second rule.
    let tiered = labels(&format!(
        "k8s:app=web;k8s:tier=front;k8s:{POD_NAMESPACE_LABEL}=default;"
    ));
    let p = run(yaml, &tiered);
    assert!(!p.egress_enforced && !p.ingress_enforced);
    // Exists: an endpoint without `app` is not selected either.
    let bare = labels(&format!("k8s:{POD_NAMESPACE_LABEL}=default;"));
    assert_eq!(run(yaml, &bare), EndpointPolicy::default());
}

#[test]
fn label_sources_in_selectors() {
    // `k8s:app` matches only k8s-sourced labels, `app` any source.
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: sources, namespace: default}
spec:
  endpointSelector: {matchLabels: {"k8s:app": database}}
  ingress:
  - fromEndpoints: [{matchLabels: {"container:app": frontend}}]
  - fromEndpoints: [{matchLabels: {"any:app": web}}]
"#;
    let p = run(yaml, &database());
    assert_eq!(
        ids(&p, Direction::Ingress, false),
        BTreeSet::from([WEB_EUROPE])
    );
    let not_k8s = labels(&format!(
        "container:app=database;k8s:{POD_NAMESPACE_LABEL}=default;"
    ));
    assert!(!run(yaml, &not_k8s).ingress_enforced);
}

#[test]
fn entities() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: entities, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEntities: [world, host, remote-node]
  - fromEntities: [kube-apiserver, health, init, unmanaged, ingress, none]
  egress:
  - toEntities: [cluster]
  - toEntities: [all]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;
    let p = run(yaml, &database());
    assert_eq!(
        ids(&p, Direction::Ingress, false),
        BTreeSet::from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    );
    let cluster: BTreeSet<u32> = [1, 3, 4, 5, 6, 7, 8]
        .into_iter()
        .chain([FRONTEND_EUROPE, DATABASE_EUROPE, WEB_EUROPE, DNS_EUROPE])
        .collect();
    let egress_all_ports: BTreeSet<u32> = p
        .entries_for(Direction::Egress)
        .filter(|e| e.protocol == PROTO_ANY)
        .map(|e| e.identity)
        .collect();
    assert_eq!(egress_all_ports, cluster);
    assert!(
        p.entries
            .contains(&entry(0, Direction::Egress, PROTO_UDP, 53, false))
    );
    assert!(p.allows(Direction::Egress, 2, PROTO_UDP, 53));
    assert!(!p.allows(Direction::Egress, 2, PROTO_TCP, 53));
    assert!(!p.allows(Direction::Egress, FRONTEND_USA, PROTO_TCP, 80));
    assert!(p.unsupported.is_empty());

    // A CIDR identity in the universe carries the world label and is world too.
    let mut u = universe();
    u.push((16_777_217, labels("cidr:10.0.0.0/8=;reserved:world=;")));
    let p = translate(&policies(yaml), &database(), &u, "cluster-europe");
    assert!(ids(&p, Direction::Ingress, false).contains(&16_777_217));
}

#[test]
fn to_ports_protocols() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ports, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports:
      - {port: "5432", protocol: TCP}
      - {port: "53", protocol: UDP}
      - {port: "8080", protocol: ANY}
      - {port: "9000"}
      - {port: "0", protocol: SCTP}
  - toPorts:
    - ports: [{port: 9090, protocol: tcp}]
"#;
    let p = run(yaml, &database());
    let expected: BTreeSet<PolicyEntry> = [
        (WEB_EUROPE, PROTO_TCP, 5432),
        (WEB_EUROPE, PROTO_UDP, 53),
        (WEB_EUROPE, PROTO_TCP, 8080),
        (WEB_EUROPE, PROTO_UDP, 8080),
        (WEB_EUROPE, PROTO_SCTP, 8080),
        (WEB_EUROPE, PROTO_TCP, 9000),
        (WEB_EUROPE, PROTO_UDP, 9000),
        (WEB_EUROPE, PROTO_SCTP, 9000),
        (WEB_EUROPE, PROTO_SCTP, 0),
        // A rule with ports and no peer field applies to every peer.
        (0, PROTO_TCP, 9090),
    ]
    .into_iter()
    .map(|(id, proto, port)| entry(id, Direction::Ingress, proto, port, false))
    .collect();
    assert_eq!(p.entries, expected);
    // Protocol 0 only ever goes with port 0.
    assert!(p.entries.iter().all(|e| e.protocol != 0 || e.port == 0));
}

#[test]
fn empty_rule_enforces_and_allows_nothing() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lockdown, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - {}
  egress:
  - toEndpoints: []
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;
    let p = run(yaml, &database());
    assert!(p.ingress_enforced && p.egress_enforced);
    assert!(p.entries.is_empty(), "{:?}", p.entries);
}

#[test]
fn empty_from_endpoints_selects_the_namespace() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-ns, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
"#;
    let p = run(yaml, &database());
    assert_eq!(
        ids(&p, Direction::Ingress, false),
        BTreeSet::from([
            FRONTEND_USA,
            FRONTEND_EUROPE,
            BACKEND_USA,
            DATABASE_EUROPE,
            WEB_EUROPE
        ])
    );
}

#[test]
fn namespace_defaulting_and_explicit_namespace() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  # Defaulted to the policy namespace: the `shop` frontend is not picked.
  - fromEndpoints: [{matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: cluster-usa}}]
    toPorts: [{ports: [{port: "1", protocol: TCP}]}]
  # Explicit namespace in matchLabels.
  - fromEndpoints: [{matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: shop}}]
    toPorts: [{ports: [{port: "2", protocol: TCP}]}]
  # Explicit namespace in matchExpressions: any namespace.
  - fromEndpoints:
    - matchLabels: {app: frontend}
      matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]
    toPorts: [{ports: [{port: "3", protocol: TCP}]}]
  # Selecting by namespace labels is not defaulted either.
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.team: dns}
    toPorts: [{ports: [{port: "4", protocol: TCP}]}]
"#;
    let mut u = universe();
    u.push((
        1005,
        labels(&format!(
            "k8s:app=coredns;k8s:io.cilium.k8s.namespace.labels.team=dns;k8s:{POD_NAMESPACE_LABEL}=dns;"
        )),
    ));
    let p = translate(&policies(yaml), &database(), &u, "cluster-europe");
    let on_port = |port: u16| -> BTreeSet<u32> {
        p.entries
            .iter()
            .filter(|e| e.port == port)
            .map(|e| e.identity)
            .collect()
    };
    assert_eq!(on_port(1), BTreeSet::from([FRONTEND_USA]));
    assert_eq!(on_port(2), BTreeSet::from([FRONTEND_USA_OTHER_NS]));
    assert_eq!(
        on_port(3),
        BTreeSet::from([FRONTEND_USA, FRONTEND_EUROPE, FRONTEND_USA_OTHER_NS])
    );
    assert_eq!(on_port(4), BTreeSet::from([1005]));

    // The endpoint selector of a namespaced policy cannot reach another namespace.
    let escape = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: escape, namespace: shop}
spec:
  endpointSelector:
    matchLabels: {app: database, io.kubernetes.pod.namespace: default}
  ingress: [{}]
"#;
    assert_eq!(run(escape, &database()), EndpointPolicy::default());
}

#[test]
fn clusterwide_policy() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: dns-from-all-pods}
spec:
  endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, app: kube-dns}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "53", protocol: ANY}]}]
  - fromEndpoints: [{matchLabels: {"reserved:host": ""}}]
"#;
    let dns = pod("kube-dns", "cluster-europe", "kube-system");
    let p = run(yaml, &dns);
    assert!(p.ingress_enforced);
    let port53: BTreeSet<u32> = p
        .entries
        .iter()
        .filter(|e| e.port == 53)
        .map(|e| e.identity)
        .collect();
    // Every pod of every namespace and cluster, but no reserved identity.
    let pods: BTreeSet<u32> = universe().into_iter().map(|(id, _)| id).collect();
    assert_eq!(port53, pods);
    assert!(p.entries.contains(&allow_in(1)));
    assert_eq!(policies(yaml)[0].display_name(), "dns-from-all-pods");
    // Not selected: a kube-dns lookalike outside kube-system.
    assert!(!run(yaml, &pod("kube-dns", "cluster-europe", "default")).ingress_enforced);
}

#[test]
fn l7_rule_is_dropped_and_reported() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public"}
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      rules: {}
"#;
    let p = run(yaml, &database());
    assert!(p.ingress_enforced);
    assert!(!p.allows(Direction::Ingress, WEB_EUROPE, PROTO_TCP, 80));
    assert!(
        ids(&p, Direction::Ingress, false)
            .iter()
            .all(|&id| id != WEB_EUROPE)
    );
    // Empty `rules` is plain L4.
    assert!(p.allows(Direction::Ingress, FRONTEND_EUROPE, PROTO_TCP, 443));
    assert_eq!(p.unsupported.len(), 1);
    assert_eq!(p.unsupported[0].policy, "default/l7");
    assert_eq!(
        p.unsupported[0].rule,
        "ingress[0]: L7 rules on port 80/TCP (rule dropped)"
    );
}

#[test]
fn fqdn_and_cidr_are_reported_and_never_widen() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: external, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toCIDR: [192.0.2.0/24]
    toEndpoints: [{matchLabels: {app: web}}]
  - toServices: [{k8sService: {serviceName: x, namespace: default}}]
  - toPorts: [{ports: [{port: http, protocol: TCP}]}]
  egressDeny:
  - toCIDRSet: [{cidr: 198.51.100.0/24}]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  ingress:
  - fromCIDR: [10.0.0.0/8]
  - fromRequires: [{matchLabels: {env: prod}}]
    fromEntities: [world]
"#;
    let p = run(yaml, &database());
    assert!(p.egress_enforced && p.ingress_enforced);
    // Only what is expressible: web via toEndpoints; nothing for FQDN/CIDR/service peers,
    // and the named-port-only rule allows nothing rather than everything.
    assert_eq!(
        p.entries_for(Direction::Egress)
            .filter(|e| !e.deny)
            .copied()
            .collect::<Vec<_>>(),
        vec![entry(WEB_EUROPE, Direction::Egress, PROTO_ANY, 0, false)]
    );
    // The CIDR deny widens to all of world on that port.
    assert_eq!(ids(&p, Direction::Egress, true), BTreeSet::from([2, 9, 10]));
    assert!(
        p.entries_for(Direction::Egress)
            .filter(|e| e.deny)
            .all(|e| e.port == 22)
    );
    // fromRequires drops every ingress allow.
    assert_eq!(p.entries_for(Direction::Ingress).count(), 0);
    for what in [
        "egress[0]: toFQDNs",
        "egress[1]: toCIDR",
        "egress[2]: toServices",
        "egress[3]: named port http/TCP",
        "egressDeny[0]: toCIDRSet (denied for all of world)",
        "ingress[0]: fromCIDR",
        "ingress[1]: fromRequires",
    ] {
        assert!(reported(&p, what), "{what} not in {:#?}", p.unsupported);
    }
}

#[test]
fn enable_default_deny_false_does_not_enforce() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: additive, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: database}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
"#;
    let p = run(yaml, &database());
    assert!(!p.ingress_enforced);
    assert!(p.entries.contains(&allow_in(WEB_EUROPE)));
    // Combined with the scenario policy, ingress is enforced again.
    let both = format!("{SCENARIO}\n---\n{yaml}");
    let p = run(&both, &database());
    assert!(p.ingress_enforced);
    assert_eq!(
        ids(&p, Direction::Ingress, false),
        BTreeSet::from([FRONTEND_USA, WEB_EUROPE])
    );
}

#[test]
fn multi_document_yaml_skips_other_kinds() {
    let yaml = format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: payment-api
  annotations:
    service.cilium.io/global: "true"
spec:
  selector: {{app: payment-api}}
  ports: [{{port: 8080}}]
---
{SCENARIO}
---
# an empty document
---
apiVersion: v1
kind: List
items:
- apiVersion: cilium.io/v2
  kind: CiliumClusterwideNetworkPolicy
  metadata: {{name: from-list}}
  spec: {{endpointSelector: {{}}, egress: [{{}}]}}
- apiVersion: v1
  kind: ConfigMap
  metadata: {{name: cm}}
"#
    );
    let parsed = parse_documents(&yaml);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let names: Vec<String> = parsed.policies.iter().map(|p| p.display_name()).collect();
    assert_eq!(names, ["default/cross-cluster-db-access", "from-list"]);
    assert_eq!(parsed.skipped, 3);
    // JSON is YAML too.
    let json = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy",
        "metadata":{"name":"j","namespace":"default"},
        "spec":{"endpointSelector":{"matchLabels":{"app":"database"}},"ingress":[{}],"unknownField":1}}"#;
    assert_eq!(parse_documents(json).policies.len(), 1);
}

#[test]
fn invalid_documents_are_reported_and_the_rest_translate() {
    let yaml = format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bad-operator}}
spec:
  endpointSelector:
    matchExpressions: [{{key: app, operator: Equals, values: [x]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: no-selector}}
spec:
  ingress: [{{}}]
---
{SCENARIO}
"#
    );
    let parsed = parse_documents(&yaml);
    assert_eq!(parsed.policies.len(), 1);
    assert_eq!(parsed.errors.len(), 2);
    match &parsed.errors[0] {
        PolicyError::Invalid { index, name, .. } => {
            assert_eq!((*index, name.as_deref()), (0, Some("bad-operator")));
        }
        other => panic!("{other:?}"),
    }
    let msg = parsed.errors[1].to_string();
    assert!(
        msg.contains("document 1 (no-selector)") && msg.contains("endpointSelector"),
        "{msg}"
    );
    let p = translate(&parsed.policies, &database(), &universe(), "cluster-europe");
    assert_eq!(p.entries, BTreeSet::from([allow_in(FRONTEND_USA)]));

    // Malformed YAML: an error naming the document, earlier documents kept, no panic.
    let broken = format!("{SCENARIO}\n---\nkind: CiliumNetworkPolicy\nspec: [unclosed\n");
    let parsed = parse_documents(&broken);
    assert_eq!(parsed.policies.len(), 1);
    assert!(
        matches!(&parsed.errors[..], [PolicyError::Yaml { index: 1, .. }]),
        "{:?}",
        parsed.errors
    );
    assert!(CiliumPolicy::from_yaml("spec: {").is_err());
    assert!(matches!(
        CiliumPolicy::from_yaml(
            "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}}"
        ),
        Err(PolicyError::Invalid { .. })
    ));
    let err: crate::Error = parsed.errors[0].clone().into();
    assert!(err.to_string().contains("invalid YAML"));
}
