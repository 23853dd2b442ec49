//! strait-cni under a simulated runtime: the plugin binary executed with the CNI_* environment
//! and its configuration on stdin, in a node namespace with a real agent (etcd, datapath),
//! against real pod namespaces. Privileged: run through `cargo xtask test`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use strait_tests::{
    Netns,
    cni::{Call, Node, Outcome, UNDERLAY_MTU, exec, ip_in, ip_out, pod_args},
    require_privileges,
};

const CIDR: &str = "10.77.1.0/24";
const GATEWAY: &str = "10.77.1.1";

fn netns_path(ns: &Netns) -> PathBuf {
    Path::new(strait::constants::NETNS_RUN_DIR).join(ns.name())
}

fn call<'a>(command: &'a str, cid: &'a str, netns: Option<&'a Path>, pod: &str) -> Call<'a> {
    Call {
        command,
        container_id: cid,
        netns,
        ifname: "eth0",
        args: pod_args("shop", pod),
    }
}

fn with_prev(mut conf: Value, prev: &Value) -> Value {
    conf["prevResult"] = prev.clone();
    conf
}

/// Host-side veths the plugin made (named `lxc` + 12 hex digits) in the node namespace.
fn host_veths() -> Vec<String> {
    ip_out(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("lxc") || n.starts_with("tmp"))
        .collect()
}

/// Node routes into the pod CIDR.
fn pod_routes() -> Vec<String> {
    ip_out(&["-4", "route", "show"])
        .lines()
        .filter(|l| l.starts_with("10.77."))
        .map(|l| l.trim().to_owned())
        .collect()
}

fn assert_added(out: &Outcome) -> Value {
    assert!(
        out.success,
        "ADD failed: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.json()
}

#[test]
fn add_check_del_wire_a_policed_pod_and_remove_it_all() {
    require_privileges();
    let node = Node::start(CIDR, &["web"]);
    let pod = Netns::new();
    let path = netns_path(&pod);
    let conf = node.conf("1.1.0");

    let result = assert_added(&exec(&call("ADD", "ctr1", Some(&path), "web"), &conf));
    assert_eq!(result["cniVersion"], "1.1.0");
    let addr = result["ips"][0]["address"].as_str().unwrap().to_owned();
    let ip = addr.strip_suffix("/32").expect("a /32");
    let ipnet: ipnet::Ipv4Net = CIDR.parse().unwrap();
    assert!(
        ipnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{addr}"
    );
    assert_ne!(ip, GATEWAY, "the gateway is never a pod's");
    assert_eq!(result["ips"][0]["gateway"], GATEWAY);
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        path.display().to_string()
    );
    let host = result["interfaces"][0]["name"].as_str().unwrap().to_owned();

    // The pod side: /32, MTU from the WireGuard overhead, default route via the gateway.
    let link = ip_in(pod.name(), &["-o", "link", "show", "eth0"]);
    let want_mtu = UNDERLAY_MTU - strait::constants::WIREGUARD_MTU_OVERHEAD;
    assert!(link.contains(&format!("mtu {want_mtu} ")), "{link}");
    assert!(
        ip_in(pod.name(), &["-o", "-4", "addr", "show", "eth0"]).contains(&format!("inet {addr} "))
    );
    let routes = ip_in(pod.name(), &["-4", "route", "show"]);
    assert!(
        routes.contains(&format!("default via {GATEWAY} dev eth0")),
        "{routes}"
    );
    assert!(
        ip_in(pod.name(), &["-o", "link", "show", "lo"]).contains("UP"),
        "loopback up"
    );
    // The host side: the /32 route the agent looks for, through the host veth.
    let node_routes = pod_routes();
    assert_eq!(
        node_routes,
        [format!("{ip} dev {host} proto static scope link")],
        "{node_routes:?}"
    );
    assert_eq!(node.allocations(), [ip.to_owned()]);
    // The agent knew the endpoint before ADD returned: its policy program is on the veth.
    // (the agent's own status counts the endpoint as programmed in its maps).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt
        .block_on(strait::api::fetch_status(&node.socket()))
        .expect("agent status");
    assert_eq!(
        status.datapath.as_ref().map(|d| d.endpoints),
        Some(1),
        "{:?}",
        status.datapath
    );
    // Traffic flows: the pod reaches its gateway's host (the node's underlay address).
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.name(),
            "ping",
            "-c1",
            "-W5",
            strait_tests::cni::NODE_IP,
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "pod → node: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // CHECK passes on what ADD built, then fails after tampering.
    let check_conf = with_prev(conf.clone(), &result);
    let ok = exec(&call("CHECK", "ctr1", Some(&path), "web"), &check_conf);
    assert!(ok.success, "CHECK: {} {}", ok.stdout, ok.stderr);
    ip_in(pod.name(), &["link", "set", "eth0", "mtu", "1500"]);
    let bad = exec(&call("CHECK", "ctr1", Some(&path), "web"), &check_conf);
    assert_eq!(bad.error_code(), 101, "{}", bad.stdout);
    assert!(
        bad.json()["msg"].as_str().unwrap().contains("MTU"),
        "{}",
        bad.stdout
    );
    ip_in(
        pod.name(),
        &["link", "set", "eth0", "mtu", &want_mtu.to_string()],
    );
    assert!(exec(&call("CHECK", "ctr1", Some(&path), "web"), &check_conf).success);
    ip_out(&["route", "del", &format!("{ip}/32")]);
    let bad = exec(&call("CHECK", "ctr1", Some(&path), "web"), &check_conf);
    assert_eq!(bad.error_code(), 101, "{}", bad.stdout);
    assert!(exec(&call("CHECK", "ctr1", None, "web"), &check_conf).error_code() == 4);
    let no_prev = exec(&call("CHECK", "ctr1", Some(&path), "web"), &conf);
    assert_eq!(no_prev.error_code(), 7, "{}", no_prev.stdout);

    // DEL frees everything, and again, and without a netns.
    for netns in [Some(path.as_path()), Some(path.as_path()), None] {
        let del = exec(
            &call("DEL", "ctr1", netns, "web"),
            &with_prev(conf.clone(), &result),
        );
        assert!(del.success, "DEL: {} {}", del.stdout, del.stderr);
        assert!(
            del.stdout.trim().is_empty(),
            "DEL prints nothing: {}",
            del.stdout
        );
    }
    assert!(host_veths().is_empty(), "{:?}", host_veths());
    assert!(pod_routes().is_empty(), "{:?}", pod_routes());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(!ip_in(pod.name(), &["-o", "link", "show"]).contains("eth0"));
    // DEL of a container never added, and of a removed netns, succeed too.
    assert!(exec(&call("DEL", "never", Some(&path), "web"), &conf).success);
    let gone = PathBuf::from("/var/run/netns/strait-cni-gone");
    assert!(exec(&call("DEL", "ctr1", Some(&gone), "web"), &conf).success);
}

#[test]
fn bad_input_gives_spec_errors_and_leaves_nothing_behind() {
    require_privileges();
    // A /30: one pod address besides the gateway.
    let node = Node::start("10.77.2.0/30", &["web", "api"]);
    let pod = Netns::new();
    let path = netns_path(&pod);
    let conf = node.conf("1.0.0");
    let nothing_left = |what: &str| {
        assert!(host_veths().is_empty(), "{what}: {:?}", host_veths());
        assert!(
            node.allocations().is_empty(),
            "{what}: {:?}",
            node.allocations()
        );
        assert!(pod_routes().is_empty(), "{what}: {:?}", pod_routes());
        assert!(
            !ip_in(pod.name(), &["-o", "link", "show"]).contains("eth0"),
            "{what}: eth0 left in the pod"
        );
    };

    // VERSION.
    let v = exec(
        &call("VERSION", "", None, "web"),
        &json!({"cniVersion": "1.1.0"}),
    );
    assert!(v.success);
    assert_eq!(v.json()["supportedVersions"], json!(["1.0.0", "1.1.0"]));

    // Unknown version.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.2.0");
    let e = exec(&call("ADD", "c1", Some(&path), "web"), &old);
    assert_eq!(e.error_code(), 1, "{}", e.stdout);
    assert_eq!(e.json()["cniVersion"], "0.2.0");
    nothing_left("unknown version");

    // Missing netns (unset, and a path that does not exist).
    assert_eq!(exec(&call("ADD", "c1", None, "web"), &conf).error_code(), 4);
    let gone = PathBuf::from("/var/run/netns/strait-cni-missing");
    let e = exec(&call("ADD", "c1", Some(&gone), "web"), &conf);
    assert_eq!(e.error_code(), 4, "{}", e.stdout);
    assert!(e.json()["details"].as_str().unwrap().contains("CNI_NETNS"));
    nothing_left("missing netns");

    // Bad environment: container id, interface name, pod identity.
    let mut c = call("ADD", "-bad", Some(&path), "web");
    assert_eq!(exec(&c, &conf).error_code(), 4);
    c.container_id = "c1";
    c.ifname = "a/b";
    assert_eq!(exec(&c, &conf).error_code(), 4);
    c.ifname = "eth0";
    c.args = "IgnoreUnknown=1".into();
    assert_eq!(exec(&c, &conf).error_code(), 4);
    assert_eq!(
        exec(&call("FROB", "c1", Some(&path), "web"), &conf).error_code(),
        4
    );
    // Undecodable config.
    let e = exec(
        &call("ADD", "c1", Some(&path), "web"),
        &json!("not an object"),
    );
    assert_eq!(e.error_code(), 6, "{}", e.stdout);
    nothing_left("bad environment");

    // Agent unreachable: try again later, nothing behind; STATUS says not ready.
    let mut away = conf.clone();
    away["agentSocket"] = json!(node.dir.path().join("nobody.sock"));
    let e = exec(&call("ADD", "c1", Some(&path), "web"), &away);
    assert_eq!(e.error_code(), 11, "{}", e.stdout);
    assert!(e.json()["msg"].as_str().unwrap().contains("unreachable"));
    nothing_left("agent unreachable");
    let mut away11 = away.clone();
    away11["cniVersion"] = json!("1.1.0");
    assert_eq!(
        exec(&call("STATUS", "", None, ""), &away11).error_code(),
        50
    );
    assert!(exec(&call("STATUS", "", None, ""), &node.conf("1.1.0")).success);

    // Exhausted pool: the one address taken, the second pod gets code 100.
    let first = assert_added(&exec(&call("ADD", "c1", Some(&path), "web"), &conf));
    let pod2 = Netns::new();
    let path2 = netns_path(&pod2);
    let e = exec(&call("ADD", "c2", Some(&path2), "api"), &conf);
    assert_eq!(e.error_code(), 100, "{}", e.stdout);
    assert_eq!(host_veths().len(), 1, "{:?}", host_veths());
    assert!(!ip_in(pod2.name(), &["-o", "link", "show"]).contains("eth0"));
    // The same interface added twice into one pod: refused, the first one untouched.
    let e = exec(&call("ADD", "c3", Some(&path), "web"), &{
        let mut c = conf.clone();
        c["podCIDR"] = json!("10.77.3.0/24");
        c
    });
    assert!(!e.success, "{}", e.stdout);
    e.error_code();
    assert!(
        exec(
            &call("CHECK", "c1", Some(&path), "web"),
            &with_prev(conf.clone(), &first)
        )
        .success
    );
    assert!(exec(&call("DEL", "c1", Some(&path), "web"), &conf).success);
    nothing_left("after DEL");
}

#[test]
fn hundred_add_del_cycles_leave_no_veth_address_or_file() {
    require_privileges();
    let node = Node::start(CIDR, &["churn"]);
    let pod = Netns::new();
    let path = netns_path(&pod);
    let conf = node.conf("1.1.0");
    let started = std::time::Instant::now();
    for i in 0..100 {
        let cid = format!("churn{i}");
        let r = assert_added(&exec(&call("ADD", &cid, Some(&path), "churn"), &conf));
        let del = exec(
            &call("DEL", &cid, Some(&path), "churn"),
            &with_prev(conf.clone(), &r),
        );
        assert!(del.success, "DEL {i}: {}", del.stdout);
    }
    eprintln!("100 ADD/DEL cycles in {:?}", started.elapsed());
    assert!(host_veths().is_empty(), "{:?}", host_veths());
    assert!(pod_routes().is_empty(), "{:?}", pod_routes());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    let left = ip_in(pod.name(), &["-o", "addr", "show"]);
    assert!(!left.contains("10.77."), "{left}");
    let files: Vec<String> = std::fs::read_dir(node.data_dir().join("strait"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut files = files;
    files.sort();
    assert_eq!(
        files,
        ["last_reserved_ip", "lock"],
        "only the store's own files"
    );
}

#[test]
fn gc_releases_what_is_not_valid_and_keeps_the_rest() {
    require_privileges();
    let node = Node::start(CIDR, &["keep", "stale"]);
    let (a, b) = (Netns::new(), Netns::new());
    let (pa, pb) = (netns_path(&a), netns_path(&b));
    let conf = node.conf("1.1.0");
    let kept = assert_added(&exec(&call("ADD", "keep1", Some(&pa), "keep"), &conf));
    assert_added(&exec(&call("ADD", "stale1", Some(&pb), "stale"), &conf));
    assert_eq!(host_veths().len(), 2);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep1", "ifname": "eth0"}]);
    let out = exec(&call("GC", "", None, ""), &gc);
    assert!(out.success, "GC: {} {}", out.stdout, out.stderr);
    let kept_ip = kept["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32");
    assert_eq!(node.allocations(), [kept_ip.to_owned()]);
    assert_eq!(
        host_veths(),
        [kept["interfaces"][0]["name"].as_str().unwrap()]
    );
    assert!(!ip_in(b.name(), &["-o", "link", "show"]).contains("eth0"));
    assert!(
        exec(
            &call("CHECK", "keep1", Some(&pa), "keep"),
            &with_prev(conf.clone(), &kept)
        )
        .success
    );
    // Nothing valid: everything goes.
    gc["cni.dev/valid-attachments"] = json!([]);
    assert!(exec(&call("GC", "", None, ""), &gc).success);
    assert!(host_veths().is_empty() && node.allocations().is_empty());
}

/// Accepts one TCP connection in `ns` on `addr`, echoes a line, and returns the peer address.
fn tcp_echo_once(ns: &Netns, addr: &str) -> std::thread::JoinHandle<std::net::SocketAddr> {
    use std::io::{BufRead as _, Write as _};
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns, addr) = (ns.name().to_owned(), addr.to_owned());
    let h = std::thread::spawn(move || {
        let _in = strait::netns::NetnsGuard::enter(&ns).unwrap();
        let l = std::net::TcpListener::bind(&addr).unwrap();
        tx.send(()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(line.as_bytes()).unwrap();
        peer
    });
    rx.recv().unwrap();
    h
}

/// From `ns`: connects to `addr`, sends a line, returns the echo (`Err` if no reply came).
fn tcp_hello(ns: &Netns, addr: &str) -> Result<String, String> {
    use std::io::{BufRead as _, Write as _};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let timeout = std::time::Duration::from_secs(5);
        let s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).unwrap();
        (&s).write_all(b"hello\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line)
    })
}

/// Receives one UDP datagram in `ns` on `addr` and returns its source.
fn udp_recv_once(ns: &Netns, addr: &str) -> std::thread::JoinHandle<std::net::SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns, addr) = (ns.name().to_owned(), addr.to_owned());
    let h = std::thread::spawn(move || {
        let _in = strait::netns::NetnsGuard::enter(&ns).unwrap();
        let s = std::net::UdpSocket::bind(&addr).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).unwrap().1
    });
    rx.recv().unwrap();
    h
}

fn udp_send(ns: &Netns, addr: &str) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"hi", addr).unwrap();
    });
}

#[test]
fn masquerade_snats_egress_only_outside_the_mesh() {
    require_privileges();
    // 192.168.78.0/24 sits beyond the node, like the internet, but is configured exempt.
    let node = Node::start_with(
        CIDR,
        &["client", "server"],
        "masquerade: {enabled: true, nonMasqueradeCIDRs: [192.168.78.0/24]}\n",
    );
    ip_in(
        node.outside.name(),
        &["addr", "add", "192.168.78.1/32", "dev", &node.outside_if],
    );
    ip_out(&[
        "route",
        "add",
        "192.168.78.0/24",
        "via",
        strait_tests::cni::OUTSIDE_IP,
    ]);
    let (client, server) = (Netns::new(), Netns::new());
    let conf = node.conf("1.1.0");
    let c = assert_added(&exec(
        &call("ADD", "cli", Some(&netns_path(&client)), "client"),
        &conf,
    ));
    let s = assert_added(&exec(
        &call("ADD", "srv", Some(&netns_path(&server)), "server"),
        &conf,
    ));
    let ip_of = |r: &Value| {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_owned()
    };
    let (client_ip, server_ip) = (ip_of(&c), ip_of(&s));
    // The rules are applied asynchronously by the agent: wait for the table.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::process::Command::new("nft")
        .args(["list", "table", "ip", "strait_nat"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no masquerade table:\n{}",
            node.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // To the outside: the source is the node, and the reply comes back.
    let seen = tcp_echo_once(&node.outside, "192.168.77.254:7070");
    assert_eq!(
        tcp_hello(&client, "192.168.77.254:7070").as_deref(),
        Ok("hello\n")
    );
    let peer = seen.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        strait_tests::cni::NODE_IP,
        "egress is SNATed to the node"
    );

    // To a configured non-masquerade CIDR: the pod's own address.
    let seen = udp_recv_once(&node.outside, "192.168.78.1:7071");
    udp_send(&client, "192.168.78.1:7071");
    assert_eq!(seen.join().unwrap().ip().to_string(), client_ip);

    // Pod to pod: never masqueraded.
    let seen = tcp_echo_once(&server, &format!("{server_ip}:7072"));
    assert_eq!(
        tcp_hello(&client, &format!("{server_ip}:7072")).as_deref(),
        Ok("hello\n")
    );
    assert_eq!(seen.join().unwrap().ip().to_string(), client_ip);

    for (cid, ns) in [("cli", &client), ("srv", &server)] {
        assert!(exec(&call("DEL", cid, Some(&netns_path(ns)), "x"), &conf).success);
    }
}
