//! `ditto`: the node daemon and the command-line interface in one binary.

mod api;
mod cli;
mod daemon;
mod quickstart;

use ditto_node::{api_types, events, node, peers};

use anyhow::Result;
use clap::{Parser, Subcommand};
use ditto_control::config::DEFAULT_API_LISTEN;
use ditto_control::DaemonConfig;

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
    /// Manage the replicas of a volume.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Make the certificates nodes authenticate each other with (mutual TLS).
    #[command(subcommand)]
    Cert(CertCommand),
    /// The other nodes this node knows.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show volumes, their replicas and clients, and pools.
    Status {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Show what happened: replica failures, degraded starts, resyncs, scrubs (oldest first).
    Events {
        /// Keep waiting for new events and print each as it comes (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Only events of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only events after this sequence number (the SEQ column).
        #[arg(long)]
        since: Option<u64>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Each node this node knows (config `[nodes]` and `node add`), tried now: connected, round trip, protocol version.
    List,
    /// Add a node: it must answer at ADDRESS (its peer_listen) under NAME.
    /// Run it on both nodes: each lets in only the nodes it knows.
    Add {
        name: String,
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
    },
    /// Forget a node added with `node add` (one that holds none of this node's replicas).
    Remove { name: String },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create the cluster CA (ca.pem, ca.key) in DIR. Keep ca.key off the nodes.
    Ca {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
    /// Create a node's certificate (node.pem, node.key) in DIR, signed by the CA in --ca.
    Node {
        /// The node's name (lowercase letters, digits, '-'): its certificate's DNS name.
        name: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: std::path::PathBuf,
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Another name or IP address the node is reached at (repeatable),
        /// e.g. the address NBD clients connect to.
        #[arg(long, value_name = "HOST")]
        san: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create a pool: a directory, a block device or a remote NBD export.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["path", "device", "nbd"])))]
    Create {
        name: String,
        /// An existing, writable directory (usually the mount point of one disk).
        #[arg(long)]
        path: Option<String>,
        /// A block device or partition (holds one replica), e.g. /dev/sdb2.
        #[arg(long)]
        device: Option<String>,
        /// A remote NBD export (holds one replica), e.g. nbd://host/export.
        #[arg(long)]
        nbd: Option<String>,
    },
    /// List pools with their free space.
    List,
    /// Delete an empty pool (its directory is left alone).
    Delete { name: String },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Make this node the volume's primary: the current primary hands it
    /// over (only when this node's replica is in sync) and this node serves it.
    Promote {
        name: String,
        /// Without the current primary, which does not answer: the
        /// operator's override (writes it acknowledged after its last
        /// contact with this node may be lost). Not needed with quorum.
        #[arg(long)]
        force: bool,
    },
    /// On the primary: hand the volume over to node TO (a planned
    /// switch-over; TO's replica must be in sync, no client connected).
    Demote {
        name: String,
        #[arg(long, value_name = "NODE")]
        to: String,
    },
    /// Create a mirrored volume.
    Create {
        name: String,
        /// Size, e.g. 64M, 10G, 1TiB or a byte count.
        #[arg(long)]
        size: String,
        /// Number of replicas, each on its own pool [default: 2].
        #[arg(long, conflicts_with_all = ["pool", "nodes"])]
        replicas: Option<usize>,
        /// Put a replica on this pool (repeat for each replica); NODE:POOL
        /// for a pool on another node (a known node, `ditto node list`).
        #[arg(long, visible_alias = "replica")]
        pool: Vec<String>,
        /// One replica on each of these nodes (this node's name included to
        /// keep one here), each in the pool with the most room there.
        #[arg(long, value_delimiter = ',', conflicts_with = "pool")]
        nodes: Vec<String>,
        /// Dirty-map region size (power of two, 4K..1G) [default: 1M].
        #[arg(long)]
        region_size: Option<String>,
        /// A third node without a replica that only votes in the volume's
        /// majority quorum (DRBD's diskless tiebreaker): two data nodes
        /// and a tiebreaker survive the loss of any one of them.
        #[arg(long)]
        tiebreaker: Option<String>,
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
    /// Start a stopped volume (e.g. one refused at boot for a missing replica).
    Start {
        name: String,
        /// Start even if replicas are missing (wins over the config).
        #[arg(long, conflicts_with = "no_degraded")]
        degraded: bool,
        /// Never start with replicas missing (wins over the config).
        #[arg(long)]
        no_degraded: bool,
        /// Start even if the only replicas present are stale (failed out
        /// earlier, by this node's record): the writes they missed are lost.
        #[arg(long)]
        force_stale: bool,
    },
    /// Stop serving a volume and close its replicas cleanly.
    Stop {
        name: String,
        /// Disconnect connected clients first.
        #[arg(long)]
        force: bool,
    },
    /// Compare the replicas region by region; --repair rewrites mismatches.
    Scrub {
        name: String,
        #[arg(long)]
        repair: bool,
        /// Replica whose data wins in a repair (id prefix or pool) [default: the first in sync].
        #[arg(long, requires = "repair")]
        source: Option<String>,
        /// Wait for the scrub to finish, showing progress.
        #[arg(long)]
        wait: bool,
    },
    /// End a split brain: keep one replica, rebuild the others from it.
    Resolve {
        name: String,
        /// The replica to keep (id prefix or pool).
        #[arg(long)]
        keep: String,
    },
    /// Wait, with a progress bar, until the volume is fully redundant and no job runs.
    Wait {
        name: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Add a replica on a pool; it is rebuilt while the volume serves.
    Add {
        volume: String,
        #[arg(long)]
        pool: String,
    },
    /// Bring back a failed, stale or missing replica (copies only what it missed when it can).
    Readd { volume: String, replica: String },
    /// Take a replica out of the volume on purpose (maintenance).
    Fail { volume: String, replica: String },
    /// Remove a replica from the volume (its file is kept, renamed .removed).
    Remove { volume: String, replica: String },
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
        Command::Daemon(args) => {
            let (cfg, data_dir) = daemon::resolve_config(&args, None)?;
            tokio_main(cfg.runtime_threads(), daemon::run(args, cfg, data_dir))
        }
        Command::Node(NodeCommand::List) => cli::node_list(&client(), cli.json),
        Command::Node(NodeCommand::Add { name, address }) => {
            cli::node_add(&client(), name, address, cli.json)
        }
        Command::Node(NodeCommand::Remove { name }) => cli::node_remove(&client(), &name, cli.json),
        Command::Cert(CertCommand::Ca { out }) => {
            ditto_peer::tls::create_ca(&out)?;
            println!(
                "created the cluster CA: {} and {} (keep the key off the nodes; it signs node certificates)",
                out.join(ditto_peer::tls::CA_CERT).display(),
                out.join(ditto_peer::tls::CA_KEY).display()
            );
            Ok(())
        }
        Command::Cert(CertCommand::Node {
            name,
            ca,
            out,
            days,
            san,
        }) => {
            ditto_peer::tls::create_node_cert(&name, &san, &ca, &out, -1, i64::from(days))?;
            println!(
                "created the certificate of node {name}: {} and {}, valid {days} days; copy them and {} to that node",
                out.join(ditto_peer::tls::NODE_CERT).display(),
                out.join(ditto_peer::tls::NODE_KEY).display(),
                ca.join(ditto_peer::tls::CA_CERT).display()
            );
            Ok(())
        }
        Command::Quickstart(args) => tokio_main(
            DaemonConfig::default().runtime_threads(),
            quickstart::run(args),
        ),
        Command::Pool(PoolCommand::Create {
            name,
            path,
            device,
            nbd,
        }) => cli::pool_create(
            &client(),
            name,
            cli::PoolSource { path, device, nbd },
            cli.json,
        ),
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
            nodes,
            region_size,
            tiebreaker,
        }) => cli::volume_create(
            &client(),
            api_types::CreateVolume {
                name,
                size: api_types::SizeInput::Text(size),
                replicas,
                pools: pool,
                nodes,
                region_size,
                tiebreaker,
            },
            cli.json,
        ),
        Command::Volume(VolumeCommand::List) => cli::volume_list(&client(), cli.json),
        Command::Volume(VolumeCommand::Demote { name, to }) => {
            check_name("volume", &name)?;
            cli::volume_demote(&client(), &name, to, cli.json)
        }
        Command::Volume(VolumeCommand::Promote { name, force }) => {
            check_name("volume", &name)?;
            cli::volume_promote(&client(), &name, force, cli.json)
        }
        Command::Volume(VolumeCommand::Delete { name, force }) => {
            check_name("volume", &name)?;
            cli::volume_delete(&client(), &name, force, cli.json)
        }
        Command::Volume(VolumeCommand::Start {
            name,
            degraded,
            no_degraded,
            force_stale,
        }) => {
            check_name("volume", &name)?;
            let degraded = if degraded {
                Some(true)
            } else if no_degraded {
                Some(false)
            } else {
                None
            };
            cli::volume_start(&client(), &name, degraded, force_stale, cli.json)
        }
        Command::Volume(VolumeCommand::Stop { name, force }) => {
            check_name("volume", &name)?;
            cli::volume_stop(&client(), &name, force, cli.json)
        }
        Command::Volume(VolumeCommand::Scrub {
            name,
            repair,
            source,
            wait,
        }) => {
            check_name("volume", &name)?;
            cli::volume_scrub(&client(), &name, repair, source, wait, cli.json)
        }
        Command::Volume(VolumeCommand::Resolve { name, keep }) => {
            check_name("volume", &name)?;
            cli::volume_resolve(&client(), &name, &keep, cli.json)
        }
        Command::Volume(VolumeCommand::Wait { name, timeout }) => {
            check_name("volume", &name)?;
            cli::volume_wait(&client(), &name, timeout, cli.json)
        }
        Command::Replica(cmd) => {
            let (volume, action) = match &cmd {
                ReplicaCommand::Add { volume, pool } => {
                    (volume, cli::ReplicaAction::Add(pool.clone()))
                }
                ReplicaCommand::Readd { volume, replica } => {
                    (volume, cli::ReplicaAction::Readd(replica.clone()))
                }
                ReplicaCommand::Fail { volume, replica } => {
                    (volume, cli::ReplicaAction::Fail(replica.clone()))
                }
                ReplicaCommand::Remove { volume, replica } => {
                    (volume, cli::ReplicaAction::Remove(replica.clone()))
                }
            };
            check_name("volume", volume)?;
            cli::replica(&client(), volume, action, cli.json)
        }
        Command::Status { volume } => {
            if let Some(v) = &volume {
                check_name("volume", v)?;
            }
            cli::status(&client(), volume.as_deref(), cli.json)
        }
        Command::Events {
            follow,
            volume,
            since,
        } => {
            if let Some(v) = &volume {
                check_name("volume", v)?;
            }
            cli::events(&client(), follow, volume.as_deref(), since, cli.json)
        }
    }
}

fn tokio_main(
    worker_threads: usize,
    fut: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()?;
    rt.block_on(fut)
}

/// `--api` is the client's flag (where the daemon to talk to is). Given to
/// `ditto daemon` or `ditto quickstart` it would be ignored, and the daemon
/// would listen elsewhere than the user asked: refuse it, naming the flag
/// that does it. Only a command-line `--api` counts: `DITTO_API` in the
/// environment is for the clients and is left alone.
fn refuse_api_on_daemon(matches: &clap::ArgMatches) -> Result<(), String> {
    use clap::parser::ValueSource;
    let Some((sub @ ("daemon" | "quickstart"), sub_matches)) = matches.subcommand() else {
        return Ok(());
    };
    let given = |m: &clap::ArgMatches| m.value_source("api") == Some(ValueSource::CommandLine);
    if !given(matches) && !given(sub_matches) {
        return Ok(());
    }
    let addr = sub_matches
        .get_one::<String>("api")
        .or_else(|| matches.get_one::<String>("api"))
        .map_or("ADDR", String::as_str);
    Err(format!(
        "`ditto {sub} --api` is the address a client uses to reach a daemon; \
         the {sub} listens where --api-listen says: run `ditto {sub} --api-listen {addr}` \
         (or set api_listen in the config file)"
    ))
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    if let Err(why) = refuse_api_on_daemon(&matches) {
        eprintln!("error: {why}");
        std::process::exit(2);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
