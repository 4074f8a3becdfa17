//! Compiles mesh-echo's gRPC proto with protox (pure Rust), so building needs no `protoc`.
//! Only the client is generated: the server is hand-written on hyper so it controls trailers.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
