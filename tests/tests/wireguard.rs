//! Transparent WireGuard encryption between nodes, end to end: real namespaces, wireguard-go
//! started and owned by strait, routes from strait's reconciler, captures on the underlay.
//! Topology and helpers: `strait_tests::wireguard`.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    time::Duration,
};

use strait::{
    constants::{WIREGUARD_KEY_FILE, WIREGUARD_PORT},
    routing::TargetNetns,
    state::Endpoint,
    wireguard::{BackendKind, WireguardConfig, WireguardError, WireguardManager, uapi_socket},
};
use strait_tests::{
    Netns, require_privileges, unique_name,
    wireguard::{
        Capture, HandWireguard, NodeAgent, TcpEcho, Topology, UdpEcho, assert_only_wireguard,
        bench_reconcile, bulk_transfer, echo_roundtrip, ip_in, link_info, netns_path, node_record,
        publish_mesh, runtime, strait_routes, tcp_connect, udp_roundtrip, wait_until,
    },
};

const CONNECT: Duration = Duration::from_secs(5);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn pod_traffic_between_two_clusters_is_encrypted_on_the_underlay() {
    require_privileges();
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "node-a", |_| {});
    let b = NodeAgent::start(&rt, n2, "c2", 2, "node-b", |_| {});
    assert_eq!(
        a.agent.manager().backend(),
        BackendKind::Userspace,
        "no kernel module here"
    );
    publish_mesh(&rt, &[(&a, n1), (&b, n2)]);

    let tcp = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7000));
    let udp = UdpEcho::start(&n2.pod, sa(n2.pod_ip, 7001));
    let back = TcpEcho::start(&n1.pod, sa(n1.pod_ip, 7002));
    let capture = Capture::start(&n1.ns, &n1.underlay_if);

    let mut pod_to_pod = tcp_connect(&n1.pod, tcp.addr, CONNECT).expect("pod A -> pod B over TCP");
    for i in 0..20 {
        echo_roundtrip(&mut pod_to_pod, format!("hello {i}").as_bytes()).unwrap();
    }
    udp_roundtrip(&n1.pod, udp.addr, b"udp through the tunnel").expect("pod A -> pod B over UDP");
    let mut reverse = tcp_connect(&n2.pod, back.addr, CONNECT).expect("pod B -> pod A over TCP");
    echo_roundtrip(&mut reverse, b"the other way").unwrap();
    // From the node itself: the route's source address (10.1.0.1) is in the peer's AllowedIPs,
    // so replies come back through the tunnel.
    let mut from_node = tcp_connect(&n1.ns, tcp.addr, CONNECT).expect("node A -> pod B over TCP");
    echo_roundtrip(&mut from_node, b"from the node").unwrap();
    drop((pod_to_pod, reverse, from_node));

    let lines = capture.finish();
    let wg_packets =
        assert_only_wireguard(&lines, &[n1.underlay_ip, n2.underlay_ip], WIREGUARD_PORT);
    assert!(
        wg_packets >= 40,
        "{wg_packets} WireGuard packets: {lines:#?}"
    );

    let status = a.agent.status().unwrap();
    assert_eq!(status.listen_port, Some(WIREGUARD_PORT));
    assert_eq!(status.peers.len(), 1, "{status:#?}");
    let peer = &status.peers[0];
    assert_eq!(peer.node.as_deref(), Some("node-b"));
    assert_eq!(peer.cluster.as_deref(), Some("c2"));
    assert_eq!(peer.public_key, b.agent.public_key());
    assert_eq!(peer.endpoint, Some(sa(n2.underlay_ip, WIREGUARD_PORT)));
    assert_eq!(peer.allowed_ips, 1);
    assert!(peer.last_handshake_unix.is_some(), "{peer:?}");
    assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0, "{peer:?}");

    let mut routes = strait_routes(&n1.ns);
    routes.sort();
    assert_eq!(
        routes,
        [
            format!("10.2.0.0/24 dev {} scope link src 10.1.0.1", a.device),
            // Strict mode's fallback under the device route.
            "unreachable 10.2.0.0/24 metric 41377".to_owned()
        ],
        "node A's strait routes"
    );
    assert_eq!(link_info(&n1.ns, &a.device).1, 1500 - 80);

    let key = a.state_dir.path().join(WIREGUARD_KEY_FILE);
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));

    // wireguard-go dies: the next pass restarts it and restores the peer, MTU and route.
    let crashed = a.agent.manager().child_pid().unwrap();
    // SAFETY: kill(2) on the PID of a child of this process (strait's wireguard-go).
    unsafe { libc::kill(crashed as libc::pid_t, libc::SIGKILL) };
    a.state.update(|m| {
        m.upsert_endpoint(Endpoint {
            prefix: "10.2.0.2/32".parse().unwrap(),
            cluster: "c2".into(),
            identity: 1234,
            host_ip: Some(n2.underlay_ip.into()),
            encryption_key: 255,
        })
    });
    a.wait(&rt);
    let pid = a.agent.manager().child_pid().unwrap();
    assert_ne!(pid, crashed, "wireguard-go not restarted");
    assert!(!process_alive(crashed));
    assert_eq!(strait_routes(&n1.ns).len(), 2);
    assert_eq!(link_info(&n1.ns, &a.device).1, 1500 - 80);
    let mut again =
        tcp_connect(&n1.pod, tcp.addr, CONNECT).expect("pod A -> pod B after a restart");
    echo_roundtrip(&mut again, b"after wireguard-go restarted").unwrap();
    drop(again);

    let device = a.device.clone();
    a.stop(&rt);
    assert!(!process_alive(pid), "wireguard-go {pid} survived stop");
    assert!(!uapi_socket(&device).exists());
}

#[test]
fn key_survives_restart_and_stop_ends_wireguard_go() {
    require_privileges();
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let device = unique_name("wg");
    let cfg = {
        let mut c = WireguardConfig::new("c1", "node-a");
        c.device = device.clone();
        c.state_dir = dir.path().to_path_buf();
        c
    };
    // netns = None: the manager works in the namespace of the thread that starts it, and
    // keeps working there from any other thread.
    let start_in = |ns: &Netns, cfg: WireguardConfig| {
        let name = ns.name().to_owned();
        std::thread::spawn(move || {
            let _inside = strait::netns::NetnsGuard::enter(&name).unwrap();
            WireguardManager::start(cfg)
        })
        .join()
        .unwrap()
    };
    let start = |cfg: WireguardConfig| start_in(&ns, cfg).expect("starting the WireGuard manager");

    let first = start(cfg.clone());
    let key = first.public_key();
    let pid = first
        .child_pid()
        .expect("strait owns the wireguard-go process");
    assert!(process_alive(pid));
    assert!(UnixStream::connect(uapi_socket(&device)).is_ok());
    ip_in(&ns, &["link", "show", "dev", &device]);
    assert!(
        !std::process::Command::new("ip")
            .args(["link", "show", "dev", &device])
            .output()
            .unwrap()
            .status
            .success(),
        "the device must not exist in the root namespace"
    );
    // Status from this (root-namespace) thread.
    assert_eq!(first.status().unwrap().public_key, key);
    first.stop();
    assert!(!process_alive(pid), "wireguard-go {pid} survived stop");
    assert!(!uapi_socket(&device).exists(), "UAPI socket left behind");
    assert!(wait_until(Duration::from_secs(2), || {
        !ip_in(&ns, &["-o", "link", "show"]).contains(&device)
    }));
    drop(first);

    let second = start(cfg.clone());
    assert_eq!(second.public_key(), key, "same state dir, same key");
    assert_ne!(second.child_pid(), Some(pid));
    let raw = std::fs::read(dir.path().join(WIREGUARD_KEY_FILE)).unwrap();
    assert_eq!(raw.len(), 32);
    drop(second);

    // A new state dir is a new identity.
    let other = tempfile::tempdir().unwrap();
    let third = start(WireguardConfig {
        state_dir: other.path().to_path_buf(),
        ..cfg.clone()
    });
    assert_ne!(third.public_key(), key);
    let pid = third.child_pid().unwrap();
    drop(third);
    assert!(!process_alive(pid));

    // A wireguard-go strait did not start, serving the name in this namespace, is adopted
    // (configured, never killed); the same name from another namespace is refused.
    let hand = HandWireguard::start(&ns, 51999);
    let adopted = start(WireguardConfig {
        device: hand.device.clone(),
        ..cfg.clone()
    });
    assert_eq!(adopted.child_pid(), None);
    let device_key = hand.wg(&["show", &hand.device, "public-key"]);
    assert_eq!(device_key.trim(), key, "strait's key on the adopted device");
    drop(adopted);
    assert!(
        UnixStream::connect(uapi_socket(&hand.device)).is_ok(),
        "an adopted wireguard-go must survive strait"
    );
    let elsewhere = Netns::new();
    let refused = start_in(
        &elsewhere,
        WireguardConfig {
            device: hand.device.clone(),
            ..cfg.clone()
        },
    );
    assert!(
        matches!(refused, Err(WireguardError::NameInUse { .. })),
        "{refused:?}"
    );
    drop(hand);

    // The namespace handle itself works from any thread.
    let target = TargetNetns::from_path(&netns_path(&ns)).unwrap();
    std::thread::spawn(move || drop(target.enter().unwrap()))
        .join()
        .unwrap();
}

#[test]
fn peers_follow_the_model_incrementally() {
    require_privileges();
    let topo = Topology::new(3, None);
    let (n1, n2, n3) = (&topo.nodes[0], &topo.nodes[1], &topo.nodes[2]);
    let rt = runtime();
    // A starts unsynced: peers it does not know must survive until the initial sync is done.
    let a = NodeAgent::start(&rt, n1, "c1", 1, "a", |_| {});
    a.synced.send_replace(false);
    let b = NodeAgent::start(&rt, n2, "c1", 1, "b", |_| {});
    let c = NodeAgent::start(&rt, n3, "c2", 2, "c", |_| {});
    publish_mesh(&rt, &[(&a, n1), (&b, n2), (&c, n3)]);
    assert_eq!(a.agent.status().unwrap().peers.len(), 2);

    // A long-lived connection A <-> B that every change below must leave alone.
    let echo_b = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7100));
    let echo_c = TcpEcho::start(&n3.pod, sa(n3.pod_ip, 7101));
    let mut ab = tcp_connect(&n1.pod, echo_b.addr, CONNECT).expect("pod A -> pod B");
    echo_roundtrip(&mut ab, b"before").unwrap();
    let mut ac = tcp_connect(&n1.pod, echo_c.addr, CONNECT).expect("pod A -> pod C");
    echo_roundtrip(&mut ac, b"before").unwrap();
    let pid = a.agent.manager().child_pid().unwrap();
    let (ifindex, _) = link_info(&n1.ns, &a.device);
    let peer_b = |a: &NodeAgent| {
        a.agent
            .status()
            .unwrap()
            .peers
            .into_iter()
            .find(|p| p.node.as_deref() == Some("b"))
            .expect("peer b")
    };
    let b_before = peer_b(&a);

    // 1. C gains a second pod CIDR: only C's AllowedIPs change.
    let mut c_rec = c.record(n3);
    c_rec.pod_cidrs.push("10.33.0.0/24".parse().unwrap());
    a.learn(&rt, &[c_rec.clone()]);
    let status = a.agent.status().unwrap();
    let peer_c = status
        .peers
        .iter()
        .find(|p| p.node.as_deref() == Some("c"))
        .unwrap();
    assert_eq!(peer_c.allowed_ips, 2);
    let b_after = peer_b(&a);
    assert_eq!(
        (
            b_after.endpoint,
            b_after.allowed_ips,
            b_after.last_handshake_unix
        ),
        (
            b_before.endpoint,
            b_before.allowed_ips,
            b_before.last_handshake_unix
        ),
        "peer B untouched"
    );
    assert!(
        strait_routes(&n1.ns)
            .iter()
            .any(|r| r.starts_with("10.33.0.0/24 dev "))
    );
    echo_roundtrip(&mut ab, b"after an allowed-IP change on another peer").unwrap();
    echo_roundtrip(&mut ac, b"C itself still fine").unwrap();
    assert_eq!(
        a.agent.manager().child_pid(),
        Some(pid),
        "wireguard-go not restarted"
    );
    assert_eq!(
        link_info(&n1.ns, &a.device).0,
        ifindex,
        "device not recreated"
    );

    // 2. C restarts with a new key (new state dir): its peer is replaced.
    let old_c_key = c.agent.public_key();
    c.stop(&rt);
    let c = NodeAgent::start(&rt, n3, "c2", 2, "c", |_| {});
    assert_ne!(c.agent.public_key(), old_c_key);
    let mut c_rec = c.record(n3);
    c_rec.pod_cidrs.push("10.33.0.0/24".parse().unwrap());
    a.learn(&rt, &[c_rec.clone()]);
    b.learn(&rt, &[c_rec.clone()]);
    c.learn(&rt, &[a.record(n1), b.record(n2)]);
    let keys: Vec<String> = a
        .agent
        .status()
        .unwrap()
        .peers
        .into_iter()
        .map(|p| p.public_key)
        .collect();
    assert!(
        keys.contains(&c.agent.public_key()) && !keys.contains(&old_c_key),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 2);
    let mut ac =
        tcp_connect(&n1.pod, echo_c.addr, CONNECT).expect("pod A -> pod C with C's new key");
    echo_roundtrip(&mut ac, b"new key").unwrap();
    echo_roundtrip(&mut ab, b"after C's key change").unwrap();

    // 3. A node claiming B's key is refused; B keeps its peer. A node without a key gets no
    //    peer, and (strict mode) its pod CIDR is unreachable rather than routed in clear.
    let mut thief = b.record(n2);
    thief.cluster = "c2".into();
    thief.cluster_id = 2;
    thief.name = "thief".into();
    thief.node_ip = Some("198.18.7.2".parse().unwrap());
    thief.underlay_ips = vec!["198.18.7.2".parse().unwrap()];
    thief.pod_cidrs = vec!["10.7.0.0/24".parse().unwrap()];
    let mut keyless = thief.clone();
    keyless.name = "keyless".into();
    keyless.wireguard_pubkey = None;
    keyless.node_ip = Some("198.18.8.2".parse().unwrap());
    keyless.underlay_ips = vec!["198.18.8.2".parse().unwrap()];
    keyless.pod_cidrs = vec!["10.8.0.0/24".parse().unwrap()];
    a.learn(&rt, &[thief, keyless]);
    let status = a.agent.status().unwrap();
    assert_eq!(status.peers.len(), 2, "{status:#?}");
    assert_eq!(peer_b(&a).public_key, b.agent.public_key());
    let routes = strait_routes(&n1.ns);
    assert!(
        routes.contains(&"unreachable 10.7.0.0/24".to_owned()),
        "{routes:?}"
    );
    assert!(
        routes.contains(&"unreachable 10.8.0.0/24".to_owned()),
        "{routes:?}"
    );
    echo_roundtrip(&mut ab, b"after the duplicate key").unwrap();

    // Routes strait did not create are never touched; its own are repaired on the next pass.
    ip_in(
        &n1.ns,
        &["route", "add", "10.77.0.0/24", "via", "198.18.1.1"],
    );
    ip_in(&n1.ns, &["route", "del", "10.2.0.0/24", "proto", "161"]);

    // 4. A peer strait never configured stays until the initial sync, then goes.
    let stranger = wireguard_control::Key([0x42; 32]).to_base64();
    let out = std::process::Command::new("wg")
        .args([
            "set",
            &a.device,
            "peer",
            &stranger,
            "allowed-ips",
            "10.99.0.0/24",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // C is deleted meanwhile: a peer strait owns goes at once, even before sync.
    a.state.update(|m| m.delete_node("c2", "c"));
    a.wait(&rt);
    let keys: Vec<String> = a
        .agent
        .status()
        .unwrap()
        .peers
        .into_iter()
        .map(|p| p.public_key)
        .collect();
    assert!(keys.contains(&stranger), "GC before sync: {keys:?}");
    assert!(
        !keys.contains(&c.agent.public_key()),
        "deleted node's peer kept: {keys:?}"
    );
    let routes = strait_routes(&n1.ns);
    assert!(
        !routes
            .iter()
            .any(|r| r.contains("10.3.0.0/24") || r.contains("10.33.0.0/24")),
        "routes of a deleted node left: {routes:?}"
    );
    a.synced.send_replace(true);
    assert!(
        wait_until(Duration::from_secs(10), || {
            a.agent
                .status()
                .unwrap()
                .peers
                .iter()
                .all(|p| p.public_key != stranger)
        }),
        "unknown peer not garbage-collected after sync"
    );
    assert_eq!(a.agent.status().unwrap().peers.len(), 1);
    let routes = strait_routes(&n1.ns);
    assert!(
        routes.iter().any(|r| r.starts_with("10.2.0.0/24 dev ")),
        "strait's route not repaired: {routes:?}"
    );
    assert!(
        ip_in(&n1.ns, &["route", "show", "10.77.0.0/24"]).contains("via 198.18.1.1"),
        "a foreign route was touched"
    );

    echo_roundtrip(&mut ab, b"still the same connection at the end").unwrap();
    assert_eq!(a.agent.manager().child_pid(), Some(pid));
    assert_eq!(link_info(&n1.ns, &a.device).0, ifindex);
}

#[test]
fn strict_mode_keeps_traffic_to_a_peerless_pod_cidr_off_the_underlay() {
    require_privileges();
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let echo = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7200));
    let udp = UdpEcho::start(&n2.pod, sa(n2.pod_ip, 7201));

    // Control: without strait the plaintext path through the router works, so a missing peer
    // would leak if strict mode did nothing.
    let mut plain = tcp_connect(&n1.pod, echo.addr, CONNECT).expect("plaintext control path");
    echo_roundtrip(&mut plain, b"in clear").unwrap();
    drop(plain);

    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "node-a", |cfg| {
        cfg.routing.strict_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    });
    // B is known but has no key yet: no peer.
    a.learn(&rt, &[node_record("c2", 2, "node-b", n2, None)]);
    let mut routes = strait_routes(&n1.ns);
    routes.sort();
    assert_eq!(
        routes,
        ["unreachable 10.0.0.0/8", "unreachable 10.2.0.0/24"]
    );

    let capture = Capture::start(&n1.ns, &n1.underlay_if);
    let err =
        tcp_connect(&n1.pod, echo.addr, CONNECT).expect_err("connect must fail without a peer");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH)
        ),
        "{err}"
    );
    assert!(udp_roundtrip(&n1.pod, udp.addr, b"should not leave").is_err());
    // Anything else in the mesh supernet is dropped as well.
    assert!(tcp_connect(&n1.pod, sa([10, 9, 0, 2], 7200), CONNECT).is_err());
    let lines = capture.finish();
    assert!(
        lines.iter().all(|l| !l.contains(" 10.")),
        "pod traffic reached the underlay: {lines:#?}"
    );

    // B appears with its key: the unreachable route is replaced in place, traffic flows
    // encrypted.
    let b = NodeAgent::start(&rt, n2, "c2", 2, "node-b", |_| {});
    publish_mesh(&rt, &[(&a, n1), (&b, n2)]);
    let mut routes = strait_routes(&n1.ns);
    routes.sort();
    assert_eq!(
        routes,
        [
            format!("10.2.0.0/24 dev {} scope link src 10.1.0.1", a.device),
            "unreachable 10.0.0.0/8".to_owned(),
            "unreachable 10.2.0.0/24 metric 41377".to_owned(),
        ]
    );
    let capture = Capture::start(&n1.ns, &n1.underlay_if);
    let mut s = tcp_connect(&n1.pod, echo.addr, CONNECT).expect("encrypted once the peer exists");
    echo_roundtrip(&mut s, b"now encrypted").unwrap();
    udp_roundtrip(&n1.pod, udp.addr, b"udp too").unwrap();
    drop(s);
    assert_only_wireguard(
        &capture.finish(),
        &[n1.underlay_ip, n2.underlay_ip],
        WIREGUARD_PORT,
    );
}

#[test]
fn interop_with_a_hand_configured_wireguard_go_node() {
    require_privileges();
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "strait-node", |_| {});

    // Node B: wireguard-go + wg + ip, no strait.
    let hand = HandWireguard::start(&n2.ns, WIREGUARD_PORT);
    hand.wg(&[
        "set",
        &hand.device,
        "peer",
        &a.agent.public_key(),
        "endpoint",
        &format!("{}:{WIREGUARD_PORT}", n1.underlay_ip),
        "allowed-ips",
        &n1.pod_cidr.to_string(),
    ]);
    ip_in(&n2.ns, &["link", "set", &hand.device, "mtu", "1420", "up"]);
    ip_in(
        &n2.ns,
        &[
            "route",
            "add",
            &n1.pod_cidr.to_string(),
            "dev",
            &hand.device,
        ],
    );

    a.learn(
        &rt,
        &[node_record(
            "c2",
            2,
            "hand-node",
            n2,
            Some(hand.public_key.clone()),
        )],
    );

    let to_b = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7300));
    let to_a = TcpEcho::start(&n1.pod, sa(n1.pod_ip, 7301));
    let udp = UdpEcho::start(&n2.pod, sa(n2.pod_ip, 7302));
    let capture = Capture::start(&n1.ns, &n1.underlay_if);
    let mut s =
        tcp_connect(&n1.pod, to_b.addr, CONNECT).expect("strait pod -> hand-configured pod");
    echo_roundtrip(&mut s, b"strait to wg").unwrap();
    let mut s2 =
        tcp_connect(&n2.pod, to_a.addr, CONNECT).expect("hand-configured pod -> strait pod");
    echo_roundtrip(&mut s2, b"wg to strait").unwrap();
    udp_roundtrip(&n1.pod, udp.addr, b"udp interop").unwrap();
    drop((s, s2));
    assert_only_wireguard(
        &capture.finish(),
        &[n1.underlay_ip, n2.underlay_ip],
        WIREGUARD_PORT,
    );

    let handshakes = hand.wg(&["show", &hand.device, "latest-handshakes"]);
    let ts: u64 = handshakes
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        ts > 0,
        "no handshake on the hand-configured side: {handshakes}"
    );
    let peer = &a.agent.status().unwrap().peers[0];
    assert_eq!(peer.node.as_deref(), Some("hand-node"));
    assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0);
}

#[test]
fn large_transfer_has_no_mtu_black_hole() {
    require_privileges();
    const UNDERLAY_MTU: u32 = 1400;
    const BYTES: u64 = 64 * 1024 * 1024;
    let topo = Topology::new(2, Some(UNDERLAY_MTU));
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "node-a", |_| {});
    let b = NodeAgent::start(&rt, n2, "c2", 2, "node-b", |_| {});
    publish_mesh(&rt, &[(&a, n1), (&b, n2)]);
    // Device MTU follows the interface holding the node IP.
    assert_eq!(link_info(&n1.ns, &a.device).1, UNDERLAY_MTU - 80);
    assert_eq!(link_info(&n2.ns, &b.device).1, UNDERLAY_MTU - 80);

    // Pods keep MTU 1500: the node answers with "fragmentation needed" and PMTU discovery
    // must work through the tunnel.
    let (got, took) =
        bulk_transfer(&n1.pod, &n2.pod, sa(n2.pod_ip, 7400), BYTES).expect("bulk transfer");
    assert_eq!(got, BYTES);
    let mbit = BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6;
    println!("pod -> pod through wireguard-go: {BYTES} bytes in {took:?} = {mbit:.0} Mbit/s");
}

#[test]
fn reconcile_benchmark_1000_peers() {
    require_privileges();
    let r = bench_reconcile(1000);
    println!(
        "{} peers: into an empty device {}; one change {}; no change {}",
        r.peers, r.initial, r.one_change, r.no_change
    );
}

/// The same reconciler on the kernel backend: strait creates a kernel WireGuard device per
/// node, pods talk through it (ping, TCP, UDP, 1 MiB), the underlay carries WireGuard only,
/// the handshake shows, and a node leaving takes its peer and route away. This machine has no
/// wireguard module: `cargo xtask vm` (a step of `cargo xtask test`) boots a kernel that has
/// one and runs this test there with `--include-ignored`; without the module it fails.
#[test]
#[ignore = "needs the wireguard kernel module: run by `cargo xtask vm` (part of `cargo xtask test`)"]
fn kernel_backend_carries_pod_traffic_through_the_tunnel() {
    require_privileges();
    assert!(
        Path::new("/sys/module/wireguard").exists(),
        "the wireguard kernel module is not loaded: this test needs kernel WireGuard (run it \
         with `cargo xtask vm --test wireguard::kernel_backend_carries_pod_traffic_through_the_tunnel`)"
    );
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let kernel = |c: &mut strait::wireguard::EncryptionConfig| {
        c.wireguard.backend = strait::wireguard::BackendChoice::Kernel;
    };
    let a = NodeAgent::start(&rt, n1, "c1", 1, "node-a", kernel);
    let b = NodeAgent::start(&rt, n2, "c2", 2, "node-b", kernel);
    for agent in [&a, &b] {
        assert_eq!(agent.agent.manager().backend(), BackendKind::Kernel);
        assert_eq!(agent.agent.manager().child_pid(), None, "no wireguard-go");
    }
    // A kernel device: its link kind is wireguard.
    let details = ip_in(&n1.ns, &["-d", "link", "show", "dev", &a.device]);
    assert!(details.contains("wireguard"), "{details}");
    publish_mesh(&rt, &[(&a, n1), (&b, n2)]);

    let tcp = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7000));
    let udp = UdpEcho::start(&n2.pod, sa(n2.pod_ip, 7001));
    let back = TcpEcho::start(&n1.pod, sa(n1.pod_ip, 7002));
    let capture = Capture::start(&n1.ns, &n1.underlay_if);

    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", n1.pod.name(), "ping", "-c", "3", "-W", "5"])
        .arg(n2.pod_ip.to_string())
        .output()
        .expect("running ping");
    assert!(
        ping.status.success(),
        "pod A -> pod B ping through kernel WireGuard: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let mut pod_to_pod = tcp_connect(&n1.pod, tcp.addr, CONNECT).expect("pod A -> pod B over TCP");
    for i in 0..20 {
        echo_roundtrip(&mut pod_to_pod, format!("hello {i}").as_bytes()).unwrap();
    }
    udp_roundtrip(&n1.pod, udp.addr, b"udp through the tunnel").expect("pod A -> pod B over UDP");
    let mut reverse = tcp_connect(&n2.pod, back.addr, CONNECT).expect("pod B -> pod A over TCP");
    echo_roundtrip(&mut reverse, b"the other way").unwrap();
    drop((pod_to_pod, reverse));
    // Full-size segments: the device MTU leaves room for WireGuard's overhead.
    let (got, _) =
        bulk_transfer(&n1.pod, &n2.pod, sa(n2.pod_ip, 7400), 1 << 20).expect("1 MiB pod -> pod");
    assert_eq!(got, 1 << 20);

    let lines = capture.finish();
    let wg_packets =
        assert_only_wireguard(&lines, &[n1.underlay_ip, n2.underlay_ip], WIREGUARD_PORT);
    assert!(
        wg_packets >= 40,
        "{wg_packets} WireGuard packets: {lines:#?}"
    );

    let status = a.agent.status().unwrap();
    assert_eq!(status.backend, BackendKind::Kernel);
    assert_eq!(status.listen_port, Some(WIREGUARD_PORT));
    assert_eq!(status.peers.len(), 1, "{status:#?}");
    let peer = &status.peers[0];
    assert_eq!(peer.node.as_deref(), Some("node-b"));
    assert_eq!(peer.public_key, b.agent.public_key());
    assert_eq!(peer.endpoint, Some(sa(n2.underlay_ip, WIREGUARD_PORT)));
    assert!(peer.last_handshake_unix.is_some(), "no handshake: {peer:?}");
    assert!(
        peer.rx_bytes > 1 << 20 || peer.tx_bytes > 1 << 20,
        "{peer:?}"
    );
    let wg = std::process::Command::new("ip")
        .args(["netns", "exec", n1.ns.name(), "wg", "show", &a.device])
        .output()
        .expect("running wg show");
    let wg = String::from_utf8_lossy(&wg.stdout);
    println!("wg show {} (node A):\n{wg}", a.device);
    assert!(wg.contains("latest handshake"), "{wg}");
    let mut routes = strait_routes(&n1.ns);
    routes.sort();
    assert_eq!(
        routes,
        [
            format!("10.2.0.0/24 dev {} scope link src 10.1.0.1", a.device),
            "unreachable 10.2.0.0/24 metric 41377".to_owned()
        ],
        "node A's strait routes"
    );
    assert_eq!(link_info(&n1.ns, &a.device).1, 1500 - 80);

    // Node B leaves: its peer and route go; the device stays.
    a.state.update(|m| m.delete_node("c2", "node-b"));
    a.wait(&rt);
    assert!(a.agent.status().unwrap().peers.is_empty());
    assert!(strait_routes(&n1.ns).is_empty());
    drop((tcp, udp, back));
    a.stop(&rt);
    b.stop(&rt);
}

/// A restarted agent (kernel device and its routes left in place, or a wireguard-go it
/// adopts) starts from an empty model. Until its first full sync it must not delete the
/// routes the previous run installed: strict mode would answer `unreachable` to live traffic
/// until the mesh is listed again (found by the end-to-end test's agent restart).
#[test]
fn routes_of_a_previous_run_are_kept_until_the_first_full_sync() {
    use strait::routing::{RouteInputs, RouteReconciler, RoutingConfig};
    require_privileges();
    let ns = Netns::new();
    let dev = unique_name("dm");
    // Any link serves as the device here (no dummy module on these machines): a veth pair.
    let peer = unique_name("dp");
    ip_in(
        &ns,
        &["link", "add", &dev, "type", "veth", "peer", "name", &peer],
    );
    ip_in(&ns, &["link", "set", &peer, "up"]);
    ip_in(&ns, &["addr", "add", "198.18.9.2/24", "dev", &dev]);
    let rt = runtime();
    let cfg = RoutingConfig {
        underlay_mtu: Some(1500),
        strict_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..RoutingConfig::default()
    };
    let reconciler = |synced: bool| {
        let netns = TargetNetns::from_path(&netns_path(&ns)).unwrap();
        let mut r = rt
            .block_on(async { RouteReconciler::new(cfg.clone(), &dev, netns) })
            .unwrap();
        r.set_synced(synced);
        r
    };
    let full = RouteInputs {
        encrypted: vec![("10.2.0.0/24".parse().unwrap(), "c2/node-b".into())],
        local_pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        ..RouteInputs::default()
    };
    let empty = RouteInputs {
        local_pod_cidrs: full.local_pod_cidrs.clone(),
        ..RouteInputs::default()
    };
    let routes = || {
        let mut r = strait_routes(&ns);
        r.sort();
        r
    };
    let mut first = reconciler(true);
    let report = rt.block_on(first.reconcile(&full)).unwrap();
    // The encryption guard lets this node's own pod CIDR through (inside the strict /8).
    assert!(
        report
            .guard
            .contains(&("10.1.0.0/24".parse().unwrap(), true)),
        "{:?}",
        report.guard
    );
    let installed = routes();
    assert!(
        installed.iter().any(|r| r.starts_with("10.2.0.0/24 dev")),
        "{installed:?}"
    );
    drop(first);

    // The restart: empty model, not synced yet. Nothing is removed.
    let mut second = reconciler(false);
    let report = rt.block_on(second.reconcile(&empty)).unwrap();
    assert!(
        report
            .guard
            .contains(&("10.2.0.0/24".parse().unwrap(), true)),
        "the encryption guard must mirror the kept route: {:?}",
        report.guard
    );
    assert_eq!(
        routes(),
        installed,
        "routes removed before the first full sync"
    );
    // A node this run learns and then sees deleted loses its route at once, synced or not.
    let learned = RouteInputs {
        encrypted: vec![("10.3.0.0/24".parse().unwrap(), "c3/node-c".into())],
        ..empty.clone()
    };
    rt.block_on(second.reconcile(&learned)).unwrap();
    assert!(routes().iter().any(|r| r.starts_with("10.3.0.0/24 dev")));
    rt.block_on(second.reconcile(&empty)).unwrap();
    assert_eq!(
        routes(),
        installed,
        "a deleted node's route must go before sync too"
    );
    // Synced, and the node is really gone: now its route goes.
    second.set_synced(true);
    rt.block_on(second.reconcile(&empty)).unwrap();
    assert_eq!(routes(), ["unreachable 10.0.0.0/8"]);
}

/// Fail closed (issue 13): the default configuration (strict, no hand-written supernet) keeps
/// an `unreachable` fallback under every route into the device. wireguard-go is killed by PID
/// while a pod streams UDP to a remote pod: its device and the routes into it vanish, and not
/// one packet with a pod address reaches the underlay (the node's default route and the
/// router's plaintext path would carry it). The agent restarts wireguard-go on its own and the
/// stream resumes, encrypted.
#[test]
fn killing_wireguard_go_drops_pod_traffic_never_sends_it_in_clear_and_it_resumes() {
    use std::{
        net::UdpSocket,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
    };
    require_privileges();
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "node-a", |_| {});
    let b = NodeAgent::start(&rt, n2, "c2", 2, "node-b", |_| {});
    assert!(a.agent.manager().child_pid().is_some(), "userspace backend");
    publish_mesh(&rt, &[(&a, n1), (&b, n2)]);
    let udp = UdpEcho::start(&n2.pod, sa(n2.pod_ip, 7300));
    udp_roundtrip(&n1.pod, udp.addr, b"before").expect("encrypted path up");
    let fallback = "unreachable 10.2.0.0/24 metric 41377".to_owned();

    let capture = Capture::start(&n1.ns, &n1.underlay_if);
    // The pod's stream: a connected socket, so the node's ICMP "unreachable" surfaces here.
    let sock = n1
        .pod
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("pod socket");
    sock.connect(udp.addr).unwrap();
    // Host-unreachable is a soft error: reported to the socket only with IP_RECVERR.
    {
        use std::os::fd::AsRawFd as _;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
    }
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let (stop, echoed, unreachable) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let sender = {
        let (stop, echoed, unreachable) = (stop.clone(), echoed.clone(), unreachable.clone());
        std::thread::spawn(move || {
            let unreach = |e: &std::io::Error| {
                matches!(
                    e.raw_os_error(),
                    Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH)
                )
            };
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = sock.send(b"stream")
                    && unreach(&e)
                {
                    unreachable.fetch_add(1, Ordering::Relaxed);
                }
                match sock.recv(&mut buf) {
                    Ok(_) => {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if unreach(&e) => {
                        unreachable.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || echoed.load(Ordering::Relaxed)
            > 10),
        "the stream does not flow before the kill"
    );

    let device_present = || {
        std::process::Command::new("ip")
            .args(["-n", n1.ns.name(), "link", "show", "dev", &a.device])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // The agent may restart wireguard-go before the stream hits the gap: then kill again.
    let mut dropped_in_the_gap = false;
    let mut pid = a.agent.manager().child_pid().unwrap();
    for _attempt in 0..5 {
        let before = unreachable.load(Ordering::Relaxed);
        // SAFETY: kill(2) on the PID of a child of this process (strait's wireguard-go).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(10), || !device_present()
                || a.agent.manager().child_pid() != Some(pid)),
            "the device outlived wireguard-go"
        );
        dropped_in_the_gap = wait_until(Duration::from_secs(5), || {
            unreachable.load(Ordering::Relaxed) > before
                || a.agent.manager().child_pid().is_some_and(|p| p != pid)
        }) && unreachable.load(Ordering::Relaxed) > before;
        // Back on its own, with a new process, without any model change.
        assert!(
            wait_until(Duration::from_secs(20), || a
                .agent
                .manager()
                .child_pid()
                .is_some_and(|p| p != pid)),
            "wireguard-go not restarted"
        );
        assert!(!process_alive(pid));
        pid = a.agent.manager().child_pid().unwrap();
        if dropped_in_the_gap {
            break;
        }
    }
    if !dropped_in_the_gap {
        // Say first whether it leaked (what today's main does).
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        assert_only_wireguard(
            &capture.finish(),
            &[n1.underlay_ip, n2.underlay_ip],
            WIREGUARD_PORT,
        );
        panic!("the pod's stream was never answered `unreachable` while the device was gone");
    }
    let resumed_from = echoed.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(20), || echoed.load(Ordering::Relaxed)
            > resumed_from + 10),
        "the stream did not resume after wireguard-go came back"
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let lines = capture.finish();
    assert_only_wireguard(&lines, &[n1.underlay_ip, n2.underlay_ip], WIREGUARD_PORT);
    let mut routes = strait_routes(&n1.ns);
    routes.sort();
    assert_eq!(
        routes,
        [
            format!("10.2.0.0/24 dev {} scope link src 10.1.0.1", a.device),
            fallback
        ]
    );
    drop(udp);
    a.stop(&rt);
    b.stop(&rt);
}

/// Strict mode with the device missing (wireguard-go dead and not restartable): the reconcile
/// fails, but every known remote pod CIDR, also one learnt meanwhile, gets its `unreachable`
/// route; once the device is back the routes into it return above the fallbacks, and a
/// node that leaves takes its fallback along.
#[test]
fn strict_fallbacks_are_installed_without_the_device_and_go_with_their_node() {
    use strait::routing::{RouteInputs, RouteReconciler, RoutingConfig, RoutingError};
    require_privileges();
    let ns = Netns::new();
    let dev = unique_name("dm");
    let rt = runtime();
    let netns = TargetNetns::from_path(&netns_path(&ns)).unwrap();
    let mut r = rt
        .block_on(async {
            RouteReconciler::new(
                RoutingConfig {
                    underlay_mtu: Some(1500),
                    ..RoutingConfig::default()
                },
                &dev,
                netns,
            )
        })
        .unwrap();
    let inputs = RouteInputs {
        encrypted: vec![("10.2.0.0/24".parse().unwrap(), "c2/node-b".into())],
        missing_peer: vec![("10.3.0.0/24".parse().unwrap(), "c3/node-c".into())],
        local_pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        ..RouteInputs::default()
    };
    let routes = || {
        let mut r = strait_routes(&ns);
        r.sort();
        r
    };
    let err = rt.block_on(r.reconcile(&inputs)).unwrap_err();
    assert!(matches!(err, RoutingError::DeviceMissing { .. }), "{err}");
    assert_eq!(
        routes(),
        [
            "unreachable 10.2.0.0/24 metric 41377",
            "unreachable 10.3.0.0/24"
        ]
    );

    // The device appears (any link serves: a veth pair).
    let peer = unique_name("dp");
    ip_in(
        &ns,
        &["link", "add", &dev, "type", "veth", "peer", "name", &peer],
    );
    ip_in(&ns, &["link", "set", &peer, "up"]);
    rt.block_on(r.reconcile(&inputs)).unwrap();
    assert_eq!(
        routes(),
        [
            format!("10.2.0.0/24 dev {dev} scope link"),
            "unreachable 10.2.0.0/24 metric 41377".to_owned(),
            "unreachable 10.3.0.0/24".to_owned(),
        ]
    );
    // Node B leaves: its device route and its fallback go.
    let gone = RouteInputs {
        encrypted: vec![],
        ..inputs.clone()
    };
    rt.block_on(r.reconcile(&gone)).unwrap();
    assert_eq!(routes(), ["unreachable 10.3.0.0/24"]);
}

/// A dual-stack node exactly as Cilium writes it (router and health IPs inside its pod CIDRs,
/// InternalIP/ExternalIP of both families, the key as field and annotation), for node 2 of
/// the topology (underlay 198.18.2.2, pods 10.2.0.0/24 behind the router IP 10.2.0.1).
fn cilium_node_json(pubkey: &str) -> String {
    r#"{"Name":"kind-worker","Cluster":"cilium-east","IPAddresses":[{"Type":"InternalIP","IP":"198.18.2.2"},{"Type":"ExternalIP","IP":"203.0.113.7"},{"Type":"InternalIP","IP":"fd00:198:18:2::2"},{"Type":"CiliumInternalIP","IP":"10.2.0.1"},{"Type":"CiliumInternalIP","IP":"fd00:10:2::1"}],"IPv4AllocCIDR":{"IP":"10.2.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:2::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.2.0.77","IPv6HealthIP":"fd00:10:2::4d","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":4,"Source":"custom-resource","EncryptionKey":255,"Labels":{"kubernetes.io/hostname":"kind-worker","kubernetes.io/os":"linux"},"Annotations":{"network.cilium.io/wg-pub-key":"KEY"},"WireguardPubKey":"KEY","BootID":"3d6e1b8f-4c1a-4f55-9a3e-2b7f0c9d8e11"}"#
        .replace("KEY", pubkey)
}

/// strait meshes with a Cilium node: its pod CIDRs (whose router IP Cilium publishes as
/// CiliumInternalIP) are routed into WireGuard and are its peer's AllowedIPs, for both
/// families, and pod traffic to it flows through the tunnel.
#[test]
fn cilium_shaped_node_gets_routes_and_allowed_ips_and_carries_pod_traffic() {
    use strait::wire::KvNode;
    require_privileges();
    let topo = Topology::new(2, None);
    let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
    let rt = runtime();
    let a = NodeAgent::start(&rt, n1, "c1", 1, "strait-node", |_| {});
    // The topology turns IPv6 off; the device needs it for the IPv6 pod CIDR's route.
    n1.ns
        .sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", a.device), "0");

    // The "Cilium node": wireguard-go configured by hand on node 2.
    let hand = HandWireguard::start(&n2.ns, WIREGUARD_PORT);
    hand.wg(&[
        "set",
        &hand.device,
        "peer",
        &a.agent.public_key(),
        "endpoint",
        &format!("{}:{WIREGUARD_PORT}", n1.underlay_ip),
        "allowed-ips",
        &n1.pod_cidr.to_string(),
    ]);
    ip_in(&n2.ns, &["link", "set", &hand.device, "mtu", "1420", "up"]);
    ip_in(
        &n2.ns,
        &[
            "route",
            "add",
            &n1.pod_cidr.to_string(),
            "dev",
            &hand.device,
        ],
    );

    let kv = KvNode::decode(cilium_node_json(&hand.public_key).as_bytes()).unwrap();
    let record = strait::mesh::convert::node(&kv, "cilium-east".into());
    a.learn(&rt, &[record]);

    let v4 = strait_routes(&n1.ns);
    assert!(
        v4.iter()
            .any(|r| r.starts_with(&format!("10.2.0.0/24 dev {}", a.device))),
        "{v4:?}"
    );
    let v6 = ip_in(&n1.ns, &["-6", "route", "show", "proto", "161"]);
    assert!(
        v6.contains(&format!("fd00:10:2::/64 dev {}", a.device)),
        "{v6}"
    );
    let status = a.agent.status().unwrap();
    let peer = &status.peers[0];
    assert_eq!(peer.node.as_deref(), Some("kind-worker"));
    assert_eq!(peer.endpoint, Some(sa(n2.underlay_ip, WIREGUARD_PORT)));
    assert_eq!(peer.allowed_ips, 2, "{peer:?}");

    let echo = TcpEcho::start(&n2.pod, sa(n2.pod_ip, 7310));
    let capture = Capture::start(&n1.ns, &n1.underlay_if);
    let mut s = tcp_connect(&n1.pod, echo.addr, CONNECT).expect("strait pod -> Cilium pod");
    echo_roundtrip(&mut s, b"to a cilium node").unwrap();
    drop(s);
    assert_only_wireguard(
        &capture.finish(),
        &[n1.underlay_ip, n2.underlay_ip],
        WIREGUARD_PORT,
    );
}

/// IPv6 routes come back from the kernel with metric 1024 even when added with 0: the next
/// pass must recognise them as its own, not re-add them ("a route strait does not own already
/// exists") and delete them.
#[test]
fn ipv6_routes_are_stable_across_passes() {
    use strait::routing::{RouteInputs, RouteReconciler, RoutingConfig};
    require_privileges();
    let ns = Netns::new();
    let dev = unique_name("dm");
    let peer = unique_name("dp");
    ip_in(
        &ns,
        &["link", "add", &dev, "type", "veth", "peer", "name", &peer],
    );
    ip_in(&ns, &["link", "set", &peer, "up"]);
    ip_in(&ns, &["addr", "add", "198.18.9.2/24", "dev", &dev]);
    let rt = runtime();
    let cfg = RoutingConfig {
        underlay_mtu: Some(1500),
        strict_cidrs: vec!["fd00:10::/32".parse().unwrap()],
        ..RoutingConfig::default()
    };
    let netns = TargetNetns::from_path(&netns_path(&ns)).unwrap();
    let mut routes = rt
        .block_on(async { RouteReconciler::new(cfg, &dev, netns) })
        .unwrap();
    let inputs = RouteInputs {
        encrypted: vec![
            (
                "10.2.0.0/24".parse().unwrap(),
                "cilium-east/kind-worker".into(),
            ),
            (
                "fd00:10:2::/64".parse().unwrap(),
                "cilium-east/kind-worker".into(),
            ),
        ],
        local_pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        ..RouteInputs::default()
    };
    let first = rt.block_on(routes.reconcile(&inputs)).unwrap();
    // Two routes into the device, their strict-mode fallbacks, and the strict supernet.
    assert_eq!((first.added, first.skipped.len()), (5, 0), "{first:?}");
    let show = || ip_in(&ns, &["-6", "route", "show", "proto", "161"]);
    let installed = show();
    assert!(installed.contains("fd00:10:2::/64 dev"), "{installed}");
    assert!(
        installed.contains("unreachable fd00:10::/32"),
        "{installed}"
    );
    for pass in 2..=3 {
        let r = rt.block_on(routes.reconcile(&inputs)).unwrap();
        assert_eq!(
            (r.added, r.replaced, r.removed),
            (0, 0, 0),
            "pass {pass}: {r:?}"
        );
        assert!(r.skipped.is_empty(), "pass {pass}: {:?}", r.skipped);
        assert_eq!(show(), installed, "pass {pass}");
    }
    // No longer wanted: removed.
    let r = rt
        .block_on(routes.reconcile(&RouteInputs {
            local_pod_cidrs: inputs.local_pod_cidrs.clone(),
            ..RouteInputs::default()
        }))
        .unwrap();
    assert_eq!(r.removed, 4, "{r:?}");
    let left = show();
    assert!(
        left.contains("unreachable fd00:10::/32") && !left.contains("fd00:10:2::/64"),
        "{left}"
    );
}
