//! The API-server source: list-watches of this cluster's objects, kept as [`Objects`] and
//! applied to the state model with the same functions the manifests source uses.
//!
//! Each resource has its own watcher (kube-runtime: list, then watch from the list's
//! resourceVersion, relist on `410 Gone`, backoff on errors) feeding a kube-runtime reflector
//! store. A relist replaces that resource's whole set when it completes, so an object deleted
//! while the watch was down vanishes instead of lingering (Cilium's stale-backend bug).
//! Services are applied only once every watched resource has listed, so a half-listed cluster
//! never deletes services.

use std::{fmt::Debug, hash::Hash, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{
            ObjectRef, Store,
            store::{Writer, WriterDropped},
        },
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use super::{K8sError, Objects};
use crate::{
    policy::{CILIUM_API_VERSION, CiliumPolicy},
    state::StateHandle,
    task::AbortOnDrop,
};

/// One resource a watcher reads, with the RBAC verbs it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchedResource {
    /// API group; `""` is the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The plural resource name RBAC rules use.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// What a kube-runtime watcher does: list, then watch. No `get`: nothing reads single objects.
pub const WATCH_VERBS: &[&str] = &["list", "watch"];

const fn watched(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    resource: &'static str,
) -> WatchedResource {
    WatchedResource {
        group,
        version,
        kind,
        resource,
        verbs: WATCH_VERBS,
    }
}

/// Everything `strait agent` watches (its ClusterRole must grant exactly this). Pods are
/// field-selected to this node, Nodes to this node's own object.
pub const AGENT_WATCHES: &[WatchedResource] = &[
    watched("", "v1", "Pod", "pods"),
    watched("", "v1", "Namespace", "namespaces"),
    watched("", "v1", "Service", "services"),
    watched("", "v1", "Node", "nodes"),
    watched("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    watched(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
    ),
    watched(
        "cilium.io",
        "v2",
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
    ),
];

/// What `strait kvstoremesh --kubernetes-api` watches to export global services.
pub const SERVICE_EXPORT_WATCHES: &[WatchedResource] = &[
    watched("", "v1", "Service", "services"),
    watched("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
];

/// Which watchers to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchSet {
    /// The node agent: [`AGENT_WATCHES`], pods and node object of `node`.
    Agent { node: String },
    /// The service exporter: [`SERVICE_EXPORT_WATCHES`].
    ServiceExport,
}

impl WatchSet {
    pub fn resources(&self) -> &'static [WatchedResource] {
        match self {
            WatchSet::Agent { .. } => AGENT_WATCHES,
            WatchSet::ServiceExport => SERVICE_EXPORT_WATCHES,
        }
    }
}

/// A client with in-cluster credentials (the pod's ServiceAccount). `api_server` replaces the
/// in-cluster address; without it and outside a pod, the kubeconfig is used (development).
pub async fn client(api_server: Option<&hyper::Uri>) -> Result<Client, K8sError> {
    let config = match api_server {
        Some(url) => {
            let mut config = kube::Config::incluster_dns().map_err(|e| K8sError::Client {
                reason: format!("in-cluster credentials for {url}: {e}"),
            })?;
            config.cluster_url = url.clone();
            config
        }
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => kube::Config::infer().await.map_err(|e| K8sError::Client {
                reason: format!("not in a pod ({in_cluster}) and no usable kubeconfig ({e})"),
            })?,
        },
    };
    tracing::info!(api_server = %config.cluster_url, "Kubernetes API client");
    Client::try_from(config).map_err(|e| K8sError::Client {
        reason: e.to_string(),
    })
}

/// The watched objects, one kube-runtime reflector store per resource: a relist is buffered
/// by the store's writer and replaces the store's content only when it completes. Policies
/// are stored as the API server sends them, but only versions the policy parser accepts
/// (see [`apply`]).
struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    /// What only the node agent watches.
    agent: Option<AgentStores>,
}

struct AgentStores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    /// CiliumNetworkPolicies, then CiliumClusterwideNetworkPolicies.
    policies: [(ApiResource, Store<DynamicObject>); 2],
}

impl Stores {
    /// Returns once every store has completed its first list; an error if a watcher is gone
    /// first (the source is being dropped).
    async fn ready(&self) -> Result<(), WriterDropped> {
        self.services.wait_until_ready().await?;
        self.endpoint_slices.wait_until_ready().await?;
        if let Some(a) = &self.agent {
            a.pods.wait_until_ready().await?;
            a.namespaces.wait_until_ready().await?;
            a.nodes.wait_until_ready().await?;
            for (_, store) in &a.policies {
                store.wait_until_ready().await?;
            }
        }
        Ok(())
    }

    /// The objects as one [`Objects`] (the type the manifests source produces too), each
    /// resource in `namespace/name` order.
    fn snapshot(&self) -> Objects {
        let agent = self.agent.as_ref();
        Objects {
            services: sorted(&self.services),
            endpoint_slices: sorted(&self.endpoint_slices),
            pods: agent.map(|a| sorted(&a.pods)).unwrap_or_default(),
            namespaces: agent.map(|a| sorted(&a.namespaces)).unwrap_or_default(),
            nodes: agent.map(|a| sorted(&a.nodes)).unwrap_or_default(),
            policies: agent
                .into_iter()
                .flat_map(|a| &a.policies)
                .flat_map(|(ar, store)| {
                    // Only accepted versions are stored, so none fails here.
                    sorted(store)
                        .into_iter()
                        .filter_map(|obj| policy_from_dynamic(ar, &obj).ok())
                })
                .collect(),
            skipped: Vec::new(),
        }
    }
}

fn object_key<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// A store's objects in `namespace/name` order (a store iterates in hash order).
fn sorted<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut objects: Vec<K> = store.state().iter().map(|o| K::clone(o)).collect();
    objects.sort_by_cached_key(object_key);
    objects
}

/// Applies one watcher event to a store; returns whether the visible set may have changed.
/// An object `check` refuses is logged and not stored; an object already stored keeps its
/// last accepted version (a bad edit does not silently remove a policy).
fn apply<K>(
    writer: &mut Writer<K>,
    dyntype: &K::DynamicType,
    what: &str,
    event: watcher::Event<K>,
    check: impl Fn(&K) -> Result<(), String>,
) -> bool
where
    K: Resource + Clone,
    K::DynamicType: Eq + Hash + Clone,
{
    let stored = |obj: &K| {
        writer
            .as_reader()
            .get(&ObjectRef::from_obj_with(obj, dyntype.clone()))
    };
    let refused = |obj: &K| match check(obj) {
        Ok(()) => false,
        Err(reason) => {
            tracing::warn!(resource = what, object = %object_key(obj), %reason, "object refused");
            true
        }
    };
    let (event, changed) = match event {
        watcher::Event::Apply(obj) if refused(&obj) => return false,
        watcher::Event::InitApply(obj) if refused(&obj) => match stored(&obj) {
            Some(kept) => (watcher::Event::InitApply(K::clone(&kept)), false),
            None => return false,
        },
        watcher::Event::Delete(obj) => {
            let changed = stored(&obj).is_some();
            (watcher::Event::Delete(obj), changed)
        }
        e @ (watcher::Event::Init | watcher::Event::InitApply(_)) => (e, false),
        e @ (watcher::Event::InitDone | watcher::Event::Apply(_)) => (e, true),
    };
    writer.apply_watcher_event(&event);
    changed
}

/// The `cilium.io/v2` resource of a policy kind.
pub fn policy_api_resource(kind: &str, plural: &str) -> ApiResource {
    let (group, version) = CILIUM_API_VERSION
        .split_once('/')
        .unwrap_or(("cilium.io", "v2"));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A policy as the API server returns it → [`CiliumPolicy`], through the same parser and
/// validation as a manifest. List items may lack `apiVersion`/`kind`; they come from `ar`.
pub fn policy_from_dynamic(ar: &ApiResource, obj: &DynamicObject) -> Result<CiliumPolicy, String> {
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".into(), ar.api_version.clone().into());
    doc.insert("kind".into(), ar.kind.clone().into());
    doc.insert(
        "metadata".into(),
        serde_json::json!({"name": obj.metadata.name, "namespace": obj.metadata.namespace}),
    );
    if let serde_json::Value::Object(data) = &obj.data {
        doc.extend(
            data.iter()
                .filter(|(k, _)| *k == "spec" || *k == "specs")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    let value = serde_yaml_ng::to_value(serde_json::Value::Object(doc))
        .map_err(|e| format!("converting the object: {e}"))?;
    CiliumPolicy::from_value(value)
}

/// Coalesces bursts of events (initial lists, rollouts) into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The running API-server source. Stops when dropped.
pub struct ApiSource {
    objects: watch::Receiver<Objects>,
    synced: watch::Receiver<bool>,
    _tasks: Vec<AbortOnDrop>,
}

impl ApiSource {
    /// Starts the watchers of `set` and keeps the local cluster's services in `state` equal
    /// to the cluster's.
    pub fn spawn(client: Client, set: WatchSet, state: StateHandle, cluster_id: u32) -> Self {
        let mut w = Watchers {
            client,
            changed: Arc::new(Notify::new()),
            tasks: Vec::new(),
        };
        let all = watcher::Config::default;
        let stores = Stores {
            services: w.watch("services", all(), (), accept),
            endpoint_slices: w.watch("endpointslices", all(), (), accept),
            agent: match &set {
                WatchSet::ServiceExport => None,
                WatchSet::Agent { node } => Some(AgentStores {
                    pods: w.watch(
                        "pods",
                        all().fields(&format!("spec.nodeName={node}")),
                        (),
                        accept,
                    ),
                    namespaces: w.watch("namespaces", all(), (), accept),
                    nodes: w.watch(
                        "nodes",
                        all().fields(&format!("metadata.name={node}")),
                        (),
                        accept,
                    ),
                    policies: [
                        ("CiliumNetworkPolicy", "ciliumnetworkpolicies"),
                        (
                            "CiliumClusterwideNetworkPolicy",
                            "ciliumclusterwidenetworkpolicies",
                        ),
                    ]
                    .map(|(kind, plural)| {
                        let ar = policy_api_resource(kind, plural);
                        let parse = ar.clone();
                        let store = w.watch(plural, all(), ar.clone(), move |obj| {
                            policy_from_dynamic(&parse, obj).map(drop)
                        });
                        (ar, store)
                    }),
                }),
            },
        };
        let Watchers {
            changed, mut tasks, ..
        } = w;

        let (objects_tx, objects) = watch::channel(Objects::default());
        let (synced_tx, synced) = watch::channel(false);
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            // Services are applied only once every watched resource has listed, so a
            // half-listed cluster never deletes services.
            if stores.ready().await.is_err() {
                return;
            }
            let mut applied = Default::default();
            loop {
                changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
                let snapshot = stores.snapshot();
                applied = snapshot.apply_services(&state, cluster_id, &applied);
                if !*synced_tx.borrow() {
                    tracing::info!(
                        services = snapshot.services.len(),
                        pods = snapshot.pods.len(),
                        policies = snapshot.policies.len(),
                        "Kubernetes objects listed"
                    );
                    // Objects first: whoever sees `synced` finds the full listing.
                    objects_tx.send_replace(snapshot);
                    synced_tx.send_replace(true);
                    continue;
                }
                objects_tx.send_replace(snapshot);
            }
        })));
        Self {
            objects,
            synced,
            _tasks: tasks,
        }
    }

    /// The latest complete view of the watched objects.
    pub fn objects(&self) -> watch::Receiver<Objects> {
        self.objects.clone()
    }

    /// Becomes true once every watched resource has been listed and applied.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }
}

/// Why a watch failed, with what to do about it when the cause is known.
fn watch_error_hint(e: &watcher::Error) -> &'static str {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    match status {
        401 => "the ServiceAccount token was refused",
        403 => "RBAC: the strait ClusterRole must grant list and watch on this resource",
        404 => "resource not served: for the cilium.io policies, install deploy/crds",
        _ => "retrying with backoff",
    }
}

/// Starts watchers, each filling its own store and signalling `changed`.
struct Watchers {
    client: Client,
    changed: Arc<Notify>,
    tasks: Vec<AbortOnDrop>,
}

/// The `check` of resources stored as they come.
fn accept<K>(_: &K) -> Result<(), String> {
    Ok(())
}

impl Watchers {
    fn watch<K>(
        &mut self,
        what: &'static str,
        config: watcher::Config,
        dyntype: K::DynamicType,
        check: impl Fn(&K) -> Result<(), String> + Send + 'static,
    ) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let api = Api::<K>::all_with(self.client.clone(), &dyntype);
        let mut writer = Writer::new(dyntype.clone());
        let store = writer.as_reader();
        let changed = self.changed.clone();
        self.tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().boxed();
            let mut last_error = String::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        // Server-side-apply bookkeeping is large and never read.
                        let event = event.modify(|o| o.managed_fields_mut().clear());
                        if apply(&mut writer, &dyntype, what, event, &check) {
                            changed.notify_one();
                        }
                        last_error.clear();
                    }
                    Err(e) => {
                        let text = e.to_string();
                        // Logged once per distinct error, not on every backoff retry.
                        if text != last_error {
                            tracing::warn!(resource = what, error = %text, hint = watch_error_hint(&e), "Kubernetes watch failed");
                            last_error = text;
                        }
                    }
                }
            }
        })));
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, rv: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    type Check = fn(&Service) -> Result<(), String>;

    fn feed(w: &mut Writer<Service>, check: Check, event: watcher::Event<Service>) -> bool {
        apply(w, &(), "services", event, check)
    }

    /// `name@resourceVersion` of what the store holds, in snapshot order.
    fn held(w: &Writer<Service>) -> Vec<String> {
        sorted(&w.as_reader())
            .into_iter()
            .map(|s| {
                let m = s.metadata;
                format!(
                    "{}@{}",
                    m.name.unwrap_or_default(),
                    m.resource_version.unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn a_relist_drops_what_vanished_while_disconnected() {
        use watcher::Event::*;
        let mut w = Writer::default();
        let ok: Check = accept;
        assert!(!feed(&mut w, ok, Init));
        assert!(!feed(&mut w, ok, InitApply(svc("b", "1"))));
        assert!(!feed(&mut w, ok, InitApply(svc("a", "1"))));
        assert!(held(&w).is_empty());
        assert!(feed(&mut w, ok, InitDone));
        assert_eq!(held(&w), ["a@1", "b@1"]);
        // Watch lost; `b` was deleted meanwhile; the relist does not mention it.
        feed(&mut w, ok, Init);
        feed(&mut w, ok, InitApply(svc("a", "2")));
        // Until the relist completes, the old view stays whole.
        assert_eq!(held(&w), ["a@1", "b@1"]);
        feed(&mut w, ok, InitDone);
        assert_eq!(held(&w), ["a@2"]);
        assert!(feed(&mut w, ok, Delete(svc("a", "3"))));
        assert!(held(&w).is_empty());
        assert!(!feed(&mut w, ok, Delete(svc("a", "3"))));
    }

    #[test]
    fn a_refused_update_keeps_the_last_accepted_version() {
        use watcher::Event::*;
        let refuse_rv2: Check = |s| match s.metadata.resource_version.as_deref() {
            Some("2") => Err("bad".to_owned()),
            _ => Ok(()),
        };
        let mut w = Writer::default();
        feed(&mut w, refuse_rv2, Apply(svc("a", "1")));
        assert!(!feed(&mut w, refuse_rv2, Apply(svc("a", "2"))));
        assert_eq!(held(&w), ["a@1"]);
        // A relist keeps it too.
        feed(&mut w, refuse_rv2, Init);
        feed(&mut w, refuse_rv2, InitApply(svc("a", "2")));
        feed(&mut w, refuse_rv2, InitDone);
        assert_eq!(held(&w), ["a@1"]);
        // A new object that is refused is not stored at all.
        assert!(!feed(&mut w, refuse_rv2, Apply(svc("b", "2"))));
        feed(&mut w, refuse_rv2, Init);
        feed(&mut w, refuse_rv2, InitApply(svc("a", "1")));
        feed(&mut w, refuse_rv2, InitApply(svc("c", "2")));
        feed(&mut w, refuse_rv2, InitDone);
        assert_eq!(held(&w), ["a@1"]);
    }

    #[test]
    fn policies_from_the_api_use_the_manifest_parser() {
        let ar = policy_api_resource("CiliumNetworkPolicy", "ciliumnetworkpolicies");
        assert_eq!(
            (ar.api_version.as_str(), ar.plural.as_str()),
            ("cilium.io/v2", "ciliumnetworkpolicies")
        );
        // A list item as the API server sends it: no apiVersion/kind.
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cross-cluster-db-access", "namespace": "default",
                         "resourceVersion": "7", "uid": "0b7a"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "database"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {
                         "app": "frontend", "io.cilium.k8s.policy.cluster": "cluster-usa"}}]}]},
            "status": {"conditions": []}
        }))
        .unwrap();
        let p = policy_from_dynamic(&ar, &obj).unwrap();
        assert_eq!(p.display_name(), "default/cross-cluster-db-access");
        assert_eq!(p.rules().count(), 1);

        let ccnp = policy_api_resource(
            "CiliumClusterwideNetworkPolicy",
            "ciliumclusterwidenetworkpolicies",
        );
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "no-selector"}, "spec": {"ingress": []}
        }))
        .unwrap();
        let err = policy_from_dynamic(&ccnp, &bad).unwrap_err();
        assert!(err.contains("endpointSelector"), "{err}");
    }

    #[test]
    fn watch_lists_name_real_resources_once() {
        for list in [AGENT_WATCHES, SERVICE_EXPORT_WATCHES] {
            let mut seen = std::collections::BTreeSet::new();
            for r in list {
                assert!(seen.insert((r.group, r.resource)), "{r:?} twice");
                assert_eq!(r.verbs, WATCH_VERBS);
            }
        }
        // The typed watchers' resources are what k8s-openapi says they are.
        let typed = [
            (
                <Pod as k8s_openapi::Resource>::GROUP,
                <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            ),
            (
                <Namespace as k8s_openapi::Resource>::GROUP,
                <Namespace as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            ),
            (
                <Service as k8s_openapi::Resource>::GROUP,
                <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            ),
            (
                <Node as k8s_openapi::Resource>::GROUP,
                <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            ),
            (
                <EndpointSlice as k8s_openapi::Resource>::GROUP,
                <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            ),
        ];
        for (group, resource) in typed {
            assert!(
                AGENT_WATCHES
                    .iter()
                    .any(|r| r.group == group && r.resource == resource),
                "{group}/{resource}"
            );
        }
    }
}
