//! `cargo xtask bench sync`: ingest a large mesh from one etcd (KVStoreMesh cache layout) into
//! strait's state model and report time to fully synced, events/s, peak RSS, and the latency
//! from an etcd put to the state model at a steady event rate.
//!
//! The parent process starts etcd and loads it; a child process (this binary with `ingest`)
//! does the ingest so its peak RSS is the agent side alone.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use etcd_client::{Txn, TxnOp};
use strait::{
    identity::MaxConnectedClusters,
    kvstore::EtcdClient,
    mesh::{
        manager::ClusterMesh,
        remote::{LocalCluster, RemoteTiming},
    },
    metrics::Metrics,
    state::StateHandle,
};
use strait_tests::etcd::{CiliumConfigOptions, EtcdServer};

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value_t = 100)]
    clusters: u32,
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Endpoints per cluster.
    #[arg(long, default_value_t = 1000)]
    endpoints: u32,
    #[arg(long, default_value_t = 10)]
    services: u32,
    /// Steady event rate for the latency phase (events/s).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Events in the latency phase.
    #[arg(long, default_value_t = 5000)]
    latency_events: u32,
    /// Internal: run the ingest side against this config dir and print a JSON result.
    #[arg(long, hide = true)]
    ingest: Option<PathBuf>,
}

const LOCAL_ID: u32 = 250;

fn cluster_name(c: u32) -> String {
    format!("bench-{c:03}")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.ingest.clone() {
        Some(dir) => rt.block_on(ingest(&dir, &args)),
        None => {
            // etcd must be started from this (long-lived) thread: its harness ties the child's
            // lifetime to the starting thread.
            let etcd = EtcdServer::new();
            rt.block_on(parent(&args, &etcd))
        }
    }
}

async fn parent(args: &Args, etcd: &EtcdServer) -> anyhow::Result<()> {
    let client = EtcdClient::connect(&etcd.config()).await?;
    let total_keys = args.clusters
        * (args.nodes + args.endpoints + args.endpoints / 10 + args.services + 5)
        + args.clusters;
    println!(
        "bench sync: {} clusters x ({} nodes, {} endpoints, {} identities, {} services) = {} keys in one etcd (KVStoreMesh cache layout)",
        args.clusters,
        args.nodes,
        args.endpoints,
        args.endpoints / 10,
        args.services,
        total_keys
    );
    let started = Instant::now();
    load(&client, args).await?;
    println!("loaded in {:.1}s", started.elapsed().as_secs_f64());

    let dir = tempfile::tempdir()?;
    for c in 1..=args.clusters {
        etcd.write_cilium_config(
            &dir.path().join(cluster_name(c)),
            CiliumConfigOptions::default(),
        );
    }
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("--ingest")
        .arg(dir.path())
        .args(["--clusters", &args.clusters.to_string()])
        .args(["--nodes", &args.nodes.to_string()])
        .args(["--endpoints", &args.endpoints.to_string()])
        .args(["--services", &args.services.to_string()])
        .output()
        .context("running the ingest child")?;
    if !out.status.success() {
        bail!(
            "ingest child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));

    latency(&client, etcd, args).await
}

/// Puts keys in transactions of 100 (etcd allows 128 operations per transaction).
async fn put_all(client: &EtcdClient, kvs: Vec<(String, String)>) -> anyhow::Result<()> {
    let mut raw = client.raw();
    for chunk in kvs.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        raw.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

fn node_json(cluster: &str, id: u32, n: u32) -> String {
    format!(
        r#"{{"Name":"n{n}","Cluster":"{cluster}","IPAddresses":[{{"Type":"InternalIP","IP":"198.18.{id}.{n}"}}],"IPv4AllocCIDR":{{"IP":"10.{id}.{n}.0","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":{id},"Source":"custom-resource","EncryptionKey":255,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}}"#
    )
}

fn endpoint_key(cluster: &str, id: u32, e: u32) -> (String, String) {
    let ip = format!("10.{id}.{}.{}", e / 250, e % 250 + 1);
    let identity = (id << 16) + 256 + e / 10;
    (
        format!("cilium/cache/ip/v1/{cluster}/{ip}"),
        format!(
            r#"{{"IP":"{ip}","Mask":null,"HostIP":"198.18.{id}.{}","ID":{identity},"Key":255,"Metadata":""}}"#,
            e % 250
        ),
    )
}

async fn load(client: &EtcdClient, args: &Args) -> anyhow::Result<()> {
    for c in 1..=args.clusters {
        let name = cluster_name(c);
        let mut kvs = vec![(
            format!("cilium/cluster-config/{name}"),
            format!(
                r#"{{"id":{c},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}}}"#
            ),
        )];
        for n in 0..args.nodes {
            kvs.push((
                format!("cilium/cache/nodes/v1/{name}/n{n}"),
                node_json(&name, c, n),
            ));
        }
        for e in 0..args.endpoints {
            kvs.push(endpoint_key(&name, c, e));
        }
        for i in 0..args.endpoints / 10 {
            kvs.push((
                format!("cilium/cache/identities/v1/{name}/id/{}", (c << 16) + 256 + i),
                format!("k8s:app=app{i};k8s:io.cilium.k8s.policy.cluster={name};k8s:io.kubernetes.pod.namespace=default;"),
            ));
        }
        for s in 0..args.services {
            kvs.push((
                format!("cilium/cache/services/v1/{name}/default/svc{s}"),
                format!(r#"{{"cluster":"{name}","namespace":"default","name":"svc{s}","frontends":{{"10.96.0.{s}":{{"":{{"Protocol":"TCP","Port":80}}}}}},"backends":{{"10.{c}.0.{}":{{"":{{"Protocol":"TCP","Port":8080}}}}}},"hostnames":{{}},"labels":{{}},"selector":{{}},"includeExternal":true,"shared":true,"clusterID":{c}}}"#, s + 1),
            ));
        }
        for kind in ["nodes", "services", "identities", "ip"] {
            kvs.push((
                format!("cilium/synced/{name}/cilium/cache/{kind}/v1"),
                "2026-01-01T00:00:00Z".into(),
            ));
        }
        put_all(client, kvs).await?;
    }
    Ok(())
}

fn mesh(dir: &Path) -> (StateHandle, ClusterMesh) {
    let state = StateHandle::new("bench-local", LOCAL_ID);
    let local = LocalCluster {
        name: "bench-local".into(),
        id: LOCAL_ID,
        max_connected_clusters: MaxConnectedClusters::Max255,
    };
    let timing = RemoteTiming {
        status_interval: Duration::from_millis(20),
        ..RemoteTiming::default()
    };
    let mesh = ClusterMesh::spawn(dir.into(), local, state.clone(), Metrics::new(), timing);
    (state, mesh)
}

/// Child: time to fully synced, events/s, peak RSS.
async fn ingest(dir: &Path, args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (state, mesh) = mesh(dir);
    let want_endpoints = (args.clusters * args.endpoints) as usize;
    loop {
        let statuses = mesh.statuses();
        if statuses.len() == args.clusters as usize && statuses.iter().all(|s| s.ready) {
            let m = state.read();
            let endpoints: usize = statuses.iter().map(|s| m.counts(&s.name).endpoints).sum();
            if endpoints == want_endpoints {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(if args.clusters > 10 { 300 } else { 10 }) {
            let not_ready: Vec<String> = mesh
                .statuses()
                .into_iter()
                .filter(|s| !s.ready)
                .take(3)
                .map(|s| format!("{s:?}"))
                .collect();
            bail!(
                "not synced after 300 s: {} endpoints of {want_endpoints}; not ready: {not_ready:?}",
                state.read().ipcache().count()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let events =
        args.clusters * (args.nodes + args.endpoints + args.endpoints / 10 + args.services);
    let rss = peak_rss_kib()?;
    println!("time to fully synced: {secs:.2}s");
    println!(
        "events ingested:      {events} ({:.0} events/s)",
        f64::from(events) / secs
    );
    println!(
        "peak RSS:             {} MiB ({:.0} bytes per endpoint, all objects included)",
        rss / 1024,
        (rss as f64 * 1024.0) / want_endpoints as f64
    );
    Ok(())
}

fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

/// Steady stream of endpoint creations into one cluster; latency from the put's completion
/// to the entry appearing in the state model.
async fn latency(client: &EtcdClient, etcd: &EtcdServer, args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    etcd.write_cilium_config(
        &dir.path().join(cluster_name(1)),
        CiliumConfigOptions::default(),
    );
    let (state, mesh) = mesh(dir.path());
    while !mesh.statuses().first().is_some_and(|s| s.ready) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let name = cluster_name(1);
    // Arrival is detected by a task woken on every state change, so the measured latency is
    // the time until the model had the entry, not until the putting loop looked.
    type Pending =
        std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(ipnet::IpNet, Instant)>>>;
    let pending: Pending = Default::default();
    let checker = {
        let (state, pending) = (state.clone(), pending.clone());
        let expected = args.latency_events as usize;
        tokio::spawn(async move {
            let mut changes = state.subscribe();
            let mut latencies = Vec::with_capacity(expected);
            while latencies.len() < expected {
                if changes.changed().await.is_err() {
                    break;
                }
                let model = state.read();
                let mut queue = pending.lock().unwrap_or_else(|e| e.into_inner());
                while let Some((prefix, at)) = queue.front().copied() {
                    if !model.ipcache().any(|e| e.prefix == prefix) {
                        break;
                    }
                    latencies.push(at.elapsed());
                    queue.pop_front();
                }
            }
            latencies
        })
    };
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    for i in 0..args.latency_events {
        ticker.tick().await;
        let (key, value) = endpoint_key(&name, 1, args.endpoints + i);
        let prefix: ipnet::IpNet =
            format!("{}/32", key.rsplit('/').next().unwrap_or_default()).parse()?;
        // Timestamped before the put: the latency includes etcd's commit and the watch.
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((prefix, Instant::now()));
        client.put(&key, value, None).await?;
    }
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), checker)
        .await
        .context("events never reached the model")??;
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "put->model latency at {} events/s ({} events): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rate,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    drop(mesh);
    Ok(())
}
