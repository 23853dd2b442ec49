//! Step 4: the cross-cluster policy lets only usa's frontend reach europe's database, and
//! `strait observe` shows the drops with identities and cluster names.

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;

use super::{Ctx, Step};
use crate::{
    datapath::Probe,
    e2e::{
        layout::{DB_PORT, EUROPE, USA, pod_cluster, pod_def},
        mesh::Mesh,
        probes::{answers, reached, wait_for},
    },
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 4,
    title: "cross-cluster zero trust",
    proves: "cross-cluster-db-access lets only usa's frontend reach europe's database; every \
         drop is visible in `strait observe` with both identities and cluster names",
    run,
};

fn run(mesh: &Mesh, _ctx: &mut Ctx) -> anyhow::Result<String> {
    let db = SocketAddr::from((pod_def("db").ip, DB_PORT));
    let allowed = mesh.probe("frontend", db, 2);
    mesh.say(&format!(
        "    usa frontend (app=frontend, cluster-usa) → europe db {db}: {:?}",
        answers(&allowed)
    ));
    ensure!(
        reached(&allowed),
        "usa frontend must reach the database: {allowed:?}"
    );
    let mut denied = Vec::new();
    for pod in ["reports", "frontend-eu"] {
        let p = mesh.probe(pod, db, 1);
        mesh.say(&format!(
            "    {pod} ({}, {}) → europe db: {:?}",
            pod_def(pod).app,
            pod_cluster(pod_def(pod)),
            answers(&p)
        ));
        ensure!(
            p.iter().all(|p| matches!(p, Probe::Err { .. })),
            "{pod} must be dropped by cross-cluster-db-access: {p:?}"
        );
        denied.push(pod);
    }
    // The drops as the db's node agent reports them.
    let flows = wait_for(
        "both drops in strait observe",
        Duration::from_secs(10),
        || {
            let flows = mesh.observe("europe-2", 200)?;
            let drop_from = |pod: &str, cluster: &str| {
                flows.iter().find(|f| {
                    f["verdict"].as_str().is_some_and(|v| v.contains("DROP"))
                        && f["source"]["address"]
                            .as_str()
                            .is_some_and(|a| a.starts_with(&format!("{}:", pod_def(pod).ip)))
                        && f["source"]["cluster"].as_str() == Some(cluster)
                        && f["destination"]["cluster"].as_str() == Some(EUROPE)
                        && f["source"]["identity"].as_u64().unwrap_or(0) > 0
                        && f["destination"]["identity"].as_u64().unwrap_or(0) > 0
                })
            };
            match (drop_from("reports", USA), drop_from("frontend-eu", EUROPE)) {
                (Some(a), Some(b)) => Ok(Some((a.clone(), b.clone()))),
                _ => Err(format!(
                    "{} flows, verdicts {:?}",
                    flows.len(),
                    flows
                        .iter()
                        .map(|f| format!(
                            "{} {}→{}",
                            f["verdict"], f["source"]["address"], f["destination"]["address"]
                        ))
                        .collect::<Vec<_>>()
                )),
            }
        },
    )?;
    println!(
        "    strait observe --json on europe-2 (the db's node):\n      {}\n      {}",
        flows.0, flows.1
    );
    Ok(
        "usa frontend allowed; usa reports and europe frontend dropped, both drops in \
         strait observe with identities and clusters"
            .into(),
    )
}
