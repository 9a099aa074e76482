//! The `flashcore` command line (the server is being built).
fn main() {}
