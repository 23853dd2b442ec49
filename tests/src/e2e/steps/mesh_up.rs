//! Step 1: every agent sees the whole mesh (both clusters synced, the remote one through
//! KVStoreMesh), and pods reach across clusters. Starts the underlay captures step 5 checks.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::ensure;
use strait::status::AgentStatus;

use super::{Ctx, Step};
use crate::e2e::{
    layout::{EUROPE, NODES, NodeDef, PAYMENT_PORT, PODS, USA, pod_cluster, pod_def},
    mesh::{Mesh, indent},
    probes::{Capture, reached, wait_for},
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 1,
    title: "mesh up",
    proves: "every agent reads both clusters (the remote one through its own cluster's \
         KVStoreMesh cache) and counts the right nodes, endpoints, identities and services",
    run,
};

fn run(mesh: &Mesh, ctx: &mut Ctx) -> anyhow::Result<String> {
    // Captures start first: everything from here on crosses a watched underlay.
    for n in &NODES {
        ctx.captures.push(Capture::start(mesh, n.name)?);
    }
    mesh.say("    waiting for every agent to report both clusters synced …");
    let start = Instant::now();
    let mut last = BTreeMap::new();
    let statuses = wait_for(
        "every agent synced with the mesh",
        Duration::from_secs(90),
        || {
            let mut all = Vec::new();
            for n in &NODES {
                let s = match mesh.status(n.name) {
                    Ok(s) => s,
                    Err(e) => {
                        last.insert(n.name, e.clone());
                        return Err(format!("{}: {e}", n.name));
                    }
                };
                if let Err(e) = mesh_complete(n, &s) {
                    last.insert(n.name, e.clone());
                    return Err(format!("{}: {e}", n.name));
                }
                all.push(s);
            }
            Ok(Some(all))
        },
    )?;
    ctx.synced = start.elapsed();
    let mut transcript = String::new();
    for n in &NODES {
        let _ = writeln!(
            transcript,
            "$ ip netns exec {} strait status\n{}",
            mesh.ns(n.name),
            mesh.status_text(n.name)
        );
    }
    let _ = writeln!(
        transcript,
        "$ strait status --json   (usa-1, cluster-mesh part)\n{}",
        serde_json::to_string_pretty(&serde_json::to_value(&statuses[0].cluster_mesh)?)?
    );
    println!("{}", indent(&transcript));
    ctx.transcript = transcript;
    // Pod to pod across clusters, through the tunnel.
    let probes = mesh.probe(
        "frontend",
        SocketAddr::from((pod_def("pay-c").ip, PAYMENT_PORT)),
        3,
    );
    ensure!(
        reached(&probes),
        "usa frontend cannot reach europe's pay-c directly: {probes:?}"
    );
    Ok(format!(
        "4 agents synced {:.1}s after start-up; usa frontend → europe pay-c over WireGuard",
        ctx.synced.as_secs_f64()
    ))
}

/// Checks one agent's status against the scenario: its own cluster synced with two nodes,
/// the other cluster ready and synced through KVStoreMesh with its nodes, endpoints,
/// identities and services.
pub(super) fn mesh_complete(n: &NodeDef, s: &AgentStatus) -> Result<(), String> {
    let other = if n.cluster == USA { EUROPE } else { USA };
    let c = &s.cluster;
    if !c.kvstore_synced || c.num_nodes != 2 {
        return Err(format!(
            "local: synced {} nodes {}",
            c.kvstore_synced, c.num_nodes
        ));
    }
    let local_pods = PODS.iter().filter(|p| pod_cluster(p) == n.cluster).count();
    if c.num_endpoints != local_pods {
        return Err(format!(
            "local endpoints {} != {local_pods}",
            c.num_endpoints
        ));
    }
    let Some(r) = s.cluster_mesh.clusters.iter().find(|r| r.name == other) else {
        return Err(format!("{other} not listed"));
    };
    let remote_pods = PODS.iter().filter(|p| pod_cluster(p) == other).count();
    let kvstoremesh = r.config.as_ref().is_some_and(|c| c.kvstoremesh);
    let synced = r.synced.nodes && r.synced.endpoints && r.synced.identities && r.synced.services;
    if !(r.ready && synced && kvstoremesh)
        || r.num_nodes != 2
        || r.num_endpoints != remote_pods
        || r.num_identities != 3
        || r.num_shared_services != 2
        || s.cluster_mesh.num_global_services != 2
    {
        return Err(format!(
            "{other}: ready {} synced {:?} kvstoremesh {kvstoremesh} nodes {} endpoints {} identities {} services {} global {}",
            r.ready,
            r.synced,
            r.num_nodes,
            r.num_endpoints,
            r.num_identities,
            r.num_shared_services,
            s.cluster_mesh.num_global_services
        ));
    }
    let peers = s.encryption.as_ref().map_or(0, |e| e.peers.len());
    if peers != NODES.len() - 1 {
        return Err(format!("{peers} WireGuard peers, want {}", NODES.len() - 1));
    }
    Ok(())
}
