//! Start-up checks against the homeserver, the periodic ping, and the first greeting.
//!
//! Each failure says what is wrong and what to do, because a newcomer's first run usually fails
//! on one of these: a wrong homeserver URL, a registration the homeserver has not loaded, or a
//! homeserver that cannot reach crew's URL.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::matrix::{CreateRoom, MatrixError};

/// How long start-up waits for the homeserver's ping to arrive back at crew.
const PING_ECHO_WAIT: Duration = Duration::from_secs(10);

/// A start-up check that failed; the message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "no Matrix homeserver answers at {url}: {message}. Check homeserver.url in the config (and that the homeserver is running)"
    )]
    NoHomeserver { url: String, message: String },
    #[error(
        "the homeserver does not accept crew's as_token ({error}). Register {registration} with the homeserver (see docs/homeservers.md), restart the homeserver, then start crew again"
    )]
    TokenRejected { registration: String, error: String },
    #[error("cannot set up the Manager user {user}: {error}")]
    Manager { user: String, error: MatrixError },
    #[error("config problem: {0}")]
    Config(String),
}

pub(super) async fn check_homeserver(
    crew: &Service,
    mut ping_seen: watch::Receiver<Option<String>>,
) -> Result<(), StartupError> {
    let url = crew.config.homeserver.url.to_string();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(crew.config.homeserver.startup_wait_secs);
    let mut wait = Duration::from_millis(250);
    loop {
        match crew.client.versions().await {
            Ok(versions) if !versions.is_empty() => break,
            Ok(_) => {
                return Err(StartupError::NoHomeserver {
                    url,
                    message: "it answered /_matrix/client/versions without any versions".into(),
                });
            }
            Err(error) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(StartupError::NoHomeserver {
                        url,
                        message: error.to_string(),
                    });
                }
                tracing::info!(%error, "waiting for the homeserver");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(4));
            }
        }
    }

    let registration = crew.config.appservice.registration.display().to_string();
    // Past the version check the homeserver is up; a transient failure (it is busy, a proxy
    // hiccups) is retried until the start-up deadline rather than ending crew.
    let whoami = until_deadline(deadline, || crew.client.whoami(Some(&crew.manager))).await;
    match whoami {
        Ok(_) => {}
        Err(error) if error.errcode() == Some("M_UNKNOWN_TOKEN") || error.status() == Some(401) => {
            return Err(StartupError::TokenRejected {
                registration,
                error: error.to_string(),
            });
        }
        // Not registered yet (Synapse: 403 "not registered"; other servers word it their
        // own way): register it.
        Err(_) => {
            until_deadline(deadline, || {
                crew.client.register(&crew.registration.sender_localpart)
            })
            .await
            .map_err(|error| manager_error(crew, error))?;
            until_deadline(deadline, || crew.client.whoami(Some(&crew.manager)))
                .await
                .map_err(|error| manager_error(crew, error))?;
        }
    }
    // The name the admin gave the Manager in onboarding wins over the configured one.
    let name = &crew.agents.manager_name();
    let current = until_deadline(deadline, || crew.client.display_name(&crew.manager))
        .await
        .map_err(|error| manager_error(crew, error))?;
    if current.as_deref() != Some(name.as_str()) {
        until_deadline(deadline, || {
            crew.client.set_display_name(&crew.manager, name)
        })
        .await
        .map_err(|error| manager_error(crew, error))?;
    }

    // The ping proves the homeserver can reach us; a failure is reported but not fatal, since
    // the homeserver may simply not be able to reach us *yet* (the ping loop keeps trying).
    let txn = format!("startup-{}", crate::clock::now_ms());
    match crew.client.ping(&crew.registration.id, &txn).await {
        Ok(duration_ms) => {
            let echoed = tokio::time::timeout(PING_ECHO_WAIT, async {
                ping_seen
                    .wait_for(|seen| seen.as_deref() == Some(txn.as_str()))
                    .await
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            tracing::info!(
                duration_ms,
                echoed,
                "homeserver reached crew (appservice ping)"
            );
        }
        Err(error) => tracing::warn!("{}", explain_ping_failure(crew, &error)),
    }
    Ok(())
}

/// Runs `call` again after transient failures (unreachable, 429, 5xx) until `deadline`, once a
/// second; the client's own retries come first, so this only matters for longer trouble.
async fn until_deadline<T, F, Fut>(
    deadline: tokio::time::Instant,
    call: F,
) -> Result<T, MatrixError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MatrixError>>,
{
    use backon::Retryable;
    call.retry(
        backon::ConstantBuilder::default()
            .with_delay(Duration::from_secs(1))
            .without_max_times(),
    )
    .sleep(tokio::time::sleep)
    .when(|error: &MatrixError| error.is_transient() && tokio::time::Instant::now() < deadline)
    .notify(|error, _| tracing::info!(%error, "the homeserver is not ready yet; retrying"))
    .await
}

fn manager_error(crew: &Service, error: MatrixError) -> StartupError {
    StartupError::Manager {
        user: crew.manager.to_string(),
        error,
    }
}

/// Turns a failed ping into a sentence that says what to fix.
pub fn explain_ping_failure(crew: &Service, error: &MatrixError) -> String {
    let url = crew.registration.url.as_deref().unwrap_or("(none)");
    let registration = crew.config.appservice.registration.display();
    match error.errcode() {
        Some("M_URL_NOT_SET") => format!(
            "the homeserver has no URL for crew: set `url` in {registration} and register it again"
        ),
        Some("M_CONNECTION_FAILED") => format!(
            "the homeserver cannot reach crew at {url} (the `url` in {registration}); it must be reachable from the homeserver (inside containers, not 127.0.0.1), and crew must listen there (appservice.bind)"
        ),
        Some("M_BAD_STATUS") => format!(
            "crew refused the homeserver's ping: the hs_token the homeserver has differs from the one in {registration}; register the current file again and restart the homeserver ({error})"
        ),
        Some("M_FORBIDDEN") | Some("M_NOT_FOUND") => format!(
            "the homeserver does not know an appservice with id `{}` for this as_token: register {registration} again ({error})",
            crew.registration.id
        ),
        Some("M_UNRECOGNIZED") => {
            "the homeserver does not support the appservice ping (Matrix v1.7); transactions still work".to_owned()
        }
        _ => format!("appservice ping failed: {error}"),
    }
}

/// Pings the homeserver on a timer so that transactions it holds back (Tuwunel never retries
/// on its own) are resent; logs when the connection is lost and when it comes back.
pub(super) async fn ping_periodically(crew: Arc<Service>, shutdown: CancellationToken) {
    let period = Duration::from_secs(crew.config.appservice.ping_interval_secs.max(1));
    let mut healthy = true;
    let mut counter: u64 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => return,
        }
        counter += 1;
        let txn = format!("periodic-{}-{counter}", crate::clock::now_ms());
        match crew.client.ping(&crew.registration.id, &txn).await {
            Ok(_) if !healthy => {
                healthy = true;
                tracing::info!("the homeserver reaches crew again; held-back transactions follow");
                super::backlog::nudge(&crew, "the homeserver reaches crew again").await;
            }
            Ok(_) => {}
            Err(error) if healthy => {
                healthy = false;
                tracing::warn!("{}", explain_ping_failure(&crew, &error));
            }
            Err(_) => {}
        }
    }
}

/// On first start, opens a DM with each admin and says hello. Remembered in sled, so each admin
/// is greeted once.
pub(super) async fn greet_admins(crew: Arc<Service>) {
    let greeted = match crew.store.tree::<String, String>("greeted_admins") {
        Ok(tree) => tree,
        Err(error) => {
            tracing::error!(%error, "cannot open greeted_admins");
            return;
        }
    };
    for admin in &crew.config.admins {
        let key = admin.to_string();
        let room = match greeted.get(&key) {
            Ok(Some(room)) if room.starts_with('!') => continue,
            Ok(_) => {
                let create = CreateRoom {
                    invite: vec![admin.clone()],
                    is_direct: true,
                    ..CreateRoom::default()
                };
                // Once per admin, even if the answer to createRoom is lost.
                match crew
                    .outbox
                    .rooms
                    .create(
                        &crew.client,
                        &crew.manager,
                        create,
                        &format!("greeting:{admin}"),
                    )
                    .await
                {
                    Ok(room) => room,
                    Err(error) => {
                        tracing::warn!(%error, "cannot open a DM with an admin");
                        continue;
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot read greeted_admins");
                continue;
            }
        };
        let hello = crate::agent::manager::greeting(&crew.manager, admin);
        match crew
            .client
            .send(&crew.manager, &room, &format!("greeting:{admin}"), &hello)
            .await
        {
            Ok(_) => {
                if let Err(error) = greeted.insert(&key, &room.to_string()) {
                    tracing::error!(%error, "cannot record the greeting");
                }
                tracing::info!(%admin, %room, "greeted admin");
            }
            Err(error) => super::log_matrix_error("cannot greet an admin", &error),
        }
    }
    if let Err(error) = crew.store.flush().await {
        tracing::error!(%error, "cannot flush after greeting");
    }
}

/// Refetches the state of every room the Manager is in: while crew was down, members may have
/// come and gone, and the homeserver does not replay that.
pub(super) async fn refresh_rooms(crew: Arc<Service>) {
    let rooms = match crew.client.joined_rooms(&crew.manager).await {
        Ok(rooms) => rooms,
        Err(error) => {
            super::log_matrix_error("cannot list the Manager's rooms", &error);
            return;
        }
    };
    for room in rooms {
        super::outbox_runner::seed_room(&crew, &crew.manager, &room).await;
    }
    tracing::debug!("room state refreshed");
}
