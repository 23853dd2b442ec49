//! What the fuzz targets share: how an input's bytes become a decoder's arguments, the
//! round-trip check, and the kvstore driver that feeds a value through the same path a
//! remote cluster's etcd event takes (decode → validate → convert → state model).
//!
//! Inputs are plain text where the decoder's input is text, so seeds stay readable: header
//! lines (up to `\n`) first, then the value itself.

use std::fmt::Debug;
use std::sync::{Arc, LazyLock};

use strait::identity::MaxConnectedClusters;
use strait::kvstore::listwatch::WatchEvent;
use strait::mesh::limits::{ClusterLimits, RemoteLimits};
use strait::mesh::sync::{ClusterSource, KindSync, Origin};
use strait::metrics::Metrics;
use strait::state::StateHandle;
use strait::wire::{DataKind, RemoteContext};

/// The local cluster the targets pretend to be.
pub const LOCAL_CLUSTER: &str = "local";
pub const LOCAL_CLUSTER_ID: u32 = 200;

/// Splits `N` header lines off `data`; `None` when there are fewer or one is not UTF-8.
pub fn split_lines<const N: usize>(data: &[u8]) -> Option<([&str; N], &[u8])> {
    let mut rest = data;
    let mut out = [""; N];
    for slot in &mut out {
        let end = rest.iter().position(|b| *b == b'\n')?;
        *slot = std::str::from_utf8(&rest[..end]).ok()?;
        rest = &rest[end + 1..];
    }
    Some((out, rest))
}

/// `decode(encode(v)) == v`: what we decoded, we can write back and read again unchanged.
pub fn round_trip<T, E1, E2>(
    value: &T,
    encode: impl Fn(&T) -> Result<Vec<u8>, E1>,
    decode: impl Fn(&[u8]) -> Result<T, E2>,
) -> Vec<u8>
where
    T: PartialEq + Debug,
    E1: Debug,
    E2: Debug,
{
    let bytes = encode(value).expect("a decoded value encodes");
    let again = decode(&bytes).unwrap_or_else(|e| {
        panic!(
            "re-encoded value does not decode: {e:?}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&again, value, "round trip changed the value");
    bytes
}

/// A kvstore input: `<remote name>\n<cluster id>\n<key suffix>\n<value>`. An empty remote
/// name stands for our own cluster's kvstore (kvstore mode: the relaxed local rules).
pub struct KvInput<'a> {
    pub remote: Option<RemoteContext>,
    pub suffix: &'a str,
    pub value: &'a [u8],
}

impl<'a> KvInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let ([name, id, suffix], value) = split_lines::<3>(data)?;
        let remote = (!name.is_empty()).then(|| {
            // "<id>" or "<id>/511" (the local maxConnectedClusters).
            let (id, max) = id.split_once('/').unwrap_or((id, "255"));
            let max = match max {
                "511" => MaxConnectedClusters::Max511,
                _ => MaxConnectedClusters::Max255,
            };
            RemoteContext::new(name, id.parse().unwrap_or(1), max)
        });
        Some(KvInput {
            remote,
            suffix,
            value,
        })
    }

    fn cluster(&self) -> &str {
        self.remote
            .as_ref()
            .map_or(LOCAL_CLUSTER, |r| r.name.as_str())
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Feeds the input through a [`KindSync`] of `kind`, as the list-watch would: created, listed,
/// modified with `extra` (e.g. the re-encoded value), deleted. Returns the state model
/// after the upserts, for the target's own checks.
pub fn sync(kind: DataKind, input: &KvInput, extra: Option<Vec<u8>>) -> StateHandle {
    let state = StateHandle::new(LOCAL_CLUSTER, LOCAL_CLUSTER_ID);
    let origin = match &input.remote {
        Some(ctx) => {
            // A remote whose ID clashes is refused before its data is read.
            if state
                .update(|m| m.register_cluster(&ctx.name, ctx.cluster_id))
                .is_err()
            {
                return state;
            }
            Origin::Remote(ctx.clone())
        }
        None => Origin::Local,
    };
    let source = ClusterSource {
        cluster: input.cluster().to_owned(),
        cached: false,
        origin,
        state: state.clone(),
        metrics: METRICS.clone(),
        limits: Arc::new(ClusterLimits::new(
            input.remote.as_ref().map(|_| RemoteLimits::default()),
        )),
    };
    let mut sync = KindSync::new(source, kind, Arc::default(), Arc::default());
    let key = kind.key(input.cluster(), false, input.suffix);
    let mut events = vec![
        WatchEvent::Upsert {
            key: key.clone(),
            value: input.value.to_vec(),
            is_create: true,
        },
        WatchEvent::ListDone,
    ];
    if let Some(value) = extra {
        events.push(WatchEvent::Upsert {
            key: key.clone(),
            value,
            is_create: false,
        });
    }
    sync.apply_batch(events);
    {
        // What the reconcilers read next.
        let m = state.read();
        let _ = m.ipcache().count();
        let _ = m.service_views();
        let _ = m.routable_nodes().count();
        let _ = m.counts(input.cluster());
    }
    sync.apply_batch(vec![WatchEvent::Delete { key }]);
    state
}
