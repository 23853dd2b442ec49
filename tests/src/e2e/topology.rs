//! The machine's network: the router and underlay, member (node and control-plane)
//! namespaces, pod namespaces with their veths, cgroups and servers.

use std::{net::SocketAddrV4, path::PathBuf, process::Command};

use anyhow::{Context as _, ensure};
use strait::netns::NetnsGuard;

use super::{
    layout::{DB_PORT, ECHO_PORT, LEDGER_PORT, NODES, PAYMENT_PORT, PODS, underlay_ip},
    mesh::Mesh,
    resources::Server,
};
use crate::datapath::{BackendServer, EchoServer};

impl Mesh {
    fn add_netns(&self, name: &str) -> anyhow::Result<()> {
        run_ip(&["netns", "add", name])?;
        self.res().netns.push(name.to_owned());
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        // No IPv6: every packet on the underlay is one of ours.
        sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(())
    }

    /// A cgroup, recorded for removal.
    pub(super) fn add_cgroup(&self, path: PathBuf) -> anyhow::Result<()> {
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        self.res().cgroups.push(path);
        Ok(())
    }

    /// A member namespace on the underlay: `198.18.L.2/24` on `eth0`, the router's end named
    /// after the member.
    pub(super) fn add_member(&self, member: &str, link: u8) -> anyhow::Result<()> {
        let ns = self.ns(member);
        self.add_netns(&ns)?;
        let router = self.router();
        add_eth0(&ns, &format!("{}/24", underlay_ip(link)), member, &router)?;
        run_ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("198.18.{link}.1/24"),
            "dev",
            member,
        ])?;
        run_ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{link}.1"),
        ])?;
        Ok(())
    }

    pub(super) fn underlay(&self) -> anyhow::Result<()> {
        self.progress("underlay: router namespace, nodes and control planes on 198.18.0.0/15");
        let router = self.router();
        self.add_netns(&router)?;
        sysctl(&router, "net.ipv4.ip_forward", "1")?;
        for n in &NODES {
            self.add_member(n.name, n.link)?;
            let ns = self.ns(n.name);
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            self.add_cgroup(self.cgroup_root.join(n.name))?;
            std::fs::create_dir_all(self.node_dir(n.name).join("state"))?;
        }
        Ok(())
    }

    /// Pod namespaces, veths and cgroups, and the servers inside them.
    pub(super) fn pods(&self) -> anyhow::Result<()> {
        self.progress(&format!(
            "pods: {} namespaces behind their nodes, one cgroup each",
            PODS.len()
        ));
        for p in &PODS {
            let ns = self.ns(p.name);
            self.add_netns(&ns)?;
            let node_ns = self.ns(p.node);
            let host_if = format!("lxc{}", p.name.replace('-', ""));
            add_eth0(&ns, &format!("{}/32", p.ip), &host_if, &node_ns)?;
            run_ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
            run_ip(&[
                "-n",
                &node_ns,
                "route",
                "add",
                &format!("{}/32", p.ip),
                "dev",
                &host_if,
            ])?;
            sysctl(&node_ns, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
            sysctl(
                &node_ns,
                &format!("net.ipv4.neigh.{host_if}.proxy_delay"),
                "0",
            )?;
            self.add_cgroup(self.pod_cgroup(p))?;
            let (ip, app) = (p.ip, p.app);
            let servers: Vec<Server> = in_netns(&ns, move || match app {
                "payment-api" => vec![
                    Server::Backend(BackendServer::start(SocketAddrV4::new(ip, PAYMENT_PORT))),
                    Server::Backend(BackendServer::start(SocketAddrV4::new(ip, LEDGER_PORT))),
                    Server::Echo(EchoServer::start(SocketAddrV4::new(ip, ECHO_PORT))),
                ],
                "database" => vec![Server::Backend(BackendServer::start(SocketAddrV4::new(
                    ip, DB_PORT,
                )))],
                _ => Vec::new(),
            })?;
            self.res().servers.extend(servers);
        }
        Ok(())
    }
}

/// A veth pair, both ends up: `eth0` with `addr` in `ns`, `peer` in `peer_ns`.
fn add_eth0(ns: &str, addr: &str, peer: &str, peer_ns: &str) -> anyhow::Result<()> {
    run_ip(&[
        "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])?;
    run_ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
    run_ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    run_ip(&["-n", peer_ns, "link", "set", peer, "up"])?;
    Ok(())
}

pub(super) fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
        .arg(format!("{key}={value}"))
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl {key}={value} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns`.
pub(super) fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<T> {
        let _inside = NetnsGuard::enter(&ns).with_context(|| format!("entering {ns}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
}
