//! The daemon's configuration file (TOML), parsed strictly: unknown fields are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ControlError;

pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:10810";

/// `ditto daemon --config FILE`. Command-line options override these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where the node keeps its state store (and, by default, nothing else).
    pub data_dir: Option<PathBuf>,
    /// TCP address of the NBD server.
    pub nbd_listen: SocketAddr,
    /// Unix socket of the NBD server (optional).
    pub nbd_socket: Option<PathBuf>,
    /// TCP address of the REST API the CLI uses.
    pub api_listen: SocketAddr,
    /// Seconds a replica may take to complete one operation before it is failed out.
    pub io_timeout_secs: u64,
    /// Log filter, e.g. "info" or "ditto=debug".
    pub log: String,
    /// Disk I/O engine: "auto" (io_uring where the kernel allows it, else the
    /// thread pool), "threadpool" (portable) or "io_uring" (fails if unusable).
    pub io_engine: String,
    /// Threads that run the network and engine tasks; 0 picks half the CPUs
    /// (at least one). See [`DaemonConfig::runtime_threads`].
    pub worker_threads: usize,
    /// Absolute path of a program run for every event, as
    /// `PROGRAM EVENT VOLUME [REPLICA]` (like `mdadm --monitor --program`),
    /// so an administrator hears of a failure at once. See docs/events.md.
    pub event_program: Option<PathBuf>,
    /// Start a volume whose replicas are not all present (after waiting
    /// `degraded_wait_secs`)? Off by default: a degraded start is the
    /// operator's decision (`ditto volume start NAME --degraded`).
    pub start_degraded: bool,
    /// How long a volume waits at start for missing replicas to appear.
    pub degraded_wait_secs: u64,
    /// Resync/rebuild/scrub rate while clients do I/O, e.g. "10M" (per second).
    pub resync_min_rate: String,
    /// Resync/rebuild/scrub rate while clients are idle, e.g. "1G" (per second).
    pub resync_max_rate: String,
    /// Scrub every volume this often (hours); 0 disables the schedule.
    pub scrub_interval_hours: u64,
    /// Most dirty-map regions kept dirty while every replica is in sync
    /// (the hot set): bounds what a crash resync copies.
    pub dirty_hot_set_regions: u64,
    /// A region's dirty bit is cleared once the region had no write for
    /// this long (milliseconds).
    pub dirty_clear_delay_ms: u64,
    /// A catch-up or rebuild to a replica on another node first compares a
    /// digest (SHA-256) of each run and sends only the runs that differ,
    /// like DRBD's csums-alg. Off by default.
    pub resync_checksums: bool,
    /// NBD connections open at once; more are refused (and logged).
    pub nbd_max_connections: usize,
    /// Seconds an NBD client may take to finish the handshake before it is closed.
    pub nbd_handshake_timeout_secs: u64,
    /// READ/WRITE payload bytes all NBD connections together may hold in
    /// flight, e.g. "256M"; a connection waits for room before reading more.
    pub nbd_in_flight_bytes: String,
    /// This node's certificates (`ditto cert`), `[tls]`: with them the NBD
    /// server offers NBD_OPT_STARTTLS (clients need a certificate from the
    /// same CA), and nodes authenticate each other.
    pub tls: Option<TlsConfig>,
    /// Refuse NBD over TCP without TLS (FORCEDTLS): needs `[tls]`. Set it
    /// whenever `nbd_listen` is reachable from other machines.
    pub nbd_require_tls: bool,
    /// This node's name among its peers (a DNS label; its certificate's name).
    pub node_name: String,
    /// Where this node serves its replicas to primaries on other nodes (the
    /// peer protocol, docs/peer-protocol.md), e.g. "0.0.0.0:10811"; off when
    /// unset. Without `[tls]` only loopback peers are accepted.
    pub peer_listen: Option<SocketAddr>,
    /// The other nodes this node knows, `[nodes.NAME] address = "HOST:PORT"`:
    /// where it creates and reaches replicas (`--pool NAME:POOL`), and whom
    /// it lets in.
    pub nodes: std::collections::BTreeMap<String, NodeConfig>,
    /// Seconds between attempts to reconnect replicas on other nodes that
    /// are out; one that answers is re-added (caught up). 0: only `replica readd`.
    pub peer_reconnect_secs: u64,
    /// Quorum of a volume with replicas on several nodes: "off", or
    /// "majority" (I/O only while its in-sync replicas span more than half
    /// of its nodes, so no partition can make a split brain). Set it the
    /// same on every node of the volume.
    pub quorum: Quorum,
    /// What a volume without quorum does: "suspend" (new requests wait
    /// until quorum returns) or "error" (they fail at once).
    pub on_no_quorum: OnNoQuorum,
    /// Per-volume overrides, `[volumes.NAME]`.
    pub volumes: std::collections::BTreeMap<String, VolumeConfig>,
}

/// `quorum`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quorum {
    #[default]
    Off,
    Majority,
}

/// `on_no_quorum`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNoQuorum {
    #[default]
    Suspend,
    Error,
}

/// `[nodes.NAME]`: another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Its peer address (its `peer_listen`).
    pub address: String,
}

/// `[tls]`: the files `ditto cert ca` and `ditto cert node` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (ca.pem).
    pub ca: PathBuf,
    /// This node's certificate (node.pem).
    pub cert: PathBuf,
    /// This node's private key (node.key).
    pub key: PathBuf,
}

/// Default `nbd_max_connections`.
pub const DEFAULT_NBD_MAX_CONNECTIONS: usize = 512;
/// Default `nbd_handshake_timeout_secs`.
pub const DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default `nbd_in_flight_bytes`.
pub const DEFAULT_NBD_IN_FLIGHT_BYTES: &str = "256M";
/// `nbd_in_flight_bytes` must hold one request of the largest size the
/// server accepts (32 MiB).
pub const MIN_NBD_IN_FLIGHT_BYTES: u64 = 32 << 20;

/// `[volumes.NAME]`: settings of one volume that override the global ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub start_degraded: Option<bool>,
    pub degraded_wait_secs: Option<u64>,
    pub scrub_interval_hours: Option<u64>,
    pub quorum: Option<Quorum>,
    pub on_no_quorum: Option<OnNoQuorum>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            data_dir: None,
            nbd_listen: DEFAULT_NBD_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 10809))),
            nbd_socket: None,
            api_listen: DEFAULT_API_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 10810))),
            io_timeout_secs: 30,
            log: "info".into(),
            io_engine: "auto".into(),
            worker_threads: 0,
            event_program: None,
            start_degraded: false,
            degraded_wait_secs: 30,
            resync_min_rate: "10M".into(),
            resync_max_rate: "1G".into(),
            scrub_interval_hours: 0,
            dirty_hot_set_regions: 4096,
            dirty_clear_delay_ms: 5000,
            resync_checksums: false,
            nbd_max_connections: DEFAULT_NBD_MAX_CONNECTIONS,
            nbd_handshake_timeout_secs: DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS,
            nbd_in_flight_bytes: DEFAULT_NBD_IN_FLIGHT_BYTES.into(),
            tls: None,
            nbd_require_tls: false,
            node_name: "local".into(),
            peer_listen: None,
            nodes: Default::default(),
            peer_reconnect_secs: 5,
            quorum: Quorum::Off,
            on_no_quorum: OnNoQuorum::Suspend,
            volumes: Default::default(),
        }
    }
}

impl DaemonConfig {
    /// Parse TOML text; errors carry line and column and name the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ControlError> {
        let cfg: DaemonConfig = toml::from_str(text).map_err(|e| ControlError::Config {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ControlError> {
        let text = std::fs::read_to_string(path).map_err(|e| ControlError::Config {
            path: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    fn check(&self, path: &Path) -> Result<(), ControlError> {
        let config_err = |message: String| ControlError::Config {
            path: path.to_path_buf(),
            message,
        };
        for name in std::iter::once(&self.node_name).chain(self.nodes.keys()) {
            crate::validate::node_name(name).map_err(&config_err)?;
        }
        if self.nodes.contains_key(&self.node_name) {
            return Err(config_err(format!(
                "[nodes.{0}] names this node itself (node_name = {0:?}); list only the other nodes",
                self.node_name
            )));
        }
        if self.nbd_require_tls && self.tls.is_none() {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: "nbd_require_tls = true needs a [tls] section (ca, cert, key); make the files with `ditto cert ca` and `ditto cert node`".into(),
            });
        }
        if self.dirty_hot_set_regions == 0 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: "dirty_hot_set_regions = 0 would flush and clear on every write; use at least 1 (default 4096)".into(),
            });
        }
        if self.dirty_clear_delay_ms > 3_600_000 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "dirty_clear_delay_ms = {} must be at most 3600000 (an hour)",
                    self.dirty_clear_delay_ms
                ),
            });
        }
        if self.io_timeout_secs == 0 || self.io_timeout_secs > 3600 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "io_timeout_secs = {} must be between 1 and 3600",
                    self.io_timeout_secs
                ),
            });
        }
        for (field, value) in [
            ("resync_min_rate", &self.resync_min_rate),
            ("resync_max_rate", &self.resync_max_rate),
        ] {
            crate::validate::parse_size(value).map_err(|e| ControlError::Config {
                path: path.to_path_buf(),
                message: format!("{field}: {e}"),
            })?;
        }
        if self.degraded_wait_secs > 86400 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "degraded_wait_secs = {} is more than a day",
                    self.degraded_wait_secs
                ),
            });
        }
        if !IO_ENGINES.contains(&self.io_engine.as_str()) {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "io_engine = {:?} is not one of {IO_ENGINES:?}",
                    self.io_engine
                ),
            });
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "worker_threads = {} is more than {MAX_WORKER_THREADS}; use 0 to size it from the CPUs",
                    self.worker_threads
                ),
            });
        }
        if self.nbd_max_connections == 0 || self.nbd_max_connections > 1_000_000 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "nbd_max_connections = {} must be between 1 and 1000000",
                    self.nbd_max_connections
                ),
            });
        }
        if self.nbd_handshake_timeout_secs == 0 || self.nbd_handshake_timeout_secs > 3600 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "nbd_handshake_timeout_secs = {} must be between 1 and 3600",
                    self.nbd_handshake_timeout_secs
                ),
            });
        }
        let budget = crate::validate::parse_size(&self.nbd_in_flight_bytes).map_err(|e| {
            ControlError::Config {
                path: path.to_path_buf(),
                message: format!("nbd_in_flight_bytes: {e}"),
            }
        })?;
        if budget < MIN_NBD_IN_FLIGHT_BYTES {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "nbd_in_flight_bytes = {:?} is less than one request of the largest size (32M); give at least \"32M\"",
                    self.nbd_in_flight_bytes
                ),
            });
        }
        if let Some(p) = &self.event_program {
            if !p.is_absolute() {
                return Err(ControlError::Config {
                    path: path.to_path_buf(),
                    message: format!("event_program = {p:?} must be an absolute path"),
                });
            }
        }
        Ok(())
    }
}

impl DaemonConfig {
    /// Worker threads for the daemon's runtime: `worker_threads`, or for 0
    /// half the CPUs, at least one. Each request's task, its disk I/O
    /// submission and its reply stay on one thread unless another is idle
    /// and steals work; on a small machine every cross-thread wake-up costs
    /// more than the I/O it hands over (BENCHMARKS.md measures it), and the
    /// other half of the CPUs is left to the kernel and the clients.
    pub fn runtime_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1),
            n => n,
        }
    }

    /// Whether volume `name` may start degraded, by its own setting or the global one.
    pub fn start_degraded_for(&self, name: &str) -> bool {
        self.volumes
            .get(name)
            .and_then(|v| v.start_degraded)
            .unwrap_or(self.start_degraded)
    }

    /// Volume `name`'s quorum and what it does without one; None when off.
    pub fn quorum_for(&self, name: &str) -> Option<OnNoQuorum> {
        let v = self.volumes.get(name);
        match v.and_then(|v| v.quorum).unwrap_or(self.quorum) {
            Quorum::Off => None,
            Quorum::Majority => Some(v.and_then(|v| v.on_no_quorum).unwrap_or(self.on_no_quorum)),
        }
    }

    pub fn degraded_wait_for(&self, name: &str) -> u64 {
        self.volumes
            .get(name)
            .and_then(|v| v.degraded_wait_secs)
            .unwrap_or(self.degraded_wait_secs)
    }

    pub fn scrub_interval_for(&self, name: &str) -> u64 {
        self.volumes
            .get(name)
            .and_then(|v| v.scrub_interval_hours)
            .unwrap_or(self.scrub_interval_hours)
    }

    /// `nbd_in_flight_bytes` in bytes (validated at load).
    pub fn nbd_in_flight_bytes(&self) -> u64 {
        crate::validate::parse_size(&self.nbd_in_flight_bytes)
            .unwrap_or(256 << 20)
            .max(MIN_NBD_IN_FLIGHT_BYTES)
    }

    /// (min, max) resync rates in bytes per second (validated at load).
    pub fn resync_rates(&self) -> (u64, u64) {
        let min = crate::validate::parse_size(&self.resync_min_rate).unwrap_or(10 << 20);
        let max = crate::validate::parse_size(&self.resync_max_rate).unwrap_or(1 << 30);
        (min, max.max(min))
    }
}

/// Most worker threads a config may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The disk I/O engines a config may name.
pub const IO_ENGINES: &[&str] = &["auto", "threadpool", "io_uring"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let c =
            DaemonConfig::parse("nbd_listen = \"127.0.0.2:9000\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.nbd_listen.port(), 9000);
        assert_eq!(c.api_listen.port(), 10810);
        assert_eq!(c.event_program, None);
        let c = DaemonConfig::parse(
            "event_program = \"/usr/local/bin/page-me\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            c.event_program.as_deref(),
            Some(Path::new("/usr/local/bin/page-me"))
        );
        assert_eq!(
            DaemonConfig::parse("", Path::new("x")).unwrap(),
            DaemonConfig::default()
        );
    }

    #[test]
    fn unknown_field_names_field_line_and_column() {
        let err = DaemonConfig::parse(
            "log = \"info\"\nnbd_listn = \"1.2.3.4:1\"\n",
            Path::new("/etc/ditto.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("nbd_listn"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("column"), "{msg}");
        assert!(msg.contains("/etc/ditto.toml"), "{msg}");
    }

    #[test]
    fn per_volume_overrides_win() {
        let c = DaemonConfig::parse(
            "start_degraded = false\n[volumes.boot]\nstart_degraded = true\ndegraded_wait_secs = 5\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(c.start_degraded_for("boot"));
        assert!(!c.start_degraded_for("data"));
        assert_eq!(c.quorum_for("boot"), None);
        assert_eq!(c.degraded_wait_for("boot"), 5);
        assert_eq!(c.degraded_wait_for("data"), 30);
        let err = DaemonConfig::parse("[volumes.boot]\nstart_degradd = true\n", Path::new("x"))
            .unwrap_err();
        assert!(
            err.to_string().contains("start_degradd") && err.to_string().contains("line 2"),
            "{err}"
        );
        assert!(DaemonConfig::parse("resync_max_rate = \"fast\"", Path::new("x")).is_err());
    }

    #[test]
    fn quorum_is_off_by_default_and_set_per_volume() {
        let c = DaemonConfig::parse(
            "quorum = \"majority\"\non_no_quorum = \"error\"\n[volumes.scratch]\nquorum = \"off\"\n[volumes.db]\non_no_quorum = \"suspend\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.quorum_for("vm1"), Some(OnNoQuorum::Error));
        assert_eq!(c.quorum_for("scratch"), None);
        assert_eq!(c.quorum_for("db"), Some(OnNoQuorum::Suspend));
        assert_eq!(DaemonConfig::default().quorum_for("vm1"), None);
        let err = DaemonConfig::parse("quorum = \"most\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("quorum") && err.contains("majority"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(DaemonConfig::parse("nbd_listen = \"nope\"", Path::new("x")).is_err());
        assert!(DaemonConfig::parse("io_timeout_secs = 0", Path::new("x")).is_err());
        let e = DaemonConfig::parse("dirty_hot_set_regions = 0", Path::new("x"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("dirty_hot_set_regions"), "{e}");
        let c = DaemonConfig::parse(
            "dirty_hot_set_regions = 64\ndirty_clear_delay_ms = 250",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!((c.dirty_hot_set_regions, c.dirty_clear_delay_ms), (64, 250));
        assert!(DaemonConfig::parse("event_program = \"notify.sh\"", Path::new("x")).is_err());
        for bad in [
            "nbd_max_connections = 0",
            "nbd_handshake_timeout_secs = 0",
            "nbd_in_flight_bytes = \"lots\"",
            "nbd_in_flight_bytes = \"1M\"",
        ] {
            let err = DaemonConfig::parse(bad, Path::new("x"))
                .unwrap_err()
                .to_string();
            let field = bad.split(' ').next().unwrap();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn nbd_limits_parse_and_default() {
        let d = DaemonConfig::default();
        assert_eq!(d.nbd_max_connections, 512);
        assert_eq!(d.nbd_handshake_timeout_secs, 10);
        assert_eq!(d.nbd_in_flight_bytes(), 256 << 20);
        let c = DaemonConfig::parse(
            "nbd_max_connections = 4\nnbd_handshake_timeout_secs = 3\nnbd_in_flight_bytes = \"1G\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.nbd_max_connections, 4);
        assert_eq!(c.nbd_handshake_timeout_secs, 3);
        assert_eq!(c.nbd_in_flight_bytes(), 1 << 30);
    }
}
