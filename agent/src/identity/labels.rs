//! Identity labels and their kvstore form, the "sorted list" `k8s:app=foo;k8s:…=…;` stored
//! as the value of `…/identities/v1/id/<n>` (and inside `value/` keys).

use std::fmt;

/// Label source of Kubernetes-derived labels.
pub const LABEL_SOURCE_K8S: &str = "k8s";
/// Label source of reserved labels (`reserved:host`).
pub const LABEL_SOURCE_RESERVED: &str = "reserved";
/// Source given to a label written without one.
pub const LABEL_SOURCE_UNSPEC: &str = "unspec";

/// Label every pod identity carries, naming the owning cluster.
pub const POLICY_LABEL_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// Namespace of the pod (`k8s:io.kubernetes.pod.namespace=…`).
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Service account of the pod.
pub const POLICY_LABEL_SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";

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

    /// Parses one `source:key=value` entry: the source ends at the first `:` (none →
    /// `unspec`), the value starts after the first `=` that follows (none → empty).
    pub fn parse(entry: &str) -> Label {
        let (source, rest) = match entry.split_once(':') {
            Some((s, rest)) => (s, rest),
            None => (LABEL_SOURCE_UNSPEC, entry),
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(source, key, value)
    }
}

/// `source:key=value`, the kvstore form of one label (without the `;`).
impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

/// An identity's labels, in any order; [`LabelArray::to_sorted_list`] gives the wire form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LabelArray(pub Vec<Label>);

impl LabelArray {
    /// Parses the sorted-list form: split on `;`, empty entries dropped (so the trailing `;`
    /// and a missing one both work).
    pub fn parse_sorted_list(list: &str) -> LabelArray {
        LabelArray(
            list.split(';')
                .filter(|e| !e.is_empty())
                .map(Label::parse)
                .collect(),
        )
    }

    /// The wire form: every label as `source:key=value;`, sorted by key (Cilium sorts its
    /// key-indexed map; the source is only a tie-breaker here, for determinism).
    pub fn to_sorted_list(&self) -> String {
        let mut sorted: Vec<&Label> = self.0.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.source.cmp(&b.source)));
        let mut out = String::with_capacity(sorted.iter().map(|l| l.key.len() + 16).sum());
        for l in sorted {
            out.push_str(&l.source);
            out.push(':');
            out.push_str(&l.key);
            out.push('=');
            out.push_str(&l.value);
            out.push(';');
        }
        out
    }

    /// First label with this key, whatever its source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        self.0.iter().find(|l| l.key == key)
    }

    /// Whether `source:key=value` is present.
    pub fn contains(&self, source: &str, key: &str, value: &str) -> bool {
        self.0
            .iter()
            .any(|l| l.source == source && l.key == key && l.value == value)
    }

    /// Value of the `k8s:io.cilium.k8s.policy.cluster` label, if any.
    pub fn cluster_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|l| l.source == LABEL_SOURCE_K8S && l.key == POLICY_LABEL_CLUSTER)
            .map(|l| l.value.as_str())
    }

    pub fn push(&mut self, label: Label) {
        self.0.push(label);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Label> for LabelArray {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        LabelArray(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "k8s:app=foo;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default;k8s:io.cilium.k8s.policy.cluster=cluster-usa;k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=default;";

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
        let labels = LabelArray::parse_sorted_list(EXAMPLE);
        assert_eq!(labels.len(), 5);
        assert_eq!(labels.0[0], Label::new("k8s", "app", "foo"));
        assert_eq!(labels.cluster_name(), Some("cluster-usa"));
        assert!(labels.contains("k8s", POD_NAMESPACE_LABEL, "default"));
        assert_eq!(labels.to_sorted_list(), EXAMPLE);
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
        assert_eq!(Label::parse("app=x"), Label::new("unspec", "app", "x"));
        let a = LabelArray::parse_sorted_list(";;k8s:a=1;;k8s:b=2");
        assert_eq!(a.len(), 2);
        assert!(LabelArray::parse_sorted_list("").is_empty());
        // An empty value still writes '='.
        assert_eq!(
            LabelArray(vec![Label::new("reserved", "host", "")]).to_sorted_list(),
            "reserved:host=;"
        );
    }
}
