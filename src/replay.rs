//! `meterflow replay`: reprocess the samples topic from offsets into a new state directory,
//! with a progress bar.
//!
//! A replay is the processor run once over what the topic holds (SPEC: reprocess from
//! offsets): it rebuilds state after a state volume is lost, or before a processor version
//! whose checkpoint format changed. It starts where `--from` says, reads up to the topic's end
//! at its start and stops with a checkpoint; `meterflow processor --state-dir` on the same
//! directory then continues live. Its outputs are the processor's: usage updates have ids from
//! their content, so the sink applies a repeated one as a no-op, and billing emits only what the
//! billing topic does not hold yet. The live processor must be stopped meanwhile: both would
//! write billing records.
//!
//! The bar counts messages read against the messages between the start offsets and the ends
//! (grown if more are read: the embedded broker can report an end one short);
//! it is drawn only where stderr is a terminal, and a summary line is printed at the end
//! either way.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use meterflow_processor::ProcessorConfig;
use meterflow_processor::metrics::METRICS;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use meterflow_schemas::topics;

/// Start offsets by partition; empty means every partition from its beginning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Offsets(pub BTreeMap<i32, i64>);

/// `beginning`, or `PARTITION:OFFSET` pairs separated by commas (for clap).
pub fn parse_offsets(s: &str) -> Result<Offsets, String> {
    if s == "beginning" {
        return Ok(Offsets::default());
    }
    let mut offsets = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = pair.split_once(':').and_then(|(p, o)| {
            Some((p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?))
        });
        let Some((partition, offset)) = parsed.filter(|(p, o)| *p >= 0 && *o >= 0) else {
            return Err(format!(
                "`{pair}` is not PARTITION:OFFSET (e.g. 0:1500); use `beginning` for every partition from its start"
            ));
        };
        if offsets.insert(partition, offset).is_some() {
            return Err(format!("partition {partition} is given twice"));
        }
    }
    if offsets.is_empty() {
        return Err("no PARTITION:OFFSET pair; use `beginning` for every partition".into());
    }
    Ok(Offsets(offsets))
}

/// What a replay has to read: per partition, from where to the end at its start.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub ranges: BTreeMap<i32, (i64, i64)>,
}

impl Plan {
    /// Messages to read in all.
    pub fn total(&self) -> u64 {
        self.ranges
            .values()
            .map(|(from, end)| (end - from).max(0) as u64)
            .sum()
    }

    /// The plan for start offsets over partitions with these (low, high) watermarks: a start
    /// before the low one (removed by retention) starts at the low one.
    pub fn new(from: &Offsets, watermarks: &BTreeMap<i32, (i64, i64)>) -> Result<Plan> {
        if let Some(p) = from.0.keys().find(|p| !watermarks.contains_key(p)) {
            bail!(
                "partition {p} is not a partition of {} (it has {})",
                topics::SAMPLES,
                watermarks.len()
            );
        }
        let ranges = watermarks
            .iter()
            .map(|(p, (low, high))| {
                let start = from.0.get(p).copied().unwrap_or(*low).clamp(*low, *high);
                (*p, (start, *high))
            })
            .collect();
        Ok(Plan { ranges })
    }
}

/// Low and high offsets of every partition of the samples topic.
fn watermarks(brokers: &str) -> Result<BTreeMap<i32, (i64, i64)>> {
    let consumer: BaseConsumer = ClientConfig::from_iter(meterflow_schemas::kafka::properties())
        .set("bootstrap.servers", brokers)
        .create()
        .context("cannot create a Kafka client")?;
    let metadata = consumer
        .fetch_metadata(Some(topics::SAMPLES), Duration::from_secs(10))
        .with_context(|| {
            format!(
                "cannot read the partitions of {} from {brokers}",
                topics::SAMPLES
            )
        })?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {} has no partitions on {brokers}", topics::SAMPLES);
    }
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topics::SAMPLES, p, Duration::from_secs(10))
                .map(|w| (p, w))
                .with_context(|| {
                    format!(
                        "cannot read the offsets of {} partition {p}",
                        topics::SAMPLES
                    )
                })
        })
        .collect()
}

/// Replays into `state_dir`, which must not hold state yet.
pub async fn run(
    mut config: ProcessorConfig,
    state_dir: &Path,
    from: &Offsets,
    shutdown: CancellationToken,
) -> Result<()> {
    if std::fs::read_dir(state_dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: a replay builds its state afresh. Give a new --state-dir, or run `meterflow processor --state-dir {}` to continue from the state it holds",
            state_dir.display(),
            state_dir.display()
        );
    }
    let brokers = config.brokers.clone();
    let plan = {
        let brokers = brokers.clone();
        let marks = tokio::task::spawn_blocking(move || watermarks(&brokers)).await??;
        Plan::new(from, &marks)?
    };
    let total = plan.total();
    config.start_offsets = plan.ranges.iter().map(|(p, (s, _))| (*p, *s)).collect();
    config.state_dir = Some(state_dir.to_path_buf());
    config.exit_when_caught_up = true;

    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replay [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} batches ({per_sec}, {eta} left)",
        )
        .expect("a valid template"),
    );
    let read_before = METRICS.input_messages.get();
    let started = Instant::now();
    let mut processor =
        tokio::task::spawn_blocking(move || meterflow_processor::run(config, shutdown));
    let outcome = loop {
        tokio::select! {
            done = &mut processor => break done,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let read = METRICS.input_messages.get() - read_before;
                // A broker may report an end short of its last message (tansu does).
                if read > bar.length().unwrap_or(0) {
                    bar.set_length(read);
                }
                bar.set_position(read);
            }
        }
    };
    let read = METRICS.input_messages.get() - read_before;
    bar.set_length(read.max(total));
    bar.set_position(read);
    bar.finish();
    outcome.context("replay thread")?.context("replay failed")?;
    let seconds = started.elapsed().as_secs_f64();
    let dead = meterflow_processor::metrics::dead_letters_total();
    println!(
        "replayed {read} messages from {} partition(s) in {seconds:.1} s: {} batches, {} duplicates, {dead} dead letters, {} billing records; state in {}",
        plan.ranges.len(),
        METRICS.batches.get(),
        METRICS.duplicates.get(),
        METRICS.billing_records.get(),
        state_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_or_say_what_is_wrong() {
        assert_eq!(parse_offsets("beginning"), Ok(Offsets::default()));
        assert_eq!(
            parse_offsets("0:1500, 3:0"),
            Ok(Offsets(BTreeMap::from([(0, 1500), (3, 0)])))
        );
        assert!(
            parse_offsets("0=15")
                .expect_err("refused")
                .contains("PARTITION:OFFSET")
        );
        assert!(
            parse_offsets("0:-1")
                .expect_err("refused")
                .contains("`0:-1`")
        );
        assert!(
            parse_offsets("1:5,1:6")
                .expect_err("refused")
                .contains("twice")
        );
        assert!(
            parse_offsets(",")
                .expect_err("refused")
                .contains("beginning")
        );
    }

    #[test]
    fn a_plan_reads_from_the_start_offsets_to_the_ends() {
        let marks = BTreeMap::from([(0, (0, 100)), (1, (40, 90)), (2, (0, 10))]);
        let plan = Plan::new(&Offsets(BTreeMap::from([(0, 60), (1, 5), (2, 50)])), &marks)
            .expect("a plan");
        // Partition 1's start was removed by retention: from its low mark; partition 2's
        // start is past its end: nothing to read.
        assert_eq!(
            plan.ranges,
            BTreeMap::from([(0, (60, 100)), (1, (40, 90)), (2, (10, 10))])
        );
        assert_eq!(plan.total(), 40 + 50);
        let everything = Plan::new(&Offsets::default(), &marks).expect("a plan");
        assert_eq!(everything.total(), 100 + 50 + 10);
        let err = Plan::new(&Offsets(BTreeMap::from([(7, 0)])), &marks).expect_err("refused");
        assert!(err.to_string().contains("partition 7"), "{err}");
    }
}
