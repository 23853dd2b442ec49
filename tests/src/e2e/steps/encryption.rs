//! Step 5: the router's captures since step 1 hold only WireGuard, control-plane etcd and
//! health-probe traffic; no pod or service address crossed the underlay in clear.

use std::net::Ipv4Addr;

use anyhow::ensure;

use super::{Ctx, Step};
use crate::e2e::{
    WG_PORT,
    layout::{MARS_NODE_LINK, NODES, underlay_ip},
    mesh::Mesh,
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 5,
    title: "encryption on the underlay",
    proves: "everything that crossed the underlay during steps 1-7 was WireGuard (UDP 51871) \
         between nodes or control-plane etcd traffic; no pod address in clear",
    run,
};

fn run(_mesh: &Mesh, ctx: &mut Ctx) -> anyhow::Result<String> {
    // mars' node too: usa's agents probe it while it is connected (refused or not).
    let nodes: Vec<Ipv4Addr> = NODES
        .iter()
        .map(|n| underlay_ip(n.link))
        .chain([underlay_ip(MARS_NODE_LINK)])
        .collect();
    let mut out = Vec::new();
    let mut total = UnderlayCounts::default();
    for capture in ctx.captures.drain(..) {
        let iface = capture.iface.clone();
        let lines = capture.finish()?;
        let c = check_underlay(&lines, &nodes)
            .map_err(|e| anyhow::anyhow!("underlay link {iface}: {e}"))?;
        ensure!(c.wireguard > 0, "no WireGuard packet at all on {iface}");
        out.push(format!(
            "{iface}: {} wg, {} etcd, {} health",
            c.wireguard, c.control_plane, c.health
        ));
        total.wireguard += c.wireguard;
        total.control_plane += c.control_plane;
        total.health += c.health;
    }
    println!("    captured on the router: {}", out.join("; "));
    Ok(format!(
        "{} WireGuard packets (UDP {WG_PORT}) between nodes, {} control-plane etcd packets, \
         {} health probes (UDP {}, node addresses only), 0 packets with a pod or service \
         address in clear",
        total.wireguard,
        total.control_plane,
        total.health,
        strait::health::HEALTH_PORT
    ))
}

/// Underlay packet counts by kind.
#[derive(Debug, Default, Clone, Copy)]
struct UnderlayCounts {
    wireguard: usize,
    /// Node or control plane talking to an etcd (port 2379).
    control_plane: usize,
    /// strait's remote-datapath health probes between node addresses (UDP 4241): node
    /// addresses and a magic only, no pod address.
    health: usize,
}

/// Classifies captured underlay packets: WireGuard between nodes, control-plane etcd traffic,
/// health probes between nodes, or a violation (anything else, and any packet naming a pod or
/// service address).
fn check_underlay(lines: &[String], nodes: &[Ipv4Addr]) -> Result<UnderlayCounts, String> {
    let wg: Vec<String> = nodes.iter().map(|ip| format!("{ip}.{WG_PORT}")).collect();
    let health: Vec<String> = nodes
        .iter()
        .map(|ip| format!("{ip}.{}", strait::health::HEALTH_PORT))
        .collect();
    // An address with or without a port (`198.18.11.2.4241`, `198.18.11.2`).
    let node_addr = |a: &str| {
        nodes
            .iter()
            .any(|ip| a == ip.to_string() || a.starts_with(&format!("{ip}.")))
    };
    let mut counts = UnderlayCounts::default();
    for line in lines {
        let packet = line.split_once(' ').map_or(line.as_str(), |(_, p)| p);
        if packet.contains(" 10.") || packet.starts_with("10.") {
            return Err(format!(
                "a pod or service address crossed the underlay in clear: {line}"
            ));
        }
        if packet.contains("ARP, ") {
            continue;
        }
        let Some(rest) = packet.strip_prefix("IP ") else {
            return Err(format!("unexpected non-IP packet: {line}"));
        };
        let mut w = rest.split_whitespace();
        let (src, _, dst) = (
            w.next().unwrap_or(""),
            w.next(),
            w.next().unwrap_or("").trim_end_matches(':'),
        );
        let udp = rest.contains("UDP");
        if wg.iter().any(|e| e == src) && wg.iter().any(|e| e == dst) && udp {
            counts.wireguard += 1;
        } else if src.ends_with(".2379") || dst.ends_with(".2379") {
            counts.control_plane += 1;
        } else if (udp
            && node_addr(src)
            && node_addr(dst)
            && (health.iter().any(|h| h == src) || health.iter().any(|h| h == dst)))
            || (rest.contains("ICMP")
                && node_addr(src)
                && node_addr(dst)
                && rest.contains(&format!(
                    "udp port {} unreachable",
                    strait::health::HEALTH_PORT
                )))
        {
            // A probe, its answer, or the kernel's "port unreachable" while an agent restarts.
            counts.health += 1;
        } else {
            return Err(format!(
                "neither WireGuard, control-plane nor health-probe traffic: {line}"
            ));
        }
    }
    Ok(counts)
}
