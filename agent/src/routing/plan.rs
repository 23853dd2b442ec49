//! The desired route set, computed from what the WireGuard planner decided. Pure: no kernel.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use serde::Serialize;

use super::RoutingConfig;

/// What the routing reconciler needs to know about the mesh.
#[derive(Debug, Clone, Default)]
pub struct RouteInputs {
    /// Remote prefixes that have a WireGuard peer, with the owning node (`cluster/name`) for
    /// logs: routed into the device.
    pub encrypted: Vec<(IpNet, String)>,
    /// Remote pod CIDRs of known nodes that have no usable peer (no key, bad key, duplicate
    /// key): `unreachable` in strict mode, so they never leave in clear via another route.
    pub missing_peer: Vec<(IpNet, String)>,
    /// Underlay addresses of every remote node (peer endpoints among them): never routed into
    /// the device, which would loop WireGuard's own UDP packets back into itself.
    pub underlay: Vec<IpAddr>,
    /// The local node's pod CIDRs: never routed away.
    pub local_pod_cidrs: Vec<IpNet>,
    /// The local node's own addresses (the node IP finds the underlay MTU).
    pub local_node_ips: Vec<IpAddr>,
}

/// Where a route sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteTarget {
    /// Into the WireGuard device, scope link, with a preferred source address.
    Device { src: Option<IpAddr> },
    /// `unreachable`: strict mode's drop for traffic that has no peer.
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredRoute {
    pub prefix: IpNet,
    pub target: RouteTarget,
    /// Node (`cluster/name`) or `strict-cidr` the route exists for.
    pub owner: String,
    /// Strict mode, route into the device: also an `unreachable` route for the same prefix at
    /// [`STRICT_FALLBACK_METRIC`](crate::constants::STRICT_FALLBACK_METRIC), which outlives
    /// the device.
    pub fallback: bool,
}

/// The routes strait wants, keyed by prefix, plus human-readable reasons for prefixes it
/// refused to route.
#[derive(Debug, Clone, Default)]
pub struct RoutePlan {
    pub routes: BTreeMap<IpNet, DesiredRoute>,
    pub skipped: Vec<String>,
}

/// Computes the desired routes. `src_v4`/`src_v6` are the preferred source addresses for
/// routes into the device (already checked to be local addresses).
pub fn plan_routes(
    cfg: &RoutingConfig,
    inputs: &RouteInputs,
    src_v4: Option<Ipv4Addr>,
    src_v6: Option<Ipv6Addr>,
) -> RoutePlan {
    let mut plan = RoutePlan::default();
    let protected: Vec<IpAddr> = inputs
        .underlay
        .iter()
        .chain(&inputs.local_node_ips)
        .copied()
        .collect();
    let refuse = |prefix: &IpNet| -> Option<String> {
        if let Some(local) = inputs.local_pod_cidrs.iter().find(|l| overlaps(l, prefix)) {
            return Some(format!("{prefix} overlaps the local pod CIDR {local}"));
        }
        if let Some(ip) = protected.iter().find(|ip| prefix.contains(*ip)) {
            return Some(format!(
                "{prefix} contains the underlay address {ip} (routing it would cut the underlay)"
            ));
        }
        None
    };

    for (prefix, owner) in &inputs.encrypted {
        let prefix = prefix.trunc();
        if let Some(why) = refuse(&prefix) {
            plan.skipped.push(format!("{owner}: {why}"));
            continue;
        }
        let src = match prefix {
            IpNet::V4(_) => src_v4.map(IpAddr::V4),
            IpNet::V6(_) => src_v6.map(IpAddr::V6),
        };
        plan.routes.entry(prefix).or_insert(DesiredRoute {
            prefix,
            target: RouteTarget::Device { src },
            owner: owner.clone(),
            fallback: cfg.strict,
        });
    }

    if cfg.strict {
        let strict = inputs.missing_peer.iter().cloned().chain(
            cfg.strict_cidrs
                .iter()
                .map(|p| (*p, "strict-cidr".to_owned())),
        );
        for (prefix, owner) in strict {
            let prefix = prefix.trunc();
            if plan.routes.contains_key(&prefix) {
                continue;
            }
            // A supernet may cover the local pod CIDR (its connected route is more specific),
            // but never an underlay address.
            if let Some(ip) = protected.iter().find(|ip| prefix.contains(*ip)) {
                plan.skipped.push(format!(
                    "{owner}: strict-mode route {prefix} would cover the underlay address {ip}"
                ));
                continue;
            }
            if inputs
                .local_pod_cidrs
                .iter()
                .any(|l| prefix == *l || l.contains(&prefix))
            {
                plan.skipped.push(format!(
                    "{owner}: strict-mode route {prefix} is inside the local pod CIDR"
                ));
                continue;
            }
            plan.routes.insert(
                prefix,
                DesiredRoute {
                    prefix,
                    target: RouteTarget::Unreachable,
                    owner,
                    fallback: false,
                },
            );
        }
    }
    plan
}

/// Whether two prefixes share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn inputs() -> RouteInputs {
        RouteInputs {
            encrypted: vec![(net("10.2.0.0/24"), "c2/n2".into())],
            missing_peer: vec![(net("10.3.0.0/24"), "c3/n3".into())],
            underlay: vec!["198.18.2.2".parse().unwrap(), "198.18.3.2".parse().unwrap()],
            local_pod_cidrs: vec![net("10.1.0.0/24")],
            local_node_ips: vec!["198.18.1.2".parse().unwrap()],
        }
    }

    #[test]
    fn peers_route_into_the_device_and_missing_peers_are_unreachable_in_strict_mode() {
        let cfg = RoutingConfig::default();
        let plan = plan_routes(&cfg, &inputs(), Some("10.1.0.1".parse().unwrap()), None);
        assert_eq!(
            plan.routes[&net("10.2.0.0/24")].target,
            RouteTarget::Device {
                src: Some("10.1.0.1".parse().unwrap())
            }
        );
        assert_eq!(
            plan.routes[&net("10.3.0.0/24")].target,
            RouteTarget::Unreachable
        );
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
        // Strict: the device route keeps an unreachable fallback under it; the unreachable
        // route needs none.
        assert!(plan.routes[&net("10.2.0.0/24")].fallback);
        assert!(!plan.routes[&net("10.3.0.0/24")].fallback);

        let lax = RoutingConfig {
            strict: false,
            ..RoutingConfig::default()
        };
        let plan = plan_routes(&lax, &inputs(), None, None);
        assert_eq!(plan.routes.len(), 1);
        assert_eq!(
            plan.routes[&net("10.2.0.0/24")].target,
            RouteTarget::Device { src: None }
        );
        assert!(!plan.routes[&net("10.2.0.0/24")].fallback);
    }

    #[test]
    fn supernet_is_unreachable_but_more_specific_peers_and_local_cidr_stay() {
        let cfg = RoutingConfig {
            strict_cidrs: vec![net("10.0.0.0/8"), net("10.2.0.0/24"), net("198.18.0.0/15")],
            ..RoutingConfig::default()
        };
        let plan = plan_routes(&cfg, &inputs(), None, None);
        assert_eq!(
            plan.routes[&net("10.0.0.0/8")].target,
            RouteTarget::Unreachable
        );
        // The peer's route wins over the same strict prefix.
        assert!(matches!(
            plan.routes[&net("10.2.0.0/24")].target,
            RouteTarget::Device { .. }
        ));
        // Never a strict route over the underlay.
        assert!(!plan.routes.contains_key(&net("198.18.0.0/15")));
        assert_eq!(plan.skipped.len(), 1, "{:?}", plan.skipped);
    }

    #[test]
    fn never_routes_the_local_cidr_or_an_underlay_address_into_the_device() {
        let mut i = inputs();
        i.encrypted.push((net("10.1.0.0/25"), "c2/bad".into()));
        i.encrypted.push((net("198.18.0.0/16"), "c2/worse".into()));
        let plan = plan_routes(&RoutingConfig::default(), &i, None, None);
        assert!(!plan.routes.contains_key(&net("10.1.0.0/25")));
        assert!(!plan.routes.contains_key(&net("198.18.0.0/16")));
        assert_eq!(plan.skipped.len(), 2, "{:?}", plan.skipped);
    }
}
