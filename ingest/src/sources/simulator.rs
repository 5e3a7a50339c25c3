//! A deterministic simulated fleet, seen through the same collector a real node runs.
//!
//! **What physically happens.** Every node alternates between the GPU classes `h100` (eight
//! whole GPUs) and `a100` (one board split into seven `1g.10gb` MIG instances plus seven whole
//! GPUs). Each node runs a few workloads (Akash leases of seeded tenants), one pod each; the
//! pod's container runs for a while, exits, waits in back-off (not billed), then runs again as a
//! new container of the same pod. Starts and exits fall anywhere in a millisecond, and a run may
//! be shorter than a tick. Every GPU board draws [`IDLE_WATTS`], [`GPU_WATTS`] while a running
//! container holds it whole, and [`MIG_SLICE_WATTS`] more per MIG instance in use; its energy
//! counter is the board's running total since the driver loaded (drawn between 1 and 10 MJ),
//! and [`Fleet::reload_driver`] sets it back to zero at a chosen instant. The container records
//! ([`Fleet::containers`]) and [`Fleet::gpu_milliseconds`] are this physical truth, in
//! milliseconds.
//!
//! **What a node's agent sees.** At each tick the simulator hands the agent's own
//! [`NodeCollector`] what a real node's sources yield then, and the collector attributes,
//! differences and batches it exactly as on a node:
//! - the kubelet's pods as the Akash provider creates them: lease ids on the namespace's
//!   labels and in the containers' `AKASH_*` env, `akash.network/manifest-service` on the pod,
//!   a ReplicaSet owner; container times in **whole seconds** (RFC 3339 without fractions:
//!   truncated); only the last terminated run of a container, in `lastState` (a run that
//!   started and ended between two ticks and was followed by another is never shown);
//! - pod-resources' assignments (`nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`) while the pod
//!   exists;
//! - NVML's inventory and, per board, its energy counter (one counter for a MIG-split board)
//!   and per device in use its utilization and memory;
//! - cgroup CPU seconds and memory of each running container (an exited container's cgroup is
//!   gone: what it used after the last tick is not read);
//! - each pod's network counters (its network namespace's totals, across container runs).
//!
//! Nothing is read at the instant a container exits: readings are stamped at the tick.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use meterflow_schemas::{SampleBatch, SampleKind, metrics as m};

use crate::attribution::{Attribution, AttributionConfig};
use crate::node::{NodeCollector, NodeIdentity};
use crate::sources::kubelet::{Container, Pod, Requests, Run};
use crate::sources::pod_resources::Assignment;
use crate::sources::{Collected, GpuInfo, Reading, Scope, Source, SourceError, Target};

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
    /// Shortest and longest back-off between two runs of a workload, in milliseconds.
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

/// A device a container can be allocated: a whole GPU or a MIG instance.
#[derive(Debug, Clone)]
struct Gpu {
    uuid: String,
    model: &'static str,
    class: &'static str,
    mig_profile: &'static str,
    /// Index of its board in [`Node::boards`].
    board: usize,
}

/// A GPU board and its energy counter.
#[derive(Debug, Clone)]
struct Board {
    uuid: String,
    model: &'static str,
    /// Millijoules since the driver loaded.
    energy_mj: i64,
    /// A driver reload due at this time, applied at the board's next tick.
    reload_at_ms: Option<i64>,
}

/// One run of a container, in physical milliseconds.
#[derive(Debug, Clone)]
struct RunRecord {
    container_id: String,
    started_at_ms: i64,
    finished_at_ms: Option<i64>,
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

struct Workload {
    tenant: String,
    lease: String,
    service: &'static str,
    gpus: Vec<usize>,
    /// CPU cores the container keeps busy, in tenths.
    cores_tenths: i64,
    restarts: u32,
    state: State,
    /// The last run that ended (the kubelet's `lastState`).
    last_finished: Option<RunRecord>,
    /// Milliseconds the pod's containers have run: its network counters grow only then.
    network_ms: i64,
    /// The pod as the kubelet lists it, without its container's runs.
    pod: Pod,
}

struct Node {
    name: String,
    gpus: Vec<Gpu>,
    boards: Vec<Board>,
    workloads: Vec<Workload>,
    /// The boards' idle power is counted up to here.
    accrued_ms: i64,
    /// The node's agent, reading what [`Handed`] gives it.
    collector: NodeCollector,
    handed: Arc<Mutex<Option<Collected>>>,
}

/// Key of the ground truth: who used which kind of GPU.
pub type GpuKey = (String, String, String, String);

/// Power a GPU board draws while a running container holds it whole: its holder uses this many
/// joules per second of its run.
pub const GPU_WATTS: i64 = 300;
/// Power a board draws while no one uses it (the node's, never a tenant's).
pub const IDLE_WATTS: i64 = 60;
/// Power a MIG-split board draws, above idle, per instance a running container holds.
pub const MIG_SLICE_WATTS: i64 = 30;
/// Bytes a pod receives and sends per second while its container runs.
pub const RECEIVE_BYTES_PER_S: i64 = 2_000_000;
pub const TRANSMIT_BYTES_PER_S: i64 = 500_000;

/// One GPU a container holds, as the ground truth lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGpu {
    pub uuid: String,
    pub class: String,
    pub mig_profile: String,
}

/// Ground truth of one container run: who ran it where, what it held, how many cores it kept
/// busy and from when to when, to the millisecond. Its CPU counter reads `cores_tenths / 10`
/// core-seconds per second of its life, each whole GPU it holds draws [`GPU_WATTS`], its memory
/// is [`memory_bytes`] at each reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerTruth {
    pub node: String,
    pub tenant: String,
    pub lease: String,
    pub container_id: String,
    pub gpus: Vec<HeldGpu>,
    pub cores_tenths: i64,
    /// What its spec requests (see [`requests`]): reserved from its start to its exit.
    pub requests: Requests,
    pub started_at_ms: i64,
    /// Its exit, or the latest tick while it still runs.
    pub until_ms: i64,
    pub finished: bool,
    /// Whether the kubelet listed the run at some tick (running, or in `lastState`). A run it
    /// never listed (it started and ended between two ticks, and another followed before the
    /// next) cannot be billed from a real node's sources.
    pub listed: bool,
}

/// A board's energy counter as a scrape of it reads now, and who holds it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardReading {
    pub uuid: String,
    pub model: String,
    /// Millijoules since the driver loaded.
    pub energy_mj: i64,
    /// (tenant, lease, container id) of the running container that holds the board whole.
    pub holder: Option<(String, String, String)>,
}

/// The simulated fleet and its ground truth.
pub struct Fleet {
    config: FleetConfig,
    rng: Rng,
    nodes: Vec<Node>,
    /// (tenant, lease, gpu_class, mig_profile) → GPU-milliseconds run so far.
    gpu_ms: BTreeMap<GpuKey, i64>,
    /// Every container run so far, by id.
    containers: BTreeMap<String, ContainerTruth>,
}

/// The Akash provider every simulated node belongs to.
pub const PROVIDER: &str = "akash1simprovider";

/// The source the simulator hands a node's collector: what the node's real sources would
/// have yielded at this tick.
struct Handed(Arc<Mutex<Option<Collected>>>);

impl Source for Handed {
    fn name(&self) -> &str {
        "simulator"
    }

    fn metrics(&self) -> Vec<String> {
        [
            m::CPU_SECONDS,
            m::MEMORY_BYTES,
            m::NETWORK_RECEIVE_BYTES,
            m::NETWORK_TRANSMIT_BYTES,
            m::GPU_UTILIZATION,
            m::VRAM_BYTES,
            m::ENERGY_JOULES,
        ]
        .map(String::from)
        .to_vec()
    }

    fn collect(&mut self) -> super::BoxFuture<'_, Result<Collected, SourceError>> {
        let handed = self.0.lock().expect("not poisoned").take();
        Box::pin(async move {
            handed.ok_or_else(|| SourceError::Failed("nothing handed for this tick".into()))
        })
    }
}

/// Whole seconds, as the kubelet's RFC 3339 times show an instant.
fn kubelet_time(ms: i64) -> i64 {
    ms.div_euclid(1_000) * 1_000
}

/// A lowercase base-32 name of `n` characters determined by `text` (an Akash lease's
/// namespace, a pod name's suffix).
fn hashed_name(text: &str, n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut out = String::with_capacity(n);
    for i in 0..n {
        for b in text.bytes().chain([i as u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        out.push(ALPHABET[(h >> 59) as usize] as char);
    }
    out
}

/// The pod an Akash provider runs for one service of a lease, without its container's runs.
fn akash_pod(owner: &str, dseq: i64, gseq: i64, oseq: i64, service: &str, created_ms: i64) -> Pod {
    let lease_path = format!("{owner}/{dseq}/{gseq}/{oseq}/{PROVIDER}");
    let namespace = hashed_name(&lease_path, 45);
    let hash = hashed_name(&format!("{lease_path}/{service}"), 10);
    let replica_set = format!("{service}-{hash}");
    let name = format!("{replica_set}-{}", hashed_name(&lease_path, 5));
    let labels = [
        ("akash.network", "true"),
        ("akash.network/manifest-service", service),
        ("akash.network/namespace", namespace.as_str()),
        ("pod-template-hash", hash.as_str()),
    ];
    let (dseq, gseq, oseq) = (dseq.to_string(), gseq.to_string(), oseq.to_string());
    let namespace_labels = [
        ("akash.network", "true"),
        ("akash.network/lease.id.owner", owner),
        ("akash.network/lease.id.dseq", dseq.as_str()),
        ("akash.network/lease.id.gseq", gseq.as_str()),
        ("akash.network/lease.id.oseq", oseq.as_str()),
        ("akash.network/lease.id.provider", PROVIDER),
    ];
    let env = [
        ("AKASH_OWNER", owner),
        ("AKASH_DEPLOYMENT_SEQUENCE", dseq.as_str()),
        ("AKASH_GROUP_SEQUENCE", gseq.as_str()),
        ("AKASH_ORDER_SEQUENCE", oseq.as_str()),
        ("AKASH_PROVIDER", PROVIDER),
    ];
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let labels = map(&labels);
    Pod {
        uid: hashed_name(&format!("{lease_path}/{service}/uid"), 36),
        namespace,
        name,
        labels,
        annotations: BTreeMap::new(),
        namespace_labels: map(&namespace_labels),
        owner: Some(("ReplicaSet".into(), replica_set)),
        started_at_ms: Some(kubelet_time(created_ms)),
        containers: vec![Container {
            name: service.to_string(),
            restarts: 0,
            current: None,
            previous: None,
            env: map(&env),
            limits: BTreeMap::new(),
            requests: Default::default(),
            limited: Default::default(),
        }],
    }
}

/// The device plugin's resource for a GPU of `mig_profile` (mixed MIG strategy).
fn device_resource(mig_profile: &str) -> String {
    match mig_profile {
        "" => "nvidia.com/gpu".to_string(),
        profile => format!("nvidia.com/mig-{profile}"),
    }
}

/// The agent of a simulated node: the Akash preset, price classes by model, the device
/// plugin's GPU resources.
fn node_collector(name: &str, handed: &Arc<Mutex<Option<Collected>>>) -> NodeCollector {
    let attribution = Attribution::new(&AttributionConfig {
        preset: "akash".into(),
        gpu_classes: vec![
            ("H100".into(), "h100".into()),
            ("A100".into(), "a100".into()),
        ],
        ..AttributionConfig::default()
    })
    .expect("the akash preset compiles");
    NodeCollector::new(
        NodeIdentity {
            node: name.to_string(),
            provider: PROVIDER.into(),
            agent_id: format!("sim-{name}"),
        },
        Duration::from_secs(15),
        // A node paused for a while (its agent away) keeps its running totals.
        Duration::from_secs(3_600),
        attribution,
        vec!["nvidia.com/gpu".into(), "nvidia.com/mig-*".into()],
        vec![Box::new(Handed(handed.clone()))],
    )
    .expect("one source cannot collide with itself")
}

impl Fleet {
    /// Builds the fleet; its pods are created at `start_ms` and their containers start within
    /// three seconds.
    pub fn new(config: FleetConfig, start_ms: i64) -> Self {
        let mut rng = Rng::new(config.seed);
        let tenants = config.tenants.max(1);
        let mut nodes = Vec::with_capacity(config.nodes);
        for n in 0..config.nodes {
            let name = format!("node-{n:03}");
            let (devices, boards) = node_gpus(n, &mut rng);
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
                    let tenant = format!("tenant-{}", rng.range(0, tenants as i64 - 1));
                    let dseq = 1000 + n as i64;
                    let oseq = w as i64 + 1;
                    let service = if w.is_multiple_of(2) {
                        "train"
                    } else {
                        "infer"
                    };
                    // The device plugin's resource the pod's spec asks for, as many as it holds.
                    let resource = device_resource(devices[gpus[0]].mig_profile);
                    let mut pod = akash_pod(&tenant, dseq, 1, oseq, service, start_ms);
                    pod.containers[0].limits.insert(resource, gpus.len() as i64);
                    let cores_tenths = 5 + rng.range(0, 30);
                    pod.containers[0].requests = requests(cores_tenths);
                    Workload {
                        pod,
                        lease: format!("{dseq}.1.{oseq}"),
                        tenant,
                        service,
                        gpus,
                        cores_tenths,
                        restarts: 0,
                        state: State::Pending {
                            until_ms: start_ms + rng.range(0, 3_000),
                        },
                        last_finished: None,
                        network_ms: 0,
                    }
                })
                .collect();
            let handed = Arc::new(Mutex::new(None));
            nodes.push(Node {
                collector: node_collector(&name, &handed),
                handed,
                name,
                gpus: devices,
                boards,
                workloads,
                accrued_ms: start_ms,
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

    /// Advances the fleet to `now_ms` and returns one batch per node: what its agent collects
    /// then.
    pub fn tick(&mut self, now_ms: i64) -> Vec<SampleBatch> {
        (0..self.nodes.len())
            .map(|n| self.tick_node(n, now_ms))
            .collect()
    }

    /// Advances node `index` alone to `now_ms`: the batch its agent collects then. A node not
    /// ticked for a while (its agent was away) reports at its next tick what the kubelet still
    /// lists: each container's current run and the one before it.
    pub fn tick_node(&mut self, index: usize, now_ms: i64) -> SampleBatch {
        let node = &mut self.nodes[index];
        // The counters before this tick, only while a driver reload is due (rarely).
        let since_ms = node.accrued_ms;
        let before: Option<Vec<i64>> = node
            .boards
            .iter()
            .any(|b| b.reload_at_ms.is_some())
            .then(|| node.boards.iter().map(|b| b.energy_mj).collect());
        for w in &mut node.workloads {
            advance(
                &self.config,
                &mut self.rng,
                (&node.name, &node.gpus, &mut node.boards),
                w,
                now_ms,
                (&mut self.gpu_ms, &mut self.containers),
            );
        }
        let idle_ms = (now_ms - node.accrued_ms).max(0);
        for board in &mut node.boards {
            board.energy_mj += IDLE_WATTS * idle_ms;
        }
        // A driver reloaded since the last tick: the counter holds only what the board used
        // after the reload (the interval's energy spread evenly over it).
        for (board, before) in node.boards.iter_mut().zip(before.into_iter().flatten()) {
            if let Some(at) = board.reload_at_ms.filter(|at| *at <= now_ms) {
                let used = board.energy_mj - before;
                let interval = (now_ms - since_ms).max(1);
                board.energy_mj = used * (now_ms - at.max(since_ms)) / interval;
                board.reload_at_ms = None;
            }
        }
        node.accrued_ms = node.accrued_ms.max(now_ms);
        let collected = observe(node, now_ms, &mut self.containers);
        *node.handed.lock().expect("not poisoned") = Some(collected);
        node.collector
            .tick(now_ms)
            .now_or_never()
            .expect("the simulated node's sources answer at once")
    }

    /// Reloads the GPU driver of board `uuid` on node `index` at `at_ms` (at or after its
    /// latest tick): its energy counter starts again from zero then, and its next reading
    /// shows only what the board used after `at_ms`.
    pub fn reload_driver(&mut self, index: usize, uuid: &str, at_ms: i64) {
        for board in self.nodes[index]
            .boards
            .iter_mut()
            .filter(|b| b.uuid == uuid)
        {
            board.reload_at_ms = Some(at_ms);
        }
    }

    /// Node `index`'s GPU boards as a scrape reads them at its latest tick: the energy
    /// counters (what dcgm-exporter shows) and who holds each board whole.
    pub fn boards(&self, index: usize) -> Vec<BoardReading> {
        let node = &self.nodes[index];
        node.boards
            .iter()
            .enumerate()
            .map(|(b, board)| BoardReading {
                uuid: board.uuid.clone(),
                model: board.model.to_string(),
                energy_mj: board.energy_mj,
                holder: node.workloads.iter().find_map(|w| match &w.state {
                    State::Running { container_id, .. }
                        if w.gpus.iter().any(|&g| {
                            node.gpus[g].board == b && node.gpus[g].mig_profile.is_empty()
                        }) =>
                    {
                        Some((w.tenant.clone(), w.lease.clone(), container_id.clone()))
                    }
                    _ => None,
                }),
            })
            .collect()
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Ground truth of every container run so far.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerTruth> {
        self.containers.values()
    }

    /// Ground truth: GPU-milliseconds per (tenant, lease, gpu_class, mig_profile), counting every
    /// run up to the latest tick (a running container up to that tick), listed by the kubelet
    /// or not.
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

fn node_gpus(n: usize, rng: &mut Rng) -> (Vec<Gpu>, Vec<Board>) {
    // Each board has counted 1 to 10 MJ since its driver loaded.
    let mut board = |uuid: String, model| Board {
        uuid,
        model,
        energy_mj: rng.range(1_000_000_000, 10_000_000_000),
        reload_at_ms: None,
    };
    if n.is_multiple_of(2) {
        let model = "NVIDIA H100 80GB HBM3";
        let boards: Vec<Board> = (0..8)
            .map(|g| board(format!("GPU-{n:03}-{g}"), model))
            .collect();
        let gpus = boards
            .iter()
            .enumerate()
            .map(|(b, board)| Gpu {
                uuid: board.uuid.clone(),
                model,
                class: "h100",
                mig_profile: "",
                board: b,
            })
            .collect();
        (gpus, boards)
    } else {
        // Board 0 split into seven 1g.10gb instances (indices 0..7), then whole GPUs 1..=7.
        let model = "NVIDIA A100-SXM4-80GB";
        let boards: Vec<Board> = (0..8)
            .map(|g| board(format!("GPU-{n:03}-{g}"), model))
            .collect();
        let mig = (0..7).map(|i| Gpu {
            uuid: format!("MIG-{n:03}-0-{i}"),
            model,
            class: "a100",
            mig_profile: "1g.10gb",
            board: 0,
        });
        let whole = (1..8).map(|b| Gpu {
            uuid: boards[b].uuid.clone(),
            model,
            class: "a100",
            mig_profile: "",
            board: b,
        });
        (mig.chain(whole).collect(), boards)
    }
}

/// Walks workload `w` to `now_ms`: its runs, their GPU time in the truth, the energy its GPUs
/// draw above idle and its pod's traffic.
fn advance(
    config: &FleetConfig,
    rng: &mut Rng,
    (node, gpus, boards): (&str, &[Gpu], &mut [Board]),
    w: &mut Workload,
    now_ms: i64,
    (truth, containers): (
        &mut BTreeMap<GpuKey, i64>,
        &mut BTreeMap<String, ContainerTruth>,
    ),
) {
    // A container can start and exit within one tick.
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
                let ran_ms = (seen_until - counted_until_ms).max(0);
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
                            requests: w.pod.containers[0].requests,
                            started_at_ms,
                            until_ms: seen_until,
                            finished,
                            listed: false,
                        });
                record.until_ms = seen_until;
                record.finished = finished;
                w.network_ms += ran_ms;
                for &g in &w.gpus {
                    let gpu = &gpus[g];
                    if ran_ms > 0 {
                        *truth
                            .entry((
                                w.tenant.clone(),
                                w.lease.clone(),
                                gpu.class.to_string(),
                                gpu.mig_profile.to_string(),
                            ))
                            .or_default() += ran_ms;
                    }
                    // Watts are millijoules per millisecond.
                    let above_idle = if gpu.mig_profile.is_empty() {
                        GPU_WATTS - IDLE_WATTS
                    } else {
                        MIG_SLICE_WATTS
                    };
                    boards[gpu.board].energy_mj += above_idle * ran_ms;
                }
                if !finished {
                    return;
                }
                w.last_finished = Some(RunRecord {
                    container_id,
                    started_at_ms,
                    finished_at_ms: Some(finish_at_ms),
                });
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

/// What a service's spec requests for a container that keeps `cores_tenths` / 10 cores busy:
/// half a core more than that, and 4 GiB per requested core or part of one (the kubelet
/// shows them as `"1500m"` and `"8Gi"`).
pub fn requests(cores_tenths: i64) -> Requests {
    let millicores = cores_tenths * 100 + 500;
    Requests {
        cpu_millicores: Some(millicores),
        memory_bytes: Some((millicores + 999) / 1_000 * (4 << 30)),
    }
}

/// A container's memory working set at `at_ms`: about 4 GiB per busy core, ± 5 %.
pub fn memory_bytes(cores_tenths: i64, container_id: &str, at_ms: i64) -> i64 {
    (cores_tenths * 4 * (1 << 30) / 10) / 1000 * (950 + wobble(container_id, at_ms) / 10)
}

/// What node's sources yield at `now_ms` (the node advanced to it): the kubelet's pods,
/// pod-resources' assignments, NVML's inventory and readings, cgroup's and the pods' network.
fn observe(
    node: &Node,
    now_ms: i64,
    containers: &mut BTreeMap<String, ContainerTruth>,
) -> Collected {
    let mut pods = Vec::with_capacity(node.workloads.len());
    let mut assignments = Vec::with_capacity(node.workloads.len());
    let mut readings = Vec::new();
    let reading =
        |target: Target, gpu: Option<GpuInfo>, kind, metric: &str, value: f64, scope| Reading {
            target,
            gpu,
            kind,
            metric: metric.to_string(),
            value,
            scope,
        };
    let info = |g: &Gpu| GpuInfo {
        uuid: g.uuid.clone(),
        model: g.model.to_string(),
        mig_profile: g.mig_profile.to_string(),
    };
    for w in &node.workloads {
        let mut pod = w.pod.clone();
        let shown = |run: &RunRecord| Run {
            container_id: run.container_id.clone(),
            started_at_ms: kubelet_time(run.started_at_ms),
            finished_at_ms: run.finished_at_ms.map(kubelet_time),
        };
        let current = match &w.state {
            State::Running {
                container_id,
                started_at_ms,
                ..
            } => Some(RunRecord {
                container_id: container_id.clone(),
                started_at_ms: *started_at_ms,
                finished_at_ms: None,
            }),
            State::Pending { .. } => None,
        };
        for run in current.iter().chain(w.last_finished.iter()) {
            if let Some(truth) = containers.get_mut(&run.container_id) {
                truth.listed = true;
            }
        }
        let c = &mut pod.containers[0];
        c.restarts = i64::from(w.restarts.saturating_sub(1));
        c.current = current.as_ref().map(shown);
        c.previous = w.last_finished.as_ref().map(shown);
        let held: Vec<&Gpu> = w.gpus.iter().map(|&g| &node.gpus[g]).collect();
        assignments.push(Assignment {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: w.service.to_string(),
            resource: device_resource(held[0].mig_profile),
            device_ids: held.iter().map(|g| g.uuid.clone()).collect(),
            dra: false,
        });
        let network = Target::Pod {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
        };
        for (metric, per_s) in [
            (m::NETWORK_RECEIVE_BYTES, RECEIVE_BYTES_PER_S),
            (m::NETWORK_TRANSMIT_BYTES, TRANSMIT_BYTES_PER_S),
        ] {
            readings.push(reading(
                network.clone(),
                None,
                SampleKind::Counter,
                metric,
                (w.network_ms * per_s / 1_000) as f64,
                Scope::Pod(pod.uid.clone()),
            ));
        }
        if let Some(run) = &current {
            let id = Target::Container(run.container_id.clone());
            // cgroup's usage_usec: busy cores × elapsed time, to the microsecond.
            let cpu_us = w.cores_tenths * (now_ms - run.started_at_ms) * 100;
            readings.push(reading(
                id.clone(),
                None,
                SampleKind::Counter,
                m::CPU_SECONDS,
                cpu_us as f64 / 1e6,
                Scope::Container,
            ));
            let memory = memory_bytes(w.cores_tenths, &run.container_id, now_ms);
            readings.push(reading(
                id,
                None,
                SampleKind::Gauge,
                m::MEMORY_BYTES,
                memory as f64,
                Scope::Container,
            ));
            for gpu in &held {
                let utilization = wobble(&gpu.uuid, now_ms) as f64 / 1000.0;
                let target = Target::Gpu(gpu.uuid.clone());
                readings.push(reading(
                    target.clone(),
                    Some(info(gpu)),
                    SampleKind::Gauge,
                    m::GPU_UTILIZATION,
                    utilization,
                    Scope::Container,
                ));
                readings.push(reading(
                    target,
                    Some(info(gpu)),
                    SampleKind::Gauge,
                    m::VRAM_BYTES,
                    ((10u64 << 30) as f64 * (0.5 + utilization / 2.0)).round(),
                    Scope::Container,
                ));
            }
        }
        pods.push(pod);
    }
    // NVML: every board and MIG instance, and each board's energy counter.
    let mut inventory: Vec<GpuInfo> = node.gpus.iter().map(info).collect();
    for board in &node.boards {
        let gpu = GpuInfo {
            uuid: board.uuid.clone(),
            model: board.model.to_string(),
            mig_profile: String::new(),
        };
        if !inventory.iter().any(|g| g.uuid == board.uuid) {
            inventory.push(gpu.clone());
        }
        readings.push(reading(
            Target::Gpu(board.uuid.clone()),
            Some(gpu),
            SampleKind::Counter,
            m::ENERGY_JOULES,
            board.energy_mj as f64 / 1_000.0,
            Scope::Board(board.uuid.clone()),
        ));
    }
    Collected {
        readings,
        pods: Some(pods),
        assignments: Some(assignments),
        gpus: Some(inventory),
        gpu_processes: None,
        dra_devices: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn fleet(seed: u64, nodes: usize, run_ms: (i64, i64)) -> Fleet {
        Fleet::new(
            FleetConfig {
                nodes,
                seed,
                run_ms,
                pending_ms: (1_000, 8_000),
                ..FleetConfig::default()
            },
            0,
        )
    }

    fn run(seed: u64, ticks: i64, interval: i64) -> (Vec<SampleBatch>, Fleet) {
        let mut fleet = fleet(seed, 3, (2_000, 40_000));
        let batches = (1..=ticks).flat_map(|i| fleet.tick(i * interval)).collect();
        (batches, fleet)
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

    /// Every sample is stamped at the tick that read it, and a run's allocation carries its
    /// start and exit as the kubelet shows them: the physical instant truncated to the second.
    /// Runs the kubelet listed are exactly the ones with allocations; the others started and
    /// ended between two ticks behind another run.
    #[test]
    fn allocations_carry_the_kubelets_whole_seconds_and_only_listed_runs() {
        // Runs and back-offs from a fraction of a second: a crash loop.
        let mut fleet = Fleet::new(
            FleetConfig {
                nodes: 3,
                seed: 3,
                run_ms: (300, 20_000),
                pending_ms: (100, 3_000),
                ..FleetConfig::default()
            },
            0,
        );
        let batches: Vec<SampleBatch> = (1..=240).flat_map(|i| fleet.tick(i * 5_000)).collect();
        let mut shown: BTreeMap<String, (i64, Option<i64>)> = BTreeMap::new();
        for b in &batches {
            for s in &b.samples {
                assert_eq!(s.timestamp_ms, b.collected_at_ms, "{s:?}");
                if s.kind == SampleKind::Allocation {
                    let e = shown
                        .entry(s.series.container_id.clone())
                        .or_insert((s.started_at_ms.expect("a start"), None));
                    e.1 = e.1.or(s.finished_at_ms);
                }
            }
        }
        let (mut listed, mut unlisted) = (0, 0);
        for c in fleet.containers() {
            if !c.listed {
                unlisted += 1;
                assert!(c.finished && c.until_ms - c.started_at_ms < 5_000, "{c:?}");
                assert!(!shown.contains_key(&c.container_id), "{c:?}");
                continue;
            }
            listed += 1;
            let (start, finish) = shown[&c.container_id];
            assert_eq!(start, c.started_at_ms - c.started_at_ms % 1_000, "{c:?}");
            // An exit is shown unless the next run started and exited before the next tick
            // (then `lastState` holds that one, and the run ends at its last observation).
            if let Some(finish) = finish {
                assert!(c.finished, "{c:?}");
                assert_eq!(finish, c.until_ms - c.until_ms % 1_000, "{c:?}");
            }
        }
        assert!(listed > 50, "{listed} runs listed");
        assert!(
            unlisted > 0,
            "a run between two ticks, followed by another, is not listed"
        );
        let keys = fleet.gpu_milliseconds().keys();
        assert!(
            keys.clone().any(|k| k.3 == "1g.10gb"),
            "a MIG slice is used"
        );
        assert!(keys.clone().any(|k| k.2 == "h100") && keys.clone().any(|k| k.2 == "a100"));
    }

    /// Each whole-GPU holder is sent its own share of its board's counter, which started at
    /// megajoules: GPU_WATTS over the ticks both inside its run, never more than the run used
    /// and never less than the run less two intervals. MIG holders get no board energy.
    #[test]
    fn board_energy_is_billed_by_share_within_two_intervals_per_run() {
        const TICK: i64 = 15_000;
        let mut fleet = fleet(11, 2, (20_000, 120_000));
        let mut last: BTreeMap<(String, String), f64> = BTreeMap::new();
        for i in 1..=80 {
            for b in fleet.tick(i * TICK) {
                for s in b.samples.iter().filter(|s| s.metric == m::ENERGY_JOULES) {
                    assert!(s.series.mig_profile.is_empty(), "{s:?}");
                    last.insert(
                        (s.series.container_id.clone(), s.series.gpu_uuid.clone()),
                        s.value,
                    );
                }
            }
        }
        let mut checked = 0;
        for c in fleet.containers() {
            for g in c.gpus.iter().filter(|g| g.mig_profile.is_empty()) {
                let got = last
                    .get(&(c.container_id.clone(), g.uuid.clone()))
                    .copied()
                    .unwrap_or(0.0);
                let used = (c.until_ms - c.started_at_ms) as f64 * GPU_WATTS as f64 / 1_000.0;
                let floor = used - 2.0 * TICK as f64 * GPU_WATTS as f64 / 1_000.0;
                assert!(
                    got <= used + 1e-6 && got >= floor - 1e-6,
                    "{c:?}: {got} J of {used} J"
                );
                // Between two ticks inside the run, the board drew exactly GPU_WATTS.
                assert_eq!(
                    got % (TICK as f64 * GPU_WATTS as f64 / 1_000.0),
                    0.0,
                    "{c:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 20, "{checked} holders checked");
    }

    /// A node whose agent is away reports, when it is back, the runs the kubelet still lists
    /// (each container's current run and the one before); the truth keeps the ones it lost.
    #[test]
    fn a_paused_node_reports_what_the_kubelet_still_lists() {
        let mut fleet = fleet(9, 2, (2_000, 40_000));
        let mut shown = BTreeSet::new();
        for i in 1..=60 {
            for n in 0..fleet.nodes() {
                // Node 1's agent is away from tick 20 to tick 39.
                if n == 1 && (20..40).contains(&i) {
                    continue;
                }
                for s in fleet.tick_node(n, i * 5_000).samples {
                    if s.kind == SampleKind::Allocation {
                        shown.insert(s.series.container_id);
                    }
                }
            }
        }
        let lost: Vec<&ContainerTruth> = fleet
            .containers()
            .filter(|c| !shown.contains(&c.container_id))
            .collect();
        assert!(
            lost.iter().any(|c| c.node == "node-001"
                && c.started_at_ms > 20 * 5_000
                && c.until_ms < 39 * 5_000),
            "the pause hid runs: {lost:?}"
        );
        for c in fleet.containers() {
            assert_eq!(c.listed, shown.contains(&c.container_id), "{c:?}");
        }
    }

    /// The pods are the Akash provider's: the lease is on the namespace and in env, not on the
    /// pod, and the agent finds it there.
    #[test]
    fn pods_are_shaped_as_the_akash_provider_creates_them() {
        let pod = akash_pod("tenant-1", 1000, 1, 2, "infer", 1_234);
        assert_eq!(pod.namespace.len(), 45);
        assert!(!pod.labels.keys().any(|k| k.contains("lease.id")));
        assert_eq!(pod.namespace_labels["akash.network/lease.id.dseq"], "1000");
        assert_eq!(pod.containers[0].env["AKASH_ORDER_SEQUENCE"], "2");
        assert_eq!(pod.started_at_ms, Some(1_000));
        let (batches, _) = run(2, 3, 15_000);
        let leases: BTreeSet<&str> = batches
            .iter()
            .flat_map(|b| &b.samples)
            .map(|s| s.series.lease.as_str())
            .collect();
        assert!(
            leases.contains("1000.1.1") && leases.contains("1001.1.5"),
            "{leases:?}"
        );
    }
}
