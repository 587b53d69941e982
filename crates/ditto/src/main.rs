//! `ditto`: the node daemon and the command-line interface in one binary.

mod api;
mod api_types;
mod cli;
mod daemon;
mod export;
mod node;
mod quickstart;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ditto_control::config::DEFAULT_API_LISTEN;

#[derive(Parser)]
#[command(
    name = "ditto",
    version,
    about = "Keeps block volumes alive when disks and machines die",
    propagate_version = true
)]
struct Cli {
    /// Address of the daemon's API (host:port).
    #[arg(long, global = true, env = "DITTO_API", default_value = DEFAULT_API_LISTEN)]
    api: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node in the foreground.
    Daemon(daemon::DaemonArgs),
    /// Start a node with two pools and a mirrored 1 GiB volume `demo`, and serve it until Ctrl-C.
    Quickstart(quickstart::QuickstartArgs),
    /// Manage pools (places where replicas live, one per disk).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show volumes, their replicas and clients, and pools.
    Status {
        /// Only this volume.
        volume: Option<String>,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create a directory pool.
    Create {
        name: String,
        /// An existing, writable directory (usually the mount point of one disk).
        #[arg(long)]
        path: String,
    },
    /// List pools with their free space.
    List,
    /// Delete an empty pool (its directory is left alone).
    Delete { name: String },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a mirrored volume.
    Create {
        name: String,
        /// Size, e.g. 64M, 10G, 1TiB or a byte count.
        #[arg(long)]
        size: String,
        /// Number of replicas, each on its own pool [default: 2].
        #[arg(long, conflicts_with = "pool")]
        replicas: Option<usize>,
        /// Put a replica on this pool (repeat for each replica).
        #[arg(long)]
        pool: Vec<String>,
    },
    /// List volumes.
    List,
    /// Delete a volume and its replica files.
    Delete {
        name: String,
        /// Disconnect connected clients first.
        #[arg(long)]
        force: bool,
    },
}

pub fn init_logging(filter: &str) {
    let filter = std::env::var("DITTO_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn check_name(kind: &'static str, name: &str) -> Result<()> {
    ditto_control::validate::name(kind, name)?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let client = || cli::Client::new(&cli.api);
    match cli.command {
        Command::Daemon(args) => tokio_main(daemon::run(args)),
        Command::Quickstart(args) => tokio_main(quickstart::run(args)),
        Command::Pool(PoolCommand::Create { name, path }) => {
            cli::pool_create(&client(), name, path, cli.json)
        }
        Command::Pool(PoolCommand::List) => cli::pool_list(&client(), cli.json),
        Command::Pool(PoolCommand::Delete { name }) => {
            check_name("pool", &name)?;
            cli::pool_delete(&client(), &name, cli.json)
        }
        Command::Volume(VolumeCommand::Create {
            name,
            size,
            replicas,
            pool,
        }) => cli::volume_create(&client(), name, size, replicas, pool, cli.json),
        Command::Volume(VolumeCommand::List) => cli::volume_list(&client(), cli.json),
        Command::Volume(VolumeCommand::Delete { name, force }) => {
            check_name("volume", &name)?;
            cli::volume_delete(&client(), &name, force, cli.json)
        }
        Command::Status { volume } => {
            if let Some(v) = &volume {
                check_name("volume", v)?;
            }
            cli::status(&client(), volume.as_deref(), cli.json)
        }
    }
}

fn tokio_main(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fut)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
