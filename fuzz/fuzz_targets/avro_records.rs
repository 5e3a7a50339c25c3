//! Any bytes as each record type of the topics (a Meterflow or Schema Registry header, then
//! Avro): decoding never panics, and what decodes encodes to bytes that decode to the same
//! encoding again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_schemas::{Alert, BillingRecord, DeadLetter, Record, SampleBatch, UsageUpdate};

fn round_trip<R: Record>(data: &[u8]) {
    let Ok(record) = R::decode(data) else {
        return;
    };
    let Ok(bytes) = record.encode() else {
        return;
    };
    let again = R::decode(&bytes).expect("an encoded record decodes");
    assert_eq!(again.encode().expect("and encodes again"), bytes);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<SampleBatch>(data);
    round_trip::<UsageUpdate>(data);
    round_trip::<BillingRecord>(data);
    round_trip::<Alert>(data);
    round_trip::<DeadLetter>(data);
});
