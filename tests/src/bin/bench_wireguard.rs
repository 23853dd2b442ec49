//! `cargo xtask bench wireguard`: time to reconcile N remote WireGuard peers into an empty
//! device, to apply one change among them, and a no-op resync (wireguard-go here).

fn main() {
    strait_tests::require_privileges();
    let peers = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let r = strait_tests::wireguard::bench_reconcile(peers);
    println!(
        "bench wireguard: {} peers: initial reconcile {}; one change {}; no change {}",
        r.peers, r.initial, r.one_change, r.no_change
    );
}
