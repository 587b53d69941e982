//! `ditto quickstart`: a node with two directory pools and a mirrored volume `demo`, in one command.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ditto_control::ControlError;

use crate::api_types::{CreatePool, CreateVolume, SizeInput};
use crate::daemon::{self, DaemonArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Data directory; pools are created inside it [default: ./ditto-data].
    #[arg(long, default_value = "ditto-data")]
    pub data_dir: PathBuf,
    /// NBD listen address [default: 127.0.0.1:10809].
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// REST API listen address [default: 127.0.0.1:10810].
    #[arg(long)]
    pub api_listen: Option<SocketAddr>,
}

const VOLUME: &str = "demo";

pub async fn run(args: QuickstartArgs) -> Result<()> {
    crate::init_logging("info");
    let daemon_args = DaemonArgs {
        data_dir: Some(args.data_dir.clone()),
        nbd_listen: args.nbd_listen,
        api_listen: args.api_listen,
        ..DaemonArgs::default()
    };
    let (cfg, data_dir) = daemon::resolve_config(&daemon_args, None)?;
    let running = daemon::start(&cfg, &data_dir, None).await?;
    let node = running.node.clone();
    let data_dir = node.data_dir.clone();
    // Two pools standing in for two disks: on a real machine each would be the
    // mount point of its own disk.
    for name in ["pool-a", "pool-b"] {
        let path = data_dir.join("pools").join(name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        match node
            .create_pool(CreatePool {
                name: name.into(),
                path: Some(path.display().to_string()),
                device: None,
                nbd: None,
            })
            .await
        {
            Ok(_) => println!("created pool {name} at {}", path.display()),
            Err(ControlError::PoolExists(_)) => println!("reusing pool {name}"),
            Err(e) => return Err(e.into()),
        }
    }
    let create = CreateVolume {
        name: VOLUME.into(),
        size: SizeInput::Text("1G".into()),
        replicas: None,
        pools: vec!["pool-a".into(), "pool-b".into()],
        nodes: Vec::new(),
        region_size: None,
        tiebreaker: None,
    };
    match node.create_volume(create).await {
        Ok(_) => println!("created volume {VOLUME} (1 GiB, mirrored on pool-a and pool-b)"),
        Err(ControlError::VolumeExists(_)) => println!("reusing volume {VOLUME}"),
        Err(e) => return Err(e.into()),
    }
    println!();
    print!("{}", crate::cli::render_status(&node.status(None)?));
    let uri = format!("nbd://{}/{VOLUME}", running.addresses.nbd);
    println!("Serving {uri}  (API on {})", running.addresses.api);
    println!("Try:   nbdinfo {uri}     or   qemu-img info {uri}");
    println!("CLI:   DITTO_API={} ditto status", running.addresses.api);
    println!("Press Ctrl-C to stop.");
    daemon::wait_for_signal().await;
    running.stop().await;
    Ok(())
}
