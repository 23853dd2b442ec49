//! RFC 3339 values of heartbeats and sync canaries (`time.RFC3339` in Go: UTC, whole
//! seconds, `Z`). Readers never parse them; only their presence and change matter.

use std::time::SystemTime;

pub fn format_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn formats_like_go_rfc3339() {
        let at = |s: u64| format_rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(at(1_740_824_430), "2025-03-01T10:20:30Z");
        // Sub-second precision is dropped, as Go's layout does.
        assert_eq!(
            format_rfc3339(UNIX_EPOCH + Duration::from_millis(1_500)),
            "1970-01-01T00:00:01Z"
        );
    }
}
