//! The kvstore layer against a real etcd (Debian's 3.4 binary, one server per test): list-then-
//! watch with pagination, relists after restarts and compaction, leases, conditional writes,
//! TLS/mTLS from Cilium-format config files, the clustermesh config directory watcher.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use strait::kvstore::heartbeat::HEARTBEAT_PATH;
use strait::kvstore::{
    ClientOptions, ClustermeshConfigDir, ConfigEvent, EtcdClient, EtcdConfig, KvstoreError, Lease,
    LeaseState, ListWatchOptions, ListWatcher, WatchEvent,
};
use strait_tests::etcd::{CiliumConfigOptions, EtcdServer, free_port, write_unrelated_ca};
use tokio::sync::mpsc::Receiver;

const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(server: &EtcdServer) -> EtcdClient {
    EtcdClient::connect(&server.config())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", server.endpoint()))
}

/// A client for a temporary endpoint (maintenance window), plaintext.
async fn connect_to(endpoint: &str) -> EtcdClient {
    EtcdClient::connect(&EtcdConfig::plaintext([endpoint]))
        .await
        .unwrap_or_else(|e| panic!("connecting to {endpoint}: {e}"))
}

async fn next_event(rx: &mut Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {EVENT_TIMEOUT:?}"))
        .expect("watcher channel closed")
}

async fn next_events(rx: &mut Receiver<WatchEvent>, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_event(rx).await);
    }
    out
}

async fn assert_quiet(rx: &mut Receiver<WatchEvent>, for_: Duration) {
    if let Ok(Some(ev)) = tokio::time::timeout(for_, rx.recv()).await {
        panic!("unexpected watch event {ev:?}");
    }
}

fn upsert(key: &str, value: &str, is_create: bool) -> WatchEvent {
    WatchEvent::Upsert {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        is_create,
    }
}

fn delete(key: &str) -> WatchEvent {
    WatchEvent::Delete { key: key.into() }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sorts events for comparisons where the list order is not part of the contract.
fn sorted(mut events: Vec<WatchEvent>) -> Vec<WatchEvent> {
    events.sort_by_key(|e| format!("{e:?}"));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_types_events_and_respects_the_prefix() {
    let server = EtcdServer::new();
    let c = connect(&server).await;
    for (k, v) in [
        ("a/1", "one"),
        ("a/2", "two"),
        ("ab/x", "other prefix"),
        ("a", "bare"),
    ] {
        c.put(k, v, None).await.unwrap();
    }

    let (watcher, mut rx) = ListWatcher::spawn(c.clone(), "a/");
    assert_eq!(watcher.prefix(), "a/");
    assert_eq!(
        next_events(&mut rx, 3).await,
        [
            upsert("a/1", "one", true),
            upsert("a/2", "two", true),
            WatchEvent::ListDone
        ]
    );

    c.put("a/3", "three", None).await.unwrap();
    c.put("a/1", "one again", None).await.unwrap();
    c.delete("a/2").await.unwrap();
    c.put("ab/y", "other prefix", None).await.unwrap();
    c.delete("ab/x").await.unwrap();
    c.put("a/2", "two again", None).await.unwrap();
    assert_eq!(
        next_events(&mut rx, 4).await,
        [
            upsert("a/3", "three", true),
            upsert("a/1", "one again", false),
            delete("a/2"),
            upsert("a/2", "two again", true),
        ]
    );
    assert_quiet(&mut rx, Duration::from_millis(300)).await;

    let stats = watcher.stats();
    assert_eq!(stats.events, 7, "{stats:?}");
    assert!(stats.connected && stats.synced, "{stats:?}");
    assert_eq!((stats.relists, stats.errors), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paginates_beyond_256_keys() {
    let server = EtcdServer::new();
    let c = connect(&server).await;
    // 600 keys (> two pages of 256), including ones that sort right after a page boundary.
    let mut expected = BTreeMap::new();
    for i in 0..600 {
        let key = format!("p/{i:04}");
        expected.insert(key.clone(), format!("v{i}"));
    }
    expected.insert("p/0255\0x".into(), "nul".into());
    expected.insert("p/0255x".into(), "x".into());
    let puts = expected.iter().map(|(k, v)| {
        let c = c.clone();
        let (k, v) = (k.clone(), v.clone());
        tokio::spawn(async move { c.put(&k, v, None).await })
    });
    for put in puts.collect::<Vec<_>>() {
        put.await.unwrap().unwrap();
    }
    c.put("q/0000", "outside", None).await.unwrap();

    let (watcher, mut rx) = ListWatcher::spawn(c.clone(), "p/");
    let events = next_events(&mut rx, expected.len() + 1).await;
    assert_eq!(events.last(), Some(&WatchEvent::ListDone));
    let listed: Vec<(String, String)> = events[..expected.len()]
        .iter()
        .map(|e| match e {
            WatchEvent::Upsert {
                key,
                value,
                is_create: true,
            } => (key.clone(), String::from_utf8(value.clone()).unwrap()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Complete, no duplicates, in ascending key order.
    assert_eq!(listed, expected.into_iter().collect::<Vec<_>>());
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    assert_eq!(watcher.stats().relists, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_restart_emits_synthetic_deletes_and_new_keys() {
    let mut server = EtcdServer::new();
    let c = connect(&server).await;
    for i in 1..=4 {
        c.put(&format!("r/{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let (watcher, mut rx) = ListWatcher::spawn(c.clone(), "r/");
    assert_eq!(
        next_events(&mut rx, 5).await.last(),
        Some(&WatchEvent::ListDone)
    );

    // etcd goes down; the watcher notices.
    server.stop();
    eventually(
        "watcher reports disconnected",
        Duration::from_secs(10),
        || !watcher.is_connected(),
    )
    .await;

    // Maintenance window on another port: the watcher cannot see these changes happen, so
    // it can only learn of them by relisting.
    let spare = server.start_on_spare_port();
    {
        let direct = connect_to(&spare).await;
        direct.delete("r/1").await.unwrap();
        direct.delete("r/2").await.unwrap();
        direct.put("r/3", "v3 changed", None).await.unwrap();
        direct.put("r/5", "v5", None).await.unwrap();
    }
    server.stop();
    server.start();

    let relisted = next_events(&mut rx, 5).await;
    assert_eq!(
        sorted(relisted),
        sorted(vec![
            upsert("r/3", "v3 changed", false),
            upsert("r/4", "v4", false),
            upsert("r/5", "v5", true),
            delete("r/1"),
            delete("r/2"),
        ])
    );
    // Live again, and no second ListDone.
    c.put("r/6", "v6", None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, upsert("r/6", "v6", true));
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    let stats = watcher.stats();
    assert!(stats.relists >= 1 && stats.errors >= 1, "{stats:?}");
    assert!(stats.connected, "{stats:?}");
    assert!(stats.last_error.is_some(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_compaction_of_the_watch_start_revision() {
    let server = EtcdServer::new();
    let c = connect(&server).await;
    for i in 1..=4 {
        c.put(&format!("k/{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    // Capacity 1: the watcher is stuck delivering its first list until we read, so its list
    // revision is fixed before the changes below and its watch starts behind them.
    let opts = ListWatchOptions {
        channel_capacity: 1,
        ..Default::default()
    };
    let (watcher, mut rx) = ListWatcher::spawn_with(c.clone(), "k/", opts);
    assert_eq!(next_event(&mut rx).await, upsert("k/1", "v1", true));

    c.delete("k/2").await.unwrap();
    c.put("k/3", "v3 changed", None).await.unwrap();
    let rev = c.put("k/5", "v5", None).await.unwrap();
    c.raw().compact(rev, None).await.unwrap();

    assert_eq!(
        next_events(&mut rx, 4).await,
        [
            upsert("k/2", "v2", true),
            upsert("k/3", "v3", true),
            upsert("k/4", "v4", true),
            WatchEvent::ListDone
        ]
    );
    // The watch from the old revision is refused (compacted): relist.
    let relisted = next_events(&mut rx, 5).await;
    assert_eq!(
        sorted(relisted),
        sorted(vec![
            upsert("k/1", "v1", false),
            upsert("k/3", "v3 changed", false),
            upsert("k/4", "v4", false),
            upsert("k/5", "v5", true),
            delete("k/2"),
        ])
    );
    c.put("k/6", "v6", None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, upsert("k/6", "v6", true));
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    let stats = watcher.stats();
    assert_eq!(stats.relists, 1, "{stats:?}");
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("compact"),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_with_lease_disappears_once_keepalive_stops() {
    let server = EtcdServer::new();
    let c = connect(&server).await;
    let ttl = Duration::from_secs(2);
    let mut lease = Lease::grant(&c, ttl).await.unwrap();
    assert_eq!(lease.ttl(), ttl);
    c.put("l/k", "leased", Some(lease.id())).await.unwrap();
    let (_watcher, mut rx) = ListWatcher::spawn(c.clone(), "l/");
    assert_eq!(
        next_events(&mut rx, 2).await,
        [upsert("l/k", "leased", true), WatchEvent::ListDone]
    );

    // Kept alive well past its TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(lease.is_alive(), "{:?}", lease.state());
    let kv = c
        .get("l/k")
        .await
        .unwrap()
        .expect("leased key survives while kept alive");
    assert_eq!(kv.lease, lease.id());
    assert_quiet(&mut rx, Duration::ZERO).await;

    lease.stop_keepalive();
    assert_eq!(lease.state(), LeaseState::Stopped);
    let started = Instant::now();
    assert_eq!(next_event(&mut rx).await, delete("l/k"));
    assert!(
        started.elapsed() < ttl + Duration::from_secs(3),
        "expired after {:?}",
        started.elapsed()
    );
    assert_eq!(c.get("l/k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keepalive_survives_an_etcd_restart() {
    let mut server = EtcdServer::new();
    let c = connect(&server).await;
    let ttl = Duration::from_secs(5);
    let lease = Lease::grant(&c, ttl).await.unwrap();
    c.put("s/k", "leased", Some(lease.id())).await.unwrap();

    server.stop();
    server.start();
    // etcd renews leases to their full TTL when it starts; only a resumed keepalive keeps the
    // key beyond that.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert!(lease.is_alive(), "{:?}", lease.state());
    assert!(c.get("s/k").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_elsewhere_is_reported_lost_and_close_revokes() {
    let server = EtcdServer::new();
    let c = connect(&server).await;

    let lease = Lease::grant(&c, Duration::from_secs(3)).await.unwrap();
    assert!(lease.is_alive());
    c.revoke_lease(lease.id()).await.unwrap();
    let state = tokio::time::timeout(Duration::from_secs(5), lease.wait_lost())
        .await
        .expect("lease loss not reported within 5 s");
    match state {
        LeaseState::Lost(reason) => assert!(reason.contains("not found"), "{reason}"),
        other => panic!("expected Lost, got {other:?}"),
    }

    let lease = Lease::grant(&c, Duration::from_secs(30)).await.unwrap();
    c.put("close/k", "v", Some(lease.id())).await.unwrap();
    lease.close().await.unwrap();
    // Revoked, not left to expire: the key is gone at once.
    assert_eq!(c.get("close/k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_and_deletes() {
    let server = EtcdServer::new();
    let c = connect(&server).await;

    assert!(c.create_only("w/a", "first", None).await.unwrap());
    assert!(!c.create_only("w/a", "second", None).await.unwrap());
    let a = c.get("w/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.version), (&b"first"[..], 1));

    // Identical value and lease: no write, so the revision does not move.
    assert!(!c.update_if_different("w/a", "first", None).await.unwrap());
    assert_eq!(
        c.get("w/a").await.unwrap().unwrap().mod_revision,
        a.mod_revision
    );
    // Different value: written.
    assert!(c.update_if_different("w/a", "changed", None).await.unwrap());
    let changed = c.get("w/a").await.unwrap().unwrap();
    assert_eq!(changed.value, b"changed");
    assert!(changed.mod_revision > a.mod_revision);
    // Same value, now bound to a lease: written once, then stable.
    let lease = Lease::grant(&c, Duration::from_secs(30)).await.unwrap();
    assert!(
        c.update_if_different("w/a", "changed", Some(lease.id()))
            .await
            .unwrap()
    );
    let leased = c.get("w/a").await.unwrap().unwrap();
    assert_eq!(leased.lease, lease.id());
    assert!(
        !c.update_if_different("w/a", "changed", Some(lease.id()))
            .await
            .unwrap()
    );
    assert_eq!(
        c.get("w/a").await.unwrap().unwrap().mod_revision,
        leased.mod_revision
    );
    // A missing key is written.
    assert!(c.update_if_different("w/b", "", None).await.unwrap());
    assert_eq!(c.get("w/b").await.unwrap().unwrap().value, b"");

    let rev = c.put("w/c", "c", None).await.unwrap();
    assert_eq!(c.get("w/c").await.unwrap().unwrap().mod_revision, rev);
    c.put("wx", "outside the prefix", None).await.unwrap();
    assert!(c.delete("w/c").await.unwrap());
    assert!(!c.delete("w/c").await.unwrap());
    assert_eq!(c.delete_prefix("w/").await.unwrap(), 2);
    assert!(c.get("wx").await.unwrap().is_some());
    assert!(matches!(
        c.delete_prefix("").await,
        Err(KvstoreError::InvalidArgument { .. })
    ));
    lease.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_from_cilium_config_files() {
    let server = EtcdServer::new_tls();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("https://127.0.0.1:"));

    // Right CA (deprecated `ca-file` key) and client certificate: works, including a watch.
    let path = server.write_cilium_config(
        &dir.path().join("remote-a"),
        CiliumConfigOptions {
            deprecated_ca_key: true,
            ..Default::default()
        },
    );
    let cfg = EtcdConfig::from_file(&path).unwrap();
    assert_eq!(
        cfg.trusted_ca_file.as_deref(),
        Some(server.tls().unwrap().ca_cert.as_path())
    );
    assert!(cfg.uses_tls());
    let c = EtcdClient::connect(&cfg).await.unwrap();
    assert_ne!(c.cluster_id(), 0);
    c.put("tls/k", "v", None).await.unwrap();
    let (_watcher, mut rx) = ListWatcher::spawn(c.clone(), "tls/");
    assert_eq!(
        next_events(&mut rx, 2).await,
        [upsert("tls/k", "v", true), WatchEvent::ListDone]
    );

    // `trusted-ca-file` spelling works the same.
    let path = server.write_cilium_config(&dir.path().join("remote-b"), Default::default());
    let cfg = EtcdConfig::from_file(&path).unwrap();
    let c2 = EtcdClient::connect(&cfg).await.unwrap();
    assert_eq!(c2.get("tls/k").await.unwrap().unwrap().value, b"v");

    let quick = ClientOptions {
        connect_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    // No client certificate: the server refuses; the error names the endpoint.
    let path = server.write_cilium_config(
        &dir.path().join("no-cert"),
        CiliumConfigOptions {
            without_client_cert: true,
            ..Default::default()
        },
    );
    let cfg = EtcdConfig::from_file(&path).unwrap();
    let started = Instant::now();
    let err = EtcdClient::connect_with(&cfg, &quick).await.unwrap_err();
    assert!(matches!(err, KvstoreError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // (The reason varies with timing: the server's BadCertificate alert, or a broken pipe.)
    eprintln!("without client certificate: {err}");

    // A CA that did not sign the server certificate: refused as well.
    let mut cfg = server.config();
    let other_ca = dir.path().join("other-ca.crt");
    write_unrelated_ca(&other_ca);
    cfg.trusted_ca_file = Some(other_ca);
    let err = EtcdClient::connect_with(&cfg, &quick).await.unwrap_err();
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    eprintln!("with the wrong CA: {err}");

    // A certificate file that does not exist: named, together with the config file.
    std::fs::write(
        dir.path().join("missing-cert"),
        format!(
            "endpoints:\n- {endpoint}\ntrusted-ca-file: {}\ncert-file: /nonexistent/client.crt\nkey-file: /nonexistent/client.key\n",
            server.tls().unwrap().ca_cert.display()
        ),
    )
    .unwrap();
    let cfg = EtcdConfig::from_file(dir.path().join("missing-cert")).unwrap();
    let err = EtcdClient::connect(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/client.crt"), "{err}");
    assert!(err.contains("missing-cert"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_fast_naming_the_endpoint() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let started = Instant::now();
    let err = EtcdClient::connect_with(&EtcdConfig::plaintext([endpoint.as_str()]), &opts)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, KvstoreError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    eprintln!("unreachable: {err}");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

async fn next_config_event(rx: &mut Receiver<ConfigEvent>) -> ConfigEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no config event within 5 s")
        .expect("config watcher stopped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustermesh_config_dir_reports_added_changed_removed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write(
        &p.join("east"),
        "endpoints:\n- https://east.mesh.test:2379\n",
    );
    write(
        &p.join("local"),
        "endpoints:\n- https://local.mesh.test:2379\n",
    );
    write(
        &p.join("common-etcd-client-ca.crt"),
        "-----BEGIN CERTIFICATE-----\n",
    );

    let (_w, mut rx) = ClustermeshConfigDir::new(p, "local").watch(Duration::from_millis(100));
    match next_config_event(&mut rx).await {
        ConfigEvent::Added(name, cfg) => {
            assert_eq!(name, "east");
            assert_eq!(cfg.endpoints, ["https://east.mesh.test:2379"]);
            assert_eq!(cfg.source, p.join("east"));
        }
        other => panic!("unexpected {other:?}"),
    }

    write(
        &p.join("west"),
        "endpoints:\n- https://west.mesh.test:2379\n",
    );
    assert!(matches!(next_config_event(&mut rx).await, ConfigEvent::Added(n, _) if n == "west"));
    write(
        &p.join("east"),
        "endpoints:\n- https://east2.mesh.test:2379\n",
    );
    match next_config_event(&mut rx).await {
        ConfigEvent::Changed(name, cfg) => {
            assert_eq!(name, "east");
            assert_eq!(cfg.endpoints, ["https://east2.mesh.test:2379"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    std::fs::remove_file(p.join("west")).unwrap();
    assert_eq!(
        next_config_event(&mut rx).await,
        ConfigEvent::Removed("west".into())
    );

    // Kubernetes secret volume layout: files are symlinks through `..data`, updated by
    // swapping that symlink.
    let data1 = p.join("..2024_01_01");
    std::fs::create_dir(&data1).unwrap();
    write(
        &data1.join("north"),
        "endpoints:\n- https://north.mesh.test:2379\n",
    );
    std::os::unix::fs::symlink("..2024_01_01", p.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/north", p.join("north")).unwrap();
    assert!(matches!(next_config_event(&mut rx).await, ConfigEvent::Added(n, _) if n == "north"));
    let data2 = p.join("..2024_01_02");
    std::fs::create_dir(&data2).unwrap();
    write(
        &data2.join("north"),
        "endpoints:\n- https://north2.mesh.test:2379\n",
    );
    std::os::unix::fs::symlink("..2024_01_02", p.join("..data_tmp")).unwrap();
    std::fs::rename(p.join("..data_tmp"), p.join("..data")).unwrap();
    match next_config_event(&mut rx).await {
        ConfigEvent::Changed(name, cfg) => {
            assert_eq!(name, "north");
            assert_eq!(cfg.endpoints, ["https://north2.mesh.test:2379"]);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Neither the local cluster's file nor files without `endpoints:` are ever reported.
    write(
        &p.join("local"),
        "endpoints:\n- https://local2.mesh.test:2379\n",
    );
    write(&p.join("notes"), "no config here\n");
    let quiet = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await;
    assert!(quiet.is_err(), "unexpected {quiet:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_writer_and_tracker() {
    let server = EtcdServer::new();
    let c = connect(&server).await;
    let tracker = strait::kvstore::HeartbeatTracker::spawn(c.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tracker.heartbeat_age(), None);
    assert!(!tracker.is_stale());

    let lease = Lease::grant(&c, Duration::from_secs(30)).await.unwrap();
    let writer = strait::kvstore::HeartbeatWriter::spawn(
        c.clone(),
        Some(lease.id()),
        Duration::from_millis(200),
    );
    eventually("heartbeat seen", Duration::from_secs(5), || {
        tracker.heartbeat_age().is_some()
    })
    .await;
    let first = tracker.last_heartbeat().unwrap();
    eventually("next heartbeat seen", Duration::from_secs(5), || {
        tracker.last_heartbeat().unwrap() > first
    })
    .await;
    drop(writer);
    assert!(tracker.heartbeat_age().unwrap() < Duration::from_secs(2));
    assert!(!tracker.is_stale());

    let kv = c.get(HEARTBEAT_PATH).await.unwrap().unwrap();
    assert_eq!(kv.lease, lease.id());
    let value = String::from_utf8(kv.value).unwrap();
    // RFC 3339, UTC: 2024-05-01T12:00:00Z
    assert_eq!(value.len(), 20, "{value}");
    assert!(
        value.ends_with('Z') && value.as_bytes()[10] == b'T',
        "{value}"
    );
    assert!(tracker.watcher_stats().synced);
}
