//! Helpers for the datapath tests and benchmark: a client namespace whose processes live in a
//! test cgroup (the socket load balancer is attached there), a server namespace answering on
//! any number of backend addresses, crafted frames for `BPF_PROG_TEST_RUN`, and a throwaway
//! bpffs pin root.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{Netns, VethPair, ip};

/// Client and server namespaces joined by a veth; the client reaches `10.0.0.0/8` through
/// the server. Neither namespace has a route out of the machine.
pub struct LbTopology {
    pub client: Netns,
    pub server: Netns,
    pub veth: VethPair,
    servers: Vec<BackendServer>,
}

impl LbTopology {
    pub fn new() -> Self {
        let (client, server) = (Netns::new(), Netns::new());
        let veth = VethPair::new(&client, "198.18.20.1/24", &server, "198.18.20.2/24");
        ip(&[
            "-n",
            client.name(),
            "route",
            "add",
            "10.0.0.0/8",
            "via",
            "198.18.20.2",
        ]);
        Self {
            client,
            server,
            veth,
            servers: Vec::new(),
        }
    }

    /// Adds a backend address on the server's loopback, answering TCP and UDP on `port` with
    /// its own address.
    pub fn add_backend(&mut self, addr: Ipv4Addr, port: u16) {
        ip(&[
            "-n",
            self.server.name(),
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ]);
        let server = self
            .server
            .run(move || BackendServer::start(SocketAddrV4::new(addr, port)));
        self.servers.push(server);
    }
}

impl Default for LbTopology {
    fn default() -> Self {
        Self::new()
    }
}

/// TCP + UDP responders on one address; they answer with the address and stop on drop.
pub struct BackendServer {
    stop: Arc<AtomicBool>,
    /// Listener fd, shut down on drop to wake the blocking accept (without sending anything).
    listener_fd: std::os::fd::RawFd,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    /// Must run inside the server namespace (sockets belong to the creating thread's netns).
    pub fn start(addr: SocketAddrV4) -> Self {
        use std::os::fd::AsRawFd as _;
        let stop = Arc::new(AtomicBool::new(false));
        // Blocking accept: a polling loop would cap the connection rate the benchmark sees.
        let tcp = TcpListener::bind(addr).expect("binding a backend TCP listener");
        let listener_fd = tcp.as_raw_fd();
        let udp = UdpSocket::bind(addr).expect("binding a backend UDP socket");
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let answer = addr.to_string();
        let t = {
            let answer = answer.clone();
            std::thread::spawn(move || {
                while let Ok((mut s, _)) = tcp.accept() {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 3];
                    let _ = s.read_exact(&mut buf);
                    let _ = s.write_all(answer.as_bytes());
                }
            })
        };
        let u = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(answer.as_bytes(), from);
                    }
                }
            })
        };
        Self {
            stop,
            listener_fd,
            threads: vec![t, u],
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: the fd is the listener owned by the accept thread, alive until it returns;
        // shutdown makes the blocked accept fail so the thread ends.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The `sockprobe` binary of this package: next to the running binary (a bench) or one
/// directory up (a test in `deps/`). Cargo builds it for every integration test.
pub fn sockprobe_exe() -> PathBuf {
    package_exe("sockprobe")
}

/// `strait` built as this package's `strait-under-test` binary (see there).
pub fn strait_exe() -> PathBuf {
    package_exe("strait-under-test")
}

fn package_exe(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {name} binary near {}", exe.display()))
}

/// A bpffs directory of its own under /sys/fs/bpf, to pin into; removed with everything in it
/// on drop.
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    pub fn new() -> Self {
        let path =
            Path::new(strait::constants::BPFFS_ROOT).join(crate::unique_name("strait-test-"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One attempt of `sockprobe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The backend that answered, and the peer address the application saw.
    Ok {
        backend: String,
        peer: SocketAddr,
    },
    Err {
        errno: String,
        millis: u64,
    },
}

/// Runs `sockprobe` in `cgroup` + `netns`: `count` connections (or UDP exchanges) to `target`.
pub fn probe(cgroup: &Path, netns: &str, target: SocketAddr, count: u32, udp: bool) -> Vec<Probe> {
    let mut cmd = Command::new(sockprobe_exe());
    cmd.arg("--cgroup")
        .arg(cgroup)
        .args(["--netns", netns, "--target", &target.to_string()])
        .args(["--count", &count.to_string()]);
    if udp {
        cmd.arg("--udp");
    }
    let out = cmd.output().expect("running sockprobe");
    assert!(
        out.status.success(),
        "sockprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["OK", backend, peer] => Probe::Ok {
                    backend: (*backend).to_owned(),
                    peer: peer.parse().expect("peer address"),
                },
                ["ERR", errno, ms] => Probe::Err {
                    errno: (*errno).to_owned(),
                    millis: ms.parse().unwrap_or(0),
                },
                _ => panic!("unexpected sockprobe line {l:?}"),
            }
        })
        .collect()
}

/// An Ethernet + IPv4 + TCP SYN (or UDP) frame, checksums left zero (the programs under test
/// never look at them).
pub fn frame(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Vec<u8> {
    let l4_len = if proto == 6 { 20 } else { 8 };
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let l4 = &mut f[34..];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    if proto == 6 {
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    f
}

/// A TCP echo server on `addr` (inside the namespace of the calling thread); stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Must run inside the server's namespace.
    pub fn start(addr: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind(addr).expect("binding the echo server");
        listener.set_nonblocking(true).unwrap();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = listener.accept() {
                        let _ = s.set_nonblocking(false);
                        let stop = stop.clone();
                        conns.push(std::thread::spawn(move || echo(s, &stop)));
                    } else {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut s: std::net::TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node namespace with pods: each pod is a namespace with `eth0` (a /32 address, default
/// route on the link) whose peer `h<name>` sits in the node; the node routes each pod's /32
/// to its veth and answers ARP for the pods (proxy ARP), as a CNI would set it up. Nothing
/// routes out of the node namespace.
pub struct PodNode {
    pub node: Netns,
    pub pods: Vec<Pod>,
}

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Host-side interface name, in the node namespace.
    pub host_iface: String,
}

impl PodNode {
    pub fn new(pod_ips: &[Ipv4Addr]) -> Self {
        let node = Netns::new();
        node.sysctl("net/ipv4/ip_forward", "1");
        let mut pods = Vec::new();
        for ip_addr in pod_ips {
            let ns = Netns::new();
            ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
            let host_iface = crate::unique_name("h");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &host_iface,
                "netns",
                node.name(),
            ]);
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
            ip(&["-n", ns.name(), "route", "add", "default", "dev", "eth0"]);
            ip(&["-n", node.name(), "link", "set", &host_iface, "up"]);
            ip(&[
                "-n",
                node.name(),
                "route",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                &host_iface,
            ]);
            node.sysctl(&format!("net/ipv4/conf/{host_iface}/proxy_arp"), "1");
            // Proxy ARP answers after a random delay of up to 0.8 s by default.
            node.sysctl(&format!("net/ipv4/neigh/{host_iface}/proxy_delay"), "0");
            pods.push(Pod {
                ns,
                ip: *ip_addr,
                host_iface,
            });
        }
        Self { node, pods }
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP error message (`icmp_type`, `code`, the 4 bytes after the checksum) about a packet
/// from `src` to `dst` of protocol `proto`: its IPv4 header and first 8 bytes of L4, as a
/// router or host embeds them. Checksum filled in.
pub fn icmp_error(
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
) -> Vec<u8> {
    let about = frame(src, dst, proto);
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(&about[14..14 + 20 + 8]);
    let sum = inet_checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// An Ethernet + IPv4 frame carrying `payload` (for `BPF_PROG_TEST_RUN`): `frag` is the
/// flags + fragment offset field (host order), e.g. `0x2000` for a first fragment.
pub fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// Sends `msg` (a complete ICMP message) to `dst` through a raw socket of the calling
/// thread's namespace; the kernel adds the IPv4 header.
pub fn send_icmp(dst: Ipv4Addr, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and address for the given lengths.
    let sent = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let result = if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    result
}
