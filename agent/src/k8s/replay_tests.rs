//! The API-server source against a tiny HTTP server speaking the Kubernetes list/watch wire
//! protocol (list JSON with `metadata.resourceVersion`, items without `kind`; watch as
//! newline-delimited `{"type": ..., "object": ...}` events on a long-lived response), fed
//! with the objects in `testdata/usa-1.json` (written in the API server's wire shape). Exercises kube-rs's real client and watchers, the field
//! selectors, the caches and the shared translation into the state model.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Bytes, Frame},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::api::{ApiSource, WatchSet};
use crate::{policy, state::StateHandle};

const FIXTURES: &str = include_str!("testdata/usa-1.json");

type Body = BoxBody<Bytes, Infallible>;

/// Serves `fixtures`: `lists` by path, `watches` by path (events sent once, on the first
/// watch of that path; later watches stay open and quiet, as an idle API server's do).
struct FakeApiServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(
    fixtures: &Value,
    path: &str,
    query: &str,
    watched: &Mutex<Vec<String>>,
) -> Response<Body> {
    let json = |status: u16, v: &Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(
                http_body_util::Full::new(Bytes::from(v.to_string()))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap()
    };
    let Some(list) = fixtures["lists"].get(path) else {
        return json(
            404,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not served"}),
        );
    };
    if !query.split('&').any(|kv| kv == "watch=true") {
        return json(200, list);
    }
    let first = {
        let mut w = watched.lock().unwrap();
        let first = !w.iter().any(|p| p == path);
        w.push(path.to_owned());
        first
    };
    let events: Vec<Result<Frame<Bytes>, Infallible>> = if first {
        fixtures["watches"][path]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| Ok(Frame::data(Bytes::from(format!("{e}\n")))))
            .collect()
    } else {
        Vec::new()
    };
    let stream = futures_util::stream::iter(events).chain(futures_util::stream::pending());
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

impl FakeApiServer {
    async fn start(fixtures: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let watched = Arc::new(Mutex::new(Vec::new()));
        let fixtures = Arc::new(fixtures);
        let log = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (fixtures, log, watched) = (fixtures.clone(), log.clone(), watched.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_owned();
                        let query = req.uri().query().unwrap_or_default().to_owned();
                        log.lock().unwrap().push(format!("{path}?{query}"));
                        let resp = respond(&fixtures, &path, &query, &watched);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn watchers_list_then_follow_the_api_server() {
    let fixtures: Value = serde_json::from_str(FIXTURES).unwrap();
    let server = FakeApiServer::start(fixtures).await;
    let state = StateHandle::new("cluster-usa", 1);
    let source = ApiSource::spawn(
        server.client(),
        WatchSet::Agent {
            node: "usa-1".into(),
        },
        state.clone(),
        1,
    );
    let mut synced = source.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
        .await
        .expect("the source never synced")
        .unwrap();

    // The listed objects, through the same Objects as the manifests source.
    let objects = source.objects().borrow().clone();
    assert_eq!(objects.pods.len(), 1, "only this node's pods");
    assert_eq!(objects.namespaces.len(), 2);
    assert_eq!(
        objects
            .node_pod_cidrs("usa-1")
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.1.0.0/24"]
    );
    let names: Vec<String> = objects.policies.iter().map(|p| p.display_name()).collect();
    assert_eq!(
        names,
        ["default/cross-cluster-db-access"],
        "the invalid one is refused"
    );

    // The pod's identity labels and the policy translation are the shared functions too.
    let pod = &objects.pods[0];
    let ns = objects.namespaces[0]
        .metadata
        .labels
        .clone()
        .unwrap_or_default();
    let labels = super::labels::pod_identity_labels(pod, &ns, "cluster-usa");
    assert!(
        labels.to_sorted_list().contains("k8s:app=frontend;"),
        "{labels:?}"
    );
    let frontend = 70001;
    let db = policy::translate(
        &objects.policies,
        &super::labels::pod_identity_labels(
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "db", "namespace": "default", "labels": {"app": "database"}}
            }))
            .unwrap(),
            &ns,
            "cluster-europe",
        ),
        &[(frontend, labels)],
        "cluster-europe",
    );
    assert!(db.allows(
        policy::Direction::Ingress,
        frontend,
        policy::PROTO_TCP,
        5432
    ));
    assert!(!db.allows(policy::Direction::Ingress, 70002, policy::PROTO_TCP, 5432));

    // The listed services, then the watches: a MODIFIED slice (a second backend became
    // ready) and an ADDED service. The `kubernetes` service has no slices: no backends.
    let views = || {
        state
            .read()
            .service_views()
            .iter()
            .map(|v| (v.name.name.clone(), v.global, v.active.len()))
            .collect::<Vec<_>>()
    };
    eventually("the watched updates", || {
        views()
            == [
                ("kubernetes".to_owned(), false, 0),
                ("ledger".to_owned(), false, 0),
                ("payment-api".to_owned(), true, 2),
            ]
    })
    .await;

    let requests = server.requests();
    let has = |needle: &str| requests.iter().any(|r| r.contains(needle));
    assert!(
        has("/api/v1/pods?") && has("fieldSelector=spec.nodeName%3Dusa-1"),
        "{requests:?}"
    );
    assert!(has("fieldSelector=metadata.name%3Dusa-1"), "{requests:?}");
    assert!(
        has("/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies?"),
        "{requests:?}"
    );
    // Every watch resumes from the list's resourceVersion.
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("watch=true"))
            .all(|r| r.contains("resourceVersion=")),
        "{requests:?}"
    );
}
