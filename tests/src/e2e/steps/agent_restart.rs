//! Step 6: an agent killed and restarted keeps existing connections and new ones working
//! (pinned maps and links, the adopted wireguard-go).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{Ctx, Step, mesh_up::mesh_complete};
use crate::{
    e2e::{
        layout::{ECHO_PORT, PAYMENT_PORT, USA, cluster, node_def, pod_def},
        mesh::Mesh,
        probes::answers,
    },
    wireguard::echo_roundtrip,
};

pub(in crate::e2e) const STEP: Step = Step {
    number: 6,
    title: "agent restart",
    proves: "a long-lived TCP connection from usa to europe survives the usa agent's restart, and \
         new connections keep working meanwhile (pinned maps and links)",
    run,
};

fn run(mesh: &Mesh, _ctx: &mut Ctx) -> anyhow::Result<String> {
    let echo_addr = SocketAddr::from((pod_def("pay-c").ip, ECHO_PORT));
    let mut long = mesh.connect_from("frontend", echo_addr)?;
    echo_roundtrip(&mut long, b"before the restart").context("long-lived connection before")?;
    mesh.say(&format!(
        "    long-lived TCP connection usa frontend → europe pay-c {echo_addr} open; \
         killing usa-1's agent (SIGKILL) and starting it again …"
    ));
    let started = Instant::now();
    mesh.stop("agent-usa-1", libc::SIGKILL);
    let _ = std::fs::remove_file(mesh.api_socket("usa-1"));
    mesh.start_agent("usa-1")?;
    // New connections while the agent is (re)starting: through the pinned socket LB
    // (payment-api VIP) and straight to a europe pod through the tunnel.
    let vip = SocketAddr::from((cluster(USA).payment_vip, PAYMENT_PORT));
    let direct = SocketAddr::from((pod_def("pay-d").ip, PAYMENT_PORT));
    let (mut ok, mut failed) = (0, Vec::new());
    let mut ready_after = None;
    while started.elapsed() < Duration::from_secs(60) {
        for target in [vip, direct] {
            for a in answers(&mesh.probe("frontend", target, 1)) {
                match a {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{target}: {e}")),
                }
            }
        }
        if let Ok(s) = mesh.status("usa-1")
            && mesh_complete(node_def("usa-1"), &s).is_ok()
        {
            ready_after = Some(started.elapsed());
            break;
        }
    }
    let ready_after = ready_after.context("the restarted usa-1 agent did not sync within 60 s")?;
    echo_roundtrip(&mut long, b"after the restart")
        .context("long-lived connection after the restart")?;
    ensure!(
        failed.is_empty(),
        "{} of {} new connections failed during the restart: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    Ok(format!(
        "agent back in sync after {:.1}s; long-lived connection kept; {ok}/{ok} new connections \
         (VIP and cross-cluster) worked meanwhile",
        ready_after.as_secs_f64()
    ))
}
