//! The cgroup v2 source: per-container CPU, memory and block-I/O readings from the kubepods
//! hierarchy of a node (issue 3; SPEC: the three kinds of sample).
//!
//! [`scan`] walks the hierarchy under a root (`/sys/fs/cgroup` on a cgroup v2 node) and reads,
//! for every container cgroup below a pod cgroup:
//! - `cpu.stat` `usage_usec` → `cpu_usage_seconds_total` (counter), and `throttled_usec` →
//!   `cpu_throttled_seconds_total` (counter; only where the cpu controller is enabled, which
//!   is where a CPU limit can throttle);
//! - `memory.current` less `memory.stat` `inactive_file` → `memory_working_set_bytes` (gauge,
//!   the kubelet's definition), and `memory.stat` `anon` → `memory_rss_bytes` (gauge, what
//!   cAdvisor reports as RSS on cgroup v2);
//! - `io.stat` `rbytes`/`wbytes` summed over devices → `fs_read_bytes_total` /
//!   `fs_write_bytes_total` (counters);
//! - the pod cgroup's `memory.events` `oom_kill` → `memory_oom_kills_total` (counter), once
//!   per pod: a container the OOM killer ends takes its own cgroup with it, usually before the
//!   next reading, while the pod's counts its containers' kills and outlives them;
//! - with the host's `/proc`, the pod's network namespace (`/proc/PID/net/dev`, all interfaces
//!   but `lo`) → `network_receive_bytes_total` / `network_transmit_bytes_total` and
//!   `network_receive_errors_total` / `network_transmit_errors_total` (counters), once per pod
//!   ([`add_network`]).
//!
//! A pod's counters (network, OOM kills) are the pod's ([`PodReading`]): the node gives them to
//! the pod's first container as the kubelet lists it, never to a cgroup the kubelet does not
//! list (containerd's sandbox, the pause container, has its own scope in the pod's slice), and
//! they count from the pod's start.
//!
//! Both layouts of the kubelet are understood: the systemd driver
//! (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
//! and the cgroupfs driver (`kubepods/burstable/pod<uid>/<id>`). A file that is missing or
//! unreadable leaves its reading absent — never zero — and is reported in
//! [`Scan::problems`]; one container's trouble never hides another's readings.

use std::path::{Path, PathBuf};

use meterflow_schemas::SampleKind;
use meterflow_schemas::metrics as m;
use serde::Deserialize;

use super::{BoxFuture, Collected, Reading, Source, SourceError, Target};

/// One container's readings; `None` where the file was missing or unreadable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerReading {
    /// The pod's UID as the API server writes it (dashes, not the systemd driver's underscores).
    pub pod_uid: String,
    /// The container runtime's id (64 hex digits for containerd, CRI-O and Docker).
    pub container_id: String,
    /// The cgroup directory read.
    pub path: PathBuf,
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub memory_working_set_bytes: Option<f64>,
    pub memory_rss_bytes: Option<f64>,
    pub fs_read_bytes: Option<f64>,
    pub fs_write_bytes: Option<f64>,
}

/// A pod's own readings, by its UID; `None` where not read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodReading {
    pub pod_uid: String,
    /// The OOM kills its cgroup's `memory.events` counts.
    pub oom_kills: Option<f64>,
    /// Bytes and errors of its network namespace ([`add_network`]).
    pub network: Option<NetDev>,
}

/// A network namespace's totals over its interfaces but `lo`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetDev {
    pub receive_bytes: f64,
    pub transmit_bytes: f64,
    pub receive_errors: f64,
    pub transmit_errors: f64,
}

/// What one walk found.
#[derive(Debug, Default)]
pub struct Scan {
    pub containers: Vec<ContainerReading>,
    /// The pods with at least one container read.
    pub pods: Vec<PodReading>,
    /// Files that could not be read or parsed: path and why.
    pub problems: Vec<(PathBuf, String)>,
}

/// Why the source cannot read a root at all.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{0} is not a cgroup v2 hierarchy (no cgroup.controllers); point the cgroup source's root at the unified mount (on hybrid nodes /sys/fs/cgroup/unified)"
    )]
    NotV2(PathBuf),
}

/// The pod UID in a pod cgroup's directory name, for both kubelet drivers.
pub fn pod_uid(dir_name: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod1234_5678.slice, kubepods-pod1234_5678.slice
    if let Some(rest) = dir_name.strip_suffix(".slice") {
        let uid = rest.rsplit_once("-pod")?.1;
        return valid_uid(uid).then(|| uid.replace('_', "-"));
    }
    // cgroupfs: pod1234-5678
    let uid = dir_name.strip_prefix("pod")?;
    valid_uid(uid).then(|| uid.to_string())
}

fn valid_uid(uid: &str) -> bool {
    uid.len() >= 8
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
}

/// The container id in a container cgroup's directory name (`cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, or the bare id); `None` for the pause container's
/// siblings that are not containers (`crio-conmon-…`) and for anything else.
pub fn container_id(dir_name: &str) -> Option<String> {
    let id = match dir_name.strip_suffix(".scope") {
        Some(scope) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|p| scope.strip_prefix(p))?,
        None => dir_name,
    };
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
}

/// Walks `root` (a cgroup v2 mount) and reads every container of every pod below it.
pub fn scan(root: &Path) -> Result<Scan, CgroupError> {
    if !root.join("cgroup.controllers").is_file() {
        return Err(CgroupError::NotV2(root.to_path_buf()));
    }
    let mut out = Scan::default();
    walk(root, None, &mut out, 0);
    out.containers
        .sort_by(|a, b| (&a.pod_uid, &a.container_id).cmp(&(&b.pod_uid, &b.container_id)));
    out.pods.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
    Ok(out)
}

/// Deep enough for every kubelet layout; a bound against a hierarchy that loops.
const MAX_DEPTH: usize = 8;

fn walk(dir: &Path, pod: Option<&str>, out: &mut Scan, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            // A pod or container that ended between listing and reading: not a problem.
            if e.kind() != std::io::ErrorKind::NotFound {
                out.problems.push((dir.to_path_buf(), e.to_string()));
            }
            return;
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for child in dirs {
        let name = child
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match (pod, pod_uid(&name), container_id(&name)) {
            (Some(pod), _, Some(id)) => {
                let reading = read_container(&child, pod, id, out);
                out.containers.push(reading);
            }
            (None, Some(uid), _) => {
                let before = out.containers.len();
                walk(&child, Some(&uid), out, depth + 1);
                if out.containers.len() > before {
                    let oom_kills = oom_kills(&child, out);
                    out.pods.push(PodReading {
                        pod_uid: uid,
                        oom_kills,
                        network: None,
                    });
                }
            }
            (None, None, _) => walk(&child, None, out, depth + 1),
            // Inside a pod, what is not a container (the systemd driver's helpers) is skipped.
            (Some(_), _, None) => {}
        }
    }
}

fn read_container(dir: &Path, pod: &str, id: String, out: &mut Scan) -> ContainerReading {
    let mut problem = |file: &str, why: String| out.problems.push((dir.join(file), why));
    let (cpu, throttled) = match read(dir, "cpu.stat") {
        Ok(text) => {
            let cpu = field(&text, "usage_usec").map(|usec| usec / 1e6);
            if cpu.is_none() {
                problem("cpu.stat", "no usage_usec".into());
            }
            // Absent where the cpu controller is not enabled: nothing can throttle there.
            (cpu, field(&text, "throttled_usec").map(|usec| usec / 1e6))
        }
        Err(why) => {
            problem("cpu.stat", why);
            (None, None)
        }
    };
    let stat = read(dir, "memory.stat");
    let memory = match (read(dir, "memory.current").as_ref(), stat.as_ref()) {
        (Ok(current), Ok(stat)) => {
            match (current.trim().parse::<f64>(), field(stat, "inactive_file")) {
                (Ok(current), Some(inactive)) => Some((current - inactive).max(0.0)),
                _ => {
                    problem(
                        "memory.current",
                        "unparseable memory.current or no inactive_file in memory.stat".into(),
                    );
                    None
                }
            }
        }
        (Err(why), _) | (_, Err(why)) => {
            problem("memory.current", why.clone());
            None
        }
    };
    let rss = stat.as_deref().ok().and_then(|stat| field(stat, "anon"));
    let (read_bytes, write_bytes) = match read(dir, "io.stat") {
        Ok(text) => {
            let sum = |key: &str| {
                text.lines()
                    .flat_map(str::split_whitespace)
                    .filter_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<f64>().ok())
                    .sum::<f64>()
            };
            (Some(sum("rbytes")), Some(sum("wbytes")))
        }
        Err(why) => {
            problem("io.stat", why);
            (None, None)
        }
    };
    ContainerReading {
        pod_uid: pod.to_string(),
        container_id: id,
        path: dir.to_path_buf(),
        cpu_usage_seconds: cpu,
        cpu_throttled_seconds: throttled,
        memory_working_set_bytes: memory,
        memory_rss_bytes: rss,
        fs_read_bytes: read_bytes,
        fs_write_bytes: write_bytes,
    }
}

/// The OOM kills a pod cgroup's `memory.events` counts (hierarchically: its containers'
/// too, unless the hierarchy is mounted with `memory_localevents`).
fn oom_kills(pod_dir: &Path, out: &mut Scan) -> Option<f64> {
    match read(pod_dir, "memory.events") {
        Ok(text) => field(&text, "oom_kill").or_else(|| {
            out.problems
                .push((pod_dir.join("memory.events"), "no oom_kill".into()));
            None
        }),
        Err(why) => {
            out.problems.push((pod_dir.join("memory.events"), why));
            None
        }
    }
}

fn read(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file)).map_err(|e| e.to_string())
}

/// The value of `key` in a flat-keyed file (`key value` per line).
fn field(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

impl ContainerReading {
    /// The readings of this container: counters and a gauge, only for what was read.
    pub fn readings(&self) -> Vec<Reading> {
        [
            (SampleKind::Counter, m::CPU_SECONDS, self.cpu_usage_seconds),
            (
                SampleKind::Counter,
                m::CPU_THROTTLED_SECONDS,
                self.cpu_throttled_seconds,
            ),
            (
                SampleKind::Gauge,
                m::MEMORY_BYTES,
                self.memory_working_set_bytes,
            ),
            (SampleKind::Gauge, m::MEMORY_RSS, self.memory_rss_bytes),
            (
                SampleKind::Counter,
                m::STORAGE_READ_BYTES,
                self.fs_read_bytes,
            ),
            (
                SampleKind::Counter,
                m::STORAGE_WRITE_BYTES,
                self.fs_write_bytes,
            ),
        ]
        .into_iter()
        .filter_map(|(kind, metric, value)| {
            Some(Reading {
                target: Target::Container(self.container_id.clone()),
                gpu: None,
                kind,
                metric: metric.to_string(),
                value: value?,
                scope: super::Scope::Container,
            })
        })
        .collect()
    }
}

impl PodReading {
    /// The pod's counters, only for what was read: the pod's (given to its first container),
    /// counting from the pod's start, not a container's.
    pub fn readings(&self) -> Vec<Reading> {
        let net = |f: fn(&NetDev) -> f64| self.network.as_ref().map(f);
        [
            (m::OOM_KILLS, self.oom_kills),
            (m::NETWORK_RECEIVE_BYTES, net(|n| n.receive_bytes)),
            (m::NETWORK_TRANSMIT_BYTES, net(|n| n.transmit_bytes)),
            (m::NETWORK_RECEIVE_ERRORS, net(|n| n.receive_errors)),
            (m::NETWORK_TRANSMIT_ERRORS, net(|n| n.transmit_errors)),
        ]
        .into_iter()
        .filter_map(|(metric, value)| {
            Some(Reading {
                target: Target::PodUid(self.pod_uid.clone()),
                gpu: None,
                kind: SampleKind::Counter,
                metric: metric.to_string(),
                value: value?,
                scope: super::Scope::Pod(self.pod_uid.clone()),
            })
        })
        .collect()
    }
}

/// Bytes and errors received and sent on every interface but `lo` in a `/proc/PID/net/dev`
/// text.
pub fn net_dev(text: &str) -> Option<NetDev> {
    let mut sums = NetDev::default();
    for line in text.lines().skip(2) {
        let (name, counters) = line.split_once(':')?;
        if name.trim() == "lo" {
            continue;
        }
        let fields: Vec<f64> = counters
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes packets errs drop fifo colls carrier compressed.
        sums.receive_bytes += *fields.first()?;
        sums.receive_errors += *fields.get(2)?;
        sums.transmit_bytes += *fields.get(8)?;
        sums.transmit_errors += *fields.get(10)?;
    }
    Some(sums)
}

/// Adds network bytes and errors to the pods of `scan`: each pod's network namespace is read
/// once, through the first process of one of its containers (any: they all share it, the
/// sandbox's too); a pod in the host's network namespace (`hostNetwork`) gets none — the
/// node's traffic is not a tenant's. Needs the host's `/proc` (`hostPID`).
pub fn add_network(scan: &mut Scan, proc_root: &Path) {
    let netns = |pid: &str| {
        std::fs::read_link(proc_root.join(pid).join("ns/net"))
            .ok()
            .map(|l| l.to_string_lossy().into_owned())
    };
    let host = netns("1");
    for pod in &mut scan.pods {
        let first_process = scan
            .containers
            .iter()
            .filter(|c| c.pod_uid == pod.pod_uid)
            .find_map(|c| {
                let procs = std::fs::read_to_string(c.path.join("cgroup.procs")).ok()?;
                let pid = procs.lines().next()?.to_string();
                let ns = netns(&pid)?;
                Some((pid, ns))
            });
        let Some((pid, ns)) = first_process else {
            continue;
        };
        if Some(&ns) == host.as_ref() {
            continue;
        }
        let path = proc_root.join(&pid).join("net/dev");
        match std::fs::read_to_string(&path) {
            Ok(text) => match net_dev(&text) {
                Some(totals) => pod.network = Some(totals),
                None => scan.problems.push((path, "unparseable".into())),
            },
            Err(e) => scan.problems.push((path, e.to_string())),
        }
    }
}

/// `[sources.cgroup]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    pub enabled: bool,
    /// The cgroup v2 mount (on hybrid nodes, `/sys/fs/cgroup/unified`).
    pub root: PathBuf,
    /// The host's `/proc`, for network bytes; none read when absent.
    pub proc_root: Option<PathBuf>,
    /// Only these metrics are kept (empty: all).
    pub metrics: Vec<String>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: false,
            root: "/sys/fs/cgroup".into(),
            proc_root: Some("/proc".into()),
            metrics: Vec::new(),
        }
    }
}

/// Every metric this source can yield.
pub const METRICS: [&str; 11] = [
    m::CPU_SECONDS,
    m::CPU_THROTTLED_SECONDS,
    m::MEMORY_BYTES,
    m::MEMORY_RSS,
    m::STORAGE_READ_BYTES,
    m::STORAGE_WRITE_BYTES,
    m::OOM_KILLS,
    m::NETWORK_RECEIVE_BYTES,
    m::NETWORK_TRANSMIT_BYTES,
    m::NETWORK_RECEIVE_ERRORS,
    m::NETWORK_TRANSMIT_ERRORS,
];

/// The cgroup source.
pub struct CgroupSource {
    config: CgroupConfig,
    /// Files seen failing, so each is logged once, not every tick.
    reported: std::collections::BTreeSet<PathBuf>,
}

impl CgroupSource {
    pub fn new(config: CgroupConfig) -> Result<Self, SourceError> {
        super::check_allow_list(
            "sources.cgroup.metrics",
            "a cgroup metric",
            &METRICS,
            &config.metrics,
        )?;
        Ok(CgroupSource {
            config,
            reported: Default::default(),
        })
    }

    fn read(&mut self) -> Result<Collected, SourceError> {
        let mut scan = scan(&self.config.root).map_err(|e| SourceError::Failed(e.to_string()))?;
        if let Some(proc_root) = &self.config.proc_root {
            add_network(&mut scan, proc_root);
        }
        for (path, why) in &scan.problems {
            if self.reported.insert(path.clone()) {
                tracing::warn!(path = %path.display(), why, "a cgroup file could not be read; that reading is absent");
            }
        }
        let readings = (scan.containers.iter())
            .flat_map(ContainerReading::readings)
            .chain(scan.pods.iter().flat_map(PodReading::readings))
            .filter(|r| super::allows(&self.config.metrics, &r.metric))
            .collect();
        Ok(Collected {
            readings,
            ..Default::default()
        })
    }
}

impl Source for CgroupSource {
    fn name(&self) -> &str {
        "cgroup"
    }

    fn metrics(&self) -> Vec<String> {
        super::allowed(&METRICS, &self.config.metrics)
    }

    fn collect(&mut self) -> BoxFuture<'_, Result<Collected, SourceError>> {
        let result = self.read();
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID_B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn write(path: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(path).expect("fixture dir");
        std::fs::write(path.join(file), text).expect("fixture file");
    }

    /// A container's files as a 6.x kernel writes them; `cpu.stat` without the cpu
    /// controller's lines (nothing to throttle).
    fn container(dir: &Path, cpu_usec: u64, current: u64, inactive: u64) {
        write(
            dir,
            "cpu.stat",
            &format!(
                "usage_usec {cpu_usec}\nuser_usec 1\nsystem_usec 2\ncore_sched.force_idle_usec 0\n"
            ),
        );
        write(dir, "memory.current", &format!("{current}\n"));
        write(
            dir,
            "memory.stat",
            &format!("anon 5\nfile 9\ninactive_file {inactive}\nactive_file 3\n"),
        );
        write(
            dir,
            "io.stat",
            "8:0 rbytes=1000 wbytes=24 rios=3 wios=1 dbytes=0 dios=0\n259:0 rbytes=500 wbytes=6 rios=1 wios=1\n",
        );
    }

    /// A pod cgroup's `memory.events`.
    fn pod_events(dir: &Path, oom_kill: u64) {
        write(
            dir,
            "memory.events",
            &format!(
                "low 0\nhigh 0\nmax 14\noom {oom_kill}\noom_kill {oom_kill}\noom_group_kill 0\n"
            ),
        );
    }

    #[test]
    fn names_of_both_kubelet_drivers_are_understood() {
        assert_eq!(
            pod_uid("kubepods-burstable-pod3f1a2b4c_1111_2222_3333_444455556666.slice").as_deref(),
            Some("3f1a2b4c-1111-2222-3333-444455556666")
        );
        assert_eq!(
            pod_uid("kubepods-pod0a0b0c0d_0000.slice").as_deref(),
            Some("0a0b0c0d-0000")
        );
        assert_eq!(
            pod_uid("pod3f1a2b4c-1111-2222").as_deref(),
            Some("3f1a2b4c-1111-2222")
        );
        assert_eq!(pod_uid("kubepods-burstable.slice"), None);
        assert_eq!(pod_uid("podman"), None);
        assert_eq!(
            container_id(&format!("cri-containerd-{ID_A}.scope")).as_deref(),
            Some(ID_A)
        );
        assert_eq!(
            container_id(&format!("crio-{ID_A}.scope")).as_deref(),
            Some(ID_A)
        );
        assert_eq!(container_id(ID_B).as_deref(), Some(ID_B));
        assert_eq!(container_id(&format!("crio-conmon-{ID_A}.scope")), None);
        assert_eq!(container_id("init.scope"), None);
    }

    #[test]
    fn a_systemd_tree_and_a_cgroupfs_tree_give_each_containers_readings() {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        write(r, "cgroup.controllers", "cpu memory io\n");
        let pod = r.join(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaa1111_2222.slice",
        );
        container(
            &pod.join(format!("cri-containerd-{ID_A}.scope")),
            2_500_000,
            4096,
            1024,
        );
        // The pod's own files and a helper scope are not containers.
        write(&pod, "cpu.stat", "usage_usec 999999999\n");
        write(
            &pod.join("crio-conmon-x.scope"),
            "cpu.stat",
            "usage_usec 1\n",
        );
        pod_events(&pod, 0);
        let cgroupfs = r.join("kubepods/besteffort/podbbbb2222-3333");
        container(&cgroupfs.join(ID_B), 7_000_000, 1000, 5000);
        pod_events(&cgroupfs, 2);
        // A cgroup outside kubepods with a container-like name: no pod above it, not read.
        container(
            &r.join("system.slice").join(format!("docker-{ID_A}.scope")),
            1,
            1,
            0,
        );

        let scan = scan(r).expect("a v2 root");
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        let got: Vec<_> = scan
            .containers
            .iter()
            .map(|c| {
                (
                    c.pod_uid.as_str(),
                    &c.container_id[..4],
                    c.cpu_usage_seconds,
                    c.memory_working_set_bytes,
                    c.fs_read_bytes,
                    c.fs_write_bytes,
                    c.memory_rss_bytes,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "aaaa1111-2222",
                    "0123",
                    Some(2.5),
                    Some(3072.0),
                    Some(1500.0),
                    Some(30.0),
                    Some(5.0),
                ),
                // Inactive file pages above the usage: a working set of zero, not negative.
                (
                    "bbbb2222-3333",
                    "fedc",
                    Some(7.0),
                    Some(0.0),
                    Some(1500.0),
                    Some(30.0),
                    Some(5.0),
                ),
            ]
        );
        let kills: Vec<_> = (scan.pods.iter())
            .map(|p| (p.pod_uid.as_str(), p.oom_kills))
            .collect();
        assert_eq!(
            kills,
            [("aaaa1111-2222", Some(0.0)), ("bbbb2222-3333", Some(2.0))]
        );
        // Without the cpu controller's lines, no throttling is read (not a zero).
        assert!(
            scan.containers
                .iter()
                .all(|c| c.cpu_throttled_seconds.is_none())
        );
    }

    /// What a limited container and its pod add: the cpu controller's throttling, and the
    /// OOM kills the pod counts once, the pod's (for the container whose cgroup the kill
    /// removed as well).
    #[test]
    fn throttling_rss_and_a_pods_oom_kills_are_read() {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        write(r, "cgroup.controllers", "cpuset cpu io memory pids\n");
        let pod = r.join("kubepods/burstable/poddddd4444-5555");
        for id in [ID_A, ID_B] {
            let dir = pod.join(id);
            container(&dir, 9_000_000, 8_192_000, 0);
            write(
                &dir,
                "cpu.stat",
                "usage_usec 9000000\nuser_usec 8000000\nsystem_usec 1000000\ncore_sched.force_idle_usec 0\nnr_periods 400\nnr_throttled 37\nthrottled_usec 1850000\nnr_bursts 0\nburst_usec 0\n",
            );
            write(
                &dir,
                "memory.stat",
                "anon 6291456\nfile 1048576\nkernel 180224\nkernel_stack 16384\nsock 0\nshmem 0\nfile_mapped 0\ninactive_anon 6291456\nactive_anon 0\ninactive_file 1048576\nactive_file 0\n",
            );
        }
        pod_events(&pod, 3);
        let scan = scan(r).expect("a v2 root");
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        let got: Vec<_> = scan
            .containers
            .iter()
            .map(|c| {
                (
                    c.cpu_throttled_seconds,
                    c.memory_rss_bytes,
                    c.memory_working_set_bytes,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some(1.85), Some(6_291_456.0), Some(7_143_424.0)),
                (Some(1.85), Some(6_291_456.0), Some(7_143_424.0)),
            ]
        );
        assert_eq!(scan.pods.len(), 1);
        let readings = scan.pods[0].readings();
        let kills: Vec<_> = readings
            .iter()
            .map(|r| (&r.target, r.kind, r.metric.as_str(), r.value, &r.scope))
            .collect();
        assert_eq!(
            kills,
            [(
                &Target::PodUid("dddd4444-5555".into()),
                SampleKind::Counter,
                m::OOM_KILLS,
                3.0,
                &super::super::Scope::Pod("dddd4444-5555".into())
            )]
        );
        // A pod cgroup without memory.events (no memory controller there): no kills read,
        // and the file is named.
        std::fs::remove_file(pod.join("memory.events")).expect("remove");
        let again = super::scan(r).expect("a v2 root");
        assert_eq!(again.pods[0].oom_kills, None);
        assert_eq!(again.problems.len(), 1);
        assert!(again.problems[0].0.ends_with("memory.events"));
    }

    #[test]
    fn a_missing_or_broken_file_leaves_that_reading_absent_and_says_so() {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        write(r, "cgroup.controllers", "cpu memory\n");
        let dir = r.join("kubepods/podcccc3333/").join(ID_A);
        container(&dir, 1_000_000, 10, 1);
        pod_events(&r.join("kubepods/podcccc3333"), 0);
        std::fs::remove_file(dir.join("io.stat")).expect("remove");
        write(&dir, "memory.stat", "anon 5\n");
        let scan = scan(r).expect("a v2 root");
        let c = &scan.containers[0];
        assert_eq!(
            (
                c.cpu_usage_seconds,
                c.memory_working_set_bytes,
                c.fs_read_bytes
            ),
            (Some(1.0), None, None)
        );
        let files: Vec<String> = scan
            .problems
            .iter()
            .filter_map(|(p, _)| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(files, vec!["memory.current", "io.stat"]);
        // Absent readings are no samples at all, never zeros.
        let readings = c.readings();
        let metrics: Vec<&str> = readings.iter().map(|s| s.metric.as_str()).collect();
        assert_eq!(metrics, vec!["cpu_usage_seconds_total", "memory_rss_bytes"]);
        assert_eq!(
            (readings[0].kind, readings[0].value),
            (SampleKind::Counter, 1.0)
        );
    }

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 999999     100    9    0    0     0          0         0   999999     100    9    0    0     0       0          0
  eth0: 6000        50    2    1    0     0          0         0     3000      40    1    0    0     0       0          0
  net1: 1000        10    1    0    0     0          0         0      500       5    0    3    0     0       0          0
";

    #[test]
    fn net_dev_sums_every_interface_but_loopback() {
        assert_eq!(
            net_dev(NET_DEV),
            Some(NetDev {
                receive_bytes: 7000.0,
                transmit_bytes: 3500.0,
                receive_errors: 3.0,
                transmit_errors: 1.0,
            })
        );
        assert_eq!(net_dev("a\nb\n  eth0: 1 2 x\n"), None);
    }

    /// The pod's network, the pod's: read through any of its containers and given to none
    /// of them by id (the node gives it to the pod's first container as the kubelet lists
    /// it), so containerd's sandbox (the pause container, its own scope in the pod, in the
    /// pod's namespace, an id the kubelet does not list) does not take it.
    #[test]
    fn network_is_read_once_per_pod_and_never_for_the_hosts_namespace() {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path().join("cgroup");
        let proc_root = root.path().join("proc");
        write(&r, "cgroup.controllers", "cpu memory io\n");
        let pod = r.join("kubepods/burstable/podaaaa1111-2222");
        // Two containers of one pod and its sandbox (one network namespace), one hostNetwork
        // pod.
        let host_pod = r.join("kubepods/burstable/podcccc3333-4444");
        let (id_c, sandbox) = ("c".repeat(64), "0".repeat(64));
        for (dir, pid) in [
            (pod.join(&sandbox), "90"),
            (pod.join(ID_A), "100"),
            (pod.join(ID_B), "200"),
            (host_pod.join(&id_c), "300"),
        ] {
            container(&dir, 1_000_000, 10, 0);
            write(&dir, "cgroup.procs", &format!("{pid}\n"));
        }
        for (pid, ns) in [
            ("1", "net:[1]"),
            ("90", "net:[7]"),
            ("100", "net:[7]"),
            ("200", "net:[7]"),
            ("300", "net:[1]"),
        ] {
            let dir = proc_root.join(pid);
            std::fs::create_dir_all(dir.join("ns")).expect("dir");
            std::os::unix::fs::symlink(ns, dir.join("ns/net")).expect("link");
            write(&dir.join("net"), "dev", NET_DEV);
        }
        let mut scan = scan(&r).expect("v2");
        add_network(&mut scan, &proc_root);
        let net: Vec<_> = scan
            .pods
            .iter()
            .map(|p| {
                (
                    p.pod_uid.as_str(),
                    p.network.map(|n| (n.receive_bytes, n.transmit_bytes)),
                )
            })
            .collect();
        assert_eq!(
            net,
            vec![
                ("aaaa1111-2222", Some((7000.0, 3500.0))),
                ("cccc3333-4444", None),
            ]
        );
        let mut source = CgroupSource::new(CgroupConfig {
            enabled: true,
            root: r.clone(),
            proc_root: Some(proc_root.clone()),
            metrics: vec![m::NETWORK_RECEIVE_BYTES.into(), m::CPU_SECONDS.into()],
        })
        .expect("valid");
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(source.collect())
            .expect("read");
        // Four CPU counters (the sandbox's too: the node finds no container of it) and one
        // network counter, the pod's; the allow-list left out the rest.
        assert_eq!(collected.readings.len(), 5);
        assert_eq!(
            collected
                .readings
                .iter()
                .filter(|r| r.metric == m::NETWORK_RECEIVE_BYTES)
                .map(|r| (&r.target, &r.scope))
                .collect::<Vec<_>>(),
            [(
                &Target::PodUid("aaaa1111-2222".into()),
                &super::super::Scope::Pod("aaaa1111-2222".into())
            )]
        );
        let e = CgroupSource::new(CgroupConfig {
            metrics: vec!["gpu_utilization".into()],
            ..Default::default()
        })
        .err()
        .expect("not a cgroup metric");
        assert!(
            e.to_string()
                .starts_with("sources.cgroup.metrics: `gpu_utilization`")
        );
    }

    #[test]
    fn a_root_that_is_not_cgroup_v2_is_refused_with_what_to_do() {
        let root = tempfile::tempdir().expect("temp dir");
        let e = scan(root.path()).expect_err("no cgroup.controllers");
        assert!(e.to_string().contains("unified"), "{e}");
    }

    /// This machine's own hierarchy, whatever it offers: a v2 mount (pure or hybrid) is walked
    /// without a problem and its root `cpu.stat` parses; without one, the refusal says why.
    #[test]
    fn this_machines_own_cgroup_hierarchy_is_read() {
        let v2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .map(Path::new)
            .into_iter()
            .find(|p| p.join("cgroup.controllers").is_file());
        match v2 {
            Some(root) => {
                let scan = scan(root).expect("a v2 root");
                // No kubelet here, usually: whatever containers there are were read fully.
                for c in &scan.containers {
                    assert!(c.cpu_usage_seconds.is_some(), "{c:?}");
                }
                let cpu = read(root, "cpu.stat").expect("the root's cpu.stat");
                assert!(field(&cpu, "usage_usec").is_some_and(|u| u > 0.0), "{cpu}");
            }
            None => {
                let e = scan(Path::new("/sys/fs/cgroup")).expect_err("not v2");
                assert!(matches!(e, CgroupError::NotV2(_)));
            }
        }
    }
}
