//! Cilium's etcd configuration: the per-cluster YAML file (etcd clientv3 format plus Cilium's
//! extras, wire-format reference §6.1) and the clustermesh config directory holding one such
//! file per remote cluster.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::error::{KvstoreError, Result};

/// Substring that makes a file in the clustermesh directory count as a cluster config (the same
/// test Cilium and cilium-cli apply; CA/cert/key files in the same secret never contain it).
pub const ENDPOINTS_MARKER: &str = "endpoints:";

/// Default poll interval of [`ClustermeshConfigDir::watch`].
pub const CONFIG_DIR_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What an inline (not file-backed) config is called in errors.
const INLINE_SOURCE: &str = "<inline>";

/// One etcd client configuration, as Cilium reads it. Paths are kept as written (relative ones
/// resolve against the working directory, as in Go's clientv3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://` endpoints are plaintext, `https://` use TLS; a bare `host:port` uses TLS when any
    /// TLS file is configured.
    pub endpoints: Vec<String>,
    /// `trusted-ca-file`, or the deprecated `ca-file` when only that one is set.
    pub trusted_ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Parsed so that a config asking for it is refused at connect time instead of silently
    /// verifying (or silently not verifying): see `EtcdClient::connect`.
    pub insecure_skip_tls_verify: bool,
    /// etcd username/password authentication (clientv3 `username` / `password`).
    pub username: Option<String>,
    pub password: Option<String>,
    /// The file this config was read from (`<inline>` otherwise); used in error messages.
    pub source: PathBuf,
}

/// The subset of the clientv3 YAML keys we use. No `deny_unknown_fields`: Cilium's extras
/// (`cilium-host-aliases`, …) and clientv3 keys we do not need (`dial-timeout`, …) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawConfig {
    endpoints: Option<Vec<String>>,
    trusted_ca_file: Option<String>,
    /// Deprecated alias of `trusted-ca-file`.
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
    /// Accepted and ignored: the endpoint scheme decides about TLS here.
    #[allow(dead_code)]
    insecure_transport: Option<bool>,
    username: Option<String>,
    password: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

impl EtcdConfig {
    /// Reads and parses a config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| KvstoreError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config YAML that did not come from a file.
    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::parse(text, Path::new(INLINE_SOURCE))
    }

    /// A plaintext config for the given endpoints (tests, local etcd).
    pub fn plaintext(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            insecure_skip_tls_verify: false,
            username: None,
            password: None,
            source: PathBuf::from(INLINE_SOURCE),
        }
    }

    fn parse(text: &str, source: &Path) -> Result<Self> {
        let invalid = |reason: String| KvstoreError::InvalidConfig {
            path: source.to_owned(),
            reason,
        };
        let raw: RawConfig =
            serde_yaml_ng::from_str(text).map_err(|e| KvstoreError::ParseConfig {
                path: source.to_owned(),
                reason: e.to_string(),
            })?;
        let endpoints: Vec<String> = raw
            .endpoints
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(invalid("no endpoints".into()));
        }
        let cfg = Self {
            endpoints,
            trusted_ca_file: non_empty(raw.trusted_ca_file)
                .or_else(|| non_empty(raw.ca_file))
                .map(PathBuf::from),
            cert_file: non_empty(raw.cert_file).map(PathBuf::from),
            key_file: non_empty(raw.key_file).map(PathBuf::from),
            insecure_skip_tls_verify: raw.insecure_skip_tls_verify.unwrap_or(false),
            username: non_empty(raw.username),
            password: raw.password,
            source: source.to_owned(),
        };
        if cfg.cert_file.is_some() != cfg.key_file.is_some() {
            return Err(invalid(
                "cert-file and key-file must be given together".into(),
            ));
        }
        let mut schemes = (false, false);
        for e in &cfg.endpoints {
            match e.split_once("://") {
                Some(("http", _)) => schemes.0 = true,
                Some(("https", _)) => schemes.1 = true,
                Some((scheme, _)) => {
                    return Err(KvstoreError::Unsupported {
                        feature: format!("endpoint scheme {scheme}:// ({e})"),
                        path: source.to_owned(),
                    });
                }
                None => {}
            }
        }
        if schemes.0 && schemes.1 {
            return Err(invalid("endpoints mix http:// and https://".into()));
        }
        Ok(cfg)
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        let any_tls_file =
            self.trusted_ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some();
        self.endpoints
            .iter()
            .any(|e| e.starts_with("https://") || (!e.starts_with("http://") && any_tls_file))
    }

    /// The endpoints with an explicit scheme, as the client dials them.
    pub fn endpoint_urls(&self) -> Vec<String> {
        let scheme = if self.uses_tls() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect()
    }

    /// The TLS files this config points at (CA, cert, key), for change detection.
    pub fn referenced_files(&self) -> impl Iterator<Item = &Path> {
        [&self.trusted_ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .filter_map(|p| p.as_deref())
    }
}

/// A cluster config found in the clustermesh directory.
#[derive(Debug, Clone)]
pub struct ClusterConfigFile {
    /// Hash of the file content and of the TLS files it references. Including the TLS files
    /// turns a certificate rotation into a `Changed` event: unlike Go's clientv3 we read the
    /// certificates once per connection, so the owner must reconnect to pick them up.
    pub hash: u64,
    /// The parsed config, or why it could not be parsed.
    pub config: std::result::Result<EtcdConfig, String>,
}

/// A change in the clustermesh config directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigEvent {
    Added(String, EtcdConfig),
    Changed(String, EtcdConfig),
    Removed(String),
}

/// The `--clustermesh-config` directory: one file per remote cluster, named after it.
#[derive(Debug, Clone)]
pub struct ClustermeshConfigDir {
    dir: PathBuf,
    local_cluster: String,
}

impl ClustermeshConfigDir {
    /// `local_cluster` is this cluster's own name: a file with that name is never a remote.
    pub fn new(dir: impl Into<PathBuf>, local_cluster: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            local_cluster: local_cluster.into(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory once. Hidden entries are skipped: Kubernetes secret volumes keep the
    /// real files in `..<timestamp>/` and `..data/` and expose them through symlinks, which we
    /// follow. Files without `endpoints:` are not cluster configs. A missing directory is an
    /// empty one (the mount may appear later).
    pub fn scan(&self) -> Result<BTreeMap<String, ClusterConfigFile>> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(KvstoreError::ReadConfigDir {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| KvstoreError::ReadConfigDir {
                path: self.dir.clone(),
                source,
            })?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') || name == self.local_cluster {
                continue;
            }
            let path = entry.path();
            // fs::metadata follows symlinks: `..data` and friends are directories.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                _ => continue,
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    // Removed between readdir and read, or not UTF-8 (a key file): not a config.
                    debug!(path = %path.display(), error = %e, "skipping unreadable file");
                    continue;
                }
            };
            if !text.contains(ENDPOINTS_MARKER) {
                continue;
            }
            let config = EtcdConfig::parse(&text, &path).map_err(|e| e.to_string());
            let mut hasher = DefaultHasher::new();
            text.hash(&mut hasher);
            if let Ok(cfg) = &config {
                for file in cfg.referenced_files() {
                    std::fs::read(file).ok().hash(&mut hasher);
                }
            }
            out.insert(
                name,
                ClusterConfigFile {
                    hash: hasher.finish(),
                    config,
                },
            );
        }
        Ok(out)
    }

    /// Polls the directory every `interval` and reports changes; the first scan reports every
    /// cluster as `Added`. Polling rather than inotify: Kubernetes updates secret volumes by
    /// swapping the `..data` symlink, which inotify on the visible names does not report
    /// reliably, and polling a handful of small files needs no extra dependency.
    ///
    /// A file whose new content does not parse keeps its last good config (logged once per
    /// content): a bad edit must not tear down a working connection. A directory that cannot be
    /// read is skipped for that round, for the same reason. The task ends when the receiver is
    /// dropped or the returned handle is dropped.
    pub fn watch(self, interval: Duration) -> (ConfigDirWatcher, mpsc::Receiver<ConfigEvent>) {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let mut reported: BTreeMap<String, u64> = BTreeMap::new();
            let mut warned: BTreeMap<String, u64> = BTreeMap::new();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let dir = self.clone();
                let scanned = match tokio::task::spawn_blocking(move || dir.scan()).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(error = %e, "clustermesh config directory scan failed");
                        continue;
                    }
                    Err(_) => return,
                };
                for event in diff(&mut reported, &mut warned, scanned) {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        (ConfigDirWatcher { task }, rx)
    }
}

/// Turns a fresh scan into events, updating what was reported so far.
fn diff(
    reported: &mut BTreeMap<String, u64>,
    warned: &mut BTreeMap<String, u64>,
    scanned: BTreeMap<String, ClusterConfigFile>,
) -> Vec<ConfigEvent> {
    let mut events = Vec::new();
    let gone: Vec<String> = reported
        .keys()
        .filter(|name| !scanned.contains_key(*name))
        .cloned()
        .collect();
    for name in gone {
        reported.remove(&name);
        events.push(ConfigEvent::Removed(name));
    }
    warned.retain(|name, _| scanned.contains_key(name));
    for (name, file) in scanned {
        match file.config {
            Ok(cfg) => {
                warned.remove(&name);
                match reported.insert(name.clone(), file.hash) {
                    None => events.push(ConfigEvent::Added(name, cfg)),
                    Some(old) if old != file.hash => events.push(ConfigEvent::Changed(name, cfg)),
                    Some(_) => {}
                }
            }
            Err(reason) => {
                if warned.insert(name.clone(), file.hash) != Some(file.hash) {
                    warn!(cluster = %name, %reason, "ignoring invalid clustermesh config");
                }
            }
        }
    }
    events
}

/// Handle of the config directory poller; dropping it stops the poller.
#[derive(Debug)]
pub struct ConfigDirWatcher {
    task: JoinHandle<()>,
}

impl ConfigDirWatcher {
    pub fn stop(self) {}
}

impl Drop for ConfigDirWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cilium_config_with_extras() {
        let cfg = EtcdConfig::from_yaml(
            "endpoints:\n- https://cluster2.mesh.cilium.io:2379\n\
             trusted-ca-file: /var/lib/cilium/clustermesh/common-etcd-client-ca.crt\n\
             key-file: /var/lib/cilium/clustermesh/common-etcd-client.key\n\
             cert-file: /var/lib/cilium/clustermesh/common-etcd-client.crt\n\
             cilium-host-aliases:\n- hostname: cluster2.mesh.cilium.io\n  ips: [192.0.2.10]\n\
             dial-timeout: 5s\n",
        )
        .unwrap();
        assert_eq!(cfg.endpoints, ["https://cluster2.mesh.cilium.io:2379"]);
        assert_eq!(
            cfg.trusted_ca_file.as_deref(),
            Some(Path::new(
                "/var/lib/cilium/clustermesh/common-etcd-client-ca.crt"
            ))
        );
        assert!(cfg.cert_file.is_some() && cfg.key_file.is_some());
        assert!(cfg.uses_tls());
        assert!(!cfg.insecure_skip_tls_verify);
        assert_eq!(cfg.source, Path::new("<inline>"));
    }

    #[test]
    fn deprecated_ca_file_is_an_alias_and_trusted_ca_file_wins() {
        let cfg = EtcdConfig::from_yaml("endpoints: [\"h:1\"]\nca-file: /old.crt\n").unwrap();
        assert_eq!(cfg.trusted_ca_file.as_deref(), Some(Path::new("/old.crt")));
        // A bare host:port with TLS files is dialled over TLS.
        assert_eq!(cfg.endpoint_urls(), ["https://h:1"]);
        let cfg = EtcdConfig::from_yaml(
            "endpoints: [\"h:1\"]\nca-file: /old.crt\ntrusted-ca-file: /new.crt\n",
        )
        .unwrap();
        assert_eq!(cfg.trusted_ca_file.as_deref(), Some(Path::new("/new.crt")));
    }

    #[test]
    fn plaintext_and_flags() {
        let cfg = EtcdConfig::from_yaml(
            "endpoints:\n- http://127.0.0.1:2379\n- 127.0.0.2:2379\ninsecure-skip-tls-verify: true\nusername: u\npassword: p\n",
        )
        .unwrap();
        assert!(!cfg.uses_tls());
        assert_eq!(
            cfg.endpoint_urls(),
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert!(cfg.insecure_skip_tls_verify);
        assert_eq!(cfg.username.as_deref(), Some("u"));
        assert_eq!(cfg.password.as_deref(), Some("p"));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for (yaml, needle) in [
            ("endpoints: [", "parsing"),
            ("", "no endpoints"),
            ("endpoints: 5", "parsing"),
            ("foo: bar", "no endpoints"),
            ("endpoints: []", "no endpoints"),
            ("endpoints: [\"\"]", "no endpoints"),
            ("endpoints: [\"https://a:1\"]\ncert-file: /c\n", "together"),
            ("endpoints: [\"http://a:1\", \"https://b:1\"]", "mix"),
            ("endpoints: [\"unix:///run/etcd.sock\"]", "not supported"),
        ] {
            let err = EtcdConfig::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml:?}: {err}");
            assert!(err.contains("<inline>"), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = EtcdConfig::from_file("/nonexistent/strait/etcd.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/strait/etcd.yaml"), "{err}");
    }

    #[test]
    fn scan_skips_hidden_local_and_non_configs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("east"), "endpoints:\n- https://east:2379\n").unwrap();
        std::fs::write(p.join("local"), "endpoints:\n- https://local:2379\n").unwrap();
        std::fs::write(p.join(".hidden"), "endpoints:\n- https://h:2379\n").unwrap();
        std::fs::write(p.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(p.join("broken"), "endpoints: [").unwrap();
        std::fs::create_dir(p.join("..data")).unwrap();
        std::fs::write(p.join("..data/west"), "endpoints:\n- https://west:2379\n").unwrap();
        std::os::unix::fs::symlink("..data/west", p.join("west")).unwrap();

        let scanned = ClustermeshConfigDir::new(p, "local").scan().unwrap();
        let names: Vec<_> = scanned.keys().map(String::as_str).collect();
        assert_eq!(names, ["broken", "east", "west"]);
        assert!(scanned["broken"].config.is_err());
        assert_eq!(
            scanned["west"].config.as_ref().unwrap().endpoints,
            ["https://west:2379"]
        );

        let missing = ClustermeshConfigDir::new(p.join("nope"), "local");
        assert!(missing.scan().unwrap().is_empty());
    }

    #[test]
    fn diff_reports_added_changed_removed_and_keeps_last_good() {
        let file = |hash, ok: bool| ClusterConfigFile {
            hash,
            config: if ok {
                Ok(EtcdConfig::plaintext(["http://a:1"]))
            } else {
                Err("bad".into())
            },
        };
        let (mut reported, mut warned) = (BTreeMap::new(), BTreeMap::new());
        let ev = diff(
            &mut reported,
            &mut warned,
            BTreeMap::from([("a".into(), file(1, true)), ("b".into(), file(2, false))]),
        );
        assert!(matches!(&ev[..], [ConfigEvent::Added(n, _)] if n == "a"));
        // Invalid new content keeps the old config: no event.
        let ev = diff(
            &mut reported,
            &mut warned,
            BTreeMap::from([("a".into(), file(3, false))]),
        );
        assert!(ev.is_empty());
        let ev = diff(
            &mut reported,
            &mut warned,
            BTreeMap::from([("a".into(), file(4, true))]),
        );
        assert!(matches!(&ev[..], [ConfigEvent::Changed(n, _)] if n == "a"));
        let ev = diff(&mut reported, &mut warned, BTreeMap::new());
        assert_eq!(ev, [ConfigEvent::Removed("a".into())]);
    }
}
