//! Connections to the routes' upstreams: a small HTTP/1 pool per route, one set per serving thread.
//!
//! hyper-util's general-purpose pooled client costs, per request, a pool lookup by scheme and
//! authority under a shared lock, a `Host` header formatted afresh, and a task spawned to put the
//! connection back once the answer's body is read. The gateway knows its upstreams at start-up,
//! so it keeps idle connections per route, builds the `Host` value once, and puts a connection
//! back when the body it carries ends (see [`Leased`]), with no task of its own.
//!
//! A connection that was idle may have been closed by the upstream in the meantime; a request
//! that could not be written on such a connection (hyper hands it back unsent) is sent again on
//! another one, as hyper-util's client does.
//!
//! Not for: which key or route a request uses, timeouts or failover (see [`super::proxy`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use tower::Service;

use super::GatewayError;

/// The connector for new connections: TCP (`TCP_NODELAY`), and TLS through rustls with the ring
/// provider and the webpki roots for `https` upstreams.
type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// One route's idle connections on one serving thread (most recently used last).
type Idle = Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>>;

/// Idle connections kept per route and serving thread; more are closed when they come back.
const MAX_IDLE_PER_ROUTE: usize = 64;

/// Why an upstream could not be asked. Names neither the URL's path nor any header.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    /// No connection could be opened (DNS, TCP or TLS).
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP/1 handshake or the exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The upstream connections of one serving thread (or of the shared runtime).
pub(super) struct Upstreams {
    connector: Connector,
    /// Idle connections, one list per route (same order as the gateway's routes).
    idle: Vec<Idle>,
}

impl Upstreams {
    /// Empty pools for `routes` routes.
    pub(super) fn new(routes: usize) -> Result<Self, GatewayError> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        // The TLS layer below handles `https`; this connector only opens the TCP connection.
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(GatewayError::Client)?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            connector,
            idle: (0..routes).map(|_| Arc::default()).collect(),
        })
    }

    /// Sends `request` (origin-form URI, `Host` set) to route `route`'s upstream at `origin`
    /// (scheme and authority only, for opening connections). Redirects are not followed.
    pub(super) async fn send(
        &self,
        route: usize,
        origin: &http::Uri,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Leased>, UpstreamError> {
        let idle = &self.idle[route];
        loop {
            let reused = self.checkout(idle).await;
            let (mut sender, reused) = match reused {
                Some(sender) => (sender, true),
                None => (self.connect(origin).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        sender,
                        idle: Arc::clone(idle),
                    };
                    return Ok(response.map(|body| Leased::new(body, lease)));
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the idle connection had been closed. Try another.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and ready, if any.
    async fn checkout(&self, idle: &Idle) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let mut sender = idle.lock().expect("pool lock is never poisoned").pop()?;
            if sender.is_closed() {
                continue;
            }
            // Put back when its last body ended, the connection may not have asked for the
            // next request yet; it does so as soon as its task runs.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, origin: &http::Uri) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let io = self
            .connector
            .clone()
            .call(origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "gateway upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A connection in use; it goes back to its pool when the answer's body has ended.
struct Lease {
    sender: SendRequest<Full<Bytes>>,
    idle: Idle,
}

impl Lease {
    fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock is never poisoned");
        if idle.len() < MAX_IDLE_PER_ROUTE {
            idle.push(self.sender);
        }
    }
}

/// An upstream answer's body that returns its connection to the pool once it has been read to
/// the end. Dropped before the end, the connection is not reused (it closes once the rest of the
/// answer has arrived or the upstream gives up).
pub(super) struct Leased {
    body: Incoming,
    lease: Option<Lease>,
}

impl Leased {
    fn new(body: Incoming, lease: Lease) -> Self {
        let mut leased = Self {
            body,
            lease: Some(lease),
        };
        if leased.body.is_end_stream() {
            leased.release();
        }
        leased
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
