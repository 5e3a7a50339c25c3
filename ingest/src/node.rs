//! The node collector: every tick, reads each enabled source, attributes what it read to the
//! containers of this node and their identities, and makes the node's one [`SampleBatch`].
//!
//! - GPU allocations come from the pod-resources assignments (which container holds which
//!   GPU or MIG instance) and the kubelet's container runs (start and finish times, SPEC:
//!   allocation). A pending container (no run) holds nothing billable. A container's end is
//!   kept in memory: once its run is seen finished — in `state`, or in `lastState` after a
//!   restart — its allocations are sent with `finished_at`, even though the kubelet already
//!   lists the next run.
//!   A run pod-resources never showed (its pod started and ended between two ticks) is billed
//!   from its spec's GPU limits, when no agent can have billed it before
//!   (docs/metering-rules.md).
//! - Readings are addressed to containers by id (cgroup, NVML processes), by name
//!   (exporters), to pods (network) or to GPUs (NVML, DCGM without pod labels): each is resolved
//!   through the pods and the assignments, then given the container's identity
//!   ([`crate::attribution`]). A reading no container can be found for is counted and dropped —
//!   never published under an empty tenant.
//! - Counters that are running totals of something other than their container (a GPU board's
//!   energy, a pod's network) go through [`crate::totals`]: each holder is sent a counter of
//!   its own share, never what the board or the pod counted before it.
//! - A pod whose tenant or lease does not resolve is warned of once, with the template field
//!   that did not resolve, and counted in `/healthz` (`unattributed_pods`).
//! - A failing source is retried alone at the next tick (so an outage costs at most one tick
//!   more than it lasted; the warning is said once per outage); one that cannot exist on the
//!   node (no NVML) is said once and stays off.
//!   The kubelet's pods and the assignments are kept for a bounded time (`max_stale`) when
//!   their source fails, so a kubelet hiccup does not empty the inventory.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meterflow_schemas::{Sample, SampleBatch, SampleKind, SeriesId, metrics as m};
use tracing::{info, warn};

use crate::attribution::{Attribution, Identity};
use crate::metrics::{self, METRICS};
use crate::sources::kubelet::{Pod, Run};
use crate::sources::pod_resources::Assignment;
use crate::sources::{Collected, DraDevice, GpuInfo, Reading, Scope, Source, SourceError, Target};
use crate::totals::RunningTotals;

/// Who this node is, for every series it sends.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node: String,
    pub provider: String,
    pub agent_id: String,
}

/// A source and its health.
struct Guarded {
    source: Box<dyn Source>,
    failures: u32,
    retry_at_ms: i64,
    off: bool,
}

/// Something kept from a source until it is too old.
struct Cached<T> {
    value: Option<T>,
    at_ms: i64,
}

impl<T> Cached<T> {
    fn new() -> Self {
        Cached {
            value: None,
            at_ms: 0,
        }
    }

    fn set(&mut self, value: Option<T>, now_ms: i64) {
        if let Some(v) = value {
            self.value = Some(v);
            self.at_ms = now_ms;
        }
    }

    fn get(&self, now_ms: i64, max_stale: Duration) -> Option<&T> {
        self.value
            .as_ref()
            .filter(|_| now_ms - self.at_ms <= max_stale.as_millis() as i64)
    }
}

/// The GPUs a container run was seen holding.
#[derive(Debug, Clone)]
struct Held {
    series: Vec<SeriesId>,
    started_at_ms: i64,
}

/// The collector of one node.
pub struct NodeCollector {
    me: NodeIdentity,
    interval: Duration,
    max_stale: Duration,
    attribution: Attribution,
    gpu_resources: Vec<String>,
    sources: Vec<Guarded>,
    pods: Cached<Vec<Pod>>,
    assignments: Cached<Vec<Assignment>>,
    gpus: Cached<Vec<GpuInfo>>,
    gpu_processes: Cached<Vec<(String, String)>>,
    dra_devices: Cached<Vec<DraDevice>>,
    /// DRA devices no ResourceSlice describes yet (each warned of once).
    unresolved_dra: BTreeSet<String>,
    /// Container runs holding GPUs, by container id, until their pod is gone.
    held: BTreeMap<String, Held>,
    /// Board energy and pod network, differenced per board and pod.
    totals: RunningTotals,
    /// What each GPU is, as last learnt from NVML or an exporter's labels.
    known_gpus: BTreeMap<String, GpuInfo>,
    /// Pods (by UID) already checked for attribution: each is warned of once.
    checked: BTreeSet<String>,
    /// Pods whose started containers have no identity, at the latest tick.
    unattributed_pods: i64,
    /// Board energy no tenant held, since this collector started (joules).
    unheld_energy_joules: f64,
    /// This collector's first tick: a run that started since cannot have been seen by an
    /// agent before it.
    since_ms: Option<i64>,
    sequence: i64,
}

/// Where a reading or an allocation lands.
struct Resolved<'a> {
    pod: &'a Pod,
    container: String,
    container_id: String,
}

/// dcgm-exporter names a MIG instance by its parent GPU's UUID with the instance's profile
/// (`GPU_I_PROFILE`), while pod-resources names it by its own `MIG-…` UUID. A reading of a MIG
/// instance addressed to a container that holds exactly one instance of that profile is
/// readdressed to that instance: its class comes from the parent's model, and two pods' slices
/// of one GPU keep their own series.
fn name_mig_instances(readings: &mut [(String, Reading)], assignments: &[Assignment]) {
    let mut held: BTreeMap<(&str, &str, &str, &str), Vec<&str>> = BTreeMap::new();
    for a in assignments
        .iter()
        .filter(|a| !a.dra && !a.mig_profile().is_empty())
    {
        held.entry((&a.namespace, &a.pod, &a.container, a.mig_profile()))
            .or_default()
            .extend(a.device_ids.iter().map(String::as_str));
    }
    for (_, r) in readings.iter_mut() {
        let (
            Some(gpu),
            Target::Named {
                namespace,
                pod,
                container,
            },
        ) = (r.gpu.as_mut(), &r.target)
        else {
            continue;
        };
        if gpu.mig_profile.is_empty() || gpu.uuid.starts_with("MIG-") {
            continue;
        }
        if let Some([instance]) = held
            .get(&(
                namespace.as_str(),
                pod.as_str(),
                container.as_str(),
                gpu.mig_profile.as_str(),
            ))
            .map(Vec::as_slice)
        {
            gpu.uuid = instance.to_string();
        }
    }
}

/// The model of a GPU the node has, for a GPU named only by a spec's limits: the one model of
/// the node's MIG instances of `profile` (or of its whole GPUs, for an empty profile, or when
/// no instance of the profile is known), as NVML, the exporters or the ResourceSlices named
/// them; empty where the node has several (its class is then unpriced, and said so).
fn node_model(gpus: &BTreeMap<String, GpuInfo>, profile: &str) -> String {
    let models = |profile: &str| -> BTreeSet<&str> {
        gpus.values()
            .filter(|g| g.mig_profile == profile && !g.model.is_empty())
            .map(|g| g.model.as_str())
            .collect()
    };
    let mut found = models(profile);
    if found.is_empty() {
        found = models("");
    }
    match (found.len(), found.first()) {
        (1, Some(model)) => model.to_string(),
        _ => String::new(),
    }
}

/// The series of a container run on this node, without GPU fields.
fn container_series(me: &NodeIdentity, identity: &Identity, container_id: &str) -> SeriesId {
    SeriesId {
        tenant: identity.tenant.clone(),
        lease: identity.lease.clone(),
        service: identity.service.clone(),
        replica: identity.replica.clone(),
        node: me.node.clone(),
        provider: me.provider.clone(),
        container_id: container_id.to_string(),
        ..SeriesId::default()
    }
}

impl NodeCollector {
    /// Checks that no metric comes from two sources (it would be counted twice).
    pub fn new(
        me: NodeIdentity,
        interval: Duration,
        max_stale: Duration,
        attribution: Attribution,
        gpu_resources: Vec<String>,
        sources: Vec<Box<dyn Source>>,
    ) -> Result<Self, SourceError> {
        let mut yielded: BTreeMap<String, String> = BTreeMap::new();
        for s in &sources {
            for metric in s.metrics() {
                if let Some(other) = yielded.insert(metric.clone(), s.name().to_string()) {
                    return Err(SourceError::Config(format!(
                        "sources {other} and {} both yield {metric}: it would be counted twice; keep it in one of them with their `metrics` allow-lists",
                        s.name()
                    )));
                }
            }
        }
        // Each source's counters exist from the start at 0, so a rate or an alert over them
        // sees their first failure too.
        for s in &sources {
            METRICS.source_errors.with_label_values(&[s.name()]);
            METRICS.unattributed.with_label_values(&[s.name()]);
        }
        Ok(NodeCollector {
            me,
            interval,
            max_stale,
            attribution,
            gpu_resources,
            sources: sources
                .into_iter()
                .map(|source| Guarded {
                    source,
                    failures: 0,
                    retry_at_ms: 0,
                    off: false,
                })
                .collect(),
            pods: Cached::new(),
            assignments: Cached::new(),
            gpus: Cached::new(),
            gpu_processes: Cached::new(),
            dra_devices: Cached::new(),
            unresolved_dra: BTreeSet::new(),
            held: BTreeMap::new(),
            totals: RunningTotals::default(),
            known_gpus: BTreeMap::new(),
            checked: BTreeSet::new(),
            unattributed_pods: 0,
            unheld_energy_joules: 0.0,
            since_ms: None,
            sequence: 0,
        })
    }

    /// Reads every source that is due and makes the node's batch for `now_ms`.
    pub async fn tick(&mut self, now_ms: i64) -> SampleBatch {
        // The sources due are read side by side: one slow source delays the tick by its own
        // time (each has a timeout), not by the sum of all.
        let results = futures_util::future::join_all(self.sources.iter_mut().map(|g| async move {
            let due = !g.off && now_ms >= g.retry_at_ms;
            let result = if due {
                Some(g.source.collect().await)
            } else {
                None
            };
            (g, result)
        }))
        .await;
        let mut readings = Vec::new();
        for (g, result) in results {
            let Some(result) = result else { continue };
            let name = g.source.name().to_string();
            match result {
                Ok(collected) => {
                    if g.failures > 0 {
                        info!(source = %name, after = g.failures, "source recovered");
                    }
                    g.failures = 0;
                    metrics::set_source(&name, true);
                    let Collected {
                        readings: r,
                        pods,
                        assignments,
                        gpus,
                        gpu_processes,
                        dra_devices,
                    } = collected;
                    readings.extend(r.into_iter().map(|r| (name.clone(), r)));
                    self.pods.set(pods, now_ms);
                    self.assignments.set(assignments, now_ms);
                    self.gpus.set(gpus, now_ms);
                    self.gpu_processes.set(gpu_processes, now_ms);
                    self.dra_devices.set(dra_devices, now_ms);
                }
                Err(SourceError::Unavailable(why)) | Err(SourceError::Config(why)) => {
                    warn!(source = %name, %why, "source off for the life of this agent");
                    g.off = true;
                    metrics::set_source_off(&name);
                }
                Err(SourceError::Failed(why)) => {
                    g.failures += 1;
                    // Retried at the next tick: a doubling back-off would turn a 20 s outage
                    // into a 45 s hole. The warning is said once per outage.
                    let backoff = self.interval.as_millis() as i64;
                    g.retry_at_ms = now_ms + backoff;
                    METRICS.source_errors.with_label_values(&[&name]).inc();
                    if g.failures == 1 {
                        warn!(source = %name, %why, retry_in_ms = backoff, "source failed; retrying every tick, the others go on");
                    } else {
                        tracing::debug!(source = %name, %why, failures = g.failures, "source still failing");
                    }
                    metrics::set_source(&name, false);
                }
            }
        }
        self.check_attribution(now_ms);
        self.since_ms.get_or_insert(now_ms);
        self.totals.start(now_ms);
        let mut samples = self.attribute(now_ms, readings);
        samples.extend(self.reservations(now_ms));
        self.totals
            .forget_before(now_ms - self.max_stale.as_millis() as i64);
        self.sequence += 1;
        SampleBatch {
            node: self.me.node.clone(),
            agent_id: self.me.agent_id.clone(),
            sequence: self.sequence,
            collected_at_ms: now_ms,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            samples,
        }
    }

    /// The cores and memory every container run the kubelet lists requested, and those it is
    /// limited to, as allocations from the run's start to its finish (SPEC: allocation; the kubelet's times, whole
    /// seconds). Only from a pod list read this tick: a stale one would stretch a run that may
    /// have ended since, while the next fresh list extends a run still open over the gap (an
    /// interval runs from its start to its latest observation), so a kubelet outage loses
    /// nothing. A pod without identity is counted by [`Self::check_attribution`].
    fn reservations(&self, now_ms: i64) -> Vec<Sample> {
        let Some(pods) = self
            .pods
            .value
            .as_ref()
            .filter(|_| self.pods.at_ms == now_ms)
        else {
            return Vec::new();
        };
        let mut samples = Vec::new();
        for pod in pods {
            for c in &pod.containers {
                let requested = [
                    (m::CPU_REQUEST, c.requests.cpu_millicores, 1_000.0),
                    (m::MEMORY_REQUEST, c.requests.memory_bytes, 1.0),
                    (m::CPU_LIMIT, c.limited.cpu_millicores, 1_000.0),
                    (m::MEMORY_LIMIT, c.limited.memory_bytes, 1.0),
                ];
                let requested: Vec<(&str, f64)> = requested
                    .into_iter()
                    .filter_map(|(metric, held, per_unit)| {
                        Some((metric, held.filter(|h| *h > 0)? as f64 / per_unit))
                    })
                    .collect();
                if requested.is_empty() {
                    continue;
                }
                let Some(identity) = self.attribution.identify(pod, &c.name) else {
                    continue;
                };
                for run in c.current.iter().chain(c.previous.iter()) {
                    let series = container_series(&self.me, &identity, &run.container_id);
                    for (metric, value) in &requested {
                        samples.push(Sample {
                            series: series.clone(),
                            kind: SampleKind::Allocation,
                            metric: metric.to_string(),
                            value: *value,
                            // As for GPUs: observed now, the interval in started/finished.
                            timestamp_ms: now_ms,
                            started_at_ms: Some(run.started_at_ms),
                            finished_at_ms: run.finished_at_ms,
                        });
                    }
                }
            }
        }
        samples
    }

    /// Warns once per pod whose started containers have no identity (with the field and the
    /// placeholder that did not resolve) or whose placeholder alternatives disagree, and sets
    /// the count of unattributed pods.
    fn check_attribution(&mut self, now_ms: i64) {
        let Some(pods) = self.pods.get(now_ms, self.max_stale) else {
            return;
        };
        let mut unattributed = 0;
        for pod in pods {
            // A pod is checked once one of its containers has started (a pending pod's
            // attribution may still change, and nothing of it is billed yet).
            let mut started = pod
                .containers
                .iter()
                .filter(|c| c.current.is_some())
                .peekable();
            // A namespace left out of metering (the cluster's own) is no one's: not a warning.
            if started.peek().is_none() || !self.attribution.meters(&pod.namespace) {
                continue;
            }
            let mut missing = None;
            for c in started {
                if let Some(why) = self.attribution.why_unattributed(pod, &c.name) {
                    missing.get_or_insert((c.name.clone(), why));
                }
                if self.checked.contains(&pod.uid) {
                    continue;
                }
                for (field, conflict) in self.attribution.conflicts(pod, &c.name) {
                    METRICS
                        .attribution_conflicts
                        .with_label_values(&[field])
                        .inc();
                    warn!(
                        namespace = %pod.namespace, pod = %pod.name, container = %c.name, field,
                        placeholder = %conflict.placeholder, used = %conflict.used,
                        other = %conflict.other,
                        "the alternatives of an attribution placeholder disagree; the first is used"
                    );
                }
            }
            if let Some((container, why)) = missing {
                unattributed += 1;
                if !self.checked.contains(&pod.uid) {
                    warn!(
                        namespace = %pod.namespace, pod = %pod.name, %container, %why,
                        "pod not attributed: its readings are counted and dropped, never billed"
                    );
                }
            }
            self.checked.insert(pod.uid.clone());
        }
        self.checked
            .retain(|uid| pods.iter().any(|p| &p.uid == uid));
        self.unattributed_pods = unattributed;
    }

    /// Pods whose started containers have no identity at the latest tick (the agent's
    /// `/healthz` `unattributed_pods`; a process that runs many collectors, the simulator,
    /// leaves that gauge alone).
    pub fn unattributed_pods(&self) -> i64 {
        self.unattributed_pods
    }

    /// Board energy this collector gave no tenant since it started, in joules (its share of
    /// `meterflow_agent_unheld_energy_joules_total`).
    pub fn unheld_energy_joules(&self) -> f64 {
        self.unheld_energy_joules
    }

    /// Allocations and readings as samples of their containers' series.
    fn attribute(&mut self, now_ms: i64, mut readings: Vec<(String, Reading)>) -> Vec<Sample> {
        let mut samples = Vec::new();
        // Taken out while the closures below borrow the rest of the collector.
        let mut totals = std::mem::take(&mut self.totals);
        let mut unattributed = 0u64;
        let empty = Vec::new();
        let pods = self.pods.get(now_ms, self.max_stale).unwrap_or(&empty);
        let empty_a = Vec::new();
        let assignments = self
            .assignments
            .get(now_ms, self.max_stale)
            .unwrap_or(&empty_a);
        name_mig_instances(&mut readings, assignments);
        // What each GPU is: NVML's inventory first, then what exporters' labels say.
        let mut gpu_info: BTreeMap<String, GpuInfo> = self
            .gpus
            .get(now_ms, self.max_stale)
            .into_iter()
            .flatten()
            .map(|g| (g.uuid.clone(), g.clone()))
            .collect();
        for g in readings.iter().filter_map(|(_, r)| r.gpu.as_ref()) {
            if !g.model.is_empty() {
                gpu_info.entry(g.uuid.clone()).or_insert_with(|| g.clone());
            }
        }
        // DRA devices by driver and `POOL/DEVICE`, as pod-resources names them; their GPUs'
        // model and profile as the driver published them.
        let dra: BTreeMap<(&str, String), &GpuInfo> = self
            .dra_devices
            .get(now_ms, self.max_stale)
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    (d.driver.as_str(), format!("{}/{}", d.pool, d.name)),
                    &d.gpu,
                )
            })
            .collect();
        for g in dra.values() {
            gpu_info
                .entry(g.uuid.clone())
                .or_insert_with(|| (*g).clone());
        }
        // Then what was learnt before: a GPU keeps its model while the source that named it is
        // away, so its allocation keeps its series (and its price class) through the outage.
        for (uuid, info) in &self.known_gpus {
            gpu_info.entry(uuid.clone()).or_insert_with(|| info.clone());
        }
        self.known_gpus.clone_from(&gpu_info);

        // Container runs by id and by name.
        let mut by_id: BTreeMap<&str, (&Pod, &str, &Run)> = BTreeMap::new();
        let mut by_name: BTreeMap<(&str, &str, &str), (&Pod, &Run)> = BTreeMap::new();
        let mut previous_by_name: BTreeMap<(&str, &str, &str), (&Pod, &Run)> = BTreeMap::new();
        let mut first: BTreeMap<(&str, &str), (&str, &Run)> = BTreeMap::new();
        let mut uids: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for pod in pods {
            let mut names: Vec<&str> = Vec::new();
            for c in &pod.containers {
                for run in c.current.iter().chain(c.previous.iter()) {
                    by_id.insert(&run.container_id, (pod, &c.name, run));
                }
                if let Some(run) = &c.current {
                    by_name.insert((&pod.namespace, &pod.name, &c.name), (pod, run));
                    names.push(&c.name);
                }
                if let Some(run) = c.previous.as_ref().filter(|r| r.finished_at_ms.is_some()) {
                    previous_by_name.insert((&pod.namespace, &pod.name, &c.name), (pod, run));
                }
            }
            names.sort();
            if let Some(name) = names.first()
                && let Some((_, run)) =
                    by_name.get(&(pod.namespace.as_str(), pod.name.as_str(), *name))
            {
                first.insert((&pod.namespace, &pod.name), (name, run));
            }
            uids.insert(&pod.uid, (&pod.namespace, &pod.name));
        }
        let resolved = |pod: &'_ Pod, container: &str, run: &Run| -> Option<(Identity, String)> {
            let id = self.attribution.identify(pod, container)?;
            Some((id, run.container_id.clone()))
        };

        let series_of = |identity: &Identity, container_id: &str, gpu: Option<&GpuInfo>| {
            let gpu = gpu.map(|g| {
                // NVML knows the model and profile best; an exporter's or the assignment's
                // fill in what it lacks.
                let known = gpu_info.get(g.uuid.as_str());
                let model = known
                    .map(|k| k.model.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| g.model.clone());
                let mig = known
                    .map(|k| k.mig_profile.clone())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| g.mig_profile.clone());
                (g.uuid.clone(), model, mig)
            });
            let (uuid, model, mig) = gpu.unwrap_or_default();
            SeriesId {
                gpu_class: if uuid.is_empty() {
                    String::new()
                } else {
                    self.attribution.gpu_class(&model)
                },
                gpu_uuid: uuid,
                gpu_model: model,
                mig_profile: mig,
                ..container_series(&self.me, identity, container_id)
            }
        };

        // GPU holders: from the assignments, then from the processes NVML saw.
        let mut holder: BTreeMap<String, (&Pod, String, &Run)> = BTreeMap::new();
        let mut now_held: BTreeMap<String, Held> = BTreeMap::new();
        for a in assignments {
            if !a.dra && !crate::sources::pod_resources::is_gpu(&self.gpu_resources, &a.resource) {
                continue;
            }
            // The GPUs held: the device plugin names them by UUID; a DRA claim by its driver's
            // device name, resolved through the ResourceSlices. A DRA device no slice describes
            // yet is held back (its run's interval is sent whole once it is resolved).
            let devices: Vec<GpuInfo> = a
                .device_ids
                .iter()
                .filter_map(|device| {
                    if !a.dra {
                        return Some(GpuInfo {
                            uuid: device.clone(),
                            model: String::new(),
                            mig_profile: a.mig_profile().to_string(),
                        });
                    }
                    let found = dra.get(&(a.resource.as_str(), device.clone())).copied();
                    if found.is_none() && self.unresolved_dra.insert(device.clone()) {
                        warn!(driver = %a.resource, %device, namespace = %a.namespace, pod = %a.pod,
                            "a DRA device no ResourceSlice describes: not billed until one does (is sources.kubelet.resource_slices_url set?)");
                    }
                    found.cloned()
                })
                .collect();
            let key = (a.namespace.as_str(), a.pod.as_str(), a.container.as_str());
            // The devices stay assigned to the container across its restarts in the pod: the
            // run before the current one (in `lastState`) held them too, even one the agent
            // never saw running (a crash loop, a run between two ticks).
            let current = by_name.get(&key).copied();
            let previous = previous_by_name.get(&key).copied();
            if let Some((pod, run)) = current {
                for device in &devices {
                    holder.insert(device.uuid.clone(), (pod, a.container.clone(), run));
                }
            }
            for (pod, run) in current.into_iter().chain(previous) {
                let Some((identity, container_id)) = resolved(pod, &a.container, run) else {
                    unattributed += devices.len() as u64;
                    continue;
                };
                let held = now_held.entry(container_id.clone()).or_insert(Held {
                    series: Vec::new(),
                    started_at_ms: run.started_at_ms,
                });
                for info in &devices {
                    held.series
                        .push(series_of(&identity, &container_id, Some(info)));
                }
            }
        }
        // A run pod-resources never showed: its pod started and ended between two ticks and
        // left pod-resources with its devices. It is billed from its spec's GPU limits when
        // nothing else can have billed it: pod-resources answered this tick and assigns the
        // container nothing, this collector never saw the run hold a device, and the run
        // started after this collector's first tick (no agent before it can have seen it).
        let spec_fresh = self.assignments.at_ms == now_ms && self.assignments.value.is_some();
        let assigned: BTreeSet<(&str, &str, &str)> = assignments
            .iter()
            .map(|a| (a.namespace.as_str(), a.pod.as_str(), a.container.as_str()))
            .collect();
        for pod in pods.iter().filter(|_| spec_fresh) {
            for c in &pod.containers {
                if assigned.contains(&(pod.namespace.as_str(), pod.name.as_str(), c.name.as_str()))
                {
                    continue;
                }
                let limits: Vec<(&str, i64)> = c
                    .limits
                    .iter()
                    .filter(|(resource, n)| {
                        **n > 0
                            && crate::sources::pod_resources::is_gpu(&self.gpu_resources, resource)
                    })
                    .map(|(resource, n)| (resource.as_str(), *n))
                    .collect();
                if limits.is_empty() {
                    continue;
                }
                for run in c.current.iter().chain(c.previous.iter()) {
                    let unseen = run.finished_at_ms.is_some()
                        && !self.held.contains_key(&run.container_id)
                        && !now_held.contains_key(&run.container_id)
                        && self
                            .since_ms
                            .is_some_and(|since| run.started_at_ms >= since);
                    if !unseen {
                        continue;
                    }
                    let Some((identity, container_id)) = resolved(pod, &c.name, run) else {
                        unattributed += 1;
                        continue;
                    };
                    let mut series = Vec::new();
                    for (resource, n) in &limits {
                        let profile = crate::sources::pod_resources::mig_profile_of(resource);
                        for i in 0..*n {
                            let gpu = GpuInfo {
                                uuid: format!("spec:{}/{}/{resource}/{i}", pod.uid, c.name),
                                model: node_model(&gpu_info, profile),
                                mig_profile: profile.to_string(),
                            };
                            series.push(series_of(&identity, &container_id, Some(&gpu)));
                        }
                    }
                    now_held.insert(
                        container_id,
                        Held {
                            series,
                            started_at_ms: run.started_at_ms,
                        },
                    );
                }
            }
        }
        for (gpu, container_id) in self
            .gpu_processes
            .get(now_ms, self.max_stale)
            .into_iter()
            .flatten()
        {
            if let (false, Some(&(pod, name, run))) =
                (holder.contains_key(gpu), by_id.get(container_id.as_str()))
            {
                holder.insert(gpu.clone(), (pod, name.to_string(), run));
            }
        }
        // Runs seen holding GPUs before and now finished (or gone from the kubelet's list).
        for (id, held) in &now_held {
            self.held.insert(id.clone(), held.clone());
        }
        let mut ended = BTreeSet::new();
        for (id, held) in &self.held {
            let finished = by_id
                .get(id.as_str())
                .and_then(|(_, _, run)| run.finished_at_ms);
            let listed = by_id.contains_key(id.as_str());
            if !listed && !pods.is_empty() {
                // The pod is gone: the processor closes the run at its last observation.
                ended.insert(id.clone());
                continue;
            }
            if !listed {
                continue;
            }
            for series in &held.series {
                samples.push(Sample {
                    series: series.clone(),
                    kind: SampleKind::Allocation,
                    metric: m::GPU.into(),
                    value: 1.0,
                    // When it was observed, not when it ended: a run seen finished long after
                    // (a Job pod the kubelet still lists) must not look late to the processor;
                    // the interval itself is in started_at/finished_at.
                    timestamp_ms: now_ms,
                    started_at_ms: Some(held.started_at_ms),
                    finished_at_ms: finished,
                });
            }
        }
        for id in ended {
            self.held.remove(&id);
        }

        // A pod's own readings go to its first container.
        let first_of = |namespace: &str, pod: &str| {
            let &(name, run) = first.get(&(namespace, pod))?;
            let (pod, _) = by_name.get(&(namespace, pod, name))?;
            Some(Resolved {
                pod,
                container: name.to_string(),
                container_id: run.container_id.clone(),
            })
        };
        for (source, r) in readings {
            let target: Option<Resolved> = match &r.target {
                Target::Container(id) => by_id.get(id.as_str()).map(|&(pod, name, run)| Resolved {
                    pod,
                    container: name.to_string(),
                    container_id: run.container_id.clone(),
                }),
                Target::Named {
                    namespace,
                    pod,
                    container,
                } => by_name
                    .get(&(namespace.as_str(), pod.as_str(), container.as_str()))
                    .map(|&(pod, run)| Resolved {
                        pod,
                        container: container.clone(),
                        container_id: run.container_id.clone(),
                    }),
                Target::Pod { namespace, pod } => first_of(namespace, pod),
                Target::PodUid(uid) => uids
                    .get(uid.as_str())
                    .and_then(|(namespace, pod)| first_of(namespace, pod)),
                Target::Gpu(uuid) => holder.get(uuid).map(|(pod, name, run)| Resolved {
                    pod,
                    container: name.clone(),
                    container_id: run.container_id.clone(),
                }),
            };
            let pod_started_ms = target.as_ref().and_then(|t| t.pod.started_at_ms);
            let series = target.and_then(|t| {
                let id = self.attribution.identify(t.pod, &t.container)?;
                Some(series_of(&id, &t.container_id, r.gpu.as_ref()))
            });
            let value = match (&r.scope, r.kind) {
                (Scope::Pod(_) | Scope::Board(_), SampleKind::Counter) => {
                    let carry = totals.reading(
                        &r.scope,
                        &r.metric,
                        r.value,
                        series.as_ref(),
                        pod_started_ms,
                        now_ms,
                    );
                    if matches!(r.scope, Scope::Board(_)) && r.metric == m::ENERGY_JOULES {
                        METRICS.unheld_energy_joules.add(carry.unheld);
                        self.unheld_energy_joules += carry.unheld;
                    }
                    carry.sent
                }
                _ => Some(r.value),
            };
            let (Some(series), Some(value)) = (series, value) else {
                unattributed += 1;
                METRICS.unattributed.with_label_values(&[&source]).inc();
                continue;
            };
            samples.push(Sample {
                series,
                kind: r.kind,
                metric: r.metric,
                value,
                timestamp_ms: now_ms,
                started_at_ms: None,
                finished_at_ms: None,
            });
        }
        self.totals = totals;
        if unattributed > 0 {
            tracing::debug!(
                unattributed,
                "readings no container of this node could be found for"
            );
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::attribution::AttributionConfig;
    use crate::sources::cgroup::{CgroupConfig, CgroupSource};
    use crate::sources::kubelet::{KubeletConfig, KubeletSource};
    use crate::sources::pod_resources::{self, PodResourcesConfig, PodResourcesSource};
    use crate::sources::prometheus_scrape::{LabelNames, ScrapeConfig, Scraper};

    const PODS: &str = include_str!("sources/fixtures/kubelet-pods.json");

    fn id(prefix: &str) -> String {
        format!("{prefix}456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    }

    /// A one-route HTTP/1.1 server on loopback answering whatever `answer` holds now.
    async fn http(answer: Arc<Mutex<(u16, String)>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (status, body) = answer.lock().expect("answer").clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    /// A cgroup tree with the web pod's container (current run `aaaa…`) and a container no
    /// pod lists.
    fn cgroups(root: &std::path::Path) {
        let write = |dir: &std::path::Path, file: &str, text: &str| {
            std::fs::create_dir_all(dir).expect("dir");
            std::fs::write(dir.join(file), text).expect("file");
        };
        write(root, "cgroup.controllers", "cpu memory io\n");
        for (pod, container, usec) in [
            ("kubepods-pod7f1c2a3b_1111.slice", id("aaaa"), 90_000_000u64),
            ("kubepods-pod00000000_9999.slice", id("eeee"), 5_000_000),
        ] {
            let dir = root
                .join("kubepods.slice")
                .join(pod)
                .join(format!("cri-containerd-{container}.scope"));
            write(&dir, "cpu.stat", &format!("usage_usec {usec}\n"));
            write(&dir, "memory.current", "3000\n");
            write(&dir, "memory.stat", "inactive_file 1000\n");
            write(&dir, "io.stat", "259:0 rbytes=10 wbytes=20\n");
        }
    }

    #[tokio::test]
    async fn a_node_attributes_allocations_and_readings_and_survives_its_kubelet_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup_root = dir.path().join("cgroup");
        cgroups(&cgroup_root);
        let socket = dir.path().join("kubelet.sock");
        let grpc = pod_resources::fake::serve(socket.clone(), Ok(pod_resources::tests::fixture()))
            .await
            .expect("fake socket");
        let kubelet = Arc::new(Mutex::new((200, PODS.to_string())));
        let kubelet_url = http(kubelet.clone()).await;
        let dcgm = Arc::new(Mutex::new((
            200,
            include_str!("sources/fixtures/dcgm-exporter.txt").to_string(),
        )));
        let dcgm_url = http(dcgm.clone()).await;

        let sources: Vec<Box<dyn Source>> = vec![
            Box::new(
                KubeletSource::new(&KubeletConfig {
                    enabled: true,
                    pods_url: format!("{kubelet_url}/pods"),
                    token_file: None,
                    ..Default::default()
                })
                .expect("kubelet"),
            ),
            Box::new(PodResourcesSource::new(PodResourcesConfig {
                enabled: true,
                socket,
                ..Default::default()
            })),
            Box::new(
                CgroupSource::new(CgroupConfig {
                    enabled: true,
                    root: cgroup_root,
                    proc_root: None,
                    metrics: vec![],
                })
                .expect("cgroup"),
            ),
            Box::new(
                Scraper::new(&ScrapeConfig {
                    name: "dcgm".into(),
                    url: format!("{dcgm_url}/metrics"),
                    preset: "dcgm".into(),
                    map: vec![],
                    labels: LabelNames::default(),
                    metrics: vec![m::GPU_UTILIZATION.into()],
                })
                .expect("dcgm"),
            ),
        ];
        let attribution = Attribution::new(&AttributionConfig {
            preset: "akash".into(),
            gpu_classes: vec![("H100".into(), "h100".into())],
            ..Default::default()
        })
        .expect("rules");
        let mut node = NodeCollector::new(
            NodeIdentity {
                node: "gpu-node-1".into(),
                provider: "akash1provider".into(),
                agent_id: "gpu-node-1".into(),
            },
            Duration::from_secs(1),
            Duration::from_secs(600),
            attribution,
            PodResourcesConfig::default().gpu_resources,
            sources,
        )
        .expect("collector");
        let t0 = meterflow_schemas::time::parse_time("2026-11-23T10:10:00Z").expect("time");
        let started = meterflow_schemas::time::parse_time("2026-11-23T10:05:00Z").expect("time");

        let batch = node.tick(t0).await;
        assert_eq!((batch.node.as_str(), batch.sequence), ("gpu-node-1", 1));
        let allocations: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation && s.metric == m::GPU)
            .collect();
        // What the web container's spec requests (8 cores, 32 GiB), reserved by both its runs
        // over the same intervals as their GPUs, and its limits (the same in this pod's
        // spec), over them too; the trainer, no lease, reserves nothing here.
        // (metric, amount, container id's first characters, start, finish)
        type Reserved<'a> = (&'a str, f64, &'a str, Option<i64>, Option<i64>);
        let mut reserved: Vec<Reserved> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation && s.metric != m::GPU)
            .map(|s| {
                assert_eq!(s.series.lease, "18231234.1.1");
                assert_eq!(s.series.gpu_uuid, "");
                (
                    s.metric.as_str(),
                    s.value,
                    &s.series.container_id[..4],
                    s.started_at_ms,
                    s.finished_at_ms,
                )
            })
            .collect();
        reserved.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
        let before = (
            meterflow_schemas::time::parse_time("2026-11-23T10:00:00Z"),
            meterflow_schemas::time::parse_time("2026-11-23T10:04:30Z"),
        );
        let gib = (1u64 << 30) as f64;
        assert_eq!(
            reserved,
            vec![
                ("cpu_limit_cores", 8.0, "aaaa", Some(started), None),
                ("cpu_limit_cores", 8.0, "bbbb", before.0, before.1),
                ("cpu_request_cores", 8.0, "aaaa", Some(started), None),
                ("cpu_request_cores", 8.0, "bbbb", before.0, before.1),
                (
                    "memory_limit_bytes",
                    32.0 * gib,
                    "aaaa",
                    Some(started),
                    None
                ),
                ("memory_limit_bytes", 32.0 * gib, "bbbb", before.0, before.1),
                (
                    "memory_request_bytes",
                    32.0 * gib,
                    "aaaa",
                    Some(started),
                    None
                ),
                (
                    "memory_request_bytes",
                    32.0 * gib,
                    "bbbb",
                    before.0,
                    before.1
                ),
            ]
        );
        // The web container's two H100s, for its current run and for the run before its
        // restart (in `lastState`, 10:00:00 → 10:04:30); the trainer is not an Akash lease, so
        // not billed here.
        assert_eq!(allocations.len(), 4, "{allocations:#?}");
        let (gpus, before): (Vec<&Sample>, Vec<&Sample>) = allocations
            .iter()
            .partition(|s| s.series.container_id == id("aaaa"));
        assert_eq!(gpus.len(), 2, "{gpus:#?}");
        for b in &before {
            assert_eq!(b.series.container_id, id("bbbb"));
            assert_eq!(
                (b.started_at_ms, b.finished_at_ms),
                (
                    meterflow_schemas::time::parse_time("2026-11-23T10:00:00Z"),
                    meterflow_schemas::time::parse_time("2026-11-23T10:04:30Z")
                )
            );
        }
        for g in &gpus {
            assert_eq!(
                g.series.tenant,
                "akash1tenantaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            );
            assert_eq!(g.series.lease, "18231234.1.1");
            assert_eq!(g.series.service, "web");
            assert_eq!(g.series.container_id, id("aaaa"));
            assert_eq!(g.series.provider, "akash1provider");
            assert_eq!(g.started_at_ms, Some(started));
            assert_eq!(g.finished_at_ms, None);
            assert_eq!(g.metric, m::GPU);
            // The model and class come from DCGM's labels (NVML's, where it runs).
            assert_eq!(
                (g.series.gpu_model.as_str(), g.series.gpu_class.as_str()),
                ("NVIDIA H100 80GB HBM3", "h100")
            );
        }
        // cgroup: the web container's counters under its identity; the unknown container
        // is dropped, not billed to an empty tenant.
        let cpu: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.metric == m::CPU_SECONDS)
            .collect();
        assert_eq!(cpu.len(), 1);
        assert_eq!(cpu[0].value, 90.0);
        assert_eq!(cpu[0].series.lease, "18231234.1.1");
        let memory = batch
            .samples
            .iter()
            .find(|s| s.metric == m::MEMORY_BYTES)
            .expect("memory");
        assert_eq!(memory.value, 2000.0);
        // DCGM: utilization of the two held GPUs, with model and class from the labels.
        let util: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.metric == m::GPU_UTILIZATION)
            .collect();
        assert_eq!(util.len(), 2, "{util:#?}");
        assert!(util.iter().all(|s| s.series.gpu_class == "h100"
            && s.series.container_id == id("aaaa")
            && s.series.gpu_model == "NVIDIA H100 80GB HBM3"));
        assert!(batch.samples.iter().all(|s| !s.series.tenant.is_empty()));

        // The kubelet fails: its last pod list is used, the other sources go on, and the
        // failure shows in the source's health.
        // dcgm-exporter restarts meanwhile: the GPUs keep the model and class it named, so
        // their allocations stay one series each (no second, class-less one).
        *kubelet.lock().expect("answer") = (500, "oops".into());
        *dcgm.lock().expect("answer") = (503, "restarting".into());
        let kubelet_errors = METRICS.source_errors.with_label_values(&["kubelet"]).get();
        let batch = node.tick(t0 + 1_000).await;
        assert_eq!(batch.sequence, 2);
        let held: Vec<&Sample> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation)
            .collect();
        // The GPUs only: reservations wait for a pod list read at the tick (the next one
        // extends their intervals over the gap).
        assert_eq!(held.len(), 4);
        assert!(held.iter().all(|s| s.metric == m::GPU), "{held:#?}");
        assert!(
            held.iter()
                .all(|s| allocations.iter().any(|a| a.series == s.series)),
            "the same series as before the outage: {held:#?}"
        );
        assert!(batch.samples.iter().any(|s| s.metric == m::CPU_SECONDS));
        // The failure is counted (the gauge `source_up` is shared with the other tests of this
        // process that read a kubelet, so only the counter's growth is checked here).
        assert!(
            METRICS.source_errors.with_label_values(&["kubelet"]).get() > kubelet_errors,
            "the kubelet's failure is counted"
        );

        // The kubelet is back and the container restarted: the old run is sent finished,
        // the new one starts.
        let restarted = PODS
            .replacen(&id("bbbb"), &id("aaaa"), 1)
            .replacen("2026-11-23T10:04:30Z", "2026-11-23T10:10:01Z", 1)
            .replacen("2026-11-23T10:00:00Z", "2026-11-23T10:05:00Z", 1)
            .replacen(
                &format!("containerd://{}\",\n            \"state\": {{\"running\": {{\"startedAt\": \"2026-11-23T10:05:00Z\"", id("aaaa")),
                &format!("containerd://{}\",\n            \"state\": {{\"running\": {{\"startedAt\": \"2026-11-23T10:10:02Z\"", id("dddd")),
                1,
            );
        assert!(restarted.contains(&id("dddd")), "the fixture edit applied");
        *kubelet.lock().expect("answer") = (200, restarted);
        // Retried at the next tick (one interval after the failure).
        let batch = node.tick(t0 + 5_000).await;
        let allocations: Vec<(&str, Option<i64>, Option<i64>)> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation && s.metric == m::GPU)
            .map(|s| {
                (
                    &s.series.container_id[..4],
                    s.started_at_ms,
                    s.finished_at_ms,
                )
            })
            .collect();
        let finished = meterflow_schemas::time::parse_time("2026-11-23T10:10:01Z");
        let restarted_at = meterflow_schemas::time::parse_time("2026-11-23T10:10:02Z");
        assert_eq!(
            allocations
                .iter()
                .filter(|a| **a == ("aaaa", Some(started), finished))
                .count(),
            2,
            "{allocations:?}"
        );
        assert_eq!(
            allocations
                .iter()
                .filter(|a| **a == ("dddd", restarted_at, None))
                .count(),
            2,
            "{allocations:?}"
        );
        // Stamped with the tick that observed them, the finished run too: a run seen ended
        // long after its end must not look late to the processor.
        assert!(
            batch.samples.iter().all(|s| s.timestamp_ms == t0 + 5_000),
            "{:#?}",
            batch.samples
        );
        assert_eq!(METRICS.source_up.with_label_values(&["kubelet"]).get(), 1);
        grpc.abort();
    }

    /// The collector of `gpu-node-1` (15 s ticks) reading `kubelet` and the pod-resources
    /// socket at `socket`.
    fn kubelet_node(
        kubelet: KubeletConfig,
        socket: std::path::PathBuf,
        attribution: AttributionConfig,
    ) -> NodeCollector {
        let sources: Vec<Box<dyn Source>> = vec![
            Box::new(KubeletSource::new(&kubelet).expect("kubelet")),
            Box::new(PodResourcesSource::new(PodResourcesConfig {
                enabled: true,
                socket,
                ..Default::default()
            })),
        ];
        NodeCollector::new(
            NodeIdentity {
                node: "gpu-node-1".into(),
                provider: "p".into(),
                agent_id: "gpu-node-1".into(),
            },
            Duration::from_secs(15),
            Duration::from_secs(600),
            Attribution::new(&attribution).expect("rules"),
            PodResourcesConfig::default().gpu_resources,
            sources,
        )
        .expect("collector")
    }

    /// [`kubelet_node`] reading the pods at `{kubelet_url}/pods`, namespace preset.
    fn pods_node(kubelet_url: &str, socket: std::path::PathBuf) -> NodeCollector {
        kubelet_node(
            KubeletConfig {
                enabled: true,
                pods_url: format!("{kubelet_url}/pods"),
                token_file: None,
                ..Default::default()
            },
            socket,
            AttributionConfig::default(),
        )
    }

    /// A GPU allocation as the node tests compare it: the run's container id (its first four
    /// characters), what `gpu` says of its GPU, its start and its finish.
    type Allocation = (String, String, Option<i64>, Option<i64>);

    /// `batch`'s allocations, sorted.
    fn allocations(batch: &SampleBatch, gpu: impl Fn(&SeriesId) -> String) -> Vec<Allocation> {
        let mut found: Vec<Allocation> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation && s.metric == m::GPU)
            .map(|s| {
                (
                    s.series.container_id[..4].to_string(),
                    gpu(&s.series),
                    s.started_at_ms,
                    s.finished_at_ms,
                )
            })
            .collect();
        found.sort();
        found
    }

    /// A crash-looping container: the kubelet shows it waiting, its last run (which the agent
    /// never saw running) in `lastState`. The device plugin's GPUs stay assigned to the
    /// container, so that run is billed from its start to its finish.
    #[tokio::test]
    async fn a_run_seen_only_in_last_state_is_billed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let grpc = pod_resources::fake::serve(socket.clone(), Ok(pod_resources::tests::fixture()))
            .await
            .expect("fake socket");
        let pods = |id: &str, started: &str, finished: &str| {
            serde_json::json!({"items": [{
                "metadata": {"name": "train-42-8xq4d", "namespace": "research", "uid": "u-1",
                    "ownerReferences": [{"kind": "Job", "name": "train-42", "controller": true}]},
                "status": {"phase": "Running", "startTime": "2026-11-23T10:00:01Z",
                    "containerStatuses": [{"name": "trainer", "restartCount": 3,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                            "startedAt": started, "finishedAt": finished,
                            "containerID": format!("containerd://{id}")}}}]}
            }]})
            .to_string()
        };
        let kubelet = Arc::new(Mutex::new((
            200,
            pods(&id("cccc"), "2026-11-23T10:00:03Z", "2026-11-23T10:00:09Z"),
        )));
        let mut node = pods_node(&http(kubelet.clone()).await, socket);
        let at = |t: &str| meterflow_schemas::time::parse_time(t).expect("time");
        let allocations = |batch: &SampleBatch| allocations(batch, |s| s.mig_profile.clone());
        let batch = node.tick(at("2026-11-23T10:00:15Z")).await;
        assert_eq!(
            allocations(&batch),
            vec![(
                "cccc".into(),
                "1g.10gb".into(),
                Some(at("2026-11-23T10:00:03Z")),
                Some(at("2026-11-23T10:00:09Z"))
            )]
        );
        assert_eq!(batch.samples[0].series.lease, "train-42");
        // It restarted and failed again between two ticks: the new run is billed, the old
        // one is no longer listed and no longer sent.
        *kubelet.lock().expect("answer") = (
            200,
            pods(&id("eeee"), "2026-11-23T10:00:20Z", "2026-11-23T10:00:26Z"),
        );
        let batch = node.tick(at("2026-11-23T10:00:30Z")).await;
        assert_eq!(
            allocations(&batch),
            vec![(
                "eeee".into(),
                "1g.10gb".into(),
                Some(at("2026-11-23T10:00:20Z")),
                Some(at("2026-11-23T10:00:26Z"))
            )]
        );
        grpc.abort();
    }

    /// Two Job pods the agent never saw running, both finished and gone from pod-resources:
    /// the kubelet lists them Succeeded with their spec. The one that started after the
    /// agent's first tick is billed from its spec's `nvidia.com/gpu: 2` (two GPUs, from its
    /// start to its finish as the kubelet shows them); the one that started before is not (an
    /// agent before this one may have billed it), nor is a pod without GPU limits.
    #[tokio::test]
    async fn a_pod_wholly_between_two_ticks_is_billed_from_its_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let grpc = pod_resources::fake::serve(socket.clone(), Ok(pod_resources::tests::fixture()))
            .await
            .expect("fake socket");
        let job = |name: &str, uid: &str, container: &str, started: &str, finished: &str, gpus| {
            serde_json::json!({
                "metadata": {"name": name, "namespace": "research", "uid": uid,
                    "ownerReferences": [{"kind": "Job", "name": name, "controller": true}]},
                "spec": {"containers": [{"name": "render", "resources": {
                    "limits": if gpus { serde_json::json!({"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}) }
                        else { serde_json::json!({"cpu": "4"}) }}}]},
                "status": {"phase": "Succeeded", "startTime": started,
                    "containerStatuses": [{"name": "render", "restartCount": 0,
                        "containerID": format!("containerd://{container}"),
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                            "startedAt": started, "finishedAt": finished}},
                        "lastState": {}}]}
            })
        };
        let kubelet = Arc::new(Mutex::new((200, r#"{"items": []}"#.to_string())));
        let mut node = pods_node(&http(kubelet.clone()).await, socket);
        let at = |t: &str| meterflow_schemas::time::parse_time(t).expect("time");
        // The agent's first tick: none of the jobs is listed yet.
        let batch = node.tick(at("2026-11-23T10:00:15Z")).await;
        assert!(
            !batch
                .samples
                .iter()
                .any(|s| s.kind == SampleKind::Allocation)
        );
        let (new, old, cpu) = (id("dddd"), id("eeee"), id("ffff"));
        *kubelet.lock().expect("answer") = (
            200,
            serde_json::json!({"items": [
                job("render-1", "u-5", &new, "2026-11-23T10:00:17Z", "2026-11-23T10:00:26Z", true),
                job("render-0", "u-4", &old, "2026-11-23T10:00:05Z", "2026-11-23T10:00:12Z", true),
                job("cpu-only", "u-6", &cpu, "2026-11-23T10:00:18Z", "2026-11-23T10:00:24Z", false),
            ]})
            .to_string(),
        );
        for tick in ["2026-11-23T10:00:30Z", "2026-11-23T10:00:45Z"] {
            let batch = node.tick(at(tick)).await;
            let allocations = allocations(&batch, |s| s.gpu_uuid.clone());
            let run = |gpu: &str| {
                (
                    "dddd".to_string(),
                    format!("spec:u-5/render/nvidia.com/gpu/{gpu}"),
                    Some(at("2026-11-23T10:00:17Z")),
                    Some(at("2026-11-23T10:00:26Z")),
                )
            };
            // Sent again while the kubelet lists it: the same series and interval, counted once.
            assert_eq!(allocations, vec![run("0"), run("1")], "at {tick}");
            let s = batch
                .samples
                .iter()
                .find(|s| s.kind == SampleKind::Allocation && s.metric == m::GPU)
                .expect("one");
            assert_eq!(
                (s.series.tenant.as_str(), s.series.lease.as_str()),
                ("research", "render-1")
            );
        }
        grpc.abort();
    }

    /// GPUs a container got through DRA claims (a whole H100 and an A100's MIG device): while
    /// the API server does not answer for the ResourceSlices they are held back; once it does,
    /// each is billed from the run's start with the model and profile its slice gives.
    #[tokio::test]
    async fn dra_devices_are_billed_as_gpus_once_their_slice_is_known() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let grpc =
            pod_resources::fake::serve(socket.clone(), Ok(pod_resources::tests::dra_fixture()))
                .await
                .expect("fake socket");
        let pods = serde_json::json!({"items": [{
            "metadata": {"name": "infer-0", "namespace": "research", "uid": "u-2",
                "ownerReferences": [{"kind": "StatefulSet", "name": "infer", "controller": true}]},
            "status": {"phase": "Running", "startTime": "2026-11-23T10:00:01Z",
                "containerStatuses": [{"name": "server", "restartCount": 0,
                    "containerID": format!("containerd://{}", id("abab")),
                    "state": {"running": {"startedAt": "2026-11-23T10:00:04Z"}}, "lastState": {}}]}
        }]})
        .to_string();
        let slices = Arc::new(Mutex::new((503u16, String::new())));
        let addr = crate::sources::testing::serve(
            axum::Router::new()
                .route("/pods", axum::routing::get(move || async move { pods }))
                .route(
                    "/resourceslices",
                    crate::sources::testing::answering(slices.clone()),
                ),
        )
        .await;
        let mut node = kubelet_node(
            KubeletConfig {
                enabled: true,
                pods_url: format!("http://{addr}/pods"),
                token_file: None,
                resource_slices_url: Some(format!("http://{addr}/resourceslices")),
                api_ca_file: None,
                api_refresh: Duration::ZERO,
                ..Default::default()
            },
            socket,
            AttributionConfig {
                gpu_classes: vec![
                    ("H100".into(), "h100".into()),
                    ("A100".into(), "a100".into()),
                ],
                ..Default::default()
            },
        );
        let at = |t: &str| meterflow_schemas::time::parse_time(t).expect("time");
        let batch = node.tick(at("2026-11-23T10:00:15Z")).await;
        assert!(
            batch
                .samples
                .iter()
                .all(|s| s.kind != SampleKind::Allocation),
            "held back while no slice says what the devices are: {:#?}",
            batch.samples
        );
        *slices.lock().expect("lock") = (
            200,
            include_str!("sources/fixtures/resource-slices.json").to_string(),
        );
        let batch = node.tick(at("2026-11-23T10:00:30Z")).await;
        let mut held: Vec<(String, String, String, Option<i64>)> = batch
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Allocation && s.metric == m::GPU)
            .map(|s| {
                (
                    s.series.gpu_uuid.clone(),
                    s.series.gpu_class.clone(),
                    s.series.mig_profile.clone(),
                    s.started_at_ms,
                )
            })
            .collect();
        held.sort();
        let started = Some(at("2026-11-23T10:00:04Z"));
        assert_eq!(
            held,
            vec![
                (
                    "GPU-9d2b4c6e-1f3a-4b5c-8d7e-0a1b2c3d4e5f".into(),
                    "h100".into(),
                    String::new(),
                    started
                ),
                (
                    "MIG-4e5f6a7b-8c9d-5e0f-a1b2-c3d4e5f6a7b8".into(),
                    "a100".into(),
                    "1g.10gb".into(),
                    started
                ),
            ]
        );
        grpc.abort();
    }

    /// Two pods each hold one `1g.10gb` slice of the same A100; dcgm-exporter names both by the
    /// parent's UUID. Each reading goes to its pod's own slice; a container holding two slices
    /// of one profile cannot be told apart and is left as the exporter named it.
    #[test]
    fn dcgm_mig_readings_are_readdressed_to_the_slice_their_container_holds() {
        let assignment = |pod: &str, ids: &[&str]| Assignment {
            namespace: "research".into(),
            pod: pod.into(),
            container: "main".into(),
            resource: "nvidia.com/mig-1g.10gb".into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            dra: false,
        };
        let reading = |pod: &str| {
            (
                "dcgm".to_string(),
                Reading {
                    target: Target::Named {
                        namespace: "research".into(),
                        pod: pod.into(),
                        container: "main".into(),
                    },
                    gpu: Some(GpuInfo {
                        uuid: "GPU-55555555-eeee".into(),
                        model: "NVIDIA A100-SXM4-80GB".into(),
                        mig_profile: "1g.10gb".into(),
                    }),
                    kind: SampleKind::Gauge,
                    metric: m::GPU_UTILIZATION.into(),
                    value: 0.5,
                    scope: Scope::Container,
                },
            )
        };
        let assignments = [
            assignment("a", &["MIG-aaaa"]),
            assignment("b", &["MIG-bbbb"]),
            assignment("c", &["MIG-cccc", "MIG-dddd"]),
        ];
        let mut readings = vec![reading("a"), reading("b"), reading("c")];
        name_mig_instances(&mut readings, &assignments);
        let uuids: Vec<&str> = readings
            .iter()
            .map(|(_, r)| r.gpu.as_ref().expect("gpu").uuid.as_str())
            .collect();
        assert_eq!(uuids, ["MIG-aaaa", "MIG-bbbb", "GPU-55555555-eeee"]);
        assert!(
            readings
                .iter()
                .all(|(_, r)| r.gpu.as_ref().expect("gpu").model == "NVIDIA A100-SXM4-80GB")
        );
    }
}
