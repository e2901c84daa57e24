//! Helpers for the end-to-end tests in `tests/tests/`, which run the real `dapt` binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf()
}

/// A binary of this workspace, built in the same profile as the running test.
///
/// Cargo builds a package's binaries only for that package's own tests, so the README's test
/// command builds them first (`cargo build --workspace --bins && cargo test --workspace`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (same profile as the tests)",
        path.display()
    );
    path
}

/// Runs `dapt` with `args` and returns its output.
pub fn dapt(args: &[&str]) -> Output {
    Command::new(binary("dapt"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("dapt runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
