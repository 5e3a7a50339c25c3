//! Properties every Kafka client of the process starts from: what an existing cluster asks
//! of its clients (SASL, TLS, client ids), given once and used by every component.
//!
//! Two places give them: the config file's `[kafka]` table (librdkafka's property names:
//! `"security.protocol" = "SASL_SSL"`), set at start-up with [`set_file_properties`]; and
//! variables `MF_KAFKA_<NAME>`, the name upper-cased with `.` as `_`
//! (`MF_KAFKA_SASL_PASSWORD` is `sasl.password`), which win over the file. Each client then
//! sets what Meterflow's guarantees depend on (`bootstrap.servers`, `acks`,
//! `enable.idempotence`, offsets committed by hand) over them.

use std::sync::OnceLock;

static FILE: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// The config file's `[kafka]` table; once per process, before any client is made.
pub fn set_file_properties(properties: Vec<(String, String)>) {
    let _ = FILE.set(properties);
}

/// The properties from `MF_KAFKA_*` variables among `vars`.
pub fn env_properties(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("MF_KAFKA_")?;
            (!name.is_empty()).then(|| (name.to_lowercase().replace('_', "."), v))
        })
        .collect()
}

/// The file's properties, then the environment's (a later one wins when a client is made).
pub fn properties() -> Vec<(String, String)> {
    let mut all = FILE.get().cloned().unwrap_or_default();
    all.extend(env_properties(std::env::vars()));
    all
}

/// [`properties`] for a consumer that follows a live topic, over its own default: a fetch that
/// finds nothing new is answered within 50 ms (librdkafka's default wait is 500 ms). A Kafka
/// broker answers a waiting fetch as soon as data arrives, so there this only adds fetches of
/// an idle topic; a broker that holds every empty fetch for its whole wait (the embedded tansu
/// does) would otherwise add up to half a second per hop between a sample and the API.
/// `fetch.wait.max.ms` in `[kafka]` or `MF_KAFKA_FETCH_WAIT_MAX_MS` still decides.
pub fn follower_properties() -> Vec<(String, String)> {
    let mut all = vec![("fetch.wait.max.ms".to_string(), "50".to_string())];
    all.extend(properties());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_name_librdkafka_properties() {
        let vars = [
            ("MF_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("MF_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("MF_KAFKA_", "ignored"),
            ("MF_BROKERS", "not a property"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            env_properties(vars),
            vec![
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("sasl.mechanism".to_string(), "SCRAM-SHA-512".to_string()),
            ]
        );
    }
}
