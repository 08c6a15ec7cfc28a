//! Workers' sandboxes on the real Docker engine: cold start (container created and started,
//! then the first command), a trivial command in a warm container (the whole `run` path:
//! workspace pulled from storage, `docker exec`, exit code, workspace pushed back), resident
//! memory of an idle container, and the image's size.
//!
//! Needs Docker and the sandbox image (`crew sandbox build`).
//! Run: `cargo bench --bench sandbox` (optionally `SANDBOX_BENCH_COLD=10 SANDBOX_BENCH_WARM=200`).

#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use matrix_crew::sandbox::{SandboxConfig, SandboxWorker, Sandboxes};
use matrix_crew::secret::Secret;
use matrix_crew::storage::{Backend, LocalBackend, Storage, StoragePrefix};
use process::{ms, percentile};

fn main() {
    process::two_core_runtime().block_on(run());
}

fn count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let files = data_dir.path().join("files");
    std::fs::create_dir_all(&files).expect("files dir");
    let storage = Storage::new(
        Backend::Local(LocalBackend::open(&files).await.expect("local storage")),
        16 * 1024 * 1024,
    );
    let config = SandboxConfig::default();
    let image = config.image.clone();
    let sandboxes = Sandboxes::new(config, storage, data_dir.path());
    let worker = SandboxWorker {
        name: "bench".into(),
        token: Secret::new("crewgw_bench-token".to_owned()),
        folders: vec![StoragePrefix::parse("agents/bench/").expect("prefix")],
    };
    let limit = Duration::from_secs(30);
    // The network and the relay exist after the first run; cold start is a Worker's container.
    sandboxes
        .run(&worker, "true", "/workspace", limit)
        .await
        .expect("the first command (is the image built? `crew sandbox build`)");

    let mut cold = Vec::new();
    for _ in 0..count("SANDBOX_BENCH_COLD", 10) {
        sandboxes.remove("bench").await.expect("remove");
        let started = Instant::now();
        sandboxes
            .run(&worker, "true", "/workspace", limit)
            .await
            .expect("cold command");
        cold.push(started.elapsed());
    }
    cold.sort();

    let mut warm = Vec::new();
    for _ in 0..count("SANDBOX_BENCH_WARM", 200) {
        let started = Instant::now();
        let run = sandboxes
            .run(&worker, "true", "/workspace", limit)
            .await
            .expect("warm command");
        assert_eq!(run.exit_code, Some(0));
        warm.push(started.elapsed());
    }
    warm.sort();

    // The floor: a bare `docker exec true` through the same API (create, start attached, read
    // to the end, inspect for the exit code), without crew's wrapper or workspace sync.
    let engine = bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let name = sandboxes.container_name("bench");
    let mut bare = Vec::new();
    for _ in 0..count("SANDBOX_BENCH_WARM", 200) {
        use futures::StreamExt;
        let started = Instant::now();
        let exec = engine
            .create_exec(
                &name,
                bollard::models::ExecConfig {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("create exec");
        if let bollard::exec::StartExecResults::Attached { mut output, .. } =
            engine.start_exec(&exec.id, None).await.expect("start exec")
        {
            while output.next().await.is_some() {}
        }
        engine.inspect_exec(&exec.id).await.expect("inspect exec");
        bare.push(started.elapsed());
    }
    bare.sort();

    // Idle: nothing runs in it but `sleep infinity` under docker-init.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let memory = docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &name]);
    let relay = format!("crew-{}-gateway-relay", sandboxes.instance());
    let relay_memory = docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &relay]);
    let size: u64 = docker(&["image", "inspect", "--format", "{{.Size}}", &image])
        .trim()
        .parse()
        .unwrap_or(0);

    println!(
        "sandbox cold start (create + start + first command), n={}",
        cold.len()
    );
    println!(
        "  p50 {:.0} ms  p99 {:.0} ms",
        ms(percentile(&cold, 50.0)),
        ms(percentile(&cold, 99.0))
    );
    println!(
        "trivial command, warm container (run_command path), n={}",
        warm.len()
    );
    println!(
        "  p50 {:.1} ms  p99 {:.1} ms",
        ms(percentile(&warm, 50.0)),
        ms(percentile(&warm, 99.0))
    );
    println!("bare docker exec of `true` (the floor), n={}", bare.len());
    println!(
        "  p50 {:.1} ms  p99 {:.1} ms",
        ms(percentile(&bare, 50.0)),
        ms(percentile(&bare, 99.0))
    );
    println!("idle container memory (docker stats): {}", memory.trim());
    println!(
        "relay container memory (docker stats): {}",
        relay_memory.trim()
    );
    println!("image {image}: {:.0} MB", size as f64 / 1e6);
    sandboxes.remove_all().await.expect("clean up");
}

fn docker(args: &[&str]) -> String {
    let output = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
