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
    /// Disk I/O engine: "threadpool" (portable) or "io_uring".
    pub io_engine: String,
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
            io_engine: "threadpool".into(),
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
        if self.io_timeout_secs == 0 || self.io_timeout_secs > 3600 {
            return Err(ControlError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "io_timeout_secs = {} must be between 1 and 3600",
                    self.io_timeout_secs
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
        Ok(())
    }
}

/// The disk I/O engines a config may name.
pub const IO_ENGINES: &[&str] = &["threadpool", "io_uring"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let c =
            DaemonConfig::parse("nbd_listen = \"127.0.0.2:9000\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.nbd_listen.port(), 9000);
        assert_eq!(c.api_listen.port(), 10810);
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
    fn bad_values_are_refused() {
        assert!(DaemonConfig::parse("nbd_listen = \"nope\"", Path::new("x")).is_err());
        assert!(DaemonConfig::parse("io_timeout_secs = 0", Path::new("x")).is_err());
    }
}
