use clap::Parser as _;
use strait::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays machine-readable; tracing-subscriber also routes the
    // `log` records aya emits into tracing.
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("invalid --log filter {:?}: {e}; using `info`", cli.log);
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.command {
        Command::Count(args) => strait::cli::count::run(args).await,
        Command::Agent(args) => strait::cli::agent::run(args).await,
        Command::Status(args) => strait::cli::status::run(args).await,
        Command::Kvstoremesh(args) => strait::cli::kvstoremesh::run(args).await,
        Command::Observe(args) => strait::cli::observe::run(args).await,
        Command::Bpf(args) => strait::cli::bpf::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
