//! Helpers shared by the benches that spawn processes.
#![allow(dead_code)] // each bench uses its own subset

use std::path::PathBuf;
use std::process::Command;

/// The `worker` example, built in release.
pub fn worker() -> PathBuf {
    // With this bench's features: the PostgreSQL store's included.
    let features = if cfg!(feature = "postgres") {
        "postgres"
    } else {
        ""
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--example", "worker"])
        .args(["--features", features])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success());
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/worker")
}

/// The value at fraction `p` of `sorted` (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Which parts of a bench to run: the first argument that is not a flag
/// (`cargo bench --bench NAME -- PART`) selects the parts it names or that
/// name it; none selects all.
pub fn wanted_parts() -> impl Fn(&str) -> bool {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    move |part: &str| filter.is_empty() || part.contains(&filter) || filter.contains(part)
}
