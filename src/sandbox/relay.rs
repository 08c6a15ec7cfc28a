//! The relay: the one service on the sandboxes' internal network. It answers as `gateway` and
//! forwards each connection, byte for byte, to crew's gateway through a Unix socket mounted
//! into it read-only. The network's bridge has no address on the host
//! (`com.docker.network.bridge.inhibit_ipv4`) and the network is internal, so this is the only
//! way out of a sandbox.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HostConfig,
    NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::CreateContainerOptionsBuilder;

use super::{SandboxError, Sandboxes, owner_of};

/// The relay's name on the network (the host in `CREW_GATEWAY_URL`).
pub const ALIAS: &str = "gateway";
/// The port it listens on.
pub const PORT: u16 = 8080;
/// Where the folder holding the gateway's socket is mounted in the relay.
const SOCKET_DIR: &str = "/run/crew";

/// The relay program (Python 3, which every sandbox image has). Half-closes are passed on, so
/// an HTTP client that finishes its request still gets the answer.
pub const RELAY_SCRIPT: &str = r#"
import asyncio
SOCKET = "/run/crew/gateway.sock"
async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except Exception:
        pass
async def handle(client_reader, client_writer):
    try:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(SOCKET)
    except Exception:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
    upstream_writer.close()
    client_writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", 8080)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

impl Sandboxes {
    /// Makes sure the internal network and the relay on it exist and run.
    pub(super) async fn ensure_relay(&self, docker: &Docker) -> Result<(), SandboxError> {
        self.ensure_network(docker).await?;
        let found = self.find(docker, None, "relay").await?;
        if let Some(relay) = found.first() {
            let id = relay.id.clone().unwrap_or_default();
            if relay.state != Some(ContainerSummaryStateEnum::RUNNING) {
                docker
                    .start_container(&id, None)
                    .await
                    .map_err(SandboxError::from_docker)?;
            }
            return Ok(());
        }
        self.check_image(docker).await?;
        let socket_dir = self
            .gateway_socket()
            .parent()
            .map(ToOwned::to_owned)
            .unwrap_or_default();
        tokio::fs::create_dir_all(&socket_dir).await?;
        let network = self.network_name();
        let body = ContainerCreateBody {
            image: Some(self.config.image.clone()),
            cmd: Some(vec!["python3".into(), "-c".into(), RELAY_SCRIPT.into()]),
            labels: Some(self.labels("relay")),
            user: Some(owner_of(&socket_dir)?),
            host_config: Some(HostConfig {
                memory: Some(64 * 1024 * 1024),
                memory_swap: Some(64 * 1024 * 1024),
                nano_cpus: Some(500_000_000),
                pids_limit: Some(32),
                init: Some(true),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                readonly_rootfs: Some(true),
                binds: Some(vec![format!("{}:{SOCKET_DIR}:ro", socket_dir.display())]),
                network_mode: Some(network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network,
                    EndpointSettings {
                        aliases: Some(vec![ALIAS.to_owned()]),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&format!("crew-{}-gateway-relay", self.instance))
            .build();
        let created = match docker.create_container(Some(options), body).await {
            Ok(created) => created,
            // Another call made it meanwhile.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => return Ok(()),
            Err(error) => return Err(SandboxError::from_docker(error)),
        };
        docker
            .start_container(&created.id, None)
            .await
            .map_err(SandboxError::from_docker)?;
        Ok(())
    }

    async fn ensure_network(&self, docker: &Docker) -> Result<(), SandboxError> {
        let name = self.network_name();
        match docker.inspect_network(&name, None).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => return Err(SandboxError::from_docker(error)),
        }
        let request = NetworkCreateRequest {
            name,
            driver: Some("bridge".into()),
            internal: Some(true),
            labels: Some(self.labels("network")),
            options: Some(HashMap::from([(
                // No address for the host on this bridge: nothing on the host is reachable.
                "com.docker.network.bridge.inhibit_ipv4".to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(error) => Err(SandboxError::from_docker(error)),
        }
    }
}
