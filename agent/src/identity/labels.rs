//! Identity labels and their kvstore form, the "sorted list" `k8s:app=foo;k8s:…=…;` stored
//! as the value of `…/identities/v1/id/<n>` (and inside `value/` keys).

use std::{collections::BTreeMap, fmt};

/// Label source of Kubernetes-derived labels.
pub const LABEL_SOURCE_K8S: &str = "k8s";
/// Label source of reserved labels (`reserved:host`).
pub const LABEL_SOURCE_RESERVED: &str = "reserved";
/// Source given to a label written without one.
pub const LABEL_SOURCE_UNSPEC: &str = "unspec";
/// Source of labels the agent generates for an endpoint (Cilium 1.20's named ports).
pub const LABEL_SOURCE_GENERATED: &str = "gen";

/// Label every pod identity carries, naming the owning cluster.
pub const POLICY_LABEL_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// Namespace of the pod (`k8s:io.kubernetes.pod.namespace=…`).
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Service account of the pod.
pub const POLICY_LABEL_SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
/// Prefix of the labels Cilium derives from the pod's namespace labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Key of Cilium 1.20's generated named-ports label; continuation chunks append `-<n>`.
pub const NAMED_PORTS_LABEL: &str = "io.cilium.k8s.named-ports";
/// Keys Cilium owns: a pod's own labels starting so (no dot needed) are dropped.
pub const CILIUM_OWNED_PREFIX: &str = "io.cilium.k8s";

/// One identity label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Label {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    /// Parses one `source:key=value` entry as Cilium's `ParseLabel` does: a leading `$`
    /// means `reserved:`, else the source ends at the first `:` (none → `unspec`); the value
    /// starts after the first `=` that follows (none → empty).
    pub fn parse(entry: &str) -> Label {
        let (source, rest) = match entry.strip_prefix('$') {
            Some(rest) => (LABEL_SOURCE_RESERVED, rest),
            None => entry
                .split_once(':')
                .unwrap_or((LABEL_SOURCE_UNSPEC, entry)),
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(source, key, value)
    }

    /// Whether a workload's global identity (one stored in the kvstore) may carry this
    /// label: `k8s:` labels, and Cilium 1.20's `gen:io.cilium.k8s.named-ports[-<n>]`. Any
    /// other source names what is no pod of a cluster (`reserved:host` would make policy
    /// treat it as that entity; `cidr:`, `fqdn:`, `node:` identities are node-local) or no
    /// source at all (`unspec`, `any`).
    pub fn is_workload_label(&self) -> bool {
        match self.source.as_str() {
            LABEL_SOURCE_K8S => true,
            LABEL_SOURCE_GENERATED => is_named_ports_key(&self.key),
            _ => false,
        }
    }
}

/// `io.cilium.k8s.named-ports`, or a continuation chunk `io.cilium.k8s.named-ports-<n>`.
fn is_named_ports_key(key: &str) -> bool {
    match key.strip_prefix(NAMED_PORTS_LABEL) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('-')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// `source:key=value`, the kvstore form of one label (without the `;`).
impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

/// A label list Cilium would not have written: every Cilium writer serialises a key-indexed
/// map, so a key appears at most once and is never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key {0:?} appears more than once")]
    DuplicateKey(String),
    #[error("label {0:?} has an empty key")]
    EmptyKey(String),
}

/// An identity's labels, keyed by label key alone as Cilium's `labels.Labels` map is: one
/// label per key whatever its source, so `k8s:a` and `reserved:a` cannot both be present.
/// (Named after the wire form, Cilium's `LabelArray`; [`LabelArray::to_sorted_list`] gives
/// it.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LabelArray(BTreeMap<String, Label>);

impl LabelArray {
    /// Parses the sorted-list form: split on `;`, empty entries dropped (so the trailing `;`
    /// and a missing one both work). A repeated or empty key is an error: Cilium would keep
    /// both in its array and match the first, strait cannot hold them (see [`LabelError`]).
    pub fn parse_sorted_list(list: &str) -> Result<LabelArray, LabelError> {
        let mut labels = LabelArray::default();
        for entry in list.split(';').filter(|e| !e.is_empty()) {
            let label = Label::parse(entry);
            if label.key.is_empty() {
                return Err(LabelError::EmptyKey(entry.to_owned()));
            }
            if let Some(old) = labels.insert(label) {
                return Err(LabelError::DuplicateKey(old.key));
            }
        }
        Ok(labels)
    }

    /// The wire form: every label as `source:key=value;`, sorted by key (byte order, as Go's
    /// `sort.Strings` in Cilium's `SortedList`).
    pub fn to_sorted_list(&self) -> String {
        let mut out = String::with_capacity(self.0.values().map(|l| l.key.len() + 16).sum());
        for l in self.0.values() {
            out.push_str(&l.source);
            out.push(':');
            out.push_str(&l.key);
            out.push('=');
            out.push_str(&l.value);
            out.push(';');
        }
        out
    }

    /// Adds `label`, replacing (and returning) the label with the same key, whatever its
    /// source.
    pub fn insert(&mut self, label: Label) -> Option<Label> {
        self.0.insert(label.key.clone(), label)
    }

    /// The label with this key, whatever its source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        self.0.get(key)
    }

    /// Whether `source:key=value` is present.
    pub fn contains(&self, source: &str, key: &str, value: &str) -> bool {
        self.get(key)
            .is_some_and(|l| l.source == source && l.value == value)
    }

    /// Value of the `k8s:io.cilium.k8s.policy.cluster` label, if any.
    pub fn cluster_name(&self) -> Option<&str> {
        self.get(POLICY_LABEL_CLUSTER)
            .filter(|l| l.source == LABEL_SOURCE_K8S)
            .map(|l| l.value.as_str())
    }

    /// Labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A later label replaces an earlier one with the same key, as in Cilium's map.
impl FromIterator<Label> for LabelArray {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut labels = LabelArray::default();
        for label in iter {
            labels.insert(label);
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "k8s:app=foo;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default;k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=default;";

    fn parse(list: &str) -> LabelArray {
        LabelArray::parse_sorted_list(list).unwrap()
    }

    #[test]
    fn golden_identity_value() {
        // Built in scrambled order, formatted sorted by key.
        let labels: LabelArray = [
            Label::new("k8s", POD_NAMESPACE_LABEL, "default"),
            Label::new("k8s", POLICY_LABEL_CLUSTER, "cluster-usa"),
            Label::new("k8s", "app", "foo"),
            Label::new("k8s", POLICY_LABEL_SERVICE_ACCOUNT, "default"),
            Label::new(
                "k8s",
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                "default",
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(labels.to_sorted_list(), EXAMPLE);
    }

    #[test]
    fn parse_round_trip() {
        let labels = parse(EXAMPLE);
        assert_eq!(labels.len(), 5);
        assert_eq!(labels.iter().next(), Some(&Label::new("k8s", "app", "foo")));
        assert_eq!(labels.cluster_name(), Some("cluster-usa"));
        assert!(labels.contains("k8s", POD_NAMESPACE_LABEL, "default"));
        assert_eq!(labels.to_sorted_list(), EXAMPLE);
        // Unsorted input comes out sorted, byte order (uppercase before lowercase).
        assert_eq!(
            parse("k8s:b=2;k8s:a=1;k8s:B=3").to_sorted_list(),
            "k8s:B=3;k8s:a=1;k8s:b=2;"
        );
    }

    #[test]
    fn parse_edge_cases() {
        // First ':' ends the source, first '=' after it starts the value.
        let l = Label::parse("k8s:a:b=c=d");
        assert_eq!(l, Label::new("k8s", "a:b", "c=d"));
        assert_eq!(
            Label::parse("reserved:host"),
            Label::new("reserved", "host", "")
        );
        assert_eq!(Label::parse("$host"), Label::new("reserved", "host", ""));
        assert_eq!(Label::parse("app=x"), Label::new("unspec", "app", "x"));
        let a = parse(";;k8s:a=1;;k8s:b=2");
        assert_eq!(a.len(), 2);
        assert!(parse("").is_empty());
        // An empty value still writes '='.
        assert_eq!(
            [Label::new("reserved", "host", "")]
                .into_iter()
                .collect::<LabelArray>()
                .to_sorted_list(),
            "reserved:host=;"
        );
    }

    #[test]
    fn one_label_per_key() {
        // Cilium's array would hold both and match the first; strait refuses the list.
        let dup = |list| LabelArray::parse_sorted_list(list).unwrap_err();
        assert_eq!(
            dup("k8s:a=b;k8s:a=c;"),
            LabelError::DuplicateKey("a".into())
        );
        // The key alone decides, not the source.
        assert_eq!(
            dup("k8s:host=;reserved:host=;"),
            LabelError::DuplicateKey("host".into())
        );
        assert_eq!(
            dup("k8s:io.cilium.k8s.policy.cluster=a;k8s:io.cilium.k8s.policy.cluster=b;"),
            LabelError::DuplicateKey(POLICY_LABEL_CLUSTER.into())
        );
        assert_eq!(
            LabelArray::parse_sorted_list("k8s:a=1;k8s:=x;").unwrap_err(),
            LabelError::EmptyKey("k8s:=x".into())
        );
        // Built in code, a later label replaces an earlier one with the same key.
        let mut labels: LabelArray = [
            Label::new("k8s", "a", "1"),
            Label::new("reserved", "a", "2"),
        ]
        .into_iter()
        .collect();
        assert_eq!(labels.to_sorted_list(), "reserved:a=2;");
        assert_eq!(
            labels.insert(Label::new("k8s", "a", "3")),
            Some(Label::new("reserved", "a", "2"))
        );
        assert_eq!(labels.len(), 1);
        // The cluster label counts only from the k8s source.
        assert_eq!(
            parse("unspec:io.cilium.k8s.policy.cluster=c1;").cluster_name(),
            None
        );
    }

    #[test]
    fn workload_labels() {
        for ok in [
            "k8s:app=x",
            "k8s:io.cilium.k8s.policy.cluster=c1",
            "gen:io.cilium.k8s.named-ports=http:TCP:80",
            "gen:io.cilium.k8s.named-ports-1=dns:UDP:53",
        ] {
            assert!(Label::parse(ok).is_workload_label(), "{ok}");
        }
        for bad in [
            "reserved:host",
            "$host",
            "reserved:remote-node",
            "cidr:10.0.0.0/8",
            "fqdn:example.com",
            "node:kubernetes.io/hostname=n1",
            "container:app=x",
            "unspec:app=x",
            "app=x",
            "any:app=x",
            "gen:app=x",
            "gen:io.cilium.k8s.named-ports-=x",
            "gen:io.cilium.k8s.named-ports-x=x",
            "gen:io.cilium.k8s.named-portsx=x",
        ] {
            assert!(!Label::parse(bad).is_workload_label(), "{bad}");
        }
    }
}
