//! Every program in strait's eBPF object passes this kernel's verifier. Run on the host and,
//! by `cargo xtask vm`, on other kernels (Debian's 6.1 in CI): a program an older verifier
//! rejects fails here with the verifier log, before any attach test.

use aya::programs::Program;
use strait_tests::require_privileges;

#[test]
fn every_program_in_the_object_loads() {
    require_privileges();
    let mut ebpf = strait::datapath::load_object().expect("loading strait's eBPF object");
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let result = match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::CgroupSysctl(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            Program::SkSkb(p) => p.load(),
            Program::SocketFilter(p) => p.load(),
            Program::KProbe(p) => p.load(),
            Program::TracePoint(p) => p.load(),
            Program::RawTracePoint(p) => p.load(),
            other => panic!(
                "program {name}: type {:?} is not handled by this test yet; add it (its load() \
                 may need a BTF or attach target)",
                other.prog_type()
            ),
        };
        // `{:#}`-style chain: aya puts the verifier log in the error's source.
        if let Err(e) = result {
            let mut msg = format!("{e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            panic!(
                "program {name} rejected by Linux {}: {msg}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
            );
        }
        loaded.push(name.to_owned());
    }
    assert!(!loaded.is_empty(), "the eBPF object holds no program");
    println!("loaded {} programs: {}", loaded.len(), loaded.join(", "));
}
