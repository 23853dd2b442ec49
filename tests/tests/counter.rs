//! The packet-counter classifier, end to end: real packets through a veth in a test namespace,
//! and crafted packets through BPF_PROG_TEST_RUN.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use strait::datapath::PacketCounterProgram;
use strait_common::{Direction, ETH_HDR_LEN, PacketClass};
use strait_tests::{Netns, VethPair, require_privileges};

const TC_ACT_OK: u32 = 0;
const IPV4_HDR: u64 = 20;
const UDP_HDR: u64 = 8;

#[test]
fn counts_real_packets_on_a_veth_in_a_namespace() {
    require_privileges();
    let (client, server) = (Netns::new(), Netns::new());
    // No IPv6 chatter: every UDP/TCP packet on the wire is one we sent.
    for ns in [&client, &server] {
        ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
    }
    let veth = VethPair::new(&client, "198.18.10.1/30", &server, "198.18.10.2/30");

    let mut counter = PacketCounterProgram::load().expect("loading the counter programs");
    {
        let _inside = strait::netns::NetnsGuard::enter(client.name()).expect("entering client ns");
        counter
            .attach(&veth.a)
            .expect("attaching to the client's veth");
    }

    // 10 UDP datagrams client -> server, 4 back; the server must receive all 10.
    const PAYLOAD: &[u8] = b"strait counter test";
    let server_sock = server.run(|| UdpSocket::bind("198.18.10.2:7000").expect("bind server"));
    server_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let client_sock = client.run(|| UdpSocket::bind("198.18.10.1:7001").expect("bind client"));
    client_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..10 {
        client_sock.send_to(PAYLOAD, "198.18.10.2:7000").unwrap();
    }
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        let (n, _) = server_sock
            .recv_from(&mut buf)
            .expect("server receives every datagram");
        assert_eq!(&buf[..n], PAYLOAD);
    }
    for _ in 0..4 {
        server_sock.send_to(PAYLOAD, "198.18.10.1:7001").unwrap();
        client_sock
            .recv_from(&mut buf)
            .expect("client receives every reply");
    }

    // One TCP exchange.
    let listener = server.run(|| TcpListener::bind("198.18.10.2:7002").expect("bind tcp"));
    let mut stream = client.run(|| TcpStream::connect("198.18.10.2:7002").expect("tcp connect"));
    let (mut accepted, _) = listener.accept().unwrap();
    stream.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop((stream, accepted));

    let snap = counter.snapshot().expect("reading counters");
    let udp_len = ETH_HDR_LEN as u64 + IPV4_HDR + UDP_HDR + PAYLOAD.len() as u64;
    let egress_udp = snap.row(Direction::Egress, PacketClass::Udp).unwrap();
    assert_eq!(egress_udp.packets, 10, "{snap}");
    assert_eq!(egress_udp.bytes, 10 * udp_len, "{snap}");
    let ingress_udp = snap.row(Direction::Ingress, PacketClass::Udp).unwrap();
    assert_eq!(ingress_udp.packets, 4, "{snap}");
    assert_eq!(ingress_udp.bytes, 4 * udp_len, "{snap}");
    // Handshake + data + close in both directions: at least 3 segments each way.
    assert!(
        snap.packets(Direction::Egress, PacketClass::Tcp) >= 3,
        "{snap}"
    );
    assert!(
        snap.packets(Direction::Ingress, PacketClass::Tcp) >= 3,
        "{snap}"
    );
    assert_eq!(
        snap.packets(Direction::Egress, PacketClass::Icmp),
        0,
        "{snap}"
    );
}

/// Ethernet + IPv4 + TCP SYN, 54 bytes.
fn tcp_syn_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    f.extend_from_slice(&[
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
    ]);
    f.extend_from_slice(&[
        0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f
}

#[test]
fn test_run_counts_crafted_packets_and_passes_them() {
    require_privileges();
    let mut counter = PacketCounterProgram::load().expect("loading the counter programs");

    let syn = tcp_syn_frame();
    let mut udp = syn.clone();
    udp[ETH_HDR_LEN + 9] = 17;
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);

    let cases: [(&[u8], Direction, u32); 3] = [
        (&syn, Direction::Ingress, 3),
        (&udp, Direction::Egress, 2),
        (&arp, Direction::Ingress, 1),
    ];
    for (frame, direction, repeat) in cases {
        let program = counter.program_mut(direction).unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            result.return_value, TC_ACT_OK,
            "counting must never drop a packet"
        );
    }

    let snap = counter.snapshot().unwrap();
    let len = syn.len() as u64;
    let tcp = snap.row(Direction::Ingress, PacketClass::Tcp).unwrap();
    assert_eq!((tcp.packets, tcp.bytes), (3, 3 * len), "{snap}");
    let udp = snap.row(Direction::Egress, PacketClass::Udp).unwrap();
    assert_eq!((udp.packets, udp.bytes), (2, 2 * len), "{snap}");
    assert_eq!(
        snap.packets(Direction::Ingress, PacketClass::Other),
        1,
        "{snap}"
    );
    assert_eq!(
        snap.packets(Direction::Egress, PacketClass::Tcp),
        0,
        "{snap}"
    );
    assert_eq!(
        snap.packets(Direction::Ingress, PacketClass::Udp),
        0,
        "{snap}"
    );
}
