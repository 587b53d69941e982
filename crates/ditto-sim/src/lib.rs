//! Deterministic fault simulator for the volume engine: runs it on simulated disks, time and crashes under a random workload, and checks its invariants after every step.
//!
//! # Pieces
//!
//! - [`disk::SimDisk`]: an in-memory `IoFile` that keeps durable content apart
//!   from unflushed writes (per 4 KiB sector), loses or keeps each unflushed
//!   write at random on a crash, injects EIO, ENOSPC, EOPNOTSUPP (no hole
//!   punching), hangs and stalls, can disappear or be replaced blank, and lands
//!   the writes of abandoned (timed-out) operations late, as a kernel still
//!   holding the I/O would.
//! - [`world::World`]: a turmoil simulation with one host, the node, running
//!   the engine; the driver steps simulated time, sends requests, collects
//!   replies and checks after every step.
//! - [`workload::Generator`]: random client I/O and incidents; [`trace`]
//!   prints and parses traces; [`run`] runs, replays and shrinks them.
//! - [`model::Model`]: the per-block register the checker judges reads and
//!   replicas against.
//! - [`cluster::Cluster`] (`--cluster`): three nodes on turmoil's network,
//!   running the engine, the peer protocol and the fencing rule between
//!   them, under partitions, resets, latency, crashes and promotes; checks
//!   that acknowledged writes read back and that one node only acknowledges
//!   writes per (epoch, generation). See docs/replication.md, "The cluster
//!   simulator", for what it found and its known liveness gap.
//!
//! # Quorum mode (`--quorum`)
//!
//! Each replica is its own node (failure domain) and the volume runs with
//! majority quorum (`on_no_quorum = "error"`). Every start is a takeover by
//! another node at a new epoch, without the first node's membership record,
//! from whichever disks are present: a start on a minority is refused. The
//! same checks hold, with two changes of the rules: a read refused for lack
//! of quorum is not a needless EIO, and a clean stop makes writes durable
//! only if its flush reached a majority (a client flush without quorum
//! fails). Acknowledged writes must survive any majority taking over.
//! The mode found three engine bugs that hold in every mode (a minority
//! start, dirty bits cleared although the clearing flush failed a replica,
//! dirty maps differing between in-sync replicas); their seeds are
//! scenarios in `tests/scenarios.rs`.
//!
//! # Why turmoil
//!
//! turmoil gives each host its own current-thread tokio runtime with paused
//! time, advanced in fixed ticks by the driver, so one seed replays exactly,
//! and `Sim::crash` drops the host's runtime: every engine task dies at once,
//! which is precisely a daemon crash. It also carries the multi-node
//! simulation (`cluster`). Measured (release,
//! 2 cores): 600 seeds, 1.16 M client requests and 29,400 s of simulated time
//! (1 ms ticks) in 59 s of wall time, about 4 µs of wall time per tick
//! including the engine work; ~20,000 client requests/s.
//! The engine is driven through shared memory rather than turmoil's
//! simulated sockets: NBD framing is not what is under test here.
//!
//! # The checks (after every step)
//!
//! 1. *Lost write*: a write acknowledged before a FLUSH (or clean stop) that
//!    completed, or written with FUA, reads back unless a newer write to the
//!    block was acknowledged — across crashes; without a crash since, every
//!    acknowledged write reads back.
//! 2. *Bad read*: a read returns a version between the block's floor and the
//!    newest issued (see [`model`]). A block never goes back to older data
//!    without a crash in between, once a version is settled: the floor moves
//!    to a write when it is acknowledged, and to a version a read returned if
//!    that version's request was no longer in flight when the read completed.
//!    Reads overlapping a write still in flight may return new then old: a
//!    mirror serves concurrent reads from different replicas, one of which may
//!    hold the write and the other not yet; Linux md RAID-1 does the same, and
//!    NBD and block-device semantics give no order between a read and an
//!    unacknowledged overlapping write (a regular register, not an atomic
//!    one). *Garbage*: a block holds bytes no write produced.
//! 3. *Diverged*: once the volume is fully redundant and idle (nothing in
//!    flight, no job running or about to: a rebuilding member counts as a job
//!    to come unless the last job failed), all in-sync replicas' data areas are
//!    byte-identical (read straight from the disks at `data_offset`).
//! 4. *Stale in sync*: when idle, every in-sync replica holds, per block, a
//!    version the register allows: a replica that missed an acknowledged write
//!    is never counted in sync.
//! 5. *Needless EIO*: a read fails only if every replica in sync when it was
//!    issued had an injected fault during it, left the set, or lacks the data.
//!    *Last leg*: the engine never fails its last in-sync replica (md never
//!    does; issue 9 item 9).
//!
//! Plus *liveness* (a request or a settle that does not finish within
//! [`world::SimConfig::settle_limit`] of simulated time) and *panic*.
//!
//! # Rules where the issue is silent
//!
//! - Sectors (and so client blocks) are atomic: a crash never tears a 4 KiB block.
//! - A crash is a power loss: each sector written since its last sync ends as
//!   any one of its versions; a daemon kill (all kept) is one of its outcomes.
//! - TRIM reads back as zeroes (the engine's `discard` promises it).
//! - A write that returned an error, or was cut off by a crash, may or may not
//!   have landed; the next acknowledged write to its blocks supersedes it, and
//!   a late landing of it after that is a violation (issue 9 item 13).
//! - The workload never has two modifying requests over one block in flight
//!   at once (no file system does; their order would be undefined and the
//!   mirrors could rightly differ). Reads may overlap writes.
//! - A flush covers the writes whose acknowledgement the client had seen
//!   when it sent the flush.
//! - A disk replaced blank under a running, in-sync local replica is not
//!   generated: a local file cannot change under an open descriptor. It is
//!   generated while the disk is away or its replica out of the set.
//! - A disk replaced blank is a new device: handles (`SimFile`) opened on the
//!   old one fail with EIO, like a file descriptor on a pulled disk; a replica
//!   whose handle is dead is not judged by checks 3 and 4 (it serves nothing).
//!   "Gone" and "back" are a transient outage of the same device.
//! - "No hole punching" makes `punch_hole` fail with EOPNOTSUPP, as the
//!   engine's `IoFile`s did before their fallback (issue 9 item 15).
//! - The node's degraded-start policy is the driver's: starts with disks
//!   left out are allowed. A volume's first open has every replica (the node
//!   opens a volume when it creates it).
//! - The node's membership record is [`world::SimLog`], a `MembershipLog`
//!   passed in every open: it lives outside the node's runtime, so it
//!   survives crashes like the node's redb store, and a record is durable
//!   once `record` returns (after a short simulated commit that a crash can
//!   cut). `--no-membership-log` runs without it (to show issue 9 item 7).
//! - A start refused as `StaleOnly` (no present replica vouched for by the
//!   record) or as a split brain is a legitimate outcome, counted in the
//!   stats with the other `start_refusals`. The workload's operator then
//!   brings every disk back, or forces the start (`Start { force }`: opened
//!   with `accept_stale` only after a plain open was refused as stale-only),
//!   or resolves a split brain (`Resolve { keep }`, as `ditto volume
//!   resolve`: the kept replica alone, the others rebuilt from it in full).
//! - A forced start or a resolve that takes effect is an explicit
//!   data-loss event: the register of every block is reset to what the
//!   replicas it started from held (`Model::reset`), whatever was
//!   acknowledged since they left. The replicas it left out went on without
//!   them (`World::other_side`): a later start must refuse them (split brain)
//!   or leave them stale; counting one in sync before it is rebuilt is a
//!   *stale in sync* violation (a merge).
//! - A volume that cannot start with every disk present, forcing included,
//!   ends the run without a violation (e.g. its only current replica was
//!   wiped and no other holds the data).
//!
//! # Determinism
//!
//! Everything random comes from [`rng::SimRng`] streams split off the seed.
//! The engine measures its intervals (resync pacing, dirty-bit ageing, the
//! rebuild checkpoint interval) with `tokio::time::Instant` and its sweeper's
//! select is `biased`, so under turmoil's paused clock they follow simulated
//! time: starts pick throttled rates (unlimited, 256 MiB/s, 16 MiB/s), a
//! `dirty_clear_delay` of 0..2 s and sometimes a hot set of 2..8 regions,
//! and a seed still replays exactly (`tests/campaign.rs` checks it).
//! `--no-throttle` and `--no-vary-dirty` turn those choices off.

pub mod cluster;
pub mod disk;
pub mod model;
pub mod rng;
pub mod run;
pub mod trace;
pub mod workload;
pub mod world;

pub use run::{generate, replay, run_seed, shrink, Outcome};
pub use world::{Check, Event, SimConfig, Stats, Step, Violation, World};
