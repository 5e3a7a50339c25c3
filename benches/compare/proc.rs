//! Child processes the harness starts, and what /proc says of them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// A child process, killed when dropped, its output in `DIR/NAME.log`.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            // Its working directory is the run's temporary one (the embedded broker's
            // `sqlite://FILE` is opened there).
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Kills the process and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of its log, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{} ({}):\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with its log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status}); {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// User and system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may hold spaces), from field 3 on.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15: indexes 11 and 12 after the name.
        (ticks(11) + ticks(12)) / clock_ticks()
    }

    /// Resident memory now and at its peak, in MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A loopback port nothing listens on now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Messages a processor has read from the samples topic, from its `--metrics-listen` page at
/// `url`; `None` while it does not answer.
pub async fn processor_input(http: &reqwest::Client, url: &str) -> Option<u64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("meterflow_processor_input_messages_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// What the processor says it holds in memory (`meterflow_processor_state_entries`, summed
/// over its workers, and `meterflow_processor_store_memory_bytes`), by kind.
#[allow(dead_code, reason = "the soak's, not the comparison's")]
pub async fn processor_state(
    http: &reqwest::Client,
    url: &str,
) -> Option<std::collections::BTreeMap<String, f64>> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    let mut held = std::collections::BTreeMap::new();
    for line in text.lines() {
        // Entries by kind, and the store's bytes in memory as `store_<kind>_bytes`.
        let (rest, store) = match line.strip_prefix("meterflow_processor_state_entries{") {
            Some(rest) => (rest, false),
            None => match line.strip_prefix("meterflow_processor_store_memory_bytes{") {
                Some(rest) => (rest, true),
                None => continue,
            },
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let kind = labels
            .split(',')
            .find_map(|l| l.strip_prefix("kind=\""))
            .map(|k| k.trim_end_matches('"'));
        if let (Some(kind), Ok(value)) = (kind, value.trim().parse::<f64>()) {
            let kind = if store {
                format!("store_{kind}_bytes")
            } else {
                kind.to_string()
            };
            *held.entry(kind).or_insert(0.0) += value;
        }
    }
    Some(held)
}
