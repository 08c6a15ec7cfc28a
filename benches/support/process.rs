//! What the benchmarks read about their own process, and how they run: shared so that every
//! figure in docs/benchmarks.md is measured the same way.
#![allow(dead_code)]

/// A field of `/proc/self/status` in KiB (`VmRSS`: resident now, `VmHWM`: peak resident).
pub fn status_kib(field: &str) -> u64 {
    let prefix = format!("{field}:");
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(prefix.as_str()))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// A runtime with two worker threads: the machine's two cores, as the figures state.
pub fn two_core_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The figure below which `p` per cent of `sorted` lie (nearest rank), so every latency table
/// reads its percentiles the same way.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    let index = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A duration in milliseconds, the unit of the latency tables.
pub fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
