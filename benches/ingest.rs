//! Transaction ingest: authenticated `PUT /transactions` with 100 `m.room.message` events,
//! persisted (flushed to disk) and acknowledged, against a bare axum handler that does no work.
//!
//! Run: `cargo bench --bench ingest`. Prints events/s and p50/p99 acknowledgement latency, one
//! transaction at a time (as homeservers send) and 10 concurrent, plus the cost of the flush;
//! then the same single stream with the pump beside it on the same runtime (the product's
//! schedule, `dispatch::pump::Pump`: read, decide with the dispatcher, commit through the wake
//! queue), kept busy by what the earlier phases left in the inbox; and the resident size of
//! this whole process after a minute of such sustained ingest (`INGEST_SOAK_SECS` changes the
//! minute, `INGEST_SKIP_SOAK=1` skips it; `scripts/bench-ingest.sh` measures `crew serve` alone).
//! `PUMP_CHUNK=N` or `PUMP_SCHEDULE=per-event` (the schedule before batching) for A/B runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use matrix_crew::appservice::inbox::{BacklogLimit, Inbox, InboxEntry};
use matrix_crew::appservice::{AppserviceState, router};
use matrix_crew::dispatch::pump::Pump;
use matrix_crew::dispatch::queue::{Handled, PendingWake, WakeQueue};
use matrix_crew::dispatch::{Agent, DispatchConfig, Dispatcher, MemoryHistory, Role, Roster};
use matrix_crew::outbox::Outbox;
use matrix_crew::registration::{NewRegistration, Registration};
use matrix_crew::store::Store;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The allocator `crew serve` runs with (`src/main.rs`), so the figures are the binary's: with
/// glibc's malloc a quarter of this bench's time went to `malloc`/`free`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// The dispatcher the pump beside runs: the Manager and one person, as in a small crew.
fn dispatcher() -> Dispatcher {
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
    Dispatcher::new(DispatchConfig::default(), roster).expect("valid")
}

/// What the dispatcher decides for one entry, as the pump commits it.
fn decide(
    dispatcher: &mut Dispatcher,
    history: &MemoryHistory,
    seq: u64,
    entry: &InboxEntry,
) -> Handled {
    let decision = dispatcher.dispatch(&entry.event, history, matrix_crew::clock::now_ms());
    let wakes = match decision.room_id.clone() {
        Some(room) => PendingWake::for_decision(&decision, &room, &entry.event, 1),
        None => Vec::new(),
    };
    Handled {
        seq,
        wakes,
        effects: Vec::new(),
    }
}

/// The pump beside ingest, on the runtime that serves the transactions, as in `crew serve`: the
/// product's schedule ([`Pump::run`], `PUMP_CHUNK` entries per sled transaction, default the
/// product's), or with `PUMP_SCHEDULE=per-event` the schedule before issue 11's batching (a
/// transaction per event, no yield within a read of 100), for A/B runs.
async fn pump_beside(
    inbox: Arc<Inbox>,
    queue: Arc<WakeQueue>,
    outbox: Arc<Outbox>,
    stop: CancellationToken,
    handled: Arc<AtomicU64>,
) {
    let mut dispatcher = dispatcher();
    let history = MemoryHistory::new(10_000);
    if std::env::var("PUMP_SCHEDULE").as_deref() == Ok("per-event") {
        while !stop.is_cancelled() {
            let batch = inbox.pending(100).expect("inbox");
            if batch.is_empty() {
                tokio::select! {
                    () = inbox.arrived() => continue,
                    () = stop.cancelled() => return,
                }
            }
            for (seq, entry) in batch {
                let item = decide(&mut dispatcher, &history, seq, &entry);
                queue
                    .commit_with_effects(&inbox, seq, &item.wakes, &outbox, &item.effects)
                    .expect("commit");
                handled.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    let mut pump = Pump::new(&inbox, &queue, &outbox);
    if let Some(chunk) = std::env::var("PUMP_CHUNK")
        .ok()
        .and_then(|chunk| chunk.parse().ok())
    {
        pump.chunk = chunk;
    }
    pump.run(
        &stop,
        |seq, entry| decide(&mut dispatcher, &history, seq, entry),
        |items| {
            handled.fetch_add(items.len() as u64, Ordering::Relaxed);
        },
    )
    .await;
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
    // No backlog limit: the earlier phases leave the pump some 170,000 events behind, and this
    // bench measures what ingest itself costs beside a busy pump, not the wait for it that a
    // backlog over the limit would add (`BacklogLimit`; `scripts/bench-ingest.sh` measures that,
    // on the release binary).
    let inbox = Arc::new(
        Inbox::open(&store)
            .expect("inbox")
            .with_backlog_limit(BacklogLimit {
                events: usize::MAX,
                ..BacklogLimit::default()
            }),
    );
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

    // With the pump beside it, as in production: what the earlier phases left in the inbox
    // keeps it busy from the start.
    // Counted before the pump starts: `Inbox::len` reads every batch.
    let backlog = inbox.len();
    let queue = Arc::new(WakeQueue::open(&store).expect("queue"));
    let outbox = Arc::new(Outbox::open(&store).expect("outbox"));
    let stop = CancellationToken::new();
    let handled = Arc::new(AtomicU64::new(0));
    let consumer = tokio::spawn(pump_beside(
        inbox.clone(),
        queue,
        outbox,
        stop.clone(),
        handled.clone(),
    ));
    let busy = drive(&crew_url, &token, 1, SEQUENTIAL_TXNS, 4_000_000).await;
    print("crew, one at a time, pump beside", &busy);
    println!(
        "  (the pump handled {} events meanwhile, from a backlog of {backlog}; schedule {})",
        handled.load(Ordering::Relaxed),
        std::env::var("PUMP_SCHEDULE").unwrap_or_else(|_| format!(
            "chunks of {}",
            std::env::var("PUMP_CHUNK")
                .unwrap_or_else(|_| matrix_crew::dispatch::pump::CHUNK.to_string())
        ))
    );
    if std::env::var("INGEST_SKIP_SOAK").is_ok() {
        stop.cancel();
        consumer.await.expect("pump");
        return;
    }

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
    stop.cancel();
    consumer.await.expect("pump");
    println!(
        "sustained ingest {:.0} s: {ingested} events in, {} handled by the pump, worst p99 of a 100-transaction batch {:.3} ms; resident {before:.0} MiB before, {:.0} MiB after (sled cache {} MiB)",
        soak.as_secs_f64(),
        handled.load(Ordering::Relaxed),
        worst_p99.as_secs_f64() * 1e3,
        resident_mib(),
        matrix_crew::store::DatabaseConfig::default().cache_mb,
    );
}
