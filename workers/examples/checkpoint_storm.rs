//! Many training stages checkpointing through one coordinator (issue 16, item 4): each of
//! `stages` leases saves a `mb` MB checkpoint every `period` seconds, `rounds` times, all at
//! once (the worst case), either synchronously (the stage waits for the store's commit) or
//! through the worker's background uploader. Prints how long stages were stalled per save and
//! how many write transactions the coordinator's batching writer used.
//!
//! `cargo run -p deeprepair-workers --example checkpoint_storm -- [stages] [mb] [period_s]
//! [rounds] [sync|async] [store dir]`

use deeprepair_pipeline::kind::{Task, TaskStore};
use deeprepair_pipeline::{Digest, Store};
use deeprepair_workers::coordinator::{Coordinator, Route};
use deeprepair_workers::protocol::{ClaimRequest, WorkerInfo};
use deeprepair_workers::worker::{Client, HttpStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let stages: usize = arg(0, "64").parse()?;
    let mb: usize = arg(1, "20").parse()?;
    let period = Duration::from_secs_f64(arg(2, "10").parse()?);
    let rounds: usize = arg(3, "3").parse()?;
    let asynchronous = arg(4, "async") == "async";
    let dir = tempfile::tempdir_in(arg(5, "/tmp"))?;
    let store = Arc::new(Store::open_writer(&dir.path().join("store.redb"))?);
    let coordinator = Coordinator::start(
        store,
        "127.0.0.1:0".parse()?,
        None,
        Duration::from_secs(600),
    )?;
    let mut tickets = vec![];
    for i in 0..stages {
        let task = Task {
            key: Digest::of(format!("stage {i}").as_bytes()),
            kind: "util.work".into(),
            stage: format!("train[{i}]"),
            params: serde_json::json!({}),
            inputs: Default::default(),
            attempt: 0,
        };
        tickets.push(coordinator.submit(&task, Route::Any, 1, vec![]));
    }
    let started = Instant::now();
    let threads: Vec<_> = (0..stages)
        .map(|i| {
            let client = Client::new(coordinator.url(), coordinator.token());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let req = ClaimRequest {
                    worker: WorkerInfo {
                        name: format!("w{i}"),
                        host: "bench".into(),
                        pid: 0,
                        gpu: None,
                    },
                    task: None,
                    wait_ms: 5000,
                };
                let claim = client.claim(&req)?.expect("a job per stage");
                let key = claim.task.key;
                let lease = claim.key();
                let store = HttpStore::new(client.clone(), lease.clone(), None);
                let mut stalls = vec![];
                for round in 0..rounds {
                    let due = started + period * round as u32;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let bytes = vec![(round + i) as u8; mb << 20];
                    let t = Instant::now();
                    if asynchronous {
                        store.save_checkpoint(&key, &bytes)?;
                    } else {
                        client.save_checkpoint(&lease, &bytes)?;
                    }
                    stalls.push(t.elapsed());
                }
                store.flush_checkpoints()?;
                client.complete(&lease, &[], &[])?;
                Ok(stalls)
            })
        })
        .collect();
    let mut stalls = vec![];
    for t in threads {
        stalls.extend(t.join().expect("stage thread")?);
    }
    let wall = started.elapsed();
    stalls.sort();
    let t = coordinator.traffic();
    let pct = |p: f64| stalls[((stalls.len() - 1) as f64 * p) as usize].as_secs_f64();
    println!(
        "{} stages x {mb} MB every {:?} x {rounds} rounds, {}: stall per save p50 {:.3} s, \
         p90 {:.3} s, max {:.3} s; all {} checkpoints in the store after {:.1} s; {} write \
         transactions",
        stages,
        period,
        if asynchronous {
            "async uploads"
        } else {
            "synchronous"
        },
        pct(0.5),
        pct(0.9),
        pct(1.0),
        stalls.len(),
        wall.as_secs_f64(),
        t.checkpoint_transactions
    );
    drop(tickets);
    Ok(())
}
