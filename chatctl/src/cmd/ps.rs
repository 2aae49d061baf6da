//! `chatctl ps`: the project's containers with service, instance, state, health and ports, as
//! a table or (`--json`) a JSON array for scripts.

use anyhow::{Context, Result};
use chatctl::runtime::{ContainerStatus, Runtime};
use clap::Args;

use crate::cmd::up::{ProjectArgs, connect};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    chatctl ps\n  \
    chatctl ps --project demo --json | jq -r '.[] | select(.health != \"healthy\") | .name'\n\n\
    JSON fields: service (nats|server|gateway), instance, name, container_id, image, state,\n\
    health (healthy|unhealthy|starting|none), ports, config_hash, status.\n\
    Exit status: 0 listed (even when empty), 1 failed, 3 no Docker engine.")]
pub struct PsArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PsArgs) -> Result<()> {
    let project = args.project.name()?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let docker = connect(&rt)?;
    let all = rt.block_on(docker.list_containers(project))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", table(&all));
        if all.is_empty() {
            eprintln!(
                "No containers in project {project} (start them with `chatctl up --project {project}`)."
            );
        }
    }
    Ok(())
}

/// The `ps` table: one row per container, columns padded to their widest cell.
pub fn table(all: &[ContainerStatus]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "SERVICE".to_owned(),
        "INSTANCE".to_owned(),
        "STATE".to_owned(),
        "HEALTH".to_owned(),
        "PORTS".to_owned(),
        "CONTAINER ID".to_owned(),
    ]];
    for c in all {
        rows.push([
            c.name.clone(),
            c.service.to_string(),
            c.instance.to_string(),
            c.state.clone(),
            c.health.as_str().to_owned(),
            c.ports.join(","),
            c.container_id.chars().take(12).collect(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatctl::runtime::{Health, Service};

    #[test]
    fn table_has_a_header_and_a_row_per_container() {
        let c = ContainerStatus {
            service: Service::Gateway,
            instance: 1,
            name: "p-gateway-1".into(),
            container_id: "0123456789abcdef".into(),
            image: "i".into(),
            state: "running".into(),
            health: Health::Healthy,
            ports: vec!["127.0.0.1:8443->8443/tcp".into()],
            config_hash: "h".into(),
            status: "Up".into(),
            cluster: None,
        };
        let text = table(&[c]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].contains("healthy") && lines[1].contains("0123456789ab"));
        assert!(!lines[1].contains("0123456789abc"));
    }
}
