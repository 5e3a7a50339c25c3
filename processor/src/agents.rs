//! What the processor knows of each agent: the sequence numbers it has fed, and the agent's
//! event-time watermark, from which the allowed lateness is measured.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// One agent's deduplication and event-time state, kept by the worker that owns its partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// Every sequence up to `floor` has been fed (or is older than the first one seen).
    pub floor: i64,
    /// Sequences above `floor` that have been fed.
    pub above: BTreeSet<i64>,
    /// The latest event time seen from this agent, in ms (`i64::MIN` before any).
    pub watermark_ms: i64,
}

impl AgentState {
    /// A state that has seen nothing.
    pub fn new() -> Self {
        Self {
            watermark_ms: i64::MIN,
            ..Self::default()
        }
    }

    /// Whether `seq` is new; records it. An agent sends in order on one partition, so the
    /// first sequence seen sets the floor and anything below it is a resend.
    pub fn first_time(&mut self, seq: i64) -> bool {
        if self.floor == 0 && self.above.is_empty() {
            self.floor = seq - 1;
        }
        if seq <= self.floor || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        true
    }

    /// The earliest event time still accepted: the watermark less the allowed lateness.
    pub fn horizon_ms(&self, allowed_lateness_ms: i64) -> i64 {
        self.watermark_ms.saturating_sub(allowed_lateness_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::AgentState;

    #[test]
    fn sequences_are_seen_once() {
        let mut s = AgentState::new();
        assert!(s.first_time(5));
        assert!(!s.first_time(5));
        assert!(s.first_time(7));
        assert!(s.first_time(6));
        assert!(!s.first_time(7));
        assert!(!s.first_time(3), "below the first sequence seen: a resend");
        assert_eq!(
            (s.floor, s.above.len()),
            (7, 0),
            "contiguous sequences compact"
        );
    }

    #[test]
    fn the_horizon_trails_the_watermark_by_the_lateness() {
        let mut s = AgentState::new();
        assert_eq!(
            s.horizon_ms(60_000),
            i64::MIN,
            "nothing is late before any sample"
        );
        s.watermark_ms = 600_000;
        assert_eq!(s.horizon_ms(60_000), 540_000);
    }
}
