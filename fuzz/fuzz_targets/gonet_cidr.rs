//! Go's `net` wire forms inside Cilium's JSON (`gonet.rs`): `net.IP` strings, base64
//! `net.IPMask`s, `*cidr.CIDR` objects or strings, `[]*cidr.CIDR` lists.
//! Input: a JSON object with any of the fields below.
#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use strait::wire::gonet::{self, IpMask, go_cidr, go_cidr_list, go_ip};
use strait::wire::json;
use strait_fuzz::round_trip;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct GoNet {
    #[serde(rename = "IP", default, with = "go_ip")]
    ip: Option<IpAddr>,
    #[serde(rename = "Mask", default)]
    mask: Option<IpMask>,
    #[serde(rename = "CIDR", default, with = "go_cidr")]
    cidr: Option<IpNet>,
    #[serde(rename = "CIDRs", default, with = "go_cidr_list")]
    cidrs: Vec<IpNet>,
}

fn check_mask(mask: &IpMask) {
    let (ones, bits) = mask.go_size();
    if let Some(n) = mask.ones() {
        assert_eq!(u32::from(n), ones);
        assert_eq!(bits as usize, mask.0.len() * 8);
        if matches!(mask.0.len(), 4 | 16) {
            // A canonical mask is the one its prefix length builds.
            assert_eq!(&IpMask::from_prefix_len(n, mask.0.len() == 4), mask);
        }
    } else {
        assert_eq!((ones, bits), (0, 0));
    }
    for ip in ["10.0.0.1", "fd00::1"] {
        let ip: IpAddr = ip.parse().expect("a valid address");
        if let Some(len) = mask.prefix_len_for(ip) {
            let _ = IpNet::new(ip, len);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gonet::parse_go_ip(text);
    }
    let Ok(v) = json::from_json::<GoNet>(data, "fuzz") else {
        return;
    };
    if let Some(mask) = &v.mask {
        check_mask(mask);
    }
    for net in v.cidr.iter().chain(&v.cidrs) {
        check_mask(&IpMask::from_ipnet(net));
        assert_eq!(IpMask::from_ipnet(net).ones(), Some(net.prefix_len()));
    }
    round_trip(
        &v,
        |v| json::to_go_json(v, "fuzz"),
        |b| json::from_json(b, "fuzz"),
    );
});
