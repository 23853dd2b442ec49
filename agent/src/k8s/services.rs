//! Services and their EndpointSlices → the local cluster's `ClusterService` in the state
//! model: ClusterIPs with the service ports as frontends, ready (or serving) endpoints as
//! active backends, terminating-but-serving ones as terminating, the rest skipped; global,
//! shared and affinity from the annotations (with the old `io.cilium/` aliases).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::annotations;
use crate::state::{self, Backend, BackendState, ClusterName, PortMap};

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn protocol(p: Option<&str>) -> Option<state::Protocol> {
    state::Protocol::parse(p.unwrap_or("TCP"))
}

/// The service as the local cluster defines it; `None` for services without a ClusterIP
/// (headless, ExternalName): there is no VIP to balance.
pub fn cluster_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    cluster: ClusterName,
    cluster_id: u32,
) -> Option<state::ClusterService> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = svc.spec.as_ref()?;
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if ips.is_empty() {
        return None;
    }
    let ports: PortMap = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            Some((
                p.name.clone().unwrap_or_default(),
                (protocol(p.protocol.as_deref())?, port),
            ))
        })
        .collect();
    let frontends = ips.into_iter().map(|ip| (ip, ports.clone())).collect();

    let mut backends: BTreeMap<IpAddr, Backend> = BTreeMap::new();
    for slice in slices {
        let slice_ports: PortMap = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                Some((
                    p.name.clone().unwrap_or_default(),
                    (protocol(p.protocol.as_deref())?, port),
                ))
            })
            .collect();
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = match (ready, serving, terminating) {
                (true, _, false) => BackendState::Active,
                (_, true, true) => BackendState::Terminating,
                // Neither ready nor serving: not a backend (as Cilium's exporter skips it).
                _ => continue,
            };
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let entry = backends.entry(ip).or_insert_with(|| Backend {
                    ip,
                    ports: PortMap::new(),
                    state,
                });
                entry.ports.extend(slice_ports.clone());
                if state == BackendState::Active {
                    entry.state = BackendState::Active;
                }
            }
        }
    }

    let parsed = annotations::parse_global_service_annotations(
        &svc.metadata.annotations.clone().unwrap_or_default(),
    );
    for warning in &parsed.warnings {
        tracing::warn!(service = %format!("{namespace}/{name}"), "{warning}");
    }
    Some(state::ClusterService {
        name: state::ServiceName::new(&namespace, &name),
        cluster,
        cluster_id,
        frontends,
        backends: backends.into_values().collect(),
        global: parsed.global,
        shared: parsed.shared,
        affinity: parsed.affinity,
    })
}

/// The slices belonging to `svc`.
pub fn slices_of<'a>(svc: &Service, slices: &'a [EndpointSlice]) -> Vec<&'a EndpointSlice> {
    let (name, ns) = (
        svc.metadata.name.as_deref(),
        svc.metadata.namespace.as_deref().unwrap_or("default"),
    );
    slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == ns
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == name
        })
        .collect()
}
