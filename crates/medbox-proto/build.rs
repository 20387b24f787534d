//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed) and
//! keeps the encoded descriptor set for server reflection.
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): the compiled build script is cached
    // in the shared target dir and reused by clones at other paths.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "medbox/v1/inference.proto",
        "medbox/v1/admin.proto",
        "medbox/v1/finetuning.proto",
        "medbox/v1/agents.proto",
    ];
    // Each file and the folder (a new file), so that every build sees an edit.
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join("medbox/v1").display()
    );
    for file in files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let descriptors = protox::compile(files, [&proto_root])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("medbox_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
