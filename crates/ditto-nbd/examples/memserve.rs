//! Serves one in-memory export over NBD, for trying real clients against the server by hand.
//!
//! Usage: `memserve [ADDR] [NAME] [SIZE_MIB]` (defaults `127.0.0.1:10809 mem 64`).
//! ADDR may be `unix:/path/to.sock`. Logs go to stderr; set RUST_LOG=debug
//! for per-connection logs. Example:
//!
//! ```text
//! cargo run --example memserve -p ditto-nbd -- 127.0.0.1:10809 mem 64 &
//! nbdinfo --map nbd://127.0.0.1:10809/mem
//! ```

use std::sync::Arc;

use ditto_nbd::memory::{MemExport, MemRegistry};
use ditto_nbd::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".to_string());
    let name = args.next().unwrap_or_else(|| "mem".to_string());
    let mib: u64 = match args.next() {
        Some(s) => s.parse().map_err(|e| format!("bad SIZE_MIB {s:?}: {e}"))?,
        None => 64,
    };
    let registry = Arc::new(MemRegistry::new());
    registry.insert(
        &name,
        "in-memory export (memserve)",
        Arc::new(MemExport::new(mib << 20)),
    );
    let server = Server::new(registry, ServerConfig::default());
    let stopper = server.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.shutdown();
        }
    });
    if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        eprintln!("serving {name} ({mib} MiB) on nbd+unix:///{name}?socket={path}");
        server.serve_unix(listener).await?;
    } else {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let local = listener.local_addr()?;
        eprintln!("serving {name} ({mib} MiB) on nbd://{local}/{name}");
        server.serve_tcp(listener).await?;
    }
    Ok(())
}
