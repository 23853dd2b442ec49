//! The user's scenario end to end with the real binaries (`tests/src/e2e/`): two clusters of
//! two nodes in namespaces, etcd + kvstoremesh per cluster, `strait agent` per node with the
//! eBPF datapath and WireGuard, then mesh status, global-service failover, cluster loss,
//! cross-cluster policy with observed drops, encryption on the underlay, agent restart and an
//! overlapping cluster refused. `cargo xtask demo` runs the same code with narration.

use strait_tests::{e2e, require_privileges};

#[test]
fn two_clusters_end_to_end() {
    require_privileges();
    let report = e2e::run(
        e2e::Options {
            strait: strait_tests::datapath::strait_exe(),
            narrate: false,
        },
        |_| {},
    );
    println!("\n{}", report.summary());
    let failed = report.failed();
    assert!(failed.is_empty(), "failed steps:\n{}", report.summary());
}
