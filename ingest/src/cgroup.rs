//! The cgroup v2 source: per-container CPU, memory and block-I/O readings from the kubepods
//! hierarchy of a node (issue 3; SPEC: the three kinds of sample).
//!
//! [`scan`] walks the hierarchy under a root (`/sys/fs/cgroup` on a cgroup v2 node) and reads,
//! for every container cgroup below a pod cgroup:
//! - `cpu.stat` `usage_usec` → `cpu_usage_seconds_total` (counter);
//! - `memory.current` less `memory.stat` `inactive_file` → `memory_working_set_bytes` (gauge,
//!   the kubelet's definition);
//! - `io.stat` `rbytes`/`wbytes` summed over devices → `fs_read_bytes_total` /
//!   `fs_write_bytes_total` (counters).
//!
//! Both layouts of the kubelet are understood: the systemd driver
//! (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`)
//! and the cgroupfs driver (`kubepods/burstable/pod<uid>/<id>`). A file that is missing or
//! unreadable leaves its reading absent — never zero — and is reported in
//! [`Scan::problems`]; one container's trouble never hides another's readings.

use std::path::{Path, PathBuf};

use meterflow_schemas::{Sample, SampleKind, SeriesId};

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
    pub memory_working_set_bytes: Option<f64>,
    pub fs_read_bytes: Option<f64>,
    pub fs_write_bytes: Option<f64>,
}

/// What one walk found.
#[derive(Debug, Default)]
pub struct Scan {
    pub containers: Vec<ContainerReading>,
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
            (None, Some(uid), _) => walk(&child, Some(&uid), out, depth + 1),
            (None, None, _) => walk(&child, None, out, depth + 1),
            // Inside a pod, what is not a container (the systemd driver's helpers) is skipped.
            (Some(_), _, None) => {}
        }
    }
}

fn read_container(dir: &Path, pod: &str, id: String, out: &mut Scan) -> ContainerReading {
    let mut problem = |file: &str, why: String| out.problems.push((dir.join(file), why));
    let cpu = match read(dir, "cpu.stat") {
        Ok(text) => field(&text, "usage_usec")
            .map(|usec| usec / 1e6)
            .or_else(|| {
                problem("cpu.stat", "no usage_usec".into());
                None
            }),
        Err(why) => {
            problem("cpu.stat", why);
            None
        }
    };
    let memory = match (read(dir, "memory.current"), read(dir, "memory.stat")) {
        (Ok(current), Ok(stat)) => {
            match (current.trim().parse::<f64>(), field(&stat, "inactive_file")) {
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
            problem("memory.current", why);
            None
        }
    };
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
        memory_working_set_bytes: memory,
        fs_read_bytes: read_bytes,
        fs_write_bytes: write_bytes,
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
    /// The readings as samples of `series` (from the attribution of this container) at
    /// `at_ms`: counters and a gauge, only for what was read.
    pub fn samples(&self, series: &SeriesId, at_ms: i64) -> Vec<Sample> {
        [
            (
                SampleKind::Counter,
                "cpu_usage_seconds_total",
                self.cpu_usage_seconds,
            ),
            (
                SampleKind::Gauge,
                "memory_working_set_bytes",
                self.memory_working_set_bytes,
            ),
            (
                SampleKind::Counter,
                "fs_read_bytes_total",
                self.fs_read_bytes,
            ),
            (
                SampleKind::Counter,
                "fs_write_bytes_total",
                self.fs_write_bytes,
            ),
        ]
        .into_iter()
        .filter_map(|(kind, metric, value)| {
            Some(Sample {
                series: series.clone(),
                kind,
                metric: metric.to_string(),
                value: value?,
                timestamp_ms: at_ms,
                started_at_ms: None,
                finished_at_ms: None,
            })
        })
        .collect()
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

    fn container(dir: &Path, cpu_usec: u64, current: u64, inactive: u64) {
        write(
            dir,
            "cpu.stat",
            &format!("usage_usec {cpu_usec}\nuser_usec 1\nsystem_usec 2\n"),
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
        let cgroupfs = r.join("kubepods/besteffort/podbbbb2222-3333");
        container(&cgroupfs.join(ID_B), 7_000_000, 1000, 5000);
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
                    Some(30.0)
                ),
                // Inactive file pages above the usage: a working set of zero, not negative.
                (
                    "bbbb2222-3333",
                    "fedc",
                    Some(7.0),
                    Some(0.0),
                    Some(1500.0),
                    Some(30.0)
                ),
            ]
        );
    }

    #[test]
    fn a_missing_or_broken_file_leaves_that_reading_absent_and_says_so() {
        let root = tempfile::tempdir().expect("temp dir");
        let r = root.path();
        write(r, "cgroup.controllers", "cpu memory\n");
        let dir = r.join("kubepods/podcccc3333/").join(ID_A);
        container(&dir, 1_000_000, 10, 1);
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
        let samples = c.samples(&SeriesId::default(), 42);
        let metrics: Vec<&str> = samples.iter().map(|s| s.metric.as_str()).collect();
        assert_eq!(metrics, vec!["cpu_usage_seconds_total"]);
        assert_eq!(
            (samples[0].kind, samples[0].value),
            (SampleKind::Counter, 1.0)
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
