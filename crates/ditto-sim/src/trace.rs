//! Traces as text: one step per line (`AFTER JITTER_US EVENT...`), so a
//! failing or shrunk run can be printed, saved and replayed with
//! `ditto-sim --trace FILE`.

use std::time::Duration;

use crate::disk::{CrashMode, FaultKind, FaultRule, OpKind};
use crate::world::{Event, Rate, Step};

fn op_name(o: OpKind) -> &'static str {
    match o {
        OpKind::Read => "read",
        OpKind::Write => "write",
        OpKind::Sync => "sync",
        OpKind::Punch => "punch",
        OpKind::Zero => "zero",
        OpKind::Allocation => "alloc",
    }
}

fn op_from(s: &str) -> Option<OpKind> {
    Some(match s {
        "read" => OpKind::Read,
        "write" => OpKind::Write,
        "sync" => OpKind::Sync,
        "punch" => OpKind::Punch,
        "zero" => OpKind::Zero,
        "alloc" => OpKind::Allocation,
        _ => return None,
    })
}

fn mode_name(m: CrashMode) -> &'static str {
    match m {
        CrashMode::Random => "random",
        CrashMode::KeepAll => "keep",
        CrashMode::LoseAll => "lose",
        CrashMode::KeepCompleted => "completed",
    }
}

/// The event as one line of words.
pub fn format_event(e: &Event) -> String {
    match e {
        Event::Read { block, n } => format!("read {block} {n}"),
        Event::Write { block, n, fua } => {
            format!("write {block} {n}{}", if *fua { " fua" } else { "" })
        }
        Event::Flush => "flush".into(),
        Event::Trim { block, n } => format!("trim {block} {n}"),
        Event::Zeroes {
            block,
            n,
            punch,
            fua,
        } => format!(
            "zeroes {block} {n}{}{}",
            if *punch { " punch" } else { "" },
            if *fua { " fua" } else { "" }
        ),
        Event::Settle => "settle".into(),
        Event::Verify => "verify".into(),
        Event::Crash { mode } => format!("crash {}", mode_name(*mode)),
        Event::Start {
            absent,
            rate,
            clear_ms,
            hot,
            force,
        } => format!(
            "start absent={absent:#x} rate={} clear={clear_ms} hot={hot}{}",
            rate.name(),
            if *force { " force" } else { "" }
        ),
        Event::Resolve { keep } => format!("resolve {keep}"),
        Event::Stop => "stop".into(),
        Event::Fail { slot } => format!("fail {slot}"),
        Event::Readd { slot } => format!("readd {slot}"),
        Event::Add => "add".into(),
        Event::Remove { slot } => format!("remove {slot}"),
        Event::Scrub { repair, source } => format!(
            "scrub{}{}",
            if *repair { " repair" } else { "" },
            source.map(|s| format!(" source={s}")).unwrap_or_default()
        ),
        Event::Fault { slot, rule } => {
            let ops: Vec<&str> = rule.ops.iter().map(|o| op_name(*o)).collect();
            let range = rule
                .range
                .as_ref()
                .map_or("any".to_string(), |r| format!("{}..{}", r.start, r.end));
            let kind = match rule.kind {
                FaultKind::Eio => "eio".to_string(),
                FaultKind::Enospc => "enospc".to_string(),
                FaultKind::Hang(d) => format!("hang:{}", d.as_millis()),
            };
            let count = rule.count.map_or("inf".to_string(), |c| c.to_string());
            format!(
                "fault {slot} ops={} range={range} kind={kind} count={count} p={}",
                ops.join(","),
                rule.per_mille
            )
        }
        Event::Stall { slot, ms } => format!("stall {slot} {ms}"),
        Event::Gone { slot } => format!("gone {slot}"),
        Event::Back { slot } => format!("back {slot}"),
        Event::Blank { slot } => format!("blank {slot}"),
        Event::NoPunch { slot } => format!("nopunch {slot}"),
        Event::Heal { slot } => format!("heal {slot}"),
        Event::Sleep { ms } => format!("sleep {ms}"),
    }
}

pub fn format_step(s: &Step) -> String {
    format!("{} {} {}", s.after, s.jitter_us, format_event(&s.event))
}

pub fn format_trace(steps: &[Step]) -> String {
    let mut out = String::new();
    for s in steps {
        out.push_str(&format_step(s));
        out.push('\n');
    }
    out
}

fn num<T: std::str::FromStr>(w: Option<&str>, what: &str) -> Result<T, String> {
    w.ok_or_else(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

fn kv<'a>(w: &'a str, key: &str) -> Option<&'a str> {
    w.strip_prefix(key)?.strip_prefix('=')
}

/// Parse one event from its words.
pub fn parse_event(line: &str) -> Result<Event, String> {
    let mut w = line.split_whitespace();
    let name = w.next().ok_or("empty event")?;
    let rest: Vec<&str> = w.clone().collect();
    let has = |f: &str| rest.contains(&f);
    Ok(match name {
        "read" => Event::Read {
            block: num(w.next(), "block")?,
            n: num(w.next(), "count")?,
        },
        "write" => Event::Write {
            block: num(w.next(), "block")?,
            n: num(w.next(), "count")?,
            fua: has("fua"),
        },
        "flush" => Event::Flush,
        "trim" => Event::Trim {
            block: num(w.next(), "block")?,
            n: num(w.next(), "count")?,
        },
        "zeroes" => Event::Zeroes {
            block: num(w.next(), "block")?,
            n: num(w.next(), "count")?,
            punch: has("punch"),
            fua: has("fua"),
        },
        "settle" => Event::Settle,
        "verify" => Event::Verify,
        "crash" => Event::Crash {
            mode: match w.next() {
                Some("random") => CrashMode::Random,
                Some("keep") => CrashMode::KeepAll,
                Some("lose") => CrashMode::LoseAll,
                Some("completed") => CrashMode::KeepCompleted,
                _ => return Err("crash mode is random, keep, lose or completed".into()),
            },
        },
        "start" => {
            let mut absent = 0;
            let mut rate = Rate::Unlimited;
            let (mut clear_ms, mut hot) = (0, 0);
            let force = has("force");
            for word in rest {
                if let Some(v) = kv(word, "absent") {
                    absent = u32::from_str_radix(v.trim_start_matches("0x"), 16)
                        .map_err(|_| "bad absent mask")?;
                } else if let Some(v) = kv(word, "rate") {
                    rate = match v {
                        "unlimited" => Rate::Unlimited,
                        "fast" => Rate::Fast,
                        "slow" => Rate::Slow,
                        _ => return Err("rate is unlimited, fast or slow".into()),
                    };
                } else if let Some(v) = kv(word, "clear") {
                    clear_ms = num(Some(v), "clear")?;
                } else if let Some(v) = kv(word, "hot") {
                    hot = num(Some(v), "hot")?;
                }
            }
            Event::Start {
                absent,
                rate,
                clear_ms,
                hot,
                force,
            }
        }
        "resolve" => Event::Resolve {
            keep: num(w.next(), "slot")?,
        },
        "stop" => Event::Stop,
        "fail" => Event::Fail {
            slot: num(w.next(), "slot")?,
        },
        "readd" => Event::Readd {
            slot: num(w.next(), "slot")?,
        },
        "add" => Event::Add,
        "remove" => Event::Remove {
            slot: num(w.next(), "slot")?,
        },
        "scrub" => Event::Scrub {
            repair: has("repair"),
            source: match rest.iter().find_map(|x| kv(x, "source")) {
                Some(s) => Some(s.parse().map_err(|_| "bad source")?),
                None => None,
            },
        },
        "fault" => {
            let slot = num(w.next(), "slot")?;
            let mut rule = FaultRule {
                ops: Vec::new(),
                range: None,
                kind: FaultKind::Eio,
                count: None,
                per_mille: 1000,
            };
            for word in &rest[1..] {
                if let Some(v) = kv(word, "ops") {
                    rule.ops = v
                        .split(',')
                        .map(|o| op_from(o).ok_or(format!("bad op {o}")))
                        .collect::<Result<_, _>>()?;
                } else if let Some(v) = kv(word, "range") {
                    if v != "any" {
                        let (a, b) = v.split_once("..").ok_or("bad range")?;
                        rule.range = Some(num(Some(a), "range")?..num(Some(b), "range")?);
                    }
                } else if let Some(v) = kv(word, "kind") {
                    rule.kind = match v {
                        "eio" => FaultKind::Eio,
                        "enospc" => FaultKind::Enospc,
                        h => {
                            let ms = h.strip_prefix("hang:").ok_or("bad fault kind")?;
                            FaultKind::Hang(Duration::from_millis(num(Some(ms), "hang")?))
                        }
                    };
                } else if let Some(v) = kv(word, "count") {
                    rule.count = if v == "inf" {
                        None
                    } else {
                        Some(num(Some(v), "count")?)
                    };
                } else if let Some(v) = kv(word, "p") {
                    rule.per_mille = num(Some(v), "p")?;
                }
            }
            Event::Fault { slot, rule }
        }
        "stall" => Event::Stall {
            slot: num(w.next(), "slot")?,
            ms: num(w.next(), "ms")?,
        },
        "gone" => Event::Gone {
            slot: num(w.next(), "slot")?,
        },
        "back" => Event::Back {
            slot: num(w.next(), "slot")?,
        },
        "blank" => Event::Blank {
            slot: num(w.next(), "slot")?,
        },
        "nopunch" => Event::NoPunch {
            slot: num(w.next(), "slot")?,
        },
        "heal" => Event::Heal {
            slot: num(w.next(), "slot")?,
        },
        "sleep" => Event::Sleep {
            ms: num(w.next(), "ms")?,
        },
        other => return Err(format!("unknown event {other:?}")),
    })
}

/// Parse a trace written by [`format_trace`] (blank lines and `#` comments skipped).
/// The first line may be `replicas N`.
pub fn parse_trace(text: &str) -> Result<(usize, Vec<Step>), String> {
    let mut replicas = 2;
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(n) = line.strip_prefix("replicas ") {
            replicas = n
                .trim()
                .parse()
                .map_err(|_| format!("line {}: bad replicas", i + 1))?;
            continue;
        }
        let mut w = line.splitn(3, ' ');
        let after = num(w.next(), "after").map_err(|e| format!("line {}: {e}", i + 1))?;
        let jitter_us = num(w.next(), "jitter").map_err(|e| format!("line {}: {e}", i + 1))?;
        let event =
            parse_event(w.next().unwrap_or("")).map_err(|e| format!("line {}: {e}", i + 1))?;
        steps.push(Step {
            after,
            jitter_us,
            event,
        });
    }
    Ok((replicas, steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_roundtrips() {
        let events = vec![
            Event::Read { block: 3, n: 2 },
            Event::Write {
                block: 1,
                n: 4,
                fua: true,
            },
            Event::Flush,
            Event::Trim { block: 0, n: 1 },
            Event::Zeroes {
                block: 5,
                n: 2,
                punch: true,
                fua: false,
            },
            Event::Settle,
            Event::Verify,
            Event::Crash {
                mode: CrashMode::LoseAll,
            },
            Event::Start {
                absent: 0x5,
                rate: Rate::Slow,
                clear_ms: 1500,
                hot: 4,
                force: true,
            },
            Event::start(0),
            Event::Resolve { keep: 1 },
            Event::Stop,
            Event::Fail { slot: 1 },
            Event::Readd { slot: 2 },
            Event::Add,
            Event::Remove { slot: 0 },
            Event::Scrub {
                repair: true,
                source: Some(1),
            },
            Event::Fault {
                slot: 1,
                rule: FaultRule {
                    ops: vec![OpKind::Write, OpKind::Sync],
                    range: Some(4096..8192),
                    kind: FaultKind::Hang(Duration::from_millis(2500)),
                    count: Some(2),
                    per_mille: 500,
                },
            },
            Event::Stall { slot: 0, ms: 100 },
            Event::Gone { slot: 0 },
            Event::Back { slot: 0 },
            Event::Blank { slot: 0 },
            Event::NoPunch { slot: 0 },
            Event::Heal { slot: 0 },
            Event::Sleep { ms: 5 },
        ];
        let steps: Vec<Step> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Step {
                after: i as u32,
                jitter_us: 7 * i as u32,
                event,
            })
            .collect();
        let text = format!("replicas 3\n{}", format_trace(&steps));
        let (replicas, back) = parse_trace(&text).unwrap();
        assert_eq!(replicas, 3);
        assert_eq!(back, steps);
    }
}
