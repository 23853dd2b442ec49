//! A real etcd server per test: Debian's `/usr/bin/etcd` (3.4) on free loopback ports with its
//! own data directory, optionally with mutual TLS from certificates generated here.
//!
//! The guard owns the process: `stop()`/`start()` restart it on the same data directory and
//! ports; dropping it kills it by PID and removes the directory. The child also gets
//! `PR_SET_PDEATHSIG`, so even a test process killed outright takes etcd with it. (The signal
//! fires when the *thread* that spawned etcd exits: start and restart servers from the test's
//! own thread, as `#[tokio::test]` bodies do, not from a short-lived helper thread.)

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use strait::kvstore::EtcdConfig;

use crate::unique_name;

pub const ETCD_BIN: &str = "/usr/bin/etcd";
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long a (re)started etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped etcd may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Certificate files of a TLS-mode server (all PEM, in the server's temp directory).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_cert: PathBuf,
    /// The CA's key, to issue more client certificates ([`EtcdServer::client_cert`]).
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Which keys [`EtcdServer::write_cilium_config`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CiliumConfigOptions {
    /// Use the deprecated `ca-file` key instead of `trusted-ca-file`.
    pub deprecated_ca_key: bool,
    /// Leave out `cert-file`/`key-file`.
    pub without_client_cert: bool,
    /// Use a client certificate with this CN (the etcd user name under `--client-cert-auth`)
    /// instead of the default one (CN `remote`).
    pub client_cn: Option<&'static str>,
}

/// A running etcd; see the module docs.
pub struct EtcdServer {
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// The client port the running process listens on (differs from `client_port` only after
    /// [`EtcdServer::start_on_spare_port`]).
    active_port: u16,
    tls: Option<EtcdTls>,
    child: Option<Child>,
}

/// A port nobody listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to pick a free port")
        .port()
}

fn distinct_ports() -> (u16, u16) {
    // Hold both listeners at once so the two ports differ.
    let a = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl EtcdServer {
    /// A plaintext (`http://`) server, started and answering.
    pub fn new() -> Self {
        Self::launch(false)
    }

    /// A TLS server requiring client certificates (`--client-cert-auth`), started and answering.
    pub fn new_tls() -> Self {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Self {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} missing: install Debian's etcd-server (`cargo xtask setup`)"
        );
        // tmpfs when available: etcd fsyncs every write, which costs nothing there.
        let mut builder = tempfile::Builder::new();
        builder.prefix("strait-etcd-");
        let dir = if Path::new("/dev/shm").is_dir() {
            builder.tempdir_in("/dev/shm")
        } else {
            builder.tempdir()
        }
        .expect("creating the etcd temp dir");
        let tls = tls.then(|| generate_tls(dir.path()));
        let (client_port, peer_port) = distinct_ports();
        let mut server = Self {
            name: unique_name("etcd-"),
            dir,
            client_port,
            peer_port,
            active_port: client_port,
            tls,
            child: None,
        };
        server.start();
        server
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// The server's temp directory (data dir, certificates, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's combined stdout/stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A client config for this server (with the client certificate in TLS mode).
    pub fn config(&self) -> EtcdConfig {
        let mut cfg = EtcdConfig::plaintext([self.endpoint()]);
        if let Some(tls) = &self.tls {
            cfg.trusted_ca_file = Some(tls.ca_cert.clone());
            cfg.cert_file = Some(tls.client_cert.clone());
            cfg.key_file = Some(tls.client_key.clone());
        }
        cfg
    }

    /// A client config for this TLS server authenticating as `cn` (etcd takes the user name
    /// from the client certificate's CN).
    pub fn config_as(&self, cn: &str) -> EtcdConfig {
        let (cert, key) = self.client_cert(cn);
        let mut cfg = self.config();
        cfg.cert_file = Some(cert);
        cfg.key_file = Some(key);
        cfg
    }

    /// A client certificate and key with CN `cn`, issued by this server's CA (TLS mode only),
    /// as PEM files in the server's directory.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let tls = self
            .tls
            .as_ref()
            .expect("client certificates need a TLS server");
        let ca_key = std::fs::read_to_string(&tls.ca_key).expect("reading the CA key");
        let ca = Issuer::new(
            ca_params(TEST_CA_CN),
            KeyPair::from_pem(&ca_key).expect("parsing the CA key"),
        );
        let (cert, key) = leaf_cert(
            &ca,
            cn,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let safe: String = cn
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cert_path = self.dir().join(format!("client-{safe}.crt"));
        let key_path = self.dir().join(format!("client-{safe}.key"));
        std::fs::write(&cert_path, cert).expect("writing a client certificate");
        std::fs::write(&key_path, key).expect("writing a client key");
        (cert_path, key_path)
    }

    /// (Re)starts etcd on the same data directory and ports and waits until it answers.
    pub fn start(&mut self) {
        self.spawn_on(self.client_port);
    }

    /// Starts etcd on the same data directory but another client port, so clients configured
    /// with [`EtcdServer::endpoint`] cannot reach it: a maintenance window in which a test
    /// changes data behind a watcher's back. Returns that temporary endpoint. `stop()` then
    /// `start()` to return to the normal port.
    pub fn start_on_spare_port(&mut self) -> String {
        let port = free_port();
        self.spawn_on(port);
        format!("{}://127.0.0.1:{port}", self.scheme())
    }

    fn spawn_on(&mut self, client_port: u16) {
        assert!(self.child.is_none(), "etcd {} already running", self.name);
        let client_url = format!("{}://127.0.0.1:{client_port}", self.scheme());
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the etcd log");
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .args(["--initial-cluster-token", &self.name])
            .args(["--initial-cluster-state", "new"])
            // Faster single-node start; also lowers etcd's minimum lease TTL to 1 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_cert)
                .arg("--client-cert-auth");
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {ETCD_BIN}: {e}"));
        self.child = Some(child);
        self.active_port = client_port;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = format!("127.0.0.1:{}", self.active_port);
        let mut last = String::from("not tried");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "etcd {} exited during start-up ({status}); log: {}\n{}",
                    self.name,
                    self.log_path().display(),
                    self.log_tail()
                );
            }
            if TcpStream::connect(&addr).is_ok() {
                // A real request: the port can be open before etcd serves.
                match self.etcdctl(&["endpoint", "health"]) {
                    Ok(()) => return,
                    Err(e) => last = e,
                }
            } else {
                last = format!("nothing accepts on {addr} yet");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "etcd {} did not become healthy at {addr} within {READY_TIMEOUT:?} ({last}); log: {}\n{}",
            self.name,
            self.log_path().display(),
            self.log_tail()
        );
    }

    /// Runs etcdctl against the running process (with the client certificate in TLS mode).
    pub fn etcdctl(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints={}://127.0.0.1:{}",
                self.scheme(),
                self.active_port
            ))
            .args(["--command-timeout=2s", "--dial-timeout=2s"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca_cert)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("running {ETCDCTL_BIN}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "etcdctl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops etcd gracefully (SIGTERM to its PID, SIGKILL after 5 s). The data stays.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops etcd, throws its data away and starts it again on the same ports: what an etcd
    /// pod with an `emptyDir: {medium: Memory}` volume does when it restarts. Leases and keys
    /// are gone; clients reconnect by themselves.
    pub fn restart_empty(&mut self) {
        self.stop();
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .unwrap_or_else(|e| panic!("removing {}: {e}", data.display()));
        }
        self.start();
    }

    /// Whether the data directory is on a memory file system (tmpfs), as the shipped kvstore's
    /// is.
    pub fn is_memory_backed(&self) -> bool {
        self.dir.path().starts_with("/dev/shm")
    }

    /// Writes a Cilium-format etcd config for this server to `path` and returns it.
    pub fn write_cilium_config(&self, path: &Path, opts: CiliumConfigOptions) -> PathBuf {
        let mut yaml = format!(
            "# written by strait's test harness\nendpoints:\n- {}\n",
            self.endpoint()
        );
        if let Some(tls) = &self.tls {
            let ca_key = if opts.deprecated_ca_key {
                "ca-file"
            } else {
                "trusted-ca-file"
            };
            yaml.push_str(&format!("{ca_key}: {}\n", tls.ca_cert.display()));
            if !opts.without_client_cert {
                let (cert, key) = match opts.client_cn {
                    Some(cn) => self.client_cert(cn),
                    None => (tls.client_cert.clone(), tls.client_key.clone()),
                };
                yaml.push_str(&format!(
                    "cert-file: {}\nkey-file: {}\n",
                    cert.display(),
                    key.display()
                ));
            }
        }
        // Cilium extras a reader must ignore.
        yaml.push_str("cilium-host-aliases:\n- hostname: etcd.mesh.test\n  ips: [127.0.0.1]\n");
        let mut f = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        f.write_all(yaml.as_bytes())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_owned()
    }
}

impl Default for EtcdServer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID; wait reaps it before the data
            // directory goes away.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a fresh self-signed CA certificate (unrelated to any server) to `path`.
pub fn write_unrelated_ca(path: &Path) {
    let key = KeyPair::generate().expect("generating a CA key");
    let ca = CertifiedIssuer::self_signed(ca_params("unrelated test CA"), key)
        .expect("self-signing a CA");
    std::fs::write(path, ca.pem()).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

const TEST_CA_CN: &str = "strait test CA";

/// A leaf certificate and key (PEM) with CN `cn`, signed by `ca`.
fn leaf_cert(
    ca: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<String>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
) -> (String, String) {
    let key = KeyPair::generate().expect("generating a key");
    let mut params = CertificateParams::new(sans).expect("certificate params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = ekus;
    let cert = params.signed_by(&key, ca).expect("signing a certificate");
    (cert.pem(), key.serialize_pem())
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files
/// in `dir`.
fn generate_tls(dir: &Path) -> EtcdTls {
    let ca_key = KeyPair::generate().expect("generating the CA key");
    let ca_key_pem = ca_key.serialize_pem();
    let ca =
        CertifiedIssuer::self_signed(ca_params(TEST_CA_CN), ca_key).expect("self-signing the CA");

    // etcd 3.4's gRPC gateway dials its own port presenting the server certificate, so with
    // --client-cert-auth that certificate needs clientAuth too.
    let (server_cert, server_key) = leaf_cert(
        &ca,
        "etcd-server",
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (client_cert, client_key) = leaf_cert(
        &ca,
        "remote",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );

    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    };
    EtcdTls {
        ca_cert: write("ca.crt", &ca.pem()),
        ca_key: write("ca.key", &ca_key_pem),
        server_cert: write("server.crt", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.crt", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

/// A TCP proxy on loopback that delays every chunk by a fixed time in each direction: an etcd
/// round trip becomes at least twice that, as across a slow network. Runs on the current tokio
/// runtime until dropped.
pub struct SlowProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Forwards a fresh loopback port to `upstream` (`host:port`) with `delay` each way.
    pub async fn start(upstream: String, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(delayed_copy(cr, sw, delay), delayed_copy(sr, cw, delay));
                });
            }
        });
        Self { port, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client config reaching etcd through the proxy.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig::plaintext([self.endpoint()])
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read (chunks keep their order and
/// do not wait for each other: latency, not a bandwidth limit).
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
