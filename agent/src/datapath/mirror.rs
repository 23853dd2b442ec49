//! The one "desired vs programmed" mirror every map writer uses.
//!
//! A [`MapMirror`] remembers what the agent has programmed into one kernel map (adopted from
//! the map itself, so a restarted agent diffs against what its pinned maps hold) and only
//! touches entries that differ. A failed delete is never forgotten: the entry stays
//! programmed and pending until a retry removes it (or the key is wanted again). A failed
//! write leaves the mirror as it was, so the writer's next pass writes it again. Every
//! failure is counted in `strait_datapath_map_errors_total{map,op}`; each key is logged once
//! per streak of failures, not on every retry.
//!
//! Writers whose updates must follow an order (the load balancer, policy) drive
//! [`MapMirror::write`] and [`MapMirror::delete`] themselves; the rest hand the whole desired
//! map to [`MapMirror::sync`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::Ipv4Addr,
};

use aya::maps::{
    HashMap as BpfHashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use prometheus_client::metrics::counter::Counter;

use super::DatapathError;
use crate::metrics::{MapOpLabels, Metrics};

/// A kernel map as a mirror sees it, in the writer's own key and value types.
pub trait KernelMap {
    type Key: Ord + Clone + Debug;
    type Value: PartialEq + Clone + Debug;
    /// The map's name (logs and metric labels).
    fn name(&self) -> &'static str;
    /// Every entry the map holds now.
    fn entries(&self) -> Vec<(Self::Key, Self::Value)>;
    fn insert(&mut self, key: &Self::Key, value: &Self::Value) -> Result<(), DatapathError>;
    /// Removes a key; a key that is already absent is not an error.
    fn remove(&mut self, key: &Self::Key) -> Result<(), DatapathError>;
}

/// A map operation, as the `op` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// Outcome of one [`MapMirror::sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport<K> {
    /// Entries programmed after the sync.
    pub entries: usize,
    pub writes: usize,
    pub deletes: usize,
    /// Keys that could not be written, with why (retried by the next sync).
    pub failed: Vec<(K, String)>,
}

impl<K> Default for SyncReport<K> {
    fn default() -> Self {
        Self {
            entries: 0,
            writes: 0,
            deletes: 0,
            failed: Vec::new(),
        }
    }
}

pub struct MapMirror<M: KernelMap> {
    map: M,
    programmed: BTreeMap<M::Key, M::Value>,
    /// Programmed keys whose delete failed: retried until they go or are written again.
    stale: BTreeSet<M::Key>,
    /// Keys whose last operation failed (logged once), with whether they failed again in the
    /// current pass.
    failing: BTreeMap<M::Key, bool>,
    update_errors: Counter,
    delete_errors: Counter,
}

impl<M: KernelMap> MapMirror<M> {
    /// Takes the map, adopting what it holds (a previous agent's pinned entries).
    pub fn new(map: M) -> Self {
        let programmed = map.entries().into_iter().collect();
        Self {
            map,
            programmed,
            stale: BTreeSet::new(),
            failing: BTreeMap::new(),
            update_errors: Counter::default(),
            delete_errors: Counter::default(),
        }
    }

    /// Counts failures in `metrics` (until then they are counted only here).
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        let counter = |op: Op| {
            metrics
                .datapath_map_errors
                .get_or_create(&MapOpLabels {
                    map: self.map.name().into(),
                    op: op.as_str().into(),
                })
                .clone()
        };
        self.update_errors = counter(Op::Update);
        self.delete_errors = counter(Op::Delete);
        self
    }

    pub fn programmed(&self) -> &BTreeMap<M::Key, M::Value> {
        &self.programmed
    }

    /// Whether something is left to retry: a pending delete, or a failure in the last pass.
    pub fn pending(&self) -> bool {
        !self.stale.is_empty() || !self.failing.is_empty()
    }

    /// Failures counted so far for `op`.
    pub fn errors(&self, op: Op) -> u64 {
        self.counter(op).get()
    }

    /// Makes `key` hold `value`. Returns whether the kernel was written (not when the entry
    /// already holds it).
    pub fn write(&mut self, key: M::Key, value: M::Value) -> Result<bool, DatapathError> {
        // Wanted again: a pending delete of it is cancelled once the kernel holds the value.
        if self.programmed.get(&key) == Some(&value) {
            self.stale.remove(&key);
            return Ok(false);
        }
        match self.map.insert(&key, &value) {
            Ok(()) => {
                self.stale.remove(&key);
                self.failing.remove(&key);
                self.programmed.insert(key, value);
                Ok(true)
            }
            Err(e) => {
                self.failed(key, Op::Update, &e);
                Err(e)
            }
        }
    }

    /// Removes `key`. Returns whether the kernel was written (not when the key is not
    /// programmed). A failed delete stays pending and is retried by [`Self::retry_deletes`]
    /// and [`Self::sync`].
    pub fn delete(&mut self, key: &M::Key) -> Result<bool, DatapathError> {
        if !self.programmed.contains_key(key) {
            self.stale.remove(key);
            return Ok(false);
        }
        match self.map.remove(key) {
            Ok(()) => {
                self.stale.remove(key);
                self.failing.remove(key);
                self.programmed.remove(key);
                Ok(true)
            }
            Err(e) => {
                self.stale.insert(key.clone());
                self.failed(key.clone(), Op::Delete, &e);
                Err(e)
            }
        }
    }

    /// Tries every pending delete again. Returns how many went.
    pub fn retry_deletes(&mut self) -> usize {
        let keys: Vec<M::Key> = self.stale.iter().cloned().collect();
        keys.iter()
            .filter(|k| matches!(self.delete(k), Ok(true)))
            .count()
    }

    /// Counts a failure no single key caused (an id allocator out of ids: the map is full).
    pub fn count_error(&self, op: Op) {
        self.counter(op).inc();
    }

    /// Ends a pass over the keys `in_scope` selects: those that did not fail again in it end
    /// their failure streak (they succeeded or nobody wants them any more), so a later
    /// failure is logged again.
    pub fn finish_pass(&mut self, in_scope: impl Fn(&M::Key) -> bool) {
        self.failing
            .retain(|k, again| !in_scope(k) || std::mem::take(again));
    }

    /// Makes the map equal to `desired`: writes what differs, then deletes what nobody wants
    /// (only with `delete_stale`, i.e. after the first full sync, so adopted entries keep
    /// serving until then; deletes that already failed are always retried).
    pub fn sync(
        &mut self,
        desired: &BTreeMap<M::Key, M::Value>,
        delete_stale: bool,
    ) -> SyncReport<M::Key> {
        let mut report = SyncReport::default();
        for (k, v) in desired {
            match self.write(k.clone(), v.clone()) {
                Ok(written) => report.writes += usize::from(written),
                Err(e) => report.failed.push((k.clone(), e.to_string())),
            }
        }
        let unwanted: Vec<M::Key> = self
            .programmed
            .keys()
            .filter(|k| !desired.contains_key(k) && (delete_stale || self.stale.contains(k)))
            .cloned()
            .collect();
        for k in &unwanted {
            if let Ok(true) = self.delete(k) {
                report.deletes += 1;
            }
        }
        self.finish_pass(|_| true);
        report.entries = self.programmed.len();
        report
    }

    fn counter(&self, op: Op) -> &Counter {
        match op {
            Op::Update => &self.update_errors,
            Op::Delete => &self.delete_errors,
        }
    }

    fn failed(&mut self, key: M::Key, op: Op, e: &DatapathError) {
        self.counter(op).inc();
        if self.failing.insert(key.clone(), true).is_none() {
            tracing::error!(
                map = self.map.name(),
                op = op.as_str(),
                key = ?key,
                error = %reason(e),
                "map operation failed; retrying"
            );
        }
    }
}

/// An error with its causes (the errno behind a failed syscall).
fn reason(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A removal of a key that is not there has nothing left to do.
pub(super) fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// An aya hash map with its name and size (for "map is full" errors).
pub struct KernelHash<K, V> {
    map: BpfHashMap<MapData, K, V>,
    name: &'static str,
    max: u32,
}

impl<K: aya::Pod, V: aya::Pod> KernelHash<K, V> {
    pub fn new(map: Map, name: &'static str, max: u32) -> Result<Self, DatapathError> {
        let map =
            BpfHashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map, name, max })
    }
}

impl<K, V> KernelMap for KernelHash<K, V>
where
    K: aya::Pod + Ord + Debug,
    V: aya::Pod + PartialEq + Debug,
{
    type Key = K;
    type Value = V;
    fn name(&self) -> &'static str {
        self.name
    }
    fn entries(&self) -> Vec<(K, V)> {
        self.map.iter().flatten().collect()
    }
    fn insert(&mut self, key: &K, value: &V) -> Result<(), DatapathError> {
        self.map
            .insert(key, value, 0)
            .map_err(|e| DatapathError::map(self.name, self.max, e))
    }
    fn remove(&mut self, key: &K) -> Result<(), DatapathError> {
        absent_ok(self.map.remove(key)).map_err(|e| DatapathError::map(self.name, self.max, e))
    }
}

/// An aya IPv4 LPM trie, keyed by prefix.
pub struct KernelLpm4<V> {
    map: LpmTrie<MapData, u32, V>,
    name: &'static str,
    max: u32,
}

fn lpm4_key(p: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(p.prefix_len()),
        u32::from_ne_bytes(p.addr().octets()),
    )
}

impl<V: aya::Pod> KernelLpm4<V> {
    pub fn new(map: Map, name: &'static str, max: u32) -> Result<Self, DatapathError> {
        let map = LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map, name, max })
    }
}

impl<V: aya::Pod + PartialEq + Debug> KernelMap for KernelLpm4<V> {
    type Key = Ipv4Net;
    type Value = V;
    fn name(&self) -> &'static str {
        self.name
    }
    fn entries(&self) -> Vec<(Ipv4Net, V)> {
        self.map
            .iter()
            .flatten()
            .filter_map(|(k, v)| {
                let addr = Ipv4Addr::from(k.data().to_ne_bytes());
                Some((Ipv4Net::new(addr, k.prefix_len() as u8).ok()?, v))
            })
            .collect()
    }
    fn insert(&mut self, key: &Ipv4Net, value: &V) -> Result<(), DatapathError> {
        self.map
            .insert(&lpm4_key(key), value, 0)
            .map_err(|e| DatapathError::map(self.name, self.max, e))
    }
    fn remove(&mut self, key: &Ipv4Net) -> Result<(), DatapathError> {
        absent_ok(self.map.remove(&lpm4_key(key)))
            .map_err(|e| DatapathError::map(self.name, self.max, e))
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;

    /// A map in memory that fails the keys it is told to.
    #[derive(Default)]
    struct FakeState {
        entries: BTreeMap<u32, u32>,
        fail_insert: BTreeSet<u32>,
        fail_remove: BTreeSet<u32>,
        calls: usize,
    }

    #[derive(Clone, Default)]
    struct Fake(Rc<RefCell<FakeState>>);

    impl KernelMap for Fake {
        type Key = u32;
        type Value = u32;
        fn name(&self) -> &'static str {
            "FAKE"
        }
        fn entries(&self) -> Vec<(u32, u32)> {
            self.0
                .borrow()
                .entries
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect()
        }
        fn insert(&mut self, key: &u32, value: &u32) -> Result<(), DatapathError> {
            let mut s = self.0.borrow_mut();
            s.calls += 1;
            if s.fail_insert.contains(key) {
                return Err(DatapathError::MapFull {
                    map: "FAKE",
                    max: 1,
                });
            }
            s.entries.insert(*key, *value);
            Ok(())
        }
        fn remove(&mut self, key: &u32) -> Result<(), DatapathError> {
            let mut s = self.0.borrow_mut();
            s.calls += 1;
            if s.fail_remove.contains(key) {
                return Err(DatapathError::Io {
                    what: "fake delete",
                    source: std::io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            s.entries.remove(key);
            Ok(())
        }
    }

    impl Fake {
        fn state(&self) -> std::cell::RefMut<'_, FakeState> {
            self.0.borrow_mut()
        }
        fn entries_now(&self) -> BTreeMap<u32, u32> {
            self.0.borrow().entries.clone()
        }
    }

    fn desired(pairs: &[(u32, u32)]) -> BTreeMap<u32, u32> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn adopts_what_the_map_holds_and_writes_only_differences() {
        let fake = Fake::default();
        fake.state().entries = desired(&[(1, 10), (2, 20)]);
        let mut m = MapMirror::new(fake.clone());
        assert_eq!(m.programmed(), &desired(&[(1, 10), (2, 20)]));
        let r = m.sync(&desired(&[(1, 10), (2, 21), (3, 30)]), false);
        assert_eq!((r.writes, r.deletes, r.entries), (2, 0, 3));
        assert_eq!(fake.state().calls, 2);
    }

    #[test]
    fn stale_entries_go_only_once_deletes_are_allowed() {
        let fake = Fake::default();
        fake.state().entries = desired(&[(1, 10), (2, 20)]);
        let mut m = MapMirror::new(fake.clone());
        m.sync(&desired(&[(1, 10)]), false);
        assert_eq!(fake.entries_now(), desired(&[(1, 10), (2, 20)]));
        let r = m.sync(&desired(&[(1, 10)]), true);
        assert_eq!(r.deletes, 1);
        assert_eq!(fake.entries_now(), desired(&[(1, 10)]));
        assert!(!m.pending());
    }

    #[test]
    fn a_failed_delete_is_retried_until_the_entry_is_gone() {
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone());
        m.sync(&desired(&[(1, 10), (2, 20)]), true);
        fake.state().fail_remove.insert(2);
        let r = m.sync(&desired(&[(1, 10)]), true);
        assert_eq!(r.deletes, 0);
        assert!(m.pending(), "the failed delete is remembered");
        assert_eq!(m.programmed(), &desired(&[(1, 10), (2, 20)]));
        // Still failing: retried (and counted) on every sync, never dropped.
        m.sync(&desired(&[(1, 10)]), true);
        assert_eq!(m.errors(Op::Delete), 2);
        assert_eq!(fake.entries_now(), desired(&[(1, 10), (2, 20)]));
        fake.state().fail_remove.clear();
        let r = m.sync(&desired(&[(1, 10)]), true);
        assert_eq!(r.deletes, 1);
        assert_eq!(fake.entries_now(), desired(&[(1, 10)]));
        assert!(!m.pending());
        assert_eq!((m.errors(Op::Update), m.errors(Op::Delete)), (0, 2));
    }

    #[test]
    fn an_explicit_delete_that_failed_is_retried_by_retry_deletes() {
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone());
        m.write(7, 70).unwrap();
        fake.state().fail_remove.insert(7);
        assert!(m.delete(&7).is_err());
        assert_eq!(m.retry_deletes(), 0);
        fake.state().fail_remove.clear();
        assert_eq!(m.retry_deletes(), 1);
        assert!(fake.entries_now().is_empty());
        assert!(m.programmed().is_empty());
        assert_eq!(m.retry_deletes(), 0, "nothing left");
    }

    #[test]
    fn writing_a_key_again_cancels_its_pending_delete() {
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone());
        m.write(7, 70).unwrap();
        fake.state().fail_remove.insert(7);
        assert!(m.delete(&7).is_err());
        assert!(!m.write(7, 70).unwrap(), "the kernel holds it already");
        fake.state().fail_remove.clear();
        assert_eq!(m.retry_deletes(), 0);
        assert_eq!(fake.entries_now(), desired(&[(7, 70)]));
    }

    #[test]
    fn a_failed_write_is_retried_by_the_next_sync() {
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone());
        fake.state().fail_insert.insert(2);
        let want = desired(&[(1, 10), (2, 20)]);
        let r = m.sync(&want, true);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, 2);
        assert!(r.failed[0].1.contains("FAKE is full"), "{:?}", r.failed);
        assert!(m.pending());
        fake.state().fail_insert.clear();
        let r = m.sync(&want, true);
        assert_eq!((r.writes, r.failed.len()), (1, 0));
        assert_eq!(fake.entries_now(), want);
        assert!(!m.pending());
        assert_eq!((m.errors(Op::Update), m.errors(Op::Delete)), (1, 0));
    }

    #[test]
    fn a_failure_streak_ends_when_the_key_is_no_longer_wanted() {
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone());
        fake.state().fail_insert.insert(2);
        m.sync(&desired(&[(2, 20)]), true);
        assert!(m.pending());
        m.sync(&desired(&[]), true);
        assert!(!m.pending(), "nothing to retry once nobody wants it");
    }

    #[test]
    fn a_failing_key_is_logged_once_per_streak_with_its_reason() {
        let logs = crate::testlog::Logs::default();
        let subscriber = logs.subscriber();
        let lines = || {
            logs.text()
                .lines()
                .filter(|l| l.contains("map operation failed"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        tracing::subscriber::with_default(subscriber, || {
            let fake = Fake::default();
            let mut m = MapMirror::new(fake.clone());
            m.sync(&desired(&[(5, 50)]), true);
            fake.state().fail_remove.insert(5);
            for _ in 0..3 {
                m.sync(&desired(&[]), true);
            }
            let l = lines();
            assert_eq!(l.len(), 1, "{l:?}");
            assert!(
                l[0].contains("op=\"delete\"") && l[0].contains("key=5"),
                "{l:?}"
            );
            assert!(l[0].contains("Device or resource busy"), "the errno: {l:?}");
            // It recovers, then fails again: a new streak, logged again.
            fake.state().fail_remove.clear();
            m.sync(&desired(&[]), true);
            m.sync(&desired(&[(5, 50)]), true);
            fake.state().fail_remove.insert(5);
            m.sync(&desired(&[]), true);
            assert_eq!(lines().len(), 2, "{:?}", lines());
            assert_eq!(m.errors(Op::Delete), 4);
        });
    }

    #[test]
    fn failures_are_counted_per_map_and_op_in_the_metrics() {
        let metrics = Metrics::new();
        let fake = Fake::default();
        let mut m = MapMirror::new(fake.clone()).with_metrics(&metrics);
        m.sync(&desired(&[(1, 10), (2, 20)]), true);
        {
            let mut s = fake.state();
            s.fail_insert.insert(3);
            s.fail_remove.insert(2);
        }
        m.sync(&desired(&[(1, 10), (3, 30)]), true);
        m.sync(&desired(&[(1, 10), (3, 30)]), true);
        m.count_error(Op::Update);
        let text = metrics.render();
        assert!(
            text.contains(r#"strait_datapath_map_errors_total{map="FAKE",op="update"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"strait_datapath_map_errors_total{map="FAKE",op="delete"} 2"#),
            "{text}"
        );
    }
}
