//! Logging failed requests without flooding the log: a GPU fault fails every request after
//! it, and one warning each would bury the first (the one that says what happened) and
//! cost a log write per request.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest time between two lines about one run of failures. Not measured: long enough
/// that a failing device at full request rate logs a few lines a minute, short enough
/// that an operator watching the log sees it is still failing.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Failures seen since the last line logged.
#[derive(Default)]
struct Held {
    /// When the last line was logged.
    since: Option<Instant>,
    count: u64,
    first_offset: u64,
    last_offset: u64,
    last_message: String,
}

/// Rate-limits the log lines of failed requests: the first failure is logged at once; the
/// ones after it within [`SUMMARY_INTERVAL`] are counted, and the next failure after the
/// interval logs their count with the first and last offset. The error counters (status,
/// metrics) count every failure.
#[derive(Default)]
pub struct ErrorLog {
    held: Mutex<Held>,
}

impl ErrorLog {
    /// A log with nothing held.
    pub const fn new() -> Self {
        ErrorLog {
            held: Mutex::new(Held {
                since: None,
                count: 0,
                first_offset: 0,
                last_offset: 0,
                last_message: String::new(),
            }),
        }
    }

    /// Records a failure of the request at `offset`, logging a warning when it is due.
    pub fn record(&self, offset: u64, message: &str) {
        for line in self.record_at(Instant::now(), offset, message) {
            tracing::warn!("{line}");
        }
    }

    /// The lines to log for a failure at `now` (the summary of those held, then this one),
    /// or none while they are held back.
    pub fn record_at(&self, now: Instant, offset: u64, message: &str) -> Vec<String> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let due = held
            .since
            .is_none_or(|t| now.duration_since(t) >= SUMMARY_INTERVAL);
        if !due {
            if held.count == 0 {
                held.first_offset = offset;
            }
            held.count += 1;
            held.last_offset = offset;
            held.last_message = message.to_string();
            return Vec::new();
        }
        let mut lines = Vec::new();
        if held.count > 0 {
            lines.push(format!(
                "{} more requests failed in the last {} s (offsets {} to {}); the last: {}",
                held.count,
                now.duration_since(held.since.unwrap_or(now)).as_secs(),
                held.first_offset,
                held.last_offset,
                held.last_message
            ));
        }
        lines.push(format!("request at offset {offset} failed: {message}"));
        *held = Held {
            since: Some(now),
            ..Held::default()
        };
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_a_count_per_interval() {
        let log = ErrorLog::new();
        let t0 = Instant::now();
        let first = log.record_at(t0, 4096, "GPU 0: an illegal memory access");
        assert_eq!(first.len(), 1);
        assert!(first[0].contains("offset 4096") && first[0].contains("illegal"));
        for i in 1..=1000u64 {
            let at = t0 + Duration::from_millis(i * 5);
            assert!(
                log.record_at(at, 4096 * (i + 1), "same").is_empty(),
                "line {i}"
            );
        }
        let later = log.record_at(t0 + SUMMARY_INTERVAL, 1 << 30, "same");
        assert_eq!(later.len(), 2, "{later:?}");
        assert!(
            later[0].starts_with("1000 more requests failed")
                && later[0].contains("offsets 8192 to 4100096"),
            "{later:?}"
        );
        assert!(later[1].contains(&format!("offset {}", 1u64 << 30)));
        // A failure long after: logged alone, nothing held.
        let lone = log.record_at(t0 + 5 * SUMMARY_INTERVAL, 0, "again");
        assert_eq!(lone.len(), 1, "{lone:?}");
    }
}
