fn main() -> std::process::ExitCode {
    strait::cli::main()
}
