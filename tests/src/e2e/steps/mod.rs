//! The seven steps of the scenario, one module each; `super::run` decides their order.

use std::time::Duration;

use super::{mesh::Mesh, probes::Capture};

pub(super) mod agent_restart;
pub(super) mod cluster_loss;
pub(super) mod encryption;
pub(super) mod failover;
pub(super) mod mesh_up;
pub(super) mod overlap;
pub(super) mod zero_trust;

/// A step: its number in the user's scenario, what it is called and proves, and its check
/// (a summary of the measurements, or why it failed).
pub(super) struct Step {
    pub(super) number: u8,
    pub(super) title: &'static str,
    pub(super) proves: &'static str,
    pub(super) run: fn(&Mesh, &mut Ctx) -> anyhow::Result<String>,
}

/// State carried between steps.
#[derive(Default)]
pub(super) struct Ctx {
    pub(super) synced: Duration,
    pub(super) captures: Vec<Capture>,
    pub(super) failover: Option<Duration>,
    pub(super) failback: Option<Duration>,
    pub(super) cluster_loss: Option<Duration>,
    pub(super) transcript: String,
}
