//! Builds the eBPF object from `agent-ebpf/` (through aya-build, with bpf-linker) so that
//! `strait` embeds it from OUT_DIR. No prebuilt object is ever committed.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build for userspace-only checks; an empty stub object is
//! written then, and loading it fails with a clear error at run time.
use anyhow::{Context as _, anyhow};
use std::{env, fs, path::PathBuf};

const EBPF_PACKAGE: &str = "strait-ebpf";
/// The bin target of the eBPF crate, i.e. the object's file name in OUT_DIR.
const EBPF_OBJECT: &str = "strait";

fn main() -> anyhow::Result<()> {
    compile_api()?;
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;

    println!("cargo:rerun-if-env-changed=STRAIT_EBPF_TOOLCHAIN");
    let toolchain = env::var("STRAIT_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain.as_deref() {
        None | Some("") | Some("nightly") => aya_build::Toolchain::Nightly,
        Some(custom) => aya_build::Toolchain::Custom(custom),
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        toolchain,
    )?;

    let object =
        PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?).join(EBPF_OBJECT);
    if !object.exists() {
        // Only reached with AYA_BUILD_SKIP: keep include_bytes! compiling.
        fs::write(&object, []).with_context(|| format!("writing stub {}", object.display()))?;
    }
    Ok(())
}

/// The agent API (gRPC over a unix socket) from `proto/`.
fn compile_api() -> anyhow::Result<()> {
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?)
            .join("..")
            .join("proto");
    let proto = root.join("strait/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .compile_protos(&[&proto], &[&root])
        .with_context(|| format!("compiling {}", proto.display()))?;
    Ok(())
}
