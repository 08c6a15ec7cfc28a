//! Test tools installed once per machine, under a lock, into a cache directory.
//!
//! Test binaries run in parallel (and `.ci/run` may pre-install), so every install takes an
//! exclusive file lock and re-checks before doing the work. The cache lives in
//! `$CREW_TEST_TOOLS` or `~/.cache/matrix-crew-test`, outside the clone, so a second run of CI
//! reuses it.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory where test tools are installed.
pub fn cache_dir() -> PathBuf {
    let dir = std::env::var_os("CREW_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            PathBuf::from(home).join(".cache/matrix-crew-test")
        });
    std::fs::create_dir_all(&dir).expect("create the test tools cache directory");
    dir
}

/// Runs `install` once: if `marker` exists nothing happens; otherwise `install` runs under an
/// exclusive lock named `name` and, when it succeeds, `marker` is created.
pub fn install_once(name: &str, marker: &Path, install: impl FnOnce() -> Result<(), String>) {
    if marker.exists() {
        return;
    }
    let lock_path = cache_dir().join(format!("{name}.lock"));
    let lock = File::create(&lock_path).expect("create the install lock file");
    lock.lock().expect("take the install lock");
    if !marker.exists() {
        if let Err(message) = install() {
            panic!("installing {name} for the tests failed: {message}");
        }
        std::fs::write(marker, b"ok").expect("write the install marker");
    }
    lock.unlock().expect("release the install lock");
}

/// Runs a command, turning failure into a message that names the command and its output.
pub fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|error| format!("cannot run {command:?}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A free TCP port on loopback (bound then released; the caller binds it next), below the
/// kernel's ephemeral range (32768 and up on Linux): a port from that range can be taken by
/// any outgoing connection while a killed `crew` is down, and its restart then fails to bind.
/// The port stays reserved for this test process (see [`reserve_port`]), so that another test
/// process probing at the same moment does not take it while its holder is down.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    /// Where this test process starts looking, spread by process id so that test binaries
    /// running side by side look in different places.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 12_000;
    const SPAN: u16 = 20_000;
    let _ = NEXT.compare_exchange(
        0,
        LOW + (std::process::id() % u32::from(SPAN)) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = LOW + (port - LOW) % SPAN;
        if reserve_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

/// Reserves `port` for the rest of this process's life: an exclusive lock on a file named after
/// it in the cache directory, held open until the process exits (the kernel drops the lock
/// then, also on a crash). A crew killed with SIGKILL, or a Synapse restarted, binds its port
/// again a moment later; without the reservation a test binary running beside this one could
/// probe the port in that moment, find it free and take it. False when another process holds
/// it.
fn reserve_port(port: u16) -> bool {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
    let dir = cache_dir().join("ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let Ok(file) = File::create(dir.join(format!("{port}.lock"))) else {
        return false;
    };
    if file.try_lock().is_err() {
        return false;
    }
    HELD.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(file);
    true
}

/// Waits for `condition` to hold, polling, until `deadline` passes; panics with `what` if not.
pub async fn wait_for<F, Fut, T>(what: &str, deadline: std::time::Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = std::time::Instant::now() + deadline;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if std::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
