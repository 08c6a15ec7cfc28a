//! File storage throughput and memory, on both backends.
//!
//! Run: `cargo bench --bench storage` (starts s3s-fs on loopback, like the tests; set
//! `STORAGE_BENCH_GB=0` to skip the 1 GB transfer). Prints put/get throughput for 1 KB and
//! 10 MB objects, and the process's peak resident memory (VmHWM) before and after moving a
//! 1 GB generated file through each backend: it must stay bounded, not grow with the file.

#[path = "support/process.rs"]
mod process;
#[path = "../tests/support/s3.rs"]
mod s3s_fs;
#[path = "../tests/support/tools.rs"]
mod tools;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use matrix_crew::storage::{Backend, BodyStream, LocalBackend, S3Backend, Storage, StoragePath};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn main() {
    process::two_core_runtime().block_on(run());
}

async fn run() {
    let gigabytes: usize = std::env::var("STORAGE_BENCH_GB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1);
    let local_dir = tempfile::tempdir().expect("temp dir");
    let local = Storage::new(
        Backend::Local(
            LocalBackend::open(&local_dir.path().join("files"))
                .await
                .expect("local backend"),
        ),
        u64::MAX,
    );
    let s3_server = s3s_fs::start_s3().await;
    let s3_storage = Storage::new(
        Backend::S3(
            S3Backend::connect(
                &s3s_fs::s3_config(&s3_server.endpoint, s3s_fs::BUCKET),
                s3s_fs::s3_env(s3s_fs::SECRET_KEY),
            )
            .expect("s3 client"),
        ),
        u64::MAX,
    );
    s3_storage.check().await.expect("s3s-fs answers");

    // The 1 GB transfers first, so the peak is not inherited from the smaller runs.
    println!("## peak memory while moving {gigabytes} GiB (VmHWM of this process)");
    if gigabytes > 0 {
        for (name, storage) in [("local", &local), ("s3", &s3_storage)] {
            big_transfer(name, storage, gigabytes * 1024 * MIB).await;
        }
    }
    println!("## throughput");
    for (name, storage) in [("local", &local), ("s3", &s3_storage)] {
        throughput(name, storage, KIB, 500).await;
        throughput(name, storage, 10 * MIB, 20).await;
    }
}

async fn big_transfer(name: &str, storage: &Storage, total: usize) {
    let path = StoragePath::parse("bench/big.bin").expect("valid path");
    reset_peak();
    let before = process::status_kib("VmHWM") as usize;
    let started = Instant::now();
    storage
        .put(&path, generated(total, 64 * KIB))
        .await
        .expect("put big file");
    let put = started.elapsed();
    let after_put = process::status_kib("VmHWM") as usize;
    let started = Instant::now();
    let mut body = storage.get(&path).await.expect("get big file").body;
    let mut read = 0usize;
    while let Some(chunk) = body.next().await {
        read += chunk.expect("chunk").len();
    }
    let get = started.elapsed();
    assert_eq!(read, total);
    let after_get = process::status_kib("VmHWM") as usize;
    storage.delete(&path).await.expect("delete");
    println!(
        "{name:>5} 1 file of {} MiB: put {:.0} MB/s, get {:.0} MB/s; VmHWM before {} MiB, after put {} MiB, after get {} MiB (growth {} MiB)",
        total / MIB,
        mb_per_s(total, put),
        mb_per_s(total, get),
        before / 1024,
        after_put / 1024,
        after_get / 1024,
        after_get.saturating_sub(before) / 1024,
    );
}

async fn throughput(name: &str, storage: &Storage, size: usize, count: usize) {
    let body = Bytes::from(vec![7u8; size]);
    let started = Instant::now();
    for i in 0..count {
        let path = StoragePath::parse(&format!("bench/{size}/{i}.bin")).expect("valid path");
        storage.put_bytes(&path, body.clone()).await.expect("put");
    }
    let put = started.elapsed();
    let started = Instant::now();
    for i in 0..count {
        let path = StoragePath::parse(&format!("bench/{size}/{i}.bin")).expect("valid path");
        let mut body = storage.get(&path).await.expect("get").body;
        let mut read = 0;
        while let Some(chunk) = body.next().await {
            read += chunk.expect("chunk").len();
        }
        assert_eq!(read, size);
    }
    let get = started.elapsed();
    let started = Instant::now();
    for i in 0..count {
        let path = StoragePath::parse(&format!("bench/{size}/{i}.bin")).expect("valid path");
        storage.head(&path).await.expect("head");
    }
    let head = started.elapsed();
    let label = if size >= MIB {
        format!("{} MB", size / MIB)
    } else {
        format!("{} KB", size / KIB)
    };
    println!(
        "{name:>5} {label:>6} x{count}: put {:.0} ops/s ({:.1} MB/s), get {:.0} ops/s ({:.1} MB/s), head {:.0} ops/s",
        count as f64 / put.as_secs_f64(),
        mb_per_s(size * count, put),
        count as f64 / get.as_secs_f64(),
        mb_per_s(size * count, get),
        count as f64 / head.as_secs_f64(),
    );
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// A generated body, produced chunk by chunk as it is read.
fn generated(total: usize, chunk: usize) -> BodyStream {
    Box::pin(futures::stream::unfold(
        (0x9e37_79b9_7f4a_7c15u64, total),
        move |(mut x, remaining)| async move {
            if remaining == 0 {
                return None;
            }
            let n = remaining.min(chunk);
            let mut buf = Vec::with_capacity(n + 8);
            while buf.len() < n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.extend_from_slice(&x.to_le_bytes());
            }
            buf.truncate(n);
            Some((Ok(Bytes::from(buf)), (x, remaining - n)))
        },
    ))
}

/// Resets VmHWM to the current RSS (Linux: writing 5 to clear_refs), so each phase is measured
/// on its own; where that is refused, before/after still bound the growth.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
