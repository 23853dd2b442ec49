//! Booting under qemu: the command line, the KVM probe, the serial console and the outcome
//! read from the init's marker lines.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    Accel, VmArgs, VmError,
    init::{BOOTED, RESULT, TEST_END, TEST_START},
    kernel::Kernel,
};

/// PID of the running qemu, for the Ctrl-C handler.
static QEMU_PID: AtomicU32 = AtomicU32::new(0);

/// Kills qemu (by PID) when the run ends in any way.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
        QEMU_PID.store(0, Ordering::SeqCst);
    }
}

fn qemu_command(
    kernel: &Kernel,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: u32,
    cpus: u32,
    accel: Accel,
) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        _ => qemu.args(["-accel", "tcg", "-cpu", "max"]),
    };
    qemu.args(["-m", &memory.to_string()])
        .args(["-smp", &cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .args(["-append", cmdline])
        // No network card, no display: the serial console on stdio is the only way out.
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(initrd) = initrd {
        qemu.arg("-initrd").arg(initrd);
    }
    qemu
}

/// KVM is used only if a guest really runs on it: nested setups can expose a /dev/kvm on
/// which the kernel never gets going. The answer is cached for this boot of the host.
pub(super) fn kvm_usable(kernel: &Kernel, vm_dir: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = vm_dir.join("kvm-probe");
    if let Some(ok) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|c| c.strip_prefix(boot_id.trim()).map(|r| r.trim() == "ok"))
        .filter(|_| !boot_id.trim().is_empty())
    {
        println!(
            "vm: /dev/kvm {} (probed earlier this boot; {})",
            if ok {
                "works"
            } else {
                "is unusable: using TCG"
            },
            cache.display()
        );
        return ok;
    }
    let ok = probe_kvm(kernel);
    let _ = std::fs::write(
        &cache,
        format!(
            "{} {}\n",
            boot_id.trim(),
            if ok { "ok" } else { "unusable" }
        ),
    );
    ok
}

fn probe_kvm(kernel: &Kernel) -> bool {
    const PROBE: Duration = Duration::from_secs(10);
    // `earlyprintk` prints "Linux version" within milliseconds of entering the kernel.
    let mut probe = qemu_command(
        kernel,
        None,
        "console=ttyS0 earlyprintk=ttyS0 panic=-1",
        256,
        1,
        Accel::Kvm,
    );
    probe.args(["-serial", "stdio"]).stderr(Stdio::null());
    let Ok(child) = probe.spawn() else {
        return false;
    };
    let mut child = Qemu(child);
    let lines = console_lines(child.0.stdout.take().expect("piped"), false);
    let deadline = Instant::now() + PROBE;
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("Linux version") => {
                ok = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(child);
    if ok {
        println!("vm: /dev/kvm works (the kernel started on it)");
    } else {
        println!("vm: /dev/kvm is unusable (no kernel output within {PROBE:?}): using TCG");
    }
    ok
}

/// Console lines (`\r` removed) from qemu's stdout, on a thread.
/// With `echo`, bytes are also copied to stdout as they arrive (an interactive shell's prompt
/// has no newline).
fn console_lines(
    mut out: impl std::io::Read + Send + 'static,
    echo: bool,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        let mut stdout = std::io::stdout().lock();
                        let _ = stdout.write_all(&buf[..n]);
                        let _ = stdout.flush();
                    }
                    for &b in &buf[..n] {
                        match b {
                            b'\n' => {
                                let text = String::from_utf8_lossy(&line).into_owned();
                                line.clear();
                                if tx.send(text).is_err() {
                                    return;
                                }
                            }
                            b'\r' => {}
                            _ => line.push(b),
                        }
                    }
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    rx
}

pub(super) struct Outcome {
    pub(super) rc: i32,
    pub(super) boot: Option<Duration>,
    pub(super) vm: Duration,
    pub(super) tests: Vec<(String, i32)>,
}

pub(super) fn boot(
    kernel: &Kernel,
    initrd: &Path,
    args: &VmArgs,
    accel: Accel,
) -> Result<Outcome, VmError> {
    let mut cmdline = String::from("console=ttyS0 panic=-1 mitigations=off rdinit=/init");
    if !args.verbose {
        cmdline.push_str(" loglevel=4");
    }
    let mut qemu = qemu_command(
        kernel,
        Some(initrd),
        &cmdline,
        args.memory,
        args.cpus,
        accel,
    );
    qemu.stderr(Stdio::inherit());
    if !args.shell {
        qemu.args(["-serial", "stdio"]);
    } else {
        // The terminal drives the console: Ctrl-C goes to the guest, Ctrl-A X quits qemu.
        qemu.stdin(Stdio::inherit()).args([
            "-chardev",
            "stdio,id=con,mux=on,signal=off",
            "-serial",
            "chardev:con",
            "-mon",
            "chardev=con,mode=readline",
        ]);
    }
    let started = Instant::now();
    let child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs qemu-system-x86)")?;
    QEMU_PID.store(child.id(), Ordering::SeqCst);
    // Ctrl-C: the terminal signals qemu too, but kill it by PID in case it ignores SIGINT.
    let _ = ctrlc::set_handler(|| {
        let pid = QEMU_PID.load(Ordering::SeqCst);
        if pid != 0 {
            eprintln!("\ninterrupted: stopping qemu (pid {pid})");
            // SAFETY: signalling the qemu child we started and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::process::exit(130);
    });
    let mut qemu = Qemu(child);
    let lines = console_lines(qemu.0.stdout.take().expect("piped"), args.shell);

    let deadline = started
        + if args.shell {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            Duration::from_secs(args.timeout)
        };
    let mut outcome = Outcome {
        rc: -1,
        boot: None,
        vm: Duration::ZERO,
        tests: Vec::new(),
    };
    let mut result = None;
    let mut test_started = Instant::now();
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            let e = anyhow::anyhow!(
                "the VM did not finish within {}s: killed qemu (pid {}); raise --timeout?",
                args.timeout,
                qemu.0.id()
            );
            return Err(booted(&outcome, e));
        };
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let at = started.elapsed().as_secs_f64();
        if let Some(rest) = line.strip_prefix(BOOTED) {
            outcome.boot = Some(started.elapsed());
            println!("==> vm: booted in {at:.1}s ({})", rest.trim());
        } else if let Some(label) = line.strip_prefix(TEST_START) {
            test_started = Instant::now();
            println!("\n==> vm [{at:.0}s]: {label}");
        } else if let Some(rest) = line.strip_prefix(TEST_END) {
            let (label, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, "-1"));
            let rc = rc.trim().parse().unwrap_or(-1);
            println!(
                "==> vm [{at:.0}s]: {label}: {} in {:.1}s",
                if rc == 0 { "ok" } else { "FAILED" },
                test_started.elapsed().as_secs_f64()
            );
            outcome.tests.push((label.to_owned(), rc));
        } else if let Some(rc) = line.strip_prefix(RESULT) {
            result = rc.trim().parse::<i32>().ok();
            if !args.shell {
                println!("{line}");
            }
        } else if !args.shell {
            println!("  | {line}");
        }
    }
    let status = qemu.0.wait().context("waiting for qemu")?;
    outcome.vm = started.elapsed();
    match result {
        Some(rc) => {
            outcome.rc = rc;
            Ok(outcome)
        }
        None => {
            let e = anyhow::anyhow!(
                "the VM stopped ({status}) without a {RESULT}<n> line: it did not boot, or its \
                 init or kernel died (kernel panic? see the console above)"
            );
            Err(booted(&outcome, e))
        }
    }
}

/// After the VM booted a hang or crash is the tests' failure, before it the VM's.
fn booted(outcome: &Outcome, e: anyhow::Error) -> VmError {
    if outcome.boot.is_some() {
        VmError::Broke(e)
    } else {
        VmError::Infra(e)
    }
}
