//! `crew init`: writes a config file and a registration file with fresh tokens into a data
//! directory.
//!
//! It never overwrites existing files unless told to, so running it twice cannot silently
//! change the tokens a homeserver already has.

use std::path::{Path, PathBuf};

use ruma::{OwnedServerName, OwnedUserId};

use crate::registration::{NewRegistration, Registration};

/// What the user asked `crew init` for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub data_dir: PathBuf,
    pub homeserver: url::Url,
    pub server_name: OwnedServerName,
    pub admins: Vec<OwnedUserId>,
    pub user_prefix: String,
    pub appservice_id: String,
    pub manager_localpart: String,
    /// Where the homeserver reaches crew.
    pub appservice_url: url::Url,
    pub bind: std::net::SocketAddr,
    pub admin_bind: std::net::SocketAddr,
    pub force: bool,
    /// An OpenAI-compatible provider for the agents, reached through the gateway.
    pub llm: Option<LlmProvider>,
}

/// The LLM provider `crew init` configures: a gateway route named `llm` whose key is read from
/// an environment variable when crew starts, so the key itself is never written anywhere.
#[derive(Debug, Clone)]
pub struct LlmProvider {
    /// The provider's OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: url::Url,
    /// The environment variable that holds the key, e.g. `OPENAI_API_KEY`.
    pub key_env: String,
    pub model: Option<String>,
}

/// Why `crew init` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{path} already exists; pass --force to replace it (this changes the tokens: register the new file with your homeserver)"
    )]
    Exists { path: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The files `crew init` wrote.
#[derive(Debug)]
pub struct Written {
    pub config: PathBuf,
    pub registration: PathBuf,
}

pub fn init(options: &InitOptions) -> Result<Written, InitError> {
    if !options
        .user_prefix
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c))
        || options.user_prefix.is_empty()
    {
        return Err(InitError::Invalid(format!(
            "--prefix `{}` must be lowercase letters, digits or ._=-/",
            options.user_prefix
        )));
    }
    for admin in &options.admins {
        if admin.localpart().starts_with(&options.user_prefix) {
            return Err(InitError::Invalid(format!(
                "admin {admin} falls inside the agents' namespace `{}…`; choose another --prefix",
                options.user_prefix
            )));
        }
    }
    if let Some(llm) = &options.llm {
        let valid_name = llm
            .key_env
            .starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
            && llm
                .key_env
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            return Err(InitError::Invalid(format!(
                "--llm-key-env `{}` must name an environment variable (A-Z, 0-9, _), e.g. OPENAI_API_KEY; pass the key itself in that variable",
                llm.key_env
            )));
        }
        if !matches!(llm.base_url.scheme(), "http" | "https") {
            return Err(InitError::Invalid(format!(
                "--llm-url `{}` must be an http(s) URL such as https://api.openai.com/v1",
                llm.base_url
            )));
        }
    }
    let config_path = options.data_dir.join("config.toml");
    let registration_path = options.data_dir.join("registration.yaml");
    for path in [&config_path, &registration_path] {
        if path.exists() && !options.force {
            return Err(InitError::Exists {
                path: path.display().to_string(),
            });
        }
    }
    create_private_dir(&options.data_dir).map_err(|source| InitError::Write {
        path: options.data_dir.display().to_string(),
        source,
    })?;
    let registration = Registration::generate(&NewRegistration {
        id: &options.appservice_id,
        url: options.appservice_url.as_str().trim_end_matches('/'),
        server_name: options.server_name.as_str(),
        user_prefix: &options.user_prefix,
        manager_localpart: &options.manager_localpart,
    });
    write(&registration_path, registration.to_yaml().as_bytes())?;
    write(&config_path, config_text(options).as_bytes())?;
    Ok(Written {
        config: config_path,
        registration: registration_path,
    })
}

/// Creates the data directory readable only by its owner (0700; also when it existed): it holds
/// the tokens, the database and every agent's files.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    builder.create(dir)
}

fn write(path: &Path, contents: &[u8]) -> Result<(), InitError> {
    crate::admin::write_private(path, contents).map_err(|source| InitError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn config_text(options: &InitOptions) -> String {
    let mut text = base_config_text(options);
    if let Some(llm) = &options.llm {
        text.push_str(&format!(
            r#"
# The agents' LLM, reached only through crew's credential gateway. The key is read from
# ${key_env} when crew starts and is never written to disk.
[[gateway.routes]]
name = "llm"
prefix = "/llm"
upstream = "{url}"
kind = "openai"
credentials = [{{ env = "{key_env}" }}]

[llm]
model = "{model}"
"#,
            url = llm.base_url.as_str().trim_end_matches('/'),
            key_env = llm.key_env,
            model = llm
                .model
                .as_deref()
                .unwrap_or(&crate::llm::LlmConfig::default().model),
        ));
    }
    text
}

fn base_config_text(options: &InitOptions) -> String {
    let admins = options
        .admins
        .iter()
        .map(|admin| format!("\"{admin}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# matrix-crew configuration, written by `crew init`. See config/crew.example.toml for every option.
# Environment variables override values here: CREW_HOMESERVER__URL, CREW_APPSERVICE__BIND, ...

# Paths are relative to this file.
data_dir = "."

# The people the agents obey.
admins = [{admins}]

[homeserver]
url = "{homeserver}"
server_name = "{server_name}"

[appservice]
# Tokens are read from this file; give the same file to the homeserver.
registration = "registration.yaml"
bind = "{bind}"
user_prefix = "{prefix}"

[admin_api]
bind = "{admin_bind}"
"#,
        homeserver = options.homeserver,
        server_name = options.server_name,
        bind = options.bind,
        prefix = options.user_prefix,
        admin_bind = options.admin_bind,
    )
}
