//! Wire forms of Go's `net` types as Cilium's JSON carries them:
//!
//! * `net.IP`: its text form, `""` when unset (we also accept `null`) → `Option<IpAddr>`.
//! * `net.IPMask`: a `[]byte`, so base64 or `null` → [`IpMask`].
//! * Cilium's legacy `*cidr.CIDR` (an embedded `*net.IPNet`): `{"IP":"10.1.0.0","Mask":"////AA=="}`
//!   or `null`; newer readers also accept the string form `"10.1.0.0/24"`, which we accept too
//!   but never emit (Cilium plans to switch only from v1.22) → `Option<IpNet>`.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

/// Parses an IP the way Go's `net.IP.UnmarshalText` does: empty means unset. IPv4-mapped IPv6
/// addresses become IPv4 because Go prints them that way, so re-encoding stays identical.
pub fn parse_go_ip(s: &str) -> Result<Option<IpAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<IpAddr>()
        .map(|ip| Some(ip.to_canonical()))
        .map_err(|_| format!("invalid IP address {s:?}"))
}

/// A Go `net.IPMask`: raw bytes, base64 on the wire. Kept raw so re-encoding is exact even for
/// the odd 16-byte mask on an IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct IpMask(pub Vec<u8>);

impl IpMask {
    /// The mask of a prefix length: 4 bytes for IPv4, 16 for IPv6 (as `net.CIDRMask` builds it).
    pub fn from_prefix_len(len: u8, ipv4: bool) -> IpMask {
        let bytes = if ipv4 { 4 } else { 16 };
        let mut ones = u32::from(len).min(bytes * 8);
        let mut out = Vec::with_capacity(bytes as usize);
        for _ in 0..bytes {
            let n = ones.min(8);
            // 0xff << (8 - n) for n in 0..=8, computed in u16 so n = 0 does not overflow.
            out.push(((0xff00u16 >> n) & 0xff) as u8);
            ones -= n;
        }
        IpMask(out)
    }

    /// The mask of `net`'s prefix, in `net`'s family.
    pub fn from_ipnet(net: &IpNet) -> IpMask {
        IpMask::from_prefix_len(net.prefix_len(), matches!(net, IpNet::V4(_)))
    }

    /// Number of leading one bits when the mask is canonical (ones then zeros), else `None`.
    pub fn ones(&self) -> Option<u8> {
        let mut ones: u32 = 0;
        let mut seen_zero = false;
        for &b in &self.0 {
            if seen_zero {
                if b != 0 {
                    return None;
                }
                continue;
            }
            let lead = b.leading_ones();
            // A byte must be ones-then-zeros, e.g. 0b1110_0000.
            if b.checked_shl(lead).unwrap_or(0) != 0 {
                return None;
            }
            ones += lead;
            if lead < 8 {
                seen_zero = true;
            }
        }
        u8::try_from(ones).ok()
    }

    /// Go's `IPMask.Size()`: `(ones, bits)`, or `(0, 0)` for a non-canonical mask.
    pub fn go_size(&self) -> (u32, u32) {
        match self.ones() {
            Some(ones) => (u32::from(ones), (self.0.len() * 8) as u32),
            None => (0, 0),
        }
    }

    /// Prefix length of `ip` under this mask, following Go's `IPNet` rules: an IPv4 address
    /// accepts a 4-byte mask or the last 4 bytes of a 16-byte one; IPv6 needs 16 bytes.
    pub fn prefix_len_for(&self, ip: IpAddr) -> Option<u8> {
        let m = match (ip, self.0.len()) {
            (IpAddr::V4(_), 4) | (IpAddr::V6(_), 16) => self.clone(),
            (IpAddr::V4(_), 16) => IpMask(self.0[12..].to_vec()),
            _ => return None,
        };
        m.ones()
    }
}

impl Serialize for IpMask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for IpMask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BASE64
            .decode(s.as_bytes())
            .map(IpMask)
            .map_err(|e| de::Error::custom(format!("invalid base64 mask {s:?}: {e}")))
    }
}

/// `#[serde(with)]` adapter for a Go `net.IP` field: `Option<IpAddr>`, `""` when `None`.
pub mod go_ip {
    use super::*;

    pub fn serialize<S: Serializer>(ip: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match ip {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => parse_go_ip(&s).map_err(de::Error::custom),
        }
    }
}

/// Serializes a prefix in the legacy `{"IP":…,"Mask":…}` object form.
struct CidrObject<'a>(&'a IpNet);

impl Serialize for CidrObject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("IPNet", 2)?;
        st.serialize_field("IP", &self.0.addr().to_string())?;
        st.serialize_field("Mask", &IpMask::from_ipnet(self.0))?;
        st.end()
    }
}

struct CidrVisitor;

impl<'de> Visitor<'de> for CidrVisitor {
    type Value = Option<IpNet>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CIDR as {\"IP\":…,\"Mask\":…}, \"a.b.c.d/n\" or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(CidrVisitor)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<IpNet>()
            .map(Some)
            .map_err(|_| E::custom(format!("invalid CIDR {s:?}")))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ip: Option<String> = None;
        let mut mask: Option<IpMask> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "IP" => ip = map.next_value::<Option<String>>()?,
                "Mask" => mask = map.next_value::<Option<IpMask>>()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let ip = match ip.as_deref().map(parse_go_ip).transpose() {
            Ok(ip) => ip.flatten(),
            Err(e) => return Err(de::Error::custom(e)),
        };
        match (ip, mask) {
            // An IPNet with neither part is as good as absent.
            (None, None) => Ok(None),
            (None, Some(_)) => Err(de::Error::custom("CIDR has a Mask but no IP")),
            (Some(ip), None) => Err(de::Error::custom(format!("CIDR {ip} has no Mask"))),
            (Some(ip), Some(mask)) => {
                let len = mask.prefix_len_for(ip).ok_or_else(|| {
                    de::Error::custom(format!("CIDR {ip} has an invalid mask {:?}", mask.0))
                })?;
                IpNet::new(ip, len)
                    .map(Some)
                    .map_err(|e| de::Error::custom(format!("CIDR {ip}/{len}: {e}")))
            }
        }
    }
}

/// `#[serde(with)]` adapter for a Cilium `*cidr.CIDR` field: `Option<IpNet>`, `null` when
/// `None`, the object form otherwise. The address is emitted as stored (Cilium stores the
/// network address, as `net.ParseCIDR` returns it).
pub mod go_cidr {
    use super::*;

    pub fn serialize<S: Serializer>(net: &Option<IpNet>, s: S) -> Result<S::Ok, S::Error> {
        match net {
            Some(net) => CidrObject(net).serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpNet>, D::Error> {
        d.deserialize_option(CidrVisitor)
    }
}

/// `#[serde(with)]` adapter for a `[]*cidr.CIDR` field: `Vec<IpNet>`. Go builds these slices
/// with `append`, so an empty list is a nil slice and goes out as `null`; `null` elements
/// are dropped on input.
pub mod go_cidr_list {
    use super::*;

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        if nets.is_empty() {
            return s.serialize_none();
        }
        s.collect_seq(nets.iter().map(CidrObject))
    }

    struct Elem(Option<IpNet>);

    impl<'de> Deserialize<'de> for Elem {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            go_cidr::deserialize(d).map(Elem)
        }
    }

    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<IpNet>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of CIDRs or null")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(ListVisitor)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Elem(net)) = seq.next_element()? {
                out.extend(net);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        d.deserialize_option(ListVisitor)
    }
}

/// `#[serde(with)]` adapter for a Go slice/map that is nil when empty: empty ↔ `null`.
pub mod empty_as_null {
    use super::*;

    pub fn serialize<S, T>(v: &T, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize + IsEmpty,
    {
        if v.is_empty_value() {
            s.serialize_none()
        } else {
            v.serialize(s)
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// Containers that can say whether they are empty.
    pub trait IsEmpty {
        fn is_empty_value(&self) -> bool;
    }

    impl<T> IsEmpty for Vec<T> {
        fn is_empty_value(&self) -> bool {
            self.is_empty()
        }
    }

    impl<K, V> IsEmpty for std::collections::BTreeMap<K, V> {
        fn is_empty_value(&self) -> bool {
            self.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct T {
        #[serde(with = "go_cidr", default)]
        c: Option<IpNet>,
        #[serde(with = "go_cidr_list", default)]
        l: Vec<IpNet>,
        #[serde(with = "go_ip", default)]
        ip: Option<IpAddr>,
    }

    fn dec(s: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn mask_from_len() {
        assert_eq!(
            BASE64.encode(IpMask::from_prefix_len(24, true).0),
            "////AA=="
        );
        assert_eq!(
            BASE64.encode(IpMask::from_prefix_len(64, false).0),
            "//////////8AAAAAAAAAAA=="
        );
        assert_eq!(IpMask::from_prefix_len(0, true).0, vec![0, 0, 0, 0]);
        assert_eq!(IpMask::from_prefix_len(32, true).0, vec![255; 4]);
        assert_eq!(IpMask::from_prefix_len(21, true).0, vec![255, 255, 0xf8, 0]);
    }

    #[test]
    fn mask_ones() {
        assert_eq!(IpMask(vec![255, 255, 0xf8, 0]).ones(), Some(21));
        assert_eq!(IpMask(vec![255, 0, 255, 0]).ones(), None);
        assert_eq!(IpMask(vec![0b1010_0000, 0, 0, 0]).ones(), None);
        assert_eq!(IpMask(vec![]).ones(), Some(0));
        assert_eq!(IpMask(vec![255, 0, 255, 0]).go_size(), (0, 0));
        let mapped = IpMask(vec![
            255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0,
        ]);
        assert_eq!(mapped.prefix_len_for("10.0.0.0".parse().unwrap()), Some(24));
        assert_eq!(mapped.prefix_len_for("fd00::".parse().unwrap()), Some(120));
        assert_eq!(
            IpMask(vec![255; 4]).prefix_len_for("fd00::".parse().unwrap()),
            None
        );
    }

    #[test]
    fn cidr_forms() {
        let v4: IpNet = "10.1.0.0/24".parse().unwrap();
        let v6: IpNet = "fd00:10:1::/64".parse().unwrap();
        let t = dec(r#"{"c":{"IP":"10.1.0.0","Mask":"////AA=="},"l":null,"ip":""}"#).unwrap();
        assert_eq!(
            t,
            T {
                c: Some(v4),
                l: vec![],
                ip: None
            }
        );
        let t = dec(r#"{"c":"10.1.0.0/24","l":["fd00:10:1::/64",null],"ip":null}"#).unwrap();
        assert_eq!(
            t,
            T {
                c: Some(v4),
                l: vec![v6],
                ip: None
            }
        );
        let t =
            dec(r#"{"c":null,"l":[{"IP":"fd00:10:1::","Mask":"//////////8AAAAAAAAAAA==","X":1}]}"#)
                .unwrap();
        assert_eq!(
            t,
            T {
                c: None,
                l: vec![v6],
                ip: None
            }
        );
        let t = dec(r#"{"c":{"IP":"","Mask":null}}"#).unwrap();
        assert_eq!(t.c, None);
        let t = dec(r#"{"ip":"::ffff:10.0.0.1"}"#).unwrap();
        assert_eq!(t.ip, Some("10.0.0.1".parse().unwrap()));

        assert!(dec(r#"{"c":{"IP":"10.1.0.0"}}"#).is_err());
        assert!(dec(r#"{"c":{"IP":"10.1.0.0","Mask":"/wD/AA=="}}"#).is_err());
        assert!(dec(r#"{"c":{"IP":"10.1.0.0","Mask":"not base64"}}"#).is_err());
        assert!(dec(r#"{"c":"10.1.0.0"}"#).is_err());
        assert!(dec(r#"{"c":{"IP":"nope","Mask":"////AA=="}}"#).is_err());
        assert!(dec(r#"{"ip":"10.0.0.300"}"#).is_err());
        assert!(dec(r#"{"c":5}"#).is_err());
    }

    #[test]
    fn cidr_encode() {
        let t = T {
            c: Some("10.1.0.0/24".parse().unwrap()),
            l: vec!["fd00::/64".parse().unwrap()],
            ip: Some("fd00::1".parse().unwrap()),
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"c":{"IP":"10.1.0.0","Mask":"////AA=="},"l":[{"IP":"fd00::","Mask":"//////////8AAAAAAAAAAA=="}],"ip":"fd00::1"}"#
        );
        let t = T {
            c: None,
            l: vec![],
            ip: None,
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"c":null,"l":null,"ip":""}"#
        );
    }
}
