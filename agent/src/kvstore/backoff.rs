//! Exponential backoff: doubles from `min` up to `max`, reset after a success.

use std::time::Duration;

/// Cilium's list retry bounds (wire-format reference §6.2 / §8).
pub const LIST_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const LIST_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Deterministic (no jitter) exponential backoff. Jitter matters when many clients hit one
/// server after an outage; an agent has one connection per remote cluster, so the
/// predictability (and testability) wins.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// The delay to wait before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
        self.failures = 0;
    }

    /// Consecutive delays handed out since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(LIST_BACKOFF_MIN, LIST_BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..13).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(50));
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[2], Duration::from_millis(200));
        assert_eq!(delays[10], Duration::from_millis(51_200));
        assert_eq!(delays[11], Duration::from_secs(60));
        assert_eq!(delays[12], Duration::from_secs(60));
        assert_eq!(b.failures(), 13);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }

    #[test]
    fn degenerate_bounds_are_sane() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
