//! Transaction ingest: authenticated `PUT /transactions` with 100 `m.room.message` events,
//! persisted (flushed to disk) and acknowledged, against a bare axum handler that does no work.
//!
//! Run: `cargo bench --bench ingest`. Prints events/s and p50/p99 acknowledgement latency, one
//! transaction at a time (as homeservers send) and 10 concurrent, plus the cost of the flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_crew::appservice::inbox::Inbox;
use matrix_crew::appservice::{AppserviceState, router};
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
}
