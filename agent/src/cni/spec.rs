//! The CNI contract (spec 1.0 and 1.1): the environment a runtime sets, the configuration it
//! writes on stdin, the results and the error object the plugin prints on stdout.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Versions this plugin speaks; results echo the caller's `cniVersion`.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// Spec error codes (0–99 reserved by the spec, ≥ 100 ours).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const BAD_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_READY: u32 = 50;
    /// The pod CIDR has no free address.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// CHECK found the attachment differing from what ADD set up.
    pub const CHECK_FAILED: u32 = 101;
    /// Creating the pod's interfaces, addresses or routes failed.
    pub const NETLINK: u32 = 102;
    /// The agent answered, but refused or did not finish the endpoint in time.
    pub const AGENT_REFUSED: u32 = 103;
}

/// A spec error: printed as `{"cniVersion","code","msg","details"}` with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// How pod traffic leaves the node, for the pod MTU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    #[default]
    Wireguard,
    None,
}

/// One still-valid attachment in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin object of the conflist as the runtime passes it (with `cniVersion` and `name`
/// copied in). Unknown keys (`runtimeConfig`, `args`, `capabilities`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The node's pod CIDR: pod addresses come from it, its first address is the gateway.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    /// Pod MTU; unset or 0: the underlay MTU less the encryption overhead.
    pub mtu: Option<u32>,
    #[serde(default)]
    pub encryption: Encryption,
    /// Interface whose MTU is the underlay's; unset: the one the default route uses.
    pub underlay_interface: Option<String>,
    /// The agent's API socket.
    pub agent_socket: Option<PathBuf>,
    /// Seconds ADD waits for the agent to report the endpoint ready.
    pub agent_timeout_seconds: Option<u64>,
    /// Where address allocations are kept.
    pub data_dir: Option<PathBuf>,
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Only the version, for VERSION (whose input may be nothing but that).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionOnly {
    #[serde(default)]
    pub cni_version: String,
}

/// What ADD printed, as CHECK reads it back from `prevResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

/// The runtime's environment for one call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS").map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS").map(|a| parse_args(&a)).unwrap_or_default(),
        }
    }

    /// CNI_CONTAINERID, checked against the spec's pattern.
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| bad_env("CNI_CONTAINERID", "is not set"))?;
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(bad_env(
                "CNI_CONTAINERID",
                &format!("{id:?} must start alphanumeric and hold only alphanumerics, _ . -"),
            ));
        }
        Ok(id)
    }

    /// CNI_IFNAME, checked to be a usable Linux interface name.
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| bad_env("CNI_IFNAME", "is not set"))?;
        if name.len() > 15
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(bad_env(
                "CNI_IFNAME",
                &format!("{name:?} is not a valid interface name"),
            ));
        }
        Ok(name)
    }

    pub fn netns(&self) -> Result<&std::path::Path, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| bad_env("CNI_NETNS", "is not set"))
    }

    /// The pod's namespace and name from CNI_ARGS (as kubelet's runtime passes them).
    pub fn pod(&self) -> Result<(&str, &str), CniError> {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Ok((ns, name)),
            _ => Err(bad_env(
                "CNI_ARGS",
                "needs K8S_POD_NAMESPACE and K8S_POD_NAME (the agent finds the pod's labels by them)",
            )),
        }
    }
}

fn bad_env(var: &str, what: &str) -> CniError {
    CniError::new(code::BAD_ENV, format!("{var} {what}"), var)
}

/// `K=V;K=V` (entries without `=` are ignored).
pub fn parse_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Checks the caller's version against what we speak.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {version:?}"),
            format!("strait-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// Decodes the config on stdin.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    check_version(&conf.cni_version)?;
    if let Some(mtu) = conf.mtu
        && mtu != 0
        && !(576..=65535).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is out of range"),
            "mtu must be 0 (automatic) or 576..=65535",
        ));
    }
    Ok(conf)
}

/// The host-side veth name for an attachment: `lxc` + 12 hex digits of a stable hash, so
/// DEL and GC find it again without state (IFNAMSIZ allows 15 characters).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!("lxc{:012x}", fnv1a(container_id, ifname) & 0xffff_ffff_ffff)
}

/// Temporary name of the pod-side end until it is inside the pod's namespace.
pub fn temp_ifname(container_id: &str, ifname: &str) -> String {
    format!("tmp{:012x}", fnv1a(container_id, ifname) & 0xffff_ffff_ffff)
}

/// FNV-1a 64 (stable across builds, unlike std's hasher).
fn fnv1a(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_follow_the_spec_pattern() {
        let env = |id: &str| Env {
            container_id: Some(id.into()),
            ..Env::default()
        };
        assert!(env("abc-1.2_3").container_id().is_ok());
        for bad in ["-abc", "a b", "a/b", "ä"] {
            let e = env(bad).container_id().unwrap_err();
            assert_eq!(e.code, code::BAD_ENV, "{bad}");
            assert_eq!(e.details, "CNI_CONTAINERID");
        }
        assert_eq!(
            Env::default().container_id().unwrap_err().code,
            code::BAD_ENV
        );
    }

    #[test]
    fn unknown_versions_are_refused_with_code_1() {
        let e =
            parse_conf(br#"{"cniVersion":"0.2.0","name":"n","type":"strait-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = parse_conf(b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"strait-cni","podCIDR":"10.1.1.0/24","runtimeConfig":{},"args":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(c.pod_cidr, Some("10.1.1.0/24".parse().unwrap()));
        assert_eq!(c.encryption, Encryption::Wireguard);
    }

    #[test]
    fn cni_args_give_the_pod() {
        let env = Env {
            args: parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;junk"),
            ..Env::default()
        };
        assert_eq!(env.pod().unwrap(), ("shop", "web-1"));
        assert_eq!(Env::default().pod().unwrap_err().details, "CNI_ARGS");
    }

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname("c1", "eth0");
        assert_eq!(a, host_ifname("c1", "eth0"));
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_ifname("c1", "eth1"));
        assert_ne!(a, host_ifname("c2", "eth0"));
    }
}
