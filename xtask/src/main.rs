//! `cargo xtask <task>`: everything a developer or CI runs, with set-up included.

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "strait's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Make sure this machine can build and run strait: checks the kernel (root, bpffs, BTF,
    /// cgroup v2), installs rust-src on the nightly toolchain, bpf-linker 0.13 (built against
    /// the nightly's LLVM 22), cargo-fuzz and the Debian packages tests and demo use. Idempotent.
    Setup,
    /// Set up, then build the agent (with its eBPF object built from source).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run every quality gate: rustfmt, clippy (userspace and eBPF), unit tests,
    /// the privileged tests (real programs in real namespaces; needs root) and a few seconds
    /// of every fuzz target.
    Test {
        /// Run only tests whose name contains this string.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Set up, build, and show strait counting real packets on a throwaway veth pair.
    Demo,
    /// Run a benchmark in release mode (`sync`); arguments after `--` go to it.
    Bench {
        name: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and boot another kernel (Debian's 6.1 by default) under qemu with strait,
    /// the privileged tests and the wireguard module in an initramfs; runs the VM test list
    /// (or `--test`s, or a command after `--`) there and exits with their status. Kernels are
    /// downloaded once into <target>/vm/, never installed. TCG boots in ~10 s.
    Vm(vm::VmArgs),
    /// Set up, build the fuzz targets (fuzz/, cargo-fuzz on nightly) and run one target, or
    /// every target one after the other, for --seconds each. Fails on the first crash, with
    /// the input saved. `--list` lists the targets.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run().map(|_| ()),
        Task::Build { release } => setup::run().and_then(|env| cmd::build_agent(&env, release)),
        Task::Test { filter } => setup::run().and_then(|env| test::run(&env, filter.as_deref())),
        Task::Demo => setup::run().and_then(|env| demo::run(&env)),
        Task::Bench { name, args } => setup::run().and_then(|env| bench::run(&env, &name, &args)),
        Task::Fuzz(args) => {
            if args.list {
                fuzz::main_list();
                Ok(())
            } else {
                setup::run().and_then(|env| fuzz::main(&env, &args))
            }
        }
        Task::Vm(args) => match setup::run().and_then(|env| vm::main(&env, &args)) {
            Ok(0) => Ok(()),
            Ok(rc) => return std::process::ExitCode::from(rc),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
