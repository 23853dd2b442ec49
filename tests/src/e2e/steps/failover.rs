//! Step 2: a global service with affinity local fails over to the remote cluster when its
//! local backends are gone, and back when they return (both measured).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};

use super::{Ctx, Step};
use crate::e2e::{
    layout::{EUROPE, PAYMENT_PORT, USA, backend_cluster, cluster},
    mesh::Mesh,
    probes::{answers, by_cluster},
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 2,
    title: "global service failover (affinity local)",
    proves: "a usa client of payment-api stays in usa while a usa backend is ready, moves to \
         europe when none is, and comes back when they return",
    run,
};

fn run(mesh: &Mesh, ctx: &mut Ctx) -> anyhow::Result<String> {
    let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
    let before = mesh.probe("frontend", vip, 20);
    let counts = by_cluster(&before);
    mesh.say(&format!(
        "    usa frontend → payment-api {vip}: 20 connections, by backend cluster {counts:?}"
    ));
    ensure!(
        counts.get(USA) == Some(&20),
        "with usa backends ready every connection must stay in usa: {counts:?}"
    );
    mesh.say("    removing every usa backend from payment-api's EndpointSlice …");
    let failover = switch(
        mesh,
        vip,
        Vec::new(),
        EUROPE,
        &mut ctx.failover,
        "with no usa backend every connection must go to europe",
    )?;
    println!(
        "    failover usa → europe: {:.0} ms after the last usa backend left the EndpointSlice",
        failover.as_secs_f64() * 1e3
    );
    mesh.say("    restoring the usa backends …");
    let failback = switch(
        mesh,
        vip,
        mesh.backends(USA),
        USA,
        &mut ctx.failback,
        "usa backends are back: every connection must stay local again",
    )?;
    println!(
        "    failback europe → usa: {:.0} ms after the usa backends returned",
        failback.as_secs_f64() * 1e3
    );
    ensure!(
        failover < Duration::from_secs(1),
        "failover took {failover:?}, target < 1 s"
    );
    Ok(format!(
        "20/20 local before, failover {:.0} ms, 20/20 europe, failback {:.0} ms, 20/20 local",
        failover.as_secs_f64() * 1e3,
        failback.as_secs_f64() * 1e3
    ))
}

/// Sets usa's payment-api backends and times (into `measured`, kept even if the check after
/// fails) how long until usa's frontend is answered from `to`; then all of 20 connections
/// must be (`rule` says why).
fn switch(
    mesh: &Mesh,
    vip: SocketAddr,
    backends: Vec<Ipv4Addr>,
    to: &str,
    measured: &mut Option<Duration>,
    rule: &str,
) -> anyhow::Result<Duration> {
    let since = Instant::now();
    mesh.set_payment_backends(USA, backends)?;
    let took = time_until(mesh, "frontend", vip, to, Duration::from_secs(10), since)?;
    *measured = Some(took);
    let counts = by_cluster(&mesh.probe("frontend", vip, 20));
    ensure!(counts.get(to) == Some(&20), "{rule}: {counts:?}");
    Ok(took)
}

/// Probes `target` from `pod` one connection at a time until one is answered by a backend
/// of `cluster`; returns the time since `since`.
fn time_until(
    mesh: &Mesh,
    pod: &str,
    target: SocketAddr,
    cluster: &str,
    timeout: Duration,
    since: Instant,
) -> anyhow::Result<Duration> {
    let mut seen = Vec::new();
    while since.elapsed() < timeout {
        let p = mesh.probe(pod, target, 1);
        if let Some(Ok(b)) = answers(&p).first()
            && backend_cluster(b) == cluster
        {
            return Ok(since.elapsed());
        }
        seen.extend(answers(&p));
    }
    bail!(
        "no connection from {pod} to {target} reached {cluster} within {timeout:?} (answers: {:?})",
        &seen[seen.len().saturating_sub(5)..]
    )
}
