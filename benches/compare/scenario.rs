//! The fleet scenario, its faults and its ground truth.
//!
//! The simulator (seeded) runs a fleet of H100 and A100 nodes, some A100s split into `1g.10gb`
//! MIG slices, whose containers run from seconds to many minutes, restart with new ids and sit
//! pending between runs. Every 15 s each node's agent collects a batch. The faults, drawn from
//! the same seed:
//! - **dropped deliveries**: 10 % of the exchanges between a node and its collector fail. A
//!   Prometheus scrape that fails is lost (the target is marked stale for that instant); the
//!   Meterflow agent keeps the batch in its spool and sends it with its next one.
//! - **duplicates**: 5 % of deliveries arrive twice (a retry after a lost acknowledgement).
//! - **an agent outage**: one node's agent (and exporters) down for six minutes across an hour
//!   boundary; when it is back the container runtime's records tell it what ran meanwhile
//!   (a collection fault: a scraper's readings of those minutes were never taken).
//! - **a partition**: one node cut off for 16 minutes across an hour boundary, longer than the
//!   processor's 10-min lateness: the hour before is billed before its batches arrive. The
//!   Meterflow agent's spool and a Prometheus agent's WAL send them when it heals (Meterflow
//!   corrects the bill with adjustments); a Prometheus server scraping across the partition
//!   fails its scrapes.
//! - **a driver reload**: one GPU board's energy counter restarts from zero 6 s after a
//!   reading, for every system (the board's counter, as dcgm-exporter and NVML read it): what
//!   the board used in those 6 s is in no reading.
//!
//! Both systems read the node as its real sources show it (the simulator's module docs): the
//! kubelet's whole-second times and `lastState`, per-board energy counters that ran long before
//! any holder, cgroup counters read at ticks and never at a container's exit.
//!
//! The truth comes from the simulator's physical record of each run, not from any system's
//! readings: GPU time is the overlap of each run with the hour, to the millisecond; energy is
//! [`GPU_WATTS`] per whole GPU held over the same overlap (a MIG-split board's energy is the
//! node's, as SPEC says) and CPU the run's cores over it; memory is each 15-s reading held until
//! the next or the run's exit, as a collector that never missed one would see it; the most GPUs
//! per node and hour is a sweep over the runs. [`Bounds`] say how far a collector of those
//! sources may be off from it, from what they cannot show.

use std::collections::BTreeMap;

use meterflow_ingest::simulator::{BoardReading, ContainerTruth, GPU_WATTS, Rng, memory_bytes};
use meterflow_ingest::{Fleet, FleetConfig};
use meterflow_schemas::{SampleBatch, SampleKind};

pub const INTERVAL_MS: i64 = 15_000;
pub const HOUR_MS: i64 = 3_600_000;
const TICKS_PER_HOUR: i64 = HOUR_MS / INTERVAL_MS;
/// How long after its reading at the reload's tick a board's driver reloads (before the
/// next reading, 15 s after).
const RELOAD_AFTER_MS: i64 = 6_000;
/// How long PromQL takes a series' last sample as its value when no staleness marker ends it.
const LOOKBACK_MS: i64 = 300_000;

/// What the scenario's provider charges per hour of a whole GPU of a class, in micros, written
/// out here (the processor runs with its demo price book, which must say the same).
pub fn gpu_hour_micros(class: &str) -> Option<f64> {
    match class {
        "h100" => Some(2_490_000.0),
        "a100" => Some(1_290_000.0),
        _ => None,
    }
}

/// The share of a whole GPU the scenario's provider bills a GPU of `mig_profile` as: a
/// `1g.10gb` slice is one of the A100's seven.
pub fn billed_fraction(mig_profile: &str) -> f64 {
    match mig_profile {
        "" => 1.0,
        "1g.10gb" => 1.0 / 7.0,
        other => panic!("the scenario has no MIG profile {other}"),
    }
}

/// What happens to one node's batch of one tick on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent at its tick.
    OnTime,
    /// The exchange fails (lost scrape; Meterflow: held in the spool until the next tick).
    Dropped,
    /// Delivered twice.
    Duplicated,
    /// Held back by a partition and delivered at the given tick (the server's scrape fails).
    LateUntil(i64),
}

/// Per board, the times its energy counter read lower than at its reading before.
fn counter_resets(ticks: &[Vec<NodeTick>]) -> usize {
    let mut last: BTreeMap<(usize, String), i64> = BTreeMap::new();
    let mut resets = 0;
    for tick in ticks.iter().flatten() {
        for board in &tick.boards {
            let key = (tick.node, board.uuid.clone());
            if last
                .get(&key)
                .is_some_and(|before| board.energy_mj < *before)
            {
                resets += 1;
            }
            last.insert(key, board.energy_mj);
        }
    }
    resets
}

/// One node's collection at one tick: the batch (none while its agent is down) and its fate.
pub struct NodeTick {
    pub node: usize,
    pub batch: Option<SampleBatch>,
    /// The node's GPU boards as dcgm-exporter shows them at this tick (none while down).
    pub boards: Vec<BoardReading>,
    pub delivery: Delivery,
}

/// A node and hour's truth.
#[derive(Debug, Default, Clone)]
pub struct Cell {
    /// (gpu_class, mig_profile) → GPU-milliseconds.
    pub gpu_ms: BTreeMap<(String, String), i64>,
    pub energy_mj: i64,
    pub cpu_us: i64,
    pub memory_byte_ms: i128,
}

pub struct Truth {
    /// (tenant, hour start) → what the tenant used in that hour.
    pub tenants: BTreeMap<(String, i64), Cell>,
    /// How far any collector reading the node's real sources may be from the truth.
    pub bounds: Bounds,
    /// (node, hour start) → the most GPUs (whole or MIG slices) held at any instant.
    pub node_max_gpus: BTreeMap<(String, i64), i64>,
}

/// The most a collector of the node's sources can be off, summed over the runs, from what
/// the sources cannot show (module docs): GPU-ms per (class, MIG profile) and millijoules.
#[derive(Debug, Default, Clone)]
pub struct Bounds {
    pub gpu_ms: BTreeMap<(String, String), i64>,
    pub energy_mj: i64,
    /// GPU-ms per (class, MIG profile) that a collector counting the GPUs it sees at each
    /// 15-s reading as held for the interval (Prometheus's `count` × 15 s) may be off when
    /// every reading it took arrives: one interval per GPU for each hour a run touches (the
    /// run's length is not a whole number of intervals), and one per reading it never took
    /// while the run was up or within PromQL's 5-min lookback after it (the agent outage).
    pub sampled_gpu_ms: BTreeMap<(String, String), i64>,
}

pub struct Scenario {
    pub t0: i64,
    pub hours: i64,
    pub nodes: usize,
    /// Per tick (index 0 is tick 1), every node's collection.
    pub ticks: Vec<Vec<NodeTick>>,
    pub truth: Truth,
    pub tenants: Vec<String>,
    /// The faults as injected, for the report.
    pub faults: Vec<String>,
    pub samples: u64,
    /// Every container run, as physically run (what kube-state-metrics' view is built from,
    /// see `prom::ksm_requests`).
    pub runs: Vec<ContainerTruth>,
    pub containers: usize,
    pub short_containers: usize,
    /// Times a board's energy counter, as every collector reads it, was lower than at the
    /// reading before: the proof that the driver reload landed between two readings.
    pub counter_resets_seen: usize,
}

impl Scenario {
    /// `nodes` nodes for `hours` hours from `t0` (an hour boundary), faults from `seed`.
    pub fn generate(nodes: usize, hours: i64, seed: u64, t0: i64) -> Self {
        assert!(nodes >= 3, "the faults need three nodes");
        assert!(hours >= 2, "the outage and the partition need two hours");
        let mut fleet = Fleet::new(
            FleetConfig {
                nodes,
                seed,
                tenants: (nodes / 2).clamp(3, 12),
                // From 5 s (under one scrape interval) to 10 min; pending up to a minute.
                run_ms: (5_000, 600_000),
                pending_ms: (2_000, 60_000),
            },
            t0,
        );
        let total_ticks = hours * TICKS_PER_HOUR;
        // The outage: node 1, from 3 min before the end of hour 0 for 6 min, across the
        // boundary (an hour's figures on both sides of it depend on what the agent reads back).
        let outage_node = 1;
        let outage = (TICKS_PER_HOUR - 12)..(TICKS_PER_HOUR + 12);
        // The partition: node 2 cut off from 5 min before the end of hour 0 for 16 min; what
        // it collected meanwhile is delivered when it heals.
        let late_node = 2;
        let late = (TICKS_PER_HOUR - 20)..(TICKS_PER_HOUR + 44);
        // The driver reload: 30 min into hour 0, of the first board on node 0 a container holds.
        let reset_tick = 120;
        let mut reset: Option<(String, String)> = None; // (board, holder's container)
        // The faults, from the seed (a stream of their own, apart from the fleet's).
        let mut rng = Rng::new(seed ^ 0x5eed_fa17);
        let mut ticks = Vec::with_capacity(total_ticks as usize);
        let mut observed: Vec<Vec<i64>> = vec![Vec::new(); nodes];
        let (mut dropped, mut duplicated, mut samples) = (0u64, 0u64, 0u64);
        for k in 1..=total_ticks {
            let now = t0 + k * INTERVAL_MS;
            let mut row = Vec::with_capacity(nodes);
            for (n, seen) in observed.iter_mut().enumerate() {
                if n == outage_node && outage.contains(&k) {
                    row.push(NodeTick {
                        node: n,
                        batch: None,
                        boards: Vec::new(),
                        delivery: Delivery::OnTime,
                    });
                    continue;
                }
                seen.push(now);
                let batch = fleet.tick_node(n, now);
                let boards = fleet.boards(n);
                if n == 0 && k == reset_tick {
                    reset = boards.iter().find_map(|b| {
                        let (_, _, container) = b.holder.as_ref()?;
                        Some((b.uuid.clone(), container.clone()))
                    });
                    if let Some((uuid, _)) = &reset {
                        fleet.reload_driver(n, uuid, now + RELOAD_AFTER_MS);
                    }
                }
                samples += batch.samples.len() as u64;
                let delivery = if n == late_node && late.contains(&k) {
                    Delivery::LateUntil(late.end)
                } else if rng.range(0, 99) < 10 {
                    dropped += 1;
                    Delivery::Dropped
                } else if rng.range(0, 99) < 5 {
                    duplicated += 1;
                    Delivery::Duplicated
                } else {
                    Delivery::OnTime
                };
                row.push(NodeTick {
                    node: n,
                    batch: Some(batch),
                    boards,
                    delivery,
                });
            }
            ticks.push(row);
        }
        let counter_resets_seen = counter_resets(&ticks);
        let containers: Vec<ContainerTruth> = fleet.containers().cloned().collect();
        let short_containers = containers
            .iter()
            .filter(|c| c.finished && c.until_ms - c.started_at_ms < INTERVAL_MS)
            .count();
        let mut truth = truth(&containers, &observed, t0, hours);
        // What the board used between the reading before the reload and the reload is in no
        // reading: every collector loses its holder's share of it.
        if let Some((_, holder)) = &reset {
            let reading = t0 + reset_tick * INTERVAL_MS;
            truth.bounds.energy_mj += containers
                .iter()
                .filter(|c| &c.container_id == holder)
                .map(|c| {
                    // The holder holds the board whole: it draws GPU_WATTS while held.
                    GPU_WATTS
                        * overlap(
                            c.started_at_ms,
                            c.until_ms,
                            reading,
                            reading + RELOAD_AFTER_MS,
                        )
                })
                .sum::<i64>();
        }
        let clock = |k: i64| {
            let m = (k * INTERVAL_MS) / 60_000;
            format!("{}:{:02}", m / 60, m % 60)
        };
        let mut faults = vec![
            format!(
                "dropped: {dropped} node-ticks of {} (10 %): failed scrapes for the Prometheus server (lost); for Meterflow's agent and the Prometheus agent a failed delivery, spooled or kept in the WAL and sent again; for kube-state-metrics the node's status update arriving at the API server a tick late",
                total_ticks * nodes as i64
            ),
            format!("duplicated: {duplicated} node-ticks (5 %) delivered twice"),
            format!(
                "agent outage: node-{outage_node:03} from {} to {} (6 min, across an hour boundary): no reading taken by any node collector; Meterflow's agent reads the kubelet's records of what ran when it is back (the kubelet itself runs: the API server, and kube-state-metrics, keep hearing from it)",
                clock(outage.start),
                clock(outage.end)
            ),
            format!(
                "partition: node-{late_node:03} cut off from {} to {} (16 min, across an hour boundary, past the 10-min lateness: Meterflow bills the hour before it heals); Meterflow's agent and the Prometheus agent deliver what they collected when it heals, the Prometheus server's scrapes fail, the API server (and kube-state-metrics) holds the node's pods as they were until it heals",
                clock(late.start),
                clock(late.end)
            ),
        ];
        if let Some((uuid, container)) = reset {
            faults.push(format!(
                "driver reload: GPU board {uuid}'s energy counter (held by container {container}) restarts from zero {} s after the reading at {}, between two readings: what the board used in those seconds is in no reading",
                RELOAD_AFTER_MS / 1000,
                clock(reset_tick)
            ));
        }
        Scenario {
            t0,
            hours,
            nodes,
            ticks,
            truth,
            tenants: fleet.tenants(),
            faults,
            samples,
            containers: containers.len(),
            runs: containers,
            short_containers,
            counter_resets_seen,
        }
    }

    pub fn tick_ms(&self, k: i64) -> i64 {
        self.t0 + k * INTERVAL_MS
    }

    pub fn end_ms(&self) -> i64 {
        self.t0 + self.hours * HOUR_MS
    }
}

/// `[a, b)` ∩ `[c, d)` in milliseconds.
fn overlap(a: i64, b: i64, c: i64, d: i64) -> i64 {
    (b.min(d) - a.max(c)).max(0)
}

fn truth(containers: &[ContainerTruth], observed: &[Vec<i64>], t0: i64, hours: i64) -> Truth {
    let mut tenants: BTreeMap<(String, i64), Cell> = BTreeMap::new();
    // (node, hour) → (time, change) of GPUs held.
    let mut events: BTreeMap<(String, i64), Vec<(i64, i64)>> = BTreeMap::new();
    let end_ms = t0 + hours * HOUR_MS;
    for c in containers {
        let (s, e) = (c.started_at_ms, c.until_ms);
        for h in 0..hours {
            let hour = t0 + h * HOUR_MS;
            let ms = overlap(s, e, hour, hour + HOUR_MS);
            if ms == 0 {
                continue;
            }
            let cell = tenants.entry((c.tenant.clone(), hour)).or_default();
            for g in &c.gpus {
                *cell
                    .gpu_ms
                    .entry((g.class.clone(), g.mig_profile.clone()))
                    .or_default() += ms;
                // A whole board's energy is its holder's; a MIG-split board's is the node's.
                if g.mig_profile.is_empty() {
                    cell.energy_mj += ms * GPU_WATTS;
                }
            }
            cell.cpu_us += ms * c.cores_tenths * 100;
            let held = events.entry((c.node.clone(), hour)).or_default();
            held.push((s.max(hour), c.gpus.len() as i64));
            held.push((e.min(hour + HOUR_MS), -(c.gpus.len() as i64)));
        }
        // Memory: the readings a collector that never missed one takes (every tick while the
        // container runs), each held until the next or the container's exit.
        let first = ((s - t0 + INTERVAL_MS - 1) / INTERVAL_MS).max(1);
        let mut readings: Vec<i64> = (first..)
            .map(|k| t0 + k * INTERVAL_MS)
            .take_while(|t| *t < e || (!c.finished && *t <= e.min(end_ms)))
            .collect();
        if c.finished && !readings.is_empty() {
            readings.push(e);
        }
        for pair in readings.windows(2) {
            let level = i128::from(memory_bytes(c.cores_tenths, &c.container_id, pair[0]));
            for h in 0..hours {
                let hour = t0 + h * HOUR_MS;
                let ms = overlap(pair[0], pair[1], hour, hour + HOUR_MS);
                if ms > 0 {
                    tenants
                        .entry((c.tenant.clone(), hour))
                        .or_default()
                        .memory_byte_ms += level * i128::from(ms);
                }
            }
        }
    }
    let node_max_gpus = events
        .into_iter()
        .map(|(key, mut ev)| {
            // An end sorts before a start at the same millisecond.
            ev.sort_unstable();
            let (mut now, mut most) = (0, 0);
            for (_, change) in ev {
                now += change;
                most = most.max(now);
            }
            (key, most)
        })
        .collect();
    Truth {
        tenants,
        node_max_gpus,
        bounds: bounds(containers, observed, t0, hours),
    }
}

/// What the node's sources cannot show, run by run (SPEC and docs/metering-rules.md):
/// - GPU time: the kubelet shows a start and an exit truncated to the second (up to 1 s each);
///   a run it never listed (begun and ended between two readings of the node, behind another)
///   is lost whole; an exit it never showed (the next run also ended before the next reading)
///   ends the run at its last reading.
/// - Energy: a whole board's holder gets the board's increase between two readings that both
///   fall in its run; before the first and after the last it is the node's.
///
/// And for a collector that samples (module docs of [`Bounds::sampled_gpu_ms`]): per GPU, one
/// interval for each hour a run overlaps, and one for each tick inside the run, or within
/// PromQL's lookback after it, at which the node was not read.
fn bounds(containers: &[ContainerTruth], observed: &[Vec<i64>], t0: i64, hours: i64) -> Bounds {
    let mut bounds = Bounds::default();
    // Each workload's runs (by node and lease) in order, for when the next one ended.
    let mut runs: BTreeMap<(&str, &str), Vec<&ContainerTruth>> = BTreeMap::new();
    for c in containers {
        runs.entry((&c.node, &c.lease)).or_default().push(c);
    }
    for list in runs.values_mut() {
        list.sort_by_key(|c| c.started_at_ms);
        for (i, c) in list.iter().enumerate() {
            let node: usize = c
                .node
                .trim_start_matches("node-")
                .parse()
                .expect("node-NNN");
            let ticks = &observed[node];
            let (s, e) = (c.started_at_ms, c.until_ms);
            // The readings that saw it running.
            let running: Vec<i64> = ticks
                .iter()
                .copied()
                .filter(|t| *t >= s && (*t < e || (!c.finished && *t <= e)))
                .collect();
            let next_end = list
                .get(i + 1)
                .and_then(|n| n.finished.then_some(n.until_ms))
                .unwrap_or(i64::MAX);
            let exit_shown = !c.finished || ticks.iter().any(|t| *t >= e && *t < next_end);
            let gpu_ms = if !c.listed {
                e - s
            } else if exit_shown {
                2_000
            } else {
                2_000 + e - running.last().copied().unwrap_or(s)
            };
            let held_ms = match (running.first(), running.last()) {
                (Some(first), Some(last)) => last - first,
                _ => 0,
            };
            let hours_touched = (0..hours)
                .filter(|h| overlap(s, e, t0 + h * HOUR_MS, t0 + (h + 1) * HOUR_MS) > 0)
                .count() as i64;
            // A reading not taken in the run, or within the 5-min lookback after it (a node's
            // agent that is down writes no staleness marker: the run's series seems held).
            let first = (s - t0 + INTERVAL_MS - 1).div_euclid(INTERVAL_MS).max(1);
            let unread = (first..=hours * TICKS_PER_HOUR)
                .map(|k| t0 + k * INTERVAL_MS)
                .take_while(|t| *t < e + LOOKBACK_MS)
                .filter(|t| ticks.binary_search(t).is_err())
                .count() as i64;
            for g in &c.gpus {
                let kind = (g.class.clone(), g.mig_profile.clone());
                *bounds.gpu_ms.entry(kind.clone()).or_default() += gpu_ms.min(e - s);
                *bounds.sampled_gpu_ms.entry(kind).or_default() +=
                    (hours_touched + unread) * INTERVAL_MS;
                if g.mig_profile.is_empty() {
                    bounds.energy_mj += GPU_WATTS * (e - s - held_ms);
                }
            }
        }
    }
    bounds
}

/// The series a scrape of one node shows at `now`: what runs at that instant.
pub fn running_at(
    batch: &SampleBatch,
    now: i64,
) -> impl Iterator<Item = &meterflow_schemas::Sample> {
    batch
        .samples
        .iter()
        .filter(move |s| s.timestamp_ms == now && s.kind != SampleKind::Allocation)
}
