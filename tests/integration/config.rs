//! One config file for every component (`meterflow --config FILE`), with `MF_*` overrides:
//! the example file loads for every component, the precedence is command line, environment,
//! table, top level, default; mistakes are refused naming the key; a real sink runs from a file.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::terminate;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/meterflow.example.toml");

fn meterflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterflow"));
    cmd.args(args).env_remove("MF_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("meterflow runs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_example_file_configures_every_component() {
    for component in [
        "agent",
        "processor",
        "sink",
        "replay",
        "demo",
        "broker",
        "lease-metrics",
        "token",
    ] {
        let text = stdout(&meterflow(&["--config", EXAMPLE, "config", component], &[]));
        assert!(text.contains("# config"), "{component}: {text}");
    }
    let processor = stdout(&meterflow(
        &["--config", EXAMPLE, "config", "processor"],
        &[],
    ));
    for line in [
        "brokers = \"127.0.0.1:9092\"  # config, top level",
        "state_dir = \"/var/lib/meterflow/processor\"  # config [processor]",
        "rollups = \"hour,day,month\"  # config [processor]",
        "metrics_listen = \"0.0.0.0:9470\"  # config [processor]",
        "partitions = 4  # config, top level",
    ] {
        assert!(processor.contains(line), "{line} in {processor}");
    }
    // A replay takes the processor's settings unless [replay] has its own.
    let replay = stdout(&meterflow(&["--config", EXAMPLE, "config", "replay"], &[]));
    assert!(replay.contains("billing_window = \"1h\"  # config [processor]"));
    assert!(replay.contains("state_dir = \"/var/lib/meterflow/replay\"  # config [replay]"));
    assert!(replay.contains("metrics_listen = (unset)"), "{replay}");
    let agent = stdout(&meterflow(&["--config", EXAMPLE, "config", "agent"], &[]));
    assert!(
        agent.contains("# [agent]: this node")
            && agent.contains("kubelet, pod_resources, cgroup, nvml"),
        "{agent}"
    );
    // The Kubernetes agent's file is a config file with an [agent] table too.
    let k8s = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/base/agent.toml"
    );
    let k8s = stdout(&meterflow(&["--config", k8s, "config", "agent"], &[]));
    // The table's own values, not the simulated fleet's flags.
    for line in [
        "# [agent]",
        "interval = \"15s\"  # config [agent]",
        "attribution.preset = \"akash\"  # config [agent]",
        "sources.kubelet.namespaces_url = \"https://${KUBERNETES_SERVICE_HOST}",
        "# the agent accepts this table",
    ] {
        assert!(k8s.contains(line), "{line} in {k8s}");
    }
    assert!(
        !k8s.contains("--nodes") && !k8s.contains("nodes = "),
        "{k8s}"
    );
}

/// `meterflow config agent` refuses what the agent refuses at start: here two sources that
/// both yield GPU utilization and energy, which would be counted twice.
#[test]
fn config_agent_refuses_what_the_agent_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[agent]\nprovider = \"p\"\n[agent.sources.kubelet]\nenabled = true\n[agent.sources.nvml]\nenabled = true\n\
         [[agent.sources.prometheus_scrape]]\nname = \"dcgm\"\nurl = \"http://127.0.0.1:9400/metrics\"\npreset = \"dcgm\"\n",
    )
    .expect("config");
    let path = path.to_string_lossy().into_owned();
    let e = refused(&meterflow(&["--config", &path, "config", "agent"], &[]));
    assert!(
        e.contains("the agent would refuse this [agent] table"),
        "{e}"
    );
    assert!(e.contains("both yield"), "{e}");
    assert!(e.contains("allow-lists"), "{e}");
}

#[test]
fn the_command_line_beats_the_environment_beats_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("meterflow.toml");
    std::fs::write(
        &file,
        "brokers = \"top:9092\"\n[processor]\nworkers = 3\nstate_dir = \"/p\"\n[sink]\nbrokers = \"sink-only:9092\"\n",
    )
    .expect("file");
    let path = file.to_str().expect("utf-8 path");
    let line = |text: &str, key: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_string()
    };
    let from_file = stdout(&meterflow(&["--config", path, "config", "processor"], &[]));
    assert_eq!(
        line(&from_file, "workers"),
        "workers = 3  # config [processor]"
    );
    assert_eq!(
        line(&from_file, "brokers"),
        "brokers = \"top:9092\"  # config, top level"
    );
    assert_eq!(line(&from_file, "window"), "window = \"1m\"  # default");
    // A replay shares the processor's settings, not its state.
    let replay = stdout(&meterflow(&["--config", path, "config", "replay"], &[]));
    assert_eq!(
        line(&replay, "workers"),
        "workers = 3  # config [processor]"
    );
    assert_eq!(
        line(&replay, "state_dir"),
        "state_dir = \"meterflow-replay-state\"  # default"
    );
    // A component's table beats the top level.
    let sink = stdout(&meterflow(&["--config", path, "config", "sink"], &[]));
    assert_eq!(
        line(&sink, "brokers"),
        "brokers = \"sink-only:9092\"  # config [sink]"
    );
    // MF_CONFIG names the file as --config does; MF_WORKERS beats the file.
    let env = stdout(&meterflow(
        &["config", "processor"],
        &[("MF_CONFIG", path), ("MF_WORKERS", "5")],
    ));
    assert_eq!(
        line(&env, "workers"),
        "workers = 5  # environment MF_WORKERS"
    );
    let cli = stdout(&meterflow(
        &["--config", path, "config", "processor", "--workers", "7"],
        &[("MF_WORKERS", "5")],
    ));
    assert_eq!(line(&cli, "workers"), "workers = 7  # command line");
    let help = stdout(&meterflow(&["--config", path, "processor", "--help"], &[]));
    assert!(
        help.contains("[env: MF_WORKERS=]") && help.contains("[default: 3]"),
        "{help}"
    );
}

#[test]
fn mistakes_in_the_file_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("meterflow.toml");
    let path = file.to_str().expect("utf-8 path").to_string();
    let try_file = |text: &str| {
        std::fs::write(&file, text).expect("file");
        refused(&meterflow(&["--config", &path, "sink"], &[]))
    };
    let e = try_file("[processor]\nworker = 2\n");
    assert!(
        e.contains("[processor] worker: `meterflow processor` has no flag --worker; its flags: brokers, workers"),
        "{e}"
    );
    let e = try_file("[processor]\nstate-dir = \"/x\"\n");
    assert!(e.contains("keys are written with `_`: state_dir"), "{e}");
    let e = try_file("[processor]\nwindow = \"a minute\"\n");
    assert!(
        e.contains(
            "[processor] window = \"a minute\": invalid value 'a minute' for '--window <WINDOW>'"
        ),
        "{e}"
    );
    let e = try_file("[sink]\nrate_limit = [1, 2]\n");
    assert!(e.contains("[sink] rate_limit"), "{e}");
    let e = try_file("brokerz = \"x\"\n");
    assert!(
        e.contains("unknown key `brokerz`; the top level takes brokers"),
        "{e}"
    );
    let e = try_file("broker = \"kafka:9092\"\n");
    assert!(e.contains("did you mean `brokers`?"), "{e}");
    let e = try_file("provider = \"p\"\n[sources.kubelet]\nenabled = true\n");
    assert!(e.contains("write it under [agent]"), "{e}");
    let e = try_file(
        "[agent]\ninterval = \"15s\"\n[agent.sources.kubelet]\nenabled = true\nmax_stale = 3\n",
    );
    assert!(e.contains("max_stale"), "{e}");
    let e = try_file("[processor\n");
    assert!(e.contains("line 1"), "{e}");
    // Sim flags with an [agent] table: one or the other.
    std::fs::write(
        &file,
        "[agent.sources.kubelet]\nenabled = true\npods_url = \"http://127.0.0.1:1/pods\"\n",
    )
    .expect("file");
    let e = refused(&meterflow(
        &["--config", &path, "agent", "--nodes", "3"],
        &[],
    ));
    assert!(e.contains("--nodes is for a simulated fleet"), "{e}");
    let e = refused(&meterflow(
        &["--config", "/nonexistent/meterflow.toml", "sink"],
        &[],
    ));
    assert!(
        e.contains("cannot read the config file /nonexistent/meterflow.toml"),
        "{e}"
    );
}

/// `[kafka]` and `MF_KAFKA_*` reach the Kafka clients: a property librdkafka refuses stops the
/// component with librdkafka's own words, naming the property.
#[test]
fn kafka_properties_reach_every_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("meterflow.toml");
    std::fs::write(
        &file,
        "brokers = \"127.0.0.1:1\"\n[kafka]\n\"security.protocol\" = \"carrier-pigeon\"\n",
    )
    .expect("file");
    let path = file.to_str().expect("utf-8 path");
    let e = refused(&meterflow(
        &["--config", path, "broker", "--listen", "127.0.0.1:0"],
        &[],
    ));
    assert!(
        e.contains("security.protocol") && e.contains("carrier-pigeon"),
        "{e}"
    );
    // The variable wins over the file.
    let e = refused(&meterflow(
        &["--config", path, "processor"],
        &[("MF_KAFKA_SECURITY_PROTOCOL", "smoke-signals")],
    ));
    assert!(e.contains("smoke-signals"), "{e}");
    std::fs::write(&file, "[kafka]\nretries = [1]\n").expect("file");
    let e = refused(&meterflow(&["--config", path, "processor"], &[]));
    assert!(e.contains("[kafka] retries"), "{e}");
}

/// A sink started from a file alone (and one variable) serves on the file's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_runs_from_the_config_file() {
    let broker = crate::common::memory_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::common::free_addr().port();
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, [7u8; 48]).expect("secret");
    let file = dir.path().join("meterflow.toml");
    std::fs::write(
        &file,
        format!(
            "brokers = \"{}\"\npartitions = 2\n[sink]\nlisten = \"127.0.0.1:{port}\"\njwt_secret_file = \"{}\"\n",
            broker.bootstrap(),
            secret.display()
        ),
    )
    .expect("file");
    let data = dir.path().join("views");
    let mut sink = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .arg("sink")
        .env("MF_CONFIG", &file)
        .env("MF_DATA_DIR", &data)
        .env("MF_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("sink starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let answer = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await;
        if let Ok(r) = answer
            && r.status().is_success()
        {
            break true;
        }
        if Instant::now() > deadline || sink.try_wait().expect("status").is_some() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    terminate(&sink);
    let status = sink.wait().expect("sink exits");
    assert!(ready, "the sink answered on the file's address");
    assert!(status.success(), "{status}");
    assert!(data.is_dir(), "its views are where MF_DATA_DIR says");
    broker.stop();
}

/// `MF_LOG_FORMAT=json`: every log line on stderr is one JSON object a log pipeline can read,
/// with its level, target and message, and no terminal colours.
#[test]
fn logs_are_json_lines_when_asked() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    // A simulated agent logs at once, whether or not its broker answers.
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterflow"))
        .args(["agent", "--brokers", "127.0.0.1:1", "--nodes", "1"])
        .arg("--spool-dir")
        .arg(dir.path().join("spool"))
        .env_remove("MF_CONFIG")
        .env("MF_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("meterflow agent starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("a line");
        let started = line.contains("simulated agent started");
        lines.push(line);
        if started || lines.len() > 50 {
            break;
        }
    }
    child.kill().expect("killed");
    child.wait().expect("reaped");
    assert!(!lines.is_empty(), "the agent logged");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "no colours: {line}");
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{v}");
    }
    let started: serde_json::Value =
        serde_json::from_str(lines.last().expect("a line")).expect("JSON");
    assert_eq!(started["level"], "INFO", "{started}");
    assert_eq!(
        started["fields"]["message"], "simulated agent started",
        "{started}"
    );
    assert_eq!(started["fields"]["nodes"], 1, "{started}");
}
