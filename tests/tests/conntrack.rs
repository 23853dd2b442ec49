//! Conntrack follows policy: an established flow is checked again when its endpoint's
//! policy narrows, ICMP errors about a known flow pass with it (path MTU discovery through a
//! smaller MTU), and later fragments of a known flow's datagrams pass while those of denied
//! or unseen datagrams do not. Real packets between pod namespaces on a node namespace, plus
//! crafted frames through `BPF_PROG_TEST_RUN` for what a pod cannot send on purpose.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::Ipv4Net;
use strait::{
    datapath::{
        Datapath, MapSizes,
        flows::drop_counts,
        ipcache::IpcacheWriter,
        policy::{EndpointSpec, PolicyWriter},
    },
    netns::NetnsGuard,
    policy::{Direction, EndpointPolicy, PolicyEntry},
};
use strait_common::{flow::DropReason, ipcache::IpcacheValue, names};
use strait_tests::{
    datapath::{EchoServer, PodNode, icmp_error, ipv4_frame, send_icmp},
    ip, require_privileges,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// `BPF_PROG_TEST_RUN` runs tc programs on loopback: the endpoint's ifindex is 1.
const LO: u32 = 1;
/// How long a packet that should arrive may take (a bound, not a measurement).
const ARRIVAL: Duration = Duration::from_secs(5);

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn allow(identity: u32, protocol: u8, port: u16) -> PolicyEntry {
    PolicyEntry {
        identity,
        direction: Direction::Ingress,
        protocol,
        port,
        deny: false,
    }
}

fn ingress(entries: &[PolicyEntry]) -> EndpointPolicy {
    EndpointPolicy {
        ingress_enforced: true,
        entries: entries.iter().copied().collect::<BTreeSet<_>>(),
        ..Default::default()
    }
}

/// The agent's part on a pod node: datapath loaded (unpinned), ipcache programmed (pod `i`
/// has identity `identities[i]`), programs attached to every pod's host-side veth.
struct Agent {
    _dp: Datapath,
    policy: PolicyWriter,
    ifindex: Vec<u32>,
    identities: Vec<u32>,
    addresses: Vec<Ipv4Addr>,
    drops: aya::maps::Map,
}

impl Agent {
    fn start(node: &PodNode, identities: &[u32]) -> Self {
        let sizes = MapSizes::default();
        let _in_node = NetnsGuard::enter(node.node.name()).unwrap();
        let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
        let mut ipc =
            IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache).unwrap();
        let desired: BTreeMap<Ipv4Net, IpcacheValue> = node
            .pods
            .iter()
            .zip(identities)
            .map(|(p, id)| {
                let value = IpcacheValue {
                    identity: *id,
                    cluster_id: 1,
                    ..Default::default()
                };
                (Ipv4Net::new(p.ip, 32).unwrap(), value)
            })
            .collect();
        assert!(ipc.sync(&desired, true).failed.is_empty());
        let policy = PolicyWriter::new(
            dp.take_map(names::MAP_ENDPOINTS).unwrap(),
            dp.take_map(names::MAP_POLICY).unwrap(),
            sizes.endpoints,
            sizes.policy,
        )
        .unwrap();
        let drops = dp.take_map(names::MAP_DROP_COUNTERS).unwrap();
        let mut ifindex = Vec::new();
        for pod in &node.pods {
            dp.attach_endpoint(&pod.host_iface).unwrap();
            ifindex.push(strait::datapath::loader::ifindex(&pod.host_iface).unwrap());
        }
        Self {
            _dp: dp,
            policy,
            ifindex,
            identities: identities.to_vec(),
            addresses: node.pods.iter().map(|p| p.ip).collect(),
            drops,
        }
    }

    fn set(&mut self, pod: usize, policy: EndpointPolicy) {
        self.policy
            .set_endpoint(&EndpointSpec {
                ifindex: self.ifindex[pod],
                address: self.addresses[pod],
                identity: self.identities[pod],
                policy,
            })
            .unwrap();
    }

    fn revision(&self, pod: usize) -> u32 {
        self.policy.revision(self.ifindex[pod]).unwrap()
    }

    fn drops(&self, reason: DropReason) -> u64 {
        drop_counts(&self.drops)
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }
}

fn roundtrip(s: &mut TcpStream, what: &str) -> std::io::Result<()> {
    s.write_all(what.as_bytes())?;
    let mut buf = vec![0u8; what.len()];
    s.read_exact(&mut buf)?;
    assert_eq!(buf, what.as_bytes());
    Ok(())
}

/// db (3000) admits front (1000) and other (2000) on TCP 5432; both hold a connection. A
/// widening change leaves the revision and both flows alone; then the policy drops other:
/// other's established connection stops at its next packet, front's keeps working.
#[test]
fn established_flows_are_checked_again_when_the_policy_narrows() {
    require_privileges();
    let ips: Vec<Ipv4Addr> = ["10.9.3.5", "10.9.3.6", "10.9.3.7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let node = PodNode::new(&ips);
    let _server = node.pods[2]
        .ns
        .run(|| EchoServer::start(sa("10.9.3.7:5432")));
    let mut agent = Agent::start(&node, &[1000, 2000, 3000]);
    agent.set(2, ingress(&[allow(1000, 6, 5432), allow(2000, 6, 5432)]));
    let connect = |pod: usize| {
        node.pods[pod].ns.run(|| {
            let s = TcpStream::connect_timeout(
                &"10.9.3.7:5432".parse().unwrap(),
                Duration::from_millis(700),
            )?;
            s.set_read_timeout(Some(ARRIVAL))?;
            Ok::<_, std::io::Error>(s)
        })
    };
    let mut front = connect(0).expect("front is allowed");
    let mut other = connect(1).expect("other is allowed");
    roundtrip(&mut front, "front 1").unwrap();
    roundtrip(&mut other, "other 1").unwrap();

    let before = agent.revision(2);
    agent.set(
        2,
        ingress(&[
            allow(1000, 6, 5432),
            allow(2000, 6, 5432),
            allow(4000, 6, 5432),
        ]),
    );
    assert_eq!(
        agent.revision(2),
        before,
        "a widening does not make flows be checked again"
    );
    roundtrip(&mut other, "other 2").unwrap();

    agent.set(2, ingress(&[allow(1000, 6, 5432), allow(4000, 6, 5432)]));
    assert_ne!(agent.revision(2), before, "a narrowing moves the revision");
    // The first packet after the change meets the new policy; its retransmissions too.
    other
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let r = roundtrip(&mut other, "other 3");
    assert!(
        r.as_ref()
            .is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "other's established flow is denied after the change: {r:?}"
    );
    roundtrip(&mut front, "front 2").expect("front's flow is still allowed");
    assert!(connect(1).is_err(), "and other cannot connect again");
    assert!(agent.drops(DropReason::PolicyDenied) > 0);
}

/// Reads `IP_MTU` (the path MTU the kernel holds for a connected socket's destination).
fn path_mtu(s: &UdpSocket) -> i32 {
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the given size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    mtu
}

fn dont_fragment(s: &UdpSocket) {
    let v: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: valid option value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
}

/// front's ingress is enforced and admits nothing. The node's link to db has MTU 1280: a
/// 1400-byte datagram front sends with DF makes the node answer "fragmentation needed", which
/// reaches front (its path MTU drops to 1280). A port unreachable forged by other about a
/// flow front never sent is dropped; one about a flow front did send passes.
#[test]
fn icmp_errors_about_known_flows_reach_the_pod_and_unrelated_ones_do_not() {
    require_privileges();
    let ips: Vec<Ipv4Addr> = ["10.9.4.5", "10.9.4.6", "10.9.4.7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let node = PodNode::new(&ips);
    let n = node.node.name();
    // The node's own address, which its ICMP errors come from.
    ip(&["-n", n, "addr", "add", "10.9.254.1/32", "dev", "lo"]);
    ip(&[
        "-n",
        n,
        "link",
        "set",
        &node.pods[2].host_iface,
        "mtu",
        "1280",
    ]);
    // db listens (and never answers) on 6002: no error of its own about that port.
    let _sink = node.pods[2]
        .ns
        .run(|| UdpSocket::bind("10.9.4.7:6002").unwrap());
    let mut agent = Agent::start(&node, &[1000, 2000, 3000]);
    agent.set(0, ingress(&[]));
    let front_socket = |to: &'static str| {
        node.pods[0].ns.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(to).unwrap();
            s
        })
    };

    let pmtu = front_socket("10.9.4.7:6002");
    dont_fragment(&pmtu);
    assert_eq!(path_mtu(&pmtu), 1500);
    pmtu.send(&[0u8; 1400]).unwrap();
    let deadline = Instant::now() + ARRIVAL;
    while path_mtu(&pmtu) == 1500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        path_mtu(&pmtu),
        1280,
        "fragmentation needed from the node reaches front"
    );

    let unrelated = front_socket("10.9.4.7:7000");
    let related = front_socket("10.9.4.7:6002");
    related.send(b"x").unwrap();
    let local = |s: &UdpSocket| match s.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        a => panic!("{a}"),
    };
    let forged = |s: &UdpSocket, to: &str| {
        icmp_error(3, 3, [0; 4], local(s), sa(to), libc::IPPROTO_UDP as u8)
    };
    let (first, second) = (
        forged(&unrelated, "10.9.4.7:7000"),
        forged(&related, "10.9.4.7:6002"),
    );
    node.pods[1].ns.run(move || {
        send_icmp("10.9.4.5".parse().unwrap(), &first).unwrap();
        send_icmp("10.9.4.5".parse().unwrap(), &second).unwrap();
    });
    related.set_read_timeout(Some(ARRIVAL)).unwrap();
    let r = related.recv(&mut [0u8; 16]);
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "the port unreachable about front's flow reaches front: {r:?}"
    );
    // Sent first, on the same path: had it passed, it would have arrived already.
    assert!(
        unrelated.take_error().unwrap().is_none(),
        "the unrelated port unreachable is dropped"
    );
}

/// db (3000) admits front (1000) on UDP 5432, not other (2000). A 3000-byte datagram from
/// front crosses in fragments and arrives whole; other's does not (its later fragments are
/// dropped for want of an allowed first fragment), and front's next datagram is the next
/// one db reads.
#[test]
fn fragments_of_allowed_datagrams_pass_and_of_denied_ones_do_not() {
    require_privileges();
    let ips: Vec<Ipv4Addr> = ["10.9.5.5", "10.9.5.6", "10.9.5.7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let node = PodNode::new(&ips);
    let db = node.pods[2]
        .ns
        .run(|| UdpSocket::bind("10.9.5.7:5432").unwrap());
    db.set_read_timeout(Some(ARRIVAL)).unwrap();
    let mut agent = Agent::start(&node, &[1000, 2000, 3000]);
    agent.set(2, ingress(&[allow(1000, 17, 5432)]));
    let send = |pod: usize, payload: Vec<u8>| {
        node.pods[pod].ns.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&payload, "10.9.5.7:5432").unwrap();
        })
    };
    let mut buf = vec![0u8; 4000];

    send(0, vec![1u8; 3000]);
    let (len, from) = db.recv_from(&mut buf).expect("front's datagram arrives");
    assert_eq!((len, from.ip()), (3000, std::net::IpAddr::V4(ips[0])));
    assert!(buf[..len].iter().all(|b| *b == 1));

    let frag_drops = agent.drops(DropReason::FragNotFound);
    send(1, vec![2u8; 3000]);
    send(0, b"after".to_vec());
    let (len, from) = db
        .recv_from(&mut buf)
        .expect("front's next datagram arrives");
    assert_eq!(
        (&buf[..len], from.ip()),
        (&b"after"[..], std::net::IpAddr::V4(ips[0])),
        "other's fragmented datagram never arrived"
    );
    assert!(
        agent.drops(DropReason::FragNotFound) > frag_drops,
        "other's later fragments were dropped as fragments of an unknown datagram"
    );
}

/// The same rules on crafted frames: fragments need their own datagram's allowed first
/// fragment (same source, id), and ICMP errors need a known flow at this endpoint.
#[test]
fn fragments_and_icmp_errors_by_test_run() {
    require_privileges();
    let sizes = MapSizes::default();
    let mut dp = Datapath::load(None, &sizes).expect("loading the datapath");
    let mut ipc =
        IpcacheWriter::new(dp.take_map(names::MAP_IPCACHE).unwrap(), sizes.ipcache).unwrap();
    let entry = |identity| IpcacheValue {
        identity,
        cluster_id: 1,
        ..Default::default()
    };
    let desired: BTreeMap<Ipv4Net, IpcacheValue> = [
        ("10.1.0.5/32".parse().unwrap(), entry(1000)),
        ("10.1.0.6/32".parse().unwrap(), entry(2000)),
    ]
    .into();
    assert!(ipc.sync(&desired, true).failed.is_empty());
    let mut policy = PolicyWriter::new(
        dp.take_map(names::MAP_ENDPOINTS).unwrap(),
        dp.take_map(names::MAP_POLICY).unwrap(),
        sizes.endpoints,
        sizes.policy,
    )
    .unwrap();
    let mut p = ingress(&[allow(1000, 17, 5432)]);
    p.egress_enforced = true;
    policy
        .set_endpoint(&EndpointSpec {
            ifindex: LO,
            address: "10.2.0.7".parse().unwrap(),
            identity: 3000,
            policy: p,
        })
        .unwrap();
    let mut run = |from_pod: bool, f: &[u8]| {
        let prog = dp.policy_program(from_pod).unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    };
    let (front, other, db): (Ipv4Addr, Ipv4Addr, Ipv4Addr) = (
        "10.1.0.5".parse().unwrap(),
        "10.1.0.6".parse().unwrap(),
        "10.2.0.7".parse().unwrap(),
    );
    // UDP header + payload of a first fragment.
    let udp = |sport: u16, dport: u16| {
        let mut h = vec![0u8; 8 + 64];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h
    };
    let body = [0u8; 64];
    const MF: u16 = 0x2000;

    assert_eq!(
        run(false, &ipv4_frame(front, db, 17, 7, 9, &body)),
        TC_ACT_SHOT,
        "a later fragment without a first one"
    );
    assert_eq!(
        run(false, &ipv4_frame(front, db, 17, 7, MF, &udp(40000, 5432))),
        TC_ACT_OK,
        "an allowed first fragment"
    );
    for (what, frag) in [("middle", MF | 9), ("last", 18)] {
        assert_eq!(
            run(false, &ipv4_frame(front, db, 17, 7, frag, &body)),
            TC_ACT_OK,
            "the {what} fragment of the allowed datagram"
        );
    }
    assert_eq!(
        run(false, &ipv4_frame(front, db, 17, 8, 9, &body)),
        TC_ACT_SHOT,
        "a fragment of another datagram (id) of the same source"
    );
    assert_eq!(
        run(false, &ipv4_frame(other, db, 17, 7, 9, &body)),
        TC_ACT_SHOT,
        "a fragment with the allowed datagram's id from another source"
    );
    assert_eq!(
        run(false, &ipv4_frame(other, db, 17, 9, MF, &udp(40001, 5432))),
        TC_ACT_SHOT,
        "a denied first fragment"
    );
    assert_eq!(
        run(false, &ipv4_frame(other, db, 17, 9, 9, &body)),
        TC_ACT_SHOT,
        "the denied datagram's later fragment"
    );

    // The reply direction (egress, enforced with no rule): errors about front's flow pass.
    let frag_needed =
        |from: &str, to: &str| icmp_error(3, 4, [0, 0, 0x05, 0x00], sa(from), sa(to), 17);
    assert_eq!(
        run(
            true,
            &ipv4_frame(
                db,
                front,
                1,
                1,
                0,
                &frag_needed("10.1.0.5:40000", "10.2.0.7:5432")
            )
        ),
        TC_ACT_OK,
        "db's error about front's allowed flow"
    );
    assert_eq!(
        run(
            true,
            &ipv4_frame(
                db,
                front,
                1,
                2,
                0,
                &frag_needed("10.1.0.5:40002", "10.2.0.7:5432")
            )
        ),
        TC_ACT_SHOT,
        "an error about a flow conntrack has not seen"
    );
    assert_eq!(
        run(
            true,
            &ipv4_frame(
                db,
                other,
                1,
                3,
                0,
                &frag_needed("10.1.0.6:40001", "10.2.0.7:5432")
            )
        ),
        TC_ACT_SHOT,
        "an error about a denied flow"
    );
    // And towards the pod: an error from a router about the reply leg of front's flow.
    let router: Ipv4Addr = "192.0.2.1".parse().unwrap();
    assert_eq!(
        run(
            false,
            &ipv4_frame(
                router,
                db,
                1,
                4,
                0,
                &frag_needed("10.2.0.7:5432", "10.1.0.5:40000")
            )
        ),
        TC_ACT_OK,
        "a router's error about db's reply to front"
    );
    assert_eq!(
        run(
            false,
            &ipv4_frame(
                router,
                db,
                1,
                5,
                0,
                &frag_needed("10.2.0.7:5432", "10.1.0.6:40001")
            )
        ),
        TC_ACT_SHOT,
        "a router's error about a packet to the denied peer"
    );
}
