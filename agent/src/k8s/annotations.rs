//! Global-service annotations on Kubernetes Services (Cilium `pkg/annotation`), with the
//! older `io.cilium/…` aliases. The current name wins when both are set.

use std::collections::BTreeMap;

use crate::state::Affinity;

pub const GLOBAL_SERVICE: &str = "service.cilium.io/global";
pub const GLOBAL_SERVICE_ALIAS: &str = "io.cilium/global-service";
pub const SHARED_SERVICE: &str = "service.cilium.io/shared";
pub const SHARED_SERVICE_ALIAS: &str = "io.cilium/shared-service";
pub const SERVICE_AFFINITY: &str = "service.cilium.io/affinity";
pub const SERVICE_AFFINITY_ALIAS: &str = "io.cilium/service-affinity";
pub const GLOBAL_SYNC_ENDPOINT_SLICES: &str = "service.cilium.io/global-sync-endpoint-slices";

/// What a Service's annotations say about ClusterMesh.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GlobalServiceAnnotations {
    /// Remote backends are merged in (`global: "true"`, case-insensitive).
    pub global: bool,
    /// Local backends are exported: global and not `shared` ≠ `"true"` (default true).
    pub shared: bool,
    /// Only meaningful for global services; `None` otherwise.
    pub affinity: Affinity,
    /// Values that were ignored or surprising, for the operator to see.
    pub warnings: Vec<String>,
}

/// Looks up an annotation under its current name, then its alias; warns when both are set to
/// different values.
fn lookup<'a>(
    ann: &'a BTreeMap<String, String>,
    name: &str,
    alias: &str,
    warnings: &mut Vec<String>,
) -> Option<&'a str> {
    match (ann.get(name), ann.get(alias)) {
        (Some(v), Some(a)) => {
            if v != a {
                warnings.push(format!(
                    "both {name}={v:?} and {alias}={a:?} are set; using {name}"
                ));
            }
            Some(v)
        }
        (Some(v), None) | (None, Some(v)) => Some(v),
        (None, None) => None,
    }
}

/// Cilium's boolean rule: exactly `true`, ignoring case; anything else is false. Values that
/// are neither true nor false get a warning because they silently mean "false".
fn parse_bool(key: &str, value: &str, warnings: &mut Vec<String>) -> bool {
    let t = value.eq_ignore_ascii_case("true");
    if !t && !value.eq_ignore_ascii_case("false") {
        warnings.push(format!(
            "{key}={value:?} is not \"true\" or \"false\"; treated as false"
        ));
    }
    t
}

/// Parses the global-service annotations of one Service.
pub fn parse_global_service_annotations(
    ann: &BTreeMap<String, String>,
) -> GlobalServiceAnnotations {
    let mut warnings = Vec::new();
    let global = lookup(ann, GLOBAL_SERVICE, GLOBAL_SERVICE_ALIAS, &mut warnings)
        .is_some_and(|v| parse_bool(GLOBAL_SERVICE, v, &mut warnings));
    if !global {
        // shared and affinity only apply to global services; Cilium ignores them otherwise.
        return GlobalServiceAnnotations {
            global,
            shared: false,
            affinity: Affinity::None,
            warnings,
        };
    }
    let shared = lookup(ann, SHARED_SERVICE, SHARED_SERVICE_ALIAS, &mut warnings)
        .is_none_or(|v| parse_bool(SHARED_SERVICE, v, &mut warnings));
    let affinity = match lookup(ann, SERVICE_AFFINITY, SERVICE_AFFINITY_ALIAS, &mut warnings) {
        None => Affinity::None,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            "none" | "" => Affinity::None,
            _ => {
                warnings.push(format!(
                    "{SERVICE_AFFINITY}={v:?} is not one of local, remote, none; treated as none"
                ));
                Affinity::None
            }
        },
    };
    GlobalServiceAnnotations {
        global,
        shared,
        affinity,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> GlobalServiceAnnotations {
        let ann = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_global_service_annotations(&ann)
    }

    #[test]
    fn not_global() {
        let a = parse(&[]);
        assert_eq!(a, GlobalServiceAnnotations::default());
        let a = parse(&[(SHARED_SERVICE, "true"), (SERVICE_AFFINITY, "local")]);
        assert!(!a.global && !a.shared && a.affinity == Affinity::None);
        let a = parse(&[(GLOBAL_SERVICE, "false")]);
        assert!(!a.global && a.warnings.is_empty());
        let a = parse(&[(GLOBAL_SERVICE, "yes")]);
        assert!(!a.global && a.warnings.len() == 1);
    }

    #[test]
    fn global_defaults_and_case() {
        let a = parse(&[(GLOBAL_SERVICE, "TRUE")]);
        assert!(a.global && a.shared && a.affinity == Affinity::None && a.warnings.is_empty());
        let a = parse(&[
            (GLOBAL_SERVICE, "true"),
            (SHARED_SERVICE, "False"),
            (SERVICE_AFFINITY, "Local"),
        ]);
        assert!(a.global && !a.shared && a.affinity == Affinity::Local);
        let a = parse(&[(GLOBAL_SERVICE, "true"), (SERVICE_AFFINITY, "remote")]);
        assert_eq!(a.affinity, Affinity::Remote);
        let a = parse(&[(GLOBAL_SERVICE, "true"), (SERVICE_AFFINITY, "")]);
        assert_eq!(a.affinity, Affinity::None);
        assert!(a.warnings.is_empty());
        let a = parse(&[(GLOBAL_SERVICE, "true"), (SHARED_SERVICE, "no")]);
        assert!(!a.shared && a.warnings.len() == 1);
    }

    #[test]
    fn aliases() {
        let a = parse(&[
            (GLOBAL_SERVICE_ALIAS, "true"),
            (SHARED_SERVICE_ALIAS, "false"),
            (SERVICE_AFFINITY_ALIAS, "local"),
        ]);
        assert!(a.global && !a.shared && a.affinity == Affinity::Local);
        // The current name wins over the alias, with a warning when they disagree.
        let a = parse(&[(GLOBAL_SERVICE, "true"), (GLOBAL_SERVICE_ALIAS, "false")]);
        assert!(a.global && a.warnings.len() == 1);
    }

    #[test]
    fn bad_affinity() {
        let a = parse(&[(GLOBAL_SERVICE, "true"), (SERVICE_AFFINITY, "nearest")]);
        assert!(a.global && a.shared);
        assert_eq!(a.affinity, Affinity::None);
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("nearest"));
    }

    #[test]
    fn seed_scenario() {
        let a = parse(&[(GLOBAL_SERVICE, "true"), (SERVICE_AFFINITY, "local")]);
        assert_eq!(
            (a.global, a.shared, a.affinity, a.warnings.len()),
            (true, true, Affinity::Local, 0)
        );
        assert_eq!(a.affinity.to_string(), "local");
    }
}
