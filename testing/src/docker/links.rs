//! A node's network links: the engine's default network, where its port is
//! published, and the cluster's network, where it replicates. Detaching it
//! from both isolates it; from the cluster network only, partitions it from
//! the other nodes while clients still reach it.

use testcontainers::bollard::Docker;
use testcontainers::bollard::models::{
    EndpointSettings, NetworkConnectRequest, NetworkDisconnectRequest,
};

use super::engine::docker_err;
use super::node::{DockerNode, Links};
use crate::HarnessError;
use crate::backend::Link;

impl DockerNode {
    /// Attaches the container to, or detaches it from, the client and
    /// cluster networks as `link` says. The cluster network is left first
    /// and joined last, so that the published port stays on the client
    /// network.
    pub(super) async fn set_link(&self, docker: &Docker, link: Link) -> Result<(), HarnessError> {
        let want = match link {
            Link::Connected => Links {
                clients: true,
                peers: true,
            },
            Link::ClientsOnly => Links {
                clients: true,
                peers: false,
            },
            Link::Isolated => Links {
                clients: false,
                peers: false,
            },
        };
        let have = *self.links.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.container().id().to_string();
        let disconnect = |network: String| {
            let docker = docker.clone();
            let id = id.clone();
            async move {
                docker
                    .disconnect_network(
                        &network,
                        NetworkDisconnectRequest {
                            container: id,
                            force: Some(false),
                        },
                    )
                    .await
                    .map_err(docker_err("disconnecting a container from a network"))
            }
        };
        let connect = |network: String, aliases: Option<Vec<String>>| {
            let docker = docker.clone();
            let id = id.clone();
            async move {
                docker
                    .connect_network(
                        &network,
                        NetworkConnectRequest {
                            container: id,
                            endpoint_config: Some(EndpointSettings {
                                aliases,
                                ..Default::default()
                            }),
                        },
                    )
                    .await
                    .map_err(docker_err("connecting a container to a network"))
            }
        };
        // Each step is recorded as soon as it is done, so that a failure
        // leaves the recorded state true.
        let record =
            |f: &dyn Fn(&mut Links)| f(&mut self.links.lock().unwrap_or_else(|p| p.into_inner()));
        if have.peers && !want.peers {
            disconnect(self.cluster_network.clone()).await?;
            record(&|l| l.peers = false);
        }
        if have.clients && !want.clients {
            disconnect(self.clients_network.clone()).await?;
            record(&|l| l.clients = false);
        }
        if !have.clients && want.clients {
            connect(self.clients_network.clone(), None).await?;
            record(&|l| l.clients = true);
        }
        if !have.peers && want.peers {
            connect(self.cluster_network.clone(), Some(vec![self.alias.clone()])).await?;
            record(&|l| l.peers = true);
        }
        Ok(())
    }
}
