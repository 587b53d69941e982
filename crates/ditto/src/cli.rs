//! The command-line client: talks to the local daemon's REST API and prints tables or JSON.

use anyhow::{anyhow, bail, Result};
use ditto_control::validate::format_size;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api_types::{
    AddReplica, ApiErrorBody, CreatePool, CreateVolume, JobInfo, PoolInfo, ReaddResult, ReplicaRef,
    ResolveRequest, ScrubRequest, StartVolume, StatusInfo, StopVolume, VolumeInfo,
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

/// Where a new pool lives: exactly one of these.
pub struct PoolSource {
    pub path: Option<String>,
    pub device: Option<String>,
    pub nbd: Option<String>,
}

pub fn pool_create(c: &Client, name: String, src: PoolSource, json: bool) -> Result<()> {
    let path = src.path.map(|p| {
        std::path::absolute(&p)
            .map(|a| a.display().to_string())
            .unwrap_or(p)
    });
    let pool: PoolInfo = c.post(
        "/v1/pools",
        &CreatePool {
            name,
            path,
            device: src.device,
            nbd: src.nbd,
        },
    )?;
    if json {
        return print_json(&pool);
    }
    println!(
        "pool {} ({}) created at {} ({} free)",
        pool.name,
        pool.kind,
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

pub fn node_list(c: &Client, json: bool) -> Result<()> {
    let nodes: Vec<crate::api_types::PeerNodeInfo> = c.get("/v1/nodes")?;
    if json {
        return print_json(&nodes);
    }
    if nodes.is_empty() {
        println!("no other nodes; add one with `ditto node add NAME --address HOST:PORT`");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.address.clone(),
                if n.connected { "yes" } else { "no" }.to_string(),
                n.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
                n.protocol.map_or("-".into(), |v| v.to_string()),
                n.source.clone(),
                n.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NODE",
                "ADDRESS",
                "CONNECTED",
                "RTT",
                "PROTOCOL",
                "FROM",
                "ERROR"
            ],
            &rows
        )
    );
    Ok(())
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

pub fn node_add(c: &Client, name: String, address: String, json: bool) -> Result<()> {
    let n: crate::api_types::PeerNodeInfo =
        c.post("/v1/nodes", &crate::api_types::AddNode { name, address })?;
    if json {
        return print_json(&n);
    }
    println!(
        "node {} added at {} (round trip {}, protocol {})",
        n.name,
        n.address,
        n.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
        n.protocol.map_or("-".into(), |v| v.to_string())
    );
    Ok(())
}

pub fn node_remove(c: &Client, name: &str, json: bool) -> Result<()> {
    c.delete(&format!("/v1/nodes/{name}"))?;
    if json {
        return print_json(&serde_json::json!({"removed": name}));
    }
    println!("node {name} removed");
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

pub fn volume_create(c: &Client, req: CreateVolume, json: bool) -> Result<()> {
    let v: VolumeInfo = c.post("/v1/volumes", &req)?;
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
    if s.volumes.is_empty() && s.held.is_empty() && s.tiebreaker_of.is_empty() {
        out.push_str("no volumes; create one with `ditto volume create NAME --size SIZE`\n");
    }
    for h in &s.held {
        out.push_str(&format!(
            "volume: {} (secondary: this node holds replica {} in pool {}; primary: node {}, which serves it)\n",
            h.volume,
            &h.replica.simple().to_string()[..8],
            h.pool,
            h.primary
        ));
    }
    for w in &s.tiebreaker_of {
        out.push_str(&format!(
            "volume: {} (tiebreaker: this node holds no data and votes; primary: node {} at epoch {}; last membership recorded: generation {}, {} replica(s) in sync, {})\n",
            w.volume,
            w.primary,
            w.epoch,
            w.generation,
            w.in_sync.len(),
            crate::api_types::ago(w.updated_unix)
        ));
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
        out.push_str(&format!(
            "  generation: {}  epoch: {}\n",
            v.generation, v.epoch
        ));
        if let Some(q) = &v.quorum {
            out.push_str(&format!("  quorum: {q}\n"));
        }
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
        if let Some(j) = &v.job {
            out.push_str(&format!("  {}: {}\n", j.kind, job_line(j)));
        }
        if let Some(sc) = &v.last_scrub {
            out.push_str(&format!(
                "  last scrub: {}, {:.1}s, {} scanned, {} mismatched region(s), {} repaired{}\n",
                since(sc.started_unix),
                sc.duration_secs,
                format_size(sc.bytes),
                sc.mismatches,
                sc.repaired,
                if sc.finished {
                    String::new()
                } else {
                    format!(" ({})", sc.error.as_deref().unwrap_or("running"))
                }
            ));
        }
        if v.dirty_regions > 0 {
            let mib = |regions: u64| (regions * v.region_size) >> 20;
            out.push_str(&format!(
                "  dirty regions: {} ({} MiB; a crash resync copies at most the hot set of {} regions, {} MiB, while all replicas are in sync)\n",
                v.dirty_regions,
                mib(v.dirty_regions),
                v.hot_set_regions,
                mib(v.hot_set_regions)
            ));
        }
        for a in &v.actions {
            out.push_str(&format!("  action: {a}\n"));
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

/// Events asked for per request by `ditto events`.
const EVENTS_PAGE: usize = 1000;
/// How long one `--follow` request waits for news (the daemon caps it at 30 s).
const FOLLOW_WAIT_MS: u64 = 25_000;
/// Past events shown before following when no --since is given, as `tail -f` does.
const FOLLOW_BACKLOG: usize = 10;
const EVENT_HEADER: [&str; 6] = ["TIME", "SEQ", "KIND", "VOLUME", "REPLICA", "MESSAGE"];
/// Column widths while following, when later rows cannot widen the table.
const FOLLOW_WIDTHS: [usize; 5] = [24, 6, 21, 16, 24];

fn events_path(since: u64, volume: Option<&str>, wait_ms: u64) -> String {
    let mut path = format!("/v1/events?since={since}&limit={EVENTS_PAGE}");
    // Volume names are validated to URL-safe characters before we get here.
    if let Some(v) = volume {
        path.push_str(&format!("&volume={v}"));
    }
    if wait_ms > 0 {
        path.push_str(&format!("&wait_ms={wait_ms}"));
    }
    path
}

fn event_cells(e: &crate::events::EventRecord) -> Vec<String> {
    let mut message = e.message.clone();
    if let Some(p) = e.progress {
        message.push_str(&format!(" [{}% of {}]", p.percent(), format_size(p.total)));
    }
    vec![
        crate::events::format_time_utc(e.time_unix_ms),
        e.seq.to_string(),
        e.kind.clone(),
        e.volume.clone(),
        e.replica.clone().unwrap_or_else(|| "-".into()),
        message,
    ]
}

fn follow_line(cells: &[String]) -> String {
    let mut s = String::new();
    for (cell, w) in cells.iter().zip(FOLLOW_WIDTHS) {
        s.push_str(&format!("{cell:<w$}  "));
    }
    s.push_str(cells.last().map_or("", String::as_str));
    s.trim_end().to_string() + "\n"
}

/// Writes to stdout at once; a closed pipe (`ditto events --follow | head`) ends quietly.
fn write_out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

/// `--follow` runs until interrupted, and that is the normal way out: exit 0.
fn exit_on_interrupt() {
    extern "C" fn quit(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe; every line was flushed when written.
        unsafe { libc::_exit(0) }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only calls an async-signal-safe function.
        unsafe { libc::signal(sig, quit as *const () as libc::sighandler_t) };
    }
}

fn print_events(events: &[crate::events::EventRecord], json: bool, follow: bool) -> Result<()> {
    let mut text = String::new();
    for e in events {
        if json {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        } else if follow {
            text.push_str(&follow_line(&event_cells(e)));
        }
    }
    if !json && !follow && !events.is_empty() {
        let rows: Vec<Vec<String>> = events.iter().map(event_cells).collect();
        text = table(&EVENT_HEADER, &rows);
    }
    write_out(&text)
}

/// `ditto events`: the recorded events (JSON lines with --json), then, with
/// --follow, new ones as they happen until interrupted or the daemon goes away.
pub fn events(
    c: &Client,
    follow: bool,
    volume: Option<&str>,
    since: Option<u64>,
    json: bool,
) -> Result<()> {
    use crate::events::EventsPage;
    if follow {
        exit_on_interrupt();
    }
    let mut backlog = Vec::new();
    let mut next = since.unwrap_or(0);
    loop {
        let page: EventsPage = c.get(&events_path(next, volume, 0))?;
        let full = page.events.len() >= EVENTS_PAGE;
        backlog.extend(page.events);
        next = page.next;
        if !full {
            break;
        }
    }
    if follow && since.is_none() {
        let skip = backlog.len().saturating_sub(FOLLOW_BACKLOG);
        backlog.drain(..skip);
    }
    if !follow {
        if backlog.is_empty() && !json {
            return write_out("no events\n");
        }
        return print_events(&backlog, json, false);
    }
    if !json {
        let header: Vec<String> = EVENT_HEADER.iter().map(|h| h.to_string()).collect();
        write_out(&follow_line(&header))?;
    }
    print_events(&backlog, json, true)?;
    loop {
        let page: EventsPage = c.get(&events_path(next, volume, FOLLOW_WAIT_MS))?;
        print_events(&page.events, json, true)?;
        next = page.next;
    }
}

/// One line of job progress: percent, bytes, rate, time left (never past 100%).
pub fn job_line(j: &JobInfo) -> String {
    let state = match (&j.error, j.finished) {
        (Some(e), _) => format!("stopped: {e}"),
        (None, true) => format!("done in {:.1}s", j.elapsed_secs),
        (None, false) => format!(
            "{} MiB/s, {} left",
            j.rate_bytes_per_sec >> 20,
            j.eta_secs.map_or("unknown".into(), |s| format!("{s}s"))
        ),
    };
    format!(
        "{:.1}% ({} of {}){}, {state}",
        j.percent,
        format_size(j.done_bytes),
        format_size(j.total_bytes),
        j.replica
            .as_deref()
            .map(|r| format!(" to {r}"))
            .unwrap_or_default()
    )
}

pub fn volume_promote(c: &Client, name: &str, force: bool, json: bool) -> Result<()> {
    let v: VolumeInfo = c.post(
        &format!("/v1/volumes/{name}/promote"),
        &crate::api_types::PromoteVolume { force },
    )?;
    if json {
        return print_json(&v);
    }
    println!(
        "volume {name}: this node is its primary now ({}); it serves it at {}",
        v.state, v.export
    );
    Ok(())
}

pub fn volume_demote(c: &Client, name: &str, to: String, json: bool) -> Result<()> {
    let _: serde_json::Value = c.post(
        &format!("/v1/volumes/{name}/demote"),
        &crate::api_types::DemoteVolume { to: to.clone() },
    )?;
    if json {
        return print_json(&serde_json::json!({"volume": name, "primary": to}));
    }
    println!("volume {name}: node {to} is its primary now; this node holds its replica(s) for it");
    Ok(())
}

pub fn volume_start(
    c: &Client,
    name: &str,
    degraded: Option<bool>,
    force_stale: bool,
    json: bool,
) -> Result<()> {
    let v: VolumeInfo = c.post(
        &format!("/v1/volumes/{name}/start"),
        &StartVolume {
            degraded,
            force_stale,
        },
    )?;
    if json {
        return print_json(&v);
    }
    if v.state == "stopped" {
        bail!(
            "volume {name} did not start: {}",
            v.reason.unwrap_or_default()
        );
    }
    println!("volume {name} started: {}", v.state);
    Ok(())
}

pub fn volume_stop(c: &Client, name: &str, force: bool, json: bool) -> Result<()> {
    let _: serde_json::Value =
        c.post(&format!("/v1/volumes/{name}/stop"), &StopVolume { force })?;
    if json {
        return print_json(&serde_json::json!({"stopped": name}));
    }
    println!("volume {name} stopped");
    Ok(())
}

pub fn volume_scrub(
    c: &Client,
    name: &str,
    repair: bool,
    source: Option<String>,
    wait: bool,
    json: bool,
) -> Result<()> {
    let _: serde_json::Value = c.post(
        &format!("/v1/volumes/{name}/scrub"),
        &ScrubRequest { repair, source },
    )?;
    if !wait {
        if json {
            return print_json(&serde_json::json!({"scrub_started": name}));
        }
        println!("scrub of {name} started; `ditto status {name}` shows progress and result");
        return Ok(());
    }
    wait_job(c, name, None, json, false)?;
    let v: VolumeInfo = c.get(&format!("/v1/volumes/{name}"))?;
    if json {
        return print_json(&v.last_scrub);
    }
    if let Some(sc) = v.last_scrub {
        println!(
            "scrub of {name}: {} scanned in {:.1}s, {} mismatched region(s), {} repaired",
            format_size(sc.bytes),
            sc.duration_secs,
            sc.mismatches,
            sc.repaired
        );
        if sc.mismatches > 0 && !repair {
            println!(
                "repair with `ditto volume scrub {name} --repair` (optionally --source REPLICA)"
            );
        }
    }
    Ok(())
}

pub fn volume_resolve(c: &Client, name: &str, keep: &str, json: bool) -> Result<()> {
    let v: VolumeInfo = c.post(
        &format!("/v1/volumes/{name}/resolve"),
        &ResolveRequest { keep: keep.into() },
    )?;
    if json {
        return print_json(&v);
    }
    println!("volume {name} serves from the kept replica; the others are being rebuilt (`ditto volume wait {name}`)");
    Ok(())
}

/// What `ditto replica ...` does.
pub enum ReplicaAction {
    Add(String),
    Readd(String),
    Fail(String),
    Remove(String),
}

pub fn replica(c: &Client, volume: &str, action: ReplicaAction, json: bool) -> Result<()> {
    let base = format!("/v1/volumes/{volume}/replicas");
    let (value, text) = match action {
        ReplicaAction::Add(pool) => {
            let v: VolumeInfo = c.post(&base, &AddReplica { pool: pool.clone() })?;
            (
                serde_json::to_value(&v)?,
                format!("replica added on pool {pool}; rebuilding (`ditto volume wait {volume}`)"),
            )
        }
        ReplicaAction::Readd(r) => {
            let res: ReaddResult =
                c.post(&format!("{base}/readd"), &ReplicaRef { replica: r.clone() })?;
            let text = match res.plan.as_str() {
                "catch_up" => format!(
                    "replica {r} re-added: copying only the {} region(s) written while it was away (`ditto volume wait {volume}`)",
                    res.dirty_regions.unwrap_or(0)
                ),
                _ => format!("replica {r} re-added: its absence is not covered by the dirty map, so it is rebuilt in full (`ditto volume wait {volume}`)"),
            };
            (serde_json::to_value(&res)?, text)
        }
        ReplicaAction::Fail(r) => {
            let _: serde_json::Value =
                c.post(&format!("{base}/fail"), &ReplicaRef { replica: r.clone() })?;
            (serde_json::json!({"failed": r}), format!("replica {r} failed out of {volume}; bring it back with `ditto replica readd {volume} {r}`"))
        }
        ReplicaAction::Remove(r) => {
            let _: serde_json::Value = c.post(
                &format!("{base}/remove"),
                &ReplicaRef { replica: r.clone() },
            )?;
            (
                serde_json::json!({"removed": r}),
                format!("replica {r} removed from {volume}"),
            )
        }
    };
    if json {
        return print_json(&value);
    }
    println!("{text}");
    Ok(())
}

/// Poll until no job runs on the volume; draw a progress bar unless `json`.
/// With `until_redundant`, keep waiting until every replica is in sync.
fn wait_job(
    c: &Client,
    name: &str,
    timeout: Option<u64>,
    json: bool,
    until_redundant: bool,
) -> Result<VolumeInfo> {
    use indicatif::{ProgressBar, ProgressStyle};
    let start = std::time::Instant::now();
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(100)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last_print: Option<std::time::Instant> = None;
    loop {
        let v: VolumeInfo = c.get(&format!("/v1/volumes/{name}"))?;
        let running = v.job.as_ref().is_some_and(|j| !j.finished);
        if let Some(j) = &v.job {
            bar.set_prefix(j.kind.clone());
            bar.set_position(j.percent as u64);
            let line = job_line(j);
            bar.set_message(line.clone());
            // Without a terminal, a line every 5 s instead of a bar.
            if bar.is_hidden()
                && !json
                && !j.finished
                && last_print.is_none_or(|t| t.elapsed().as_secs() >= 5)
            {
                eprintln!("{}: {line}", j.kind);
                last_print = Some(std::time::Instant::now());
            }
        }
        if !running {
            if let Some(err) = v.job.as_ref().and_then(|j| j.error.clone()) {
                bar.abandon();
                bail!(
                    "{} of {name} stopped: {err}",
                    v.job.as_ref().map_or("job", |j| j.kind.as_str())
                );
            }
            if !until_redundant || v.state == "healthy" {
                bar.finish_and_clear();
                return Ok(v);
            }
            if matches!(v.state.as_str(), "stopped" | "failed") || !v.actions.is_empty() {
                bar.abandon();
                bail!(
                    "volume {name} is {} and will not become redundant by itself:
  {}",
                    v.state,
                    if v.actions.is_empty() {
                        v.reason.unwrap_or_default()
                    } else {
                        v.actions.join(
                            "
  ",
                        )
                    }
                );
            }
        }
        if let Some(t) = timeout {
            if start.elapsed().as_secs() >= t {
                bar.abandon();
                bail!("timed out after {t}s; volume {name} is {}", v.state);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

pub fn volume_wait(c: &Client, name: &str, timeout: Option<u64>, json: bool) -> Result<()> {
    let v = wait_job(c, name, timeout, json, true)?;
    if json {
        return print_json(&v);
    }
    println!(
        "volume {name} is {}: {} of {} replicas in sync",
        v.state,
        v.replicas.iter().filter(|r| r.state == "in_sync").count(),
        v.replicas.len()
    );
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
