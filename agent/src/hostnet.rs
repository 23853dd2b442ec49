//! Read-only questions about the host's network, over rtnetlink: what route messages say
//! (table, destination), and which interface the node routes a local pod's /32 to (how a CNI
//! plugin wires each pod's host-side veth). Owns nothing in the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use rtnetlink::RouteMessageBuilder;

use crate::task::AbortOnDrop;

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum HostnetError {
    #[error("netlink connection in {netns}: {source}")]
    Connect {
        netns: String,
        source: std::io::Error,
    },
    #[error("dumping {what} in {netns}: {source}")]
    Dump {
        what: &'static str,
        netns: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("interface name of ifindex {ifindex}: {source}")]
    IfName {
        ifindex: u32,
        source: std::io::Error,
    },
}

pub fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub fn route_destination(m: &RouteMessage) -> Option<IpNet> {
    let len = m.header.destination_prefix_length;
    let addr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(a) => route_ip(a),
            _ => None,
        })
        .or(match m.header.address_family {
            AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            _ => None,
        })?;
    IpNet::new(addr, len).ok()
}

/// Interface index of the unicast route to exactly `ip/32` in the main table of the calling
/// thread's network namespace; `None` when there is none (yet). Must be called within a tokio
/// runtime: the netlink connection runs as a task on it for the duration of the call.
pub async fn host_route_ifindex(ip: Ipv4Addr) -> Result<Option<u32>, HostnetError> {
    let here = || "the current network namespace".to_owned();
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| HostnetError::Connect {
            netns: here(),
            source,
        })?;
    let _connection = AbortOnDrop(tokio::spawn(connection));
    // A dump: the kernel filters by table only with strict checking on, so filter here.
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|source| HostnetError::Dump {
            what: "routes",
            netns: here(),
            source: Box::new(source),
        })?;
    let want = IpNet::from(IpAddr::V4(ip));
    Ok(routes
        .iter()
        .filter(|m| {
            m.header.kind == RouteType::Unicast
                && route_table(m) == MAIN_TABLE
                && route_destination(m) == Some(want)
        })
        .find_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }))
}

/// Name of the interface with index `ifindex` in the calling thread's network namespace.
pub fn ifname(ifindex: u32) -> Result<String, HostnetError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes the call may write, NUL included.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return Err(HostnetError::IfName {
            ifindex,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_route_to_an_address_nothing_routes() {
        // A dump needs no privileges; nothing routes this benchmarking address as a /32.
        assert_eq!(
            host_route_ifindex(Ipv4Addr::new(198, 18, 255, 254))
                .await
                .unwrap(),
            None
        );
    }
}
