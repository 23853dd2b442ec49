//! The manifests-directory source: Kubernetes objects as YAML files in a directory, polled for
//! changes (content hash), applied to the state model with the same translation functions the
//! API-server source uses. Used by the demo, dev VMs and tests.

use std::{
    collections::{BTreeSet, HashSet},
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

use super::{K8sError, Objects};
use crate::state::{ServiceName, StateHandle};

pub struct ManifestsSource {
    objects: watch::Receiver<Objects>,
    synced: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for ManifestsSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads every `*.yaml` / `*.yml` file (not hidden) of `dir`, in name order.
pub fn read_dir(dir: &Path) -> Result<(Objects, u64), K8sError> {
    let err = |source| K8sError::ReadDir {
        path: dir.into(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
        .collect();
    files.sort();
    let mut objects = Objects::default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                (file.display().to_string(), &text).hash(&mut hasher);
                objects.add_yaml(&file.display().to_string(), &text);
            }
            Err(e) => objects
                .skipped
                .push((file.display().to_string(), e.to_string())),
        }
    }
    Ok((objects, hasher.finish()))
}

/// How often the manifests directory is read. It stands in for the API server's watch, which
/// delivers a change at once: an EndpointSlice edited in the directory must reach the datapath
/// within a fraction of a second (the failover the end-to-end test measures). A read that finds
/// the same content (hashed) changes nothing, so a short interval costs only the file reads.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

impl ManifestsSource {
    /// Polls `dir` every `interval` and keeps the local cluster's services in `state` equal
    /// to what the manifests define.
    pub fn spawn(dir: PathBuf, state: StateHandle, cluster_id: u32, interval: Duration) -> Self {
        let (tx, objects) = watch::channel(Objects::default());
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last_hash = None;
            let mut reported: HashSet<(String, String)> = HashSet::new();
            let mut applied: BTreeSet<ServiceName> = BTreeSet::new();
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                let path = dir.clone();
                let (objects, hash) = match tokio::task::spawn_blocking(move || read_dir(&path))
                    .await
                {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "manifests directory unreadable; keeping the last state");
                        continue;
                    }
                    Err(_) => return,
                };
                if last_hash == Some(hash) {
                    continue;
                }
                last_hash = Some(hash);
                for skipped in &objects.skipped {
                    if reported.insert(skipped.clone()) {
                        tracing::warn!(document = %skipped.0, reason = %skipped.1, "manifest skipped");
                    }
                }
                applied = apply(&state, &objects, cluster_id, &applied);
                if tx.send(objects).is_err() {
                    return;
                }
                // The first complete read is applied and published: the source has listed.
                synced_tx.send_if_modified(|s| !std::mem::replace(s, true));
            }
        });
        Self {
            objects,
            synced,
            task,
        }
    }

    /// Becomes true once the directory has been read and applied once.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// The objects of the latest read (for consumers of pods and policies).
    pub fn objects(&self) -> watch::Receiver<Objects> {
        self.objects.clone()
    }
}

/// Makes the local cluster's services in `state` those of `objects` (the translation every
/// source shares); returns what is applied.
pub fn apply(
    state: &StateHandle,
    objects: &Objects,
    cluster_id: u32,
    previous: &BTreeSet<ServiceName>,
) -> BTreeSet<ServiceName> {
    objects.apply_services(state, cluster_id, previous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Affinity, BackendState};

    const PAYMENT_API: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: payment-api
  namespace: default
  annotations:
    service.cilium.io/global: "true"
    service.cilium.io/affinity: "local"
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: payment-api}
  ports:
  - port: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: payment-api-abc
  namespace: default
  labels: {kubernetes.io/service-name: payment-api}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.1.0.6]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.1.0.7]
  conditions: {ready: false, serving: false, terminating: false}
"#;

    #[test]
    fn global_service_with_slices_becomes_the_local_cluster_service() {
        let mut objects = Objects::default();
        objects.add_yaml("payment.yaml", PAYMENT_API);
        objects.add_yaml("junk.yaml", "kind: Service\nmetadata: 7\n");
        assert_eq!(objects.skipped.len(), 1, "{:?}", objects.skipped);
        let state = StateHandle::new("cluster-usa", 1);
        let applied = apply(&state, &objects, 1, &BTreeSet::new());
        assert_eq!(applied.len(), 1);

        let m = state.read();
        let view = m.service_views().pop().expect("payment-api");
        assert!(view.global);
        assert_eq!(view.affinity, Affinity::Local);
        assert_eq!(
            view.frontends
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.96.0.10"]
        );
        let active: Vec<String> = view
            .active
            .iter()
            .map(|b| b.backend.ip.to_string())
            .collect();
        assert_eq!(active, ["10.1.0.5"]);
        assert_eq!(view.terminating.len(), 1);
        assert_eq!(view.terminating[0].backend.state, BackendState::Terminating);
        drop(m);

        // The file goes away: the service goes too.
        let applied = apply(&state, &Objects::default(), 1, &applied);
        assert!(applied.is_empty());
        assert!(state.read().service_views().is_empty());
    }

    #[tokio::test]
    async fn directory_changes_reach_the_state_model() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateHandle::new("cluster-usa", 1);
        let source = ManifestsSource::spawn(
            dir.path().into(),
            state.clone(),
            1,
            Duration::from_millis(20),
        );
        std::fs::write(dir.path().join("payment.yaml"), PAYMENT_API).unwrap();
        let wait = |want: usize| {
            let state = state.clone();
            async move {
                for _ in 0..250 {
                    let n = state
                        .read()
                        .service_views()
                        .first()
                        .map_or(0, |v| v.active.len());
                    if n == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("never saw {want} active backends");
            }
        };
        wait(1).await;
        std::fs::write(
            dir.path().join("payment.yaml"),
            PAYMENT_API.replace(
                "addresses: [10.1.0.7]\n  conditions: {ready: false, serving: false",
                "addresses: [10.1.0.7]\n  conditions: {ready: true, serving: true",
            ),
        )
        .unwrap();
        wait(2).await;
        assert_eq!(source.objects().borrow().services.len(), 1);
    }
}
