//! The scenario's outcome as the binary and the test read it: each step's result and the
//! measurements.

use std::{fmt::Write as _, time::Duration};

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u8,
    pub title: &'static str,
    pub result: Result<String, String>,
}

/// The scenario's outcome, with the measurements.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: Vec<StepReport>,
    /// Namespaces, cgroups, etcds and processes created.
    pub build: Duration,
    /// From then until every agent reported the whole mesh synced.
    pub synced: Duration,
    pub total: Duration,
    pub failover_local_to_remote: Option<Duration>,
    pub failback_remote_to_local: Option<Duration>,
    pub cluster_loss_failover: Option<Duration>,
    pub status_transcript: String,
}

impl Report {
    pub fn failed(&self) -> Vec<&StepReport> {
        self.steps.iter().filter(|s| s.result.is_err()).collect()
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            let _ = match &s.result {
                Ok(m) => writeln!(out, "  step {} {}: PASS — {m}", s.step, s.title),
                Err(e) => writeln!(out, "  step {} {}: FAIL — {e}", s.step, s.title),
            };
        }
        let _ = writeln!(
            out,
            "  mesh built in {:.1}s, synced {:.1}s later; scenario total {:.1}s",
            self.build.as_secs_f64(),
            self.synced.as_secs_f64(),
            self.total.as_secs_f64()
        );
        out
    }
}
