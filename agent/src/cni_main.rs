//! `strait-cni`: the CNI plugin binary a container runtime executes (see `strait::cni`).

fn main() -> std::process::ExitCode {
    strait::cni::main()
}
