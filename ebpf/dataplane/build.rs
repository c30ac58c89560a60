//! Builds the kernel programs (`ebpf/programs`, nightly, bpfel-unknown-none) with aya-build and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs what
//! this needs (the nightly `rust-src` and bpf-linker).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf = Path::new(&manifest_dir).join("..");
    let programs = ebpf.join("programs");
    // The programs' own sources are watched by aya-build; their shared types are not.
    println!("cargo:rerun-if-changed={}", ebpf.join("common").display());
    let root_dir = programs.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ebpf-programs",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
