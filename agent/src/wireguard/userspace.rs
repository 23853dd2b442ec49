//! wireguard-go as a child process strait owns: started in the foreground (`-f`) inside the
//! target namespace, its output forwarded to tracing, stopped by PID.
//!
//! wireguard-go outlives the namespace it was started in and its UAPI socket lives in one
//! machine-wide directory, so the process must be ended explicitly: [`WgGoChild`] does it on
//! [`WgGoChild::stop`] and on drop.

use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{constants::WIREGUARD_GO_ENV, routing::TargetNetns};

use super::{WireguardError, uapi_socket};

#[derive(Debug)]
pub struct WgGoChild {
    child: Option<Child>,
    device: String,
    socket: PathBuf,
}

impl WgGoChild {
    /// Starts `program -f device` inside `netns` and waits until its UAPI socket accepts
    /// connections (the TUN device exists by then).
    pub fn spawn(
        program: &Path,
        device: &str,
        netns: &TargetNetns,
        timeout: Duration,
    ) -> Result<Self, WireguardError> {
        let socket = uapi_socket(device);
        let ns_fd = netns.raw_fd();
        let mut cmd = Command::new(program);
        cmd.arg("-f")
            .arg(device)
            .env(WIREGUARD_GO_ENV, "1")
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls are allowed; setns is a
        // plain syscall on a descriptor the parent keeps open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| WireguardError::Spawn {
            program: program.to_path_buf(),
            device: device.to_owned(),
            source,
        })?;
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            forward_output(device, pid, out);
        }
        if let Some(err) = child.stderr.take() {
            forward_output(device, pid, err);
        }
        let mut this = Self {
            child: Some(child),
            device: device.to_owned(),
            socket,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = this.exited() {
                this.child = None;
                return Err(WireguardError::ExitedEarly {
                    device: device.to_owned(),
                    socket: this.socket.clone(),
                    status,
                });
            }
            if UnixStream::connect(&this.socket).is_ok() {
                tracing::info!(device, pid, "wireguard-go started");
                return Ok(this);
            }
            if start.elapsed() > timeout {
                this.stop();
                return Err(WireguardError::SocketTimeout {
                    device: device.to_owned(),
                    socket: uapi_socket(device),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, once the process has ended (reaped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM (wireguard-go then removes its device and socket), SIGKILL after 3 s; reaps the
    /// process and removes a socket it left behind. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if child.try_wait().ok().flatten().is_none() {
            // By PID, never by name: other wireguard-go processes on the machine are not ours.
            // SAFETY: kill(2) on our own unreaped child's PID, which cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        // Only our own process's socket: it served this device, and it is gone.
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!(device = %self.device, pid, "wireguard-go stopped");
    }
}

impl Drop for WgGoChild {
    fn drop(&mut self) {
        self.stop();
    }
}

fn forward_output(device: &str, pid: u32, stream: impl Read + Send + 'static) {
    let name = device.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!("wg-go-{pid}"))
        .spawn(move || {
            let device = name;
            // Ends at EOF, when the process exits.
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let line = line.trim();
                if line.is_empty() || line.chars().all(|c| !c.is_alphanumeric()) {
                    continue;
                }
                if line.starts_with("ERROR") {
                    tracing::warn!(%device, pid, "wireguard-go: {line}");
                } else {
                    tracing::debug!(%device, pid, "wireguard-go: {line}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%device, error = %e, "cannot forward wireguard-go output");
    }
}
