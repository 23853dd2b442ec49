//! The API-server source: list-watches of this cluster's objects, kept as [`Objects`] and
//! applied to the state model with the same functions the manifests source uses.
//!
//! Each resource has its own watcher (kube-runtime: list, then watch from the list's
//! resourceVersion, relist on `410 Gone`, backoff on errors). A relist replaces that
//! resource's whole set when it completes, so an object deleted while the watch was down
//! vanishes instead of lingering (Cilium's stale-backend bug). Services are applied only once
//! every watched resource has listed, so a half-listed cluster never deletes services.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
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

/// One resource's objects by `namespace/name`, as its watcher reported them.
#[derive(Debug)]
pub struct Cache<V> {
    live: BTreeMap<String, V>,
    /// Objects of a relist in progress; they replace `live` when it completes.
    relist: Option<BTreeMap<String, V>>,
    synced: bool,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
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

impl<V: Clone> Cache<V> {
    /// Applies one watcher event; returns whether the visible set may have changed. An
    /// object `convert` refuses is logged and not stored; an object already stored keeps
    /// its last accepted version (a bad edit does not silently remove a policy).
    pub fn apply<K: Resource>(
        &mut self,
        what: &str,
        event: watcher::Event<K>,
        convert: impl Fn(K) -> Result<V, String>,
    ) -> bool {
        let convert = |obj: K| -> (String, Option<V>) {
            let key = object_key(&obj);
            match convert(obj) {
                Ok(v) => (key, Some(v)),
                Err(reason) => {
                    tracing::warn!(resource = what, object = %key, %reason, "object refused");
                    (key, None)
                }
            }
        };
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let (key, value) = convert(obj);
                if let Some(v) = value.or_else(|| self.live.get(&key).cloned()) {
                    self.relist.get_or_insert_default().insert(key, v);
                }
                false
            }
            watcher::Event::InitDone => {
                self.live = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply(obj) => match convert(obj) {
                (key, Some(v)) => {
                    self.live.insert(key, v);
                    true
                }
                (_, None) => false,
            },
            watcher::Event::Delete(obj) => self.live.remove(&object_key(&obj)).is_some(),
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.live.values()
    }
}

/// Every resource's cache.
#[derive(Debug, Default)]
pub struct Caches {
    pub services: Cache<Service>,
    pub endpoint_slices: Cache<EndpointSlice>,
    pub pods: Cache<Pod>,
    pub namespaces: Cache<Namespace>,
    pub nodes: Cache<Node>,
    pub network_policies: Cache<CiliumPolicy>,
    pub clusterwide_policies: Cache<CiliumPolicy>,
}

impl Caches {
    /// Whether every resource of `set` has completed its first list.
    pub fn synced(&self, set: &WatchSet) -> bool {
        let services = self.services.synced() && self.endpoint_slices.synced();
        match set {
            WatchSet::ServiceExport => services,
            WatchSet::Agent { .. } => {
                services
                    && self.pods.synced()
                    && self.namespaces.synced()
                    && self.nodes.synced()
                    && self.network_policies.synced()
                    && self.clusterwide_policies.synced()
            }
        }
    }

    /// The objects as one [`Objects`] (the type the manifests source produces too).
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self.services.values().cloned().collect(),
            endpoint_slices: self.endpoint_slices.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            namespaces: self.namespaces.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
            policies: self
                .network_policies
                .values()
                .chain(self.clusterwide_policies.values())
                .cloned()
                .collect(),
            skipped: Vec::new(),
        }
    }
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
pub fn policy_from_dynamic(ar: &ApiResource, obj: DynamicObject) -> Result<CiliumPolicy, String> {
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".into(), ar.api_version.clone().into());
    doc.insert("kind".into(), ar.kind.clone().into());
    doc.insert(
        "metadata".into(),
        serde_json::json!({"name": obj.metadata.name, "namespace": obj.metadata.namespace}),
    );
    if let serde_json::Value::Object(data) = obj.data {
        doc.extend(
            data.into_iter()
                .filter(|(k, _)| k == "spec" || k == "specs"),
        );
    }
    let value = serde_yaml_ng::to_value(serde_json::Value::Object(doc))
        .map_err(|e| format!("converting the object: {e}"))?;
    CiliumPolicy::from_value(value)
}

struct Shared {
    caches: Mutex<Caches>,
    changed: Notify,
}

impl Shared {
    fn caches(&self) -> MutexGuard<'_, Caches> {
        // A panic while holding the lock cannot leave a cache half-updated in a way later
        // events do not repair (each event replaces whole entries), so poisoning is ignored.
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }
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
        let shared = Arc::new(Shared {
            caches: Mutex::new(Caches::default()),
            changed: Notify::new(),
        });
        let mut tasks = vec![
            spawn_watch(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
                "services",
                shared.clone(),
                |c| &mut c.services,
                Ok,
            ),
            spawn_watch(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
                "endpointslices",
                shared.clone(),
                |c| &mut c.endpoint_slices,
                Ok,
            ),
        ];
        if let WatchSet::Agent { node } = &set {
            tasks.push(spawn_watch(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                "pods",
                shared.clone(),
                |c| &mut c.pods,
                Ok,
            ));
            tasks.push(spawn_watch(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
                "namespaces",
                shared.clone(),
                |c| &mut c.namespaces,
                Ok,
            ));
            tasks.push(spawn_watch(
                Api::<Node>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={node}")),
                "nodes",
                shared.clone(),
                |c| &mut c.nodes,
                Ok,
            ));
            for (kind, plural, pick) in [
                (
                    "CiliumNetworkPolicy",
                    "ciliumnetworkpolicies",
                    (|c| &mut c.network_policies) as fn(&mut Caches) -> &mut Cache<CiliumPolicy>,
                ),
                (
                    "CiliumClusterwideNetworkPolicy",
                    "ciliumclusterwidenetworkpolicies",
                    |c| &mut c.clusterwide_policies,
                ),
            ] {
                let ar = policy_api_resource(kind, plural);
                tasks.push(spawn_watch(
                    Api::<DynamicObject>::all_with(client.clone(), &ar),
                    watcher::Config::default(),
                    plural,
                    shared.clone(),
                    pick,
                    move |obj| policy_from_dynamic(&ar, obj),
                ));
            }
        }

        let (objects_tx, objects) = watch::channel(Objects::default());
        let (synced_tx, synced) = watch::channel(false);
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut applied = Default::default();
            loop {
                shared.changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
                let snapshot = {
                    let caches = shared.caches();
                    caches.synced(&set).then(|| caches.snapshot())
                };
                let Some(snapshot) = snapshot else {
                    continue;
                };
                applied = snapshot.apply_services(&state, cluster_id, &applied);
                if !*synced_tx.borrow() {
                    tracing::info!(
                        services = snapshot.services.len(),
                        pods = snapshot.pods.len(),
                        policies = snapshot.policies.len(),
                        "Kubernetes objects listed"
                    );
                    synced_tx.send_replace(true);
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

fn spawn_watch<K, V>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    shared: Arc<Shared>,
    pick: fn(&mut Caches) -> &mut Cache<V>,
    convert: impl Fn(K) -> Result<V, String> + Send + 'static,
) -> AbortOnDrop
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    V: Clone + Send + 'static,
{
    AbortOnDrop(tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut last_error = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    // Server-side-apply bookkeeping is large and never read.
                    let event = event.modify(|o| o.managed_fields_mut().clear());
                    let changed = pick(&mut shared.caches()).apply(what, event, &convert);
                    if changed {
                        shared.changed.notify_one();
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
    }))
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

    #[test]
    fn a_relist_drops_what_vanished_while_disconnected() {
        use watcher::Event::*;
        let mut c: Cache<Service> = Cache::default();
        assert!(!c.apply("services", Init, Ok));
        assert!(!c.apply("services", InitApply(svc("a", "1")), Ok));
        assert!(!c.apply("services", InitApply(svc("b", "1")), Ok));
        assert!(!c.synced());
        assert!(c.apply("services", InitDone, Ok));
        assert!(c.synced());
        assert_eq!(c.values().count(), 2);
        // Watch lost; `b` was deleted meanwhile; the relist does not mention it.
        c.apply("services", Init, Ok);
        c.apply("services", InitApply(svc("a", "2")), Ok);
        // Until the relist completes, the old view stays whole.
        assert_eq!(c.values().count(), 2);
        c.apply("services", InitDone, Ok);
        let names: Vec<_> = c.values().filter_map(|s| s.metadata.name.clone()).collect();
        assert_eq!(names, ["a"]);
        assert!(c.apply("services", Delete(svc("a", "3")), Ok));
        assert_eq!(c.values().count(), 0);
        assert!(!c.apply("services", Delete(svc("a", "3")), Ok));
    }

    #[test]
    fn a_refused_update_keeps_the_last_accepted_version() {
        use watcher::Event::*;
        let refuse_rv2 = |s: Service| match s.metadata.resource_version.as_deref() {
            Some("2") => Err("bad".to_owned()),
            _ => Ok(s),
        };
        let mut c: Cache<Service> = Cache::default();
        c.apply("services", Apply(svc("a", "1")), refuse_rv2);
        assert!(!c.apply("services", Apply(svc("a", "2")), refuse_rv2));
        assert_eq!(
            c.values()
                .next()
                .unwrap()
                .metadata
                .resource_version
                .as_deref(),
            Some("1")
        );
        // A new object that is refused is not stored at all.
        assert!(!c.apply("services", Apply(svc("b", "2")), refuse_rv2));
        assert_eq!(c.values().count(), 1);
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
        let p = policy_from_dynamic(&ar, obj).unwrap();
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
        let err = policy_from_dynamic(&ccnp, bad).unwrap_err();
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
