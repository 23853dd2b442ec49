//! The user's scenario end to end (`cargo xtask demo` runs this): builds two clusters in
//! namespaces, runs the seven steps with narration, prints the measurements and removes
//! everything it created — also on failure and on Ctrl-C.
use std::path::PathBuf;

use clap::Parser;
use strait_tests::e2e;

#[derive(Parser)]
struct Args {
    /// The strait binary to run (agents, kvstoremesh, status, observe).
    #[arg(long)]
    strait: PathBuf,
    /// Only step headers and measurements, no explanations.
    #[arg(long)]
    quiet: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let opts = e2e::Options {
        strait: args.strait,
        narrate: !args.quiet,
    };
    let report = e2e::run(opts, |resources| {
        let installed = ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: removing processes, namespaces, cgroups and pins");
            resources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cleanup();
            std::process::exit(130);
        });
        if let Err(e) = installed {
            eprintln!("warning: no Ctrl-C handler ({e}); cleanup runs only at the end");
        }
    });
    println!("\n==> summary\n{}", report.summary());
    if report.failed().is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
