//! Transaction ingest: authenticated `PUT /transactions` with 100 `m.room.message` events,
//! persisted (flushed to disk) and acknowledged, against a bare axum handler that does no work.
//!
//! Run: `cargo bench --bench ingest`. Prints events/s and p50/p99 acknowledgement latency, one
//! transaction at a time (as homeservers send) and 10 concurrent, plus the cost of the flush;
//! then the same single stream with a consumer beside it as busy as the pump (it reads the
//! inbox in arrival order, runs the dispatcher on every event and removes the entry), and the
//! resident size after a minute of such sustained ingest (`INGEST_SOAK_SECS` changes the
//! minute).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use matrix_crew::appservice::inbox::Inbox;
use matrix_crew::appservice::{AppserviceState, router};
use matrix_crew::dispatch::{Agent, DispatchConfig, Dispatcher, MemoryHistory, Role, Roster};
use matrix_crew::registration::{NewRegistration, Registration};
use matrix_crew::store::Store;
use serde_json::json;

const EVENTS_PER_TXN: usize = 100;
const SEQUENTIAL_TXNS: usize = 500;
const CONCURRENCY: usize = 10;
const TXNS_PER_WORKER: usize = 100;

fn transaction(seed: usize) -> Vec<u8> {
    let events: Vec<_> = (0..EVENTS_PER_TXN)
        .map(|i| {
            json!({
                "type": "m.room.message",
                "event_id": format!("$ev-{seed}-{i}-abcdefghijklmnopqrstuvwxyz"),
                "room_id": "!benchroom:example.org",
                "sender": "@human:example.org",
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "content": {"msgtype": "m.text", "body": "a message of ordinary length in a busy room, nobody mentioned",
                            "m.mentions": {}},
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "events": events })).expect("serialises")
}

struct Figures {
    events_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn drive(
    url: &str,
    token: &str,
    concurrency: usize,
    per_worker: usize,
    offset: usize,
) -> Figures {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let token = token.to_owned();
        let bodies: Vec<Vec<u8>> = (0..per_worker)
            .map(|n| transaction(offset + worker * per_worker + n))
            .collect();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(bodies.len());
            for (n, body) in bodies.into_iter().enumerate() {
                let sent = Instant::now();
                let response = client
                    .put(format!(
                        "{url}/_matrix/app/v1/transactions/w{worker}-{n}-{offset}"
                    ))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Figures {
        events_per_sec: (latencies.len() * EVENTS_PER_TXN) as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
    }
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn print(label: &str, figures: &Figures) {
    println!(
        "{label:<44} {:>10.0} events/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        figures.events_per_sec,
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3
    );
}

/// A consumer as busy as the pump: reads the inbox in arrival order, runs the dispatcher on each
/// event and removes the entry. Counts what it handled.
fn consume_beside(inbox: Arc<Inbox>, stop: Arc<AtomicBool>, handled: Arc<AtomicU64>) {
    let manager = ruma::UserId::parse("@crew:example.org").expect("valid id");
    let roster = Roster::new(
        vec![Agent {
            user_id: manager,
            role: Role::Manager,
            display_name: "Crew Manager".into(),
            keywords: Vec::new(),
        }],
        [ruma::UserId::parse("@human:example.org").expect("valid id")],
        [],
        &DispatchConfig::default(),
    )
    .expect("valid roster");
    let mut dispatcher = Dispatcher::new(DispatchConfig::default(), roster).expect("valid");
    let history = MemoryHistory::new(10_000);
    while !stop.load(Ordering::Relaxed) {
        let pending = inbox.pending(256).expect("inbox");
        if pending.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for (seq, entry) in pending {
            let decision =
                dispatcher.dispatch(&entry.event, &history, matrix_crew::clock::now_ms());
            std::hint::black_box(decision);
            inbox.complete(seq).expect("complete");
            handled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// This process's resident set size, in MiB (Linux).
fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let inbox = Arc::new(Inbox::open(&store).expect("inbox"));
    let registration = Registration::generate(&NewRegistration {
        id: "crew",
        url: "http://127.0.0.1:9000",
        server_name: "example.org",
        user_prefix: "crew_",
        manager_localpart: "crew",
    });
    let token = registration.hs_token.expose().to_owned();
    let (pings, _) = tokio::sync::watch::channel(None);
    let state = Arc::new(AppserviceState {
        crypto: None,
        hs_token: registration.hs_token.clone(),
        inbox: inbox.clone(),
        registration,
        server_name: "example.org".into(),
        pings,
    });
    let crew_url = serve(router(state, 64 << 20)).await;
    let bare = axum::Router::new().route(
        "/_matrix/app/v1/transactions/{txn}",
        axum::routing::put(|_body: axum::body::Bytes| async { "{}" }),
    );
    let bare_url = serve(bare).await;

    // Warm up both (connections, allocator).
    drive(&crew_url, &token, 1, 20, 1_000_000).await;
    drive(&bare_url, &token, 1, 20, 1_000_000).await;

    println!("transaction ingest, {EVENTS_PER_TXN} m.room.message events per transaction");
    let crew_seq = drive(&crew_url, &token, 1, SEQUENTIAL_TXNS, 0).await;
    let bare_seq = drive(&bare_url, &token, 1, SEQUENTIAL_TXNS, 0).await;
    print("crew, one transaction at a time", &crew_seq);
    print("bare axum handler, one at a time (ceiling)", &bare_seq);
    let crew_conc = drive(&crew_url, &token, CONCURRENCY, TXNS_PER_WORKER, 2_000_000).await;
    let bare_conc = drive(&bare_url, &token, CONCURRENCY, TXNS_PER_WORKER, 2_000_000).await;
    print("crew, 10 concurrent", &crew_conc);
    print("bare axum handler, 10 concurrent (ceiling)", &bare_conc);

    // The flush alone: write one transaction's events, then time the group-commit flush.
    let mut flushes = Vec::new();
    for n in 0..200 {
        #[derive(serde::Deserialize)]
        struct Body {
            events: Vec<Box<serde_json::value::RawValue>>,
        }
        let events = serde_json::from_slice::<Body>(&transaction(3_000_000 + n))
            .expect("json")
            .events;
        inbox
            .ingest(&format!("flush-{n}"), &events)
            .expect("ingest");
        let started = Instant::now();
        store.flush().await.expect("flush");
        flushes.push(started.elapsed());
    }
    flushes.sort();
    println!(
        "flush of one 100-event transaction: p50 {:.3} ms, p99 {:.3} ms",
        flushes[flushes.len() / 2].as_secs_f64() * 1e3,
        flushes[flushes.len() * 99 / 100].as_secs_f64() * 1e3
    );

    // With a consumer as busy as the pump beside it, as in production.
    let stop = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (inbox, stop, handled) = (inbox.clone(), stop.clone(), handled.clone());
        std::thread::spawn(move || consume_beside(inbox, stop, handled))
    };
    let busy = drive(&crew_url, &token, 1, SEQUENTIAL_TXNS, 4_000_000).await;
    print("crew, one at a time, consumer beside", &busy);

    // Sustained ingest for a minute (batches of the single stream), then the resident size.
    let soak = Duration::from_secs(
        std::env::var("INGEST_SOAK_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(60),
    );
    let before = resident_mib();
    let started = Instant::now();
    let mut round = 0;
    let mut worst_p99 = Duration::ZERO;
    while started.elapsed() < soak {
        let figures = drive(&crew_url, &token, 1, 100, 10_000_000 + round * 1_000).await;
        worst_p99 = worst_p99.max(figures.p99);
        round += 1;
    }
    let ingested = round * 100 * EVENTS_PER_TXN;
    // Let the consumer catch up before reading how much it kept.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !inbox.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    consumer.join().expect("consumer");
    println!(
        "sustained ingest {:.0} s: {ingested} events in, {} handled beside, worst p99 of a 100-transaction batch {:.3} ms; resident {before:.0} MiB before, {:.0} MiB after (sled cache {} MiB)",
        soak.as_secs_f64(),
        handled.load(Ordering::Relaxed),
        worst_p99.as_secs_f64() * 1e3,
        resident_mib(),
        matrix_crew::store::DatabaseConfig::default().cache_mb,
    );
}
