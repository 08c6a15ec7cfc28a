//! Added latency of the credential gateway over calling the same loopback upstream directly.
//!
//! One run measures both paths side by side, interleaved in rounds so that drift (other load on
//! the machine, CPU frequency) hits both equally: p50 and p99 at concurrency 1 and 10, requests
//! per second through the gateway, and resident memory of the process (client, gateway and
//! upstream together; the gateway's own share is the growth after it starts).
//!
//! Run: `cargo bench --bench gateway` (optionally `GATEWAY_BENCH_REQUESTS=20000`).

#[path = "support/process.rs"]
mod process;
#[path = "../tests/support/scripted_llm.rs"]
mod scripted_llm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_crew::gateway::{
    ConsumerPolicy, Gateway, GatewayConfig, Injection, RouteConfig, RouteKind, SecretSource,
};
use matrix_crew::store::Store;
use process::{ms, percentile};
use scripted_llm::ScriptedLlm;

const ROUNDS: usize = 10;

fn main() {
    process::two_core_runtime().block_on(run());
}

async fn run() {
    let per_mode: usize = std::env::var("GATEWAY_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let upstream = ScriptedLlm::start().await;
    upstream.set_recording(false);
    let rss_before = process::status_kib("VmRSS");

    let data_dir = tempfile::tempdir().expect("temp dir");
    let config = GatewayConfig {
        routes: vec![RouteConfig {
            name: "llm".into(),
            prefix: "/llm".into(),
            upstream: format!("{}/v1", upstream.url()).parse().expect("url"),
            kind: RouteKind::Openai,
            inject: Injection::default(),
            credentials: vec![SecretSource::Env("BENCH_KEY".into())],
            endpoints: None,
            forward_headers: vec![],
            set_headers: Default::default(),
        }],
        ..GatewayConfig::default()
    };
    let gateway = Gateway::with_env(
        config,
        Store::temporary().expect("store"),
        data_dir.path(),
        &|name| (name == "BENCH_KEY").then(|| "sk-bench-real-key".to_owned()),
    )
    .expect("gateway");
    let (_, token) = gateway
        .add_consumer(
            "bench",
            Some(ConsumerPolicy {
                requests_per_minute: 0,
                daily_token_budget: 0,
                max_concurrent: 0,
                ..ConsumerPolicy::default()
            }),
        )
        .await
        .expect("consumer");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gateway_url = format!(
        "http://{}/llm/chat/completions",
        listener.local_addr().expect("addr")
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(Arc::clone(&gateway).serve(listener, cancel.clone()));
    let direct_url = format!("{}/v1/chat/completions", upstream.url());

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "bench-model",
        "messages": [{"role": "user", "content": "hello"}],
    }))
    .expect("json");
    let body = bytes::Bytes::from(body);

    // Warm up both paths (connections, allocator, sled).
    for url in [&direct_url, &gateway_url] {
        measure(&client, url, token.expose(), &body, 10, 500).await;
    }

    println!(
        "gateway bench: {per_mode} requests per path and concurrency, {ROUNDS} interleaved rounds, 2 worker threads"
    );
    println!(
        "{:>11} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "concurrency",
        "direct p50",
        "gw p50",
        "direct p99",
        "gw p99",
        "added p50",
        "added p99",
        "direct r/s",
        "gw req/s"
    );
    for concurrency in [1usize, 10] {
        let mut direct = Vec::with_capacity(per_mode);
        let mut through = Vec::with_capacity(per_mode);
        let mut gateway_time = Duration::ZERO;
        let mut direct_time = Duration::ZERO;
        let per_round = per_mode / ROUNDS;
        for _ in 0..ROUNDS {
            let (latencies, elapsed) = measure(
                &client,
                &direct_url,
                token.expose(),
                &body,
                concurrency,
                per_round,
            )
            .await;
            direct.extend(latencies);
            direct_time += elapsed;
            let (latencies, elapsed) = measure(
                &client,
                &gateway_url,
                token.expose(),
                &body,
                concurrency,
                per_round,
            )
            .await;
            through.extend(latencies);
            gateway_time += elapsed;
        }
        direct.sort_unstable();
        through.sort_unstable();
        let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
        let (g50, g99) = (percentile(&through, 50.0), percentile(&through, 99.0));
        println!(
            "{:>11} {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>10.3}ms {:>10.3}ms {:>10.0} {:>10.0}",
            concurrency,
            ms(d50),
            ms(g50),
            ms(d99),
            ms(g99),
            ms(g50) - ms(d50),
            ms(g99) - ms(d99),
            direct.len() as f64 / direct_time.as_secs_f64(),
            through.len() as f64 / gateway_time.as_secs_f64(),
        );
    }
    let rss_after = process::status_kib("VmRSS");
    println!(
        "resident memory: {:.1} MiB before the gateway started (upstream + client), {:.1} MiB after the load ({:+.1} MiB)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after as f64 - rss_before as f64) / 1024.0
    );
    println!(
        "load average during the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let audited = gateway.audit_log(1).expect("audit").len();
    assert_eq!(audited, 1, "requests were audited");
    cancel.cancel();
    server.await.expect("join").expect("serve");
}

/// Sends `total` requests from `concurrency` tasks; returns each latency and the wall time.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &bytes::Bytes,
    concurrency: usize,
    total: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let per_task = total / concurrency;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let token = token.to_owned();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let start = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("request");
                assert!(response.status().is_success(), "{}", response.status());
                response.bytes().await.expect("body");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    (all, started.elapsed())
}
