//! Test client for the socket load balancer: joins a cgroup and a network namespace (so the
//! cgroup programs under test see its sockets), then connects or sends to a service address
//! and prints one line per attempt:
//!   `OK <what the server answered> <peer address as the app sees it>`
//!   `ERR <errno name> <elapsed ms>`
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// cgroup v2 directory to join before opening any socket.
    #[arg(long)]
    cgroup: PathBuf,
    /// Named network namespace to enter.
    #[arg(long)]
    netns: String,
    /// Service address (VIP:port).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// UDP (unconnected sendto/recvfrom) instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Print one line at the end instead: `SUMMARY <ok> <errors> <elapsed µs>`.
    #[arg(long)]
    summary: bool,
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
        _ => format!("{e}").replace(' ', "_"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::write(
        args.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )?;
    let _ns = strait::netns::NetnsGuard::enter(&args.netns)?;
    let timeout = Duration::from_secs(2);
    let mut out = std::io::stdout().lock();
    let (mut ok, mut failed, began) = (0u32, 0u32, Instant::now());
    for _ in 0..args.count {
        let start = Instant::now();
        let result = if args.udp {
            (|| {
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                sock.set_read_timeout(Some(timeout))?;
                sock.send_to(b"who", args.target)?;
                let mut buf = [0u8; 64];
                let (n, from) = sock.recv_from(&mut buf)?;
                Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
            })()
        } else {
            (|| {
                let mut s = TcpStream::connect_timeout(&args.target, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                s.write_all(b"who")?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok((reply, s.peer_addr()?))
            })()
        };
        match result {
            Ok(_) if args.summary => ok += 1,
            Err(_) if args.summary => failed += 1,
            Ok((reply, peer)) => writeln!(out, "OK {reply} {peer}")?,
            Err(e) => writeln!(
                out,
                "ERR {} {}",
                errno_name(&e),
                start.elapsed().as_millis()
            )?,
        }
    }
    if args.summary {
        writeln!(out, "SUMMARY {ok} {failed} {}", began.elapsed().as_micros())?;
    }
    Ok(())
}
