//! What every component's `/metrics` says of the process itself: the standard `process_*`
//! series (CPU seconds, resident memory, open files, start time) and
//! `meterflow_build_info{component, version}`, 1, so that a dashboard can tell which version
//! runs where.

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers the process series and the build info of `component` in `registry`.
pub fn register(registry: &Registry, component: &str) {
    #[cfg(target_os = "linux")]
    {
        // A second registry of the same process may hold them already (tests start several
        // components in one process); the first is kept.
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    }
    let info = IntGaugeVec::new(
        Opts::new(
            "meterflow_build_info",
            "1, labelled with the component and its version",
        ),
        &["component", "version"],
    )
    .expect("a valid gauge");
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    let _ = registry.register(Box::new(info));
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_registry_says_what_runs_and_how_much_it_uses() {
        let registry = prometheus::Registry::new();
        super::register(&registry, "sink");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encodes");
        assert!(
            text.contains(&format!(
                "meterflow_build_info{{component=\"sink\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        for series in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(series), "{series} missing: {text}");
        }
    }
}
