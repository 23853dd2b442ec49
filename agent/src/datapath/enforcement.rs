//! Local endpoints that a policy selects but the datapath does not enforce, with why: listed
//! in `strait status`, counted in `strait_endpoints_unenforced{reason}` and logged once per
//! endpoint and reason. Computed by the endpoints reconciler from the state model (pods
//! without a host route or an identity) and its own failures (attach, map writes).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use crate::{
    metrics::{Metrics, ReasonLabels},
    state::StateModel,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnenforcedReason {
    /// No exact /32 route to the pod on this node: no host-side interface to attach to.
    NoHostRoute,
    /// The pod's identity could not be allocated: it is neither published nor programmed.
    IdentityAllocationFailed,
    /// The policy programs could not be attached to the pod's host-side interface.
    AttachFailed,
    /// The ENDPOINTS / POLICY maps could not be written (e.g. full).
    MapWriteFailed,
}

impl UnenforcedReason {
    pub const ALL: [UnenforcedReason; 4] = [
        UnenforcedReason::NoHostRoute,
        UnenforcedReason::IdentityAllocationFailed,
        UnenforcedReason::AttachFailed,
        UnenforcedReason::MapWriteFailed,
    ];

    /// The metric's label and the status document's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnenforcedReason::NoHostRoute => "no-host-route",
            UnenforcedReason::IdentityAllocationFailed => "identity-allocation-failed",
            UnenforcedReason::AttachFailed => "attach-failed",
            UnenforcedReason::MapWriteFailed => "map-write-failed",
        }
    }
}

/// One endpoint the datapath does not enforce.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnenforcedEndpoint {
    /// `namespace/name`.
    pub pod: String,
    pub ip: Ipv4Addr,
    /// [`UnenforcedReason::as_str`].
    pub reason: String,
    pub detail: String,
}

/// The reconciler's own failures, by pod (`namespace/name`).
pub type Failures = BTreeMap<String, (UnenforcedReason, String)>;

/// Every local endpoint a policy selects that is not enforced. The endpoint source records
/// unidentified pods only when a policy selects them.
pub fn collect(model: &StateModel, failures: &Failures) -> Vec<UnenforcedEndpoint> {
    let mut out: Vec<UnenforcedEndpoint> = model
        .unidentified_endpoints()
        .map(|u| UnenforcedEndpoint {
            pod: format!("{}/{}", u.namespace, u.name),
            ip: u.ip,
            reason: UnenforcedReason::IdentityAllocationFailed.as_str().into(),
            detail: u.error.clone(),
        })
        .collect();
    for ep in model
        .local_endpoints()
        .filter(|ep| ep.policy.is_enforcing())
    {
        let pod = format!("{}/{}", ep.namespace, ep.name);
        let (reason, detail) = match (&ep.interface, failures.get(&pod)) {
            (None, _) => (
                UnenforcedReason::NoHostRoute,
                format!("no /32 route to {} on this node", ep.ip),
            ),
            (Some(_), Some((reason, detail))) => (*reason, detail.clone()),
            (Some(_), None) => continue,
        };
        out.push(UnenforcedEndpoint {
            pod,
            ip: ep.ip,
            reason: reason.as_str().into(),
            detail,
        });
    }
    out.sort();
    out
}

/// Keeps the log and the metric in line with the list: each (endpoint, reason) is logged
/// when it appears (again after it was resolved), never while it lasts.
#[derive(Debug, Default)]
pub struct Reporter {
    logged: BTreeSet<(String, String)>,
}

impl Reporter {
    pub fn update(&mut self, list: &[UnenforcedEndpoint], metrics: &Metrics) {
        let now: BTreeSet<(String, String)> = list
            .iter()
            .map(|u| (u.pod.clone(), u.reason.clone()))
            .collect();
        for u in list {
            if !self.logged.contains(&(u.pod.clone(), u.reason.clone())) {
                tracing::warn!(pod = %u.pod, ip = %u.ip, reason = %u.reason, detail = %u.detail, "policy selects the endpoint but the datapath does not enforce it");
            }
        }
        for (pod, reason) in self.logged.difference(&now) {
            tracing::info!(%pod, %reason, "endpoint no longer unenforced for this reason");
        }
        self.logged = now;
        for reason in UnenforcedReason::ALL {
            let n = list.iter().filter(|u| u.reason == reason.as_str()).count();
            metrics
                .endpoints_unenforced
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::{Direction, EndpointPolicy, PolicyEntry},
        state::{HostInterface, LocalEndpoint, StateHandle, UnidentifiedEndpoint},
        testlog::Logs,
    };

    fn enforcing() -> EndpointPolicy {
        let mut p = EndpointPolicy {
            ingress_enforced: true,
            ..Default::default()
        };
        p.entries.insert(PolicyEntry {
            identity: 1000,
            direction: Direction::Ingress,
            protocol: 6,
            port: 5432,
            deny: false,
        });
        p
    }

    fn endpoint(
        name: &str,
        last: u8,
        ifindex: Option<u32>,
        policy: EndpointPolicy,
    ) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "shop".into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 1, 1, last),
            identity: 65537,
            interface: ifindex.map(|ifindex| HostInterface {
                name: format!("veth{ifindex}"),
                ifindex,
            }),
            policy,
        }
    }

    fn reasons(list: &[UnenforcedEndpoint]) -> Vec<(&str, &str)> {
        list.iter()
            .map(|u| (u.pod.as_str(), u.reason.as_str()))
            .collect()
    }

    fn gauge(metrics: &Metrics, reason: &str) -> String {
        let text = metrics.render();
        let prefix = format!("strait_endpoints_unenforced{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .to_owned()
    }

    #[test]
    fn a_selected_pod_without_a_host_route_is_unenforced() {
        let state = StateHandle::new("usa", 1);
        state.update(|m| {
            m.upsert_local_endpoint(endpoint("db", 5, None, enforcing()));
            // No policy selects it: nothing to enforce, so not listed.
            m.upsert_local_endpoint(endpoint("web", 6, None, EndpointPolicy::default()));
            // Attached and programmed.
            m.upsert_local_endpoint(endpoint("ok", 7, Some(7), enforcing()));
        });
        let list = collect(&state.read(), &Failures::new());
        assert_eq!(reasons(&list), [("shop/db", "no-host-route")]);
        assert_eq!(list[0].ip, Ipv4Addr::new(10, 1, 1, 5));
        assert!(list[0].detail.contains("10.1.1.5"), "{list:?}");
    }

    #[test]
    fn a_selected_pod_without_an_identity_is_unenforced() {
        let state = StateHandle::new("usa", 1);
        state.update(|m| {
            m.set_unidentified(
                "shop",
                "db",
                Some(UnidentifiedEndpoint {
                    namespace: "shop".into(),
                    name: "db".into(),
                    ip: Ipv4Addr::new(10, 1, 1, 5),
                    error: "etcd: connection refused".into(),
                }),
            )
        });
        let list = collect(&state.read(), &Failures::new());
        assert_eq!(reasons(&list), [("shop/db", "identity-allocation-failed")]);
        assert_eq!(list[0].detail, "etcd: connection refused");
    }

    #[test]
    fn attach_and_map_write_failures_of_selected_pods_are_unenforced() {
        let state = StateHandle::new("usa", 1);
        state.update(|m| {
            m.upsert_local_endpoint(endpoint("a", 5, Some(5), enforcing()));
            m.upsert_local_endpoint(endpoint("b", 6, Some(6), enforcing()));
            m.upsert_local_endpoint(endpoint("c", 7, Some(7), EndpointPolicy::default()));
        });
        let failures = Failures::from([
            (
                "shop/a".to_owned(),
                (UnenforcedReason::AttachFailed, "no such device".to_owned()),
            ),
            (
                "shop/b".to_owned(),
                (
                    UnenforcedReason::MapWriteFailed,
                    "POLICY4 is full".to_owned(),
                ),
            ),
            (
                "shop/c".to_owned(),
                (UnenforcedReason::AttachFailed, "no such device".to_owned()),
            ),
        ]);
        let list = collect(&state.read(), &failures);
        assert_eq!(
            reasons(&list),
            [("shop/a", "attach-failed"), ("shop/b", "map-write-failed")]
        );
        assert_eq!(list[1].detail, "POLICY4 is full");
    }

    #[test]
    fn each_endpoint_and_reason_is_logged_once_and_counted_while_it_lasts() {
        let logs = Logs::default();
        let metrics = Metrics::new();
        let mut reporter = Reporter::default();
        let db = |reason: UnenforcedReason| UnenforcedEndpoint {
            pod: "shop/db".into(),
            ip: Ipv4Addr::new(10, 1, 1, 5),
            reason: reason.as_str().into(),
            detail: "why".into(),
        };
        let web = UnenforcedEndpoint {
            pod: "shop/web".into(),
            ..db(UnenforcedReason::NoHostRoute)
        };
        tracing::subscriber::with_default(logs.subscriber(), || {
            let list = [db(UnenforcedReason::NoHostRoute), web.clone()];
            for _ in 0..3 {
                reporter.update(&list, &metrics);
            }
            assert_eq!(gauge(&metrics, "no-host-route"), "2");
            assert_eq!(gauge(&metrics, "map-write-failed"), "0");
            // Another reason for the same pod is another line.
            reporter.update(
                &[db(UnenforcedReason::MapWriteFailed), web.clone()],
                &metrics,
            );
            assert_eq!(gauge(&metrics, "no-host-route"), "1");
            assert_eq!(gauge(&metrics, "map-write-failed"), "1");
            reporter.update(&[], &metrics);
            assert_eq!(gauge(&metrics, "no-host-route"), "0");
            assert_eq!(gauge(&metrics, "map-write-failed"), "0");
        });
        let text = logs.text();
        let lines = |pod: &str, reason: &str| {
            text.lines()
                .filter(|l| {
                    l.contains("does not enforce")
                        && l.contains(&format!("pod={pod}"))
                        && l.contains(&format!("reason={reason}"))
                })
                .count()
        };
        assert_eq!(lines("shop/db", "no-host-route"), 1, "{text}");
        assert_eq!(lines("shop/web", "no-host-route"), 1, "{text}");
        assert_eq!(lines("shop/db", "map-write-failed"), 1, "{text}");
    }
}
