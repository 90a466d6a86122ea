//! Compiles the .proto files with protox (no protoc needed), generates prost
//! messages and tonic services, and the proto3 JSON mapping with pbjson.

use prost::Message;
use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/twokey/types/v1/types.proto",
    "proto/twokey/vault/v1/vault.proto",
    "proto/twokey/broker/v1/broker.proto",
    "proto/twokey/audit/v1/audit.proto",
    "proto/twokey/consent/v1/consent.proto",
];

/// Messages that carry a seed, a PIN or a code: their Debug is written by hand
/// in `redact.rs` so that secrets never reach a log line.
const SECRET_MESSAGES: &[&str] = &[
    ".twokey.types.v1.Code",
    ".twokey.vault.v1.EnrollRequest",
    ".twokey.vault.v1.EnrollRequest.seed",
    ".twokey.vault.v1.UnsealRequest",
    ".twokey.vault.v1.ReshareRequest",
    ".twokey.broker.v1.EnrollAccountRequest",
    ".twokey.broker.v1.EnrollAccountRequest.seed",
    ".twokey.broker.v1.VerifyPinRequest",
    ".twokey.broker.v1.ShowPinResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor = fds.encode_to_vec();
    std::fs::write(out.join("twokey_descriptor.bin"), &descriptor)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        // Our own Timestamp, whose JSON is Z-normalized as the proto3 JSON
        // mapping requires (pbjson_types writes `+00:00`); the exact path
        // wins over the package-wide one below.
        .extern_path(".google.protobuf.Timestamp", "crate::Timestamp")
        .extern_path(".google.protobuf", "::pbjson_types")
        .btree_map(".")
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .btree_map([".".to_string()])
        .build(&[".twokey"])?;
    Ok(())
}
