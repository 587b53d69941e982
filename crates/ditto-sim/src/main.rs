//! `ditto-sim`: run simulator campaigns, replay and shrink failing seeds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ditto_sim::trace::{format_trace, parse_trace};
use ditto_sim::world::Checks;
use ditto_sim::{generate, replay, shrink, Check, Outcome, SimConfig, Stats};

#[derive(Parser)]
#[command(about = "Deterministic fault simulator for the ditto volume engine")]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the campaign.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Client requests per seed.
    #[arg(long, default_value_t = 2000)]
    ops: u64,
    /// Run this one seed.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print the full trace of events and outcomes.
    #[arg(long)]
    replay: bool,
    /// Replay a trace file (as written for a failing seed).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// The seed a --trace file belongs to.
    #[arg(long, default_value_t = 0)]
    trace_seed: u64,
    /// Shrink failing seeds to a shorter trace.
    #[arg(long)]
    shrink: bool,
    /// Wall-clock budget for shrinking one seed, seconds.
    #[arg(long, default_value_t = 120)]
    shrink_secs: u64,
    /// Checks to turn off (comma-separated: lost-write, bad-read, garbage,
    /// diverged, stale-in-sync, needless-eio, last-leg, liveness, panic).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Starts always use unlimited resync rates (by default they pick
    /// unlimited, fast or slow throttled rates).
    #[arg(long)]
    no_throttle: bool,
    /// Starts always use a zero dirty clear delay and the default hot set
    /// (by default they pick a delay of 0..2 s and sometimes 2..8 regions).
    #[arg(long)]
    no_vary_dirty: bool,
    /// Run without the node's membership log (`VolumeOptions::membership_log`),
    /// to show issue 9 item 7 (a lone stale replica starting).
    #[arg(long)]
    no_membership_log: bool,
    /// The checker's former read rule: a read that returned a write still
    /// in flight settles it, so overlapping reads may not go back.
    #[arg(long)]
    strict_reads: bool,
    /// Majority quorum, each replica its own node: every start is a
    /// takeover at a new epoch by a node without the membership record,
    /// refused on a minority; acknowledged writes must survive it.
    #[arg(long)]
    quorum: bool,
    /// Three nodes on a simulated network (partitions, delay, reordering,
    /// resets, crashes, promotes), the real peer protocol and fencing
    /// between them: acknowledged writes read back at the end, and one
    /// node's writes only per epoch and generation. --ops counts steps.
    #[arg(long)]
    cluster: bool,
    /// With --cluster: two data nodes and a diskless tiebreaker (the third
    /// node holds no replica, only votes).
    #[arg(long)]
    tiebreaker: bool,
    /// Simulated seconds a settle may take before it is a liveness
    /// violation (default 600; 30 when liveness is skipped, so stuck seeds
    /// move on).
    #[arg(long)]
    settle_limit: Option<u64>,
    /// Worker threads (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Stop the campaign at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
    /// Where failing seeds' traces and logs are written.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    out: PathBuf,
}

fn config(args: &Args) -> Result<SimConfig, String> {
    let mut checks = Checks::default();
    for name in &args.skip {
        let c = Check::from_name(name).ok_or_else(|| format!("unknown check {name:?}"))?;
        checks = checks.without(c);
    }
    let settle = args
        .settle_limit
        .unwrap_or(if checks.on(Check::Liveness) { 600 } else { 30 });
    Ok(SimConfig {
        checks,
        settle_limit: Duration::from_secs(settle),
        throttle: !args.no_throttle,
        vary_dirty: !args.no_vary_dirty,
        membership_log: !args.no_membership_log,
        strict_reads: args.strict_reads,
        quorum: args.quorum,
        ..SimConfig::default()
    })
}

fn command_for(args: &Args, seed: u64) -> String {
    let mut cmd = format!("scripts/sim --seed {seed} --ops {} --replay", args.ops);
    for (on, flag) in [
        (args.no_throttle, " --no-throttle"),
        (args.no_vary_dirty, " --no-vary-dirty"),
        (args.no_membership_log, " --no-membership-log"),
        (args.strict_reads, " --strict-reads"),
        (args.quorum, " --quorum"),
    ] {
        if on {
            cmd.push_str(flag);
        }
    }
    if !args.skip.is_empty() {
        cmd.push_str(&format!(" --skip {}", args.skip.join(",")));
    }
    cmd
}

fn print_log(log: &[String], tail: usize) {
    let from = log.len().saturating_sub(tail);
    if from > 0 {
        println!("   ... {from} earlier lines ...");
    }
    for line in &log[from..] {
        println!("{line}");
    }
}

fn report_failure(args: &Args, cfg: &SimConfig, o: &Outcome) {
    let Some(v) = &o.violation else { return };
    println!("\nFAILED seed {}: {v}", o.seed);
    println!("replay: {}", command_for(args, o.seed));
    let verbose = SimConfig {
        verbose: true,
        ..cfg.clone()
    };
    let mut trace = o.trace.clone();
    if args.shrink {
        let budget = Duration::from_secs(args.shrink_secs);
        let t = Instant::now();
        trace = shrink(o.seed, o.replicas, &trace, cfg, v.check, budget);
        println!(
            "shrunk {} events to {} in {:.1}s",
            o.trace.len(),
            trace.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let again = replay(o.seed, o.replicas, &trace, verbose, true);
    let name = format!("ditto-sim-seed-{}", o.seed);
    let trace_path = args.out.join(format!("{name}.trace"));
    let log_path = args.out.join(format!("{name}.log"));
    let text = format!(
        "# seed {} ({})\nreplicas {}\n{}",
        o.seed,
        v,
        o.replicas,
        format_trace(&trace)
    );
    if let Err(e) = std::fs::write(&trace_path, text) {
        println!("(could not write {}: {e})", trace_path.display());
    }
    if let Err(e) = std::fs::write(&log_path, again.log.join("\n")) {
        println!("(could not write {}: {e})", log_path.display());
    }
    println!(
        "trace of events (last lines; full log in {}):",
        log_path.display()
    );
    print_log(&again.log, if args.shrink { 400 } else { 80 });
    match &again.violation {
        Some(v2) => println!("replayed: {v2}"),
        None => println!(
            "replayed trace did not fail (it is the {} one)",
            if args.shrink { "shrunk" } else { "recorded" }
        ),
    }
    println!(
        "replay the trace: cargo run --release -p ditto-sim -- --trace {} --trace-seed {}",
        trace_path.display(),
        o.seed
    );
}

fn run() -> Result<bool, String> {
    let args = Args::parse();
    if args.cluster {
        return Ok(cluster_campaign(&args));
    }
    let cfg = config(&args)?;
    if let Some(path) = &args.trace {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (replicas, steps) = parse_trace(&text)?;
        let verbose = SimConfig {
            verbose: true,
            ..cfg
        };
        let o = replay(args.trace_seed, replicas, &steps, verbose, true);
        print_log(&o.log, usize::MAX);
        return Ok(match o.violation {
            Some(v) => {
                println!("FAILED: {v}");
                false
            }
            None => {
                println!(
                    "passed: {} events, {} requests",
                    o.stats.events, o.stats.ops
                );
                true
            }
        });
    }
    if let Some(seed) = args.seed {
        let run_cfg = SimConfig {
            verbose: args.replay,
            ..cfg.clone()
        };
        let t = Instant::now();
        let o = generate_with(seed, &args, run_cfg);
        if args.replay {
            print_log(&o.log, usize::MAX);
        }
        println!(
            "seed {seed}: {} requests, {} events, {:.1}s simulated, {:.2}s wall, trace hash {:016x}",
            o.stats.ops,
            o.stats.events,
            o.stats.sim_nanos as f64 / 1e9,
            t.elapsed().as_secs_f64(),
            o.hash
        );
        if o.violation.is_some() {
            if args.replay {
                println!(
                    "FAILED: {}",
                    o.violation
                        .as_ref()
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                );
            } else {
                report_failure(&args, &cfg, &o);
            }
            return Ok(false);
        }
        println!("passed");
        return Ok(true);
    }
    campaign(&args, &cfg)
}

fn generate_with(seed: u64, args: &Args, cfg: SimConfig) -> Outcome {
    generate(seed, args.ops, cfg)
}

fn campaign(args: &Args, cfg: &SimConfig) -> Result<bool, String> {
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let next = Arc::new(AtomicU64::new(args.start));
    let end = args.start + args.seeds;
    let totals = Arc::new(Mutex::new((Stats::default(), Vec::<Outcome>::new(), 0u64)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (next, totals, stop) = (next.clone(), totals.clone(), stop.clone());
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let o = generate_with(seed, args, cfg.clone());
                let mut g = match totals.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                g.0.add(&o.stats);
                g.2 += 1;
                if let Some(v) = &o.violation {
                    println!("seed {seed}: {v}");
                    if args.fail_fast {
                        stop.store(true, Ordering::Relaxed);
                    }
                    g.1.push(o);
                }
                if g.2 % 100 == 0 {
                    let secs = t.elapsed().as_secs_f64();
                    println!(
                        "{} seeds, {} requests, {:.0} requests/s, {} failing",
                        g.2,
                        g.0.ops,
                        g.0.ops as f64 / secs,
                        g.1.len()
                    );
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let (stats, mut failures, seeds) = match Arc::try_unwrap(totals) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => return Err("campaign threads still hold the totals".into()),
    };
    failures.sort_by_key(|o| o.seed);
    println!(
        "\ncampaign: seeds {}..{} ({seeds} run), {} client requests + {} events, {:.1}s wall, {:.0} requests/s ({:.0} incl. events), {:.0}s simulated",
        args.start,
        args.start + seeds,
        stats.ops,
        stats.events,
        secs,
        stats.ops as f64 / secs,
        (stats.ops + stats.events) as f64 / secs,
        stats.sim_nanos as f64 / 1e9
    );
    println!(
        "  reads {}, writes {}, flushes {}, I/O errors {}, crashes {}, starts {} ({} refused: {} stale-only, {} split brain; {} forced or resolved), settles {}, replica checks {}, late landings {}",
        stats.reads,
        stats.writes,
        stats.flushes,
        stats.io_errors,
        stats.crashes,
        stats.starts,
        stats.start_refusals,
        stats.stale_refusals,
        stats.split_brain_refusals,
        stats.forced,
        stats.settles,
        stats.replica_checks,
        stats.late_landed
    );
    println!("  violations: {}", failures.len());
    let mut by_check: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for o in &failures {
        if let Some(v) = &o.violation {
            by_check.entry(v.check.name()).or_default().push(o.seed);
        }
    }
    for (check, seeds) in &by_check {
        let shown: Vec<String> = seeds.iter().take(12).map(|s| s.to_string()).collect();
        println!(
            "    {check}: {} seeds ({}{})",
            seeds.len(),
            shown.join(", "),
            if seeds.len() > 12 { ", ..." } else { "" }
        );
    }
    if let Some(first) = failures.first() {
        report_failure(args, cfg, first);
    }
    Ok(failures.is_empty())
}

/// `--cluster`: seeds of the multi-node simulation, or one with its log.
fn cluster_campaign(args: &Args) -> bool {
    use ditto_sim::cluster::{run_cluster_seed, ClusterConfig, ClusterStats};
    if let Some(seed) = args.seed {
        let cfg = ClusterConfig {
            verbose: args.replay,
            tiebreaker: args.tiebreaker,
            ..ClusterConfig::default()
        };
        let t = Instant::now();
        let (r, stats, log) = run_cluster_seed(seed, args.ops, cfg);
        if args.replay {
            print_log(&log, usize::MAX);
        }
        println!(
            "seed {seed}: {stats:?}, {:.2}s wall",
            t.elapsed().as_secs_f64()
        );
        return match r {
            Ok(()) => {
                println!("passed");
                true
            }
            Err(v) => {
                println!(
                    "FAILED: {v}\nreplay: scripts/sim --cluster{} --seed {seed} --ops {} --replay",
                    if args.tiebreaker { " --tiebreaker" } else { "" },
                    args.ops
                );
                false
            }
        };
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let next = AtomicU64::new(args.start);
    let end = args.start + args.seeds;
    let totals = Mutex::new((ClusterStats::default(), Vec::<(u64, String)>::new(), 0u64));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let cfg = ClusterConfig {
                    tiebreaker: args.tiebreaker,
                    ..ClusterConfig::default()
                };
                let (r, stats, _) = run_cluster_seed(seed, args.ops, cfg);
                let mut g = totals.lock().unwrap_or_else(|p| p.into_inner());
                g.0.add(&stats);
                g.2 += 1;
                if let Err(v) = r {
                    println!("seed {seed}: {v}");
                    g.1.push((seed, v.to_string()));
                }
                if g.2 % 50 == 0 {
                    println!(
                        "{} seeds, {} writes, {} failing, {:.0}s",
                        g.2,
                        g.0.writes,
                        g.1.len(),
                        t.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    let (stats, mut failures, seeds) = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort();
    let stuck = failures
        .iter()
        .filter(|(_, v)| v.starts_with("Liveness"))
        .count();
    println!(
        "\ncluster campaign: seeds {}..{} ({seeds} run), {} steps each, {:.1}s wall",
        args.start,
        args.start + seeds,
        args.ops,
        t.elapsed().as_secs_f64()
    );
    println!(
        "  writes {} ({} acknowledged), flushes {}, promotes {} ({} took effect), primaries {}, crashes {}, partitions {}, resets {}",
        stats.writes, stats.acked, stats.flushes, stats.promotes, stats.promoted, stats.primaries_seen, stats.crashes, stats.partitions, stats.resets
    );
    println!(
        "  safety violations: {}; stuck (no single primary with all replicas in sync after healing, not read back): {stuck} of {seeds}",
        failures.len() - stuck
    );
    let first = failures
        .iter()
        .find(|(_, v)| !v.starts_with("Liveness"))
        .or(failures.first());
    if let Some((seed, v)) = first {
        println!(
            "first: seed {seed}: {v}\nreplay: scripts/sim --cluster{} --seed {seed} --ops {} --replay",
            if args.tiebreaker { " --tiebreaker" } else { "" },
            args.ops
        );
    }
    failures.len() == stuck
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
