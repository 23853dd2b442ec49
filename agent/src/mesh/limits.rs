//! What one remote cluster may make the agent hold: keys per kind and bytes per value. A key
//! over a cap is refused (not stored, counted, shown in the cluster's status); keys already
//! held still update, deletes always apply and free room, other kinds keep syncing. Refusals
//! are logged at most [`LOG_LINES_PER_MINUTE`] times per cluster per minute.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::wire::DataKind;

/// Rejection log lines per cluster per minute; beyond that, one "… and K more" line.
pub const LOG_LINES_PER_MINUTE: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// `clustermesh: {limits: …}` — caps per remote cluster, sized for 100k endpoints per
/// cluster (Cilium's own defaults are far smaller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RemoteLimits {
    pub max_nodes: usize,
    /// ipcache entries (one per endpoint IP).
    pub max_endpoints: usize,
    pub max_identities: usize,
    pub max_services: usize,
    pub max_value_bytes: usize,
}

impl Default for RemoteLimits {
    fn default() -> Self {
        Self {
            max_nodes: 5_000,
            max_endpoints: 200_000,
            max_identities: 65_536,
            max_services: 10_000,
            max_value_bytes: 64 * 1024,
        }
    }
}

impl RemoteLimits {
    /// The cap on keys held of `kind`, with its config name.
    pub fn max_keys(&self, kind: DataKind) -> Option<(usize, &'static str)> {
        match kind {
            DataKind::Nodes => Some((self.max_nodes, "maxNodes")),
            DataKind::IpCache => Some((self.max_endpoints, "maxEndpoints")),
            DataKind::Identities => Some((self.max_identities, "maxIdentities")),
            DataKind::Services => Some((self.max_services, "maxServices")),
            DataKind::ServiceExports => None,
        }
    }

    /// Whether a value of `size` bytes may be stored for a key that is `held` already, when
    /// `count` keys of `kind` are held.
    pub fn admit(
        &self,
        kind: DataKind,
        held: bool,
        count: usize,
        size: usize,
    ) -> Result<(), LimitError> {
        if size > self.max_value_bytes {
            return Err(LimitError::ValueTooLarge {
                size,
                max: self.max_value_bytes,
            });
        }
        match self.max_keys(kind) {
            Some((max, name)) if !held && count >= max => Err(LimitError::OverLimit { name, max }),
            _ => Ok(()),
        }
    }
}

/// Why a key was refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{name} ({max}) reached: key refused")]
    OverLimit { name: &'static str, max: usize },
    #[error("value of {size} bytes exceeds maxValueBytes ({max})")]
    ValueTooLarge { size: usize, max: usize },
}

impl LimitError {
    /// The `reason` label of `strait_kvstore_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::OverLimit { .. } => "over-limit",
            LimitError::ValueTooLarge { .. } => "value-too-large",
        }
    }
}

/// Keys refused by a limit right now, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    pub over_limit: usize,
    pub too_large: usize,
}

/// One cluster's limits and what they refuse, shared by its kinds' syncs and its status.
#[derive(Debug)]
pub struct ClusterLimits {
    /// `None` for our own cluster's kvstore, which is trusted to be sized by its operator.
    pub limits: Option<RemoteLimits>,
    refused: Mutex<BTreeMap<DataKind, Refused>>,
    log: LogBudget,
}

impl ClusterLimits {
    pub fn new(limits: Option<RemoteLimits>) -> Self {
        Self {
            limits,
            refused: Mutex::default(),
            log: LogBudget::new(LOG_LINES_PER_MINUTE),
        }
    }

    pub fn set_refused(&self, kind: DataKind, refused: Refused) {
        let mut map = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused == Refused::default() {
            map.remove(&kind);
        } else {
            map.insert(kind, refused);
        }
    }

    /// For the cluster's status: what is refused, e.g. "limits exceeded: identities: 5 keys
    /// over maxIdentities (10)". `None` when nothing is.
    pub fn summary(&self) -> Option<String> {
        let limits = self.limits?;
        let map = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let parts: Vec<String> = map
            .iter()
            .flat_map(|(kind, r)| {
                let over =
                    limits
                        .max_keys(*kind)
                        .filter(|_| r.over_limit > 0)
                        .map(|(max, name)| {
                            format!("{kind}: {} keys over {name} ({max})", r.over_limit)
                        });
                let large = (r.too_large > 0).then(|| {
                    format!(
                        "{kind}: {} values over maxValueBytes ({})",
                        r.too_large, limits.max_value_bytes
                    )
                });
                over.into_iter().chain(large)
            })
            .collect();
        (!parts.is_empty()).then(|| format!("limits exceeded: {}", parts.join("; ")))
    }

    /// Whether a rejection may be logged now; see [`LogBudget::admit`].
    pub fn log_admit(&self) -> LogAdmit {
        self.log.admit(Instant::now())
    }
}

/// What [`LogBudget::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAdmit {
    /// Log the line; first say that `suppressed` lines of the last window were left out.
    Log { suppressed: u64 },
    /// Over the budget: counted for the next summary.
    Suppress,
}

/// At most `per_window` lines per minute; what is left out is summed up when the next
/// window's first line is logged.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_window: u32) -> Self {
        Self {
            per_window,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn admit(&self, now: Instant) -> LogAdmit {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= LOG_WINDOW) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= self.per_window {
            w.suppressed += 1;
            return LogAdmit::Suppress;
        }
        w.logged += 1;
        LogAdmit::Log {
            suppressed: std::mem::take(&mut w.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RemoteLimits {
        RemoteLimits {
            max_identities: 2,
            max_value_bytes: 10,
            ..RemoteLimits::default()
        }
    }

    #[test]
    fn over_the_cap_is_refused_but_held_keys_update() {
        let l = small();
        assert_eq!(l.admit(DataKind::Identities, false, 1, 5), Ok(()));
        assert_eq!(
            l.admit(DataKind::Identities, false, 2, 5),
            Err(LimitError::OverLimit {
                name: "maxIdentities",
                max: 2
            })
        );
        assert_eq!(l.admit(DataKind::Identities, true, 2, 5), Ok(()));
        // Other kinds have their own caps.
        assert_eq!(l.admit(DataKind::Nodes, false, 2, 5), Ok(()));
    }

    #[test]
    fn oversized_values_are_refused_even_for_held_keys() {
        let err = small().admit(DataKind::Nodes, true, 0, 11).unwrap_err();
        assert_eq!(err, LimitError::ValueTooLarge { size: 11, max: 10 });
        assert_eq!(err.reason(), "value-too-large");
    }

    #[test]
    fn summary_names_kind_count_and_limit() {
        let c = ClusterLimits::new(Some(small()));
        assert_eq!(c.summary(), None);
        c.set_refused(
            DataKind::Identities,
            Refused {
                over_limit: 3,
                too_large: 1,
            },
        );
        assert_eq!(
            c.summary().unwrap(),
            "limits exceeded: identities: 3 keys over maxIdentities (2); identities: 1 values over maxValueBytes (10)"
        );
        c.set_refused(DataKind::Identities, Refused::default());
        assert_eq!(c.summary(), None);
    }

    #[test]
    fn log_budget_limits_lines_per_minute_and_sums_up_the_rest() {
        let b = LogBudget::new(2);
        let t = Instant::now();
        assert_eq!(b.admit(t), LogAdmit::Log { suppressed: 0 });
        assert_eq!(b.admit(t), LogAdmit::Log { suppressed: 0 });
        for _ in 0..5 {
            assert_eq!(b.admit(t + Duration::from_secs(30)), LogAdmit::Suppress);
        }
        assert_eq!(
            b.admit(t + Duration::from_secs(61)),
            LogAdmit::Log { suppressed: 5 }
        );
        assert_eq!(
            b.admit(t + Duration::from_secs(62)),
            LogAdmit::Log { suppressed: 0 }
        );
    }
}
