//! `strait-cni` built as a binary of this package, so `cargo test` rebuilds it with the tests
//! (the `strait` package's own `strait-cni` is not built by `cargo test`).
fn main() -> std::process::ExitCode {
    strait::cni::main()
}
