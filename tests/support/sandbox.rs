//! The sandbox image the tests run Workers' commands in, built once per machine (under a lock)
//! by the real `crew sandbox build`, and a guard that removes a test crew's containers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use super::crew::crew_binary;
use super::tools;

/// The image `crew sandbox build` makes by default (what test crews use).
pub const IMAGE: &str = "matrix-crew-sandbox:latest";

fn image_present() -> bool {
    Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Makes sure the sandbox image exists: Docker must run (the test fails saying so otherwise);
/// the first test to get here builds the image from Debian's packages, the others wait.
pub fn ensure_image() {
    let docker = Command::new("docker").arg("version").output();
    assert!(
        docker.is_ok_and(|output| output.status.success()),
        "these tests need a running Docker engine: install docker.io (apt-get install docker.io) and start it"
    );
    if image_present() {
        return;
    }
    let lock_path = tools::cache_dir().join("sandbox-image.lock");
    let lock = std::fs::File::create(&lock_path).expect("create the image lock file");
    lock.lock().expect("take the image lock");
    if !image_present() {
        let work = tools::cache_dir().join("sandbox-build");
        std::fs::create_dir_all(&work).unwrap();
        // `crew sandbox build` without a config builds the default image.
        let result = tools::run(Command::new(crew_binary()).current_dir(&work).args([
            "--config",
            "no-config.toml",
            "sandbox",
            "build",
        ]));
        if let Err(message) = result {
            panic!(
                "building the sandbox image failed (it needs root, Docker and Debian's mirror): {message}"
            );
        }
    }
    lock.unlock().expect("release the image lock");
}

/// Removes a test crew's containers and network when dropped (`crew sandbox clean`).
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(crew_binary())
            .arg("--config")
            .arg(&self.0)
            .args(["sandbox", "clean"])
            .output();
    }
}

/// `docker` with `args`, its stdout (panics with its stderr when it fails).
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The data directory's sandbox instance label (as crew computes it), to find its containers.
pub fn containers_of(data_dir: &Path, worker: &str) -> Vec<String> {
    let dir = std::fs::canonicalize(data_dir).unwrap();
    use sha2::Digest;
    let instance = hex::encode(&sha2::Sha256::digest(dir.to_string_lossy().as_bytes())[..5]);
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=matrix-crew.instance={instance}"),
        "--filter",
        &format!("label=matrix-crew.worker={worker}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}
