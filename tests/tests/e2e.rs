//! The user's scenario end to end with the real binaries (`tests/src/e2e/`): two clusters of
//! two nodes in namespaces, etcd + kvstoremesh per cluster, `strait agent` per node with the
//! eBPF datapath and WireGuard, then mesh status, global-service failover, cluster loss,
//! cross-cluster policy with observed drops, encryption on the underlay, agent restart and an
//! overlapping cluster refused. `cargo xtask demo` runs the same code with narration.

use strait_tests::{e2e, require_privileges};

/// `strait` built as this package's binary, next to the test's helper binaries.
fn strait_under_test() -> std::path::PathBuf {
    let sockprobe = strait_tests::datapath::sockprobe_exe();
    let exe = sockprobe.with_file_name("strait-under-test");
    assert!(exe.exists(), "{} missing", exe.display());
    exe
}

#[test]
fn two_clusters_end_to_end() {
    require_privileges();
    let report = e2e::run(
        e2e::Options {
            strait: strait_under_test(),
            narrate: false,
        },
        |_| {},
    );
    println!("\n{}", report.summary());
    let failed = report.failed();
    assert!(failed.is_empty(), "failed steps:\n{}", report.summary());
}
