//! Cilium's default label filter (`pkg/labelsfilter`): which of an endpoint's labels count
//! for its identity. Labels that differ per pod instance (hashes, indexes, pod names) would
//! give every pod an identity of its own; Cilium leaves them out, and strait must leave out
//! exactly the same ones, or one pod gets different identities under the two.
//!
//! A rule is a Go regexp; `!` makes it an exclude, a `source:` prefix limits it to one label
//! source. It matches a label when the regexp's leftmost match starts at the key's first
//! byte (a prefix match: `k8s\.io` takes `k8s.io/x` and `k8s.iox` but not `foo.k8s.io/x`),
//! and scores the match's length. A label is kept when the longest matching include is
//! longer than the shortest matching exclude, or when no exclude matches (the defaults hold
//! no user include rule, so a label no rule mentions is kept).

use std::sync::LazyLock;

use regex::Regex;

use super::labels::Label;

/// Cilium's `defaultLabelPrefixCfg` (identical in 1.19 and 1.20), in its order.
const DEFAULT_RULES: &[&str] = &[
    r"reserved:.*",
    r"io\.kubernetes\.pod\.namespace",
    r"io\.cilium\.k8s\.namespace\.labels",
    r"app\.kubernetes\.io",
    r"io\.cilium\.k8s\.policy\.cluster",
    r"io\.cilium\.k8s\.policy\.serviceaccount",
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    r"!statefulset\.kubernetes\.io/pod-name",
    r"!apps\.kubernetes\.io/pod-index",
    r"!batch\.kubernetes\.io/job-completion-index",
    r"!batch\.kubernetes\.io/controller-uid",
    r"!.*beta\.kubernetes\.io",
    r"!k8s\.io",
    r"!pod-template-generation",
    r"!pod-template-hash",
    r"!controller-revision-hash",
    r"!controller-uid",
    r"!annotation.*",
    r"!etcd_node",
    r"!topology\.kubernetes\.io",
];

struct Rule {
    /// `None`: any source.
    source: Option<&'static str>,
    expr: Regex,
    exclude: bool,
}

impl Rule {
    /// Parses a rule as Cilium's `parseLabelPrefix` does: the source ends at the first `:`,
    /// then a leading `!` marks an exclude.
    fn parse(rule: &'static str) -> Rule {
        let (source, prefix) = match rule.split_once(':') {
            Some((source, prefix)) => (Some(source), prefix),
            None => (None, rule),
        };
        let (exclude, prefix) = match prefix.strip_prefix('!') {
            Some(prefix) => (true, prefix),
            None => (false, prefix),
        };
        Rule {
            source,
            expr: Regex::new(prefix).expect("the default label rules are valid regexps"),
            exclude,
        }
    }

    /// Length of the rule's match at the start of the label's key, if it matches there.
    fn match_len(&self, label: &Label) -> Option<usize> {
        if self.source.is_some_and(|s| s != label.source) {
            return None;
        }
        // Go's regexp and this crate both report the leftmost-first match.
        let m = self.expr.find(&label.key)?;
        (m.start() == 0).then_some(m.end())
    }
}

static DEFAULT: LazyLock<Vec<Rule>> =
    LazyLock::new(|| DEFAULT_RULES.iter().map(|r| Rule::parse(r)).collect());

/// Whether Cilium's default filter keeps `label` as identity-relevant (`filterLabels`).
pub fn is_identity_label(label: &Label) -> bool {
    // As in Cilium, 0 stands for "no exclude matched".
    let (mut included, mut excluded) = (0, 0);
    for rule in DEFAULT.iter() {
        let Some(len) = rule.match_len(label) else {
            continue;
        };
        if !rule.exclude {
            included = included.max(len);
        } else if excluded == 0 || len < excluded {
            excluded = len;
        }
    }
    excluded == 0 || included > excluded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::labels::LABEL_SOURCE_K8S;

    fn keeps(key: &str) -> bool {
        is_identity_label(&Label::new(LABEL_SOURCE_K8S, key, "x"))
    }

    #[test]
    fn kept_by_cilium() {
        for key in [
            // Workload labels no rule mentions.
            "app",
            "tier",
            "example.com/team",
            "my-etcd_node",
            "x-controller-uid",
            // Jobs: only the completion index and the controller UID vary per pod.
            "job-name",
            "batch.kubernetes.io/job-name",
            // Includes, and prefix-scored: the include is longer than `!io\.kubernetes`.
            "app.kubernetes.io/name",
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
            "io.cilium.k8s.policy.cluster",
            "io.cilium.k8s.policy.serviceaccount",
            // Excludes match at the key's start only.
            "foo.k8s.io/bar",
            "node.kubernetes.io/instance-type",
            "statefulset.kubernetes.io/other",
            "sigs.k8s.io/x",
        ] {
            assert!(keeps(key), "{key} must be kept");
        }
    }

    #[test]
    fn dropped_by_cilium() {
        for key in [
            "io.kubernetes.pod.name",
            "io.kubernetes.container.name",
            "kubernetes.io/hostname",
            "kubernetes.io/metadata.name",
            "statefulset.kubernetes.io/pod-name",
            "statefulset.kubernetes.io/pod-name-extra",
            "apps.kubernetes.io/pod-index",
            "batch.kubernetes.io/job-completion-index",
            "batch.kubernetes.io/controller-uid",
            "beta.kubernetes.io/arch",
            "failure-domain.beta.kubernetes.io/zone",
            "k8s.io/x",
            "k8s.iox",
            "pod-template-generation",
            "pod-template-hash",
            "controller-revision-hash",
            "controller-uid",
            "annotation.foo",
            "annotations",
            "etcd_node",
            "topology.kubernetes.io/zone",
        ] {
            assert!(!keeps(key), "{key} must be dropped");
        }
    }

    #[test]
    fn source_specific_rules() {
        // `reserved:.*` includes the whole key, outscoring any exclude; it does not apply to
        // other sources.
        assert!(is_identity_label(&Label::new(
            "reserved",
            "io.kubernetes.x",
            ""
        )));
        assert!(!keeps("io.kubernetes.x"));
        // Source-less rules apply to every source.
        assert!(!is_identity_label(&Label::new(
            "container",
            "pod-template-hash",
            "x"
        )));
    }

    #[test]
    fn every_default_rule_parses() {
        assert_eq!(DEFAULT.len(), DEFAULT_RULES.len());
        assert_eq!(DEFAULT.iter().filter(|r| r.exclude).count(), 15);
        assert_eq!(DEFAULT[0].source, Some("reserved"));
    }
}
