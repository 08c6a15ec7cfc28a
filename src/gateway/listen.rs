//! The gateway's HTTP server: the accept loop, the connection settings and the threads it runs on.
//!
//! Every LLM and API call is two HTTP hops on loopback here (the consumer's connection and the
//! pooled upstream connection). On crew's shared multi-thread runtime the two connections' tasks
//! sit on different workers, so each request hands over between threads four times (request in,
//! upstream request out, upstream answer in, answer out), each a futex wake-up and a scheduler
//! switch. With `gateway.threads` > 0 the gateway runs on its own threads instead, each a
//! current-thread runtime with its own upstream connection pool, all accepting on the one
//! listening socket: a request, its upstream call and both connections' tasks stay on one thread
//! (docs/benchmarks.md, "Gateway on its own threads").
//!
//! Connections are served by hyper's HTTP/1 server directly (consumers are HTTP/1 clients: the
//! agents' LLM client and SDKs over plain `http`), without the HTTP/2 preface sniffing and router
//! of `axum::serve`; the Unix socket for sandboxes keeps the axum router.
//!
//! Not for: what a request may do and how it is forwarded (see [`super::proxy`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::upstream::Upstreams;
use super::{Gateway, proxy};

/// How long to wait before accepting again after `accept` failed (out of file descriptors, …);
/// the same pause `axum::serve` makes.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What one runtime serves requests with: the gateway, and that runtime's own upstream
/// connections (whose tasks run on the same runtime).
pub(super) struct Serving {
    pub(super) gateway: Arc<Gateway>,
    pub(super) upstreams: Arc<Upstreams>,
}

/// Serves the proxy on `threads` threads of their own (each a current-thread runtime), or on the
/// caller's runtime when `threads` is 0, until `shutdown` is cancelled and open connections are
/// done.
pub(super) async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    threads: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if threads == 0 {
        let serving = Serving {
            upstreams: Arc::clone(&gateway.shared_upstreams),
            gateway,
        };
        accept_loop(listener, Arc::new(serving), shutdown).await;
        return Ok(());
    }
    // One listening socket, registered with every thread's runtime: whichever thread is free
    // takes the next connection (the others see `WouldBlock` and wait again).
    let listener = listener.into_std()?;
    let mut finished = Vec::with_capacity(threads);
    for index in 0..threads {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let serving = Serving {
            upstreams: Arc::new(
                Upstreams::new(gateway.routes.len()).map_err(std::io::Error::other)?,
            ),
            gateway: Arc::clone(&gateway),
        };
        let shutdown = shutdown.clone();
        let (done, finished_rx) = tokio::sync::oneshot::channel();
        finished.push(finished_rx);
        std::thread::Builder::new()
            .name(format!("crew-gateway-{index}"))
            .spawn(move || {
                let served = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    accept_loop(listener, Arc::new(serving), shutdown).await;
                    Ok(())
                });
                // Dropping the runtime ends what is left on it (upstream answers still being
                // read after their consumer hung up): each charges its estimate as it drops,
                // before the caller writes the last accounting.
                drop(runtime);
                let _ = done.send(served);
            })?;
    }
    let mut result = Ok(());
    for finished in finished {
        match finished.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => result = Err(error),
            Err(_) => result = Err(std::io::Error::other("a gateway thread panicked")),
        }
    }
    result
}

/// Accepts connections until `shutdown`, then lets every open connection finish its current
/// request (and its streamed answer) and close.
async fn accept_loop(listener: TcpListener, serving: Arc<Serving>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                tracing::debug!(%error, "gateway cannot accept a connection; pausing");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Streams are many small writes: without TCP_NODELAY, Nagle's algorithm holds each chunk
        // until the previous one is acknowledged (up to the peer's delayed-ACK time, 40 ms).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a gateway connection");
        }
        connections.spawn(serve_connection(
            tcp,
            Arc::clone(&serving),
            shutdown.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    serving: Arc<Serving>,
    shutdown: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request| {
        let serving = Arc::clone(&serving);
        async move { Ok::<_, Infallible>(proxy::handle(&serving, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "gateway connection ended with an error");
    }
}
