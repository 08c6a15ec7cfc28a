//! Runs the real `crew` binary against a real Synapse: one homeserver and one `crew` per test
//! environment, in a temporary directory that holds everything both write.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::synapse::{Synapse, TestUser, tail};
use super::tools;

pub const ADMIN: &str = "admin";

/// The `crew` binary cargo built for these tests.
pub fn crew_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crew"))
}

/// A homeserver, a `crew` registered with it, and the admin user.
pub struct CrewEnv {
    pub root: tempfile::TempDir,
    pub synapse: Synapse,
    pub crew: Option<CrewProcess>,
    pub data_dir: PathBuf,
    /// The appservice listener's port: probed, not reported (see [`CrewEnv::start_on`]).
    pub appservice_port: u16,
    /// The admin API's port, as the running crew reported it (it binds any free port).
    pub admin_port: u16,
    /// The gateway's port, as the running crew reported it (it binds any free port; a restart
    /// may get another one).
    pub gateway_port: u16,
    /// The homeserver URL crew is told to use (Synapse, or a relay in front of it).
    pub homeserver_url: String,
    /// The admin named in the config, registered before crew first starts (as in real life).
    admin: TestUser,
}

impl CrewEnv {
    /// `crew init`, Synapse started with the registration, then `crew serve` until ready.
    pub async fn start() -> CrewEnv {
        Self::start_with(|_| {}).await
    }

    /// As [`CrewEnv::start`], with a chance to edit the config file before `crew serve`.
    pub async fn start_with(edit_config: impl FnOnce(&Path)) -> CrewEnv {
        Self::start_with_init(&[], edit_config).await
    }

    /// As [`CrewEnv::start_with`], with more arguments for `crew init`.
    pub async fn start_with_init(init_args: &[&str], edit_config: impl FnOnce(&Path)) -> CrewEnv {
        Self::start_on(true, init_args, edit_config).await
    }

    /// As [`CrewEnv::start_with_init`]; `encrypted_appservices` false starts Synapse without
    /// to-device events and device lists in transactions, as Tuwunel behaves.
    pub async fn start_on(
        encrypted_appservices: bool,
        init_args: &[&str],
        edit_config: impl FnOnce(&Path),
    ) -> CrewEnv {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("data");
        // The one port still probed. Synapse reads the appservice URL from the registration
        // once, at its start, and keeps it while crew is killed and restarted (the durability
        // tests do that many times), so every run of crew must bind the same port. A port that
        // crew got by binding port 0 lies in the kernel's ephemeral range, where any outgoing
        // connection may take it while crew is down, and the restart would then fail to bind;
        // `free_port` probes below that range. (crew does report the port it bound, in
        // `appservice.addr`; `start_crew` checks it.) The admin API and the gateway bind port 0.
        let appservice_port = tools::free_port();
        let output = Command::new(crew_binary())
            .args([
                "init",
                "--homeserver",
                "http://127.0.0.1:1",
                "--server-name",
                "crew.test",
            ])
            .args(["--admin", &format!("@{ADMIN}:crew.test")])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--bind", &format!("127.0.0.1:{appservice_port}")])
            // Any free port: crew writes the one it bound to `admin.addr`.
            .args(["--admin-bind", "127.0.0.1:0"])
            .args(init_args)
            .output()
            .unwrap();
        assert!(output.status.success(), "crew init: {output:?}");
        // Any free port for the gateway: crew writes the one it bound to `gateway.addr`.
        let mut config = std::fs::read_to_string(data_dir.join("config.toml")).unwrap();
        config.push_str("\n[gateway]\nbind = \"127.0.0.1:0\"\n");
        std::fs::write(data_dir.join("config.toml"), config).unwrap();
        edit_config(&data_dir.join("config.toml"));
        let synapse = Synapse::start_with_features(
            &root.path().join("synapse"),
            &[data_dir.join("registration.yaml")],
            encrypted_appservices,
        )
        .await;
        let admin = synapse.register_user(ADMIN).await;
        let mut env = CrewEnv {
            root,
            synapse,
            crew: None,
            data_dir,
            appservice_port,
            admin_port: 0,
            gateway_port: 0,
            homeserver_url: String::new(),
            admin,
        };
        env.homeserver_url = env.synapse.url.clone();
        env.start_crew().await;
        env
    }

    pub fn config_path(&self) -> PathBuf {
        self.data_dir.join("config.toml")
    }

    pub fn registration(&self) -> serde_yaml::Value {
        serde_yaml::from_str(
            &std::fs::read_to_string(self.data_dir.join("registration.yaml")).unwrap(),
        )
        .unwrap()
    }

    pub fn hs_token(&self) -> String {
        self.registration()["hs_token"].as_str().unwrap().to_owned()
    }

    pub fn appservice_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.appservice_port)
    }

    pub fn manager_id(&self) -> String {
        "@crew:crew.test".to_owned()
    }

    /// Starts (or restarts) `crew serve` and waits until it says it is ready.
    pub async fn start_crew(&mut self) {
        let run = self.crew.as_ref().map_or(0, |crew| crew.run + 1);
        let crew = CrewProcess::start(
            &self.config_path(),
            &self.homeserver_url,
            &self.data_dir,
            run,
        );
        let mut crew = crew;
        crew.wait_for_log("crew is ready", Duration::from_secs(60))
            .await;
        self.admin_port = self.reported_port("admin.addr");
        self.gateway_port = self.reported_port("gateway.addr");
        assert_eq!(
            self.reported_port("appservice.addr"),
            self.appservice_port,
            "appservice.addr names the port crew was told to bind"
        );
        self.crew = Some(crew);
    }

    /// The port in an address file `crew serve` wrote to the data directory.
    fn reported_port(&self, file: &str) -> u16 {
        std::fs::read_to_string(self.data_dir.join(file))
            .ok()
            .and_then(|addr| addr.trim().parse::<std::net::SocketAddr>().ok())
            .map(|addr| addr.port())
            .unwrap_or_else(|| panic!("crew serve wrote the address it bound to {file}"))
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill_crew(&mut self) {
        if let Some(crew) = self.crew.as_mut() {
            crew.kill();
        }
    }

    /// SIGTERM to the running crew; its exit status, or `None` if still running after
    /// `deadline`.
    pub async fn terminate_crew(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        self.crew
            .as_mut()
            .expect("crew is running")
            .terminate(deadline)
            .await
    }

    pub async fn admin(&self) -> TestUser {
        self.admin.clone()
    }

    /// Runs a `crew` CLI command against this environment: (success, stdout + stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(crew_binary())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// `GET` on crew's loopback admin API (with the token from the data directory); `None`
    /// while crew is not answering or answers an error.
    pub async fn admin_api(&self, path: &str) -> Option<serde_json::Value> {
        let token = std::fs::read_to_string(self.data_dir.join("admin.token")).ok()?;
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .bearer_auth(token.trim())
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Waits until `event_id` is queued for `agent` (a message for a busy agent has reached
    /// crew's durable wake queue).
    pub async fn wait_queued(&self, agent: &str, event_id: &str) {
        tools::wait_for(
            "the message in the agent's wake queue",
            Duration::from_secs(30),
            || async {
                let queue = self.admin_api("/dispatch/queue").await?;
                queue[agent]
                    .as_array()?
                    .iter()
                    .any(|queued| queued == event_id)
                    .then_some(())
            },
        )
        .await;
    }

    /// Everything crew logged in every run so far.
    pub fn all_logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(&self.data_dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("crew-run-") {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }
}

/// A provider key every test `crew serve` finds in its environment as `TEST_PROVIDER_KEY`, for
/// configs that read the LLM key from the environment (`crew init --llm-key-env`).
pub const TEST_PROVIDER_KEY: &str = "sk-from-the-environment-only-the-gateway-sends-it";

/// A running `crew serve`; killed on drop.
pub struct CrewProcess {
    child: Child,
    pub log: PathBuf,
    pub run: u32,
}

impl CrewProcess {
    pub fn start(config: &Path, homeserver: &str, data_dir: &Path, run: u32) -> CrewProcess {
        let log = data_dir.join(format!("crew-run-{run}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(crew_binary())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("CREW_HOMESERVER__URL", homeserver)
            .env("CREW_APPSERVICE__PING_INTERVAL_SECS", "1")
            .env("RUST_LOG", "info,matrix_crew=debug")
            .env("NO_COLOR", "1")
            .env("TEST_PROVIDER_KEY", TEST_PROVIDER_KEY)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start crew serve");
        CrewProcess { child, log, run }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_for_log(&mut self, needle: &str, deadline: Duration) {
        let until = std::time::Instant::now() + deadline;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "crew exited ({status}) before logging {needle:?}:\n{}",
                    tail(&self.log)
                );
            }
            if std::time::Instant::now() > until {
                panic!(
                    "crew did not log {needle:?} within {deadline:?}:\n{}",
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id, for reading its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `deadline` for crew to exit; its exit status, or `None` if it
    /// is still running then.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let until = std::time::Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for CrewProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for CrewEnv {
    /// A failing test shows what crew and Synapse logged, which is most of the diagnosis.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(crew) = &self.crew {
                eprintln!("---- crew log (run {}) ----\n{}", crew.run, tail(&crew.log));
            }
            eprintln!(
                "---- synapse log ----\n{}",
                tail(&self.synapse.dir.join("synapse.log"))
            );
        }
    }
}
