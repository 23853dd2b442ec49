//! The object is linked by the external `bpf-linker` binary, which cargo does not track:
//! rebuild whenever the linker on PATH changes.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => {
            println!("cargo:warning=bpf-linker not found on PATH ({e}); run `cargo xtask setup`")
        }
    }
}
