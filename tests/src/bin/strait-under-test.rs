//! `strait` itself, built as a binary of this package: cargo rebuilds it with the tests, so
//! the end-to-end test always runs the current agent (the `strait` package's own binary is
//! not built by `cargo test`).
fn main() -> std::process::ExitCode {
    strait::cli::main()
}
