//! The cluster mode's seeds in the suite: three nodes on a simulated
//! network, the real peer protocol and fencing between them.

use ditto_sim::cluster::{run_cluster_seed, ClusterConfig};

/// No seed loses an acknowledged write, returns garbage, panics, or has two
/// nodes acknowledge writes for one (epoch, generation), and every seed
/// converges on one primary with every replica in sync after healing (so
/// every seed is read back). Before every start with quorum took an epoch
/// of its own, and a stranded or failed-handover volume was started again,
/// several of these seeds never converged (docs/replication.md, the cluster
/// simulator's findings 3 to 5).
#[test]
fn three_nodes_under_partitions_crashes_and_promotes_keep_every_acknowledged_write() {
    let mut acked = 0;
    let mut stuck = Vec::new();
    for seed in 0..12 {
        let (r, stats, _) = run_cluster_seed(seed, 800, ClusterConfig::default());
        acked += stats.acked;
        match r {
            Ok(()) => {}
            Err(v) if v.check.is_safety() => panic!(
                "seed {seed}: {v}\nreplay: scripts/sim --cluster --seed {seed} --ops 800 --replay"
            ),
            Err(v) => stuck.push(format!(
                "seed {seed}: {v} (replay: scripts/sim --cluster --seed {seed} --ops 800 --replay)"
            )),
        }
    }
    eprintln!("12 seeds, {acked} writes acknowledged; stuck: {stuck:#?}");
    assert!(stuck.is_empty(), "seeds did not converge: {stuck:#?}");
    assert!(acked > 1000, "only {acked} writes were acknowledged");
}

/// Named scenario for the two bugs the cluster mode found. Seeds 0, 2 and
/// 12 (800 steps each) were stuck before `row10_…` (a replica stopped
/// mid-rebuild counted as a split-brain side: no primary could start), and
/// acknowledged 406 writes together before the peer server stopped fencing
/// data requests by generation (it refused its own primary's requests in
/// flight across a membership change, failing healthy replicas out); 601
/// with both fixes.
#[test]
fn scenario_seeds_stuck_by_half_rebuilt_split_brains_and_generation_fencing() {
    let mut acked = 0;
    for seed in [0, 2, 12] {
        let (r, stats, _) = run_cluster_seed(seed, 800, ClusterConfig::default());
        if let Err(v) = r {
            panic!(
                "seed {seed}: {v}\nreplay: scripts/sim --cluster --seed {seed} --ops 800 --replay"
            );
        }
        acked += stats.acked;
    }
    assert!(
        acked >= 500,
        "only {acked} writes acknowledged over seeds 0, 2, 12"
    );
}

/// Named scenario for the cluster simulator's findings 3 to 5
/// (docs/replication.md). Seeds 8 and 13 (800 steps) and 2 (2,000 steps)
/// never converged before every start with quorum took an epoch of its own
/// (two replicas of one epoch, one line of generations, were refused as a
/// split brain; checked against the build of 71cbb9f). Once that was
/// fixed, seed 92 (2,000 steps) stayed stranded with every in-sync
/// replica's connection lost, and seed 59 (2,000 steps) stayed closed after
/// a handover whose close failed. Each must converge and read back now.
#[test]
fn scenario_seeds_stuck_by_shared_epochs_stranded_volumes_and_failed_handovers() {
    for (seed, steps) in [(8, 800), (13, 800), (2, 2000), (92, 2000), (59, 2000)] {
        let (r, _, _) = run_cluster_seed(seed, steps, ClusterConfig::default());
        if let Err(v) = r {
            panic!(
                "seed {seed}: {v}\nreplay: scripts/sim --cluster --seed {seed} --ops {steps} --replay"
            );
        }
    }
}

/// Two data nodes and a diskless tiebreaker under the same partitions,
/// crashes and promotes: the tiebreaker's vote carries acknowledgements
/// while one data node is away, and no seed loses one of them or stays
/// stuck. Without the rule that a start trusts only the replicas the
/// tiebreaker's record vouches for, seed 111 lost an acknowledged write.
#[test]
fn two_data_nodes_and_a_tiebreaker_keep_every_acknowledged_write() {
    let mut acked = 0;
    for seed in 0..12 {
        let cfg = ClusterConfig {
            tiebreaker: true,
            ..ClusterConfig::default()
        };
        let (r, stats, _) = run_cluster_seed(seed, 800, cfg);
        acked += stats.acked;
        if let Err(v) = r {
            panic!(
                "seed {seed}: {v}\nreplay: scripts/sim --cluster --tiebreaker --seed {seed} --ops 800 --replay"
            );
        }
    }
    assert!(acked > 1000, "only {acked} writes were acknowledged");
}

/// Named scenario: seed 649 (2000 steps) with the tiebreaker. A node
/// superseded while its start was opening the volume kept that instance
/// (it was published after the step-down) and served writes on its own
/// replica file, which the new primary wrote too: an acknowledged write
/// was lost. Now an instance opened by a superseded start is closed, and
/// the replica is served to the new primary only after the start ended.
#[test]
fn scenario_seed_649_a_start_superseded_while_opening_never_serves() {
    let cfg = ClusterConfig {
        tiebreaker: true,
        ..ClusterConfig::default()
    };
    let (r, stats, _) = run_cluster_seed(649, 2000, cfg);
    assert!(stats.acked > 500, "only {} acknowledged", stats.acked);
    if let Err(v) = r {
        panic!("seed 649: {v}\nreplay: scripts/sim --cluster --tiebreaker --seed 649 --ops 2000 --replay");
    }
}
