//! Encoding and decoding of every record, framed as the Confluent wire format.
//!
//! A message is `0x00`, a 4-byte big-endian schema id, then one Avro datum. The ids are
//! Meterflow's own ([`SchemaId`]) until a schema registry assigns others. A reader resolves
//! from the writer's schema to its own, so a record written with an older version of a schema
//! is read by the current code. Decoding never panics: every failure is a [`DecodeError`] whose
//! variant names the cause, so the processor can send the input to the dead-letter topic.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use serde::{Serialize, de::DeserializeOwned};

use crate::types::{Alert, BillingRecord, DeadLetter, SampleBatch, UsageUpdate};

const MAGIC: u8 = 0;
const HEADER_LEN: usize = 5;
/// Largest single allocation a datum may ask for while decoding; a Kafka message is far smaller.
const MAX_ALLOCATION_BYTES: usize = 64 * 1024 * 1024;

/// The schemas Meterflow writes, by wire id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SchemaId {
    SampleBatchV1 = 1,
    SampleBatchV2 = 2,
    UsageUpdateV1 = 3,
    BillingRecord = 4,
    Alert = 5,
    DeadLetter = 6,
    /// Adds `present_ms`, for gauge coverage, and `node`, for node and fleet aggregates.
    UsageUpdateV2 = 7,
    /// A roll-up window's [`UsageUpdate`] (`resolution` hour, day or month), under a record
    /// name of its own and without the window fields `UsageUpdate` requires: a reader that
    /// knows only `UsageUpdate` fails on it, where it would otherwise drop `resolution` and
    /// count the roll-ups as base windows.
    UsageRollup = 8,
}

impl SchemaId {
    /// In wire id order (the id is the position plus one).
    pub const ALL: [SchemaId; 8] = [
        SchemaId::SampleBatchV1,
        SchemaId::SampleBatchV2,
        SchemaId::UsageUpdateV1,
        SchemaId::BillingRecord,
        SchemaId::Alert,
        SchemaId::DeadLetter,
        SchemaId::UsageUpdateV2,
        SchemaId::UsageRollup,
    ];

    /// The schema id for a wire value, if Meterflow knows it.
    pub fn from_wire(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u32 == id)
    }

    /// The `.avsc` text of this schema.
    pub fn source(self) -> &'static str {
        match self {
            SchemaId::SampleBatchV1 => include_str!("../avro/sample_batch.v1.avsc"),
            SchemaId::SampleBatchV2 => include_str!("../avro/sample_batch.avsc"),
            SchemaId::UsageUpdateV1 => include_str!("../avro/usage_update.v1.avsc"),
            SchemaId::UsageUpdateV2 => include_str!("../avro/usage_update.avsc"),
            SchemaId::UsageRollup => include_str!("../avro/usage_rollup.avsc"),
            SchemaId::BillingRecord => include_str!("../avro/billing_record.avsc"),
            SchemaId::Alert => include_str!("../avro/alert.avsc"),
            SchemaId::DeadLetter => include_str!("../avro/dead_letter.avsc"),
        }
    }

    /// The parsed schema.
    pub fn schema(self) -> &'static Schema {
        &SCHEMAS[self as usize - 1]
    }
}

static SCHEMAS: LazyLock<Vec<Schema>> = LazyLock::new(|| {
    apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
    SchemaId::ALL
        .iter()
        .map(|id| {
            Schema::parse_str(id.source())
                .expect("the .avsc files are checked by the schemas crate's tests")
        })
        .collect()
});

/// The ids a schema registry assigned to Meterflow's schemas, for the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryIds {
    /// By Meterflow's id, less one.
    by_schema: Vec<u32>,
    by_wire: HashMap<u32, SchemaId>,
}

impl RegistryIds {
    /// The registry's id of every schema: each schema once, no id twice.
    pub fn new(ids: &[(SchemaId, u32)]) -> Result<RegistryIds, String> {
        let mut by_schema = vec![None; SchemaId::ALL.len()];
        let mut by_wire = HashMap::new();
        for (schema, id) in ids {
            if by_schema[*schema as usize - 1].replace(*id).is_some() {
                return Err(format!("{schema:?} is given two registry ids"));
            }
            if let Some(other) = by_wire.insert(*id, *schema) {
                return Err(format!(
                    "registry id {id} is given to {other:?} and {schema:?}"
                ));
            }
        }
        let by_schema = by_schema
            .into_iter()
            .zip(SchemaId::ALL)
            .map(|(id, schema)| id.ok_or_else(|| format!("{schema:?} has no registry id")))
            .collect::<Result<_, _>>()?;
        Ok(RegistryIds { by_schema, by_wire })
    }

    /// The id written for a schema.
    pub fn wire_id(&self, schema: SchemaId) -> u32 {
        self.by_schema[schema as usize - 1]
    }

    /// The schema a wire id names: the registry's ids first, then Meterflow's own (records
    /// written before the registry was configured).
    pub fn schema(&self, wire: u32) -> Option<SchemaId> {
        self.by_wire
            .get(&wire)
            .copied()
            .or_else(|| SchemaId::from_wire(wire))
    }

    /// Meterflow's own ids that the registry gives to another schema: a record written with
    /// one of them before the switch would be read as that other schema (and most likely
    /// fail to decode, landing in the dead-letter topic).
    pub fn shadowed(&self) -> Vec<(u32, SchemaId, SchemaId)> {
        SchemaId::ALL
            .into_iter()
            .filter_map(|own| {
                let theirs = *self.by_wire.get(&(own as u32))?;
                (theirs != own).then_some((own as u32, own, theirs))
            })
            .collect()
    }
}

/// Set once per process by [`use_registry_ids`]; unset, Meterflow's own ids are on the wire.
static REGISTRY_IDS: OnceLock<RegistryIds> = OnceLock::new();

/// From now on this process writes the registry's ids and reads them (besides its own).
/// Called once at start-up, before any record is written; a second call with other ids fails.
pub fn use_registry_ids(ids: RegistryIds) -> Result<(), String> {
    let set = REGISTRY_IDS.get_or_init(|| ids.clone());
    if *set == ids {
        Ok(())
    } else {
        Err("this process already uses other registry ids".into())
    }
}

fn wire_id(schema: SchemaId) -> u32 {
    REGISTRY_IDS
        .get()
        .map_or(schema as u32, |ids| ids.wire_id(schema))
}

fn schema_of(wire: u32) -> Option<SchemaId> {
    match REGISTRY_IDS.get() {
        Some(ids) => ids.schema(wire),
        None => SchemaId::from_wire(wire),
    }
}

/// Per schema, a writer and a same-schema reader, built once: resolving a schema's names is
/// work that belongs at start-up, not on every message.
struct Codecs {
    writers: Vec<GenericDatumWriter<'static>>,
    readers: Vec<GenericDatumReader<'static>>,
}

static CODECS: LazyLock<Codecs> = LazyLock::new(|| {
    let schemas = || SchemaId::ALL.iter().map(|id| id.schema());
    Codecs {
        writers: schemas()
            .map(|s| {
                GenericDatumWriter::builder(s)
                    .build()
                    .expect("every schema resolves (tested)")
            })
            .collect(),
        readers: schemas()
            .map(|s| {
                GenericDatumReader::builder(s)
                    .build()
                    .expect("every schema resolves (tested)")
            })
            .collect(),
    }
});

/// Why bytes could not be read as a record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {0} bytes, shorter than the 5-byte header")]
    Truncated(usize),
    #[error("message starts with byte {0:#04x}, not the wire format's magic byte 0x00")]
    BadMagic(u8),
    #[error("schema id {0} is not one Meterflow knows")]
    UnknownSchema(u32),
    #[error("schema id {found} holds a {found_name:?}, not the expected record")]
    WrongSchema { found: u32, found_name: SchemaId },
    #[error("Avro datum does not match its schema: {0}")]
    Avro(String),
    #[error("{0} bytes left over after the datum")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// A short machine-readable reason, used on the dead-letter topic and in metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated(_) | DecodeError::BadMagic(_) => "undecodable",
            DecodeError::UnknownSchema(_) | DecodeError::WrongSchema { .. } => "unknown_schema",
            DecodeError::Avro(_) | DecodeError::TrailingBytes(_) => "undecodable",
        }
    }
}

/// Why a record could not be written; only a bug (a type out of step with its schema) causes one.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode as schema {id:?}: {message}")]
pub struct EncodeError {
    pub id: SchemaId,
    pub message: String,
}

/// A record type with its current schema and the older ones it can be read from.
pub trait Record: Serialize + DeserializeOwned {
    /// The schema this code writes.
    const WRITES: SchemaId;
    /// Writer schemas this type can be read from (the current one included).
    const READS: &'static [SchemaId];

    /// Encodes with the current schema.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode_as(Self::WRITES, self)
    }

    /// Reads a datum of `writer` where it is another schema this code writes besides
    /// [`Record::WRITES`] (a roll-up's); `None` for an older version of the current one.
    fn read_other(
        _writer: SchemaId,
        _body: &mut &[u8],
    ) -> Option<Result<Self, apache_avro::Error>> {
        None
    }

    /// Reads a datum of `writer` by hand where this type has a reader of its own for it
    /// (`None` where apache-avro reads it).
    fn read_fast(_writer: SchemaId, _body: &mut &[u8]) -> Option<Result<Self, String>> {
        None
    }

    /// Decodes from any schema version in [`Record::READS`].
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }
}

impl Record for SampleBatch {
    const WRITES: SchemaId = SchemaId::SampleBatchV2;
    const READS: &'static [SchemaId] = &[SchemaId::SampleBatchV1, SchemaId::SampleBatchV2];
}
impl Record for UsageUpdate {
    const WRITES: SchemaId = SchemaId::UsageUpdateV2;
    const READS: &'static [SchemaId] = &[
        SchemaId::UsageUpdateV1,
        SchemaId::UsageUpdateV2,
        SchemaId::UsageRollup,
    ];

    /// A base window's record as `UsageUpdate`, a roll-up window's as `UsageRollup`, written
    /// by [`write_usage`].
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let schema = if self.resolution.is_empty() {
            Self::WRITES
        } else {
            SchemaId::UsageRollup
        };
        Ok(write_usage(self, schema))
    }

    fn read_other(writer: SchemaId, body: &mut &[u8]) -> Option<Result<Self, apache_avro::Error>> {
        (writer == SchemaId::UsageRollup).then(|| {
            CODECS.readers[writer as usize - 1]
                .read_deser::<UsageRollup>(body)
                .map(UsageUpdate::from)
        })
    }

    /// Both schemas [`write_usage`] writes are read by [`read_usage`].
    fn read_fast(writer: SchemaId, body: &mut &[u8]) -> Option<Result<Self, String>> {
        matches!(writer, SchemaId::UsageUpdateV2 | SchemaId::UsageRollup).then(|| read_usage(body))
    }
}

/// Reads an Avro `long` (or `int`) as apache-avro does: a varint of at most 10 bytes (bits
/// past the 64th dropped), zig-zag decoded.
fn get_long(body: &mut &[u8]) -> Result<i64, String> {
    let mut z = 0u64;
    for j in 0..10 {
        let (&byte, rest) = body
            .split_first()
            .ok_or("the record ends inside a number")?;
        *body = rest;
        z |= u64::from(byte & 0x7f) << (j * 7);
        if byte & 0x80 == 0 {
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err("a number longer than 10 bytes".into())
}

/// Reads an Avro `string`: a `long` length, then that many bytes of UTF-8.
fn get_string(body: &mut &[u8]) -> Result<String, String> {
    let len = get_long(body)?;
    let len = usize::try_from(len).map_err(|_| format!("a string of length {len}"))?;
    if len > body.len() {
        return Err(format!(
            "a string of {len} bytes where {} remain",
            body.len()
        ));
    }
    let (text, rest) = body.split_at(len);
    *body = rest;
    String::from_utf8(text.to_vec()).map_err(|e| format!("a string that is not UTF-8: {e}"))
}

/// Reads a usage record's fields in [`write_usage`]'s order (the `.avsc`'s): what apache-avro
/// reads from the same bytes, field by field, without its schema walk (the sink decodes every
/// record it consumes and every one a lease's series reads back). A test checks both readers
/// agree on valid and on damaged bytes.
fn read_usage(body: &mut &[u8]) -> Result<UsageUpdate, String> {
    // A struct expression evaluates its fields in the order written: the schema's.
    Ok(UsageUpdate {
        id: get_string(body)?,
        tenant: get_string(body)?,
        lease: get_string(body)?,
        service: get_string(body)?,
        node: get_string(body)?,
        metric: get_string(body)?,
        gpu_class: get_string(body)?,
        mig_profile: get_string(body)?,
        window_start_ms: get_long(body)?,
        window_end_ms: get_long(body)?,
        resolution: get_string(body)?,
        amount: get_long(body)?,
        scale: {
            let scale = get_long(body)?;
            i32::try_from(scale).map_err(|_| format!("scale {scale} is not an int"))?
        },
        coverage_ms: get_long(body)?,
        present_ms: get_long(body)?,
    })
}

/// Avro's binary encoding of a `long` or an `int`: zig-zag, then 7 bits a byte, low first.
fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push(z as u8 | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Avro's binary encoding of a `string`: its length in bytes as a `long`, then the bytes.
fn put_string(out: &mut Vec<u8>, s: &str) {
    put_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// A usage record framed for the wire under `schema` (`UsageUpdateV2` or `UsageRollup`, whose
/// fields are the same in the same order under other names), written field by field: the
/// processor sends several records per sample, and going through serde and apache-avro's
/// schema walk cost it more than the rest of building them. The bytes are apache-avro's for
/// the `.avsc` (checked by a test against its writer), so the schema files stay the source
/// of truth.
fn write_usage(u: &UsageUpdate, schema: SchemaId) -> Vec<u8> {
    let strings = [
        &u.id,
        &u.tenant,
        &u.lease,
        &u.service,
        &u.node,
        &u.metric,
        &u.gpu_class,
        &u.mig_profile,
    ];
    let text: usize = strings.iter().map(|s| s.len()).sum::<usize>() + u.resolution.len();
    // Each string's length and each number takes at most 10 bytes.
    let mut out = Vec::with_capacity(HEADER_LEN + text + 15 * 10);
    out.push(MAGIC);
    out.extend_from_slice(&wire_id(schema).to_be_bytes());
    for s in strings {
        put_string(&mut out, s);
    }
    put_long(&mut out, u.window_start_ms);
    put_long(&mut out, u.window_end_ms);
    put_string(&mut out, &u.resolution);
    put_long(&mut out, u.amount);
    put_long(&mut out, u.scale as i64);
    put_long(&mut out, u.coverage_ms);
    put_long(&mut out, u.present_ms);
    out
}

/// A roll-up window's [`UsageUpdate`] as the `UsageRollup` schema has it: another record
/// name, and the window in `rollup_start_ms` and `rollup_end_ms`.
#[derive(serde::Serialize, serde::Deserialize)]
struct UsageRollup<'a> {
    id: Cow<'a, str>,
    tenant: Cow<'a, str>,
    lease: Cow<'a, str>,
    service: Cow<'a, str>,
    node: Cow<'a, str>,
    metric: Cow<'a, str>,
    gpu_class: Cow<'a, str>,
    mig_profile: Cow<'a, str>,
    rollup_start_ms: i64,
    rollup_end_ms: i64,
    resolution: Cow<'a, str>,
    amount: i64,
    scale: i32,
    coverage_ms: i64,
    present_ms: i64,
}

impl<'a> From<&'a UsageUpdate> for UsageRollup<'a> {
    fn from(u: &'a UsageUpdate) -> Self {
        UsageRollup {
            id: Cow::Borrowed(&u.id),
            tenant: Cow::Borrowed(&u.tenant),
            lease: Cow::Borrowed(&u.lease),
            service: Cow::Borrowed(&u.service),
            node: Cow::Borrowed(&u.node),
            metric: Cow::Borrowed(&u.metric),
            gpu_class: Cow::Borrowed(&u.gpu_class),
            mig_profile: Cow::Borrowed(&u.mig_profile),
            rollup_start_ms: u.window_start_ms,
            rollup_end_ms: u.window_end_ms,
            resolution: Cow::Borrowed(&u.resolution),
            amount: u.amount,
            scale: u.scale,
            coverage_ms: u.coverage_ms,
            present_ms: u.present_ms,
        }
    }
}

impl From<UsageRollup<'_>> for UsageUpdate {
    fn from(r: UsageRollup<'_>) -> Self {
        UsageUpdate {
            id: r.id.into_owned(),
            tenant: r.tenant.into_owned(),
            lease: r.lease.into_owned(),
            service: r.service.into_owned(),
            node: r.node.into_owned(),
            metric: r.metric.into_owned(),
            gpu_class: r.gpu_class.into_owned(),
            mig_profile: r.mig_profile.into_owned(),
            window_start_ms: r.rollup_start_ms,
            window_end_ms: r.rollup_end_ms,
            resolution: r.resolution.into_owned(),
            amount: r.amount,
            scale: r.scale,
            coverage_ms: r.coverage_ms,
            present_ms: r.present_ms,
        }
    }
}
impl Record for BillingRecord {
    const WRITES: SchemaId = SchemaId::BillingRecord;
    const READS: &'static [SchemaId] = &[SchemaId::BillingRecord];
}
impl Record for Alert {
    const WRITES: SchemaId = SchemaId::Alert;
    const READS: &'static [SchemaId] = &[SchemaId::Alert];
}
impl Record for DeadLetter {
    const WRITES: SchemaId = SchemaId::DeadLetter;
    const READS: &'static [SchemaId] = &[SchemaId::DeadLetter];
}

/// Encodes any serializable value with the schema `id` (older writers use this too).
pub fn encode_as<T: Serialize>(id: SchemaId, value: &T) -> Result<Vec<u8>, EncodeError> {
    let err = |e: apache_avro::Error| EncodeError {
        id,
        message: e.to_string(),
    };
    let writer = &CODECS.writers[id as usize - 1];
    let mut out = Vec::with_capacity(256);
    out.push(MAGIC);
    out.extend_from_slice(&wire_id(id).to_be_bytes());
    writer.write_ser(&mut out, value).map_err(err)?;
    Ok(out)
}

fn decode<R: Record>(bytes: &[u8]) -> Result<R, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if bytes[0] != MAGIC {
        return Err(DecodeError::BadMagic(bytes[0]));
    }
    let wire = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let writer = schema_of(wire).ok_or(DecodeError::UnknownSchema(wire))?;
    if !R::READS.contains(&writer) {
        return Err(DecodeError::WrongSchema {
            found: wire,
            found_name: writer,
        });
    }
    let mut body = &bytes[HEADER_LEN..];
    let avro = |e: apache_avro::Error| DecodeError::Avro(e.to_string());
    let record = if let Some(record) = R::read_fast(writer, &mut body) {
        record.map_err(DecodeError::Avro)?
    } else if writer == R::WRITES {
        // Same schema: deserialize straight from the bytes, no intermediate value.
        CODECS.readers[writer as usize - 1]
            .read_deser::<R>(&mut body)
            .map_err(avro)?
    } else if let Some(record) = R::read_other(writer, &mut body) {
        record.map_err(avro)?
    } else {
        // Older schema (rare): resolve the writer's value to the current schema, then convert.
        let value = GenericDatumReader::builder(writer.schema())
            .reader_schema(R::WRITES.schema())
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(avro)?;
        apache_avro::from_value(&value).map_err(avro)?
    };
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes(body.len()));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    fn arb_usage() -> impl Strategy<Value = UsageUpdate> {
        let text = || "(|[a-z0-9.-]{1,20}|.{0,40})";
        let long = || prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0i64), any::<i64>()];
        (
            proptest::collection::vec(text(), 8),
            (long(), long(), long(), long(), long()),
            prop_oneof![Just(""), Just("hour"), Just("day"), Just("month")],
            prop_oneof![Just(i32::MIN), Just(i32::MAX), any::<i32>()],
        )
            .prop_map(
                |(s, (start, end, amount, coverage, present), resolution, scale)| UsageUpdate {
                    id: s[0].clone(),
                    tenant: s[1].clone(),
                    lease: s[2].clone(),
                    service: s[3].clone(),
                    node: s[4].clone(),
                    metric: s[5].clone(),
                    gpu_class: s[6].clone(),
                    mig_profile: s[7].clone(),
                    window_start_ms: start,
                    window_end_ms: end,
                    resolution: resolution.into(),
                    amount,
                    scale,
                    coverage_ms: coverage,
                    present_ms: present,
                },
            )
    }

    proptest! {
        /// The hand-written usage encoding is apache-avro's writer's, byte for byte, for the
        /// `.avsc` of each of its two schemas, and reads back whole.
        #[test]
        fn usage_records_are_written_as_apache_avro_writes_them(u in arb_usage()) {
            let written = u.encode().expect("encodes");
            let reference = if u.resolution.is_empty() {
                encode_as(SchemaId::UsageUpdateV2, &u)
            } else {
                encode_as(SchemaId::UsageRollup, &UsageRollup::from(&u))
            }
            .expect("apache-avro encodes");
            prop_assert_eq!(&written, &reference);
            prop_assert_eq!(UsageUpdate::decode(&written).expect("decodes"), u);
        }

        /// The hand-written usage reader reads what apache-avro reads from the same bytes,
        /// and refuses what it refuses: records whole, cut short, with bytes changed, with
        /// bytes added.
        #[test]
        fn usage_records_are_read_as_apache_avro_reads_them(
            u in arb_usage(),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let mut bytes = u.encode().expect("encodes");
            for (at, byte) in changes {
                // The header stays: it picks the schema both readers are given.
                let at = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(HEADER_LEN + cut.index(bytes.len() - HEADER_LEN + 1));
            }
            bytes.extend(tail);
            let writer = if u.resolution.is_empty() {
                SchemaId::UsageUpdateV2
            } else {
                SchemaId::UsageRollup
            };
            let by_hand = {
                let mut body = &bytes[HEADER_LEN..];
                read_usage(&mut body).map(|r| (r, body.len()))
            };
            let by_apache_avro = {
                let mut body = &bytes[HEADER_LEN..];
                let read = if writer == SchemaId::UsageRollup {
                    UsageUpdate::read_other(writer, &mut body).expect("a roll-up reader")
                } else {
                    CODECS.readers[writer as usize - 1].read_deser::<UsageUpdate>(&mut body)
                };
                read.map(|r| (r, body.len()))
            };
            match (by_hand, by_apache_avro) {
                (Ok(hand), Ok(reference)) => prop_assert_eq!(hand, reference),
                (Err(_), Err(_)) => {}
                (hand, reference) => prop_assert!(
                    false,
                    "the readers disagree on {:?}: by hand {:?}, apache-avro {:?}",
                    bytes,
                    hand,
                    reference.map_err(|e| e.to_string())
                ),
            }
        }
    }

    #[test]
    fn registry_ids_map_both_ways_and_refuse_a_muddle() {
        let ids: Vec<(SchemaId, u32)> = SchemaId::ALL
            .into_iter()
            .map(|s| (s, 100 + s as u32))
            .collect();
        let map = RegistryIds::new(&ids).expect("a map");
        assert_eq!(map.wire_id(SchemaId::UsageUpdateV2), 107);
        assert_eq!(map.schema(102), Some(SchemaId::SampleBatchV2));
        // Records written before the switch carry Meterflow's own ids.
        assert_eq!(map.schema(4), Some(SchemaId::BillingRecord));
        assert_eq!(map.schema(99), None);
        assert!(map.shadowed().is_empty());
        // A fresh registry numbering from 1 in another order shadows own ids.
        let mut swapped = ids.clone();
        swapped[0].1 = 2;
        swapped[1].1 = 1;
        let map = RegistryIds::new(&swapped).expect("a map");
        assert_eq!(
            map.shadowed(),
            vec![
                (1, SchemaId::SampleBatchV1, SchemaId::SampleBatchV2),
                (2, SchemaId::SampleBatchV2, SchemaId::SampleBatchV1)
            ]
        );
        let mut twice = ids.clone();
        twice[1].1 = 101;
        assert!(
            RegistryIds::new(&twice)
                .expect_err("refused")
                .contains("registry id 101")
        );
        assert!(
            RegistryIds::new(&ids[1..])
                .expect_err("refused")
                .contains("SampleBatchV1 has no")
        );
    }
    use proptest::prelude::*;

    fn series(tenant: &str) -> SeriesId {
        SeriesId {
            tenant: tenant.into(),
            lease: "4711.1.1".into(),
            service: "web".into(),
            replica: "0".into(),
            node: "node-1".into(),
            provider: "akash1prov".into(),
            container_id: "c-1".into(),
            gpu_uuid: "GPU-1".into(),
            gpu_model: "NVIDIA A100-SXM4-80GB".into(),
            gpu_class: "a100".into(),
            mig_profile: "1g.10gb".into(),
        }
    }

    fn batch() -> SampleBatch {
        SampleBatch {
            node: "node-1".into(),
            agent_id: "agent-1".into(),
            sequence: 42,
            collected_at_ms: 1_700_000_000_000,
            agent_version: "0.1.0".into(),
            samples: vec![
                Sample {
                    series: series("t1"),
                    kind: SampleKind::Allocation,
                    metric: "gpu".into(),
                    value: 1.0,
                    timestamp_ms: 1_700_000_000_000,
                    started_at_ms: Some(1_699_999_000_000),
                    finished_at_ms: None,
                },
                Sample {
                    series: series("t2"),
                    kind: SampleKind::Counter,
                    metric: "cpu_usage_seconds_total".into(),
                    value: 12.5,
                    timestamp_ms: 1_700_000_000_001,
                    started_at_ms: None,
                    finished_at_ms: Some(5),
                },
            ],
        }
    }

    #[test]
    fn every_schema_parses() {
        for id in SchemaId::ALL {
            assert_eq!(SchemaId::from_wire(id as u32), Some(id));
            let _ = id.schema();
        }
    }

    #[test]
    fn sample_batch_round_trips() {
        let b = batch();
        let bytes = b.encode().expect("encodes");
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 2]);
        assert_eq!(SampleBatch::decode(&bytes), Ok(b));
    }

    /// Every enum value in `v` (a record has one enum type) set to `(index, symbol)`.
    fn set_enums(v: &mut apache_avro::types::Value, index: u32, symbol: &str) {
        use apache_avro::types::Value;
        match v {
            Value::Enum(i, s) => (*i, *s) = (index, symbol.to_string()),
            Value::Record(fields) => fields
                .iter_mut()
                .for_each(|(_, f)| set_enums(f, index, symbol)),
            Value::Array(items) => items.iter_mut().for_each(|i| set_enums(i, index, symbol)),
            Value::Union(_, inner) => set_enums(inner, index, symbol),
            _ => {}
        }
    }

    /// `record` as a writer of a newer schema would write it with a kind this code does not
    /// know (`CREDIT`, appended after `UNKNOWN`: symbol `credit`), read back by this code's
    /// schema.
    fn read_with_a_newer_kind<R: Record>(record: &R, credit: u32) -> R {
        let current = R::WRITES.schema();
        let newer_text =
            R::WRITES
                .source()
                .replacen("\"UNKNOWN\"\n", "\"UNKNOWN\", \"CREDIT\"\n", 1);
        assert_ne!(newer_text, R::WRITES.source(), "the enum ends with UNKNOWN");
        let newer = Schema::parse_str(&newer_text).expect("the newer schema parses");
        let bytes = record.encode().expect("encodes");
        let mut value = GenericDatumReader::builder(current)
            .build()
            .and_then(|r| r.read_value(&mut &bytes[HEADER_LEN..]))
            .expect("reads");
        set_enums(&mut value, credit, "CREDIT");
        let written = GenericDatumWriter::builder(&newer)
            .build()
            .and_then(|w| w.write_value_to_vec(value))
            .expect("the newer writer writes CREDIT");
        let read = GenericDatumReader::builder(&newer)
            .reader_schema(current)
            .build()
            .and_then(|r| r.read_value(&mut &written[..]))
            .expect("this schema resolves the newer one");
        apache_avro::from_value(&read).expect("into this code's type")
    }

    #[test]
    fn a_kind_added_after_this_schema_reads_as_unknown_never_as_another_kind() {
        let mut billing = BillingRecord {
            id: "1".into(),
            kind: BillingKind::Charge,
            tenant: "t".into(),
            lease: "l".into(),
            item: "gpu:h100:".into(),
            window_start_ms: 0,
            window_end_ms: 60_000,
            revision: 0,
            quantity: 1_000,
            scale: 3,
            price_book_version: "2026-11".into(),
            cost_micros: 833,
            currency: "USD".into(),
        };
        // CHARGE, ADJUSTMENT, UNKNOWN, then CREDIT (3).
        assert_eq!(
            read_with_a_newer_kind(&billing, 3).kind,
            BillingKind::Unknown
        );
        billing.kind = BillingKind::Unknown;
        assert_eq!(
            read_with_a_newer_kind(&billing, 3),
            billing,
            "all else as written"
        );
        // COUNTER, GAUGE, ALLOCATION, UNKNOWN, then CREDIT (4).
        let read = read_with_a_newer_kind(&batch(), 4);
        assert!(read.samples.iter().all(|s| s.kind == SampleKind::Unknown));
        assert_eq!(read.samples.len(), batch().samples.len());
    }

    #[test]
    fn output_records_round_trip() {
        let u = UsageUpdate {
            id: "00ff".into(),
            tenant: "t".into(),
            lease: "l".into(),
            service: "s".into(),
            node: String::new(),
            metric: "gpu_seconds".into(),
            gpu_class: "h100".into(),
            mig_profile: "".into(),
            window_start_ms: 60_000,
            window_end_ms: 120_000,
            resolution: String::new(),
            amount: 59_999,
            scale: 3,
            coverage_ms: 60_000,
            present_ms: 60_000,
        };
        assert_eq!(
            UsageUpdate::decode(&u.encode().expect("encodes")),
            Ok(u.clone())
        );
        // A version-1 record (no present_ms) is still read.
        #[derive(serde::Serialize)]
        struct V1<'a> {
            id: &'a str,
            tenant: &'a str,
            lease: &'a str,
            service: &'a str,
            metric: &'a str,
            gpu_class: &'a str,
            mig_profile: &'a str,
            window_start_ms: i64,
            window_end_ms: i64,
            amount: i64,
            scale: i32,
            coverage_ms: i64,
        }
        let old = V1 {
            id: &u.id,
            tenant: &u.tenant,
            lease: &u.lease,
            service: &u.service,
            metric: &u.metric,
            gpu_class: &u.gpu_class,
            mig_profile: &u.mig_profile,
            window_start_ms: u.window_start_ms,
            window_end_ms: u.window_end_ms,
            amount: u.amount,
            scale: u.scale,
            coverage_ms: u.coverage_ms,
        };
        let bytes = encode_as(SchemaId::UsageUpdateV1, &old).expect("v1 encodes");
        assert_eq!(
            UsageUpdate::decode(&bytes),
            Ok(UsageUpdate {
                present_ms: 0,
                ..u.clone()
            })
        );
        // A roll-up goes under its own record name and comes back the same; a roll-up written
        // before as a `UsageUpdate` (resolution set) is read too.
        let hour = UsageUpdate {
            resolution: "hour".into(),
            window_end_ms: 3_600_000,
            ..u.clone()
        };
        let bytes = hour.encode().expect("encodes");
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, SchemaId::UsageRollup as u8]);
        assert_eq!(UsageUpdate::decode(&bytes), Ok(hour.clone()));
        let before = encode_as(SchemaId::UsageUpdateV2, &hour).expect("encodes");
        assert_eq!(UsageUpdate::decode(&before), Ok(hour.clone()));
        // A reader that knows only `UsageUpdate` (either version: a consumer built before
        // roll-ups had their own record) fails on a roll-up instead of reading it without its
        // resolution, as a base window: the record's name differs (which this Avro library does
        // not check when it resolves, though the specification asks it to) and the window
        // fields it requires are missing.
        for old_reader in [SchemaId::UsageUpdateV1, SchemaId::UsageUpdateV2] {
            let resolved = GenericDatumReader::builder(SchemaId::UsageRollup.schema())
                .reader_schema(old_reader.schema())
                .build()
                .and_then(|r| r.read_value(&mut &bytes[HEADER_LEN..]));
            assert!(
                resolved.is_err(),
                "{old_reader:?} reads a roll-up: {resolved:?}"
            );
        }
        let b = BillingRecord {
            id: "1".into(),
            kind: BillingKind::Adjustment,
            tenant: "t".into(),
            lease: "l".into(),
            item: "gpu:h100:".into(),
            window_start_ms: 0,
            window_end_ms: 60_000,
            revision: 1,
            quantity: -1_000,
            scale: 3,
            price_book_version: "2026-11".into(),
            cost_micros: -833,
            currency: "USD".into(),
        };
        assert_eq!(BillingRecord::decode(&b.encode().expect("encodes")), Ok(b));
        let a = Alert {
            id: "a".into(),
            tenant: "t".into(),
            kind: "budget_threshold".into(),
            period: "2026-11".into(),
            threshold_percent: 90,
            budget_micros: 100_000_000,
            spent_micros: 90_000_001,
            raised_at_ms: 1,
            message: "90 % of the budget used".into(),
        };
        assert_eq!(Alert::decode(&a.encode().expect("encodes")), Ok(a));
        let d = DeadLetter {
            reason: "undecodable".into(),
            detail: "x".into(),
            source_topic: "meterflow.samples".into(),
            source_partition: 3,
            source_offset: 99,
            payload: vec![0, 1, 2, 255],
        };
        assert_eq!(DeadLetter::decode(&d.encode().expect("encodes")), Ok(d));
    }

    /// What an agent of schema version 1 wrote: no `agent_version`.
    #[derive(Serialize)]
    struct SampleBatchV1<'a> {
        node: &'a str,
        agent_id: &'a str,
        sequence: i64,
        collected_at_ms: i64,
        samples: &'a [Sample],
    }

    #[test]
    fn a_version_1_batch_is_read_by_the_current_code() {
        let b = batch();
        let old = SampleBatchV1 {
            node: &b.node,
            agent_id: &b.agent_id,
            sequence: b.sequence,
            collected_at_ms: b.collected_at_ms,
            samples: &b.samples,
        };
        let bytes = encode_as(SchemaId::SampleBatchV1, &old).expect("v1 encodes");
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        let read = SampleBatch::decode(&bytes).expect("v1 resolves to v2");
        assert_eq!(read.agent_version, "", "the new field takes its default");
        assert_eq!(read.samples, b.samples);
        assert_eq!(read.sequence, 42);
    }

    #[test]
    fn typed_errors_for_bad_frames() {
        assert_eq!(SampleBatch::decode(&[0, 0]), Err(DecodeError::Truncated(2)));
        assert_eq!(
            SampleBatch::decode(&[7, 0, 0, 0, 2]),
            Err(DecodeError::BadMagic(7))
        );
        assert_eq!(
            SampleBatch::decode(&[0, 0, 0, 0, 99]),
            Err(DecodeError::UnknownSchema(99))
        );
        let usage_bytes = encode_as(
            SchemaId::Alert,
            &Alert {
                id: String::new(),
                tenant: String::new(),
                kind: String::new(),
                period: String::new(),
                threshold_percent: 0,
                budget_micros: 0,
                spent_micros: 0,
                raised_at_ms: 0,
                message: String::new(),
            },
        )
        .expect("encodes");
        assert!(matches!(
            SampleBatch::decode(&usage_bytes),
            Err(DecodeError::WrongSchema { found: 5, .. })
        ));
        let mut trailing = batch().encode().expect("encodes");
        trailing.push(0);
        assert_eq!(
            SampleBatch::decode(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic the decoder: they decode or give a typed error.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SampleBatch::decode(&bytes);
        }

        /// A valid header followed by random bytes: the hardest case for the datum reader.
        #[test]
        fn garbage_datum_never_panics(
            version in 1u8..=2,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = vec![0, 0, 0, 0, version];
            bytes.extend(body);
            let _ = SampleBatch::decode(&bytes);
        }

        /// Mutating one byte of a valid record never panics either.
        #[test]
        fn corrupted_record_never_panics(pos in 0usize..10_000, byte in any::<u8>()) {
            let mut bytes = batch().encode().expect("encodes");
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = SampleBatch::decode(&bytes);
        }
    }
}
