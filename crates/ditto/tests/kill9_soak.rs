//! kill -9 soak, outside the default suite (`#[ignore]`): run it with
//! `scripts/kill9 [--rounds N] [--seconds S]`.
//!
//! A daemon serves a 2-replica volume; writers on their own connections write
//! 4 KiB blocks, each write followed by a FLUSH, and record which writes were
//! acknowledged after a completed FLUSH. At a random moment the daemon is
//! killed with SIGKILL and restarted on the same data directory; once the
//! crash resync has finished, every acknowledged-flushed write must read back
//! (a block whose write was in flight at the kill may hold the old or the new
//! data, sector by sector), and the two replicas' data areas must be
//! identical. Repeated until the rounds or the seconds run out; prints
//! rounds, writes verified and violations, and fails on any violation.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::nbd::NbdClient;
use common::*;

const VOLUME: &str = "soak";
const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = 4096;
const SECTOR: usize = 512;
/// Blocks the writers choose from (the first 8 MiB): small enough that
/// rounds overwrite each other's blocks.
const HOT_BLOCKS: u64 = 2048;
const WRITERS: u64 = 2;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: a cheap, seeded spread of blocks and kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Block `block` as written with sequence number `seq`: every 512-byte
/// sector carries (block, seq), so a torn write shows sector by sector.
fn block_data(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, sector) in b.chunks_mut(SECTOR).enumerate() {
        sector[..8].copy_from_slice(&block.to_le_bytes());
        sector[8..16].copy_from_slice(&seq.to_le_bytes());
        for (j, x) in sector[16..].iter_mut().enumerate() {
            *x = (seq as u8) ^ (j as u8) ^ (i as u8).wrapping_mul(37);
        }
    }
    b
}

/// The sequence number a sector holds: 0 for never written (zeroes), None
/// for anything no write of this block could have left.
fn sector_seq(block: u64, sector: &[u8], index: usize) -> Option<u64> {
    if sector.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let b = u64::from_le_bytes(sector[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(sector[8..16].try_into().ok()?);
    let want = &block_data(block, seq)[index * SECTOR..(index + 1) * SECTOR];
    (b == block && sector == want).then_some(seq)
}

/// What one writer got acknowledged before the daemon died.
#[derive(Default)]
struct WriterLog {
    /// (block, seq) acknowledged, then covered by an acknowledged FLUSH.
    flushed: Vec<(u64, u64)>,
    /// The write in flight (sent, its FLUSH not acknowledged) at the kill.
    pending: Option<(u64, u64)>,
}

fn writer(
    addr: String,
    w: u64,
    seed: u64,
    seqs: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut log = WriterLog::default();
    let Ok(mut c) = NbdClient::connect(&addr, VOLUME) else {
        return log;
    };
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        // Writer w owns the blocks b with b % WRITERS == w.
        let block = (rng.next() % (HOT_BLOCKS / WRITERS)) * WRITERS + w;
        let seq = seqs.fetch_add(1, Ordering::SeqCst);
        log.pending = Some((block, seq));
        if c.write(block * BLOCK, &block_data(block, seq)).is_err() || c.flush().is_err() {
            break;
        }
        log.flushed.push((block, seq));
        log.pending = None;
    }
    log
}

/// Starts the daemon again on the same data directory.
fn restart(node: &mut Node) {
    let data = node.daemon.data_dir.clone();
    node.daemon = Daemon::start_with(&data, &[]);
}

/// `ditto volume wait`: until fully redundant with no job running.
fn wait_redundant(d: &Daemon) {
    let out = d.cli(&["volume", "wait", VOLUME, "--timeout", "60"]);
    assert!(
        out.success(),
        "`ditto volume wait {VOLUME}` after the restart: {}\n--- daemon stderr ---\n{}",
        out.describe(),
        tail(&d.stderr(), 4000)
    );
}

#[test]
#[ignore = "soak: run with scripts/kill9"]
fn kill9_soak() {
    let rounds = env_u64("KILL9_ROUNDS", 200);
    let seconds = env_u64("KILL9_SECONDS", 600);
    let seed = env_u64("KILL9_SEED", 0x005e_ed0f_d177);
    let mut rng = Rng(seed | 1);
    let start = Instant::now();

    let mut node = Node::new();
    node.add_pool("a");
    node.add_pool("b");
    let size = SIZE.to_string();
    node.daemon.cli_json(&[
        "volume", "create", VOLUME, "--size", &size, "--pool", "a", "--pool", "b",
    ]);
    node.daemon.wait_healthy(VOLUME);
    let replicas = replicas(&node.daemon.volume(VOLUME));
    assert_eq!(replicas.len(), 2);

    // What each sector of a written block must hold: the sequence number of
    // its last acknowledged-flushed write, or what a write in flight at an
    // earlier kill was found to have left there.
    const SECTORS: usize = BLOCK as usize / SECTOR;
    let mut model: HashMap<u64, [u64; SECTORS]> = HashMap::new();
    let seqs = Arc::new(AtomicU64::new(1));
    let (mut done, mut verified, mut violations) = (0u64, 0u64, Vec::<String>::new());
    let (mut acked_total, mut torn_or_new) = (0u64, 0u64);

    while done < rounds && start.elapsed() < Duration::from_secs(seconds) {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (addr, seqs, stop) = (node.daemon.nbd.clone(), seqs.clone(), stop.clone());
                let s = rng.next();
                thread::spawn(move || writer(addr, w, s, seqs, stop))
            })
            .collect();
        // Kill at a random moment while the writers run.
        thread::sleep(Duration::from_millis(10 + rng.next() % 190));
        let st = node.daemon.stop_with(libc::SIGKILL);
        assert!(
            !st.success(),
            "SIGKILL should not look like a clean exit: {st}"
        );
        stop.store(true, Ordering::SeqCst);
        let logs: Vec<WriterLog> = threads
            .into_iter()
            .map(|t| t.join().expect("writer thread"))
            .collect();
        let mut pending: HashMap<u64, u64> = HashMap::new();
        for log in &logs {
            acked_total += log.flushed.len() as u64;
            for &(block, seq) in &log.flushed {
                model.insert(block, [seq; SECTORS]);
            }
            if let Some((block, seq)) = log.pending {
                pending.insert(block, seq);
            }
        }

        restart(&mut node);
        wait_redundant(&node.daemon);

        // Every acknowledged-flushed write reads back.
        let mut c = NbdClient::connect(&node.daemon.nbd, VOLUME).expect("connect after restart");
        let hot = c
            .read(0, (HOT_BLOCKS * BLOCK) as u32)
            .expect("read the hot area");
        for block in 0..HOT_BLOCKS {
            let new = pending.get(&block).copied();
            let Some(expect) = model.get(&block).copied().or(new.map(|_| [0; SECTORS])) else {
                continue;
            };
            let data = &hot[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
            let mut found = expect;
            for (i, sector) in data.chunks(SECTOR).enumerate() {
                let got = sector_seq(block, sector, i);
                if got == Some(expect[i]) {
                    continue;
                }
                if new.is_some() && got == new {
                    torn_or_new += 1;
                    found[i] = new.unwrap_or(0);
                    continue;
                }
                violations.push(format!(
                    "round {done}: block {block} sector {i} holds seq {got:?}; acknowledged-flushed seq {}, in flight {new:?}",
                    expect[i]
                ));
            }
            if expect.iter().any(|&s| s != 0) {
                verified += 1;
            }
            // What the unacknowledged write left is what later rounds expect.
            model.insert(block, found);
        }
        drop(c);

        // The replicas agree once the resync is done.
        let a = std::fs::File::open(&replicas[0].path).expect("open replica a");
        let b = std::fs::File::open(&replicas[1].path).expect("open replica b");
        let mut da = vec![0u8; (HOT_BLOCKS * BLOCK) as usize];
        let mut db = da.clone();
        a.read_exact_at(&mut da, replicas[0].data_offset)
            .expect("read replica a");
        b.read_exact_at(&mut db, replicas[1].data_offset)
            .expect("read replica b");
        if da != db {
            let first = (0..da.len()).find(|&i| da[i] != db[i]).unwrap_or(0);
            violations.push(format!(
                "round {done}: replicas differ after the resync, first at byte {first}"
            ));
        }
        done += 1;
        if done % 20 == 0 {
            eprintln!(
                "kill9: {done} rounds, {verified} block checks, {} violations, {:?}",
                violations.len(),
                start.elapsed()
            );
        }
    }
    node.daemon.stop();
    eprintln!(
        "kill9: rounds {done}, acknowledged-flushed writes {acked_total}, writes verified {verified} \
         (block checks over all rounds), in-flight sectors that landed {torn_or_new}, violations {}, \
         seed {seed}, {:?}",
        violations.len(),
        start.elapsed()
    );
    for v in violations.iter().take(20) {
        eprintln!("  {v}");
    }
    assert!(violations.is_empty(), "{} violations", violations.len());
    assert!(done > 0, "no round ran");
}
