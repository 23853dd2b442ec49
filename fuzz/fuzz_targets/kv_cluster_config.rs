//! `cilium/cluster-config/<cluster>`: a remote's cluster ID and capabilities.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::identity::MaxConnectedClusters;
use strait::wire::{KvClusterConfig, RemoteContext, validate};
use strait_fuzz::round_trip;

fuzz_target!(|data: &[u8]| {
    for local_max in [MaxConnectedClusters::Max255, MaxConnectedClusters::Max511] {
        if let Ok(config) = validate::decode_remote_cluster_config(local_max, data) {
            assert!(config.id >= 1 && config.id <= local_max.cluster_id_max());
            let ctx = RemoteContext::from_config("c1", &config, local_max);
            let _ = ctx.identity_range();
            let _ = validate::check_cluster_id_available("c1", config.id, [("c2", 7)]);
        }
    }
    if let Ok(config) = KvClusterConfig::decode(data) {
        let _ = config.exports_services_capability();
        round_trip(&config, KvClusterConfig::encode, KvClusterConfig::decode);
        round_trip(
            &config.cached_copy(),
            KvClusterConfig::encode,
            KvClusterConfig::decode,
        );
    }
});
