//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the sidecar binary.
//!
//! The object is built by the xtask (nightly + bpf-linker), not here, so that a plain `cargo build`
//! of the proxy works on any machine. Without the object the binary still builds; `sidecar init`
//! then refuses to run and says how to build it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ebpf_object)");
    println!("cargo:rerun-if-env-changed=SIDECAR_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("SIDECAR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../sidecar-ebpf/target/bpfel-unknown-none/release/sidecar-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("sidecar-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => {
            fs::write(&out, bytes).expect("write OUT_DIR/sidecar-ebpf.o");
            println!("cargo:rustc-cfg=ebpf_object");
        }
        Err(_) => {
            fs::write(&out, b"").expect("write OUT_DIR/sidecar-ebpf.o");
            println!(
                "cargo:warning=eBPF object not found at {}: `sidecar init` will refuse to run. Build it with `cargo xtask build-ebpf`.",
                object.display()
            );
        }
    }
}
