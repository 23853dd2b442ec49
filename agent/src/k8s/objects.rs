//! Typed Kubernetes objects read from YAML (multi-document files), with a report of what was
//! skipped and why: a bad document is logged and skipped, never fatal for the others.

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    serde::Deserialize as _,
};

/// Everything read from one pass over the source.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    /// Documents that could not be used: (origin, reason).
    pub skipped: Vec<(String, String)>,
}

impl Objects {
    /// Adds every document of a YAML stream; `origin` names it in reports (file name).
    pub fn add_yaml(&mut self, origin: &str, text: &str) {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    self.skipped
                        .push((format!("{origin} document {}", i + 1), e.to_string()));
                    // A syntax error ends the stream: later documents cannot be located.
                    break;
                }
            };
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let at = format!("{origin} document {} ({kind})", i + 1);
            let result = match kind.as_str() {
                "Service" => serde_yaml_ng::from_value(value).map(|o| self.services.push(o)),
                "EndpointSlice" => {
                    serde_yaml_ng::from_value(value).map(|o| self.endpoint_slices.push(o))
                }
                "Pod" => serde_yaml_ng::from_value(value).map(|o| self.pods.push(o)),
                "Namespace" => serde_yaml_ng::from_value(value).map(|o| self.namespaces.push(o)),
                // Policies and other kinds are read by their own consumers.
                _ => Ok(()),
            };
            if let Err(e) = result {
                self.skipped.push((at, e.to_string()));
            }
        }
    }
}
