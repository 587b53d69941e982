//! A bounded random campaign (part of the test suite) and the replay guarantees.
//!
//! `DITTO_SIM_SEEDS` / `DITTO_SIM_OPS` scale the campaign (defaults keep the
//! suite around one to two minutes on 2 cores in a debug build).
//!
//! Starts pick throttled resync rates, dirty clear delays of 0..2 s and
//! sometimes a hot set of 2..8 regions (the defaults), and the node keeps its
//! membership log: all of it replays exactly now that the engine measures
//! intervals on tokio's clock.

use ditto_sim::world::Rate;
use ditto_sim::{generate, replay, Event, SimConfig, Step};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn campaign(part: u64, parts: u64) {
    let seeds = env("DITTO_SIM_SEEDS", 48);
    let ops = env("DITTO_SIM_OPS", 800);
    let mut failures = Vec::new();
    let mut total = 0;
    let (mut throttled, mut delayed, mut hot) = (0, 0, 0);
    for seed in (0..seeds).filter(|s| s % parts == part) {
        let o = generate(seed, ops, SimConfig::default());
        total += o.stats.ops;
        for s in &o.trace {
            if let Event::Start {
                rate,
                clear_ms,
                hot: h,
                ..
            } = s.event
            {
                throttled += u64::from(rate != Rate::Unlimited);
                delayed += u64::from(clear_ms > 0);
                hot += u64::from(h > 0);
            }
        }
        if let Some(v) = o.violation {
            failures.push(format!(
                "seed {seed}: {v}\n  replay: scripts/sim --seed {seed} --ops {ops} --replay"
            ));
        }
    }
    println!(
        "{total} client requests; starts throttled {throttled}, with a clear delay {delayed}, with a small hot set {hot}"
    );
    assert!(
        throttled > 0 && delayed > 0 && hot > 0,
        "the campaign lost its variety"
    );
    assert!(
        failures.is_empty(),
        "{} of the seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn campaign_even_seeds() {
    campaign(0, 2);
}

#[test]
fn campaign_odd_seeds() {
    campaign(1, 2);
}

fn starts(trace: &[Step]) -> (bool, bool) {
    let mut throttled = false;
    let mut delayed = false;
    for s in trace {
        if let Event::Start { rate, clear_ms, .. } = s.event {
            throttled |= rate != Rate::Unlimited;
            delayed |= clear_ms > 0;
        }
    }
    (throttled, delayed)
}

#[test]
fn one_seed_replays_exactly() {
    let cfg = SimConfig::default;
    let mut seen = (false, false);
    for seed in [3, 11, 20] {
        let a = generate(seed, 400, cfg());
        let b = generate(seed, 400, cfg());
        assert_eq!(a.trace, b.trace, "seed {seed}: the workload differs");
        assert_eq!(a.hash, b.hash, "seed {seed}: the run differs");
        let (t, d) = starts(&a.trace);
        seen = (seen.0 | t, seen.1 | d);
        // Logging changes nothing.
        let verbose = SimConfig {
            verbose: true,
            ..cfg()
        };
        assert_eq!(generate(seed, 400, verbose).hash, a.hash);
        // The recorded trace is the run.
        let r = replay(seed, a.replicas, &a.trace, cfg(), false);
        assert_eq!(r.hash, a.hash, "seed {seed}: its trace replays differently");
    }
    assert!(
        seen.0 && seen.1,
        "no throttled start or no clear delay among the seeds replayed: {seen:?}"
    );
}

/// The same with majority quorum, each replica on its own node and every
/// start a takeover at a new epoch (`ditto-sim --quorum`): acknowledged
/// writes survive any majority taking over, and no minority starts.
#[test]
fn quorum_campaign() {
    let seeds = env("DITTO_SIM_SEEDS", 48) / 2;
    let ops = env("DITTO_SIM_OPS", 800);
    let cfg = || SimConfig {
        quorum: true,
        ..SimConfig::default()
    };
    let mut failures = Vec::new();
    let mut refused = 0;
    for seed in 0..seeds {
        let o = generate(seed, ops, cfg());
        refused += o.stats.start_refusals;
        if let Some(v) = o.violation {
            failures.push(format!(
                "seed {seed}: {v}\n  replay: scripts/sim --seed {seed} --ops {ops} --replay --quorum"
            ));
        }
    }
    println!("{seeds} quorum seeds, {refused} starts refused");
    assert!(
        failures.is_empty(),
        "{} of the seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
