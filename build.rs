//! Names the commit the binary is built from, for the `inventory_build_info` metric:
//! `INVENTORY_COMMIT` if set (an image build without `.git`), else `git rev-parse`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=INVENTORY_COMMIT");
    let from_git = || {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !commit.is_empty()).then_some(commit)
    };
    let commit = std::env::var("INVENTORY_COMMIT").ok().filter(|c| !c.is_empty()).or_else(from_git);
    println!("cargo:rustc-env=INVENTORY_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
    // A new commit rebuilds the binary (only files that exist: a missing one would rebuild always).
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
