//! One scripted simulator scenario per engine-level sequence of issue 9,
//! section 1: each drives the sequence's exact order of events and asserts
//! that the checker passes and the sequence's own outcome holds.

use std::time::Duration;

use ditto_engine::ReplicaState;
use ditto_sim::disk::{CrashMode, FaultKind, FaultRule, OpKind};
use ditto_sim::model::BLOCK;
use ditto_sim::world::{Rate, Refusal, World};
use ditto_sim::{Event, SimConfig, Violation};

const MINUTE: Duration = Duration::from_secs(60);

fn scenario_cfg() -> SimConfig {
    SimConfig {
        verbose: true,
        ..SimConfig::default()
    }
}

fn world(replicas: usize) -> World {
    let mut w = World::new(9, scenario_cfg(), replicas).expect("world");
    start(&mut w, 0);
    w
}

fn start(w: &mut World, absent: u32) {
    let r = w.run(Event::start(absent));
    let r = chk(w, r);
    assert!(r.is_ok(), "start failed: {r:?}");
}

/// Fail the test with the violation and the end of the log.
fn chk<T>(w: &World, r: Result<T, Violation>) -> T {
    match r {
        Ok(v) => v,
        Err(v) => {
            let from = w.log.len().saturating_sub(80);
            panic!("{v}\n--- log tail ---\n{}", w.log[from..].join("\n"));
        }
    }
}

fn run(w: &mut World, e: Event) -> Result<String, String> {
    let r = w.run(e);
    chk(w, r)
}

fn go(w: &mut World, e: Event) -> Option<u64> {
    let r = w.go(e);
    chk(w, r)
}

fn wait(w: &mut World, id: Option<u64>) -> Result<String, String> {
    let Some(id) = id else {
        return Ok(String::new());
    };
    let r = w.wait(id, MINUTE);
    chk(w, r)
}

fn sleep(w: &mut World, ms: u64) {
    let r = w.sleep(ms);
    chk(w, r)
}

fn settle(w: &mut World) {
    let r = w.settle();
    chk(w, r)
}

fn write(w: &mut World, block: u32, fua: bool) -> Result<String, String> {
    run(w, Event::Write { block, n: 1, fua })
}

fn read(w: &mut World, block: u32, n: u16) -> Result<String, String> {
    run(w, Event::Read { block, n })
}

/// Settle, read everything back, settle: the checker must stay quiet.
fn verify(w: &mut World) {
    settle(w);
    go(w, Event::Verify);
    settle(w);
}

/// Byte range on a replica's disk of client blocks `[first, first+n)`.
fn blocks(w: &World, first: u64, n: u64) -> std::ops::Range<u64> {
    let d = w.layout().data_offset;
    d + first * BLOCK..d + (first + n) * BLOCK
}

fn fault(slot: u8, ops: &[OpKind], range: Option<std::ops::Range<u64>>, kind: FaultKind) -> Event {
    Event::Fault {
        slot,
        rule: FaultRule {
            ops: ops.to_vec(),
            range,
            kind,
            count: Some(1),
            per_mille: 1000,
        },
    }
}

fn hang(ms: u64) -> FaultKind {
    FaultKind::Hang(Duration::from_millis(ms))
}

/// With DITTO_SIM_DUMP set, write the scenario's log to the temp dir.
fn dump(w: &World, name: &str) {
    if std::env::var_os("DITTO_SIM_DUMP").is_some() {
        let path = std::env::temp_dir().join(format!("ditto-sim-{name}.log"));
        let _ = std::fs::write(&path, w.log.join("\n"));
    }
}

fn state(w: &World, slot: usize) -> Option<ReplicaState> {
    w.state_of(slot)
}

fn assert_state(w: &World, slot: usize, want: ReplicaState) {
    let got = w.state_of(slot);
    if got != Some(want) {
        let path =
            std::env::temp_dir().join(format!("ditto-sim-scenario-{}.log", w.now().as_nanos()));
        let _ = std::fs::write(&path, w.log.join("\n"));
        println!("full log in {}", path.display());
        let from = w.log.len().saturating_sub(60);
        panic!(
            "replica {slot} is {got:?}, expected {want:?}\n--- log tail ---\n{}",
            w.log[from..].join("\n")
        );
    }
}

/// One block written in each of the first `regions` regions (64 KiB = 16 blocks each).
fn fill_regions(w: &mut World, regions: u32) {
    for r in 0..regions {
        let res = write(w, r * 16, false);
        assert!(res.is_ok(), "{res:?}");
    }
    assert!(run(w, Event::Flush).is_ok());
}

fn job_done_bytes(w: &World) -> (u64, u64, bool) {
    w.job()
        .map_or((0, 0, true), |j| (j.done_bytes, j.total_bytes, j.finished))
}

#[test]
fn seq01_readd_after_interrupted_rebuild() {
    let mut w = world(2);
    fill_regions(&mut w, 96);
    settle(&mut w);
    assert!(run(&mut w, Event::Add).is_ok());
    // A slow new disk, so the rebuild can be caught halfway.
    w.slots[2].disk.set_latency(2000, 3000);
    let partway = w.until(MINUTE, |w| {
        let (done, total, finished) = job_done_bytes(w);
        done > 0 && done < total / 2 && !finished
    });
    assert!(chk(&w, partway), "rebuild never seen partway");
    assert!(run(&mut w, Event::Fail { slot: 2 }).is_ok());
    settle(&mut w);
    w.slots[2].disk.set_latency(20, 400);
    let plan = run(&mut w, Event::Readd { slot: 2 });
    assert!(plan.is_ok(), "{plan:?}");
    assert!(
        !plan.as_deref().unwrap_or("").contains("CatchUp"),
        "a replica whose rebuild did not finish was planned as a catch-up: {plan:?}"
    );
    verify(&mut w);
    assert_eq!(state(&w, 2), Some(ReplicaState::InSync));
}

#[test]
fn seq02_ack_before_failure_durable() {
    let mut w = world(2);
    // Region of block 5 already dirty: the write below needs no map update.
    assert!(write(&mut w, 4, false).is_ok());
    // The survivor's superblock write (recording the failure) hangs 1 s.
    let sb = 0..2 * 4096;
    run(&mut w, fault(1, &[OpKind::Write], Some(sb), hang(1000))).ok();
    let fail = go(&mut w, Event::Fail { slot: 0 });
    sleep(&mut w, 5);
    // A FUA write in the window: it must not be acknowledged before the
    // failure of replica 0 is durable on replica 1.
    let ack = go(
        &mut w,
        Event::Write {
            block: 5,
            n: 1,
            fua: true,
        },
    );
    sleep(&mut w, 100);
    let _ = (fail, ack);
    // Power loss while the superblock write still hangs.
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::LoseAll,
        },
    );
    start(&mut w, 0);
    settle(&mut w);
    assert!(read(&mut w, 5, 1).is_ok());
    verify(&mut w);
}

#[test]
fn seq03_replica_replaced_blank_after_gap() {
    let mut w = world(2);
    fill_regions(&mut w, 16);
    // The disk goes away: I/O errors fail the replica out.
    run(&mut w, Event::Gone { slot: 1 }).ok();
    for b in 0..8 {
        let _ = write(&mut w, b * 16 + 1, false);
    }
    settle(&mut w);
    assert_ne!(state(&w, 1), Some(ReplicaState::InSync));
    // It comes back blank (another export under the same name, a host that lost its cache).
    run(&mut w, Event::Blank { slot: 1 }).ok();
    let readd = run(&mut w, Event::Readd { slot: 1 });
    assert!(
        readd.is_err(),
        "a blank disk was re-added as the replica: {readd:?}"
    );
    assert_ne!(state(&w, 1), Some(ReplicaState::InSync));
    verify(&mut w);
    // The operator replaces it: remove, add a new replica, rebuilt in full.
    assert!(run(&mut w, Event::Remove { slot: 1 }).is_ok());
    assert!(run(&mut w, Event::Add).is_ok());
    verify(&mut w);
    assert_state(&w, 2, ReplicaState::InSync);
}

#[test]
fn seq04_stop_during_resync_keeps_divergence() {
    let mut w = world(2);
    fill_regions(&mut w, 8);
    settle(&mut w);
    // Replica 1 is slow: at the crash, writes have reached replica 0 only.
    w.slots[1].disk.set_latency(20_000, 30_000);
    let mut pending = Vec::new();
    for r in 0..24 {
        pending.push(go(
            &mut w,
            Event::Write {
                block: r * 16 + 2,
                n: 1,
                fua: false,
            },
        ));
    }
    sleep(&mut w, 3);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    start(&mut w, 0);
    // The resync runs slowly; stop the volume in the middle of it.
    let midway = w.until(MINUTE, |w| {
        let (done, total, finished) = job_done_bytes(w);
        done > 0 && done < total && !finished
    });
    assert!(chk(&w, midway), "resync never seen running");
    assert!(run(&mut w, Event::Stop).is_ok());
    w.slots[1].disk.set_latency(20, 400);
    start(&mut w, 0);
    verify(&mut w);
}

#[test]
fn seq05_resync_source_fails_others_reconciled() {
    let mut w = world(3);
    fill_regions(&mut w, 8);
    settle(&mut w);
    // Replicas 1 and 2 are slow, differently: at the crash all three differ.
    w.slots[1].disk.set_latency(5_000, 8_000);
    w.slots[2].disk.set_latency(15_000, 25_000);
    for r in 0..16 {
        go(
            &mut w,
            Event::Write {
                block: r * 16 + 3,
                n: 1,
                fua: false,
            },
        );
    }
    sleep(&mut w, 10);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    w.slots[1].disk.set_latency(20, 400);
    w.slots[2].disk.set_latency(20, 400);
    // The resync source (replica 0) fails its data reads.
    let data = blocks(&w, 0, w.blocks());
    w.slots[0].disk.add_fault(FaultRule {
        ops: vec![OpKind::Read, OpKind::Allocation],
        range: Some(data),
        kind: FaultKind::Eio,
        count: Some(2),
        per_mille: 1000,
    });
    start(&mut w, 0);
    settle(&mut w);
    w.slots[0].disk.clear_faults();
    if state(&w, 0) != Some(ReplicaState::InSync) {
        let r = run(&mut w, Event::Readd { slot: 0 });
        assert!(r.is_ok(), "{r:?}");
    }
    verify(&mut w);
}

#[test]
fn seq06_close_stops_io() {
    let mut w = world(2);
    // Region 0 dirty, so the stop clears the map first; that clear is slow
    // (replica 0's map write hangs 20 ms).
    assert!(write(&mut w, 0, false).is_ok());
    let map = 2 * 4096..w.layout().data_offset;
    run(&mut w, fault(0, &[OpKind::Write], Some(map), hang(20))).ok();
    // Replica 1's next data write hangs (shorter than the timeout).
    let data = blocks(&w, 0, w.blocks());
    run(&mut w, fault(1, &[OpKind::Write], Some(data), hang(1500))).ok();
    let stop = go(&mut w, Event::Stop);
    sleep(&mut w, 5);
    // A write arriving while the stop runs: it must finish before the
    // replicas are marked clean, or be refused.
    let late = go(
        &mut w,
        Event::Write {
            block: 200,
            n: 1,
            fua: false,
        },
    );
    let stopped = wait(&mut w, stop);
    let _ = late;
    // Soon after the stop (replica 0 has had time to take the write),
    // power loss: completed writes stay, in-flight ones do not.
    sleep(&mut w, 10);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    start(&mut w, 0);
    verify(&mut w);
    dump(&w, "seq06");
    assert!(stopped.is_ok(), "{stopped:?}");
}

#[test]
fn seq07_lone_stale_replica_refused() {
    let mut w = world(2);
    assert!(write(&mut w, 1, false).is_ok());
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 1, true).is_ok());
    assert!(run(&mut w, Event::Stop).is_ok());
    // Next start: only the stale replica is present, degraded start allowed.
    // The node's membership record says replica 0 alone was in sync.
    let r = run(&mut w, Event::start(0b01));
    let why = r.expect_err("a lone stale replica was started");
    assert!(
        why.contains("stale") && why.contains("--force-stale"),
        "the refusal must say why and how to force it: {why}"
    );
    assert_eq!(w.refused.as_ref().map(|r| r.0), Some(Refusal::StaleOnly));
    // With the stale replica's owner back, it starts and serves the new data.
    start(&mut w, 0);
    assert!(read(&mut w, 1, 1).is_ok());
    verify(&mut w);
}

/// Issue 9 item 7, forced: the operator starts from the stale replica
/// (`--force-stale`), which loses the write it missed (the checker resets
/// its register to what that replica holds). When the other replica comes
/// back it went on without this one: a split brain, refused, never merged;
/// the operator resolves it keeping the forced side.
#[test]
fn seq07_forced_stale_start_then_split_brain() {
    let mut w = world(2);
    assert!(write(&mut w, 1, true).is_ok());
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 1, true).is_ok());
    assert!(run(&mut w, Event::Stop).is_ok());
    let forced = run(
        &mut w,
        Event::Start {
            absent: 0b01,
            rate: Rate::Unlimited,
            clear_ms: 0,
            hot: 0,
            force: true,
        },
    );
    assert_eq!(forced.as_deref(), Ok("forced"), "{forced:?}");
    assert_eq!(w.stats.forced, 1);
    assert_eq!(w.other_side, vec![0]);
    // It serves what it held: the write it missed is gone (accepted).
    assert!(read(&mut w, 1, 1).is_ok());
    assert!(write(&mut w, 2, true).is_ok());
    assert!(run(&mut w, Event::Stop).is_ok());
    // Both back: each went on without the other.
    let r = run(&mut w, Event::start(0));
    assert!(r.is_err(), "a split brain was started: {:?}", w.members());
    assert_eq!(w.refused.as_ref().map(|r| r.0), Some(Refusal::SplitBrain));
    let r = run(&mut w, Event::Resolve { keep: 1 });
    assert!(
        r.as_deref().is_ok_and(|s| s.starts_with("resolved")),
        "{r:?}"
    );
    verify(&mut w);
    assert_state(&w, 0, ReplicaState::InSync);
    assert_state(&w, 1, ReplicaState::InSync);
    assert!(w.other_side.is_empty());
}

#[test]
fn seq08_read_repair_never_overwrites_newer() {
    let mut w = world(2);
    assert!(write(&mut w, 10, false).is_ok());
    assert!(run(&mut w, Event::Flush).is_ok());
    let b10 = blocks(&w, 10, 1);
    // Replica 0 fails the read; replica 1 answers it slowly.
    run(
        &mut w,
        fault(0, &[OpKind::Read], Some(b10.clone()), FaultKind::Eio),
    )
    .ok();
    run(
        &mut w,
        fault(1, &[OpKind::Read], Some(b10.clone()), hang(5)),
    )
    .ok();
    // Replica 1 takes the newer write late.
    run(&mut w, fault(1, &[OpKind::Write], Some(b10), hang(10))).ok();
    w.slots[0].disk.set_latency(20, 20);
    w.slots[1].disk.set_latency(20, 20);
    let r = go(&mut w, Event::Read { block: 10, n: 1 });
    sleep(&mut w, 1);
    let newer = go(
        &mut w,
        Event::Write {
            block: 10,
            n: 1,
            fua: false,
        },
    );
    let _ = wait(&mut w, r);
    assert!(wait(&mut w, newer).is_ok());
    verify(&mut w);
}

#[test]
fn seq09_transient_error_last_replica_keeps_volume() {
    let mut w = world(1);
    assert!(write(&mut w, 3, true).is_ok());
    run(
        &mut w,
        fault(0, &[OpKind::Write, OpKind::Zero], None, FaultKind::Enospc),
    )
    .ok();
    let failed = write(&mut w, 4, false);
    assert!(failed.is_err(), "the injected ENOSPC was not reported");
    // One transient error: the volume keeps serving.
    assert!(
        write(&mut w, 4, false).is_ok(),
        "writes after one ENOSPC fail"
    );
    assert!(read(&mut w, 3, 2).is_ok(), "reads after one ENOSPC fail");
    assert_eq!(state(&w, 0), Some(ReplicaState::InSync));
    verify(&mut w);
}

#[test]
fn seq10_rebuild_cursor_after_data() {
    let mut w = world(2);
    fill_regions(&mut w, 120);
    settle(&mut w);
    assert!(run(&mut w, Event::Add).is_ok());
    // The engine checkpoints the cursor every 2 s (of simulated time): a
    // slow new disk makes the rebuild take longer than that.
    w.slots[2].disk.set_latency(60_000, 70_000);
    let sb = w.slots[2].disk.clone();
    let cursor = || {
        ditto_format::Superblock::decode_slots(&sb.peek(0, 8192))
            .ok()
            .and_then(|s| s.rebuild_cursor)
    };
    let seen = w.until(MINUTE, |w| {
        cursor().is_some_and(|c| c > 0) || w.state_of(2) == Some(ReplicaState::InSync)
    });
    chk(&w, seen);
    assert!(
        cursor().is_some_and(|c| c > 0),
        "no cursor checkpoint seen by {:.1}s",
        w.now().as_secs_f64()
    );
    // Power loss right after the checkpoint: unflushed copies are gone.
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::LoseAll,
        },
    );
    w.slots[2].disk.set_latency(20, 400);
    start(&mut w, 0);
    verify(&mut w);
    assert_eq!(state(&w, 2), Some(ReplicaState::InSync));
}

#[test]
fn seq13_late_completion_fenced() {
    let mut w = world(2);
    assert!(write(&mut w, 10, false).is_ok());
    let b10 = blocks(&w, 10, 1);
    // Replica 1's disk hangs on the next write far past io_timeout (2 s):
    // the engine gives up on it; the kernel still lands it at 6 s.
    run(&mut w, fault(1, &[OpKind::Write], Some(b10), hang(6000))).ok();
    assert!(write(&mut w, 10, false).is_ok());
    settle(&mut w);
    assert_ne!(state(&w, 1), Some(ReplicaState::InSync));
    // The disk answers again: re-add (retrying while the engine refuses).
    let mut readd = Err(String::new());
    for _ in 0..40 {
        readd = run(&mut w, Event::Readd { slot: 1 });
        if readd.is_ok() {
            break;
        }
        sleep(&mut w, 250);
    }
    assert!(readd.is_ok(), "re-add never accepted: {readd:?}");
    settle(&mut w);
    assert!(write(&mut w, 10, false).is_ok());
    // Past the late landing.
    sleep(&mut w, 7000);
    verify(&mut w);
}

#[test]
fn seq14_finish_copy_map_snapshot() {
    let mut w = world(2);
    fill_regions(&mut w, 16);
    settle(&mut w);
    assert!(run(&mut w, Event::Add).is_ok());
    // The new replica's dirty-map write at the end of its rebuild hangs 50 ms.
    let map = 2 * 4096..w.layout().data_offset;
    w.slots[2].disk.add_fault(FaultRule {
        ops: vec![OpKind::Write],
        range: Some(map),
        kind: hang(50),
        count: Some(1),
        per_mille: 1000,
    });
    let faults = w.slots[2].disk.stats().faults;
    let disk = w.slots[2].disk.clone();
    let hit = w.until(MINUTE, |_| disk.stats().faults > faults);
    assert!(chk(&w, hit), "the map write never happened");
    // Meanwhile a write dirties a new region.
    assert!(write(&mut w, 1500, false).is_ok());
    settle(&mut w);
    assert_eq!(state(&w, 2), Some(ReplicaState::InSync));
    // Replica 1 leaves; the region is written again, which it misses.
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 1500, true).is_ok());
    assert!(run(&mut w, Event::Stop).is_ok());
    // Start without replica 0: only replica 2's map says what 1 missed.
    start(&mut w, 0b001);
    let r = run(&mut w, Event::Readd { slot: 1 });
    assert!(r.is_ok(), "{r:?}");
    verify(&mut w);
}

#[test]
fn seq15_punch_hole_unsupported_keeps_volume() {
    let mut w = world(1);
    assert!(write(&mut w, 20, true).is_ok());
    run(&mut w, Event::NoPunch { slot: 0 }).ok();
    // fstrim on a file system without hole punching.
    let _trim = run(&mut w, Event::Trim { block: 16, n: 16 });
    assert!(
        write(&mut w, 21, false).is_ok(),
        "the volume is down after a trim"
    );
    assert!(
        read(&mut w, 20, 2).is_ok(),
        "the volume is down after a trim"
    );
    assert_eq!(state(&w, 0), Some(ReplicaState::InSync));
    verify(&mut w);
}

#[test]
fn seq16_dirty_map_clears_per_region() {
    // Region ageing follows simulated time: a trickle of writes to one
    // region, one every quarter of the clear delay.
    let mut w = World::new(16, scenario_cfg(), 2).expect("world");
    let r = w.run(Event::Start {
        absent: 0,
        rate: Rate::Unlimited,
        clear_ms: 300,
        hot: 0,
        force: false,
    });
    assert!(chk(&w, r).is_ok());
    fill_regions(&mut w, 64);
    let until = w.now() + Duration::from_millis(1500);
    while w.now() < until {
        assert!(write(&mut w, 1, false).is_ok());
        sleep(&mut w, 75);
    }
    let dirty = w.volume().map_or(0, |v| v.dirty_regions());
    assert!(
        dirty <= 2,
        "{dirty} regions still dirty under a trickle of writes to one region"
    );
    verify(&mut w);
}

/// The hot set bounds the dirty regions while writes keep coming to many.
#[test]
fn seq16_hot_set_bounds_dirty_regions() {
    let mut w = World::new(16, scenario_cfg(), 2).expect("world");
    let r = w.run(Event::Start {
        absent: 0,
        rate: Rate::Unlimited,
        clear_ms: 60_000,
        hot: 4,
        force: false,
    });
    assert!(chk(&w, r).is_ok());
    let mut most = 0;
    for round in 0..3 {
        for r in 0..32u32 {
            assert!(write(&mut w, r * 16 + round, false).is_ok());
            most = most.max(w.volume().map_or(0, |v| v.dirty_regions()));
        }
        sleep(&mut w, 200);
    }
    sleep(&mut w, 1000);
    let dirty = w.volume().map_or(0, |v| v.dirty_regions());
    assert!(
        dirty <= 4 + 1,
        "{dirty} regions dirty with a hot set of 4 (most {most})"
    );
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::Random,
        },
    );
    start(&mut w, 0);
    verify(&mut w);
}

/// Found by ditto-sim (seed 87 of this workload): `replica add` formats the
/// new disk (generation 1, in sync by its own empty replica set) and the node
/// records it before the engine marks it for a full rebuild. A crash in
/// between, on a volume still at generation 1, and the next start counts the
/// blank replica in sync: the node's record does not list it in sync, but
/// `KnownMembership::vouches_for` accepted any replica at the recorded
/// generation (`>=`). Alone, it started the volume on zeroes (seed 87).
/// Now a replica at the recorded generation must be in the recorded set.
#[test]
fn add_crash_between_format_and_join() {
    let mut w = world(2);
    fill_regions(&mut w, 4);
    settle(&mut w);
    // The new disk answers slowly: the crash comes between its format and
    // the engine's marking it for a full rebuild.
    go(&mut w, Event::Add);
    w.slots[2].disk.set_latency(3000, 3000);
    // The node records the replica once its format returns.
    let recorded = w.until(MINUTE, |w| w.slots[2].in_record);
    assert!(chk(&w, recorded));
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    start(&mut w, 0);
    assert_ne!(
        state(&w, 2),
        Some(ReplicaState::InSync),
        "a blank replica counted in sync"
    );
    verify(&mut w);
    // Alone, it must be refused as stale.
    assert!(run(&mut w, Event::Stop).is_ok());
    let r = run(&mut w, Event::start(0b011));
    assert!(r.is_err(), "the volume started on a blank replica alone");
}

/// The same flaw from a volume's first start (seeds 58, 148, 176 of this
/// workload before it opened every replica at creation, as the node does):
/// started with one replica, the others keep generation 1 as the volume
/// does (nothing bumps it, their replica sets are empty), and one of them
/// alone is vouched for by the record at generation 1.
#[test]
fn fresh_volume_degraded_first_start() {
    let mut w = World::new(9, scenario_cfg(), 2).expect("world");
    start(&mut w, 0b10);
    assert!(write(&mut w, 3, true).is_ok());
    assert!(run(&mut w, Event::Stop).is_ok());
    let r = run(&mut w, Event::start(0b01));
    assert!(
        r.is_err(),
        "a replica that never had the data started the volume alone"
    );
    start(&mut w, 0);
    verify(&mut w);
}

// ---------------------------------------------------------------------
// Seeds the simulator found since section 1 (one scenario per engine fix,
// named after the seed; each has a `simNNN_` regression test in
// crates/ditto-engine/tests/sequences.rs).
// ---------------------------------------------------------------------

fn rule(
    ops: &[OpKind],
    range: std::ops::Range<u64>,
    kind: FaultKind,
    count: Option<u32>,
) -> FaultRule {
    FaultRule {
        ops: ops.to_vec(),
        range: Some(range),
        kind,
        count,
        per_mille: 1000,
    }
}

/// The dirty-map area of a replica's disk.
fn map_area(w: &World) -> std::ops::Range<u64> {
    2 * 4096..w.layout().data_offset
}

fn first_in_sync(w: &World) -> usize {
    w.in_sync_slots()[0]
}

/// Seed 87: a catch-up target that fails on a client write while its copy
/// is in progress is not counted in sync when the copy ends (it missed that
/// write).
#[test]
fn sim0087_failed_target_not_promoted() {
    let mut w = world(2);
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 48, false).is_ok());
    // The catch-up's copy of region 3 to replica 1 takes 500 ms; a client
    // write to region 5 meanwhile fails on replica 1.
    let region3 = blocks(&w, 48, 16);
    w.slots[1]
        .disk
        .add_fault(rule(&[OpKind::Write], region3, hang(500), Some(1)));
    let b80 = blocks(&w, 80, 1);
    w.slots[1]
        .disk
        .add_fault(rule(&[OpKind::Write], b80, FaultKind::Eio, Some(1)));
    let plan = run(&mut w, Event::Readd { slot: 1 });
    assert!(plan.is_ok(), "{plan:?}");
    sleep(&mut w, 50);
    assert_eq!(state(&w, 1), Some(ReplicaState::Rebuilding));
    assert!(write(&mut w, 80, false).is_ok());
    assert_eq!(state(&w, 1), Some(ReplicaState::Failed));
    settle(&mut w);
    assert_eq!(
        state(&w, 1),
        Some(ReplicaState::Failed),
        "a replica that missed an acknowledged write was counted in sync"
    );
    // Re-added, it catches up for real.
    assert!(run(&mut w, Event::Readd { slot: 1 }).is_ok());
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Seed 174: a copy does not read a region from a source that still has a
/// write abandoned at the timeout pending: it lands afterwards, and the
/// source and the copy would differ for good.
#[test]
fn sim0174_copy_waits_for_abandoned_write_on_source() {
    let mut w = world(2);
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 48, false).is_ok());
    // The last replica hangs on the next write past io_timeout (2 s): it
    // fails for the client at the timeout and lands 3.2 s after it started.
    let b48 = blocks(&w, 48, 1);
    w.slots[0]
        .disk
        .add_fault(rule(&[OpKind::Write], b48, hang(3200), Some(1)));
    let hung = go(
        &mut w,
        Event::Write {
            block: 48,
            n: 1,
            fua: false,
        },
    );
    sleep(&mut w, 100);
    // The re-add comes while it hangs: the catch-up's copy of that region
    // waits for its stripe, then for the abandoned write.
    let plan = run(&mut w, Event::Readd { slot: 1 });
    assert!(plan.is_ok(), "{plan:?}");
    assert!(wait(&mut w, hung).is_err(), "the hung write fails");
    assert_eq!(
        state(&w, 0),
        Some(ReplicaState::InSync),
        "the last leg is kept"
    );
    settle(&mut w);
    sleep(&mut w, 1500);
    // The engine kept polling the abandoned write: it has landed now.
    assert_eq!(w.volume().map(|v| v.abandoned_ops()), Some(0));
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
    assert!(w.volume().is_some_and(|v| v.fully_redundant()));
}

/// Seed 209: a re-add whose membership change cannot be recorded (the last
/// in-sync replica fails its superblock write) fails cleanly, leaving no
/// replica "rebuilding" with no job to finish it; the next re-add works.
#[test]
fn sim0209_readd_unrecorded_is_undone() {
    let mut w = world(2);
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 48, false).is_ok());
    w.slots[0]
        .disk
        .add_fault(rule(&[OpKind::Write], 0..2 * 4096, FaultKind::Eio, Some(1)));
    let r = run(&mut w, Event::Readd { slot: 1 });
    assert!(r.is_err(), "the re-add could not be recorded: {r:?}");
    sleep(&mut w, 10);
    assert_eq!(state(&w, 0), Some(ReplicaState::InSync));
    assert_ne!(state(&w, 1), Some(ReplicaState::Rebuilding));
    assert!(
        w.job().is_none_or(|j| j.finished),
        "a job is left queued: {:?}",
        w.job()
    );
    settle(&mut w);
    sleep(&mut w, 1100);
    let r = run(&mut w, Event::Readd { slot: 1 });
    assert!(r.is_ok(), "{r:?}");
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Seed 251: a target that cannot take its dirty map when it joins at the
/// end of its copy is failed out and the job ends with the error (it was
/// left "rebuilding" with a job shown running forever).
#[test]
fn sim0251_target_that_cannot_join_is_failed() {
    let mut w = world(2);
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    assert!(write(&mut w, 48, false).is_ok());
    let map = map_area(&w);
    w.slots[1]
        .disk
        .add_fault(rule(&[OpKind::Write], map, FaultKind::Eio, None));
    let r = run(&mut w, Event::Readd { slot: 1 });
    assert!(r.is_ok(), "{r:?}");
    settle(&mut w);
    let job = w.job().expect("the catch-up job");
    assert!(job.finished && job.error.is_some(), "{job:?}");
    assert_eq!(state(&w, 1), Some(ReplicaState::Failed));
    // Healed, a re-add finishes it.
    w.slots[1].disk.clear_faults();
    assert!(run(&mut w, Event::Readd { slot: 1 }).is_ok());
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Seed 60: a rebuild that cannot go on (its only source cannot be read)
/// fails its target, with the reason and how to resume, instead of leaving
/// it "rebuilding" with no job; a re-add resumes it.
#[test]
fn sim0060_rebuild_that_cannot_go_on_fails_target() {
    let mut w = world(1);
    fill_regions(&mut w, 64);
    let data = blocks(&w, 0, w.blocks());
    w.slots[0].disk.add_fault(rule(
        &[OpKind::Read, OpKind::Allocation],
        data,
        FaultKind::Eio,
        None,
    ));
    assert!(run(&mut w, Event::Add).is_ok());
    settle(&mut w);
    assert_eq!(state(&w, 0), Some(ReplicaState::InSync));
    assert_eq!(state(&w, 1), Some(ReplicaState::Failed));
    let reason = w.members()[1].reason.clone().unwrap_or_default();
    assert!(reason.contains("readd"), "{reason}");
    w.slots[0].disk.clear_faults();
    let plan = run(&mut w, Event::Readd { slot: 1 });
    assert!(
        plan.as_deref().is_ok_and(|p| p.contains("FullRebuild")),
        "{plan:?}"
    );
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Seed 393: after a crash, a read of a region the resync has not reached
/// returned the source's version; the source then failed, and the next read
/// returned another replica's older version. A read never goes back once a
/// client has seen a (settled) version.
#[test]
fn sim0393_reads_never_go_back_when_resync_source_fails() {
    let mut w = world(3);
    fill_regions(&mut w, 8);
    settle(&mut w);
    // Replicas 1 and 2 are slow, differently: at the crash all three differ.
    w.slots[1].disk.set_latency(5_000, 5_000);
    w.slots[2].disk.set_latency(9_000, 9_000);
    for r in 0..8 {
        go(
            &mut w,
            Event::Write {
                block: r * 16 + 5,
                n: 1,
                fua: false,
            },
        );
        sleep(&mut w, 1);
    }
    sleep(&mut w, 3);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    w.slots[1].disk.set_latency(20, 400);
    w.slots[2].disk.set_latency(20, 400);
    // A slow resync: the reads come before it reaches the regions.
    let r = w.run(Event::Start {
        absent: 0,
        rate: Rate::Slow,
        clear_ms: 0,
        hot: 0,
        force: false,
    });
    assert!(chk(&w, r).is_ok());
    assert!(read(&mut w, 7 * 16 + 5, 1).is_ok());
    let source = first_in_sync(&w) as u8;
    assert!(run(&mut w, Event::Fail { slot: source }).is_ok());
    for r in (0..8).rev() {
        assert!(read(&mut w, r * 16 + 5, 1).is_ok());
    }
    assert!(run(&mut w, Event::Readd { slot: source }).is_ok());
    verify(&mut w);
}

/// Seeds 897 and 102: a copy picks its source, then waits for the region;
/// the source fails meanwhile (a client write it missed holds the region).
/// The copy must not read from it: its stale data would overwrite that
/// acknowledged write on the target.
#[test]
fn sim0897_copy_never_reads_source_that_left_while_it_waited() {
    let mut w = world(3);
    assert!(run(&mut w, Event::Fail { slot: 2 }).is_ok());
    assert!(write(&mut w, 48, false).is_ok());
    // W: fails on replica 0, hangs 300 ms on replica 1 (holding the region).
    let b48 = blocks(&w, 48, 1);
    w.slots[0]
        .disk
        .add_fault(rule(&[OpKind::Write], b48.clone(), FaultKind::Eio, Some(1)));
    w.slots[1]
        .disk
        .add_fault(rule(&[OpKind::Write], b48, hang(300), Some(1)));
    let wr = go(
        &mut w,
        Event::Write {
            block: 48,
            n: 1,
            fua: false,
        },
    );
    sleep(&mut w, 5);
    // The catch-up of replica 2 picks its source and waits for the region.
    let plan = run(&mut w, Event::Readd { slot: 2 });
    assert!(plan.is_ok(), "{plan:?}");
    assert!(wait(&mut w, wr).is_ok());
    settle(&mut w);
    assert_eq!(state(&w, 0), Some(ReplicaState::Failed));
    assert_eq!(state(&w, 1), Some(ReplicaState::InSync));
    assert_eq!(state(&w, 2), Some(ReplicaState::InSync));
    verify(&mut w);
}

/// Seed 1326: the post-crash resync was copying a region from its source to
/// the last other replica when the source failed; a read of that region was
/// served from that replica before the copy ended, and the next read
/// returned the copied (other) version. Reads wait for a copy in progress.
#[test]
fn sim1326_reads_wait_for_copy_from_failed_source() {
    let mut w = world(2);
    assert!(write(&mut w, 0, false).is_ok());
    assert!(run(&mut w, Event::Flush).is_ok());
    // A newer write reaches replica 1 only before the crash: the resync
    // source (replica 0) holds the older version.
    w.slots[0].disk.set_latency(20_000, 20_000);
    go(
        &mut w,
        Event::Write {
            block: 0,
            n: 1,
            fua: false,
        },
    );
    sleep(&mut w, 3);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepCompleted,
        },
    );
    w.slots[0].disk.set_latency(20, 400);
    // The resync's copy of region 0 to replica 1 takes 300 ms.
    let region0 = blocks(&w, 0, 16);
    w.slots[1]
        .disk
        .add_fault(rule(&[OpKind::Write], region0, hang(300), Some(1)));
    start(&mut w, 0);
    let disk1 = w.slots[1].disk.clone();
    let copying = w.until(MINUTE, |_| disk1.faults().is_empty());
    assert!(chk(&w, copying), "the copy never started");
    let source = first_in_sync(&w) as u8;
    assert_eq!(source, 0, "the resync copies from replica 0");
    assert!(run(&mut w, Event::Fail { slot: 0 }).is_ok());
    let first = go(&mut w, Event::Read { block: 0, n: 1 });
    sleep(&mut w, 100);
    assert!(wait(&mut w, first).is_ok());
    assert!(read(&mut w, 0, 1).is_ok());
    // Past the end of the copy: the block must still read as before.
    sleep(&mut w, 400);
    assert!(read(&mut w, 0, 1).is_ok());
    assert!(run(&mut w, Event::Readd { slot: 0 }).is_ok());
    verify(&mut w);
}

/// Seed 1975: replica 0, failed during its catch-up, keeps its old
/// generation but holds the client write it took meanwhile (block 48).
/// The operator then forces a start from replica 1, which left before that
/// write; re-adding replica 0 was planned as a catch-up by replica 1's dirty
/// map, which does not cover block 48, and the two in-sync replicas
/// differed. After a forced start the others are rebuilt in full.
#[test]
fn sim1975_after_forced_start_others_rebuilt_in_full() {
    let mut w = world(3);
    assert!(run(&mut w, Event::Fail { slot: 0 }).is_ok());
    assert!(write(&mut w, 0, false).is_ok());
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    // Replica 0's catch-up copy of region 0 takes 500 ms; a client write to
    // region 3 reaches it meanwhile, then it is failed again.
    let region0 = blocks(&w, 0, 16);
    w.slots[0]
        .disk
        .add_fault(rule(&[OpKind::Write], region0, hang(500), Some(1)));
    let plan = run(&mut w, Event::Readd { slot: 0 });
    assert!(plan.is_ok(), "{plan:?}");
    sleep(&mut w, 50);
    assert_eq!(state(&w, 0), Some(ReplicaState::Rebuilding));
    assert!(write(&mut w, 48, true).is_ok());
    assert!(run(&mut w, Event::Fail { slot: 0 }).is_ok());
    settle(&mut w);
    assert!(run(&mut w, Event::Stop).is_ok());
    // Replica 2 is gone for good: the operator starts from replica 1.
    let forced = run(
        &mut w,
        Event::Start {
            absent: 0b100,
            rate: Rate::Unlimited,
            clear_ms: 0,
            hot: 0,
            force: true,
        },
    );
    assert_eq!(forced.as_deref(), Ok("forced"), "{forced:?}");
    let plan = run(&mut w, Event::Readd { slot: 0 });
    assert!(
        plan.as_deref().is_ok_and(|p| !p.contains("CatchUp")),
        "re-add after a forced start: {plan:?}"
    );
    verify(&mut w);
    assert_state(&w, 0, ReplicaState::InSync);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Seed 1955: two re-adds of one replica while its disk answered slowly
/// both passed the "already rebuilding?" check; neither membership change
/// could be recorded (the last replica's superblock writes failed) and each
/// undid its own, the second putting back the first one's member: left
/// rebuilding with no job (a liveness violation). Re-adds are serialised.
#[test]
fn sim1955_concurrent_readds_serialised() {
    let mut w = world(1);
    fill_regions(&mut w, 32);
    assert!(run(&mut w, Event::Add).is_ok());
    // A slow new disk: fail it partway through its rebuild.
    w.slots[1].disk.set_latency(2000, 3000);
    let partway = w.until(MINUTE, |w| {
        let (done, total, finished) = job_done_bytes(w);
        done > 0 && done < total / 2 && !finished
    });
    assert!(chk(&w, partway), "rebuild never seen partway");
    assert!(run(&mut w, Event::Fail { slot: 1 }).is_ok());
    settle(&mut w);
    // Re-added twice while its disk takes 0.8 s per operation; the last
    // replica cannot record either change.
    w.slots[1].disk.set_latency(800_000, 800_000);
    // Each failed record takes 50 ms, so the second re-add looks at the
    // member while the first one's change is in place.
    w.slots[0].disk.set_latency(50_000, 50_000);
    w.slots[0]
        .disk
        .add_fault(rule(&[OpKind::Write], 0..2 * 4096, FaultKind::Eio, Some(2)));
    let first = go(&mut w, Event::Readd { slot: 1 });
    sleep(&mut w, 10);
    let second = go(&mut w, Event::Readd { slot: 1 });
    let (a, b) = (wait(&mut w, first), wait(&mut w, second));
    assert!(a.is_err() || b.is_err(), "{a:?} {b:?}");
    w.slots[1].disk.set_latency(20, 400);
    w.slots[0].disk.set_latency(20, 400);
    settle(&mut w);
    assert_ne!(state(&w, 1), Some(ReplicaState::Rebuilding));
    if state(&w, 1) != Some(ReplicaState::InSync) {
        let again = run(&mut w, Event::Readd { slot: 1 });
        assert!(again.is_ok(), "{again:?} after {a:?} {b:?}");
    }
    verify(&mut w);
    assert_state(&w, 1, ReplicaState::InSync);
}

/// Quorum (sim seed 77 of the first `--quorum` campaign): a start on a
/// minority of the volume's nodes is refused. Before, the node counted the
/// disks it was given, not those that opened; one unreadable disk let a
/// minority start, take over from a stale copy and lose an acknowledged
/// write. The engine now refuses such an open itself (`NoQuorum`).
#[test]
fn quorum_a_minority_never_starts_and_a_majority_keeps_every_acknowledged_write() {
    let cfg = SimConfig {
        quorum: true,
        ..scenario_cfg()
    };
    let mut w = World::new(77, cfg, 3).expect("world");
    start(&mut w, 0);
    assert!(write(&mut w, 5, true).is_ok());
    settle(&mut w);
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::KeepAll,
        },
    );
    let r = run(&mut w, Event::start(0b110));
    assert!(
        r.as_ref().is_err_and(|e| e.contains("no quorum")),
        "a start on one of three nodes: {r:?}"
    );
    // Any two of the three hold the acknowledged write.
    start(&mut w, 0b001);
    verify(&mut w);
}

/// Sim seed 416 (`--quorum`): the flush that precedes clearing the dirty
/// bits at a stop fails on one replica, failing it out with the write
/// unflushed. Its bits must stay on the survivor, so that after a crash
/// that loses the unflushed write, its catch-up copies that region again.
#[test]
fn sim416_a_replica_failed_by_the_clearing_flush_is_caught_up_in_full() {
    let mut w = world(2);
    assert!(write(&mut w, 5, false).is_ok());
    go(&mut w, fault(1, &[OpKind::Sync], None, FaultKind::Eio));
    assert!(run(&mut w, Event::Stop).is_ok());
    go(
        &mut w,
        Event::Crash {
            mode: CrashMode::LoseAll,
        },
    );
    start(&mut w, 0);
    let readd = run(&mut w, Event::Readd { slot: 1 });
    assert!(readd.is_ok(), "{readd:?}");
    verify(&mut w);
    assert_eq!(w.in_sync_slots().len(), 2);
}

/// Sim seed 4995 of the `--quorum` campaign, replayed from its recorded
/// trace: a replica whose own dirty map lacked a bit the volume counted
/// durable (from another replica's map) was left alone later, and its map
/// skipped a region in the other's catch-up: the two diverged. The engine
/// now writes the union of the maps to every in-sync replica at start.
#[test]
fn sim4995_quorum_trace_replays_without_violation() {
    let text = include_str!("traces/quorum-seed-4995.trace");
    let (replicas, steps) = ditto_sim::trace::parse_trace(text).expect("trace");
    let cfg = SimConfig {
        quorum: true,
        ..SimConfig::default()
    };
    let o = ditto_sim::replay(4995, replicas, &steps, cfg, true);
    assert!(o.violation.is_none(), "{:?}", o.violation);
}

/// Sim seed 9804 (campaign 8000..10000, 1500 operations), replayed from its
/// recorded trace: a scrub with repair picked its replicas before waiting
/// for a region that a client write held; the write failed one replica out
/// (its disk hung) and was acknowledged by the other, and the scrub then
/// "repaired" the good replica from the failed one's stale copy.
#[test]
fn sim9804_trace_replays_without_violation() {
    let text = include_str!("traces/seed-9804.trace");
    let (replicas, steps) = ditto_sim::trace::parse_trace(text).expect("trace");
    let o = ditto_sim::replay(9804, replicas, &steps, SimConfig::default(), true);
    assert!(o.violation.is_none(), "{:?}", o.violation);
}
