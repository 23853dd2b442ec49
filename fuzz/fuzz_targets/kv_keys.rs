//! etcd keys as read from a remote's kvstore (or mirrored by KVStoreMesh): state and cache
//! forms, canaries, cluster-config keys, each kind's decoder suffix.
//! Input: `<remote name>\n<key>`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::identity::validate_cluster_name;
use strait::wire::{DataKind, keys};
use strait_fuzz::split_lines;

fuzz_target!(|data: &[u8]| {
    let Some(([remote], key)) = split_lines::<1>(data) else {
        return;
    };
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if let Some((kind, rest)) = keys::parse_state_key(key) {
        assert_eq!(format!("{}/{rest}", kind.state_prefix()), key);
    }
    if let Some((kind, owner, rest)) = keys::parse_cache_key(key) {
        assert_eq!(format!("{}/{owner}/{rest}", kind.cache_prefix()), key);
    }
    if let Some(name) = keys::parse_cluster_config_key(key) {
        assert_eq!(keys::cluster_config_key(name), key);
    }
    if let Some(prefix) = keys::canary_registration(key, remote) {
        let _ = DataKind::from_canary_prefix(prefix);
    }
    let _ = keys::state_to_cache_prefix(key);
    for kind in DataKind::ALL {
        for cached in [false, true] {
            // Any suffix survives key → suffix.
            let full = kind.key(remote, cached, key);
            assert_eq!(kind.key_suffix(&full, remote, cached), Some(key));
            let _ = kind.key_suffix(key, remote, cached);
        }
    }
    // Cluster names are validated before any of their keys are read.
    if validate_cluster_name(remote).is_err() {
        return;
    }
    if let Some(cache) = keys::state_key_to_cache_key(remote, key) {
        let (kind, owner, _) =
            keys::parse_cache_key(&cache).expect("a mirrored key is a cache key");
        assert_eq!(owner, remote);
        let (state_kind, _) = keys::parse_state_key(key).expect("mirrored from a state key");
        assert_eq!(kind, state_kind);
        // A reader of the cache sees the value under the suffix a reader of the state saw.
        assert_eq!(
            kind.key_suffix(&cache, remote, true),
            kind.key_suffix(key, remote, false),
            "{key} mirrored as {cache}"
        );
    }
});
