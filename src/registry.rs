//! `meterflow schemas`: the Avro schemas the pipeline writes, their compatibility across
//! versions, and their registration in a Confluent Schema Registry (REST API, subjects named
//! after the topic: `meterflow.samples-value`, …; the usage topic's roll-up records, a record
//! of their own name, under `meterflow.usage-io.meterflow.UsageRollup`, the subject Confluent's
//! `TopicRecordNameStrategy` gives them).
//!
//! Every version is registered oldest first, so the registry keeps the history a reader of
//! old records needs; before each, the registry is asked whether the version is compatible
//! with its latest under the subject's compatibility level, and a refusal stops the command
//! naming the subject; the ids the registry assigns are printed.
//!
//! With `--schema-registry URL` (or `MF_SCHEMA_REGISTRY`, or `schema_registry` in the config
//! file) a component looks up the registry's id of every version at start-up ([`lookup_ids`])
//! and writes those ids on the wire, in the Confluent format any registry-aware consumer
//! reads; it reads them back, and Meterflow's own ids still, for records written before.
//! Every component of a pipeline must be given the same registry.

use anyhow::{Context, Result, bail};
use apache_avro::schema_compatibility::SchemaCompatibility;
use meterflow_schemas::SchemaId;
use meterflow_schemas::topics;

/// One schema version: its wire id, the subject it belongs to, its file.
pub struct Version {
    pub id: SchemaId,
    pub subject: String,
    pub file: &'static str,
}

/// Every version, oldest first within each subject.
pub fn versions() -> Vec<Version> {
    let v = |id, topic: &str, file| Version {
        id,
        subject: format!("{topic}-value"),
        file,
    };
    vec![
        v(
            SchemaId::SampleBatchV1,
            topics::SAMPLES,
            "sample_batch.v1.avsc",
        ),
        v(
            SchemaId::SampleBatchV2,
            topics::SAMPLES,
            "sample_batch.avsc",
        ),
        v(
            SchemaId::UsageUpdateV1,
            topics::USAGE,
            "usage_update.v1.avsc",
        ),
        v(SchemaId::UsageUpdateV2, topics::USAGE, "usage_update.avsc"),
        // Not `UsageUpdate`, so not compatible with it: a subject of its own.
        Version {
            id: SchemaId::UsageRollup,
            subject: format!("{}-io.meterflow.UsageRollup", topics::USAGE),
            file: "usage_rollup.avsc",
        },
        v(
            SchemaId::BillingRecord,
            topics::BILLING,
            "billing_record.avsc",
        ),
        v(SchemaId::Alert, topics::ALERTS, "alert.avsc"),
        v(SchemaId::DeadLetter, topics::DEADLETTER, "dead_letter.avsc"),
    ]
}

/// A table of the versions.
pub fn table() -> String {
    let mut out = format!("{:>2}  {:<40} {}\n", "id", "subject", "file");
    for v in versions() {
        out.push_str(&format!(
            "{:>2}  {:<40} schemas/avro/{}\n",
            v.id as u32, v.subject, v.file
        ));
    }
    out
}

/// The `.avsc` text of a file name (`sample_batch`, `sample_batch.v1.avsc`, …).
pub fn source(name: &str) -> Result<&'static str> {
    let wanted = name.trim_end_matches(".avsc");
    versions()
        .into_iter()
        .find(|v| v.file.trim_end_matches(".avsc") == wanted)
        .map(|v| v.id.source())
        .with_context(|| {
            format!(
                "no schema `{name}`; known: {}",
                versions()
                    .iter()
                    .map(|v| v.file.trim_end_matches(".avsc"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Checks that each newer version of a subject reads records of every older one (backward
/// compatibility: readers upgrade first) and that the older reads the newer (forward: an old
/// reader skips the new fields). One line per pair; an error names the first pair that fails.
/// Then that no version of the usage record reads a roll-up record.
pub fn check() -> Result<Vec<String>> {
    let all = versions();
    let mut lines = Vec::new();
    for (i, newer) in all.iter().enumerate() {
        for older in all[..i].iter().filter(|o| o.subject == newer.subject) {
            let (new, old) = (newer.id.schema(), older.id.schema());
            SchemaCompatibility::can_read(old, new).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {} cannot read records written with {}: {e}",
                    newer.subject,
                    newer.file,
                    older.file
                )
            })?;
            let forward = SchemaCompatibility::can_read(new, old).is_ok();
            lines.push(format!(
                "{}: {} reads {} (backward){}",
                newer.subject,
                newer.file,
                older.file,
                if forward {
                    ", and the other way (forward)"
                } else {
                    ""
                }
            ));
        }
    }
    // A roll-up is never read as a base window: no version of `UsageUpdate` resolves it.
    let rollup = SchemaId::UsageRollup;
    for reader in [SchemaId::UsageUpdateV1, SchemaId::UsageUpdateV2] {
        let file = |id| all.iter().find(|v| v.id == id).map_or("?", |v| v.file);
        if SchemaCompatibility::can_read(rollup.schema(), reader.schema()).is_ok() {
            bail!(
                "{} would read {} records as base windows",
                file(reader),
                file(rollup)
            );
        }
        lines.push(format!(
            "{}: {} cannot read {} (a roll-up is never taken for a base window)",
            topics::USAGE,
            file(reader),
            file(rollup)
        ));
    }
    Ok(lines)
}

/// The registry's id of every version, each looked up under its subject (`POST
/// /subjects/{subject}` with the schema). A version not registered is an error that says to
/// run `meterflow schemas register` first.
pub async fn lookup_ids(url: &str) -> Result<meterflow_schemas::RegistryIds> {
    let base = url.trim_end_matches('/');
    let http = client()?;
    let mut ids = Vec::new();
    for v in versions() {
        let (status, json) =
            post_schema(&http, base, &format!("/subjects/{}", v.subject), &v).await?;
        if status.as_u16() == 404 {
            bail!(
                "{} is not registered under {} in {base}; run `meterflow schemas register --registry {base}` first",
                v.file,
                v.subject
            );
        }
        let Some(id) = json["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .filter(|_| status.is_success())
        else {
            bail!(
                "the registry answered {status} to looking up {} under {}: {json}",
                v.file,
                v.subject
            );
        };
        ids.push((v.id, id));
    }
    meterflow_schemas::RegistryIds::new(&ids)
        .map_err(|e| anyhow::anyhow!("the registry's ids cannot be used: {e}"))
}

/// How long one request to the registry may take, connection included.
const REGISTRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The registry's HTTP client: every request bounded by [`REGISTRY_TIMEOUT`], so a registry
/// that accepts a connection and never answers is an error, not a hang.
fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(REGISTRY_TIMEOUT)
        .timeout(REGISTRY_TIMEOUT)
        .build()?)
}

/// POSTs a schema version to `path` of the registry at `base`: the answer's status and JSON
/// (`null` where the body is not JSON).
async fn post_schema(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    v: &Version,
) -> Result<(reqwest::StatusCode, serde_json::Value)> {
    let body = serde_json::json!({"schema": v.id.source(), "schemaType": "AVRO"});
    let answer = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&body)
        .send()
        .await
        .with_context(|| {
            format!(
                "cannot reach the schema registry at {base}, or it did not answer within {} s",
                REGISTRY_TIMEOUT.as_secs()
            )
        })?;
    let status = answer.status();
    Ok((status, answer.json().await.unwrap_or_default()))
}

/// Registers every version in the registry at `url`; returns (subject, file, registry id).
pub async fn register(url: &str) -> Result<Vec<(String, &'static str, i64)>> {
    let base = url.trim_end_matches('/');
    let http = client()?;
    let mut out = Vec::new();
    for v in versions() {
        let path = format!("/compatibility/subjects/{}/versions/latest", v.subject);
        let (status, answer) = post_schema(&http, base, &path, &v).await?;
        match status.as_u16() {
            // No version under the subject yet: nothing to be compatible with.
            404 => {}
            200 => {
                if answer["is_compatible"] != true {
                    bail!(
                        "the registry refuses {} under {}: not compatible with its latest version ({answer})",
                        v.file,
                        v.subject
                    );
                }
            }
            _ => bail!(
                "the registry answered {status} to the compatibility check of {}: {answer}",
                v.subject
            ),
        }
        let path = format!("/subjects/{}/versions", v.subject);
        let (status, answer) = post_schema(&http, base, &path, &v).await?;
        let Some(id) = answer["id"].as_i64().filter(|_| status.is_success()) else {
            bail!(
                "the registry answered {status} to registering {} under {}: {answer}",
                v.file,
                v.subject
            );
        };
        out.push((v.subject, v.file, id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_is_listed_once_and_newer_versions_read_older_ones() {
        let all = versions();
        assert_eq!(all.len(), 8);
        for v in &all {
            assert_eq!(source(v.file).expect("known"), v.id.source(), "{}", v.file);
        }
        let lines = check().expect("compatible");
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[3]
                .starts_with("meterflow.usage: usage_update.avsc cannot read usage_rollup.avsc"),
            "{lines:?}"
        );
        assert!(lines[0].starts_with(
            "meterflow.samples-value: sample_batch.avsc reads sample_batch.v1.avsc (backward)"
        ));
        assert!(source("nope").is_err());
    }
}
