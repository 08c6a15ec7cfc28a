//! The local admin endpoint: how CLI commands reach state while `crew serve` holds the database.
//!
//! sled allows one process per database, so `crew gateway …`, `crew files …` and friends do not
//! open it themselves; they call this endpoint on loopback. Each domain module contributes a
//! stateless [`axum::Router`] that [`serve`] nests under its name (`/gateway/…`, `/files/…`). A
//! random token in `<data_dir>/admin.token` (mode 0600) authenticates callers, so other local
//! users cannot use it.

use std::net::SocketAddr;
use std::path::Path;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::secret::Secret;

/// Errors talking to the running server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "crew serve is not running at {addr} (start it with `crew serve`, or check admin_api.bind)"
    )]
    NotRunning { addr: SocketAddr },
    #[error(
        "cannot read the admin token {path}: {source} (is this the data dir `crew serve` uses?)"
    )]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server answered {status}: {message}")]
    Server { status: u16, message: String },
    #[error("request to the admin endpoint failed: {0}")]
    Http(#[from] reqwest::Error),
}

/// Error body of the admin API: `{"error": "..."}`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AdminErrorBody {
    pub error: String,
}

/// A JSON error answer for admin handlers.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(AdminErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Reads the admin token, creating it (mode 0600) when absent.
pub fn load_or_create_token(path: &Path) -> std::io::Result<Secret> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(std::io::Error::other(format!(
            "{} is empty; delete it and crew makes a new admin token",
            path.display()
        ))),
        Ok(text) => Ok(Secret::new(text.trim())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let token = Secret::random(32);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            write_private(path, token.expose().as_bytes())?;
            Ok(token)
        }
        Err(error) => Err(error),
    }
}

/// Writes a file readable only by its owner (also when it existed with a wider mode).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

/// Serves `routes` on `listener`, requiring `Authorization: Bearer <token>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    token: Secret,
    routes: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = routes.layer(axum::middleware::from_fn_with_state(token, require_token));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn require_token(State(token): State<Secret>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(candidate) if token.matches(candidate) => next.run(request).await,
        _ => error_response(StatusCode::UNAUTHORIZED, "admin token missing or wrong"),
    }
}

/// The CLI side: calls the running server's admin endpoint.
pub struct AdminClient {
    addr: SocketAddr,
    token: Secret,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn from_config(config: &Config) -> Result<Self, AdminError> {
        let path = config.admin_token_path();
        let token = std::fs::read_to_string(&path)
            .map(|text| Secret::new(text.trim()))
            .map_err(|source| AdminError::Token {
                path: path.display().to_string(),
                source,
            })?;
        // Port 0 asks `crew serve` for any free port; it writes the one it got.
        let addr = if config.admin_api.bind.port() == 0 {
            std::fs::read_to_string(config.admin_addr_path())
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(config.admin_api.bind)
        } else {
            config.admin_api.bind
        };
        Ok(Self {
            addr,
            token,
            http: reqwest::Client::new(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, AdminError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// A request builder with auth set, for bodies that are not JSON (file uploads, downloads).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(self.token.expose())
    }

    /// Sends a request built with [`AdminClient::request`], mapping errors like the JSON calls.
    pub async fn execute(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, AdminError> {
        let response = request.send().await.map_err(|error| {
            if error.is_connect() {
                AdminError::NotRunning { addr: self.addr }
            } else {
                AdminError::Http(error)
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<AdminErrorBody>(&text)
            .map(|body| body.error)
            .unwrap_or(text);
        Err(AdminError::Server { status, message })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, AdminError> {
        let response = self
            .execute(request.bearer_auth(self.token.expose()))
            .await?;
        Ok(response.json().await?)
    }
}
