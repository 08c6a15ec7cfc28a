//! Configuration: a TOML file with `CREW_…` environment overrides.
//!
//! Environment variables override file values with `__` between levels, e.g.
//! `CREW_HOMESERVER__URL=http://hs:8008`. Relative paths are resolved against the directory of the
//! config file, so a data directory can be moved as a whole. The appservice tokens live in the
//! registration file (the same file the homeserver reads), never in this file; both can be
//! overridden by `CREW_AS_TOKEN` / `CREW_HS_TOKEN` or `CREW_AS_TOKEN_FILE` / `CREW_HS_TOKEN_FILE`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use ruma::{OwnedServerName, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::registration::Registration;
use crate::secret::Secret;

/// Errors loading or checking the configuration; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("registration file {path}: {message}")]
    Registration { path: String, message: String },
    #[error("config is not valid: {0}")]
    Invalid(String),
}

/// Everything `crew serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where sled, the file store and the admin token live. Relative to the config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The people the agents obey (Matrix user ids). They may invite agents, wake them and run
    /// the commands that change things.
    #[serde(default)]
    pub admins: Vec<OwnedUserId>,
    pub homeserver: HomeserverConfig,
    #[serde(default)]
    pub appservice: AppserviceConfig,
    #[serde(default)]
    pub invites: InvitePolicy,
    #[serde(default)]
    pub admin_api: AdminApiConfig,
    #[serde(default)]
    pub dispatch: crate::dispatch::DispatchConfig,
    #[serde(default)]
    pub gateway: crate::gateway::GatewayConfig,
    #[serde(default)]
    pub llm: crate::llm::LlmConfig,
    #[serde(default)]
    pub storage: crate::storage::StorageConfig,
    #[serde(default)]
    pub tasks: crate::tasks::TaskConfig,
    /// Spending caps a prompt cannot talk around (Workers, recurring tasks).
    #[serde(default)]
    pub limits: crate::agent::authority::SpendingLimits,
    #[serde(default)]
    pub sandbox: crate::sandbox::SandboxConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub database: crate::store::DatabaseConfig,
    /// End-to-end encrypted rooms (`crate::crypto`).
    #[serde(default)]
    pub encryption: crate::crypto::EncryptionConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// Client-server API base URL, e.g. `http://127.0.0.1:8008`.
    pub url: url::Url,
    /// The server name in user ids (`@crew:example.org` → `example.org`).
    pub server_name: OwnedServerName,
    /// How long `crew serve` waits at start-up for a homeserver that does not answer yet.
    #[serde(default = "default_startup_wait_secs")]
    pub startup_wait_secs: u64,
}

fn default_startup_wait_secs() -> u64 {
    30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppserviceConfig {
    /// The registration file shared with the homeserver; tokens are read from it.
    pub registration: PathBuf,
    /// Address the homeserver-facing API listens on.
    pub bind: SocketAddr,
    /// Localpart of every Worker starts with this prefix (the registered namespace).
    pub user_prefix: String,
    /// Display name of the Manager (the registration's `sender_localpart` user).
    pub manager_display_name: String,
    /// How often to ping the homeserver so that it resends held-back transactions. Tuwunel never
    /// retries on a timer, so without this a failed transaction waits for the next event.
    pub ping_interval_secs: u64,
    /// Largest transaction body accepted, in bytes (the spec sets no limit; Synapse sends 100
    /// events, each up to 64 KiB).
    pub max_transaction_bytes: usize,
    /// Events crew takes before the pump has handled them; past this a transaction's answer
    /// waits (up to 5 s) for the pump, so that a flood waits in the homeserver's database,
    /// not in crew's memory (`appservice::inbox::BacklogLimit`). At least 1.
    pub backlog_events: usize,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            registration: PathBuf::from("registration.yaml"),
            bind: "127.0.0.1:9000".parse().expect("valid literal address"),
            user_prefix: "crew_".into(),
            manager_display_name: "Crew Manager".into(),
            ping_interval_secs: 60,
            max_transaction_bytes: 64 * 1024 * 1024,
            backlog_events: crate::appservice::inbox::BacklogLimit::default().events,
        }
    }
}

/// Who may invite our users into rooms. Admins always may.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvitePolicy {
    /// Further users whose invites are accepted.
    pub allow_users: Vec<OwnedUserId>,
    /// Servers whose users' invites are accepted (e.g. your own `example.org`).
    pub allow_servers: Vec<OwnedServerName>,
}

impl InvitePolicy {
    /// Whether `user` may invite our agents (and so spend the admins' budget): the admins, the
    /// listed users, and users of the listed servers.
    pub fn allows(&self, user: &ruma::UserId, admins: &[OwnedUserId]) -> bool {
        admins.iter().any(|admin| admin == user)
            || self.allow_users.iter().any(|allowed| allowed == user)
            || self
                .allow_servers
                .iter()
                .any(|server| server == user.server_name())
    }
}

/// The local endpoint that CLI commands use while `crew serve` holds the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminApiConfig {
    /// Loopback address; the token in `<data_dir>/admin.token` authenticates callers.
    pub bind: SocketAddr,
    /// The admin API manages consumers and tokens, so it listens on loopback only unless this is
    /// set: a non-loopback `bind` is refused at start-up without it.
    pub allow_non_loopback: bool,
}

impl Default for AdminApiConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9002".parse().expect("valid literal address"),
            allow_non_loopback: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info,matrix_crew=debug`. `RUST_LOG` wins when set.
    pub filter: String,
    /// Also write logs (JSON lines) to this file, relative to the data dir.
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            file: None,
        }
    }
}

/// The top-level keys of [`Config`]; `CREW_<KEY>…` variables override them.
const CONFIG_KEYS: &[&str] = &[
    "data_dir",
    "admins",
    "homeserver",
    "appservice",
    "invites",
    "admin_api",
    "dispatch",
    "gateway",
    "llm",
    "storage",
    "tasks",
    "limits",
    "sandbox",
    "log",
    "database",
    "encryption",
];

fn default_data_dir() -> PathBuf {
    PathBuf::from(".")
}

/// A loaded config together with the registration it points to.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub registration: Registration,
    /// Path of the config file, for messages.
    pub path: PathBuf,
}

impl Config {
    /// Reads `path`, applies `CREW_…` overrides from the process environment (figment's
    /// [`Env`] provider: `__` between levels, values parsed as TOML scalars), resolves relative
    /// paths and loads the registration file, with `CREW_AS_TOKEN` / `CREW_HS_TOKEN` (or their
    /// `_FILE` forms) over its tokens.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: format!("{} (create one with `crew init`)", path.display()),
            source,
        })?;
        // Only variables that name a config section or top-level key are overrides; others
        // (CREW_CONFIG, CREW_AS_TOKEN, a tool's CREW_TEST_TOOLS…) are not config.
        let overrides = Env::prefixed("CREW_").split("__").filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or("");
            CONFIG_KEYS
                .iter()
                .any(|known| known.eq_ignore_ascii_case(top))
        });
        let figment = Figment::new().merge(Toml::string(&text)).merge(overrides);
        let mut config: Config = figment.extract().map_err(Box::new)?;
        let base = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.data_dir = resolve(&base, &config.data_dir);
        config.appservice.registration = resolve(&base, &config.appservice.registration);
        config.check()?;

        let registration_path = config.appservice.registration.display().to_string();
        let mut registration = Registration::read_unchecked(&config.appservice.registration)?;
        if let Some(token) = secret_from_env(&env, "CREW_AS_TOKEN")? {
            registration.as_token = token;
        }
        if let Some(token) = secret_from_env(&env, "CREW_HS_TOKEN")? {
            registration.hs_token = token;
        }
        // Checked after the overrides: an override must not bring in what the file may not hold.
        registration
            .check()
            .map_err(|message| ConfigError::Registration {
                path: format!(
                    "{registration_path} (or CREW_AS_TOKEN / CREW_HS_TOKEN and their _FILE forms)"
                ),
                message,
            })?;
        Ok(Loaded {
            config,
            registration,
            path: path.to_path_buf(),
        })
    }

    /// Validates what serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.appservice.user_prefix.is_empty()
            || !self
                .appservice
                .user_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c))
        {
            return Err(ConfigError::Invalid(format!(
                "appservice.user_prefix `{}` must be non-empty lowercase letters, digits or ._=-/",
                self.appservice.user_prefix
            )));
        }
        if !self.admin_api.bind.ip().is_loopback() && !self.admin_api.allow_non_loopback {
            return Err(ConfigError::Invalid(format!(
                "admin_api.bind {} is not a loopback address; the admin API manages tokens and consumers, so keep it on 127.0.0.1 or set admin_api.allow_non_loopback = true if you really mean it",
                self.admin_api.bind
            )));
        }
        Ok(())
    }

    /// Where sled keeps its files.
    pub fn database_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// Where the admin API token lives.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// Where `crew serve` writes the admin API's bound address, so that `admin_api.bind` may
    /// ask for any free port (`127.0.0.1:0`) and the CLI and tests still find it.
    pub fn admin_addr_path(&self) -> PathBuf {
        self.data_dir.join("admin.addr")
    }

    /// Where `crew serve` writes the credential gateway's bound address (`gateway.bind` may be
    /// `127.0.0.1:0`).
    pub fn gateway_addr_path(&self) -> PathBuf {
        self.data_dir.join("gateway.addr")
    }

    /// Where `crew serve` writes the appservice listener's bound address. With
    /// `appservice.bind` on port 0 the registration's `url` must be written from it before the
    /// homeserver loads the registration.
    pub fn appservice_addr_path(&self) -> PathBuf {
        self.data_dir.join("appservice.addr")
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Reads `NAME` or, failing that, the file named by `NAME_FILE`. A variable that is set must
/// hold something: an empty or blank secret (or file, or file name) refuses to start with a
/// message naming the variable, rather than silently falling back or accepting an empty token.
pub fn secret_from_env(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Secret>, ConfigError> {
    let file_var = format!("{name}_FILE");
    if let Some(value) = env(name) {
        let value = value.trim();
        if value.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{name} is set but empty; unset it or give it the token"
            )));
        }
        return Ok(Some(Secret::new(value)));
    }
    if let Some(file) = env(&file_var) {
        if file.trim().is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{file_var} is set but empty; unset it or name the file that holds the token"
            )));
        }
        let value = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            path: format!("{file} (from {file_var})"),
            source,
        })?;
        let value = value.trim();
        if value.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{file_var} names {file}, which is empty; put the token in it"
            )));
        }
        return Ok(Some(Secret::new(value)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `path` with `vars` set in the process environment, inside figment's `Jail` (which
    /// serialises the tests that touch the environment and restores it afterwards).
    #[allow(clippy::result_large_err)] // figment's Jail takes a closure returning its own error.
    fn load_with_env(path: &Path, vars: Vec<(String, String)>) -> Result<Loaded, ConfigError> {
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            for (name, value) in &vars {
                jail.set_env(name, value);
            }
            loaded = Some(Config::load(path));
            Ok(())
        });
        loaded.expect("the jail ran the closure")
    }

    fn write_example(dir: &Path) -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = dir.join("crew.toml");
        std::fs::copy(root.join("config/crew.example.toml"), &config).unwrap();
        let registration = Registration::generate(&crate::registration::NewRegistration {
            id: "crew",
            url: "http://127.0.0.1:9000",
            server_name: "example.org",
            user_prefix: "crew_",
            manager_localpart: "crew",
        });
        std::fs::write(dir.join("registration.yaml"), registration.to_yaml()).unwrap();
        config
    }

    #[test]
    fn the_documented_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_with_env(&write_example(dir.path()), Vec::new()).unwrap();
        assert_eq!(loaded.config.homeserver.server_name.as_str(), "example.org");
        assert_eq!(
            loaded.config.appservice.registration,
            dir.path().join("registration.yaml")
        );
    }

    #[test]
    fn environment_overrides_the_file_and_tokens_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_example(dir.path());
        let token_file = dir.path().join("as.token");
        std::fs::write(
            &token_file,
            "from-a-file-0123456789-0123456789-0123456789\n",
        )
        .unwrap();
        let vars = vec![
            (
                "CREW_HOMESERVER__URL".to_owned(),
                "http://hs.internal:8008".to_owned(),
            ),
            (
                "CREW_APPSERVICE__PING_INTERVAL_SECS".to_owned(),
                "5".to_owned(),
            ),
            (
                "CREW_AS_TOKEN_FILE".to_owned(),
                token_file.display().to_string(),
            ),
            ("CREW_DATABASE__CACHE_MB".to_owned(), "16".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
            ("CREW_TEST_TOOLS".to_owned(), "/tmp/tools".to_owned()),
            ("CREW_CONFIG".to_owned(), "elsewhere.toml".to_owned()),
        ];
        let loaded = load_with_env(&config, vars).unwrap();
        assert_eq!(
            loaded.config.homeserver.url.as_str(),
            "http://hs.internal:8008/"
        );
        assert_eq!(loaded.config.appservice.ping_interval_secs, 5);
        assert_eq!(loaded.config.database.cache_mb, 16);
        assert_eq!(
            loaded.registration.as_token.expose(),
            "from-a-file-0123456789-0123456789-0123456789"
        );
        assert!(!format!("{:?}", loaded).contains("from-a-file"));
    }

    #[test]
    fn empty_or_blank_token_overrides_refuse_to_start_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_example(dir.path());
        let empty_file = dir.path().join("empty.token");
        std::fs::write(&empty_file, " \n").unwrap();
        let short_file = dir.path().join("short.token");
        std::fs::write(&short_file, "short\n").unwrap();
        let cases = [
            ("CREW_HS_TOKEN", "  ".to_owned(), "CREW_HS_TOKEN"),
            ("CREW_AS_TOKEN", String::new(), "CREW_AS_TOKEN"),
            ("CREW_HS_TOKEN_FILE", String::new(), "CREW_HS_TOKEN_FILE"),
            (
                "CREW_HS_TOKEN_FILE",
                empty_file.display().to_string(),
                "CREW_HS_TOKEN_FILE",
            ),
            (
                "CREW_AS_TOKEN_FILE",
                short_file.display().to_string(),
                "at least 32",
            ),
        ];
        for (name, value, named) in cases {
            let error = load_with_env(&config, vec![(name.to_owned(), value)])
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{name}: {error}");
        }
    }

    #[test]
    fn the_admin_api_stays_on_loopback_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_example(dir.path());
        let wide = vec![("CREW_ADMIN_API__BIND".to_owned(), "0.0.0.0:9002".to_owned())];
        let error = load_with_env(&config, wide.clone())
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin_api.allow_non_loopback"), "{error}");
        let mut allowed = wide;
        allowed.push((
            "CREW_ADMIN_API__ALLOW_NON_LOOPBACK".to_owned(),
            "true".to_owned(),
        ));
        load_with_env(&config, allowed).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_example(dir.path());
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[homeserver2]\nurl = 1\n");
        std::fs::write(&config, text).unwrap();
        let error = load_with_env(&config, Vec::new()).unwrap_err().to_string();
        assert!(error.contains("homeserver2"), "{error}");
    }
}
