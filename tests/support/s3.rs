//! A real S3 server for the storage tests and benchmarks: s3s-fs (which checks signatures for
//! real) on loopback, installed once with `cargo install` into the test tools cache.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use matrix_crew::storage::S3Config;

use super::tools;

pub const ACCESS_KEY: &str = "crew-test-access";
pub const SECRET_KEY: &str = "crew-test-secret-5f2c9a";
/// The bucket every server starts with (a folder in its directory).
pub const BUCKET: &str = "crew";

/// A running s3s-fs on loopback, killed on drop.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The s3s-fs binary, installed first if needed.
pub fn s3s_fs_binary() -> PathBuf {
    let root = tools::cache_dir().join("s3s");
    let binary = root.join("bin/s3s-fs");
    if binary.exists() {
        return binary;
    }
    tools::install_once("s3s-fs", &root.join("installed"), || {
        if binary.exists() {
            return Ok(());
        }
        tools::run(
            Command::new("cargo")
                .args([
                    "install",
                    "s3s-fs@0.14.1",
                    "--locked",
                    "--features",
                    "binary",
                    "--root",
                ])
                .arg(&root),
        )
    });
    assert!(
        binary.exists(),
        "s3s-fs is not at {} after installing; install it with `cargo install s3s-fs@0.14.1 --locked --features binary --root {}`",
        binary.display(),
        root.display()
    );
    binary
}

/// Starts s3s-fs in a temporary directory with [`BUCKET`], and waits until it listens.
pub async fn start_s3() -> S3Server {
    let binary = s3s_fs_binary();
    let dir = tempfile::tempdir().expect("temp dir for s3s-fs");
    std::fs::create_dir(dir.path().join(BUCKET)).expect("create the bucket folder");
    let port = tools::free_port();
    let log = std::fs::File::create(dir.path().join("s3s.log")).expect("s3s log file");
    let child = Command::new(&binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start s3s-fs");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    tools::wait_for("s3s-fs to listen", Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
    server
}

/// The config for `bucket` on the server at `endpoint`, credentials read by [`s3_env`].
pub fn s3_config(endpoint: &str, bucket: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.parse().expect("valid endpoint")),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        path_style: true,
        access_key_env: "TEST_S3_AK".into(),
        secret_key_env: "TEST_S3_SK".into(),
    }
}

/// The environment [`s3_config`] reads its credentials from, with `secret` as the secret key.
pub fn s3_env(secret: &'static str) -> impl Fn(&str) -> Option<String> {
    move |name| match name {
        "TEST_S3_AK" => Some(ACCESS_KEY.into()),
        "TEST_S3_SK" => Some(secret.into()),
        _ => None,
    }
}
