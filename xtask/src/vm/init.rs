//! The VM's `/init` script and the marker lines it prints for the host to parse.

use super::artifacts::TestRun;

/// Marker lines the VM's init prints; everything else on the console is passed through.
pub(super) const BOOTED: &str = "STRAIT-VM-BOOTED";
pub(super) const RESULT: &str = "STRAIT-VM-RESULT rc=";
pub(super) const TEST_START: &str = "STRAIT-VM-TEST-START ";
pub(super) const TEST_END: &str = "STRAIT-VM-TEST-END ";

/// The VM's PID 1 (busybox sh): mounts, modules, the tests, a result line, power off.
pub(super) fn init_script(
    modules: &[String],
    runs: &[TestRun],
    command: &[String],
    shell: bool,
) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CI=true RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/wireguard /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up
echo "STRAIT-VM-BOOTED kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)s"
"#,
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /modules/{m}.ko || echo \"STRAIT-VM-WARN insmod {m} failed\"\n"
        ));
    }
    s.push_str(
        r#"rc=0
run() {
    label=$1; shift
    echo "STRAIT-VM-TEST-START $label"
    "$@"
    r=$?
    echo "STRAIT-VM-TEST-END $label rc=$r"
    [ $r -eq 0 ] || rc=$r
}
"#,
    );
    for r in runs {
        let mut line = format!("run {} /tests/{}", quote(&r.label), r.target);
        for a in &r.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        s.push_str(&line);
        s.push('\n');
    }
    if !command.is_empty() {
        // Through dash (a path, so not a busybox applet), which looks the command up on PATH.
        let joined: Vec<String> = command.iter().map(|a| quote(a)).collect();
        s.push_str(&format!(
            "run {} /bin/sh -c 'exec \"$@\"' sh {}\n",
            quote(&format!("command: {}", command.join(" "))),
            joined.join(" ")
        ));
    }
    if shell {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        // A session with the console as controlling terminal, so Ctrl-C reaches the command.
        s.push_str(&format!(
            r#"echo "STRAIT-VM-SHELL: exit (or Ctrl-D) powers the VM off; Ctrl-A X kills it"
export TERM=$(cat /etc/strait-vm-term 2>/dev/null || echo vt100)
stty rows {rows} cols {cols} </dev/ttyS0
setsid -c /bin/bash -i </dev/ttyS0 >/dev/ttyS0 2>&1
"#
        ));
    }
    s.push_str(
        r#"echo "STRAIT-VM-RESULT rc=$rc"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#,
    );
    s
}

/// Rows and columns of the terminal on stdin, for the VM's shell.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize we pass; it fails harmlessly on a non-terminal.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
