//! The NVML source: per GPU and per MIG instance the engine-active ratio, memory used and
//! total, the copy engine's busy ratio, temperature and SM clock, power and the board's
//! total-energy counter, and which containers run processes on each — through NVIDIA's
//! management library, loaded at run time (`libnvidia-ml.so.1`).
//!
//! Where the library or the driver is missing the source says so once and stays off; the
//! agent runs on. A reading NVML does not support on a device (utilization of a MIG instance
//! on most drivers) is absent, never zero. Energy and power are board-level: read on the
//! physical GPU, never on or summed across its MIG instances; on a GPU split into instances
//! they stay with the board (unattributed) rather than being given to each instance; so do the
//! temperature and the SM clock, which are the chip's.
//!
//! The pure parts — turning device snapshots into readings, a process's cgroup into its
//! container — are tested on fixtures; the NVML calls need a GPU (checked on one by hand, see
//! the closing notes of issue 3).

use std::path::{Path, PathBuf};

use meterflow_schemas::SampleKind;
use meterflow_schemas::metrics as m;
use serde::Deserialize;

use super::{BoxFuture, Collected, GpuInfo, Reading, Source, SourceError, Target};

/// `[sources.nvml]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    pub enabled: bool,
    /// The library to load; the system's `libnvidia-ml.so.1` when absent.
    pub library: Option<PathBuf>,
    /// Where the host's `/proc` is (the agent runs with `hostPID`), to find a GPU process's
    /// container.
    pub proc_root: PathBuf,
    /// Only these metrics are kept (empty: all).
    pub metrics: Vec<String>,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig {
            enabled: false,
            library: None,
            proc_root: "/proc".into(),
            metrics: Vec::new(),
        }
    }
}

/// Every metric this source can yield.
pub const METRICS: [&str; 8] = [
    m::GPU_UTILIZATION,
    m::VRAM_BYTES,
    m::VRAM_TOTAL,
    m::GPU_COPY_UTILIZATION,
    m::GPU_TEMPERATURE,
    m::GPU_SM_CLOCK,
    "gpu_power_watts",
    m::ENERGY_JOULES,
];

/// What was read of one GPU or MIG instance; `None` where NVML did not answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub gpu: GpuInfo,
    /// The physical GPU's UUID for a MIG instance; empty for a GPU.
    pub parent_uuid: String,
    /// Whether the GPU is split into MIG instances (its own readings are then board-level).
    pub mig_enabled: bool,
    pub utilization: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    /// The copy engine's busy ratio, 0..1.
    pub copy_utilization: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub power_watts: Option<f64>,
    pub energy_joules: Option<f64>,
    /// Processes using it.
    pub pids: Vec<u32>,
}

/// The readings of `snapshots`, keeping only `allowed` metrics (all when empty).
pub fn readings(snapshots: &[Snapshot], allowed: &[String]) -> Vec<Reading> {
    let mut out = Vec::new();
    for s in snapshots {
        let board_only = s.mig_enabled;
        let values = [
            (
                SampleKind::Gauge,
                m::GPU_UTILIZATION,
                s.utilization,
                !board_only,
            ),
            (
                SampleKind::Gauge,
                m::VRAM_BYTES,
                s.memory_used_bytes,
                !board_only,
            ),
            (
                SampleKind::Gauge,
                m::VRAM_TOTAL,
                s.memory_total_bytes,
                !board_only,
            ),
            (
                SampleKind::Gauge,
                m::GPU_COPY_UTILIZATION,
                s.copy_utilization,
                !board_only,
            ),
            // Temperature, clock, power and energy exist for physical GPUs only; on a split
            // GPU they are the board's and stay unattributed (no holder holds the board's
            // UUID).
            (
                SampleKind::Gauge,
                m::GPU_TEMPERATURE,
                s.temperature_celsius,
                s.parent_uuid.is_empty(),
            ),
            (
                SampleKind::Gauge,
                m::GPU_SM_CLOCK,
                s.sm_clock_mhz,
                s.parent_uuid.is_empty(),
            ),
            (
                SampleKind::Gauge,
                "gpu_power_watts",
                s.power_watts,
                s.parent_uuid.is_empty(),
            ),
            (
                SampleKind::Counter,
                m::ENERGY_JOULES,
                s.energy_joules,
                s.parent_uuid.is_empty(),
            ),
        ];
        for (kind, metric, value, applies) in values {
            let (Some(value), true) = (value, applies) else {
                continue;
            };
            if !super::allows(allowed, metric) {
                continue;
            }
            out.push(Reading {
                target: Target::Gpu(s.gpu.uuid.clone()),
                gpu: Some(s.gpu.clone()),
                kind,
                metric: metric.into(),
                value,
                // The board's total since the driver loaded, not its holder's.
                scope: if metric == m::ENERGY_JOULES {
                    super::Scope::Board(s.gpu.uuid.clone())
                } else {
                    super::Scope::Container
                },
            });
        }
    }
    out
}

/// The container a process runs in, from `/proc/PID/cgroup` under `proc_root`.
pub fn container_of(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|line| {
        // `0::/kubepods.slice/…/cri-containerd-<id>.scope` (v2), or `N:controllers:/path` (v1).
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(super::cgroup::container_id)
    })
}

/// The MIG profile in a MIG device's name (`NVIDIA A100-SXM4-40GB MIG 1g.5gb` → `1g.5gb`).
pub fn mig_profile(name: &str) -> String {
    name.rsplit_once(" MIG ")
        .map(|(_, p)| p.trim().to_string())
        .unwrap_or_default()
}

/// The source: NVML loaded on first use.
pub struct NvmlSource {
    config: NvmlConfig,
    nvml: Option<nvml_wrapper::Nvml>,
}

impl NvmlSource {
    pub fn new(config: NvmlConfig) -> Result<Self, SourceError> {
        super::check_allow_list(
            "sources.nvml.metrics",
            "an NVML metric",
            &METRICS,
            &config.metrics,
        )?;
        Ok(NvmlSource { config, nvml: None })
    }

    fn load(&mut self) -> Result<&nvml_wrapper::Nvml, SourceError> {
        if self.nvml.is_none() {
            let mut builder = nvml_wrapper::Nvml::builder();
            if let Some(path) = &self.config.library {
                builder.lib_path(path.as_os_str());
            }
            let nvml = builder.init().map_err(|e| {
                let library = self
                    .config
                    .library
                    .as_ref()
                    .map_or("libnvidia-ml.so.1".to_string(), |p| p.display().to_string());
                SourceError::Unavailable(format!(
                    "NVML cannot be loaded from {library} ({e}); no GPU readings from NVML on this node (set sources.nvml.enabled = false where there are no NVIDIA GPUs)"
                ))
            })?;
            self.nvml = Some(nvml);
        }
        self.nvml
            .as_ref()
            .ok_or_else(|| SourceError::Failed("NVML not loaded".into()))
    }

    /// Reads every GPU and MIG instance.
    fn snapshots(&mut self) -> Result<Vec<Snapshot>, SourceError> {
        let nvml = self.load()?;
        let failed = |what: &str, e: nvml_wrapper::error::NvmlError| {
            SourceError::Failed(format!("NVML {what}: {e}"))
        };
        let count = nvml.device_count().map_err(|e| failed("device count", e))?;
        let mut out = Vec::new();
        for index in 0..count {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| failed("device handle", e))?;
            let uuid = device.uuid().map_err(|e| failed("uuid", e))?;
            let model = device.name().unwrap_or_default();
            let mig_enabled = device.mig_mode().is_ok_and(|mode| mode.current == 1);
            let utilization = device.utilization_rates().ok();
            let memory = device.memory_info().ok();
            let pids = |d: &nvml_wrapper::Device| {
                d.running_compute_processes()
                    .map(|ps| ps.iter().map(|p| p.pid).collect())
                    .unwrap_or_default()
            };
            out.push(Snapshot {
                gpu: GpuInfo {
                    uuid: uuid.clone(),
                    model: model.clone(),
                    mig_profile: String::new(),
                },
                parent_uuid: String::new(),
                mig_enabled,
                utilization: utilization.as_ref().map(|u| f64::from(u.gpu) / 100.0),
                memory_used_bytes: memory.as_ref().map(|mem| mem.used as f64),
                memory_total_bytes: memory.as_ref().map(|mem| mem.total as f64),
                copy_utilization: utilization.as_ref().map(|u| f64::from(u.memory) / 100.0),
                temperature_celsius: device
                    .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                    .ok()
                    .map(f64::from),
                sm_clock_mhz: device
                    .clock_info(nvml_wrapper::enum_wrappers::device::Clock::SM)
                    .ok()
                    .map(f64::from),
                power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                energy_joules: device
                    .total_energy_consumption()
                    .ok()
                    .map(|mj| mj as f64 / 1000.0),
                pids: if mig_enabled {
                    Vec::new()
                } else {
                    pids(&device)
                },
            });
            if !mig_enabled {
                continue;
            }
            let slots = device.mig_device_count().unwrap_or(0);
            for slot in 0..slots {
                // Slots without an instance answer NotFound.
                let Ok(instance) = device.mig_device_by_index(slot) else {
                    continue;
                };
                let Ok(mig_uuid) = instance.uuid() else {
                    continue;
                };
                out.push(Snapshot {
                    gpu: GpuInfo {
                        uuid: mig_uuid,
                        model: model.clone(),
                        mig_profile: mig_profile(&instance.name().unwrap_or_default()),
                    },
                    parent_uuid: uuid.clone(),
                    mig_enabled: false,
                    utilization: instance
                        .utilization_rates()
                        .ok()
                        .map(|u| f64::from(u.gpu) / 100.0),
                    memory_used_bytes: instance.memory_info().ok().map(|mem| mem.used as f64),
                    memory_total_bytes: instance.memory_info().ok().map(|mem| mem.total as f64),
                    copy_utilization: None,
                    temperature_celsius: None,
                    sm_clock_mhz: None,
                    power_watts: None,
                    energy_joules: None,
                    pids: pids(&instance),
                });
            }
        }
        Ok(out)
    }
}

impl Source for NvmlSource {
    fn name(&self) -> &str {
        "nvml"
    }

    fn metrics(&self) -> Vec<String> {
        super::allowed(&METRICS, &self.config.metrics)
    }

    fn collect(&mut self) -> BoxFuture<'_, Result<Collected, SourceError>> {
        let result = self.snapshots().map(|snapshots| {
            let gpu_processes = snapshots
                .iter()
                .flat_map(|s| {
                    s.pids.iter().filter_map(|&pid| {
                        Some((
                            s.gpu.uuid.clone(),
                            container_of(&self.config.proc_root, pid)?,
                        ))
                    })
                })
                .collect();
            Collected {
                readings: readings(&snapshots, &self.config.metrics),
                gpus: Some(snapshots.into_iter().map(|s| s.gpu).collect()),
                gpu_processes: Some(gpu_processes),
                ..Default::default()
            }
        });
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "cccc456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn h100(uuid: &str) -> Snapshot {
        Snapshot {
            gpu: GpuInfo {
                uuid: uuid.into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                mig_profile: String::new(),
            },
            utilization: Some(0.93),
            memory_used_bytes: Some(40e9),
            memory_total_bytes: Some(85_520_809_984.0),
            copy_utilization: Some(0.41),
            temperature_celsius: Some(64.0),
            sm_clock_mhz: Some(1_980.0),
            power_watts: Some(612.5),
            energy_joules: Some(123_456.789),
            ..Default::default()
        }
    }

    #[test]
    fn a_whole_gpu_yields_all_eight_readings_on_its_uuid() {
        let r = readings(&[h100("GPU-1")], &[]);
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|r| r.target == Target::Gpu("GPU-1".into())));
        let energy = r
            .iter()
            .find(|r| r.metric == m::ENERGY_JOULES)
            .expect("energy");
        assert_eq!(
            (energy.kind, energy.value),
            (SampleKind::Counter, 123_456.789)
        );
        // The allow-list keeps what it names.
        let only = readings(&[h100("GPU-1")], &[m::GPU_UTILIZATION.to_string()]);
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].value, 0.93);
    }

    #[test]
    fn a_split_gpu_keeps_energy_on_the_board_and_a_missing_reading_stays_missing() {
        let mut board = h100("GPU-1");
        board.mig_enabled = true;
        let instance = |uuid: &str| Snapshot {
            gpu: GpuInfo {
                uuid: uuid.into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                mig_profile: "1g.10gb".into(),
            },
            parent_uuid: "GPU-1".into(),
            utilization: None,
            memory_used_bytes: Some(5e9),
            memory_total_bytes: Some(10_200_547_328.0),
            ..Default::default()
        };
        let r = readings(&[board, instance("MIG-a"), instance("MIG-b")], &[]);
        let energy: Vec<&Reading> = r.iter().filter(|r| r.metric == m::ENERGY_JOULES).collect();
        assert_eq!(energy.len(), 1, "energy once, for the board");
        assert_eq!(energy[0].target, Target::Gpu("GPU-1".into()));
        // The board's own utilization and memory are not a tenant's; the instances' memory is.
        let vram: Vec<&Target> = r
            .iter()
            .filter(|r| r.metric == m::VRAM_BYTES)
            .map(|r| &r.target)
            .collect();
        assert_eq!(
            vram,
            [&Target::Gpu("MIG-a".into()), &Target::Gpu("MIG-b".into())]
        );
        // Utilization NVML did not give is absent, not zero.
        assert!(!r.iter().any(|r| r.metric == m::GPU_UTILIZATION));
        // Each instance has its own memory; the chip's temperature and clock stay the
        // board's.
        let total: Vec<&Target> = r
            .iter()
            .filter(|r| r.metric == m::VRAM_TOTAL)
            .map(|r| &r.target)
            .collect();
        assert_eq!(
            total,
            [&Target::Gpu("MIG-a".into()), &Target::Gpu("MIG-b".into())]
        );
        let chip: Vec<&Target> = r
            .iter()
            .filter(|r| r.metric == m::GPU_TEMPERATURE || r.metric == m::GPU_SM_CLOCK)
            .map(|r| &r.target)
            .collect();
        assert_eq!(chip, [&Target::Gpu("GPU-1".into()); 2]);
    }

    #[test]
    fn processes_are_traced_to_their_container_through_proc() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        let write = |pid: u32, text: &str| {
            let dir = proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("cgroup"), text).expect("file");
        };
        write(
            4242,
            &format!(
                "0::/kubepods.slice/kubepods-pod8a2d3c4e_2222.slice/cri-containerd-{ID}.scope\n"
            ),
        );
        write(
            4343,
            &format!("12:memory:/kubepods/burstable/pod8a2d3c4e-2222/{ID}\n11:cpu:/x\n"),
        );
        write(1, "0::/init.scope\n");
        assert_eq!(container_of(proc_root.path(), 4242).as_deref(), Some(ID));
        assert_eq!(container_of(proc_root.path(), 4343).as_deref(), Some(ID));
        assert_eq!(container_of(proc_root.path(), 1), None);
        assert_eq!(container_of(proc_root.path(), 9999), None);
    }

    #[test]
    fn mig_profiles_come_from_the_instance_name() {
        assert_eq!(mig_profile("NVIDIA A100-SXM4-40GB MIG 1g.5gb"), "1g.5gb");
        assert_eq!(mig_profile("NVIDIA H100 80GB HBM3 MIG 3g.40gb"), "3g.40gb");
        assert_eq!(mig_profile("NVIDIA H100 80GB HBM3"), "");
    }

    #[test]
    fn without_the_library_the_source_is_unavailable_not_failing() {
        let mut source = NvmlSource::new(NvmlConfig {
            enabled: true,
            library: Some("/nonexistent/libnvidia-ml.so.1".into()),
            ..Default::default()
        })
        .expect("valid config");
        let e = futures_lite(source.collect());
        match e {
            Err(SourceError::Unavailable(why)) => {
                assert!(why.contains("/nonexistent/libnvidia-ml.so.1"), "{why}");
                assert!(why.contains("sources.nvml.enabled = false"), "{why}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let e = NvmlSource::new(NvmlConfig {
            metrics: vec!["gpu_temperature".into()],
            ..Default::default()
        })
        .err()
        .expect("unknown metric");
        assert!(
            e.to_string()
                .starts_with("sources.nvml.metrics: `gpu_temperature`")
        );
    }

    /// Runs a future that never waits.
    fn futures_lite<T>(f: BoxFuture<'_, T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }
}
