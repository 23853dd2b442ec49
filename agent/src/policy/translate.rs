//! The translation proper; see [`translate`].

use std::collections::BTreeSet;

use crate::identity::labels::{LABEL_SOURCE_RESERVED, Label, LabelArray};
use crate::identity::{IDENTITY_ENCRYPTED_OVERLAY, IDENTITY_HOST, reserved_identity_name};

use super::selector::Selector;
use super::types::{CiliumPolicy, EgressRule, IngressRule, LabelSelector, PortRule};
use super::{
    Direction, EndpointPolicy, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, PolicyEntry, Unsupported,
};

/// Reserved identities that carry the `world` label family.
const WORLD_NAMES: &[&str] = &["world", "world-ipv4", "world-ipv6"];
/// Reserved identities the `cluster` entity covers besides the local cluster's pods.
const CLUSTER_RESERVED_NAMES: &[&str] = &[
    "host",
    "remote-node",
    "init",
    "health",
    "unmanaged",
    "kube-apiserver",
    "ingress",
];

/// Computes the policy of one endpoint.
///
/// * `policies`: every policy in force (namespaced and clusterwide).
/// * `endpoint`: the endpoint's identity labels (`k8s:app=…`, `k8s:io.kubernetes.pod.namespace=…`,
///   `k8s:io.cilium.k8s.policy.cluster=…`).
/// * `universe`: every known identity, local and remote, with its labels. Reserved identities
///   1..=10 missing from it are added with their `reserved:<name>` label.
/// * `local_cluster`: this cluster's name, for the `cluster` entity.
///
/// Semantics (Cilium's):
/// * A rule selects the endpoint when its `endpointSelector` matches; a namespaced policy's
///   endpoint selector is always confined to its namespace (`default` when unset). Rules with
///   a `nodeSelector` (host policies) never select a pod endpoint.
/// * A direction is enforced (default deny) once a selecting rule has an `ingress`/`ingressDeny`
///   (resp. `egress`/`egressDeny`) section, unless `enableDefaultDeny` says otherwise.
///   `ingress: [{}]` enforces and allows nothing.
/// * Peers: `fromEndpoints`/`toEndpoints` selectors are matched against the universe (scoped
///   to the policy's namespace unless they name `io.kubernetes.pod.namespace`, see
///   [`Selector::for_peer`]); entities map to reserved identities, `cluster` to the local
///   cluster's identities plus the node-ish reserved ones, `all` to the wildcard 0. A rule
///   with `toPorts` and no peer field at all applies to every peer (identity 0); a peer field
///   given as an empty list selects nothing.
/// * Ports: no `toPorts` (or a `toPorts` entry without ports) = every protocol and port
///   (0, 0); protocol `ANY` with a port expands to TCP, UDP and SCTP on that port (the
///   map's LPM key cannot wildcard the protocol under a fixed port); port `"0"` = any port.
/// * Deny sections give `deny: true` entries.
///
/// What strait cannot enforce never widens access, and is reported in
/// [`EndpointPolicy::unsupported`]:
/// * In allow sections, unsupported peers (`fromCIDR`, `fromCIDRSet`, `toCIDR`, `toCIDRSet`,
///   `toFQDNs`, `toServices`, `fromGroups`, `toGroups`, `fromNodes`, `toNodes`) contribute no
///   identity; named ports, port ranges and other protocols are dropped (a rule whose ports
///   are all dropped allows nothing); a rule with L7 `rules` (or `serverNames`, TLS
///   interception, `listener`), `icmps` or `authentication` is dropped whole — without an L7
///   proxy, allowing its ports at L4 would admit requests the author meant to filter.
/// * `fromRequires`/`toRequires` narrow every allow of the endpoint in that direction; strait
///   cannot express that, so all allow entries of that direction are dropped (denies stay).
/// * In deny sections, unsupported parts widen the deny instead: CIDR/FQDN/group peers deny
///   the world identities, service/node peers deny every identity, named ports and ranges
///   deny the whole protocol, `icmps` deny ICMP and ICMPv6 entirely.
pub fn translate(
    policies: &[CiliumPolicy],
    endpoint: &LabelArray,
    universe: &[(u32, LabelArray)],
    local_cluster: &str,
) -> EndpointPolicy {
    let ctx = Ctx::new(universe, local_cluster);
    let mut out = EndpointPolicy::default();
    let mut requires = [false, false];
    for policy in policies {
        let namespace = policy.scope_namespace();
        let name = policy.display_name();
        let first_is_spec = policy.spec.is_some();
        for (j, rule) in policy.rules().enumerate() {
            let Some(es) = &rule.endpoint_selector else {
                continue;
            };
            if !Selector::for_endpoint(es, namespace).matches(endpoint) {
                continue;
            }
            let prefix = if first_is_spec && j == 0 {
                String::new()
            } else {
                format!("specs[{}].", j - usize::from(first_is_spec))
            };
            let mut tr = RuleTranslator {
                ctx: &ctx,
                namespace,
                policy: &name,
                out: &mut out,
                requires: &mut requires,
            };
            let dd = rule.enable_default_deny.unwrap_or_default();
            let ingress = dd
                .ingress
                .unwrap_or(!rule.ingress.is_empty() || !rule.ingress_deny.is_empty());
            let egress = dd
                .egress
                .unwrap_or(!rule.egress.is_empty() || !rule.egress_deny.is_empty());
            for (i, r) in rule.ingress.iter().enumerate() {
                tr.rule(&ingress_view(r), &format!("{prefix}ingress[{i}]"), false);
            }
            for (i, r) in rule.ingress_deny.iter().enumerate() {
                tr.rule(&ingress_view(r), &format!("{prefix}ingressDeny[{i}]"), true);
            }
            for (i, r) in rule.egress.iter().enumerate() {
                tr.rule(&egress_view(r), &format!("{prefix}egress[{i}]"), false);
            }
            for (i, r) in rule.egress_deny.iter().enumerate() {
                tr.rule(&egress_view(r), &format!("{prefix}egressDeny[{i}]"), true);
            }
            out.ingress_enforced |= ingress;
            out.egress_enforced |= egress;
        }
    }
    for (dir, dropped) in [Direction::Ingress, Direction::Egress]
        .into_iter()
        .zip(requires)
    {
        if dropped {
            out.entries.retain(|e| e.direction != dir || e.deny);
        }
    }
    out
}

/// The identity universe with the reserved identities filled in.
struct Ctx<'a> {
    identities: Vec<(u32, LabelArray)>,
    local_cluster: &'a str,
}

impl<'a> Ctx<'a> {
    fn new(universe: &[(u32, LabelArray)], local_cluster: &'a str) -> Ctx<'a> {
        let mut identities = universe.to_vec();
        for id in IDENTITY_HOST..IDENTITY_ENCRYPTED_OVERLAY {
            if let Some(name) = reserved_identity_name(id)
                && !universe.iter().any(|(u, _)| *u == id)
            {
                let labels = [Label::new(LABEL_SOURCE_RESERVED, name, "")];
                identities.push((id, labels.into_iter().collect()));
            }
        }
        Ctx {
            identities,
            local_cluster,
        }
    }

    fn select<'s>(&'s self, sel: &'s Selector) -> impl Iterator<Item = u32> + 's {
        self.identities
            .iter()
            .filter(move |(_, l)| sel.matches(l))
            .map(|(id, _)| *id)
    }

    fn with_reserved<'s>(&'s self, names: &'s [&'s str]) -> impl Iterator<Item = u32> + 's {
        self.identities
            .iter()
            .filter(move |(_, l)| {
                l.iter().any(|lb| {
                    lb.source == LABEL_SOURCE_RESERVED && names.contains(&lb.key.as_str())
                })
            })
            .map(|(id, _)| *id)
    }

    /// Identities an entity stands for; `None` for an unknown entity.
    fn entity(&self, entity: &str) -> Option<BTreeSet<u32>> {
        let names: &[&str] = match entity {
            "all" => return Some(BTreeSet::from([0])),
            "none" => &[],
            "world" => WORLD_NAMES,
            "world-ipv4" => &["world-ipv4"],
            "world-ipv6" => &["world-ipv6"],
            "cluster" => {
                let mut ids: BTreeSet<u32> = self.with_reserved(CLUSTER_RESERVED_NAMES).collect();
                ids.extend(
                    self.identities
                        .iter()
                        .filter(|(_, l)| l.cluster_name() == Some(self.local_cluster))
                        .map(|(id, _)| *id),
                );
                return Some(ids);
            }
            "host" | "remote-node" | "kube-apiserver" | "health" | "init" | "unmanaged"
            | "ingress" => return Some(self.with_reserved(&[entity]).collect()),
            _ => return None,
        };
        Some(self.with_reserved(names).collect())
    }
}

/// What a deny widens to for a peer kind strait cannot resolve.
#[derive(Clone, Copy)]
enum Widen {
    /// The world identities (external destinations: CIDRs, FQDNs, cloud groups).
    World,
    /// Every identity.
    Any,
}

/// Direction-independent view of an ingress or egress rule.
struct RuleView<'a> {
    direction: Direction,
    endpoints: Option<&'a [LabelSelector]>,
    entities: Option<&'a [String]>,
    requires: bool,
    requires_field: &'static str,
    /// (field name, present, number of entries, deny widening).
    other_peers: Vec<(&'static str, bool, usize, Widen)>,
    to_ports: &'a [PortRule],
    icmps: bool,
    authentication: bool,
}

fn opt_len<T>(v: &Option<Vec<T>>) -> (bool, usize) {
    (v.is_some(), v.as_ref().map_or(0, Vec::len))
}

fn peer<T>(
    name: &'static str,
    v: &Option<Vec<T>>,
    widen: Widen,
) -> (&'static str, bool, usize, Widen) {
    let (present, n) = opt_len(v);
    (name, present, n, widen)
}

fn ingress_view(r: &IngressRule) -> RuleView<'_> {
    RuleView {
        direction: Direction::Ingress,
        endpoints: r.from_endpoints.as_deref(),
        entities: r.from_entities.as_deref(),
        requires: !r.from_requires.is_empty(),
        requires_field: "fromRequires",
        other_peers: vec![
            peer("fromCIDR", &r.from_cidr, Widen::World),
            peer("fromCIDRSet", &r.from_cidr_set, Widen::World),
            peer("fromGroups", &r.from_groups, Widen::World),
            peer("fromNodes", &r.from_nodes, Widen::Any),
        ],
        to_ports: &r.to_ports,
        icmps: !r.icmps.is_empty(),
        authentication: r.authentication.as_ref().is_some_and(|a| a.is_required()),
    }
}

fn egress_view(r: &EgressRule) -> RuleView<'_> {
    RuleView {
        direction: Direction::Egress,
        endpoints: r.to_endpoints.as_deref(),
        entities: r.to_entities.as_deref(),
        requires: !r.to_requires.is_empty(),
        requires_field: "toRequires",
        other_peers: vec![
            peer("toCIDR", &r.to_cidr, Widen::World),
            peer("toCIDRSet", &r.to_cidr_set, Widen::World),
            peer("toFQDNs", &r.to_fqdns, Widen::World),
            peer("toGroups", &r.to_groups, Widen::World),
            peer("toServices", &r.to_services, Widen::Any),
            peer("toNodes", &r.to_nodes, Widen::Any),
        ],
        to_ports: &r.to_ports,
        icmps: !r.icmps.is_empty(),
        authentication: r.authentication.as_ref().is_some_and(|a| a.is_required()),
    }
}

struct RuleTranslator<'a, 'b> {
    ctx: &'a Ctx<'a>,
    namespace: Option<&'a str>,
    policy: &'a str,
    out: &'b mut EndpointPolicy,
    requires: &'b mut [bool; 2],
}

impl RuleTranslator<'_, '_> {
    fn report(&mut self, loc: &str, what: String) {
        self.out.unsupported.push(Unsupported {
            policy: self.policy.to_owned(),
            rule: format!("{loc}: {what}"),
        });
    }

    fn rule(&mut self, r: &RuleView<'_>, loc: &str, deny: bool) {
        if r.requires {
            self.requires[r.direction as usize] = true;
            let dir = match r.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            };
            self.report(
                loc,
                format!(
                    "{} (every {dir} allow of this endpoint dropped)",
                    r.requires_field
                ),
            );
        }
        if !deny {
            if r.icmps {
                return self.report(loc, "icmps (rule dropped)".into());
            }
            if r.authentication {
                return self.report(loc, "authentication (rule dropped)".into());
            }
            if let Some((feature, pr)) = r
                .to_ports
                .iter()
                .find_map(|pr| pr.l7_feature().map(|f| (f, pr)))
            {
                let ports = describe_ports(pr);
                return self.report(loc, format!("{feature} on {ports} (rule dropped)"));
            }
        }

        // Ports.
        let mut ports: BTreeSet<(u8, u16)> = BTreeSet::new();
        let mut notes = Vec::new();
        if r.to_ports.is_empty() && !(deny && r.icmps) {
            ports.insert((PROTO_ANY, 0));
        }
        for pr in r.to_ports {
            if pr.ports.is_empty() {
                ports.insert((PROTO_ANY, 0));
            }
            for pp in &pr.ports {
                match l4(pp.protocol.as_deref(), &pp.port, pp.end_port) {
                    Ok(set) => ports.extend(set),
                    Err((what, proto)) => {
                        if deny {
                            ports.insert((proto, 0));
                            notes.push(format!("{what} (denied on every port of the protocol)"));
                        } else {
                            notes.push(format!("{what} (port dropped)"));
                        }
                    }
                }
            }
        }
        if deny && r.icmps {
            ports.insert((PROTO_ICMP, 0));
            ports.insert((PROTO_ICMPV6, 0));
            notes.push("icmps (all ICMP and ICMPv6 denied)".into());
        }
        for n in notes {
            self.report(loc, n);
        }

        // Peers.
        let mut ids: BTreeSet<u32> = BTreeSet::new();
        let mut l3 = r.endpoints.is_some() || r.entities.is_some();
        for sel in r.endpoints.unwrap_or_default() {
            let sel = Selector::for_peer(sel, self.namespace);
            ids.extend(self.ctx.select(&sel));
        }
        for e in r.entities.unwrap_or_default() {
            match self.ctx.entity(e) {
                Some(set) => ids.extend(set),
                None => self.report(loc, format!("unknown entity {e:?} (ignored)")),
            }
        }
        for &(field, present, n, widen) in &r.other_peers {
            l3 |= present;
            if n == 0 {
                continue;
            }
            if deny {
                match widen {
                    Widen::World => {
                        ids.extend(self.ctx.with_reserved(WORLD_NAMES));
                        self.report(loc, format!("{field} (denied for all of world)"));
                    }
                    Widen::Any => {
                        ids.insert(0);
                        self.report(loc, format!("{field} (denied for every identity)"));
                    }
                }
            } else {
                self.report(
                    loc,
                    format!("{field} (peer ignored, nothing allowed for it)"),
                );
            }
        }
        if !l3 {
            if r.to_ports.is_empty() && !r.icmps {
                // `{}`: selects nothing.
                return;
            }
            ids.insert(0);
        }

        for &identity in &ids {
            for &(protocol, port) in &ports {
                self.out.entries.insert(PolicyEntry {
                    identity,
                    direction: r.direction,
                    protocol,
                    port,
                    deny,
                });
            }
        }
    }
}

fn proto_name(p: Option<&str>) -> String {
    p.map(str::to_ascii_uppercase)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "ANY".into())
}

fn describe_ports(pr: &PortRule) -> String {
    if pr.ports.is_empty() {
        return "all ports".into();
    }
    let list: Vec<String> = pr
        .ports
        .iter()
        .map(|p| format!("port {}/{}", p.port, proto_name(p.protocol.as_deref())))
        .collect();
    list.join(", ")
}

/// The (protocol, port) entries of one `ports` item, or what is unsupported about it together
/// with the protocol a deny should widen to.
fn l4(
    protocol: Option<&str>,
    port: &str,
    end_port: Option<i64>,
) -> Result<Vec<(u8, u16)>, (String, u8)> {
    let pname = proto_name(protocol);
    let protos: &[u8] = match pname.as_str() {
        "ANY" => &[PROTO_TCP, PROTO_UDP, PROTO_SCTP],
        "TCP" => &[PROTO_TCP],
        "UDP" => &[PROTO_UDP],
        "SCTP" => &[PROTO_SCTP],
        _ => return Err((format!("protocol {pname}"), PROTO_ANY)),
    };
    let widen = if protos.len() == 1 {
        protos[0]
    } else {
        PROTO_ANY
    };
    let port_num: u16 = if port.is_empty() {
        0
    } else {
        match port.parse() {
            Ok(n) => n,
            Err(_) if port.bytes().all(|b| b.is_ascii_digit()) => {
                return Err((format!("invalid port {port}/{pname}"), widen));
            }
            Err(_) => return Err((format!("named port {port}/{pname}"), widen)),
        }
    };
    if let Some(end) = end_port
        && port_num != 0
        && end > i64::from(port_num)
    {
        return Err((format!("port range {port}-{end}/{pname}"), widen));
    }
    if port_num == 0 {
        return Ok(vec![(widen, 0)]);
    }
    Ok(protos.iter().map(|&p| (p, port_num)).collect())
}
