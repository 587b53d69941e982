//! Running a seed, replaying a trace, and shrinking a failing one.

use std::time::{Duration, Instant};

use crate::workload::Generator;
use crate::world::{Check, SimConfig, Stats, Step, Violation, World};

/// What one run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub replicas: usize,
    pub stats: Stats,
    /// The events run, replayable with [`replay`].
    pub trace: Vec<Step>,
    pub hash: u64,
    pub violation: Option<Violation>,
    /// Readable log (with `SimConfig::verbose`).
    pub log: Vec<String>,
}

/// Run `seed` for about `ops` client requests; the first violation, if any.
pub fn run_seed(seed: u64, ops: u64) -> Result<Stats, Violation> {
    let o = generate(seed, ops, SimConfig::default());
    match o.violation {
        Some(v) => Err(v),
        None => Ok(o.stats),
    }
}

/// Generate and run the workload of `seed`, recording its trace.
pub fn generate(seed: u64, ops: u64, cfg: SimConfig) -> Outcome {
    let blocks = cfg.volume_size / crate::model::BLOCK;
    let mut gen = Generator::new(seed, ops, blocks);
    gen.profile.throttle = cfg.throttle;
    gen.profile.vary_dirty = cfg.vary_dirty;
    let replicas = gen.profile.replicas;
    let mut trace = Vec::new();
    let mut w = match World::new(seed, cfg, replicas) {
        Ok(w) => w,
        Err(v) => return failed_setup(seed, replicas, v),
    };
    let mut after = 0;
    'run: loop {
        while let Some((jitter_us, event)) = gen.next(&w) {
            let step = Step {
                after,
                jitter_us,
                event,
            };
            after = 0;
            trace.push(step.clone());
            if w.apply(&step).is_err() {
                break 'run;
            }
        }
        if gen.done() || w.step().is_err() {
            break;
        }
        after += 1;
    }
    finish(seed, replicas, w, trace)
}

fn failed_setup(seed: u64, replicas: usize, v: Violation) -> Outcome {
    Outcome {
        seed,
        replicas,
        stats: Stats::default(),
        trace: Vec::new(),
        hash: 0,
        violation: Some(v),
        log: Vec::new(),
    }
}

fn finish(seed: u64, replicas: usize, mut w: World, trace: Vec<Step>) -> Outcome {
    let stats = w.finish();
    Outcome {
        seed,
        replicas,
        stats,
        hash: w.trace_hash(),
        violation: w.violation().cloned(),
        log: std::mem::take(&mut w.log),
        trace,
    }
}

/// Run a recorded trace; `final_settle` settles (and checks) once more at the end.
pub fn replay(
    seed: u64,
    replicas: usize,
    trace: &[Step],
    cfg: SimConfig,
    final_settle: bool,
) -> Outcome {
    let mut w = match World::new(seed, cfg, replicas) {
        Ok(w) => w,
        Err(v) => return failed_setup(seed, replicas, v),
    };
    'run: for step in trace {
        for _ in 0..step.after {
            if w.step().is_err() {
                break 'run;
            }
        }
        if w.apply(step).is_err() {
            break;
        }
    }
    if final_settle && w.violation().is_none() {
        let _ = w.settle();
    }
    finish(seed, replicas, w, trace.to_vec())
}

/// Drop events from a failing trace while it still fails the same check
/// (delta debugging), within `budget` of wall time. Returns the shortest found.
pub fn shrink(
    seed: u64,
    replicas: usize,
    trace: &[Step],
    cfg: &SimConfig,
    check: Check,
    budget: Duration,
) -> Vec<Step> {
    let started = Instant::now();
    let fails = |t: &[Step]| {
        replay(seed, replicas, t, cfg.clone(), true)
            .violation
            .is_some_and(|v| v.check == check)
    };
    let mut best = trace.to_vec();
    // Everything after the violation's event is noise.
    if let Some(v) = replay(seed, replicas, &best, cfg.clone(), true).violation {
        let cut = (v.event + 1).min(best.len());
        if fails(&best[..cut]) {
            best.truncate(cut);
        }
    }
    let mut chunk = best.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut i = 0;
        while i < best.len() && started.elapsed() < budget {
            let end = (i + chunk).min(best.len());
            let candidate = without(&best, i, end);
            if fails(&candidate) {
                best = candidate;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    best
}

/// `trace` without steps `[from, to)`; their waits move to the next step so
/// the rest keeps its timing.
fn without(trace: &[Step], from: usize, to: usize) -> Vec<Step> {
    let mut out: Vec<Step> = trace[..from].to_vec();
    let carried: u32 = trace[from..to].iter().map(|s| s.after).sum();
    let mut rest = trace[to..].to_vec();
    if let Some(first) = rest.first_mut() {
        first.after = first.after.saturating_add(carried);
    }
    out.append(&mut rest);
    out
}
