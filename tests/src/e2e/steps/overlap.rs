//! Step 7: a third cluster whose pod CIDR overlaps usa's is refused by name, and the mesh
//! keeps working; it is disconnected again afterwards.

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;

use super::{Ctx, Step};
use crate::e2e::{
    layout::{
        MARS, MARS_CP_LINK, MARS_ID, MARS_NODE_LINK, MARS_POD_CIDR, PAYMENT_PORT, USA, cluster,
        pod_def, underlay_ip,
    },
    mesh::{Mesh, indent},
    probes::{by_cluster, reached, wait_for},
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 7,
    title: "overlapping cluster refused",
    proves: "a third cluster whose pod CIDR overlaps usa's is refused with an error naming both; \
         usa and europe keep working",
    run,
};

fn run(mesh: &Mesh, _ctx: &mut Ctx) -> anyhow::Result<String> {
    mesh.say(&format!(
        "    cluster-mars (id {MARS_ID}): its own etcd and kvstoremesh, one node with pod CIDR \
         {MARS_POD_CIDR} (mars reused usa's 10.1.0.0/16; usa-1 has that /24); connecting it \
         to usa …"
    ));
    mesh.control_plane(MARS, MARS_CP_LINK)?;
    mesh.start_kvstoremesh(MARS, Some(MARS_ID))?;
    mesh.add_member("mars-1", MARS_NODE_LINK)?;
    let ndir = mesh.node_dir("mars-1");
    std::fs::create_dir_all(ndir.join("state"))?;
    let cdir = mesh.cluster_dir(MARS);
    std::fs::write(
        ndir.join("agent.yaml"),
        format!(
            "cluster: {{name: {MARS}, id: {MARS_ID}}}\nnode: {{name: mars-1, internalIP: {}, podCIDRs: [{MARS_POD_CIDR}]}}\n\
             kvstoreConfig: {}\nclustermeshConfigDir: {}\nstateDir: {}\napiSocket: {}\nwireguard: {{enabled: false}}\n",
            underlay_ip(MARS_NODE_LINK),
            cdir.join("etcd.yaml").display(),
            cdir.join("clustermesh.d").display(),
            ndir.join("state").display(),
            mesh.api_socket("mars-1").display(),
        ),
    )?;
    mesh.start_agent("mars-1")?;
    mesh.connect(USA, MARS, MARS_CP_LINK)?;
    let status = wait_for(
        "usa-1 to refuse cluster-mars",
        Duration::from_secs(30),
        || {
            let s = mesh.status("usa-1")?;
            let mars = s
                .cluster_mesh
                .clusters
                .iter()
                .find(|c| c.name == MARS)
                .cloned();
            match mars {
                Some(m)
                    if m.error.as_deref().is_some_and(|e| {
                        e.contains(MARS) && e.contains(USA) && e.contains(MARS_POD_CIDR)
                    }) =>
                {
                    Ok(Some(m))
                }
                other => Err(format!("cluster-mars: {other:?}")),
            }
        },
    )?;
    let error = status.error.clone().unwrap_or_default();
    println!("    usa-1 status for cluster-mars: {}", error);
    let logged = std::fs::read_to_string(mesh.log_path("agent-usa-1"))?
        .lines()
        .any(|l| l.contains(MARS) && l.contains(USA) && l.contains("overlap"));
    ensure!(logged, "usa-1's log does not name the overlap");
    let text = mesh.status_text("usa-1");
    mesh.say(&indent(&format!("$ strait status   (usa-1)\n{text}")));
    // The mesh keeps working.
    let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
    let p = by_cluster(&mesh.probe("frontend", vip, 5));
    ensure!(
        p.get(USA) == Some(&5),
        "usa payment-api after the refusal: {p:?}"
    );
    let cross = mesh.probe(
        "frontend",
        SocketAddr::from((pod_def("pay-c").ip, PAYMENT_PORT)),
        3,
    );
    ensure!(reached(&cross), "usa → europe after the refusal: {cross:?}");
    let eu = mesh.status("europe-1").map_err(anyhow::Error::msg)?;
    ensure!(
        eu.cluster_mesh
            .clusters
            .iter()
            .any(|c| c.name == USA && c.ready),
        "europe-1 lost usa: {eu:?}"
    );
    // Disconnect mars again (its cache drains) so the rest runs on the two clusters.
    let _ = std::fs::remove_file(mesh.cluster_dir(USA).join("clustermesh.d").join(MARS));
    let _ = std::fs::remove_file(mesh.cluster_dir(USA).join("kvstoremesh.d").join(MARS));
    mesh.stop("agent-mars-1", libc::SIGTERM);
    mesh.stop("kvstoremesh-mars", libc::SIGTERM);
    mesh.stop("etcd-mars", libc::SIGTERM);
    Ok(format!("refused: {error}; usa and europe unaffected"))
}
