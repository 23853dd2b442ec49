//! The eBPF datapath, really loaded: policy verdicts and LB selection through
//! `BPF_PROG_TEST_RUN` on crafted frames, and the socket load balancer through real
//! `connect()`/`sendto()` from a process in a test cgroup and namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use ipnet::Ipv4Net;
use strait::{
    datapath::{
        Datapath, MapSizes,
        flows::drop_counts,
        ipcache::IpcacheWriter,
        lb::{self, LbWriter},
        policy::{EndpointSpec, PolicyWriter},
    },
    policy::{Direction, EndpointPolicy, PolicyEntry},
    state::{
        Affinity, Backend, BackendState, ClusterService, PortMap, Protocol, ServiceName, StateModel,
    },
};
use strait_common::{
    flow::{DropReason, FLOW_FLAG_REMOTE_UNKNOWN, FlowEvent, VERDICT_DROPPED},
    ipcache::{IDENTITY_WORLD, IpcacheValue},
    names,
};
use strait_tests::{
    TestCgroup,
    datapath::{LbTopology, Probe, frame, probe},
    require_privileges,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// `BPF_PROG_TEST_RUN` runs tc programs on loopback: the endpoint's ifindex is 1.
const LO: u32 = 1;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn ipc(identity: u32, cluster_id: u16) -> IpcacheValue {
    IpcacheValue {
        identity,
        cluster_id,
        ..Default::default()
    }
}

struct PolicyRig {
    dp: Datapath,
    policy: PolicyWriter,
    events: RingBuf<MapData>,
}

impl PolicyRig {
    fn new(ipcache: &[(&str, IpcacheValue)]) -> Self {
        let sizes = MapSizes::default();
        let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
        let mut ipc =
            IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache).unwrap();
        let desired: BTreeMap<Ipv4Net, IpcacheValue> = ipcache
            .iter()
            .map(|(p, v)| (p.parse().unwrap(), *v))
            .collect();
        assert!(ipc.sync(&desired, true).failed.is_empty());
        let policy = PolicyWriter::new(
            dp.take_map(names::MAP_ENDPOINTS).unwrap(),
            dp.take_map(names::MAP_POLICY).unwrap(),
            sizes.endpoints,
            sizes.policy,
        )
        .unwrap();
        let events = RingBuf::try_from(dp.take_map(names::MAP_FLOW_EVENTS).unwrap()).unwrap();
        Self { dp, policy, events }
    }

    fn run(&mut self, from_pod: bool, f: &[u8]) -> u32 {
        let prog = self.dp.policy_program(from_pod).unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            // SAFETY: FlowEvent records written by the datapath.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }
}

fn entry(identity: u32, direction: Direction, protocol: u8, port: u16, deny: bool) -> PolicyEntry {
    PolicyEntry {
        identity,
        direction,
        protocol,
        port,
        deny,
    }
}

#[test]
fn policy_verdicts_by_test_run() {
    require_privileges();
    // frontend (1000) and other (2000) in cluster 1, a mixed identity 4000, the db pod itself.
    let mut rig = PolicyRig::new(&[
        ("10.1.0.5/32", ipc(1000, 1)),
        ("10.1.0.6/32", ipc(2000, 1)),
        ("10.1.0.8/32", ipc(4000, 1)),
        ("10.2.0.7/32", ipc(3000, 2)),
    ]);
    let mut policy = EndpointPolicy {
        ingress_enforced: true,
        egress_enforced: true,
        ..Default::default()
    };
    policy.entries = BTreeSet::from([
        entry(1000, Direction::Ingress, 6, 5432, false),
        entry(4000, Direction::Ingress, 6, 5432, false),
        entry(4000, Direction::Ingress, 0, 0, true),
        entry(IDENTITY_WORLD, Direction::Ingress, 6, 80, false),
    ]);
    rig.policy
        .set_endpoint(&EndpointSpec {
            ifindex: LO,
            address: "10.2.0.7".parse().unwrap(),
            identity: 3000,
            policy,
        })
        .unwrap();
    let db = "10.2.0.7:5432";
    let cases: [(&str, &str, u32, Option<DropReason>); 6] = [
        ("allowed by identity", "10.1.0.5:40001", TC_ACT_OK, None),
        (
            "denied by identity",
            "10.1.0.6:40002",
            TC_ACT_SHOT,
            Some(DropReason::PolicyDenied),
        ),
        (
            "deny rule beats allow",
            "10.1.0.8:40003",
            TC_ACT_SHOT,
            Some(DropReason::PolicyDenyRule),
        ),
        (
            "unknown source is world: no rule for 5432",
            "203.0.113.9:40004",
            TC_ACT_SHOT,
            Some(DropReason::PolicyDenied),
        ),
        (
            "allowed source again (conntrack hit)",
            "10.1.0.5:40001",
            TC_ACT_OK,
            None,
        ),
        (
            "denied source again (no state was created)",
            "10.1.0.6:40002",
            TC_ACT_SHOT,
            Some(DropReason::PolicyDenied),
        ),
    ];
    for (what, src, want, _) in cases {
        let got = rig.run(false, &frame(sa(src), sa(db), 6));
        assert_eq!(got, want, "{what}: {src} -> {db}");
    }
    assert_eq!(
        rig.run(false, &frame(sa("10.1.0.5:40005"), sa("10.2.0.7:22"), 6)),
        TC_ACT_SHOT,
        "denied by port"
    );
    assert_eq!(
        rig.run(false, &frame(sa("203.0.113.9:40006"), sa("10.2.0.7:80"), 6)),
        TC_ACT_OK,
        "world allowed on port 80 by the world rule"
    );
    // The db's reply to the allowed client leaves through egress, which is enforced with no
    // rule at all: only conntrack lets it through.
    assert_eq!(
        rig.run(true, &frame(sa(db), sa("10.1.0.5:40001"), 6)),
        TC_ACT_OK,
        "reply allowed through conntrack"
    );
    assert_eq!(
        rig.run(true, &frame(sa("10.2.0.7:40007"), sa("10.1.0.5:9999"), 6)),
        TC_ACT_SHOT,
        "a new egress flow is not a reply"
    );

    // Drop events: one per dropped packet, with both identities and the right reason.
    let events = rig.events();
    let drops: Vec<&FlowEvent> = events
        .iter()
        .filter(|e| e.verdict == VERDICT_DROPPED)
        .collect();
    assert_eq!(drops.len(), 6, "{events:?}");
    let by_port = |p: u16| drops.iter().filter(move |e| u16::from_be(e.sport) == p);
    let denied = by_port(40002).next().unwrap();
    assert_eq!(
        (
            denied.src_identity,
            denied.dst_identity,
            denied.reason,
            denied.remote_cluster_id
        ),
        (2000, 3000, DropReason::PolicyDenied as u8, 1)
    );
    let deny_rule = by_port(40003).next().unwrap();
    assert_eq!(deny_rule.reason, DropReason::PolicyDenyRule as u8);
    let world = by_port(40004).next().unwrap();
    assert_eq!(world.src_identity, IDENTITY_WORLD);
    assert_ne!(world.flags & FLOW_FLAG_REMOTE_UNKNOWN, 0);
    let egress = drops
        .iter()
        .find(|e| u16::from_be(e.dport) == 9999)
        .unwrap();
    assert_eq!((egress.src_identity, egress.dst_identity), (3000, 1000));

    let counts: BTreeMap<DropReason, u64> =
        drop_counts(&rig.dp.take_map(names::MAP_DROP_COUNTERS).unwrap())
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(counts[&DropReason::PolicyDenied], 5, "{counts:?}");
    assert_eq!(counts[&DropReason::PolicyDenyRule], 1, "{counts:?}");
}

#[test]
fn policy_applies_to_new_flows_and_unselected_endpoints_allow_all() {
    require_privileges();
    let mut rig = PolicyRig::new(&[("10.1.0.6/32", ipc(2000, 1))]);
    let spec = |policy| EndpointSpec {
        ifindex: LO,
        address: "10.2.0.7".parse().unwrap(),
        identity: 3000,
        policy,
    };
    rig.policy
        .set_endpoint(&spec(EndpointPolicy::default()))
        .unwrap();
    let old_flow = frame(sa("10.1.0.6:41000"), sa("10.2.0.7:5432"), 6);
    assert_eq!(
        rig.run(false, &old_flow),
        TC_ACT_OK,
        "no policy selects it: allow all"
    );
    // Now an ingress policy selects the endpoint without allowing identity 2000.
    rig.policy
        .set_endpoint(&spec(EndpointPolicy {
            ingress_enforced: true,
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(
        rig.run(false, &old_flow),
        TC_ACT_OK,
        "the established flow keeps working"
    );
    assert_eq!(
        rig.run(false, &frame(sa("10.1.0.6:41001"), sa("10.2.0.7:5432"), 6)),
        TC_ACT_SHOT,
        "a new flow gets the new policy"
    );
}

struct LbRig {
    dp: Datapath,
    lb: LbWriter,
}

impl LbRig {
    fn new(pins: Option<strait::datapath::PinDir>) -> Self {
        let sizes = MapSizes::default();
        let mut dp = Datapath::load(pins, &sizes).expect("loading the datapath");
        let lb = LbWriter::new(
            dp.take_map(names::MAP_LB4_SERVICES).unwrap(),
            dp.take_map(names::MAP_LB4_BACKENDS).unwrap(),
            dp.take_map(names::MAP_LB4_REVNAT).unwrap(),
            sizes,
        )
        .unwrap();
        Self { dp, lb }
    }

    fn program(&mut self, model: &StateModel) {
        let (desired, skipped) = lb::desired(&model.service_views());
        assert_eq!(skipped, 0);
        let report = self.lb.sync(&desired, true);
        assert!(report.failed.is_empty(), "{report:?}");
    }
}

const VIP: &str = "10.96.0.10";
const PORT: u16 = 8080;

fn service(cluster: &str, id: u32, affinity: Affinity, backends: &[&str]) -> ClusterService {
    let ports = |proto| PortMap::from([(String::from("http"), (proto, PORT))]);
    let mut frontend = ports(Protocol::Tcp);
    frontend.insert("dns".into(), (Protocol::Udp, PORT));
    ClusterService {
        name: ServiceName {
            namespace: "default".into(),
            name: "payment-api".into(),
        },
        cluster: cluster.into(),
        cluster_id: id,
        frontends: BTreeMap::from([(VIP.parse().unwrap(), frontend.clone())]),
        backends: backends
            .iter()
            .map(|ip| Backend {
                ip: ip.parse().unwrap(),
                ports: frontend.clone(),
                state: BackendState::Active,
            })
            .collect(),
        global: true,
        shared: true,
        affinity,
    }
}

fn model(local: &[&str], remote: &[&str], affinity: Affinity) -> StateModel {
    let mut m = StateModel::new("usa", 1);
    m.register_cluster("europe", 2).unwrap();
    m.upsert_service(service("usa", 1, affinity, local));
    m.upsert_service(service("europe", 2, Affinity::None, remote));
    m.settle();
    m
}

#[test]
fn lb_selection_by_test_run() {
    require_privileges();
    let mut rig = LbRig::new(None);
    let backends = ["10.1.0.11", "10.1.0.12", "10.1.0.13"];
    rig.program(&model(&backends, &[], Affinity::Local));
    let syn = frame(
        sa("10.1.0.99:40000"),
        SocketAddrV4::new(VIP.parse().unwrap(), PORT),
        6,
    );
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let mut out = vec![0u8; syn.len()];
        let prog = rig.dp.lb_test_program().unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&syn);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).unwrap();
        assert_eq!(r.return_value, XDP_TX, "translated");
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let port = u16::from_be_bytes([out[36], out[37]]);
        assert_eq!(port, PORT);
        seen.insert(dst.to_string());
    }
    assert_eq!(seen, backends.iter().map(|s| s.to_string()).collect());

    let run = |rig: &mut LbRig, f: &[u8]| {
        let prog = rig.dp.lb_test_program().unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        prog.test_run(opts).unwrap().return_value
    };
    let other = frame(sa("10.1.0.99:40000"), sa("10.96.0.99:8080"), 6);
    assert_eq!(run(&mut rig, &other), XDP_PASS, "not a service");
    rig.program(&model(&[], &[], Affinity::Local));
    assert_eq!(run(&mut rig, &syn), XDP_DROP, "service without backends");
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), PORT)
}

fn backends_of(probes: &[Probe]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for p in probes {
        match p {
            Probe::Ok { backend, peer } => {
                assert_eq!(*peer, vip(), "the application sees the VIP as its peer");
                *out.entry(backend.split(':').next().unwrap().to_owned())
                    .or_default() += 1;
            }
            Probe::Err { errno, .. } => panic!("connection failed: {errno}"),
        }
    }
    out
}

fn topology(addrs: &[&str]) -> LbTopology {
    let mut t = LbTopology::new();
    for a in addrs {
        t.add_backend(a.parse().unwrap(), PORT);
    }
    t
}

#[test]
fn socket_lb_spreads_connections_and_fails_fast_without_backends() {
    require_privileges();
    let local = ["10.1.0.11", "10.1.0.12", "10.1.0.13", "10.1.0.14"];
    let topo = topology(&local);
    let cgroup = TestCgroup::new();
    let mut rig = LbRig::new(None);
    rig.dp.attach_socket_lb(cgroup.path()).unwrap();
    rig.program(&model(&local, &[], Affinity::Local));

    let hits = backends_of(&probe(cgroup.path(), topo.client.name(), vip(), 120, false));
    assert_eq!(hits.len(), 4, "every backend gets connections: {hits:?}");

    // Remove one backend: no new connection reaches it.
    rig.program(&model(&local[..3], &[], Affinity::Local));
    let hits = backends_of(&probe(cgroup.path(), topo.client.name(), vip(), 60, false));
    assert!(!hits.contains_key(local[3]), "{hits:?}");
    assert_eq!(hits.len(), 3, "{hits:?}");

    // No backend at all: connect fails at once with EHOSTUNREACH (not a hang, not EPERM).
    rig.program(&model(&[], &[], Affinity::Local));
    let probes = probe(cgroup.path(), topo.client.name(), vip(), 3, false);
    for p in &probes {
        assert!(
            matches!(p, Probe::Err { errno, .. } if errno == "EHOSTUNREACH"),
            "{probes:?}"
        );
    }
}

#[test]
fn socket_lb_affinity_follows_local_backends() {
    require_privileges();
    let local = ["10.1.0.21", "10.1.0.22"];
    let remote = ["10.2.0.21", "10.2.0.22"];
    let topo = topology(&[&local[..], &remote[..]].concat());
    let cgroup = TestCgroup::new();
    let mut rig = LbRig::new(None);
    rig.dp.attach_socket_lb(cgroup.path()).unwrap();
    let clients = |rig: &mut LbRig, m: StateModel| {
        rig.program(&m);
        backends_of(&probe(cgroup.path(), topo.client.name(), vip(), 40, false))
            .into_keys()
            .collect::<BTreeSet<_>>()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    assert_eq!(
        clients(&mut rig, model(&local, &remote, Affinity::Local)),
        set(&local)
    );
    assert_eq!(
        clients(&mut rig, model(&[], &remote, Affinity::Local)),
        set(&remote),
        "failover"
    );
    assert_eq!(
        clients(&mut rig, model(&local[..1], &remote, Affinity::Local)),
        set(&local[..1]),
        "back to local"
    );
    assert_eq!(
        clients(&mut rig, model(&local, &remote, Affinity::Remote)),
        set(&remote)
    );
    assert_eq!(
        clients(&mut rig, model(&local, &remote, Affinity::None)),
        set(&[&local[..], &remote[..]].concat())
    );
}

#[test]
fn socket_lb_udp_replies_come_from_the_vip() {
    require_privileges();
    let local = ["10.1.0.31", "10.1.0.32"];
    let topo = topology(&local);
    let cgroup = TestCgroup::new();
    let mut rig = LbRig::new(None);
    rig.dp.attach_socket_lb(cgroup.path()).unwrap();
    rig.program(&model(&local, &[], Affinity::Local));
    let hits = backends_of(&probe(cgroup.path(), topo.client.name(), vip(), 30, true));
    assert_eq!(hits.len(), 2, "{hits:?}");
}

/// Pods on one node, the db pod selected by an ingress policy: the allowed client connects,
/// the other is dropped and the drop shows in `strait observe`'s stream with both
/// identities; then the agent "restarts" (datapath dropped and loaded again from its pins)
/// while a connection is open: it survives, and policy keeps applying.
#[test]
fn pods_policy_observe_and_restart_from_pins() {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Duration,
    };
    use strait::datapath::{
        PinDir,
        flows::{self, FlowHub},
    };
    use strait_tests::datapath::{EchoServer, PinRoot, PodNode};

    require_privileges();
    let ips: Vec<Ipv4Addr> = ["10.9.0.5", "10.9.0.6", "10.9.0.7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let node = PodNode::new(&ips);
    let (front, other, db) = (&node.pods[0], &node.pods[1], &node.pods[2]);
    let _server = db.ns.run(|| EchoServer::start(sa("10.9.0.7:5432")));
    let pin_root = PinRoot::new();
    let pins = PinDir::new(pin_root.path());

    let mut policy = EndpointPolicy {
        ingress_enforced: true,
        ..Default::default()
    };
    policy
        .entries
        .insert(entry(1000, Direction::Ingress, 6, 5432, false));
    let ipcache: BTreeMap<Ipv4Net, IpcacheValue> = [
        ("10.9.0.5/32", ipc(1000, 1)),
        ("10.9.0.6/32", ipc(2000, 1)),
        ("10.9.0.7/32", ipc(3000, 1)),
    ]
    .iter()
    .map(|(p, v)| (p.parse().unwrap(), *v))
    .collect();

    // The agent's part: load from pins, program ipcache and the db endpoint, attach to
    // every pod's host-side veth (in the node namespace).
    let start_agent = || {
        let sizes = MapSizes::default();
        let _in_node = strait::netns::NetnsGuard::enter(node.node.name()).unwrap();
        let mut dp = Datapath::load(Some(pins.clone()), &sizes).expect("loading the datapath");
        let mut ipc =
            IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache).unwrap();
        assert!(ipc.sync(&ipcache, true).failed.is_empty());
        let mut pw = PolicyWriter::new(
            dp.take_map(names::MAP_ENDPOINTS).unwrap(),
            dp.take_map(names::MAP_POLICY).unwrap(),
            sizes.endpoints,
            sizes.policy,
        )
        .unwrap();
        for pod in &node.pods {
            dp.attach_endpoint(&pod.host_iface).unwrap();
        }
        let ifindex = strait::datapath::loader::ifindex(&db.host_iface).unwrap();
        pw.set_endpoint(&EndpointSpec {
            ifindex,
            address: db.ip,
            identity: 3000,
            policy: policy.clone(),
        })
        .unwrap();
        dp.remove_stale_versions();
        (dp, pw)
    };
    let connect = |pod: &strait_tests::datapath::Pod| {
        pod.ns.run(|| {
            let s = TcpStream::connect_timeout(
                &"10.9.0.7:5432".parse().unwrap(),
                Duration::from_millis(700),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok::<_, std::io::Error>(s)
        })
    };
    let roundtrip = |s: &mut TcpStream, what: &str| {
        s.write_all(what.as_bytes()).unwrap();
        let mut buf = vec![0u8; what.len()];
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(buf, what.as_bytes());
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut dp, pw) = start_agent();
    let hub = FlowHub::new(64);
    let reader = rt.spawn(flows::read_events(
        dp.take_map(names::MAP_FLOW_EVENTS).unwrap(),
        hub.clone(),
        std::sync::Arc::new(|id| match id {
            1000 => (Some("usa".into()), vec!["k8s:app=frontend".into()]),
            2000 => (Some("usa".into()), vec!["k8s:app=other".into()]),
            3000 => (Some("usa".into()), vec!["k8s:app=db".into()]),
            _ => (None, vec![]),
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("strait.sock");
    let status: strait::api::StatusFn =
        std::sync::Arc::new(|| panic!("status is not asked for in this test"));
    let server = rt.spawn({
        let (socket, hub) = (socket.clone(), hub.clone());
        async move { strait::api::serve(&socket, status, Some(hub), None).await }
    });

    let mut long_lived = connect(front).expect("the allowed client connects");
    roundtrip(&mut long_lived, "hello");
    assert!(
        connect(other).is_err(),
        "a pod with other labels is dropped"
    );

    // `strait observe`: the drop, with both identities, their labels, and the reason.
    let mut observed = Vec::new();
    for _ in 0..50 {
        observed.clear();
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        rt.block_on(strait::api::observe(&socket, 20, false, |f| {
            observed.push(f)
        }))
        .unwrap();
        if !observed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dropped = observed
        .iter()
        .find(|f| f.source.address.ip() == &other.ip)
        .unwrap_or_else(|| panic!("no drop from the other pod in {observed:?}"));
    assert_eq!(
        (dropped.source.identity, dropped.destination.identity),
        (2000, 3000)
    );
    assert_eq!(dropped.verdict, "DROPPED");
    let line = dropped.to_string();
    assert!(
        line.contains("10.9.0.6")
            && line.contains("ID:2000 usa k8s:app=other")
            && line.contains("ID:3000 usa k8s:app=db")
            && line.contains("DROPPED (policy denied)"),
        "{line}"
    );

    // Restart: the agent's datapath objects go away; the pinned maps and links stay.
    reader.abort();
    drop(pw);
    drop(dp);
    roundtrip(&mut long_lived, "while the agent is down");
    assert!(
        connect(other).is_err(),
        "policy still enforced while the agent is down"
    );
    let (dp2, _pw2) = start_agent();
    roundtrip(&mut long_lived, "after the restart");
    let mut again = connect(front).expect("new connections keep working after the restart");
    roundtrip(&mut again, "new");
    assert!(
        connect(other).is_err(),
        "policy still enforced after the restart"
    );
    server.abort();
    drop(dp2);
}

/// The endpoint manager finds a pod's host-side interface from the node's route to the pod's
/// /32 (rtnetlink, the calling thread's namespace): a wider route through the same veth, or
/// the same address seen from another namespace, is no answer.
#[test]
fn host_route_ifindex_finds_the_pods_host_side_veth() {
    use strait::hostnet::host_route_ifindex;
    use strait_tests::datapath::PodNode;

    require_privileges();
    let pod_ip: Ipv4Addr = "10.9.1.5".parse().unwrap();
    let node = PodNode::new(&[pod_ip]);
    let iface = node.pods[0].host_iface.clone();
    strait_tests::ip(&[
        "-n",
        node.node.name(),
        "route",
        "add",
        "10.9.2.0/24",
        "dev",
        &iface,
    ]);
    let lookup = |ip: &str| {
        let ip: Ipv4Addr = ip.parse().unwrap();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(host_route_ifindex(ip)).unwrap()
        }
    };
    let want = node
        .node
        .run(move || strait::datapath::loader::ifindex(&iface).unwrap());
    assert_eq!(node.node.run(lookup("10.9.1.5")), Some(want));
    assert_eq!(node.node.run(lookup("10.9.2.5")), None, "a /24 is no /32");
    assert_eq!(
        node.pods[0].ns.run(lookup("10.9.1.5")),
        None,
        "the pod's own namespace routes it as a local address, not through a veth"
    );
}

/// `strait bpf cleanup` removes every strait pin directory under its root, and refuses while
/// an agent may use them: a process holds a pinned map (this test, as an agent would), or the
/// agent API socket answers.
#[test]
fn bpf_cleanup_removes_the_pins_only_once_no_agent_runs() {
    use std::{os::unix::net::UnixListener, process::Command};
    use strait::datapath::PinDir;
    use strait_tests::datapath::{PinRoot, strait_exe};

    require_privileges();
    let root = PinRoot::new();
    let pins = PinDir::new(root.path());
    let older = root.path().join("strait-v0");
    std::fs::create_dir_all(older.join("maps")).unwrap();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("strait.sock");
    let cleanup = |extra: &[&str]| {
        let out = Command::new(strait_exe())
            .args(["bpf", "cleanup", "--pin-root"])
            .arg(root.path())
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .output()
            .expect("running strait bpf cleanup");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let load = || Datapath::load(Some(pins.clone()), &MapSizes::default()).unwrap();

    let dp = load();
    let (ok, _, err) = cleanup(&[]);
    assert!(!ok, "refused while the maps are held: {err}");
    assert!(
        err.contains(&format!("process {} (", std::process::id())) && err.contains("holds"),
        "{err}"
    );
    assert!(pins.dir().exists());
    drop(dp);

    let listener = UnixListener::bind(&socket).unwrap();
    let (ok, _, err) = cleanup(&[]);
    assert!(!ok, "refused while the API socket answers: {err}");
    assert!(err.contains("an agent answers on"), "{err}");
    assert!(pins.dir().exists());
    let (ok, out, err) = cleanup(&["--force"]);
    assert!(ok, "--force skips the checks: {err}");
    assert!(
        out.contains(&format!("removed {} (", pins.dir().display())),
        "{out}"
    );
    assert!(!pins.dir().exists());
    assert!(!older.exists(), "every schema version goes: {out}");

    // A stale socket file (the agent gone) does not answer.
    drop(listener);
    drop(load());
    let (ok, out, err) = cleanup(&[]);
    assert!(ok, "{err}");
    let maps = names::PINNED_MAPS.len();
    assert!(
        out.contains(&format!(
            "removed {} ({maps} maps, 0 links)",
            pins.dir().display()
        )),
        "{out}"
    );
    assert!(!pins.dir().exists());
    let (ok, out, _) = cleanup(&[]);
    assert!(ok && out.contains("no strait pins under"), "{out}");
}

/// Strict encryption, made visible: a new flow from a pod to a remote pod CIDR that has no
/// WireGuard peer is dropped with its own reason and event; a CIDR with a peer passes.
#[test]
fn strict_encryption_drops_show_as_flow_events() {
    require_privileges();
    let mut rig = PolicyRig::new(&[("10.2.1.7/32", ipc(3000, 2)), ("10.3.1.7/32", ipc(4000, 3))]);
    let mut guard = strait::datapath::guard::GuardWriter::new(
        rig.dp.take_map(names::MAP_ENCRYPT_GUARD).unwrap(),
    )
    .unwrap();
    assert_eq!(
        guard.sync(&[
            ("10.2.1.0/24".parse().unwrap(), true),
            ("10.3.1.0/24".parse().unwrap(), false),
        ]),
        0
    );
    rig.policy
        .set_endpoint(&EndpointSpec {
            ifindex: LO,
            address: "10.1.1.5".parse().unwrap(),
            identity: 1000,
            policy: EndpointPolicy::default(),
        })
        .unwrap();
    assert_eq!(
        rig.run(true, &frame(sa("10.1.1.5:40000"), sa("10.2.1.7:5432"), 6)),
        TC_ACT_OK,
        "a peer exists: the flow goes into the tunnel"
    );
    assert_eq!(
        rig.run(true, &frame(sa("10.1.1.5:40001"), sa("10.3.1.7:5432"), 6)),
        TC_ACT_SHOT,
        "no peer: never in clear"
    );
    let events = rig.events();
    let e = events
        .iter()
        .find(|e| e.verdict == VERDICT_DROPPED)
        .expect("a drop event");
    assert_eq!(e.reason, DropReason::NoEncryptionPeer as u8);
    assert_eq!(
        (e.src_identity, e.dst_identity, e.remote_cluster_id),
        (1000, 4000, 3)
    );
}

/// A full map is a clear, per-service error (and the rest keeps working), never silent loss.
#[test]
fn a_full_service_map_is_reported_per_service_and_the_rest_is_programmed() {
    require_privileges();
    let sizes = MapSizes {
        lb_services: 4,
        ..Default::default()
    };
    let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
    let mut lbw = LbWriter::new(
        dp.take_map(names::MAP_LB4_SERVICES).unwrap(),
        dp.take_map(names::MAP_LB4_BACKENDS).unwrap(),
        dp.take_map(names::MAP_LB4_REVNAT).unwrap(),
        sizes,
    )
    .unwrap();
    let backend = lb::BackendAddr {
        address: "10.1.0.11".parse().unwrap(),
        port: 8080,
        proto: 6,
        cluster_id: 1,
    };
    // Three services of two entries each (frontend + one slot) into a 4-entry map.
    let desired: BTreeMap<lb::Frontend, lb::DesiredService> = (1..=3u8)
        .map(|i| {
            (
                lb::Frontend {
                    address: Ipv4Addr::new(10, 96, 0, i),
                    port: 80,
                    proto: 6,
                },
                lb::DesiredService {
                    global: false,
                    active: vec![backend],
                    terminating: vec![],
                },
            )
        })
        .collect();
    let report = lbw.sync(&desired, true);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let (frontend, why) = &report.failed[0];
    assert_eq!(frontend.address, Ipv4Addr::new(10, 96, 0, 3));
    assert!(why.contains("LB4_SERVICES is full (4 entries)"), "{why}");
    // The services that fit are translated.
    for i in 1..=2u8 {
        let syn = frame(
            sa("10.1.0.99:40000"),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, i), 80),
            6,
        );
        let prog = dp.lb_test_program().unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&syn);
        assert_eq!(
            prog.test_run(opts).unwrap().return_value,
            XDP_TX,
            "service {i}"
        );
    }
}

/// A write that does not fit is counted with its map and operation, and retried: once room
/// exists the next sync programs it.
#[test]
fn a_failed_ipcache_write_is_counted_and_retried() {
    require_privileges();
    let sizes = MapSizes {
        ipcache: 2,
        ..Default::default()
    };
    let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
    let metrics = strait::metrics::Metrics::new();
    let mut writer = IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache)
        .unwrap()
        .with_metrics(&metrics);
    let desired = |prefixes: &[&str]| -> BTreeMap<Ipv4Net, IpcacheValue> {
        prefixes
            .iter()
            .map(|p| (p.parse().unwrap(), ipc(1000, 1)))
            .collect()
    };
    let errors = |metrics: &strait::metrics::Metrics| {
        let text = metrics.render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(r#"strait_datapath_map_errors_total{map="IPCACHE4",op="update"} "#)
            })
            .unwrap_or_else(|| panic!("{text}"))
            .to_owned()
    };
    let report = writer.sync(
        &desired(&["10.1.0.1/32", "10.1.0.2/32", "10.1.0.3/32"]),
        true,
    );
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(
        report.failed[0].1.contains("IPCACHE4 is full"),
        "{report:?}"
    );
    assert!(writer.pending());
    assert_eq!(errors(&metrics), "1");
    // One prefix leaves. Writes go before deletes, so the map is still full for this sync's
    // write (counted again); the delete makes room, and the next sync writes it.
    let want = desired(&["10.1.0.2/32", "10.1.0.3/32"]);
    let report = writer.sync(&want, true);
    assert_eq!((report.failed.len(), report.deletes), (1, 1), "{report:?}");
    assert_eq!(errors(&metrics), "2");
    let report = writer.sync(&want, true);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!((report.entries, report.writes), (2, 1));
    assert!(!writer.pending());
}
