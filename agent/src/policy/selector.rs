//! Label selectors compiled the way Cilium reads them: a key may carry a label source
//! (`k8s:app`, `reserved:host`); without one (or with `any:`) it matches that key from any
//! source. Namespace scoping is applied here, see [`Selector::for_endpoint`] and
//! [`Selector::for_peer`].

use crate::identity::labels::{
    LABEL_SOURCE_K8S, LABEL_SOURCE_RESERVED, LabelArray, NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
};

use super::types::{LabelSelector, SelectorOperator};

/// Source prefix meaning "any source".
const LABEL_SOURCE_ANY: &str = "any";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    /// `None` = any source.
    source: Option<String>,
    key: String,
    op: Op,
    /// Came from `matchLabels` (only those are overwritten by a forced namespace match).
    from_match_labels: bool,
}

impl Requirement {
    /// One label per key (see [`LabelArray`]); a label of another source than the one
    /// named counts as absent, as in Cilium's `LabelArray.Get`.
    fn matches(&self, labels: &LabelArray) -> bool {
        let value = labels
            .get(&self.key)
            .filter(|l| self.source.as_deref().is_none_or(|s| s == l.source))
            .map(|l| &l.value);
        match &self.op {
            Op::In(vals) => value.is_some_and(|v| vals.contains(v)),
            Op::NotIn(vals) => value.is_none_or(|v| !vals.contains(v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }
}

/// Splits `source:key`; no source or `any` → `None`.
fn split_key(raw: &str) -> (Option<String>, String) {
    match raw.split_once(':') {
        Some((LABEL_SOURCE_ANY, key)) => (None, key.to_owned()),
        Some((source, key)) => (Some(source.to_owned()), key.to_owned()),
        None => (None, raw.to_owned()),
    }
}

/// A compiled selector: all requirements must hold. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

impl Selector {
    /// Compiles a selector as written, without any namespace scoping.
    pub fn new(ls: &LabelSelector) -> Selector {
        let mut reqs = Vec::with_capacity(ls.match_labels.len() + ls.match_expressions.len());
        for (k, v) in &ls.match_labels {
            let (source, key) = split_key(k);
            reqs.push(Requirement {
                source,
                key,
                op: Op::In(vec![v.clone()]),
                from_match_labels: true,
            });
        }
        for e in &ls.match_expressions {
            let (source, key) = split_key(&e.key);
            let op = match e.operator {
                SelectorOperator::In => Op::In(e.values.clone()),
                SelectorOperator::NotIn => Op::NotIn(e.values.clone()),
                SelectorOperator::Exists => Op::Exists,
                SelectorOperator::DoesNotExist => Op::DoesNotExist,
            };
            reqs.push(Requirement {
                source,
                key,
                op,
                from_match_labels: false,
            });
        }
        Selector { reqs }
    }

    /// The selector of a rule's `endpointSelector`. A namespaced policy always confines it to
    /// its own namespace: a `k8s:io.kubernetes.pod.namespace` match label is replaced, any
    /// other namespace requirement stays and must hold as well (so naming another namespace
    /// selects nothing).
    pub fn for_endpoint(ls: &LabelSelector, namespace: Option<&str>) -> Selector {
        let mut sel = Selector::new(ls);
        if let Some(ns) = namespace {
            sel.reqs.retain(|r| {
                !(r.from_match_labels
                    && r.key == POD_NAMESPACE_LABEL
                    && r.source.as_deref() == Some(LABEL_SOURCE_K8S))
            });
            sel.add_k8s(POD_NAMESPACE_LABEL, Op::In(vec![ns.to_owned()]));
        }
        sel
    }

    /// The selector of a `fromEndpoints`/`toEndpoints` (or `…Requires`) entry. Selectors naming
    /// reserved labels are taken as written. Otherwise, unless the selector itself names the
    /// pod namespace: a namespaced policy confines it to the policy's namespace (unless it
    /// selects by namespace labels), a clusterwide policy to endpoints that have a namespace
    /// at all (pods, not reserved identities), except selectors of initialising endpoints.
    pub fn for_peer(ls: &LabelSelector, namespace: Option<&str>) -> Selector {
        let mut sel = Selector::new(ls);
        if sel.has_source(LABEL_SOURCE_RESERVED) || sel.has_pod_namespace_key() {
            return sel;
        }
        match namespace {
            Some(ns) => {
                if !sel.reqs.iter().any(|r| {
                    r.key.starts_with(NAMESPACE_LABELS_PREFIX)
                        && r.source.as_deref().is_none_or(|s| s == LABEL_SOURCE_K8S)
                }) {
                    sel.add_k8s(POD_NAMESPACE_LABEL, Op::In(vec![ns.to_owned()]));
                }
            }
            None => sel.add_k8s(POD_NAMESPACE_LABEL, Op::Exists),
        }
        sel
    }

    fn add_k8s(&mut self, key: &str, op: Op) {
        self.reqs.push(Requirement {
            source: Some(LABEL_SOURCE_K8S.to_owned()),
            key: key.to_owned(),
            op,
            from_match_labels: true,
        });
    }

    fn has_source(&self, source: &str) -> bool {
        self.reqs
            .iter()
            .any(|r| r.source.as_deref() == Some(source))
    }

    /// Whether the selector names `io.kubernetes.pod.namespace` (with `k8s:`, `any:` or no
    /// source), in `matchLabels` or `matchExpressions`.
    fn has_pod_namespace_key(&self) -> bool {
        self.reqs.iter().any(|r| {
            r.key == POD_NAMESPACE_LABEL
                && r.source.as_deref().is_none_or(|s| s == LABEL_SOURCE_K8S)
        })
    }

    /// Whether every requirement holds for these labels.
    pub fn matches(&self, labels: &LabelArray) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }
}
