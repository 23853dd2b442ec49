//! What is particular to this node: its pods as local endpoints (identity, host-side
//! interface, the policy translated for them), and where strict encryption routes other
//! nodes' pods. The endpoint source writes the first, the routing reconciler the second; the
//! datapath reads both.

use std::net::Ipv4Addr;

use ipnet::IpNet;

use super::StateModel;
use crate::policy::EndpointPolicy;

/// A pod of this node with an IPv4 address and an allocated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    /// The host-side interface the node routes the pod's /32 to, once there is one.
    pub interface: Option<HostInterface>,
    /// The policies selecting the pod, translated against the identities known mesh-wide.
    pub policy: EndpointPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
}

/// A pod of this node that a policy selects but that has no identity: the datapath cannot
/// enforce that policy (status lists it). Written by the endpoint source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnidentifiedEndpoint {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Why the allocation failed.
    pub error: String,
}

/// A prefix strict encryption routes: into the WireGuard device (`true`) or `unreachable`.
pub type EncryptionRoute = (IpNet, bool);

impl StateModel {
    pub fn upsert_local_endpoint(&mut self, ep: LocalEndpoint) {
        let key = (ep.namespace.clone(), ep.name.clone());
        // It has an identity now.
        self.unidentified.remove(&key);
        if self.local_endpoints.get(&key) != Some(&ep) {
            self.local_endpoints.insert(key, ep);
            self.dirty.local_endpoints = true;
        }
    }

    pub fn delete_local_endpoint(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.local_endpoints.remove(&key).is_some() {
            self.dirty.local_endpoints = true;
        }
    }

    /// The endpoint source has written every pod of the local source's first full listing:
    /// from now on a restored datapath entry of no local endpoint belongs to a pod that is
    /// gone.
    pub fn set_local_endpoints_synced(&mut self) {
        if !self.local_endpoints_synced {
            self.local_endpoints_synced = true;
            self.dirty.local_endpoints = true;
        }
    }

    pub fn local_endpoints_synced(&self) -> bool {
        self.local_endpoints_synced
    }

    /// Records (`Some`) or clears (`None`) that pod `namespace/name` has no identity.
    pub fn set_unidentified(
        &mut self,
        namespace: &str,
        name: &str,
        endpoint: Option<UnidentifiedEndpoint>,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        let changed = match endpoint {
            Some(ep) => self.unidentified.insert(key, ep.clone()).as_ref() != Some(&ep),
            None => self.unidentified.remove(&key).is_some(),
        };
        // The datapath's endpoint reconciler reports them with the local endpoints.
        self.dirty.local_endpoints |= changed;
    }

    /// Forgets the unidentified pods for which `keep(namespace, name)` is false.
    pub fn retain_unidentified(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        let before = self.unidentified.len();
        self.unidentified.retain(|(ns, name), _| keep(ns, name));
        self.dirty.local_endpoints |= self.unidentified.len() != before;
    }

    pub fn unidentified_endpoints(&self) -> impl Iterator<Item = &UnidentifiedEndpoint> {
        self.unidentified.values()
    }

    pub fn local_endpoints(&self) -> impl Iterator<Item = &LocalEndpoint> {
        self.local_endpoints.values()
    }

    pub fn local_endpoint(&self, namespace: &str, name: &str) -> Option<&LocalEndpoint> {
        self.local_endpoints
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// What the latest routing pass routes (replacing the previous pass's).
    pub fn set_encryption_routes(&mut self, routes: Vec<EncryptionRoute>) {
        if self.encryption_routes.as_ref() != Some(&routes) {
            self.encryption_routes = Some(routes);
            self.dirty.encryption_routes = true;
        }
    }

    /// `None` until strict encryption's routing has run on this node (it may be off).
    pub fn encryption_routes(&self) -> Option<&[EncryptionRoute]> {
        self.encryption_routes.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::{Direction, PolicyEntry},
        state::StateHandle,
    };

    fn frontend(interface: Option<HostInterface>) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "shop".into(),
            name: "frontend".into(),
            ip: Ipv4Addr::new(10, 1, 1, 5),
            identity: 65537,
            interface,
            policy: EndpointPolicy::default(),
        }
    }

    #[test]
    fn local_endpoints_notify_on_change_only() {
        let state = StateHandle::new("usa", 1);
        let before = state.versions();
        state.update(|m| m.upsert_local_endpoint(frontend(None)));
        let added = state.versions();
        assert_eq!(added.local_endpoints, before.local_endpoints + 1);
        assert_eq!(
            (
                added.nodes,
                added.endpoints,
                added.identities,
                added.services
            ),
            (
                before.nodes,
                before.endpoints,
                before.identities,
                before.services
            ),
            "only the local endpoints' version moves"
        );

        state.update(|m| m.upsert_local_endpoint(frontend(None)));
        assert_eq!(
            state.versions(),
            added,
            "an unchanged endpoint must not notify"
        );

        let veth = HostInterface {
            name: "veth5".into(),
            ifindex: 7,
        };
        state.update(|m| m.upsert_local_endpoint(frontend(Some(veth.clone()))));
        let mut ep = frontend(Some(veth));
        ep.policy.ingress_enforced = true;
        ep.policy.entries.insert(PolicyEntry {
            identity: 1000,
            direction: Direction::Ingress,
            protocol: 6,
            port: 5432,
            deny: false,
        });
        state.update(|m| m.upsert_local_endpoint(ep.clone()));
        assert_eq!(
            state.versions().local_endpoints,
            added.local_endpoints + 2,
            "interface and policy changes notify"
        );
        assert_eq!(state.read().local_endpoint("shop", "frontend"), Some(&ep));

        state.update(|m| m.delete_local_endpoint("shop", "frontend"));
        let removed = state.versions();
        assert_eq!(removed.local_endpoints, added.local_endpoints + 3);
        assert_eq!(state.read().local_endpoints().count(), 0);
        state.update(|m| m.delete_local_endpoint("shop", "frontend"));
        assert_eq!(
            state.versions(),
            removed,
            "deleting nothing must not notify"
        );
    }

    #[test]
    fn unidentified_pods_notify_on_change_and_leave_once_identified_or_gone() {
        let state = StateHandle::new("usa", 1);
        let unidentified = |name: &str, error: &str| UnidentifiedEndpoint {
            namespace: "shop".into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 1, 1, 5),
            error: error.into(),
        };
        let v0 = state.versions().local_endpoints;
        let ep = unidentified("frontend", "etcd down");
        state.update(|m| m.set_unidentified("shop", "frontend", Some(ep.clone())));
        state.update(|m| m.set_unidentified("shop", "frontend", Some(ep.clone())));
        assert_eq!(
            state.versions().local_endpoints,
            v0 + 1,
            "unchanged: no notify"
        );
        let other = unidentified("cart", "etcd down");
        state.update(|m| m.set_unidentified("shop", "cart", Some(other.clone())));
        assert_eq!(
            state.read().unidentified_endpoints().collect::<Vec<_>>(),
            [&other, &ep]
        );
        // Identified: it is a local endpoint now.
        state.update(|m| m.upsert_local_endpoint(frontend(None)));
        assert_eq!(
            state.read().unidentified_endpoints().collect::<Vec<_>>(),
            [&other]
        );
        // Gone.
        state.update(|m| m.retain_unidentified(|_, name| name != "cart"));
        assert_eq!(state.read().unidentified_endpoints().count(), 0);
        let v = state.versions().local_endpoints;
        state.update(|m| m.retain_unidentified(|_, _| false));
        state.update(|m| m.set_unidentified("shop", "cart", None));
        assert_eq!(
            state.versions().local_endpoints,
            v,
            "nothing removed: no notify"
        );
    }

    #[test]
    fn encryption_routes_are_unset_until_routed_and_notify_on_change_only() {
        let state = StateHandle::new("usa", 1);
        assert_eq!(state.read().encryption_routes(), None);
        let routes = vec![
            ("10.2.0.0/24".parse().unwrap(), true),
            ("10.0.0.0/8".parse().unwrap(), false),
        ];
        state.update(|m| m.set_encryption_routes(routes.clone()));
        let set = state.versions();
        assert_eq!(set.encryption_routes, 1);
        assert_eq!(state.read().encryption_routes(), Some(&routes[..]));
        state.update(|m| m.set_encryption_routes(routes.clone()));
        assert_eq!(state.versions(), set);
        // Nothing routed is not the same as routing never having run.
        state.update(|m| m.set_encryption_routes(Vec::new()));
        assert_eq!(state.versions().encryption_routes, 2);
        assert_eq!(state.read().encryption_routes(), Some(&[][..]));
    }
}
