//! Flow events as the datapath's ring buffer hands them over (raw bytes, any length),
//! decoded into flow records, printed and sent as JSON to `strait observe`.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strait::datapath::flows::{self, FlowRecord, IdentityLookup};

fuzz_target!(|data: &[u8]| {
    let Some(event) = flows::parse_event(data) else {
        assert!(data.len() < flows::EVENT_SIZE);
        return;
    };
    let lookup: IdentityLookup = Arc::new(|id| {
        (
            (id % 3 == 0).then(|| "cluster-usa".to_owned()),
            vec![format!("k8s:app=a{id}")],
        )
    });
    // Boot offsets as seen on a real machine: up to a few decades since the epoch.
    for offset in [Duration::ZERO, Duration::from_secs(60 * 365 * 86_400)] {
        let record = flows::decode(&event, offset, &lookup);
        let _ = record.to_string();
        let json = serde_json::to_vec(&record).expect("a record encodes");
        let again: FlowRecord = serde_json::from_slice(&json).expect("a record decodes");
        assert_eq!(again, record);
    }
});
