//! The node's own route to a local pod: the interface the main table sends the pod's /32 to,
//! which is how a CNI plugin wires each pod's host-side veth.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteType};
use rtnetlink::RouteMessageBuilder;

use super::{MAIN_TABLE, RoutingError, destination, table};
use crate::task::AbortOnDrop;

/// Interface index of the unicast route to exactly `ip/32` in the main table of the calling
/// thread's network namespace; `None` when there is none (yet). Must be called within a tokio
/// runtime: the netlink connection runs as a task on it for the duration of the call.
pub async fn host_route_ifindex(ip: Ipv4Addr) -> Result<Option<u32>, RoutingError> {
    let here = || "the current network namespace".to_owned();
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| RoutingError::Connect {
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
        .map_err(|source| RoutingError::Dump {
            what: "routes",
            netns: here(),
            source: Box::new(source),
        })?;
    let want = IpNet::from(IpAddr::V4(ip));
    Ok(routes
        .iter()
        .filter(|m| {
            m.header.kind == RouteType::Unicast
                && table(m) == MAIN_TABLE
                && destination(m) == Some(want)
        })
        .find_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }))
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
