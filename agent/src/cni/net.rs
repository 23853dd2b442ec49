//! The pod's wiring over rtnetlink: a veth pair, the pod side with a /32, loopback up, a
//! gateway reached through a permanent neighbour entry (the host side has no address), and
//! on the host a /32 route to the pod through the host-side veth (what the agent looks up,
//! `hostnet::host_route_ifindex`). Also reads it all back for CHECK.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use futures_util::TryStreamExt as _;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType},
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::spec::{CniError, code};
use crate::hostnet::{MAIN_TABLE, route_destination, route_table};

pub fn nl_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::NETLINK, what.to_string(), e.to_string())
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.to_io().raw_os_error() == Some(errno))
}

/// Runs `f` with a netlink handle in the current thread's namespace.
pub async fn with_handle<T, F, Fut>(f: F) -> Result<T, CniError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| nl_err("opening a netlink socket", e))?;
    let task = tokio::spawn(conn);
    let out = f(handle).await;
    task.abort();
    out
}

/// Runs `f` with a netlink handle inside the namespace `netns`, on a thread of its own
/// (setns is per thread) with its own runtime.
pub fn in_netns<T, F, Fut>(netns: &File, f: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall on an open nsfs fd; only this new thread moves.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(CniError::new(
                    code::IO,
                    "cannot enter the container's network namespace",
                    std::io::Error::last_os_error().to_string(),
                ));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CniError::new(code::IO, "cannot start a runtime", e.to_string()))?;
            rt.block_on(with_handle(f))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(CniError::new(
                code::IO,
                "netns worker panicked",
                "see stderr",
            ))
        })
    })
}

/// Opens a network namespace file (CNI_NETNS).
pub fn open_netns(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("looking up interface {name}"), e)),
    }
}

pub fn mac(l: &LinkMessage) -> Vec<u8> {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub fn is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Deletes the interface `name`; already gone is fine.
pub async fn delete_link(h: &Handle, name: &str) -> Result<(), CniError> {
    let Some(l) = link(h, name).await? else {
        return Ok(());
    };
    match h.link().del(l.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        Err(e) => Err(nl_err(format!("deleting interface {name}"), e)),
    }
}

/// Host side: creates the pair, sets its MTU and brings it up; moves the peer into `netns`.
/// Returns the host side's ifindex and MAC.
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    mtu: u32,
    netns: &File,
) -> Result<(u32, Vec<u8>), CniError> {
    h.link()
        .add(LinkVeth::new(host, peer).mtu(mtu).build())
        .execute()
        .await
        .map_err(|e| nl_err(format!("creating veth {host}"), e))?;
    let peer_link = link(h, peer)
        .await?
        .ok_or_else(|| nl_err(format!("veth peer {peer}"), "vanished after creation"))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(peer_link.header.index)
                .mtu(mtu)
                .setns_by_fd(netns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl_err(format!("moving {peer} into the container"), e))?;
    let host_link = link(h, host)
        .await?
        .ok_or_else(|| nl_err(format!("veth {host}"), "vanished after creation"))?;
    let index = host_link.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl_err(format!("bringing {host} up"), e))?;
    Ok((index, mac(&host_link)))
}

/// Host side: the route to the pod's /32 through its veth.
pub async fn add_host_route(h: &Handle, ip: Ipv4Addr, ifindex: u32) -> Result<(), CniError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(ifindex)
        .scope(RouteScope::Link)
        .build();
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(format!("adding the host route to {ip}/32"), e))
}

/// What the pod side should look like.
pub struct PodSide<'a> {
    pub temp_name: &'a str,
    pub ifname: &'a str,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub gateway_mac: &'a [u8],
    pub mtu: u32,
}

/// Inside the pod: loopback up, the interface renamed, up, with its /32, a permanent
/// neighbour for the gateway, a link route to it and the default route via it. Returns
/// the interface's MAC.
pub async fn configure_pod(h: &Handle, p: &PodSide<'_>) -> Result<Vec<u8>, CniError> {
    if let Some(lo) = link(h, "lo").await? {
        h.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(|e| nl_err("bringing lo up", e))?;
    }
    if link(h, p.ifname).await?.is_some() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("interface {} already exists in the container", p.ifname),
            "CNI_IFNAME",
        ));
    }
    let l = link(h, p.temp_name)
        .await?
        .ok_or_else(|| nl_err(format!("veth end {}", p.temp_name), "not in the container"))?;
    let index = l.header.index;
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(p.ifname.to_owned())
                .mtu(p.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl_err(format!("renaming the container's end to {}", p.ifname), e))?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl_err(format!("bringing {} up", p.ifname), e))?;
    h.address()
        .add(index, IpAddr::V4(p.ip), 32)
        .execute()
        .await
        .map_err(|e| nl_err(format!("adding {}/32", p.ip), e))?;
    h.neighbours()
        .add(index, IpAddr::V4(p.gateway))
        .link_layer_address(p.gateway_mac)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(|e| nl_err(format!("adding the gateway {} neighbour", p.gateway), e))?;
    let to_gw = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(p.gateway, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    h.route()
        .add(to_gw)
        .execute()
        .await
        .map_err(|e| nl_err(format!("adding the route to {}/32", p.gateway), e))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(p.gateway)
        .output_interface(index)
        .build();
    h.route()
        .add(default)
        .execute()
        .await
        .map_err(|e| nl_err("adding the default route", e))?;
    Ok(mac(&l))
}

/// IPv4 addresses (with prefix length) on interface `index`.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Net>, CniError> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("listing addresses", e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => {
                    Ipv4Net::new(*ip, m.header.prefix_len).ok()
                }
                _ => None,
            })
        })
        .collect())
}

/// A main-table unicast IPv4 route as CHECK compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRoute {
    pub dst: IpNet,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

pub async fn routes(h: &Handle) -> Result<Vec<SeenRoute>, CniError> {
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("listing routes", e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.kind == RouteType::Unicast && route_table(m) == MAIN_TABLE)
        .filter_map(|m| {
            Some(SeenRoute {
                dst: route_destination(m)?,
                gateway: m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                    _ => None,
                }),
                oif: m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                }),
            })
        })
        .collect())
}

/// The link-layer address of the neighbour `ip` on `index`, if there is a permanent one.
pub async fn permanent_neighbour(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
) -> Result<Option<Vec<u8>>, CniError> {
    let msgs: Vec<_> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("listing neighbours", e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
        .filter(|m| {
            m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip)
            })
        })
        .find_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
                _ => None,
            })
        }))
}

/// MTU of `name`, or of the interface the default route leaves by when `name` is unset.
pub async fn underlay_mtu(h: &Handle, name: Option<&str>) -> Result<Option<u32>, CniError> {
    if let Some(name) = name {
        let l = link(h, name).await?.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("underlay interface {name} does not exist"),
                "underlayInterface",
            )
        })?;
        return Ok(mtu(&l));
    }
    let default = IpNet::V4(Ipv4Net::default());
    let Some(oif) = routes(h)
        .await?
        .into_iter()
        .find(|r| r.dst == default)
        .and_then(|r| r.oif)
    else {
        return Ok(None);
    };
    let l = h
        .link()
        .get()
        .match_index(oif)
        .execute()
        .try_next()
        .await
        .map_err(|e| nl_err("reading the underlay interface", e))?;
    Ok(l.as_ref().and_then(mtu))
}
