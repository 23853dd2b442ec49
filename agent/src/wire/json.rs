//! JSON exactly as Go's `encoding/json` writes it, so values we publish are byte-identical to
//! what Cilium would publish (readers compare values when deciding whether to rewrite a key).
//!
//! Differences from `serde_json`'s compact output that matter: Go escapes `<`, `>`, `&`,
//! U+2028 and U+2029 inside strings (HTML safety). Both use the short escapes `\b \f \n \r \t`
//! and lowercase `\u00xx` for other control characters. Field order follows the Rust struct
//! (declare fields in Go order) and maps must be `BTreeMap`s so keys come out byte-sorted like
//! Go's.

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::ser::Formatter;

use super::WireError;

/// A compact `serde_json` formatter adding Go's HTML-safe string escapes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoFormatter;

impl Formatter for GoFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // serde_json hands over runs that need no JSON escaping; split them further at the
        // characters Go additionally escapes.
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escape: &[u8] = match c {
                '<' => b"\\u003c",
                '>' => b"\\u003e",
                '&' => b"\\u0026",
                '\u{2028}' => b"\\u2028",
                '\u{2029}' => b"\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(escape)?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Serializes `value` as Go's `json.Marshal` would (no whitespace, no trailing newline).
pub fn to_go_json<T: Serialize + ?Sized>(
    value: &T,
    what: &'static str,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    value
        .serialize(&mut ser)
        .map_err(|source| WireError::Encode { what, source })?;
    Ok(out)
}

/// [`to_go_json`] as a `String` (the output is always valid UTF-8).
pub fn to_go_json_string<T: Serialize + ?Sized>(
    value: &T,
    what: &'static str,
) -> Result<String, WireError> {
    let bytes = to_go_json(value, what)?;
    // serde_json only ever writes UTF-8; the fallback keeps this free of panics regardless.
    Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
}

/// Decodes a value, ignoring unknown fields (as Go readers do).
pub fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|source| WireError::Decode { what, source })
}

/// serde helpers shared by the value types.
pub(crate) mod helpers {
    use serde::{Deserialize, Deserializer};

    /// Go decodes `null` into a nil map/slice; we keep an empty one instead.
    pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    pub fn is_false(b: &bool) -> bool {
        !*b
    }

    pub fn is_zero_u32(v: &u32) -> bool {
        *v == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn escapes_like_go() {
        let mut m = BTreeMap::new();
        m.insert("a<b", "x>y&z\u{2028}\u{2029}\n\t\"\\\u{1}é");
        let out = to_go_json_string(&m, "test").unwrap();
        assert_eq!(
            out,
            r#"{"a\u003cb":"x\u003ey\u0026z\u2028\u2029\n\t\"\\\u0001é"}"#
        );
    }

    #[test]
    fn compact_and_sorted() {
        let mut m = BTreeMap::new();
        m.insert("b", vec![1, 2]);
        m.insert("B", vec![]);
        m.insert("a", vec![3]);
        assert_eq!(
            to_go_json_string(&m, "test").unwrap(),
            r#"{"B":[],"a":[3],"b":[1,2]}"#
        );
    }

    #[test]
    fn plain_strings_untouched() {
        assert_eq!(
            to_go_json_string("k8s:app=foo;", "test").unwrap(),
            r#""k8s:app=foo;""#
        );
    }
}
