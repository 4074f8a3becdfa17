//! The waypoint (L7 proxy) is not built yet: this placeholder keeps the workspace's shape.
//! It will share HBONE, TLS and the config model with ztunnel through `meshcore`.

fn main() {
    eprintln!("waypoint: the L7 proxy is not implemented yet (see the project's issues)");
    std::process::exit(2);
}
