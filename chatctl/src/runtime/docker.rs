//! The Docker runtime: [`Runtime`] on the Docker Engine API through bollard (local socket,
//! `DOCKER_HOST` honoured, API version negotiated so that engines from 20.10 on work).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, MountType,
    NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, CreateContainerOptions, EventsOptions,
    ListContainersOptions, ListImagesOptions, ListNetworksOptions, ListVolumesOptions, LogsOptions,
    RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
};
use futures_util::StreamExt;

use super::{
    ContainerSpec, ContainerStatus, Health, ImageBuild, LABEL_CONFIG_HASH, LABEL_INSTANCE,
    LABEL_PROJECT, LABEL_SERVICE, MountSource, Runtime, Service, Watch,
};

/// A connection to a Docker engine.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

impl DockerRuntime {
    /// Connects and pings the engine; an error means "no usable Docker here".
    pub async fn connect() -> Result<Self> {
        let docker = Docker::connect_with_local_defaults()
            .context("cannot reach the Docker engine (is DOCKER_HOST right?)")?
            .with_timeout(Duration::from_secs(120));
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .context("the Docker engine did not answer within 5 s")?
            .context("cannot reach the Docker engine: is it running (`docker info`)?")?;
        tokio::time::timeout(Duration::from_secs(5), docker.ping())
            .await
            .context("the Docker engine did not answer a ping within 5 s")?
            .context("the Docker engine does not answer a ping: is it running (`docker info`)?")?;
        Ok(Self { docker })
    }

    fn project_filter(project: &str) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_PROJECT}={project}")],
        )])
    }
}

fn ms_to_ns(ms: u64) -> i64 {
    i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

impl Runtime for DockerRuntime {
    async fn image_exists(&self, tag: &str) -> Result<bool> {
        match self.docker.inspect_image(tag).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot inspect image {tag}")),
        }
    }

    async fn find_local_image(&self, repository: &str) -> Result<Option<String>> {
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "reference".to_owned(),
                vec![repository.to_owned()],
            )])),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .with_context(|| format!("cannot list the local {repository} images"))?;
        let mut tags: Vec<String> = images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.starts_with(&format!("{repository}:")))
            .collect();
        tags.sort();
        Ok(tags.pop())
    }

    async fn build_image(&self, build: &ImageBuild, on_line: &mut dyn FnMut(&str)) -> Result<()> {
        let options = BuildImageOptions {
            t: Some(build.tag.clone()),
            rm: true,
            forcerm: true,
            version: BuilderVersion::BuilderV1,
            ..Default::default()
        };
        let body = bollard::body_full(build.context.clone().into());
        let mut stream = self.docker.build_image(options, None, Some(body));
        while let Some(item) = stream.next().await {
            let info = item.with_context(|| format!("building image {} failed", build.tag))?;
            if let Some(detail) = info.error_detail {
                bail!(
                    "building image {} failed: {}",
                    build.tag,
                    detail.message.unwrap_or_default()
                );
            }
            if let Some(line) = info.stream {
                for l in line.lines().filter(|l| !l.trim().is_empty()) {
                    on_line(l);
                }
            }
        }
        if !self.image_exists(&build.tag).await? {
            bail!(
                "the engine reported no error but image {} does not exist",
                build.tag
            );
        }
        Ok(())
    }

    async fn ensure_network(&self, project: &str, name: &str) -> Result<()> {
        match self.docker.inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot inspect network {name}")),
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(
                LABEL_PROJECT.to_owned(),
                project.to_owned(),
            )])),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .with_context(|| format!("cannot create network {name}"))?;
        Ok(())
    }

    async fn ensure_volume(&self, project: &str, name: &str) -> Result<()> {
        match self.docker.inspect_volume(name).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot inspect volume {name}")),
        }
        let request = VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(HashMap::from([(
                LABEL_PROJECT.to_owned(),
                project.to_owned(),
            )])),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .with_context(|| format!("cannot create volume {name}"))?;
        Ok(())
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let mounts = spec
            .mounts
            .iter()
            .map(|m| {
                let (typ, source) = match &m.source {
                    MountSource::Host(path) => (MountType::BIND, path.display().to_string()),
                    MountSource::Volume(name) => (MountType::VOLUME, name.clone()),
                };
                bollard::models::Mount {
                    target: Some(m.target.clone()),
                    source: Some(source),
                    typ: Some(typ),
                    read_only: Some(m.read_only),
                    ..Default::default()
                }
            })
            .collect();
        let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|p| {
                (
                    format!("{}/tcp", p.container_port),
                    Some(vec![PortBinding {
                        host_ip: Some(p.host_ip.clone()),
                        host_port: Some(p.host_port.to_string()),
                    }]),
                )
            })
            .collect();
        let exposed: Vec<String> = spec
            .ports
            .iter()
            .map(|p| format!("{}/tcp", p.container_port))
            .collect();
        let healthcheck = spec.health.as_ref().map(|h| HealthConfig {
            test: Some(
                std::iter::once("CMD".to_owned())
                    .chain(h.command.iter().cloned())
                    .collect(),
            ),
            interval: Some(ms_to_ns(h.interval_ms)),
            timeout: Some(ms_to_ns(h.timeout_ms)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(ms_to_ns(h.start_period_ms)),
            ..Default::default()
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.command.clone()),
            env: Some(spec.env.clone()),
            hostname: Some(spec.name.clone()),
            labels: Some(spec.labels().into_iter().collect()),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            healthcheck,
            stop_timeout: Some(15),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
                network_mode: Some(spec.network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                init: Some(false),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    spec.network.clone(),
                    EndpointSettings {
                        aliases: Some(spec.aliases.clone()),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .with_context(|| {
                format!(
                    "cannot create container {} from image {}",
                    spec.name, spec.image
                )
            })?;
        Ok(created.id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.docker
            .start_container(id, None)
            .await
            .with_context(|| format!("cannot start container {id}"))
    }

    async fn stop_container(&self, id: &str, grace_secs: u32) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace_secs).unwrap_or(i32::MAX)),
            signal: None,
        };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped; 404: already gone.
            Err(e) if is_status(&e, 304) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot stop container {id}")),
        }
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove container {id}")),
        }
    }

    async fn watch(&self, project: &str) -> Result<Watch> {
        // From one second ago: the engine replays what happened between this call and the
        // moment the stream is connected, so nothing is missed (a duplicate only re-reads).
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .saturating_sub(1);
        let mut filters = Self::project_filter(project);
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        // Not exec_*: every health probe is an exec.
        filters.insert(
            "event".to_owned(),
            [
                "create",
                "start",
                "die",
                "stop",
                "kill",
                "oom",
                "destroy",
                "health_status",
            ]
            .map(str::to_owned)
            .to_vec(),
        );
        let options = EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        };
        let stream = self
            .docker
            .events(Some(options))
            // An error ends the stream; listeners fall back to polling.
            .take_while(|e| std::future::ready(e.is_ok()))
            .map(|_| ());
        Ok(Box::pin(stream))
    }

    async fn list_containers(&self, project: &str) -> Result<Vec<ContainerStatus>> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(Self::project_filter(project)),
            ..Default::default()
        };
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .with_context(|| format!("cannot list the containers of project {project}"))?;
        let mut out = Vec::new();
        for s in summaries {
            let labels = s.labels.unwrap_or_default();
            let Some(service) = labels.get(LABEL_SERVICE).and_then(|v| Service::parse(v)) else {
                continue;
            };
            let instance = labels
                .get(LABEL_INSTANCE)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let status = s.status.unwrap_or_default();
            let health = s
                .health
                .and_then(|h| h.status)
                .and_then(|h| match h.to_string().as_str() {
                    "healthy" => Some(Health::Healthy),
                    "unhealthy" => Some(Health::Unhealthy),
                    "starting" => Some(Health::Starting),
                    _ => None,
                })
                .unwrap_or_else(|| Health::from_status_text(&status));
            let mut ports: Vec<String> = s
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    p.public_port.map(|public| {
                        format!(
                            "{}:{}->{}/tcp",
                            p.ip.unwrap_or_default(),
                            public,
                            p.private_port
                        )
                    })
                })
                .collect();
            ports.sort();
            ports.dedup();
            out.push(ContainerStatus {
                service,
                instance,
                name: s
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                container_id: s.id.unwrap_or_default(),
                image: s.image.unwrap_or_default(),
                state: s.state.map(|st| st.to_string()).unwrap_or_default(),
                health,
                ports,
                config_hash: labels.get(LABEL_CONFIG_HASH).cloned().unwrap_or_default(),
                cluster: labels.get(super::cluster::LABEL_CLUSTER).cloned(),
                status,
            });
        }
        out.sort_by_key(|c| (c.service, c.instance));
        Ok(out)
    }

    async fn list_networks(&self, project: &str) -> Result<Vec<String>> {
        let options = ListNetworksOptions {
            filters: Some(Self::project_filter(project)),
        };
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .with_context(|| format!("cannot list the networks of project {project}"))?;
        Ok(networks.into_iter().filter_map(|n| n.name).collect())
    }

    async fn list_volumes(&self, project: &str) -> Result<Vec<String>> {
        let options = ListVolumesOptions {
            filters: Some(Self::project_filter(project)),
        };
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .with_context(|| format!("cannot list the volumes of project {project}"))?;
        Ok(volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove network {name}")),
        }
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        match self
            .docker
            .remove_volume(name, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove volume {name}")),
        }
    }

    async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<()> {
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: tail.map_or_else(|| "all".to_owned(), |n| n.to_string()),
            ..Default::default()
        };
        let mut stream = self.docker.logs(id, Some(options));
        let mut pending = String::new();
        while let Some(item) = stream.next().await {
            let chunk = item.with_context(|| format!("cannot read the logs of {id}"))?;
            pending.push_str(&chunk.to_string());
            while let Some(i) = pending.find('\n') {
                let line: String = pending.drain(..=i).collect();
                on_line(line.trim_end_matches(['\n', '\r']));
            }
        }
        if !pending.is_empty() {
            on_line(&pending);
        }
        Ok(())
    }
}
