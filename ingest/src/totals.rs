//! Running totals: counters that count since something other than the container they are
//! attributed to (SPEC: counter scopes), turned into per-holder counters that start at zero.
//!
//! A cgroup's CPU seconds start at zero with the container, so the processor may count a new
//! series' first reading in full. A GPU board's energy (NVML, dcgm-exporter) is the board's total
//! since its driver loaded, and a pod's network bytes are its network namespace's since the
//! pod started: sent as they are, every new holder would be billed the board's lifetime energy,
//! and every container restart the pod's lifetime traffic. So the agent differences each such
//! total per thing counted (the board, the pod) and sends each holder a counter of its own
//! share, which starts at zero:
//!
//! - **first sight** of a board is a baseline: nothing before it is anyone's. A pod's network
//!   namespace seen first is counted in full only when the pod started (`status.startTime`, whole
//!   seconds) at or after this agent's first tick, so no earlier agent can have counted it;
//!   otherwise it is a baseline too. An agent restart therefore loses at most the increase
//!   between the last reading before it and the first after it, and never bills one twice.
//! - **a board's increase** between two readings goes to its holder only when the same
//!   container held the whole board at both readings; otherwise (idle, changing hands, split
//!   into MIG instances, whose holders SPEC keeps board energy off) it is the node's, for the
//!   operator, and never a tenant's. A holder is thus billed exactly the energy the board used
//!   between two readings that both fall in its run: what it used in its first and last partial
//!   interval is not billed (at most one collection interval each).
//! - **a pod's increase** goes to the container that carries the pod's network readings now
//!   (the bytes are the pod's, whichever container restarted).
//! - **a total that went down** (a driver reload, a pod recreated under the same name) counts
//!   from zero there: the increase is the new reading.
//!
//! A holder's counter restarts at zero with the agent: the processor reads the lower value as a
//! reset and counts the new reading, which holds only what this agent attributed since.

use std::collections::BTreeMap;

use meterflow_schemas::SeriesId;

use crate::sources::Scope;

/// The last reading of one running total.
#[derive(Debug, Clone)]
struct Last {
    value: f64,
    holder: Option<SeriesId>,
    at_ms: i64,
}

/// What one reading of a running total gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    /// The holder's counter to send (its share since the agent first attributed to it);
    /// `None` without a holder.
    pub sent: Option<f64>,
    /// The increase no holder gets.
    pub unheld: f64,
}

/// The running totals of one node and each holder's share of them.
#[derive(Debug, Default)]
pub struct RunningTotals {
    /// The agent's first tick.
    since_ms: Option<i64>,
    /// By (scope, metric).
    last: BTreeMap<(Scope, String), Last>,
    /// Each holder's counter by (series, metric), and when it last changed hands.
    carried: BTreeMap<(SeriesId, String), (f64, i64)>,
}

impl RunningTotals {
    /// Notes the agent's first tick (later calls change nothing).
    pub fn start(&mut self, now_ms: i64) {
        self.since_ms.get_or_insert(now_ms);
    }

    /// Takes a reading `value` of the running total `scope` × `metric` at `now_ms`, held by
    /// `holder` (the series its readings are attributed to now, if any); `pod_started_ms` is the
    /// pod's start, for a pod's total.
    pub fn reading(
        &mut self,
        scope: &Scope,
        metric: &str,
        value: f64,
        holder: Option<&SeriesId>,
        pod_started_ms: Option<i64>,
        now_ms: i64,
    ) -> Carry {
        let key = (scope.clone(), metric.to_string());
        let last = self.last.get(&key);
        let increase = match last {
            Some(last) if value >= last.value => value - last.value,
            // Restarted from zero since the last reading.
            Some(_) => value,
            None => match (scope, pod_started_ms, self.since_ms) {
                (Scope::Pod(_), Some(started), Some(since)) if started >= since => value,
                _ => 0.0,
            },
        };
        let same_holder = last.is_some_and(|l| l.holder.as_ref() == holder);
        let share = match (holder, scope) {
            (None, _) => None,
            (Some(_), Scope::Board(_)) if !same_holder => Some(0.0),
            (Some(_), _) => Some(increase),
        };
        self.last.insert(
            key,
            Last {
                value,
                holder: holder.cloned(),
                at_ms: now_ms,
            },
        );
        let sent = holder.zip(share).map(|(h, share)| {
            let carried = self
                .carried
                .entry((h.clone(), metric.to_string()))
                .or_insert((0.0, now_ms));
            carried.0 += share;
            carried.1 = now_ms;
            carried.0
        });
        Carry {
            unheld: increase - share.unwrap_or(0.0),
            sent,
        }
    }

    /// Forgets totals and holders not read since `cutoff_ms`: a total read again after that is a
    /// new baseline (what it counted meanwhile is no one's), a holder's counter starts again.
    pub fn forget_before(&mut self, cutoff_ms: i64) {
        self.last.retain(|_, l| l.at_ms >= cutoff_ms);
        self.carried.retain(|_, (_, at_ms)| *at_ms >= cutoff_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(container: &str) -> SeriesId {
        SeriesId {
            tenant: "t".into(),
            container_id: container.into(),
            gpu_uuid: "GPU-1".into(),
            ..Default::default()
        }
    }

    const E: &str = "energy_joules_total";

    /// A board that has counted 9,000,000 J since its driver loaded, held by A, idle, then held
    /// by B; readings every 15 s at 300 W while held and 60 W while idle. By hand: A is billed
    /// the 4,500 J between its two readings at 15 s and 30 s; the 4,500 J of 0→15 s (before
    /// this agent's first reading) are no one's; B's first reading (60 s) is a baseline for it,
    /// it gets 75 s → 90 s = 4,500 J; idle and changeover intervals are the node's.
    #[test]
    fn a_board_bills_each_holder_only_between_two_of_its_readings() {
        let (a, b) = (holder("a"), holder("b"));
        let mut t = RunningTotals::default();
        t.start(0);
        fn sent(t: &mut RunningTotals, v: f64, h: Option<&SeriesId>, at: i64) -> Carry {
            t.reading(&Scope::Board("GPU-1".into()), E, v, h, None, at)
        }
        // First sight: a baseline, whatever the board counted before.
        let c = sent(&mut t, 9_000_000.0, Some(&a), 0);
        assert_eq!(
            c,
            Carry {
                sent: Some(0.0),
                unheld: 0.0
            }
        );
        assert_eq!(
            sent(&mut t, 9_004_500.0, Some(&a), 15_000).sent,
            Some(4_500.0)
        );
        assert_eq!(
            sent(&mut t, 9_009_000.0, Some(&a), 30_000).sent,
            Some(9_000.0)
        );
        // A finished at 35 s; idle until B starts at 50 s: 5 s × 300 W + 15 s × 60 W.
        let c = sent(&mut t, 9_011_400.0, None, 45_000);
        assert_eq!(
            c,
            Carry {
                sent: None,
                unheld: 2_400.0
            }
        );
        // B's first reading at 60 s: the changeover interval is the node's.
        let c = sent(&mut t, 9_014_400.0, Some(&b), 60_000);
        assert_eq!(
            c,
            Carry {
                sent: Some(0.0),
                unheld: 3_000.0
            }
        );
        assert_eq!(
            sent(&mut t, 9_018_900.0, Some(&b), 75_000).sent,
            Some(4_500.0)
        );
        // The driver reloads at 80 s and counts from zero: 10 s × 300 W since.
        assert_eq!(sent(&mut t, 3_000.0, Some(&b), 90_000).sent, Some(7_500.0));
    }

    #[test]
    fn a_pods_network_follows_the_pod_across_a_container_restart() {
        let pod = Scope::Pod("uid-1".into());
        let rx = "network_receive_bytes_total";
        let (first, second) = (holder("c1"), holder("c2"));
        let mut t = RunningTotals::default();
        t.start(10_000);
        // Started at the agent's first tick: its namespace counted from zero, all of it here.
        let c = t.reading(&pod, rx, 1_000.0, Some(&first), Some(10_000), 15_000);
        assert_eq!(c.sent, Some(1_000.0));
        assert_eq!(
            t.reading(&pod, rx, 5_000.0, Some(&first), Some(10_000), 30_000)
                .sent,
            Some(5_000.0)
        );
        // The container restarts; the new one carries the pod's bytes from the last reading on.
        let c = t.reading(&pod, rx, 7_000.0, Some(&second), Some(10_000), 45_000);
        assert_eq!(
            c,
            Carry {
                sent: Some(2_000.0),
                unheld: 0.0
            }
        );
    }

    #[test]
    fn an_agent_restart_makes_a_baseline_and_never_bills_one_twice() {
        let pod = Scope::Pod("uid-1".into());
        let rx = "network_receive_bytes_total";
        let c1 = holder("c1");
        // The new agent starts at 100 s; the pod started at 10 s under the agent before it.
        let mut t = RunningTotals::default();
        t.start(100_000);
        let c = t.reading(&pod, rx, 50_000.0, Some(&c1), Some(10_000), 100_000);
        assert_eq!(c.sent, Some(0.0), "a baseline: the old agent counted it");
        assert_eq!(
            t.reading(&pod, rx, 50_700.0, Some(&c1), Some(10_000), 115_000)
                .sent,
            Some(700.0)
        );
        // Forgotten after an outage of the reading: a new baseline, nothing counted twice.
        t.forget_before(200_000);
        assert_eq!(
            t.reading(&pod, rx, 90_000.0, Some(&c1), Some(10_000), 215_000)
                .sent,
            Some(0.0)
        );
    }
}
