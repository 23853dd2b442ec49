//! `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy as they appear in
//! YAML or JSON manifests, and [`parse_documents`] for multi-document YAML.
//!
//! Unknown fields are ignored (as a structural CRD schema prunes them). Parts strait does not
//! enforce are still typed, or kept as opaque [`Value`]s, so translation can detect and report
//! them instead of silently reading a narrower rule as a wider one.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

use super::PolicyError;

/// API group/version both policy kinds are served under.
pub const CILIUM_API_VERSION: &str = "cilium.io/v2";
/// Namespace a CiliumNetworkPolicy without `metadata.namespace` lives in (what `kubectl
/// apply` does with it).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Deserializes `null` like a missing field.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Which of the two policy kinds a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PolicyKind {
    /// Namespaced: selectors are scoped to the policy's namespace.
    CiliumNetworkPolicy,
    /// Cluster-wide: no namespace scoping of the endpoint selector.
    CiliumClusterwideNetworkPolicy,
}

/// The parts of `metadata` policy translation needs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumPolicy {
    #[serde(default)]
    pub api_version: String,
    pub kind: PolicyKind,
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PolicyRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub specs: Vec<PolicyRule>,
}

impl CiliumPolicy {
    /// Parses one YAML (or JSON) document holding a policy and checks what Cilium's CRD
    /// validation would reject.
    pub fn from_yaml(doc: &str) -> Result<CiliumPolicy, PolicyError> {
        let value: Value = serde_yaml_ng::from_str(doc).map_err(|e| PolicyError::Yaml {
            index: 0,
            reason: e.to_string(),
        })?;
        let name = value_name(&value);
        let policy: CiliumPolicy =
            serde_yaml_ng::from_value(value).map_err(|e| PolicyError::Invalid {
                index: 0,
                name: name.clone(),
                reason: e.to_string(),
            })?;
        policy.validate().map_err(|reason| PolicyError::Invalid {
            index: 0,
            name,
            reason,
        })?;
        Ok(policy)
    }

    /// A policy from an already parsed document (a manifest's YAML or an API object's
    /// JSON converted to a YAML value), with the same checks as [`Self::from_yaml`].
    pub fn from_value(value: Value) -> Result<CiliumPolicy, String> {
        serde_yaml_ng::from_value::<CiliumPolicy>(value)
            .map_err(|e| e.to_string())
            .and_then(|p| p.validate().map(|()| p))
    }

    /// Whether this is a namespaced CiliumNetworkPolicy.
    pub fn is_namespaced(&self) -> bool {
        self.kind == PolicyKind::CiliumNetworkPolicy
    }

    /// The namespace selectors are scoped to: `None` for a clusterwide policy, the
    /// metadata namespace (or `default`) for a namespaced one.
    pub fn scope_namespace(&self) -> Option<&str> {
        self.is_namespaced().then(|| {
            self.metadata
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
        })
    }

    /// `namespace/name` for a namespaced policy, `name` for a clusterwide one.
    pub fn display_name(&self) -> String {
        match self.scope_namespace() {
            Some(ns) => format!("{ns}/{}", self.metadata.name),
            None => self.metadata.name.clone(),
        }
    }

    /// `spec` followed by every entry of `specs`.
    pub fn rules(&self) -> impl Iterator<Item = &PolicyRule> {
        self.spec.iter().chain(self.specs.iter())
    }

    /// The checks Cilium's CRD schema and rule sanitizer make that matter for translation.
    pub fn validate(&self) -> Result<(), String> {
        if self.api_version != CILIUM_API_VERSION {
            return Err(format!(
                "apiVersion {:?}, expected {CILIUM_API_VERSION:?}",
                self.api_version
            ));
        }
        if self.metadata.name.is_empty() {
            return Err("metadata.name is missing".into());
        }
        if self.spec.is_none() && self.specs.is_empty() {
            return Err("neither spec nor specs is set".into());
        }
        for (i, rule) in self.rules().enumerate() {
            match (&rule.endpoint_selector, &rule.node_selector) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "rule {i}: endpointSelector and nodeSelector are mutually exclusive"
                    ));
                }
                (None, None) => {
                    return Err(format!(
                        "rule {i}: one of endpointSelector or nodeSelector is required"
                    ));
                }
                _ => {}
            }
            let selectors = rule
                .endpoint_selector
                .iter()
                .chain(rule.node_selector.iter())
                .chain(rule.ingress.iter().flat_map(|r| r.selectors()))
                .chain(rule.ingress_deny.iter().flat_map(|r| r.selectors()))
                .chain(rule.egress.iter().flat_map(|r| r.selectors()))
                .chain(rule.egress_deny.iter().flat_map(|r| r.selectors()));
            for sel in selectors {
                sel.validate().map_err(|e| format!("rule {i}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// One policy rule (`spec` or an entry of `specs`), Cilium's `api.Rule`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub endpoint_selector: Option<LabelSelector>,
    /// Host policies; strait enforces pod endpoints only, so rules with a node selector never
    /// select anything here.
    #[serde(default)]
    pub node_selector: Option<LabelSelector>,
    #[serde(default, deserialize_with = "null_default")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub ingress_deny: Vec<IngressRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub egress: Vec<EgressRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub egress_deny: Vec<EgressRule>,
    #[serde(default)]
    pub enable_default_deny: Option<DefaultDeny>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `enableDefaultDeny`: per direction, whether selecting an endpoint switches that direction
/// to default deny (unset = yes when the rule has rules for that direction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct DefaultDeny {
    #[serde(default)]
    pub ingress: Option<bool>,
    #[serde(default)]
    pub egress: Option<bool>,
}

/// An `ingress` or `ingressDeny` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default)]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default)]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, deserialize_with = "null_default")]
    pub from_requires: Vec<LabelSelector>,
    #[serde(default, rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<Value>>,
    #[serde(default)]
    pub from_groups: Option<Vec<Value>>,
    #[serde(default)]
    pub from_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, deserialize_with = "null_default")]
    pub to_ports: Vec<PortRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub icmps: Vec<Value>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
}

impl IngressRule {
    fn selectors(&self) -> impl Iterator<Item = &LabelSelector> {
        self.from_endpoints
            .iter()
            .flatten()
            .chain(self.from_requires.iter())
            .chain(self.from_nodes.iter().flatten())
    }
}

/// An `egress` or `egressDeny` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default)]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default)]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, deserialize_with = "null_default")]
    pub to_requires: Vec<LabelSelector>,
    #[serde(default, rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<Value>>,
    #[serde(default, rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<Value>>,
    #[serde(default)]
    pub to_services: Option<Vec<Value>>,
    #[serde(default)]
    pub to_groups: Option<Vec<Value>>,
    #[serde(default)]
    pub to_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, deserialize_with = "null_default")]
    pub to_ports: Vec<PortRule>,
    #[serde(default, deserialize_with = "null_default")]
    pub icmps: Vec<Value>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
}

impl EgressRule {
    fn selectors(&self) -> impl Iterator<Item = &LabelSelector> {
        self.to_endpoints
            .iter()
            .flatten()
            .chain(self.to_requires.iter())
            .chain(self.to_nodes.iter().flatten())
    }
}

/// `authentication: {mode: required|disabled}` (mutual authentication).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Authentication {
    #[serde(default)]
    pub mode: String,
}

impl Authentication {
    /// Whether the rule asks for authentication strait cannot perform.
    pub fn is_required(&self) -> bool {
        !self.mode.is_empty() && !self.mode.eq_ignore_ascii_case("disabled")
    }
}

/// A `toPorts` entry: L4 ports and optional L7 rules.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<PortProtocol>,
    /// L7 rules (`http`, `kafka`, `dns`, `l7proto`…), kept opaque.
    #[serde(default)]
    pub rules: Option<Value>,
    #[serde(default, deserialize_with = "null_default")]
    pub server_names: Vec<String>,
    #[serde(default, rename = "originatingTLS")]
    pub originating_tls: Option<Value>,
    #[serde(default, rename = "terminatingTLS")]
    pub terminating_tls: Option<Value>,
    #[serde(default)]
    pub listener: Option<Value>,
}

impl PortRule {
    /// What in this entry needs an L7 proxy, if anything (`None` for plain L4).
    pub fn l7_feature(&self) -> Option<&'static str> {
        if self.rules.as_ref().is_some_and(|v| !value_is_empty(v)) {
            Some("L7 rules")
        } else if !self.server_names.is_empty() {
            Some("serverNames")
        } else if self.originating_tls.is_some() || self.terminating_tls.is_some() {
            Some("TLS interception")
        } else if self.listener.is_some() {
            Some("listener")
        } else {
            None
        }
    }
}

/// Whether an opaque value holds nothing (null, `{}`, `[]`, or a map of such).
fn value_is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(value_is_empty),
        _ => false,
    }
}

/// `{port: "8080", endPort: 8090, protocol: TCP}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// Number or name; YAML integers are accepted as well as strings.
    #[serde(default, deserialize_with = "port_string")]
    pub port: String,
    #[serde(default)]
    pub end_port: Option<i64>,
    /// `TCP`, `UDP`, `SCTP`, `ANY` (missing = `ANY`).
    #[serde(default)]
    pub protocol: Option<String>,
}

fn port_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(serde::de::Error::custom(format!(
                "port must be a string or number, got {other:?}"
            )));
        }
    })
}

/// A Kubernetes label selector as written in a policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

impl LabelSelector {
    /// Kubernetes' own validity rules for requirements.
    pub fn validate(&self) -> Result<(), String> {
        for req in &self.match_expressions {
            match req.operator {
                SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions key {:?}: operator {:?} needs values",
                        req.key, req.operator
                    ));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !req.values.is_empty() =>
                {
                    return Err(format!(
                        "matchExpressions key {:?}: operator {:?} takes no values",
                        req.key, req.operator
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, deserialize_with = "null_default")]
    pub values: Vec<String>,
}

/// Label selector operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Result of [`parse_documents`]: the policies, one error per rejected document, and how many
/// documents were not policies.
#[derive(Debug, Default)]
pub struct ParsedDocuments {
    pub policies: Vec<CiliumPolicy>,
    pub errors: Vec<PolicyError>,
    /// Documents of other kinds (and empty documents) that were skipped.
    pub skipped: usize,
}

fn value_name(v: &Value) -> Option<String> {
    v.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Parses a (multi-document) YAML or JSON stream. Documents of other kinds are skipped, as are
/// empty ones; `List` objects (`kind: List` or `…List`) contribute their items. A document that
/// is not a valid policy yields a [`PolicyError`] naming its index (0-based, in stream order)
/// and name; the others are still returned. A YAML syntax error ends the stream, since the
/// parser cannot resynchronise after it.
pub fn parse_documents(input: &str) -> ParsedDocuments {
    let mut out = ParsedDocuments::default();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        match Value::deserialize(doc) {
            Ok(value) => add_value(index, value, &mut out),
            Err(e) => {
                out.errors.push(PolicyError::Yaml {
                    index,
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    out
}

fn add_value(index: usize, value: Value, out: &mut ParsedDocuments) {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    match kind {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            let name = value_name(&value);
            match CiliumPolicy::from_value(value) {
                Ok(p) => out.policies.push(p),
                Err(reason) => out.errors.push(PolicyError::Invalid {
                    index,
                    name,
                    reason,
                }),
            }
        }
        k if k.ends_with("List") => match value.get("items") {
            Some(Value::Sequence(items)) => {
                for item in items {
                    add_value(index, item.clone(), out);
                }
            }
            _ => out.skipped += 1,
        },
        _ => out.skipped += 1,
    }
}
