//! `cilium/state/ip/v1/default/<ip-or-prefix>`: an endpoint IP (or prefix) with its identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::wire::{DataKind, IpIdentityPair, validate};
use strait_fuzz::{KvInput, round_trip, sync};

fuzz_target!(|data: &[u8]| {
    let Some(input) = KvInput::parse(data) else {
        return;
    };
    if let Ok(pair) = validate::decode_local_ipcache(input.suffix, input.value) {
        // Accepted means usable: a prefix, and the key is its prefix string.
        assert!(pair.prefix().is_some());
        assert_eq!(pair.prefix_string(), input.suffix);
    }
    if let Some(remote) = &input.remote
        && let Ok(pair) = validate::decode_remote_ipcache(remote, input.suffix, input.value)
    {
        assert!(
            strait::identity::is_reserved(pair.id) || remote.identity_range().contains(pair.id),
            "accepted identity {} outside the remote's range",
            pair.id
        );
    }
    let encoded = IpIdentityPair::decode(input.value).ok().map(|pair| {
        let _ = (pair.prefix(), pair.prefix_string());
        round_trip(&pair, IpIdentityPair::encode, IpIdentityPair::decode)
    });
    sync(DataKind::IpCache, &input, encoded);
});
