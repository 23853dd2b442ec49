//! `cilium/state/services/v1/<cluster>/<namespace>/<name>`: a remote cluster's global service.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::wire::{DataKind, KvClusterService, validate};
use strait_fuzz::{KvInput, round_trip, sync};

fuzz_target!(|data: &[u8]| {
    let Some(input) = KvInput::parse(data) else {
        return;
    };
    let _ = validate::decode_local_service(input.suffix, input.value);
    if let Some(remote) = &input.remote {
        let _ = validate::decode_remote_service(remote, input.suffix, input.value);
    }
    let encoded = KvClusterService::decode(input.value).ok().map(|svc| {
        let _ = (svc.namespaced_name(), svc.key_name());
        round_trip(&svc, KvClusterService::encode, KvClusterService::decode)
    });
    sync(DataKind::Services, &input, encoded);
});
