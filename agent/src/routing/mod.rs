//! Routes to remote pod CIDRs through the WireGuard device, and the device's link settings
//! (up, MTU = underlay MTU − 80, optional addresses), reconciled by diff over rtnetlink.
//!
//! strait owns exactly the routes carrying protocol [`RTPROT_STRAIT`] in its table: it lists
//! those, adds what is missing, replaces what differs and deletes what is no longer wanted.
//! A route someone else created for the same prefix is never touched (the add fails with
//! `EEXIST`, which is reported once and skipped).
//!
//! Strict mode installs `unreachable` routes for remote pod CIDRs that have no peer (and for
//! configured supernets), so a missing peer never sends pod traffic in clear via the default
//! route; and under every route into the device an `unreachable` fallback at
//! [`STRICT_FALLBACK_METRIC`], which does not depend on the device: when the device vanishes
//! (wireguard-go died, strait stopped it) its routes go with it and the fallback drops the
//! traffic until the device is back. The drop is silent for flow visibility today: flow events for these drops come
//! later, with the eBPF datapath.
//!

pub mod netns;
pub mod plan;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags},
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use serde::Serialize;

pub use netns::TargetNetns;
pub use plan::{DesiredRoute, RouteInputs, RoutePlan, RouteTarget, plan_routes};

use crate::{
    constants::{
        ROUTE_PRIORITY_V4, ROUTE_PRIORITY_V6, RTPROT_STRAIT, STRICT_FALLBACK_METRIC,
        WIREGUARD_MTU_OVERHEAD,
    },
    hostnet::{route_destination, route_ip, route_table},
    netns::NetnsError,
};

/// The main routing table (`RT_TABLE_MAIN`).
pub use crate::hostnet::MAIN_TABLE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Drop traffic to remote pod CIDRs without a peer instead of letting it leave in clear
    /// (default on).
    pub strict: bool,
    /// Prefixes that must never leave unencrypted (e.g. the mesh-wide pod supernet): routed
    /// `unreachable` in strict mode; more specific peer routes still win.
    pub strict_cidrs: Vec<IpNet>,
    /// Preferred source for IPv4 routes into the device (the node's pod-CIDR gateway
    /// address), so replies to node-originated traffic come back through the tunnel. `None`:
    /// the first host address of the local node's IPv4 pod CIDR, if that is a local address.
    pub src_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub src_v6: Option<Ipv6Addr>,
    /// Underlay MTU; `None`: the MTU of the interface holding the local node IP.
    pub underlay_mtu: Option<u32>,
    /// Addresses to put on the device (none needed when routes carry a source address).
    pub device_addresses: Vec<IpNet>,
    /// Routing table for strait's routes.
    pub table: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            strict: true,
            strict_cidrs: Vec::new(),
            src_v4: None,
            src_v6: None,
            underlay_mtu: None,
            device_addresses: Vec::new(),
            table: MAIN_TABLE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening an rtnetlink socket in {netns}: {source}")]
    Connect {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device} not found in {netns}")]
    DeviceMissing { device: String, netns: String },
    #[error("listing {what} in {netns}: {source}")]
    Dump {
        what: &'static str,
        netns: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("setting {device} up with MTU {mtu}: {source}")]
    Link {
        device: String,
        mtu: u32,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("adding address {address} to {device}: {source}")]
    Address {
        device: String,
        address: IpNet,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{op} route {prefix} ({owner}): {source}")]
    Route {
        op: &'static str,
        prefix: IpNet,
        owner: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("invalid route {prefix}: {reason}")]
    Invalid { prefix: IpNet, reason: String },
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteReport {
    /// Routes strait wants (and, barring errors, now has).
    pub desired: usize,
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
    /// Prefixes not routed, with the reason.
    pub skipped: Vec<String>,
    /// Device MTU after the reconcile.
    pub device_mtu: Option<u32>,
    /// Every planned prefix and whether it goes into the device (true) or is strict mode's
    /// `unreachable` (false): the datapath's encryption guard mirrors it for flow events.
    #[serde(skip)]
    pub guard: Vec<(IpNet, bool)>,
}

/// One route strait installed earlier (protocol [`RTPROT_STRAIT`]), as read back.
#[derive(Debug, Clone)]
struct Installed {
    message: RouteMessage,
    priority: u32,
    kind: RouteType,
    oif: Option<u32>,
    src: Option<IpAddr>,
}

#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mtu: Option<u32>,
    up: bool,
}

/// Owns the device's link settings and strait's routes in one network namespace.
pub struct RouteReconciler {
    cfg: RoutingConfig,
    device: String,
    netns: TargetNetns,
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
    /// Conditions already logged, so a persistent problem is reported once, not per pass.
    logged: HashSet<String>,
    /// Whether every source has listed once. Before that, a route missing from the plan that
    /// this reconciler never planned may only be not synced yet (a restarted agent starts from
    /// an empty model while the routes of the previous run still carry traffic): it is kept,
    /// as unknown peers are. Routes of nodes this run knew and saw deleted go at once.
    synced: bool,
    /// Every prefix a plan of this run contained.
    planned: HashSet<IpNet>,
}

impl Drop for RouteReconciler {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl RouteReconciler {
    /// Opens an rtnetlink socket inside `netns` (the socket stays bound to it). Must be called
    /// within a tokio runtime: the connection runs as a task on it.
    pub fn new(cfg: RoutingConfig, device: &str, netns: TargetNetns) -> Result<Self, RoutingError> {
        let (connection, handle, _) = {
            let _inside = netns.enter()?;
            rtnetlink::new_connection().map_err(|source| RoutingError::Connect {
                netns: netns.to_string(),
                source,
            })?
        };
        let connection = tokio::spawn(connection);
        Ok(Self {
            cfg,
            device: device.to_owned(),
            netns,
            handle,
            connection,
            logged: HashSet::new(),
            synced: true,
            planned: HashSet::new(),
        })
    }

    /// Tells the reconciler whether the model is complete (every source listed once). While
    /// it is not, routes the plan does not name and this run never planned are left in place
    /// instead of deleted, so an agent restart does not cut traffic to remote pod CIDRs until
    /// the mesh has synced again (strict mode would otherwise answer `unreachable`
    /// meanwhile). Default: synced.
    pub fn set_synced(&mut self, synced: bool) {
        self.synced = synced;
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.cfg
    }

    /// Brings the device to the desired link state and the route table to the desired routes.
    /// Keeps going after a per-route failure and returns the first error at the end, so one bad
    /// route never blocks the others (the caller retries).
    pub async fn reconcile(&mut self, inputs: &RouteInputs) -> Result<RouteReport, RoutingError> {
        let mut report = RouteReport::default();
        let links = self.links().await?;
        let Some(dev) = links.iter().find(|l| l.name == self.device).cloned() else {
            // The device is gone (wireguard-go died) and its routes with it. Strict mode still
            // puts every drop in place, so prefixes learnt meanwhile fail closed too.
            if self.cfg.strict {
                let plan = plan_routes(&self.cfg, inputs, None, None);
                let installed = self.owned_routes().await?;
                for want in plan.routes.values() {
                    if want.fallback {
                        let _ = self.ensure_fallback(want, &installed, &mut report).await;
                    } else if want.target == RouteTarget::Unreachable {
                        let _ = self.ensure(want, 0, &installed, &mut report).await;
                    }
                }
            }
            return Err(RoutingError::DeviceMissing {
                device: self.device.clone(),
                netns: self.netns.to_string(),
            });
        };
        let addresses = self.addresses().await?;

        report.device_mtu = self
            .reconcile_link(&dev, &links, &addresses, inputs)
            .await?;
        self.reconcile_addresses(&dev, &addresses).await?;

        let (src_v4, src_v6) = self.sources(&addresses, inputs);
        let plan = plan_routes(&self.cfg, inputs, src_v4, src_v6);
        for why in &plan.skipped {
            self.log_once(
                why,
                || tracing::error!(reason = %why, "not routing a prefix"),
            );
        }
        report.skipped = plan.skipped.clone();
        report.desired = plan.routes.len();
        self.planned.extend(plan.routes.keys().copied());
        report.guard = plan
            .routes
            .values()
            .map(|r| (r.prefix, matches!(r.target, RouteTarget::Device { .. })))
            .collect();
        // This node's pod CIDRs are delivered here (per-pod routes), never sent in clear: a
        // strict supernet (`unreachable 10.0.0.0/8`) must not make the guard drop traffic
        // between this node's own pods.
        report
            .guard
            .extend(inputs.local_pod_cidrs.iter().map(|p| (*p, true)));

        let installed = self.owned_routes().await?;
        let mut first_error = None;
        for want in plan.routes.values() {
            // The fallback first: the device route above it may vanish any time.
            if want.fallback
                && let Err(e) = self.ensure_fallback(want, &installed, &mut report).await
            {
                first_error.get_or_insert(e);
            }
            if let Err(e) = self.ensure(want, dev.index, &installed, &mut report).await {
                first_error.get_or_insert(e);
            }
        }
        for (prefix, have) in installed {
            // Every prefix no longer wanted, and for wanted ones any strait route with another
            // priority (someone edited it by hand): strait's own priority and a wanted fallback
            // were handled above.
            let want = plan.routes.get(&prefix);
            let keep = want.is_some();
            let ours = route_priority(&prefix);
            let primary = have.iter().any(|r| r.priority == ours);
            for route in have.iter() {
                if keep && route.priority == ours {
                    continue;
                }
                if route.priority == STRICT_FALLBACK_METRIC && want.is_some_and(|w| w.fallback) {
                    continue;
                }
                if !keep && !self.synced && !self.planned.contains(&prefix) {
                    // Maybe just not synced yet: removed after the first full sync. The guard
                    // mirrors what is routed, so it keeps this route too (a fallback alone
                    // means the device route is gone: dropped).
                    if route.priority == ours {
                        report.guard.push((
                            prefix,
                            route.kind != RouteType::Unreachable && route.oif == Some(dev.index),
                        ));
                    } else if !primary && route.priority == STRICT_FALLBACK_METRIC {
                        report.guard.push((prefix, false));
                    }
                    continue;
                }
                match self.delete(route).await {
                    Ok(()) => {
                        tracing::debug!(%prefix, "route removed");
                        report.removed += 1;
                    }
                    Err(source) if is_errno(&source, libc::ESRCH) => {}
                    Err(source) => {
                        let e = RoutingError::Route {
                            op: "delete",
                            prefix,
                            owner: "strait".into(),
                            source: Box::new(source),
                        };
                        tracing::warn!(error = %e, "route reconcile");
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Makes strait's own route (its family's priority) for `want` what it should be (`oif`: the device).
    async fn ensure(
        &mut self,
        want: &DesiredRoute,
        oif: u32,
        installed: &BTreeMap<IpNet, Vec<Installed>>,
        report: &mut RouteReport,
    ) -> Result<(), RoutingError> {
        // strait's own route: a replace targets exactly that one.
        let ours = route_priority(&want.prefix);
        let op = match installed.get(&want.prefix).map(|have| {
            (
                have.iter().filter(|r| r.priority == ours).count(),
                have.iter().find(|r| r.priority == ours),
            )
        }) {
            Some((1, Some(r))) if same_route(r, want, oif) => return Ok(()),
            Some((_, Some(_))) => "replace",
            _ => "add",
        };
        let result = self
            .install(
                want.prefix,
                want.target,
                ours,
                &want.owner,
                oif,
                op == "replace",
            )
            .await;
        self.note(want, op, "route", result, report)
    }

    /// Makes the strict-mode `unreachable` fallback under `want` exist.
    async fn ensure_fallback(
        &mut self,
        want: &DesiredRoute,
        installed: &BTreeMap<IpNet, Vec<Installed>>,
        report: &mut RouteReport,
    ) -> Result<(), RoutingError> {
        let have = installed
            .get(&want.prefix)
            .and_then(|have| have.iter().find(|r| r.priority == STRICT_FALLBACK_METRIC));
        let op = match have {
            Some(r) if r.kind == RouteType::Unreachable => return Ok(()),
            Some(_) => "replace",
            None => "add",
        };
        let result = self
            .install(
                want.prefix,
                RouteTarget::Unreachable,
                STRICT_FALLBACK_METRIC,
                &want.owner,
                0,
                op == "replace",
            )
            .await;
        self.note(want, op, "fallback route", result, report)
    }

    /// Counts a route change, or reports a foreign route in the way once and skips it.
    fn note(
        &mut self,
        want: &DesiredRoute,
        op: &str,
        what: &str,
        result: Result<(), RoutingError>,
        report: &mut RouteReport,
    ) -> Result<(), RoutingError> {
        let prefix = want.prefix;
        match result {
            Ok(()) => {
                tracing::debug!(%prefix, owner = %want.owner, target = ?want.target, op, what);
                if op == "add" {
                    report.added += 1;
                } else {
                    report.replaced += 1;
                }
                Ok(())
            }
            Err(RoutingError::Route { source, .. }) if is_errno(&source, libc::EEXIST) => {
                let why = format!(
                    "{prefix} ({}): a {what} strait does not own already exists for it",
                    want.owner
                );
                self.log_once(
                    &why,
                    || tracing::error!(reason = %why, "not routing a prefix"),
                );
                report.skipped.push(why);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "route reconcile");
                Err(e)
            }
        }
    }

    /// Routes strait owns in its table, by prefix.
    pub async fn owned_prefixes(&self) -> Result<Vec<(IpNet, RouteTarget)>, RoutingError> {
        Ok(self
            .owned_routes()
            .await?
            .into_iter()
            .flat_map(|(p, rs)| {
                rs.into_iter().map(move |r| {
                    let target = if r.kind == RouteType::Unreachable {
                        RouteTarget::Unreachable
                    } else {
                        RouteTarget::Device { src: r.src }
                    };
                    (p, target)
                })
            })
            .collect())
    }

    async fn reconcile_link(
        &mut self,
        dev: &Link,
        links: &[Link],
        addresses: &[(u32, IpAddr, u8)],
        inputs: &RouteInputs,
    ) -> Result<Option<u32>, RoutingError> {
        let underlay = match self.cfg.underlay_mtu {
            Some(mtu) => Some(mtu),
            None => addresses
                .iter()
                .find(|(_, ip, _)| inputs.local_node_ips.contains(ip))
                .and_then(|(index, _, _)| links.iter().find(|l| l.index == *index))
                .and_then(|l| l.mtu),
        };
        let want_mtu = match underlay {
            Some(u) if u > WIREGUARD_MTU_OVERHEAD + 576 => Some(u - WIREGUARD_MTU_OVERHEAD),
            Some(u) => {
                let why = format!("underlay MTU {u} is too small for WireGuard; MTU left as is");
                self.log_once(&why, || tracing::error!("{why}"));
                None
            }
            None => {
                let why = "underlay MTU unknown (no local node IP on any interface yet): device MTU left as is".to_owned();
                self.log_once(&why, || tracing::info!("{why}"));
                None
            }
        };
        let mtu_ok = want_mtu.is_none() || want_mtu == dev.mtu;
        if mtu_ok && dev.up {
            return Ok(dev.mtu);
        }
        let mut msg = LinkUnspec::new_with_index(dev.index).up();
        if let Some(mtu) = want_mtu {
            msg = msg.mtu(mtu);
        }
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|source| RoutingError::Link {
                device: self.device.clone(),
                mtu: want_mtu.or(dev.mtu).unwrap_or_default(),
                source: Box::new(source),
            })?;
        tracing::info!(device = %self.device, mtu = ?want_mtu.or(dev.mtu), "WireGuard device up");
        Ok(want_mtu.or(dev.mtu))
    }

    async fn reconcile_addresses(
        &mut self,
        dev: &Link,
        addresses: &[(u32, IpAddr, u8)],
    ) -> Result<(), RoutingError> {
        for want in self.cfg.device_addresses.clone() {
            let present = addresses.iter().any(|(i, ip, len)| {
                *i == dev.index && *ip == want.addr() && *len == want.prefix_len()
            });
            if present {
                continue;
            }
            match self
                .handle
                .address()
                .add(dev.index, want.addr(), want.prefix_len())
                .execute()
                .await
            {
                Ok(()) => tracing::info!(device = %self.device, address = %want, "address added"),
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(source) => {
                    return Err(RoutingError::Address {
                        device: self.device.clone(),
                        address: want,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    }

    /// Preferred source addresses: configured, else the first host of the local pod CIDR when
    /// that address is configured on some interface (the kernel rejects a non-local `src`).
    fn sources(
        &mut self,
        addresses: &[(u32, IpAddr, u8)],
        inputs: &RouteInputs,
    ) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let local = |ip: IpAddr| addresses.iter().any(|(_, a, _)| *a == ip);
        let gateway = |v4: bool| {
            inputs
                .local_pod_cidrs
                .iter()
                .filter(|c| c.addr().is_ipv4() == v4)
                .find_map(|c| c.hosts().next())
                .filter(|ip| local(*ip))
        };
        let v4 = self.cfg.src_v4.or_else(|| match gateway(true) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        });
        let v6 = self.cfg.src_v6.or_else(|| match gateway(false) {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        });
        for (family, src, configured) in [
            ("IPv4", v4.map(IpAddr::V4), self.cfg.src_v4.is_some()),
            ("IPv6", v6.map(IpAddr::V6), self.cfg.src_v6.is_some()),
        ] {
            if let Some(ip) = src
                && configured
                && !local(ip)
            {
                let why =
                    format!("configured {family} route source {ip} is not a local address yet");
                self.log_once(&why, || tracing::warn!("{why}"));
            }
        }
        (v4, v6)
    }

    async fn install(
        &self,
        prefix: IpNet,
        target: RouteTarget,
        priority: u32,
        owner: &str,
        oif: u32,
        replace: bool,
    ) -> Result<(), RoutingError> {
        let err = |reason: String| RoutingError::Invalid { prefix, reason };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(prefix.addr(), prefix.prefix_len())
            .map_err(|e| err(e.to_string()))?
            .table_id(self.cfg.table)
            .protocol(RouteProtocol::Other(RTPROT_STRAIT));
        if priority != 0 {
            b = b.priority(priority);
        }
        match target {
            RouteTarget::Device { src } => {
                b = b
                    .output_interface(oif)
                    .scope(RouteScope::Link)
                    .kind(RouteType::Unicast);
                if let Some(src) = src {
                    b = b.pref_source(src).map_err(|e| err(e.to_string()))?;
                }
            }
            RouteTarget::Unreachable => {
                b = b.scope(RouteScope::Universe).kind(RouteType::Unreachable);
            }
        }
        let mut req = self.handle.route().add(b.build());
        if replace {
            req = req.replace();
        }
        req.execute().await.map_err(|source| RoutingError::Route {
            op: if replace { "replace" } else { "add" },
            prefix,
            owner: owner.to_owned(),
            source: Box::new(source),
        })
    }

    async fn delete(&self, route: &Installed) -> Result<(), rtnetlink::Error> {
        // Only the identifying attributes: the dump's cache info and metrics are not accepted
        // back by every kernel.
        let mut msg = RouteMessage::default();
        msg.header = route.message.header.clone();
        msg.attributes = route
            .message
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Table(_)
                        | RouteAttribute::Priority(_)
                        | RouteAttribute::Oif(_)
                )
            })
            .cloned()
            .collect();
        self.handle.route().del(msg).execute().await
    }

    async fn links(&self) -> Result<Vec<Link>, RoutingError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| self.dump_err("links", source))?;
        Ok(msgs
            .into_iter()
            .map(|m| Link {
                index: m.header.index,
                up: m.header.flags.contains(LinkFlags::Up),
                name: m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                mtu: m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                }),
            })
            .collect())
    }

    /// Every address in the namespace as (ifindex, address, prefix length).
    async fn addresses(&self) -> Result<Vec<(u32, IpAddr, u8)>, RoutingError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| self.dump_err("addresses", source))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
                // otherwise.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                Some((m.header.index, addr, m.header.prefix_len))
            })
            .collect())
    }

    async fn owned_routes(&self) -> Result<BTreeMap<IpNet, Vec<Installed>>, RoutingError> {
        let mut out: BTreeMap<IpNet, Vec<Installed>> = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|source| self.dump_err("routes", source))?;
            for m in msgs {
                if m.header.protocol != RouteProtocol::Other(RTPROT_STRAIT)
                    || route_table(&m) != self.cfg.table
                {
                    continue;
                }
                let Some(prefix) = route_destination(&m) else {
                    continue;
                };
                let oif = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                let src = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::PrefSource(a) => route_ip(a),
                    _ => None,
                });
                let priority = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                out.entry(prefix).or_default().push(Installed {
                    priority,
                    kind: m.header.kind,
                    oif,
                    src,
                    message: m,
                });
            }
        }
        Ok(out)
    }

    fn dump_err(&self, what: &'static str, source: rtnetlink::Error) -> RoutingError {
        RoutingError::Dump {
            what,
            netns: self.netns.to_string(),
            source: Box::new(source),
        }
    }

    fn log_once(&mut self, key: &str, log: impl FnOnce()) {
        if self.logged.insert(key.to_owned()) {
            log();
        }
    }
}

/// The priority strait installs (and reads back) for a prefix's own route: the kernel turns an
/// IPv6 route's 0 into 1024 (`IP6_RT_PRIO_USER`).
fn route_priority(prefix: &IpNet) -> u32 {
    match prefix {
        IpNet::V4(_) => ROUTE_PRIORITY_V4,
        IpNet::V6(_) => ROUTE_PRIORITY_V6,
    }
}

fn same_route(have: &Installed, want: &DesiredRoute, oif: u32) -> bool {
    match want.target {
        RouteTarget::Device { src } => {
            have.kind == RouteType::Unicast && have.oif == Some(oif) && have.src == src
        }
        RouteTarget::Unreachable => have.kind == RouteType::Unreachable,
    }
}

/// Whether a netlink request failed with `errno`.
pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.to_io().raw_os_error() == Some(errno))
}
