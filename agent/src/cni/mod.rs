//! `strait-cni`, the CNI plugin (spec 1.0 and 1.1: ADD, DEL, CHECK, VERSION, STATUS, GC).
//! The runtime runs it in the host's network namespace with the CNI_* environment and the
//! network configuration on stdin. ADD allocates an address from the node's pod CIDR
//! (`ipam`), wires a veth (`net`), and returns only once the agent reports the pod's
//! endpoint ready (identity allocated, policy attached), so no pod runs unpoliced. Every
//! failure undoes what the call did and prints a spec error object on stdout.
//!
//! The conflist a runtime reads (e.g. `/etc/cni/net.d/05-strait.conflist`):
//!
//! ```json
//! {"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "strait",
//!  "plugins": [{"type": "strait-cni", "podCIDR": "10.1.1.0/24",
//!               "encryption": "wireguard", "mtu": 0,
//!               "agentSocket": "/var/run/strait/strait.sock",
//!               "dataDir": "/var/lib/cni/strait"}]}
//! ```
//!
//! Only `podCIDR` is required; `mtu` 0 or unset means the underlay MTU (`underlayInterface`,
//! else the default route's interface) less 80 bytes for WireGuard (`encryption: none`: 0).

use std::{
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net};

pub mod ipam;
pub mod net;
pub mod spec;

use self::{
    ipam::Store,
    net::PodSide,
    spec::{AddResult, CniError, Env, Interface, IpConfig, NetConf, Route, code},
};
use crate::{api, constants};

/// Runs one plugin call as the process's runtime asked; returns the exit code.
pub fn main() -> std::process::ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        return fail(
            "1.0.0",
            &CniError::new(code::IO, "cannot read stdin", e.to_string()),
        );
    }
    let version = serde_json::from_slice::<spec::VersionOnly>(&stdin)
        .map(|v| v.cni_version)
        .unwrap_or_default();
    let echo = if version.is_empty() {
        "1.0.0".to_owned()
    } else {
        version
    };
    match run(&env, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&echo, &e),
    }
}

fn fail(version: &str, e: &CniError) -> std::process::ExitCode {
    // libcni parses stdout for the error; stderr is for the runtime's log.
    println!("{}", e.to_json(version));
    eprintln!("strait-cni: {e}");
    std::process::ExitCode::FAILURE
}

/// One call; `Some(json)` is printed on success.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    if env.command == "VERSION" {
        let v: spec::VersionOnly = serde_json::from_slice(stdin).unwrap_or(spec::VersionOnly {
            cni_version: String::new(),
        });
        return Ok(Some(serde_json::json!({
            "cniVersion": if v.cni_version.is_empty() { "1.1.0" } else { &v.cni_version },
            "supportedVersions": spec::SUPPORTED_VERSIONS,
        })));
    }
    let conf = spec::parse_conf(stdin)?;
    let plugin = Plugin::new(&conf)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO, "cannot start a runtime", e.to_string()))?;
    match env.command.as_str() {
        "ADD" => rt.block_on(plugin.add(env)).map(Some),
        "DEL" => rt.block_on(plugin.del(env)).map(|()| None),
        "CHECK" => rt.block_on(plugin.check(env)).map(|()| None),
        "STATUS" => rt.block_on(plugin.status()).map(|()| None),
        "GC" => rt.block_on(plugin.gc()).map(|()| None),
        "" => Err(CniError::new(
            code::BAD_ENV,
            "CNI_COMMAND is not set",
            "CNI_COMMAND",
        )),
        other => Err(CniError::new(
            code::BAD_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "CNI_COMMAND",
        )),
    }
}

struct Plugin<'a> {
    conf: &'a NetConf,
    store: Store,
    socket: PathBuf,
}

fn cni_io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::IO, what.to_string(), e.to_string())
}

impl<'a> Plugin<'a> {
    fn new(conf: &'a NetConf) -> Result<Self, CniError> {
        let pool = conf.pod_cidr.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "the configuration has no podCIDR (the node's pod CIDR)",
                "podCIDR",
            )
        })?;
        if pool.prefix_len() > 30 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("podCIDR {pool} leaves no room for pods"),
                "podCIDR",
            ));
        }
        if conf.name.is_empty() || conf.name.contains('/') || conf.name.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network name {:?} is not usable", conf.name),
                "name",
            ));
        }
        let data_dir = conf
            .data_dir
            .clone()
            .unwrap_or_else(|| constants::CNI_DATA_DIR.into());
        Ok(Self {
            conf,
            store: Store::new(&data_dir, &conf.name, pool),
            socket: conf
                .agent_socket
                .clone()
                .unwrap_or_else(|| constants::DEFAULT_API_SOCKET.into()),
        })
    }

    fn agent_timeout(&self) -> Duration {
        self.conf
            .agent_timeout_seconds
            .map_or(constants::CNI_AGENT_TIMEOUT, Duration::from_secs)
    }

    /// The pod MTU: configured, or the underlay's less the encryption overhead.
    async fn pod_mtu(&self) -> Result<u32, CniError> {
        if let Some(mtu) = self.conf.mtu.filter(|m| *m != 0) {
            return Ok(mtu);
        }
        let underlay = net::with_handle(|h| async move {
            net::underlay_mtu(&h, self.conf.underlay_interface.as_deref()).await
        })
        .await?
        .unwrap_or(constants::CNI_FALLBACK_UNDERLAY_MTU);
        let overhead = match self.conf.encryption {
            spec::Encryption::Wireguard => constants::WIREGUARD_MTU_OVERHEAD,
            spec::Encryption::None => 0,
        };
        Ok(underlay.saturating_sub(overhead).max(576))
    }

    async fn add(&self, env: &Env) -> Result<serde_json::Value, CniError> {
        let cid = env.container_id()?;
        let ifname = env.ifname()?;
        let netns_path = env.netns()?;
        let (namespace, pod) = env.pod()?;
        let netns = net::open_netns(netns_path).map_err(|e| {
            CniError::new(
                code::BAD_ENV,
                format!("CNI_NETNS {} cannot be opened", netns_path.display()),
                format!("CNI_NETNS: {e}"),
            )
        })?;
        let mtu = self.pod_mtu().await?;
        let ip = self.store.lock()?.allocate(cid, ifname)?;
        let host = spec::host_ifname(cid, ifname);
        match self
            .wire(env, &netns, ip, &host, mtu, (namespace, pod))
            .await
        {
            Ok(result) => Ok(result),
            Err(e) => {
                // Leave nothing behind: the veth (both ends) and the address.
                self.undo(cid, ifname, &host).await;
                Err(e)
            }
        }
    }

    async fn wire(
        &self,
        env: &Env,
        netns: &std::fs::File,
        ip: Ipv4Addr,
        host: &str,
        mtu: u32,
        (namespace, pod): (&str, &str),
    ) -> Result<serde_json::Value, CniError> {
        let cid = env.container_id()?;
        let ifname = env.ifname()?;
        let temp = spec::temp_ifname(cid, ifname);
        let gateway = self.store.gateway();
        // An earlier ADD that died half-way may have left the host side.
        let (host_index, host_mac) = net::with_handle(|h| async move {
            net::delete_link(&h, host).await?;
            net::delete_link(&h, &temp).await?;
            let created = net::create_veth(&h, host, &temp, mtu, netns).await?;
            net::add_host_route(&h, ip, created.0).await?;
            Ok(created)
        })
        .await?;
        enable_forwarding()?;
        let side = PodSide {
            temp_name: &spec::temp_ifname(cid, ifname),
            ifname,
            ip,
            gateway,
            gateway_mac: &host_mac,
            mtu,
        };
        let pod_mac = net::in_netns(
            netns,
            |h| async move { net::configure_pod(&h, &side).await },
        )?;
        let identity = self
            .endpoint_add(cid, namespace, pod, ip, host, host_index)
            .await?;
        eprintln!(
            "strait-cni: {namespace}/{pod} {ip} on {host} (ifindex {host_index}), identity {identity}, mtu {mtu}"
        );
        let result = AddResult {
            cni_version: self.conf.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: host.to_owned(),
                    mac: net::mac_string(&host_mac),
                    sandbox: String::new(),
                },
                Interface {
                    name: ifname.to_owned(),
                    mac: net::mac_string(&pod_mac),
                    sandbox: env.netns()?.display().to_string(),
                },
            ],
            ips: vec![IpConfig {
                address: Ipv4Net::new(ip, 32).expect("32 is a valid prefix"),
                gateway: Some(gateway),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: Ipv4Net::default(),
                gw: Some(gateway),
            }],
            dns: Default::default(),
        };
        serde_json::to_value(&result).map_err(|e| cni_io("encoding the result", e))
    }

    async fn endpoint_add(
        &self,
        cid: &str,
        namespace: &str,
        pod: &str,
        ip: Ipv4Addr,
        host: &str,
        host_index: u32,
    ) -> Result<u32, CniError> {
        let req = api::pb::EndpointAddRequest {
            container_id: cid.to_owned(),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            ip: ip.to_string(),
            host_interface: host.to_owned(),
            host_ifindex: host_index,
        };
        match tokio::time::timeout(self.agent_timeout(), api::endpoint_add(&self.socket, req)).await
        {
            Ok(Ok(identity)) => Ok(identity),
            Ok(Err(e @ api::ApiError::Connect { .. })) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the strait agent is unreachable on {}",
                    self.socket.display()
                ),
                e.to_string(),
            )),
            Ok(Err(e)) => Err(CniError::new(
                code::AGENT_REFUSED,
                format!("the strait agent did not accept {namespace}/{pod}"),
                e.to_string(),
            )),
            Err(_) => Err(CniError::new(
                code::AGENT_REFUSED,
                format!(
                    "the strait agent did not report {namespace}/{pod} ready within {:?}",
                    self.agent_timeout()
                ),
                "identity not allocated or policy not attached yet",
            )),
        }
    }

    /// Removes the attachment's host veth (the pod end goes with it), its address and the
    /// agent's record. Errors are only logged: DEL and rollback must not stop half-way.
    async fn undo(&self, cid: &str, ifname: &str, host: &str) {
        let temp = spec::temp_ifname(cid, ifname);
        if let Err(e) = net::with_handle(|h| async move {
            net::delete_link(&h, host).await?;
            net::delete_link(&h, &temp).await
        })
        .await
        {
            eprintln!("strait-cni: removing {host}: {e}");
        }
        if let Err(e) = self.store.lock().and_then(|l| l.release(cid, ifname)) {
            eprintln!("strait-cni: releasing the address of {cid}/{ifname}: {e}");
        }
        self.notify_gone(cid).await;
    }

    /// Tells the agent the attachment is gone. Never fails the call: the agent also drops
    /// the endpoint when the pod object goes.
    async fn notify_gone(&self, cid: &str) {
        let req = api::pb::EndpointDeleteRequest {
            container_id: cid.to_owned(),
        };
        match tokio::time::timeout(
            self.agent_timeout(),
            api::endpoint_delete(&self.socket, req),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("strait-cni: telling the agent {cid} is gone: {e}"),
            Err(_) => eprintln!("strait-cni: telling the agent {cid} is gone: timed out"),
        }
    }

    async fn del(&self, env: &Env) -> Result<(), CniError> {
        let cid = env.container_id()?;
        let ifname = env.ifname()?;
        // The netns and prevResult may be gone or absent: everything is keyed by container.
        let host = spec::host_ifname(cid, ifname);
        let netns = env.netns.as_deref().and_then(|p| net::open_netns(p).ok());
        if let Some(netns) = &netns {
            // The pod end, should the host end be gone already.
            net::in_netns(netns, |h| async move { net::delete_link(&h, ifname).await })?;
        }
        let temp = spec::temp_ifname(cid, ifname);
        net::with_handle(|h| async move {
            net::delete_link(&h, &host).await?;
            net::delete_link(&h, &temp).await
        })
        .await?;
        self.store.lock()?.release(cid, ifname)?;
        self.notify_gone(cid).await;
        Ok(())
    }

    async fn check(&self, env: &Env) -> Result<(), CniError> {
        let cid = env.container_id()?;
        let ifname = env.ifname()?;
        let netns_path = env.netns()?;
        let prev: AddResult = self
            .conf
            .prev_result
            .clone()
            .ok_or_else(|| {
                CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult", "prevResult")
            })
            .and_then(|v| {
                serde_json::from_value(v).map_err(|e| {
                    CniError::new(code::DECODE, "cannot decode prevResult", e.to_string())
                })
            })?;
        let failed = |what: String| CniError::new(code::CHECK_FAILED, what, cid.to_owned());
        let ip = prev
            .ips
            .first()
            .map(|c| c.address)
            .ok_or_else(|| failed("prevResult has no address".into()))?;
        let gateway = self.store.gateway();
        let alloc = self.store.lock()?.find(cid, ifname)?;
        if alloc.as_ref().map(|a| a.ip) != Some(ip.addr()) {
            return Err(failed(format!(
                "{ip} is not allocated to {cid}/{ifname} (allocation: {:?})",
                alloc.map(|a| a.ip)
            )));
        }
        let mtu = self.pod_mtu().await?;
        let host = spec::host_ifname(cid, ifname);
        let host_link = net::with_handle(|h| async move {
            let l = net::link(&h, &host)
                .await?
                .ok_or_else(|| failed(format!("host veth {host} is missing")))?;
            if !net::is_up(&l) {
                return Err(failed(format!("host veth {host} is down")));
            }
            let index = l.header.index;
            let want = IpNet::V4(Ipv4Net::new(ip.addr(), 32).expect("valid"));
            if !net::routes(&h)
                .await?
                .iter()
                .any(|r| r.dst == want && r.oif == Some(index))
            {
                return Err(failed(format!("no host route {want} via {host}")));
            }
            Ok(l)
        })
        .await?;
        let netns = net::open_netns(netns_path).map_err(|e| {
            CniError::new(
                code::BAD_ENV,
                format!("CNI_NETNS {} cannot be opened", netns_path.display()),
                format!("CNI_NETNS: {e}"),
            )
        })?;
        let host_mac = net::mac(&host_link);
        net::in_netns(&netns, |h| async move {
            let l = net::link(&h, ifname)
                .await?
                .ok_or_else(|| failed(format!("{ifname} is missing in the container")))?;
            let index = l.header.index;
            if !net::is_up(&l) {
                return Err(failed(format!("{ifname} is down")));
            }
            if net::mtu(&l) != Some(mtu) {
                return Err(failed(format!(
                    "{ifname} has MTU {:?}, want {mtu}",
                    net::mtu(&l)
                )));
            }
            let addrs = net::addresses(&h, index).await?;
            if addrs != [ip] {
                return Err(failed(format!("{ifname} has {addrs:?}, want [{ip}]")));
            }
            let routes = net::routes(&h).await?;
            let default = IpNet::V4(Ipv4Net::default());
            if !routes
                .iter()
                .any(|r| r.dst == default && r.gateway == Some(gateway) && r.oif == Some(index))
            {
                return Err(failed(format!(
                    "no default route via {gateway} on {ifname}"
                )));
            }
            if net::permanent_neighbour(&h, index, gateway).await? != Some(host_mac.clone()) {
                return Err(failed(format!(
                    "the gateway {gateway} does not resolve to the host veth"
                )));
            }
            Ok(())
        })
    }

    /// Ready for ADD: the store is usable and the agent answers.
    async fn status(&self) -> Result<(), CniError> {
        self.store.lock().map_err(|e| {
            CniError::new(
                code::NOT_READY,
                "the address store is unusable",
                e.to_string(),
            )
        })?;
        match tokio::time::timeout(self.agent_timeout(), api::fetch_status(&self.socket)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CniError::new(
                code::NOT_READY,
                format!(
                    "the strait agent is unreachable on {}",
                    self.socket.display()
                ),
                e.to_string(),
            )),
            Err(_) => Err(CniError::new(
                code::NOT_READY,
                "the strait agent does not answer",
                self.socket.display().to_string(),
            )),
        }
    }

    /// Releases every attachment not listed as valid: its host veth and its address.
    async fn gc(&self) -> Result<(), CniError> {
        let valid = self.conf.valid_attachments.clone().unwrap_or_default();
        let stale = self.store.lock()?.stale(&valid)?;
        for a in stale {
            let host = spec::host_ifname(&a.container_id, &a.ifname);
            let temp = spec::temp_ifname(&a.container_id, &a.ifname);
            net::with_handle(|h| async move {
                net::delete_link(&h, &host).await?;
                net::delete_link(&h, &temp).await
            })
            .await?;
            self.store.lock()?.release_allocation(&a)?;
            self.notify_gone(&a.container_id).await;
            eprintln!(
                "strait-cni: GC released {} of {}/{}",
                a.ip, a.container_id, a.ifname
            );
        }
        Ok(())
    }
}

/// Pods' traffic is routed by the host: forwarding must be on in its namespace.
fn enable_forwarding() -> Result<(), CniError> {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => std::fs::write(path, "1").map_err(|e| cni_io("enabling IPv4 forwarding", e)),
    }
}
