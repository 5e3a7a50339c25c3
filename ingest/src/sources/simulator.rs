//! A deterministic simulated fleet.
//!
//! Every node alternates between the GPU classes `h100` (eight whole GPUs) and `a100` (one GPU
//! split into seven `1g.10gb` MIG instances plus seven whole GPUs). Each node runs a few
//! workloads (leases of seeded tenants); a workload's container runs for a while, finishes,
//! stays pending for a while (not billed), then restarts as a new container. Start and finish
//! times fall between ticks, and a container may live less than one tick, as on a real node.
//!
//! [`Fleet::tick`] advances the fleet to a time and returns one [`SampleBatch`] per node.
//! [`Fleet::gpu_milliseconds`] is the ground truth for everything the ticks have shown.

use std::collections::BTreeMap;

use meterflow_schemas::{Sample, SampleBatch, SampleKind, SeriesId};

/// Shape of the simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed of every random choice; the same seed and tick times give the same samples.
    pub seed: u64,
    /// Number of tenants the workloads are spread over.
    pub tenants: usize,
    /// Shortest and longest run of a container, in milliseconds.
    pub run_ms: (i64, i64),
    /// Shortest and longest pending time between two containers of a workload, in milliseconds.
    pub pending_ms: (i64, i64),
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            nodes: 4,
            seed: 1,
            tenants: 3,
            run_ms: (20_000, 300_000),
            pending_ms: (2_000, 30_000),
        }
    }
}

/// SplitMix64: small, fast and fully determined by its seed (the fleet's choices, and the
/// faults a benchmark draws for it).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo).max(0) as u64 + 1;
        lo + (self.next() % span) as i64
    }
}

#[derive(Debug, Clone)]
struct Gpu {
    uuid: String,
    model: &'static str,
    class: &'static str,
    mig_profile: &'static str,
}

#[derive(Debug, Clone)]
enum State {
    Pending {
        until_ms: i64,
    },
    Running {
        container_id: String,
        started_at_ms: i64,
        finish_at_ms: i64,
        /// GPU time up to here is already in the ground truth.
        counted_until_ms: i64,
    },
}

#[derive(Debug, Clone)]
struct Workload {
    tenant: String,
    lease: String,
    service: &'static str,
    gpus: Vec<usize>,
    /// CPU cores the container keeps busy, in tenths.
    cores_tenths: i64,
    restarts: u32,
    state: State,
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    gpus: Vec<Gpu>,
    workloads: Vec<Workload>,
    sequence: i64,
}

/// Key of the ground truth: who used which kind of GPU.
pub type GpuKey = (String, String, String, String);

/// Power every simulated GPU draws while its container runs: its energy counter reads this
/// many joules per second of the container's life.
pub const GPU_WATTS: i64 = 300;

/// One GPU a container holds, as the ground truth lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGpu {
    pub uuid: String,
    pub class: String,
    pub mig_profile: String,
}

/// Ground truth of one container the ticks have shown: who ran it where, what it held, how
/// many cores it kept busy and from when to when. Its CPU counter reads `cores_tenths / 10`
/// core-seconds per second of its life, each GPU's energy counter [`GPU_WATTS`] joules per
/// second, its memory [`memory_bytes`] at each reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerTruth {
    pub node: String,
    pub tenant: String,
    pub lease: String,
    pub container_id: String,
    pub gpus: Vec<HeldGpu>,
    pub cores_tenths: i64,
    pub started_at_ms: i64,
    /// Its finish, or the latest tick while it still runs.
    pub until_ms: i64,
    pub finished: bool,
}

/// The simulated fleet and its ground truth.
#[derive(Debug, Clone)]
pub struct Fleet {
    config: FleetConfig,
    rng: Rng,
    nodes: Vec<Node>,
    /// (tenant, lease, gpu_class, mig_profile) → GPU-milliseconds shown so far.
    gpu_ms: BTreeMap<GpuKey, i64>,
    /// Every container shown so far, by id.
    containers: BTreeMap<String, ContainerTruth>,
}

const PROVIDER: &str = "sim-provider";

impl Fleet {
    /// Builds the fleet; containers start shortly after `start_ms`.
    pub fn new(config: FleetConfig, start_ms: i64) -> Self {
        let mut rng = Rng::new(config.seed);
        let tenants = config.tenants.max(1);
        let mut nodes = Vec::with_capacity(config.nodes);
        for n in 0..config.nodes {
            let name = format!("node-{n:03}");
            let gpus = node_gpus(n);
            // Workloads: a few GPU sets per node, leaving one GPU idle.
            let sets: Vec<Vec<usize>> = if n.is_multiple_of(2) {
                vec![vec![0, 1, 2, 3], vec![4, 5], vec![6]]
            } else {
                vec![
                    vec![0, 1],
                    vec![2],
                    vec![3],
                    vec![7, 8, 9, 10],
                    vec![11, 12],
                ]
            };
            let workloads = sets
                .into_iter()
                .enumerate()
                .map(|(w, gpus)| {
                    let tenant = rng.range(0, tenants as i64 - 1);
                    Workload {
                        tenant: format!("tenant-{tenant}"),
                        lease: format!("{}.1.{}", 1000 + n, w + 1),
                        service: if w.is_multiple_of(2) {
                            "train"
                        } else {
                            "infer"
                        },
                        gpus,
                        cores_tenths: 5 + rng.range(0, 30),
                        restarts: 0,
                        state: State::Pending {
                            until_ms: start_ms + rng.range(0, 3_000),
                        },
                    }
                })
                .collect();
            nodes.push(Node {
                name,
                gpus,
                workloads,
                sequence: 0,
            });
        }
        Self {
            config,
            rng,
            nodes,
            gpu_ms: BTreeMap::new(),
            containers: BTreeMap::new(),
        }
    }

    /// Advances the fleet to `now_ms` and returns one batch per node with what it saw since the
    /// previous tick: an allocation sample per held GPU (with the container's start, and its
    /// finish once finished) and a CPU-seconds counter per container.
    pub fn tick(&mut self, now_ms: i64) -> Vec<SampleBatch> {
        (0..self.nodes.len())
            .map(|n| self.tick_node(n, now_ms))
            .collect()
    }

    /// Advances node `index` alone to `now_ms`: the batch its agent collects then. A node not
    /// ticked for a while (its agent was down) reports at its next tick every container that
    /// ran meanwhile, as the container runtime keeps their records.
    pub fn tick_node(&mut self, index: usize, now_ms: i64) -> SampleBatch {
        let node = &mut self.nodes[index];
        let mut samples = Vec::new();
        for w in &mut node.workloads {
            advance(
                &self.config,
                &mut self.rng,
                &node.name,
                &node.gpus,
                w,
                now_ms,
                &mut samples,
                (&mut self.gpu_ms, &mut self.containers),
            );
        }
        node.sequence += 1;
        SampleBatch {
            node: node.name.clone(),
            agent_id: format!("sim-{}", node.name),
            sequence: node.sequence,
            collected_at_ms: now_ms,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            samples,
        }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Ground truth of every container the ticks have shown.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerTruth> {
        self.containers.values()
    }

    /// Ground truth: GPU-milliseconds per (tenant, lease, gpu_class, mig_profile), counting every
    /// container interval up to the latest tick (a running container up to that tick).
    pub fn gpu_milliseconds(&self) -> &BTreeMap<GpuKey, i64> {
        &self.gpu_ms
    }

    /// Tenants that hold at least one workload.
    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.workloads.iter().map(|w| w.tenant.clone()))
            .collect();
        t.sort();
        t.dedup();
        t
    }
}

fn node_gpus(n: usize) -> Vec<Gpu> {
    if n.is_multiple_of(2) {
        (0..8)
            .map(|g| Gpu {
                uuid: format!("GPU-{n:03}-{g}"),
                model: "NVIDIA H100 80GB HBM3",
                class: "h100",
                mig_profile: "",
            })
            .collect()
    } else {
        // GPU 0 split into seven 1g.10gb instances (indices 0..7), then whole GPUs 1..=7.
        let mig = (0..7).map(|i| Gpu {
            uuid: format!("MIG-{n:03}-0-{i}"),
            model: "NVIDIA A100-SXM4-80GB",
            class: "a100",
            mig_profile: "1g.10gb",
        });
        let whole = (1..8).map(|g| Gpu {
            uuid: format!("GPU-{n:03}-{g}"),
            model: "NVIDIA A100-SXM4-80GB",
            class: "a100",
            mig_profile: "",
        });
        mig.chain(whole).collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn advance(
    config: &FleetConfig,
    rng: &mut Rng,
    node: &str,
    gpus: &[Gpu],
    w: &mut Workload,
    now_ms: i64,
    samples: &mut Vec<Sample>,
    (truth, containers): (
        &mut BTreeMap<GpuKey, i64>,
        &mut BTreeMap<String, ContainerTruth>,
    ),
) {
    // Walk state changes up to now: a container can start and finish within one tick.
    loop {
        match w.state.clone() {
            State::Pending { until_ms } if until_ms <= now_ms => {
                w.restarts += 1;
                let run = rng.range(config.run_ms.0, config.run_ms.1);
                w.state = State::Running {
                    container_id: format!("{node}-{}-{}", w.lease, w.restarts),
                    started_at_ms: until_ms,
                    finish_at_ms: until_ms + run,
                    counted_until_ms: until_ms,
                };
            }
            State::Pending { .. } => return,
            State::Running {
                container_id,
                started_at_ms,
                finish_at_ms,
                counted_until_ms,
            } => {
                let finished = finish_at_ms <= now_ms;
                let seen_until = if finished { finish_at_ms } else { now_ms };
                let seen_from = counted_until_ms;
                if let State::Running {
                    counted_until_ms, ..
                } = &mut w.state
                {
                    *counted_until_ms = seen_until;
                }
                let record =
                    containers
                        .entry(container_id.clone())
                        .or_insert_with(|| ContainerTruth {
                            node: node.to_string(),
                            tenant: w.tenant.clone(),
                            lease: w.lease.clone(),
                            container_id: container_id.clone(),
                            gpus: w
                                .gpus
                                .iter()
                                .map(|&g| HeldGpu {
                                    uuid: gpus[g].uuid.clone(),
                                    class: gpus[g].class.to_string(),
                                    mig_profile: gpus[g].mig_profile.to_string(),
                                })
                                .collect(),
                            cores_tenths: w.cores_tenths,
                            started_at_ms,
                            until_ms: seen_until,
                            finished,
                        });
                record.until_ms = seen_until;
                record.finished = finished;
                if seen_until > seen_from {
                    for &g in &w.gpus {
                        let gpu = &gpus[g];
                        *truth
                            .entry((
                                w.tenant.clone(),
                                w.lease.clone(),
                                gpu.class.to_string(),
                                gpu.mig_profile.to_string(),
                            ))
                            .or_default() += seen_until - seen_from;
                    }
                }
                let series = |gpu: Option<&Gpu>| SeriesId {
                    tenant: w.tenant.clone(),
                    lease: w.lease.clone(),
                    service: w.service.to_string(),
                    replica: "0".into(),
                    node: node.to_string(),
                    provider: PROVIDER.into(),
                    container_id: container_id.clone(),
                    gpu_uuid: gpu.map(|g| g.uuid.clone()).unwrap_or_default(),
                    gpu_model: gpu.map(|g| g.model.to_string()).unwrap_or_default(),
                    gpu_class: gpu.map(|g| g.class.to_string()).unwrap_or_default(),
                    mig_profile: gpu.map(|g| g.mig_profile.to_string()).unwrap_or_default(),
                };
                for &g in &w.gpus {
                    samples.push(Sample {
                        series: series(Some(&gpus[g])),
                        kind: SampleKind::Allocation,
                        metric: "gpu".into(),
                        value: 1.0,
                        timestamp_ms: seen_until,
                        started_at_ms: Some(started_at_ms),
                        finished_at_ms: finished.then_some(finish_at_ms),
                    });
                }
                // Busy cores × elapsed seconds, at microsecond resolution like cgroup's usage_usec.
                let cpu_us = w.cores_tenths * (seen_until - started_at_ms) * 100;
                samples.push(Sample {
                    series: series(None),
                    kind: SampleKind::Counter,
                    metric: "cpu_usage_seconds_total".into(),
                    value: cpu_us as f64 / 1e6,
                    timestamp_ms: seen_until,
                    started_at_ms: None,
                    finished_at_ms: None,
                });
                samples.extend(usage_samples(
                    w.cores_tenths,
                    &container_id,
                    started_at_ms,
                    seen_until,
                    &w.gpus.iter().map(|&g| &gpus[g]).collect::<Vec<_>>(),
                    series,
                ));
                if !finished {
                    return;
                }
                let pending = rng.range(config.pending_ms.0, config.pending_ms.1);
                w.state = State::Pending {
                    until_ms: finish_at_ms + pending,
                };
            }
        }
    }
}

/// A number in `0..1000` determined by its inputs: how the simulated levels wobble.
fn wobble(a: &str, t: i64) -> i64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in a.bytes().chain(t.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % 1000) as i64
}

/// A container's memory working set at `at_ms`: about 4 GiB per busy core, ± 5 %.
pub fn memory_bytes(cores_tenths: i64, container_id: &str, at_ms: i64) -> i64 {
    (cores_tenths * 4 * (1 << 30) / 10) / 1000 * (950 + wobble(container_id, at_ms) / 10)
}

/// The container's other metrics at `now_ms`: memory working set (gauge), network bytes
/// (counters), and per GPU its utilization and memory used (gauges) and energy (counter).
fn usage_samples(
    cores_tenths: i64,
    container_id: &str,
    started_at_ms: i64,
    now_ms: i64,
    gpus: &[&Gpu],
    series: impl Fn(Option<&Gpu>) -> SeriesId,
) -> Vec<Sample> {
    use meterflow_schemas::metrics as m;
    let elapsed_s = (now_ms - started_at_ms) as f64 / 1_000.0;
    let sample = |gpu: Option<&Gpu>, kind, metric: &str, value: f64| Sample {
        series: series(gpu),
        kind,
        metric: metric.into(),
        value,
        timestamp_ms: now_ms,
        started_at_ms: None,
        finished_at_ms: None,
    };
    let memory = memory_bytes(cores_tenths, container_id, now_ms);
    let mut out = vec![
        sample(None, SampleKind::Gauge, m::MEMORY_BYTES, memory as f64),
        sample(
            None,
            SampleKind::Counter,
            m::NETWORK_RECEIVE_BYTES,
            (elapsed_s * 2_000_000.0).round(),
        ),
        sample(
            None,
            SampleKind::Counter,
            m::NETWORK_TRANSMIT_BYTES,
            (elapsed_s * 500_000.0).round(),
        ),
    ];
    for gpu in gpus {
        let utilization = wobble(&gpu.uuid, now_ms) as f64 / 1000.0;
        out.push(sample(
            Some(gpu),
            SampleKind::Gauge,
            m::GPU_UTILIZATION,
            utilization,
        ));
        out.push(sample(
            Some(gpu),
            SampleKind::Gauge,
            m::VRAM_BYTES,
            ((10u64 << 30) as f64 * (0.5 + utilization / 2.0)).round(),
        ));
        // GPU_WATTS while the container runs, in joules since it started (whole millijoules).
        out.push(sample(
            Some(gpu),
            SampleKind::Counter,
            m::ENERGY_JOULES,
            ((now_ms - started_at_ms) * GPU_WATTS) as f64 / 1_000.0,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, ticks: i64, interval: i64) -> (Vec<SampleBatch>, BTreeMap<GpuKey, i64>) {
        let cfg = FleetConfig {
            nodes: 3,
            seed,
            run_ms: (2_000, 40_000),
            pending_ms: (1_000, 8_000),
            ..FleetConfig::default()
        };
        let mut fleet = Fleet::new(cfg, 0);
        let batches = (1..=ticks).flat_map(|i| fleet.tick(i * interval)).collect();
        (batches, fleet.gpu_milliseconds().clone())
    }

    #[test]
    fn same_seed_same_samples() {
        assert_eq!(run(7, 30, 5_000).0, run(7, 30, 5_000).0);
        assert_ne!(run(7, 30, 5_000).0, run(8, 30, 5_000).0);
    }

    #[test]
    fn sequences_are_monotonic_per_agent() {
        let (batches, _) = run(1, 10, 5_000);
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for b in &batches {
            let prev = last.insert(b.agent_id.clone(), b.sequence).unwrap_or(0);
            assert_eq!(b.sequence, prev + 1);
        }
    }

    /// The truth equals the union of each container's [start, finish-or-last-seen] per GPU,
    /// recomputed here from the allocation samples alone.
    #[test]
    fn truth_matches_the_allocation_samples() {
        let (batches, truth) = run(3, 60, 5_000);
        // (truth key, container, GPU) → (start, end)
        let mut intervals: BTreeMap<(GpuKey, String, String), (i64, i64)> = BTreeMap::new();
        for s in batches.iter().flat_map(|b| &b.samples) {
            if s.kind != SampleKind::Allocation {
                continue;
            }
            let start = s.started_at_ms.expect("allocations carry a start");
            let end = s.finished_at_ms.unwrap_or(s.timestamp_ms);
            let k = (
                (
                    s.series.tenant.clone(),
                    s.series.lease.clone(),
                    s.series.gpu_class.clone(),
                    s.series.mig_profile.clone(),
                ),
                s.series.container_id.clone(),
                s.series.gpu_uuid.clone(),
            );
            let e = intervals.entry(k).or_insert((start, end));
            e.1 = e.1.max(end);
        }
        let mut recomputed: BTreeMap<GpuKey, i64> = BTreeMap::new();
        for ((key, _, _), (s, e)) in intervals {
            *recomputed.entry(key).or_default() += e - s;
        }
        recomputed.retain(|_, v| *v > 0);
        assert_eq!(recomputed, truth);
        assert!(
            truth.keys().any(|k| k.3 == "1g.10gb"),
            "a MIG slice is used"
        );
        assert!(truth.keys().any(|k| k.2 == "h100") && truth.keys().any(|k| k.2 == "a100"));
    }

    /// The container records hold the same GPU time as the per-lease truth, and a node ticked
    /// again after a pause reports the containers that ran during it.
    #[test]
    fn container_records_agree_with_the_gpu_truth_across_a_paused_node() {
        let mut fleet = Fleet::new(
            FleetConfig {
                nodes: 2,
                seed: 9,
                run_ms: (2_000, 40_000),
                pending_ms: (1_000, 8_000),
                ..FleetConfig::default()
            },
            0,
        );
        let mut shown = std::collections::BTreeSet::new();
        for i in 1..=60 {
            for n in 0..fleet.nodes() {
                // Node 1's agent is away from tick 20 to tick 39.
                if n == 1 && (20..40).contains(&i) {
                    continue;
                }
                for s in fleet.tick_node(n, i * 5_000).samples {
                    shown.insert(s.series.container_id);
                }
            }
        }
        let mut from_records: BTreeMap<GpuKey, i64> = BTreeMap::new();
        for c in fleet.containers() {
            assert!(
                shown.contains(&c.container_id),
                "{} was shown",
                c.container_id
            );
            for g in &c.gpus {
                let key = (
                    c.tenant.clone(),
                    c.lease.clone(),
                    g.class.clone(),
                    g.mig_profile.clone(),
                );
                *from_records.entry(key).or_default() += c.until_ms - c.started_at_ms;
            }
        }
        from_records.retain(|_, v| *v > 0);
        assert_eq!(&from_records, fleet.gpu_milliseconds());
        assert_eq!(shown.len(), fleet.containers().count());
    }

    #[test]
    fn containers_restart_with_new_ids_and_short_ones_are_seen() {
        let (batches, _) = run(5, 120, 5_000);
        let ids: std::collections::BTreeSet<_> = batches
            .iter()
            .flat_map(|b| &b.samples)
            .map(|s| (s.series.lease.clone(), s.series.container_id.clone()))
            .collect();
        let leases: std::collections::BTreeSet<_> = ids.iter().map(|(l, _)| l.clone()).collect();
        assert!(
            ids.len() > leases.len(),
            "some lease restarted its container"
        );
        // A container that started and finished between two ticks still shows up.
        let short = batches.iter().flat_map(|b| &b.samples).any(|s| {
            matches!((s.started_at_ms, s.finished_at_ms), (Some(a), Some(f)) if f - a < 5_000 && a.rem_euclid(5_000) != 0)
        });
        assert!(short, "a sub-interval container was observed");
    }
}
