//! Code generated from `proto/medbox/v1` by `build.rs`; nothing hand-written
//! lives here. Only `medboxd` and `medboxctl` depend on this crate: every other
//! crate speaks in its own domain types.

/// The `medbox.v1` package: messages, clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("medbox.v1");
}

/// The encoded file descriptor set of every medbox proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/medbox_descriptor.bin"));
