//! One command in a Worker's container: `docker exec` of a wrapper that puts the command in
//! its own process group, its output collected (bounded), and the whole group killed at the time
//! limit or when the call is dropped.

use std::time::Duration;

use bollard::Docker;
use bollard::models::ExecConfig;
use futures::StreamExt;

use super::{CommandRun, SandboxError};

/// Runs `command` in its own process group (so that a kill reaches its children) and collects
/// its output; kills the group at `timeout` or when dropped.
pub(super) async fn exec_command(
    docker: &Docker,
    container: &str,
    command: &str,
    cwd: &str,
    timeout: Duration,
    max_kept: usize,
) -> Result<CommandRun, SandboxError> {
    let run_id = format!("{:016x}", rand::random::<u64>());
    let pid_file = format!("/tmp/.crew-run-{run_id}");
    // `setsid -w` makes the shell the leader of a new session and process group; it writes its
    // pid (the group's id) where a kill finds it, runs the command and removes the file.
    let cmd = vec![
        "setsid".to_owned(),
        "-w".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        "echo $$ > \"$0\"; sh -c \"$1\"; code=$?; rm -f \"$0\"; exit $code".to_owned(),
        pid_file.clone(),
        command.to_owned(),
    ];
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                working_dir: Some(cwd.to_owned()),
                cmd: Some(cmd),
                ..Default::default()
            },
        )
        .await
        .map_err(SandboxError::from_docker)?;
    let mut killer = GroupKiller {
        docker: docker.clone(),
        container: container.to_owned(),
        pid_file,
        armed: true,
    };
    let started = docker
        .start_exec(&exec.id, None)
        .await
        .map_err(SandboxError::from_docker)?;
    let bollard::exec::StartExecResults::Attached { mut output, .. } = started else {
        return Err(SandboxError::Build("docker exec did not attach".into()));
    };
    let mut collected = Vec::new();
    let mut total: u64 = 0;
    let mut timed_out = false;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, output.next()).await {
            Ok(next) => next,
            Err(_) => {
                timed_out = true;
                killer.kill().await;
                // The stream ends once the group is gone; wait a little for the rest.
                let drain = async {
                    while let Some(Ok(chunk)) = output.next().await {
                        keep(&mut collected, &mut total, &chunk.into_bytes(), max_kept);
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                break;
            }
        };
        match next {
            Some(Ok(chunk)) => keep(&mut collected, &mut total, &chunk.into_bytes(), max_kept),
            Some(Err(error)) => return Err(SandboxError::from_docker(error)),
            None => break,
        }
    }
    killer.armed = false;
    let inspected = docker
        .inspect_exec(&exec.id)
        .await
        .map_err(SandboxError::from_docker)?;
    Ok(CommandRun {
        exit_code: if timed_out {
            Some(137)
        } else {
            inspected.exit_code
        },
        timed_out,
        output: collected,
        total_bytes: total,
        sync_notes: Vec::new(),
    })
}

fn keep(collected: &mut Vec<u8>, total: &mut u64, chunk: &[u8], max_kept: usize) {
    *total += chunk.len() as u64;
    let room = max_kept.saturating_sub(collected.len());
    collected.extend_from_slice(&chunk[..chunk.len().min(room)]);
}

/// Kills a command's process group: at its time limit, or when the tool call is dropped.
struct GroupKiller {
    docker: Docker,
    container: String,
    pid_file: String,
    armed: bool,
}

impl GroupKiller {
    fn kill_command(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            // The group id is the pid the wrapper wrote; `kill -- -PGID` reaches every process
            // in the group, children included. (dash's `kill` takes no negative pid: bash's
            // does, with Python's `os.killpg` for images without bash.)
            "pg=$(cat \"$0\" 2>/dev/null) && [ -n \"$pg\" ] && { bash -c 'kill -KILL -- -$1' _ \"$pg\" 2>/dev/null || python3 -c 'import os,sys; os.killpg(int(sys.argv[1]), 9)' \"$pg\"; }; rm -f \"$0\""
                .into(),
            self.pid_file.clone(),
        ]
    }

    async fn kill(&mut self) {
        self.armed = false;
        kill_group(&self.docker, &self.container, self.kill_command()).await;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if self.armed {
            let docker = self.docker.clone();
            let container = self.container.clone();
            let command = self.kill_command();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { kill_group(&docker, &container, command).await });
            }
        }
    }
}

async fn kill_group(docker: &Docker, container: &str, command: Vec<String>) {
    let exec = match docker
        .create_exec(
            container,
            ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(command),
                ..Default::default()
            },
        )
        .await
    {
        Ok(exec) => exec,
        Err(error) => {
            tracing::warn!(%error, "cannot kill a sandbox command");
            return;
        }
    };
    match docker.start_exec(&exec.id, None).await {
        Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) => {
            while output.next().await.is_some() {}
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot kill a sandbox command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_kept_up_to_the_limit_and_counted_whole() {
        let mut collected = Vec::new();
        let mut total = 0;
        keep(&mut collected, &mut total, b"hello ", 8);
        keep(&mut collected, &mut total, b"world", 8);
        assert_eq!(collected, b"hello wo");
        assert_eq!(total, 11);
    }
}
