//! Step 3: a kvstore outage alone removes nothing; losing a whole cluster moves the other
//! cluster's clients away within seconds (remote-datapath health), and they come back.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{Ctx, Step};
use crate::{
    e2e::{
        layout::{
            ECHO_PORT, EUROPE, LEDGER_PORT, USA, backend_cluster, cluster, nodes_of, pod_def,
        },
        mesh::Mesh,
        probes::{answers, by_cluster, wait_for},
        topology::run_ip,
    },
    wireguard::echo_roundtrip,
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 3,
    title: "whole-cluster loss",
    proves: "a kvstore disconnect alone removes nothing; losing usa entirely (agents, etcd, \
         underlay) moves europe's clients of an affinity-none service to europe within 3 s; \
         restarting usa brings its backends back",
    run,
};

fn run(mesh: &Mesh, ctx: &mut Ctx) -> anyhow::Result<String> {
    let vip = SocketAddr::from((cluster(EUROPE).ledger_vip, LEDGER_PORT));
    let spread = by_cluster(&mesh.probe("frontend-eu", vip, 30));
    mesh.say(&format!(
        "    europe frontend → ledger {vip} (global, affinity none): 30 connections {spread:?}"
    ));
    ensure!(
        spread.get(USA).is_some_and(|n| *n > 0) && spread.get(EUROPE).is_some_and(|n| *n > 0),
        "ledger must spread over both clusters: {spread:?}"
    );

    // (a) kvstore disconnect only: usa's etcd restarts, its nodes keep running.
    let mut long = mesh.connect_from(
        "frontend-eu",
        SocketAddr::from((pod_def("pay-a").ip, ECHO_PORT)),
    )?;
    echo_roundtrip(&mut long, b"hello usa")?;
    mesh.say("    stopping usa's etcd for 5 s (its agents and datapath keep running) …");
    mesh.stop("etcd-usa", libc::SIGTERM);
    let outage = Instant::now();
    let mut during = BTreeMap::new();
    while outage.elapsed() < Duration::from_secs(5) {
        for (k, v) in by_cluster(&mesh.probe("frontend-eu", vip, 5)) {
            *during.entry(k).or_insert(0) += v;
        }
    }
    echo_roundtrip(&mut long, b"still there").context("connection across the kvstore outage")?;
    mesh.start_etcd(USA, cluster(USA).cp_link)?;
    ensure!(
        during.get(USA).is_some_and(|n| *n > 0) && during.keys().all(|k| !k.starts_with("error")),
        "a kvstore disconnect must not remove usa backends or fail connections: {during:?}"
    );
    mesh.say(&format!(
        "    during the etcd outage: {during:?}; the long-lived connection survived"
    ));

    // (b) usa gone: agents, kvstoremesh, etcd, underlay.
    mesh.say(
        "    stopping every usa agent, usa's kvstoremesh and etcd, taking usa's underlay down …",
    );
    for n in nodes_of(USA) {
        mesh.stop(&format!("agent-{}", n.name), libc::SIGTERM);
    }
    mesh.stop("kvstoremesh-usa", libc::SIGTERM);
    mesh.stop("etcd-usa", libc::SIGTERM);
    for n in nodes_of(USA) {
        run_ip(&["-n", &mesh.router(), "link", "set", n.name, "down"])?;
    }
    let lost = Instant::now();
    // The time from which every connection went to europe (10 in a row at least).
    let mut all_europe_since: Option<Duration> = None;
    let mut streak = 0;
    let mut trail = Vec::new();
    while lost.elapsed() < Duration::from_secs(15) {
        let t = lost.elapsed();
        let a = answers(&mesh.probe("frontend-eu", vip, 1));
        let to_europe = matches!(a.first(), Some(Ok(b)) if backend_cluster(b) == EUROPE);
        trail.push(format!("{:.1}s {:?}", t.as_secs_f64(), a.first()));
        if to_europe {
            all_europe_since.get_or_insert(t);
            streak += 1;
            if streak >= 10 {
                break;
            }
        } else {
            all_europe_since = None;
            streak = 0;
        }
    }
    let result = match (all_europe_since, streak >= 10) {
        (Some(t), true) => {
            ctx.cluster_loss = Some(t);
            println!(
                "    europe stopped sending to usa {:.0} ms after usa went down",
                t.as_secs_f64() * 1e3
            );
            if t <= Duration::from_secs(3) {
                Ok(t)
            } else {
                Err(format!("took {t:?}, target ≤ 3 s"))
            }
        }
        _ => Err(format!(
            "europe kept sending to usa's dead backends for 15 s (needs remote-datapath \
             health): last probes {:?}",
            &trail[trail.len().saturating_sub(6)..]
        )),
    };

    // (c) usa comes back.
    mesh.say("    restarting usa: underlay up, etcd, kvstoremesh, agents …");
    for n in nodes_of(USA) {
        run_ip(&["-n", &mesh.router(), "link", "set", n.name, "up"])?;
    }
    mesh.start_etcd(USA, cluster(USA).cp_link)?;
    mesh.start_kvstoremesh(USA, Some(cluster(USA).id))?;
    for n in nodes_of(USA) {
        let _ = std::fs::remove_file(mesh.api_socket(n.name));
        mesh.start_agent(n.name)?;
    }
    let back = Instant::now();
    wait_for(
        "europe's ledger clients to reach usa again",
        Duration::from_secs(60),
        || {
            let c = by_cluster(&mesh.probe("frontend-eu", vip, 6));
            if c.get(USA).is_some_and(|n| *n > 0) {
                Ok(Some(()))
            } else {
                Err(format!("{c:?}"))
            }
        },
    )?;
    let restored = back.elapsed();
    println!(
        "    usa restored: europe reaches usa backends again after {:.1}s",
        restored.as_secs_f64()
    );
    match result {
        Ok(t) => Ok(format!(
            "kvstore outage removed nothing; usa loss → europe-only in {:.0} ms; restored in {:.1}s",
            t.as_secs_f64() * 1e3,
            restored.as_secs_f64()
        )),
        Err(e) => bail!("kvstore outage removed nothing (ok); cluster loss: {e}"),
    }
}
