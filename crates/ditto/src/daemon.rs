//! `ditto daemon`: runs a node in the foreground until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ditto_control::DaemonConfig;

use crate::api_types::DaemonAddresses;
use crate::node::{Node, Registry};

/// Command-line overrides of the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// Directory for the node's state store (created if missing).
    #[arg(long, env = "DITTO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (TOML); unknown fields are errors.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// NBD listen address [default: 127.0.0.1:10809].
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// NBD Unix socket path.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Peer protocol listen address (serves replicas to other nodes) [default: off].
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// REST API listen address [default: 127.0.0.1:10810].
    #[arg(long)]
    pub api_listen: Option<SocketAddr>,
    /// Disk I/O engine: auto, threadpool or io_uring [default: auto = io_uring where usable].
    #[arg(long)]
    pub io_engine: Option<String>,
    /// Runtime worker threads; 0 = half the CPUs [default: from the config, else 0].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// For this start, let volumes with missing replicas start degraded (wins over the config).
    #[arg(long, conflicts_with = "no_degraded")]
    pub degraded: bool,
    /// For this start, never start a volume degraded (wins over the config).
    #[arg(long)]
    pub no_degraded: bool,
}

impl DaemonArgs {
    /// The per-start degraded override, as `bootdegraded=` overrides `BOOT_DEGRADED`.
    pub fn degraded_override(&self) -> Option<bool> {
        match (self.degraded, self.no_degraded) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

/// A node that is up: listeners bound, volumes started.
pub struct Running {
    pub node: Arc<Node>,
    pub nbd: Arc<ditto_nbd::Server>,
    pub addresses: DaemonAddresses,
    /// Every state change, for `ditto events` and `event_program`.
    pub events: Arc<crate::events::EventLog>,
    data_dir: PathBuf,
    _lock: std::fs::File,
}

pub fn resolve_config(
    args: &DaemonArgs,
    default_data_dir: Option<&Path>,
) -> Result<(DaemonConfig, PathBuf)> {
    let mut cfg = match &args.config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if let Some(a) = args.nbd_listen {
        cfg.nbd_listen = a;
    }
    if let Some(a) = args.peer_listen {
        cfg.peer_listen = Some(a);
    }
    if let Some(a) = args.api_listen {
        cfg.api_listen = a;
    }
    if let Some(e) = &args.io_engine {
        if !ditto_control::config::IO_ENGINES.contains(&e.as_str()) {
            bail!(
                "--io-engine {e:?} is not one of {:?}",
                ditto_control::config::IO_ENGINES
            );
        }
        cfg.io_engine = e.clone();
    }
    if let Some(n) = args.worker_threads {
        if n > ditto_control::config::MAX_WORKER_THREADS {
            bail!(
                "--worker-threads {n} is more than {}; use 0 to size it from the CPUs",
                ditto_control::config::MAX_WORKER_THREADS
            );
        }
        cfg.worker_threads = n;
    }
    if let Some(s) = &args.nbd_socket {
        cfg.nbd_socket = Some(s.clone());
    }
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| cfg.data_dir.clone())
        .or_else(|| default_data_dir.map(Path::to_path_buf));
    let Some(data_dir) = data_dir else {
        bail!("no data directory: give --data-dir DIR (or data_dir in the config file)");
    };
    Ok((cfg, data_dir))
}

/// Take an exclusive lock on the data directory so two daemons never share it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock only takes the fd, which `f` keeps open.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another ditto daemon is using {} (its lock is held); stop it first or use another --data-dir",
            dir.display()
        );
    }
    Ok(f)
}

pub async fn start(
    cfg: &DaemonConfig,
    data_dir: &Path,
    degraded_override: Option<bool>,
) -> Result<Running> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(data_dir)?;
    let lock = lock_data_dir(&data_dir)?;
    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for NBD on {} (is another server using it? use --nbd-listen)",
                cfg.nbd_listen
            )
        })?;
    let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for the API on {} (use --api-listen)",
                cfg.api_listen
            )
        })?;
    let engine = ditto_engine::io::engine_by_name(&cfg.io_engine).with_context(|| {
        format!(
            "I/O engine {:?} is not available in this build",
            cfg.io_engine
        )
    })?;
    let node_engine = engine.name();
    let held_engine = engine.clone();
    // Open before the node, so the events of volumes starting are recorded.
    let event_log = crate::events::EventLog::open(&data_dir, cfg.event_program.clone())?;
    let events: ditto_engine::SharedSink = event_log.clone();
    let node = Node::start(&data_dir, engine, cfg.clone(), degraded_override, events).await?;
    let nbd_addr = nbd_listener.local_addr()?.to_string();
    let api_addr = api_listener.local_addr()?.to_string();
    let _ = node.nbd_addr.set(nbd_addr.clone());
    let _ = node.api_addr.set(api_addr.clone());

    let nbd_tls = match &cfg.tls {
        None => None,
        Some(t) => {
            let files = ditto_peer::tls::TlsFiles {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            };
            let tls = ditto_peer::tls::PeerTls::load("nbd", &files)
                .context("cannot load the [tls] certificates")?;
            Some(ditto_nbd::NbdTls {
                acceptor: tls.acceptor,
                required: cfg.nbd_require_tls,
            })
        }
    };
    if nbd_tls.is_none() && !cfg.nbd_listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.nbd_listen, "NBD listens beyond loopback without TLS: any host that reaches it can read and write every volume; add [tls] and nbd_require_tls = true");
    }
    let server = ditto_nbd::Server::with_tls(
        Arc::new(Registry(Arc::downgrade(&node))),
        ditto_nbd::ServerConfig {
            max_connections: cfg.nbd_max_connections,
            handshake_timeout: Duration::from_secs(cfg.nbd_handshake_timeout_secs),
            max_in_flight_bytes_total: usize::try_from(cfg.nbd_in_flight_bytes())
                .unwrap_or(usize::MAX),
            ..ditto_nbd::ServerConfig::default()
        },
        nbd_tls,
    );
    node.set_nbd_server(server.clone());
    tokio::spawn({
        let server = server.clone();
        async move {
            if let Err(e) = server.serve_tcp(nbd_listener).await {
                tracing::error!(error = %e, "NBD server stopped");
            }
        }
    });
    if let Some(sock) = &cfg.nbd_socket {
        let _ = std::fs::remove_file(sock);
        let listener = tokio::net::UnixListener::bind(sock)
            .with_context(|| format!("cannot bind {}", sock.display()))?;
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve_unix(listener).await {
                tracing::error!(error = %e, "NBD unix server stopped");
            }
        });
    }
    let app = crate::api::router(node.clone()).merge(crate::api::events_router(event_log.clone()));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api_listener, app).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    let peer_addr = match cfg.peer_listen {
        None => None,
        Some(listen) => {
            let events: ditto_engine::SharedSink = event_log.clone();
            Some(start_peer_server(cfg, &node, held_engine, events, listen).await?)
        }
    };
    let addresses = DaemonAddresses {
        api: api_addr,
        nbd: nbd_addr,
        pid: std::process::id(),
        peer: peer_addr,
    };
    let tmp = data_dir.join("daemon.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&addresses)?)?;
    std::fs::rename(&tmp, data_dir.join("daemon.json"))?;
    tracing::info!(nbd = %addresses.nbd, api = %addresses.api, data_dir = %data_dir.display(), io_engine = node_engine, "ditto node running");
    Ok(Running {
        node,
        nbd: server,
        addresses,
        events: event_log,
        data_dir,
        _lock: lock,
    })
}

/// Serve the replicas this node holds for other nodes on `listen`.
async fn start_peer_server(
    cfg: &DaemonConfig,
    node: &Arc<Node>,
    engine: Arc<dyn ditto_engine::IoEngine>,
    events: ditto_engine::SharedSink,
    listen: std::net::SocketAddr,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for peers on {listen} (peer_listen)"))?;
    let held = crate::peers::HeldReplicas::open(
        node.store(),
        engine,
        Box::new(crate::node::NodeHandle::new(node)),
        cfg.node_name.clone(),
    )
    .await;
    node.set_held(held.clone());
    let auth = match crate::peers::peer_tls(cfg)? {
        None => {
            tracing::info!("peer protocol in plain TCP: only peers on loopback are accepted; configure [tls] for other machines");
            ditto_peer::server::PeerAuth::LoopbackPlain
        }
        Some(tls) => {
            let dialer = node.dialer().clone();
            ditto_peer::server::PeerAuth::Tls {
                tls,
                known: Arc::new(move |name: &str| dialer.knows(name)),
            }
        }
    };
    let hook: ditto_peer::server::RefusalHook = Arc::new(move |why: &str| {
        events.emit(ditto_engine::Event {
            kind: ditto_engine::EventKind::PeerRefused,
            volume: "-".into(),
            replica: None,
            message: format!("peer refused: {why}"),
            progress: None,
        })
    });
    let server = ditto_peer::PeerServer::with_refusal_hook(
        cfg.node_name.clone(),
        held,
        ditto_peer::server::ServerLimits::default(),
        auth,
        Some(hook),
    );
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        if let Err(e) = server.serve(listener).await {
            tracing::error!(error = %e, "peer server stopped");
        }
    });
    Ok(addr)
}

impl Running {
    /// Stop serving, then close every volume cleanly.
    pub async fn stop(self) {
        self.nbd.shutdown();
        self.node.shutdown().await;
        // After the node, so volumes stopping are recorded; bounded, as a
        // hung event_program must not hold up the shutdown.
        let events = self.events.clone();
        let _ = tokio::task::spawn_blocking(move || events.close(Duration::from_secs(5))).await;
        let _ = std::fs::remove_file(self.data_dir.join("daemon.json"));
        tracing::info!("ditto node stopped");
    }
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Runs the daemon until SIGTERM or SIGINT, with the configuration
/// [`resolve_config`] gave (the caller sized the runtime from it).
pub async fn run(args: DaemonArgs, cfg: DaemonConfig, data_dir: PathBuf) -> Result<()> {
    crate::init_logging(&cfg.log);
    let running = start(&cfg, &data_dir, args.degraded_override()).await?;
    wait_for_signal().await;
    running.stop().await;
    Ok(())
}
