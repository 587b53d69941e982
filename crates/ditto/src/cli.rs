//! The command-line client: talks to the local daemon's REST API and prints tables or JSON.

use anyhow::{anyhow, bail, Result};
use ditto_control::validate::format_size;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api_types::{
    ApiErrorBody, CreatePool, CreateVolume, PoolInfo, SizeInput, StatusInfo, VolumeInfo,
};

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(api: &str) -> Self {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.trim_end_matches('/').to_string()
        } else {
            format!("http://{api}")
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(300)))
            .build()
            .into();
        Client { base, agent }
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the ditto daemon at {}: {e}\nstart one with `ditto daemon --data-dir DIR`, or point --api / DITTO_API at it",
            self.base
        )
    }

    fn answer<T: DeserializeOwned>(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| anyhow!("reading the daemon's answer: {e}"))?;
        if status.is_success() {
            let text = if text.is_empty() { "null" } else { &text };
            return serde_json::from_str(text)
                .map_err(|e| anyhow!("unexpected answer from the daemon: {e}"));
        }
        match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(body) => bail!("{}", body.error),
            Err(_) => bail!("daemon answered {status}: {text}"),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer(resp)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.answer(resp)
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let resp = self
            .agent
            .delete(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer::<serde_json::Value>(resp).map(|_| ())
    }
}

/// Print rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn pool_create(c: &Client, name: String, path: String, json: bool) -> Result<()> {
    let path = std::path::absolute(&path)
        .map(|p| p.display().to_string())
        .unwrap_or(path);
    let pool: PoolInfo = c.post("/v1/pools", &CreatePool { name, path })?;
    if json {
        return print_json(&pool);
    }
    println!(
        "pool {} created at {} ({} free)",
        pool.name,
        pool.path,
        format_size(pool.free_bytes)
    );
    Ok(())
}

pub fn pool_table(pools: &[PoolInfo]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.kind.clone(),
                format_size(p.total_bytes),
                format_size(p.free_bytes),
                p.replicas.to_string(),
                p.path.clone(),
            ]
        })
        .collect();
    table(&["POOL", "KIND", "SIZE", "FREE", "REPLICAS", "PATH"], &rows)
}

pub fn pool_list(c: &Client, json: bool) -> Result<()> {
    let pools: Vec<PoolInfo> = c.get("/v1/pools")?;
    if json {
        return print_json(&pools);
    }
    if pools.is_empty() {
        println!("no pools; create one with `ditto pool create NAME --path DIR`");
        return Ok(());
    }
    print!("{}", pool_table(&pools));
    Ok(())
}

pub fn pool_delete(c: &Client, name: &str, json: bool) -> Result<()> {
    c.delete(&format!("/v1/pools/{name}"))?;
    if json {
        return print_json(&serde_json::json!({"deleted": name}));
    }
    println!("pool {name} deleted");
    Ok(())
}

pub fn volume_create(
    c: &Client,
    name: String,
    size: String,
    replicas: Option<usize>,
    pools: Vec<String>,
    json: bool,
) -> Result<()> {
    let v: VolumeInfo = c.post(
        "/v1/volumes",
        &CreateVolume {
            name,
            size: SizeInput::Text(size),
            replicas,
            pools,
        },
    )?;
    if json {
        return print_json(&v);
    }
    println!(
        "volume {} created: {}, {} replicas on {}",
        v.name,
        format_size(v.size),
        v.replicas.len(),
        v.replicas
            .iter()
            .map(|r| r.pool.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("export: {}", v.export);
    Ok(())
}

pub fn volume_list(c: &Client, json: bool) -> Result<()> {
    let volumes: Vec<VolumeInfo> = c.get("/v1/volumes")?;
    if json {
        return print_json(&volumes);
    }
    if volumes.is_empty() {
        println!("no volumes; create one with `ditto volume create NAME --size SIZE`");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let in_sync = v.replicas.iter().filter(|r| r.state == "in_sync").count();
            vec![
                v.name.clone(),
                format_size(v.size),
                v.state.clone(),
                format!("{in_sync}/{}", v.replicas.len()),
                v.clients.len().to_string(),
                v.export.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["VOLUME", "SIZE", "STATE", "IN-SYNC", "CLIENTS", "EXPORT"],
            &rows
        )
    );
    Ok(())
}

pub fn volume_delete(c: &Client, name: &str, force: bool, json: bool) -> Result<()> {
    let path = if force {
        format!("/v1/volumes/{name}?force=true")
    } else {
        format!("/v1/volumes/{name}")
    };
    c.delete(&path)?;
    if json {
        return print_json(&serde_json::json!({"deleted": name}));
    }
    println!("volume {name} deleted");
    Ok(())
}

fn since(unix: u64) -> String {
    let now = ditto_control::model::now_unix();
    let s = now.saturating_sub(unix);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

/// The at-a-glance view, as `zpool status` gives it.
pub fn render_status(s: &StatusInfo) -> String {
    let mut out = String::new();
    if s.volumes.is_empty() {
        out.push_str("no volumes; create one with `ditto volume create NAME --size SIZE`\n");
    }
    for v in &s.volumes {
        out.push_str(&format!("volume: {}\n", v.name));
        out.push_str(&format!("  state: {}", v.state));
        if let Some(r) = &v.reason {
            out.push_str(&format!(" ({r})"));
        }
        out.push('\n');
        out.push_str(&format!(
            "  size: {} ({} bytes)\n",
            format_size(v.size),
            v.size
        ));
        out.push_str(&format!("  generation: {}\n", v.generation));
        out.push_str(&format!("  export: {}\n", v.export));
        let rows: Vec<Vec<String>> = v
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.id.simple().to_string()[..8].to_string(),
                    r.pool.clone(),
                    r.state.clone(),
                    r.errors.to_string(),
                    r.path.clone(),
                ]
            })
            .collect();
        for line in table(&["REPLICA", "POOL", "STATE", "ERRORS", "PATH"], &rows).lines() {
            out.push_str(&format!("    {line}\n"));
        }
        for r in v.replicas.iter().filter(|r| r.state != "in_sync") {
            if let Some(reason) = &r.reason {
                out.push_str(&format!("    {} {}: {reason}\n", r.pool, r.state));
            }
        }
        if v.clients.is_empty() {
            out.push_str("  clients: none\n");
        } else {
            out.push_str(&format!("  clients: {}\n", v.clients.len()));
            for c in &v.clients {
                out.push_str(&format!(
                    "    {} connected {}\n",
                    c.peer,
                    since(c.connected_at_unix)
                ));
            }
        }
        out.push('\n');
    }
    if !s.pools.is_empty() {
        out.push_str(&pool_table(&s.pools));
    }
    out
}

pub fn status(c: &Client, volume: Option<&str>, json: bool) -> Result<()> {
    let path = match volume {
        Some(v) => format!("/v1/status?volume={v}"),
        None => "/v1/status".to_string(),
    };
    let s: StatusInfo = c.get(&path)?;
    if json {
        return print_json(&s);
    }
    print!("{}", render_status(&s));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
