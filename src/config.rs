//! One configuration file for every component, with environment overrides.
//!
//! `meterflow --config meterflow.toml COMPONENT` (or `MF_CONFIG=meterflow.toml`) reads one TOML
//! file. Its top-level keys (`brokers`, `partitions`, `replication`, `schema_registry`) apply to
//! every component that has that flag; a table per component (`[processor]`, `[sink]`, `[demo]`, `[broker]`,
//! `[replay]`, `[lease_metrics]`, `[token]`) sets that component's flags by their long names,
//! `-` written `_` (`state_dir = "/var/lib/meterflow"`, `rollups = ["hour", "day"]`). `[agent]`
//! is the node agent's own configuration (sources, attribution, spool; see
//! `meterflow_ingest::AgentConfig`): with it, the agent meters this node instead of a
//! simulated fleet. `[kafka]` holds librdkafka properties every Kafka client of every
//! component starts from (`"security.protocol" = "SASL_SSL"`; see
//! `meterflow_schemas::kafka`).
//!
//! Every flag can also be set by the environment variable `MF_` + its long name in upper case,
//! `-` written `_` (`MF_BROKERS`, `MF_STATE_DIR`, `MF_WORKERS`). What wins, first to last: the
//! command line, the environment, the component's table, the file's top level, the built-in
//! default. `meterflow config` prints what a component would run with and where each value
//! came from. `--help` shows the file's values as the defaults and each flag's variable.
//!
//! The file is applied to the clap [`Command`] before the arguments are parsed: a file value
//! becomes the flag's default, so clap keeps its own precedence and its own value checks; a
//! value is checked with the flag's parser when the file is read, so its error names the file,
//! the table and the key rather than a flag the user never typed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use meterflow_ingest::AgentConfig;

/// The environment variable naming the config file, as `--config` does.
pub const CONFIG_ENV: &str = "MF_CONFIG";

/// Top-level keys: shared by every component that has the flag (`schema_registry` is a flag
/// of the program, before the component).
const SHARED: [&str; 4] = ["brokers", "partitions", "replication", "schema_registry"];

/// The components whose table holds their flags (the agent's table is its own config).
const FLAG_TABLES: [&str; 7] = [
    "demo",
    "broker",
    "processor",
    "sink",
    "replay",
    "lease_metrics",
    "token",
];

/// The keys of the agent's own configuration, for the hint when they are written at the top
/// level of the file (as the agent's file was before it became the `[agent]` table).
const AGENT_KEYS: [&str; 8] = [
    "node",
    "provider",
    "agent_id",
    "interval",
    "metrics_listen",
    "spool",
    "attribution",
    "sources",
];

/// A loaded config file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Top-level flag values.
    shared: BTreeMap<String, Vec<String>>,
    /// Flag values by component (subcommand name, `-` as in the command line).
    tables: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// `[agent]`, checked.
    pub agent: Option<AgentConfig>,
    /// `[kafka]`: librdkafka properties for every client.
    pub kafka: Vec<(String, String)>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path} (given by --config or {CONFIG_ENV})")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ConfigFile {
    /// Reads and checks a config file: every key must be a flag of its component, every value
    /// one that flag's parser takes; `[agent]` must be a valid agent config.
    pub fn load(path: &Path, cli: &Command) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, cli)
    }

    /// Parses the text of a config file (`path` is for messages).
    pub fn parse(text: &str, path: &Path, cli: &Command) -> Result<ConfigFile, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let doc: toml::Table =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
        let mut file = ConfigFile {
            path: path.to_path_buf(),
            shared: BTreeMap::new(),
            tables: BTreeMap::new(),
            agent: None,
            kafka: Vec::new(),
        };
        for (key, value) in &doc {
            if key == "agent" {
                continue;
            }
            if key == "kafka" {
                let toml::Value::Table(properties) = value else {
                    return Err(invalid(
                        "`kafka` is a table of librdkafka properties: [kafka] \"security.protocol\" = \"SASL_SSL\"".into(),
                    ));
                };
                for (name, value) in properties {
                    let text = match flag_values(value) {
                        Ok(v) if !value.is_array() => v.concat(),
                        _ => {
                            return Err(invalid(format!(
                                "[kafka] {name}: a librdkafka property is a string, number or boolean"
                            )));
                        }
                    };
                    file.kafka.push((name.clone(), text));
                }
                continue;
            }
            if SHARED.contains(&key.as_str()) {
                let values = flag_values(value).map_err(|m| invalid(format!("{key}: {m}")))?;
                for sub in std::iter::once(cli).chain(cli.get_subcommands()) {
                    if let Some(arg) = flag(sub, key) {
                        check_values(arg, &values)
                            .map_err(|m| invalid(format!("{key} = {value}: {m}")))?;
                    }
                }
                file.shared.insert(key.clone(), values);
                continue;
            }
            if AGENT_KEYS.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "`{key}` belongs to the agent: write it under [agent] (its tables as [agent.spool], [agent.sources.kubelet], ...)"
                )));
            }
            let Some(table) = FLAG_TABLES.iter().find(|t| *t == key) else {
                return Err(invalid(format!(
                    "unknown key `{key}`; the top level takes {}, and the tables [agent], [kafka], [{}]",
                    SHARED.join(", "),
                    FLAG_TABLES.join("], [")
                )));
            };
            let sub_name = table.replace('_', "-");
            let Some(sub) = cli.find_subcommand(&sub_name) else {
                return Err(invalid(format!("[{key}]: no component `{sub_name}`")));
            };
            let toml::Value::Table(entries) = value else {
                let hint = if SHARED.contains(&format!("{key}s").as_str()) {
                    format!("; did you mean `{key}s`?")
                } else {
                    String::new()
                };
                return Err(invalid(format!(
                    "`{key}` is the table of `meterflow {key}`'s flags: [{key}]{hint}"
                )));
            };
            let mut flags = BTreeMap::new();
            for (name, value) in entries {
                let Some(arg) = flag(sub, name) else {
                    if name.contains('-') && flag(sub, &name.replace('-', "_")).is_some() {
                        return Err(invalid(format!(
                            "[{key}] {name}: keys are written with `_`: {}",
                            name.replace('-', "_")
                        )));
                    }
                    return Err(invalid(format!(
                        "[{key}] {name}: `meterflow {sub_name}` has no flag --{}; its flags: {}",
                        name.replace('_', "-"),
                        flags_of(sub).join(", ")
                    )));
                };
                let values =
                    flag_values(value).map_err(|m| invalid(format!("[{key}] {name}: {m}")))?;
                check_values(arg, &values)
                    .map_err(|m| invalid(format!("[{key}] {name} = {value}: {m}")))?;
                flags.insert(name.clone(), values);
            }
            file.tables.insert(sub_name, flags);
        }
        if doc.contains_key("agent") {
            let agent = AgentConfig::parse_table(text)
                .map_err(invalid)?
                .expect("the key is there");
            agent.check().map_err(|e| match e {
                // The agent's messages name the key from its table's root.
                meterflow_ingest::config::ConfigError::Invalid(m) => invalid(format!("agent.{m}")),
                other => invalid(other.to_string()),
            })?;
            file.agent = Some(agent);
        }
        Ok(file)
    }

    /// The values the file gives a component's flag (`key` as written in the file). A replay
    /// takes the processor's settings where `[replay]` does not set them, since both must
    /// compute the same numbers, but never its state directory or metrics address: a replay
    /// builds new state beside it.
    fn values(&self, sub: &str, key: &str) -> Option<(&Vec<String>, Origin)> {
        if let Some(v) = self.tables.get(sub).and_then(|t| t.get(key)) {
            return Some((v, Origin::Table(sub.to_string())));
        }
        if sub == "replay"
            && !["state_dir", "metrics_listen"].contains(&key)
            && let Some(v) = self.tables.get("processor").and_then(|t| t.get(key))
        {
            return Some((v, Origin::Table("processor".into())));
        }
        self.shared.get(key).map(|v| (v, Origin::TopLevel))
    }
}

enum Origin {
    /// A component's table (by subcommand name).
    Table(String),
    TopLevel,
}

/// The config file named by `--config FILE`, `--config=FILE` or `MF_CONFIG`, found before the
/// arguments are parsed (the file changes how they are parsed).
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// The environment variable of a flag: `MF_` + the long name, upper case, `-` as `_`.
pub fn env_name(long: &str) -> String {
    format!("MF_{}", long.to_uppercase().replace('-', "_"))
}

/// The command with every flag of every component readable from its environment variable and,
/// given a file, defaulting to the file's value.
pub fn apply(cli: Command, file: Option<&ConfigFile>) -> Command {
    let cli = cli.mut_args(|arg| match file.and_then(|f| f.shared.get(&key_of(&arg))) {
        Some(values) => {
            let values = as_given(&arg, values);
            arg.default_values(values)
        }
        None => arg,
    });
    cli.mut_subcommands(|sub| {
        let name = sub.get_name().to_string();
        sub.mut_args(|arg| {
            let Some(long) = arg.get_long().map(str::to_string) else {
                return arg;
            };
            if long == "config" || long == "help" || long == "version" {
                return arg;
            }
            let arg = if arg.get_env().is_none() {
                arg.env(env_name(&long))
            } else {
                arg
            };
            match file.and_then(|f| f.values(&name, &long.replace('-', "_"))) {
                Some((values, _)) => {
                    let values = as_given(&arg, values);
                    arg.default_values(values)
                }
                None => arg,
            }
        })
    })
}

/// One line per flag of a component: `key = value  # where it came from`.
pub fn describe(sub: &Command, matches: &ArgMatches, file: Option<&ConfigFile>) -> Vec<String> {
    let mut lines = Vec::new();
    for arg in sub.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "config" {
            continue;
        }
        let id = arg.get_id().as_str();
        let key = long.replace('-', "_");
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = match raw.len() {
            0 => "(unset)".to_string(),
            1 => toml_value(&raw[0]),
            _ => format!(
                "[{}]",
                raw.iter()
                    .map(|v| toml_value(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let origin = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "command line".to_string(),
            Some(ValueSource::EnvVariable) => format!("environment {}", env_name(long)),
            Some(ValueSource::DefaultValue) => {
                match file.and_then(|f| f.values(sub.get_name(), &key)) {
                    Some((_, Origin::Table(table))) => {
                        format!("config [{}]", table.replace('-', "_"))
                    }
                    Some((_, Origin::TopLevel)) => "config, top level".into(),
                    None => "default".into(),
                }
            }
            _ => "unset".into(),
        };
        lines.push(format!("{key} = {value}  # {origin}"));
    }
    lines
}

/// A flag's text as TOML would write it: numbers and booleans bare, the rest quoted.
fn toml_value(raw: &str) -> String {
    if raw.parse::<i64>().is_ok() || raw.parse::<f64>().is_ok() || raw == "true" || raw == "false" {
        raw.to_string()
    } else {
        format!("{raw:?}")
    }
}

/// The file key of a flag (`state_dir` for `--state-dir`).
fn key_of(arg: &Arg) -> String {
    arg.get_long().unwrap_or_default().replace('-', "_")
}

/// A component's flag by its file key (`state_dir` for `--state-dir`).
fn flag<'a>(sub: &'a Command, key: &str) -> Option<&'a Arg> {
    let long = key.replace('_', "-");
    if key.contains('-') || long == "help" || long == "config" {
        return None;
    }
    sub.get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
}

fn flags_of(sub: &Command) -> Vec<String> {
    sub.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "config")
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// A TOML value as the flag's command-line text(s).
fn flag_values(value: &toml::Value) -> Result<Vec<String>, String> {
    let one = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "a {} is not a flag value; write a string, number or boolean",
            other.type_str()
        )),
    };
    match value {
        toml::Value::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

/// The file's values as the flag takes them: a flag of one value given an array
/// (`rollups = ["hour", "day"]`) takes it comma-separated, as on the command line.
fn as_given(arg: &Arg, values: &[String]) -> Vec<String> {
    let many = matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
    if values.len() > 1 && !many {
        vec![values.join(",")]
    } else {
        values.to_vec()
    }
}

/// Runs the flag's own parser over the file's values: a command of that one flag parses them.
fn check_values(arg: &Arg, values: &[String]) -> Result<(), String> {
    let long = arg.get_long().expect("flags have a long name");
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match values {
            [v] if v == "true" || v == "false" => Ok(()),
            _ => Err(format!("--{long} is a switch: write true or false")),
        };
    }
    let mut one = Arg::new("value")
        .long(long.to_string())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Append);
    if let Some(name) = arg.get_value_names().and_then(|n| n.first()) {
        one = one.value_name(name.clone());
    }
    let check = Command::new("meterflow").arg(one);
    for v in as_given(arg, values) {
        let argv = [String::from("meterflow"), format!("--{long}"), v];
        check.clone().try_get_matches_from(argv).map_err(|e| {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_string()
        })?;
    }
    Ok(())
}
