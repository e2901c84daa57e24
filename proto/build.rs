//! Generates the gRPC code from `dapt/v1/*.proto` with `protox`, a protobuf compiler in Rust, so
//! that building dapt needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["dapt/v1/coordinator.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
