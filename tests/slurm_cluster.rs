//! `run --slurm` against a real single-node Slurm cluster (munged, slurmctld, slurmd started
//! by tests/slurm/start-cluster.sh): every stage becomes an `sbatch` job whose worker talks to
//! this run's coordinator over HTTP; a job cancelled mid-stage is resubmitted and resumes from
//! its checkpoint; GPU stages ask Slurm for `--gres=gpu:N`. Then, on the same cluster: one
//! `squeue` per poll for all jobs; Slurm stages take none of the head's CPU/memory budget and
//! `--max-jobs` bounds them; a SIGKILLed run's jobs are cancelled by the next run, SIGTERM
//! leaves no job; per-kind and per-stage resources reach each job; a job that can never
//! start is reported. Beside it, on clusters of their own: a TIMEOUT is retried with more time;
//! two nodes in network namespaces share stages, run a gang across them and survive a node's
//! death (NODE_FAIL, resubmitted uncounted, resumed on the other node).
//!
//! Needs root and the Slurm packages (`tests/slurm/install.sh`; `.ci/run` installs them and
//! sets DEEPREPAIR_REQUIRE_SLURM=1, so CI fails rather than skips when Slurm is missing).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PIPELINE: &str = r#"
grid:
  seed: [1, 2, 3]
stages:
  source:
    kind: util.text
    params: {text: "slurm test"}
  train:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 60, step_ms: 100, checkpoint_every: 5, size: 300000}
    resources: {cpus: 1, mem_mb: 256}
  gpu-stage:
    kind: util.work
    inputs: {after: source}
    params: {steps: 2, label: gpu}
    resources: {cpus: 1, gpus: 1, mem_mb: 256}
  report:
    kind: util.concat
    inputs: {parts: [{from: train, all: true}, gpu-stage]}
"#;

struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// `None` (the test is skipped) when Slurm is not installed and not required.
    fn start() -> Option<Cluster> {
        // Declared bigger than the machine (SlurmdParameters=config_overrides), so that more
        // jobs run at once than this machine has cores or memory for the head's budget.
        Cluster::start_with(&[("SLURM_TEST_CPUS", "8"), ("SLURM_TEST_MEM_MB", "64000")])
    }

    fn start_with(env: &[(&str, &str)]) -> Option<Cluster> {
        let have = Command::new("sh")
            .args(["-c", "command -v sbatch && command -v slurmctld"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !have {
            assert!(
                std::env::var("DEEPREPAIR_REQUIRE_SLURM").is_err(),
                "DEEPREPAIR_REQUIRE_SLURM is set but Slurm is not installed (tests/slurm/install.sh)"
            );
            eprintln!("SKIPPED: Slurm is not installed (run tests/slurm/install.sh as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap().keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/start-cluster.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start-cluster.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Cluster { dir })
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    /// The address compute nodes reach this machine at.
    fn head_address(&self) -> String {
        std::fs::read_to_string(self.dir.join("ctld-addr"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn scontrol(&self, args: &[&str]) {
        let status = Command::new("scontrol")
            .env("SLURM_CONF", self.conf())
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "scontrol {args:?}");
    }

    fn squeue(&self, args: &[&str]) -> String {
        let out = Command::new("squeue")
            .env("SLURM_CONF", self.conf())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/stop-cluster.sh");
        let _ = Command::new("bash").arg(&script).arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn stages_run_as_slurm_jobs_and_survive_a_cancelled_job() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let expected = in_process_outputs(PIPELINE);
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let started = Instant::now();
    // Every squeue the run makes is logged: one per poll for all of its jobs.
    let calls = s.path().join("squeue-calls.log");
    let wrappers = squeue_logging_to(&s, &calls);
    let run = bin()
        .env("SLURM_CONF", cluster.conf())
        .env("DEEPREPAIR_LOG", "info")
        .env("PATH", path_with(&wrappers))
        .args(["run", "--plain", "--slurm", "--lease-timeout", "10"])
        .args(["--slurm-poll", "1"])
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Cancel a job that has been running for 3 s: a train stage (6 s), past a checkpoint.
    let victim = loop {
        let running = cluster.squeue(&["-h", "-t", "RUNNING", "-o", "%i %M"]);
        let long = running.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next()?;
            let (min, sec) = fields.next()?.split_once(':')?;
            let secs = min.parse::<u64>().ok()? * 60 + sec.parse::<u64>().ok()?;
            (secs >= 3).then(|| id.to_string())
        });
        if let Some(id) = long {
            break id;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no Slurm job started running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let cancelled = Command::new("scancel")
        .env("SLURM_CONF", cluster.conf())
        .arg(&victim)
        .status()
        .unwrap();
    assert!(cancelled.success());

    let out = run.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "slurm run failed:\n{log}");
    assert_eq!(outputs(&m), expected, "same artifacts as an in-process run");
    // Five jobs, at times four at once, but one squeue per second (and one at the start for
    // jobs of earlier runs), not one per job.
    let calls = std::fs::read_to_string(&calls).unwrap_or_default();
    let polls = calls.lines().count();
    assert!(
        polls >= 2 && polls as f64 <= seconds + 2.0,
        "{polls} squeue calls in {seconds:.1} s with --slurm-poll 1:\n{calls}"
    );
    assert!(
        calls.lines().skip(1).all(|l| l.contains("--name")),
        "each poll asks for the run's jobs by name:\n{calls}"
    );

    let rows = status_rows(&m);
    for row in &rows {
        let worker = row["worker"].as_str().unwrap();
        assert!(worker.starts_with("slurm:"), "ran as a Slurm job: {row}");
    }
    // The cancelled job's stage was resubmitted (its job ended without reporting) and the
    // new job resumed from the checkpoint the first one committed.
    let retried: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["attempt"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(
        retried.len(),
        1,
        "the cancelled stage ran again: {rows:?}\n{log}"
    );
    assert!(
        log.contains(&format!("Slurm job {victim} ended")),
        "the coordinator noticed job {victim}:\n{log}"
    );
    let stage = retried[0]["stage"].as_str().unwrap();
    assert!(stage.starts_with("train"), "{stage}");
    let store = s.path().join(".deeprepair/store.redb");
    let inspect = run_ok(&["inspect", stage, "--store", store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    let victim_log = std::fs::read_to_string(
        s.path()
            .join(format!(".deeprepair/slurm-logs/slurm-{victim}.log")),
    )
    .unwrap_or_default();
    assert!(
        text.contains("resumed from checkpoint at step"),
        "{text}\ncancelled job's log:\n{victim_log}\nrun log:\n{log}"
    );

    // The GPU stage's job asked Slurm for a GPU and got one (the cluster declares 2).
    let jobs = cluster.squeue(&["-h", "-t", "all", "-o", "%i|%b|%T"]);
    assert!(
        jobs.lines()
            .any(|l| l.contains("gpu:1") && l.ends_with("COMPLETED")),
        "a completed job with gres gpu:1:\n{jobs}"
    );

    slurm_stages_take_none_of_the_heads_budget(&cluster);
    orphans_are_cancelled_and_sigterm_leaves_no_job(&cluster);
    stage_resources_become_the_jobs_requests(&cluster);
    a_job_that_can_never_start_is_reported(&cluster);
    data_parallel_stage_is_one_job_of_a_task_per_rank(&cluster);
}

/// A folder with an `squeue` that appends its arguments to `log` and runs the real one.
fn squeue_logging_to(s: &Scratch, log: &Path) -> PathBuf {
    let real = Command::new("sh")
        .args(["-c", "command -v squeue"])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    let dir = s.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("squeue");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{real}' \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The most stages of a run that were in flight at once, from their records' start and end.
fn peak_in_flight(rows: &[serde_json::Value]) -> usize {
    let mut edges: Vec<(u64, i32)> = vec![];
    for r in rows {
        if let (Some(a), Some(b)) = (r["started_ms"].as_u64(), r["ended_ms"].as_u64()) {
            edges.push((a, 1));
            edges.push((b, -1));
        }
    }
    // An end and a start in the same millisecond: the end first.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

/// Stages that run as Slurm jobs take none of the head's CPU or memory budget: four stages
/// of 20 GB each (more than this machine's memory for two) run three at a time under
/// `--max-jobs 3` with `--jobs 1`, and never four.
fn slurm_stages_take_none_of_the_heads_budget(cluster: &Cluster) {
    let manifest = r#"
grid:
  seed: [1, 2, 3, 4]
stages:
  big:
    kind: util.work
    over: [seed]
    params: {steps: 40, step_ms: 100}
    resources: {cpus: 1, mem_mb: 20000}
"#;
    let s = Scratch::new();
    let m = s.write("big.yaml", manifest);
    let mut run = bin()
        .env("SLURM_CONF", cluster.conf())
        .args([
            "run",
            "--plain",
            "--slurm",
            "--jobs",
            "1",
            "--max-jobs",
            "3",
        ])
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak_running = 0;
    while run.try_wait().unwrap().is_none() {
        let running = cluster.squeue(&["-h", "-t", "RUNNING", "-o", "%i"]);
        peak_running = peak_running.max(running.lines().count());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "slurm run failed:\n{log}");
    let rows = status_rows(&m);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(
        peak_in_flight(&rows),
        3,
        "--max-jobs 3 bounds the jobs in flight, the head's budget does not: {rows:?}"
    );
    assert!(
        peak_running >= 3,
        "Slurm ran three 20 GB stages at once (saw {peak_running})"
    );
}

/// Two ranks as the two tasks of one Slurm job (`srun` starts a worker per task; they meet
/// through the coordinator and reduce over TCP) give the bytes two ranks as threads give.
fn data_parallel_stage_is_one_job_of_a_task_per_rank(cluster: &Cluster) {
    let Some(data) = data_dir() else {
        eprintln!("SKIPPED the data-parallel part: no ../shared/data/cifar10-lossless-subset");
        return;
    };
    let manifest = r#"
name: slurm-gang
vars:
  data: UNSET
stages:
  train-data: {kind: dataset, params: {path: "${data}", split: train, per_class: 20}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 2, batch: 16, lr: 0.05, ranks: 2}
    inputs: {train: train-data}
"#;
    let data = data.to_str().unwrap();
    let threads = in_process_outputs_with(manifest, &["--data", data]);
    let s = Scratch::new();
    let m = s.write("m.yaml", manifest);
    let out = bin()
        .env("SLURM_CONF", cluster.conf())
        .env("DEEPREPAIR_LOG", "info")
        .args([
            "run",
            "--plain",
            "--slurm",
            m.to_str().unwrap(),
            "--data",
            data,
        ])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "slurm run failed:\n{log}");
    for wanted in [
        "of 2 tasks, one per rank",
        "rank 1: data-parallel: rank 1 of 2 (one per worker process)",
        "data-parallel reduction: TCP between worker processes",
    ] {
        assert!(log.contains(wanted), "no '{wanted}' in:\n{log}");
    }
    assert_eq!(
        outputs(&m)["base.model"],
        threads["base.model"],
        "ranks as Slurm tasks differ from ranks as threads"
    );
    let base = status_rows(&m)
        .into_iter()
        .find(|r| r["stage"] == "base")
        .unwrap();
    let worker = base["worker"].as_str().unwrap();
    assert!(
        worker.starts_with("slurm:") && worker.contains(" + "),
        "{worker}"
    );
}

/// This store's jobs still queued or running: (id, name).
fn live_jobs(cluster: &Cluster) -> Vec<(String, String)> {
    cluster
        .squeue(&["-h", "-t", "PENDING,RUNNING", "-o", "%i|%j"])
        .lines()
        .filter_map(|l| {
            let (id, name) = l.trim().split_once('|')?;
            name.starts_with("dr-")
                .then(|| (id.to_string(), name.to_string()))
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `run` killed with SIGKILL leaves its jobs running; the next `run` of the same store
/// cancels them and says so. SIGTERM to a `run` cancels its jobs like Ctrl-C: none is left.
fn orphans_are_cancelled_and_sigterm_leaves_no_job(cluster: &Cluster) {
    let manifest = r#"
grid:
  seed: [1, 2]
stages:
  long:
    kind: util.work
    over: [seed]
    params: {steps: 600, step_ms: 100, checkpoint_every: 10}
    resources: {cpus: 1, mem_mb: 256}
"#;
    let s = Scratch::new();
    let m = s.write("long.yaml", manifest);
    let start = |log: &str| {
        let log = std::fs::File::create(s.path().join(log)).unwrap();
        bin()
            .env("SLURM_CONF", cluster.conf())
            .args(["run", "--plain", "--slurm", "--slurm-poll", "0.5"])
            .arg(&m)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let running = |n: usize| {
        move || {
            cluster
                .squeue(&["-h", "-t", "RUNNING", "-o", "%j"])
                .lines()
                .filter(|l| l.starts_with("dr-"))
                .count()
                >= n
        }
    };
    assert!(live_jobs(cluster).is_empty(), "{:?}", live_jobs(cluster));

    let mut first = start("first.log");
    wait_until(
        "the first run's jobs run",
        Duration::from_secs(60),
        running(2),
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let orphans = live_jobs(cluster);
    assert_eq!(
        orphans.len(),
        2,
        "SIGKILL leaves the jobs behind: {orphans:?}"
    );

    let second = start("second.log");
    let log = || std::fs::read_to_string(s.path().join("second.log")).unwrap_or_default();
    wait_until(
        "the second run cancels the orphans",
        Duration::from_secs(30),
        || log().contains("cancelled 2 Slurm job(s) left by earlier run(s) r1 of this store"),
    );
    for (id, _) in &orphans {
        assert!(log().contains(id.as_str()), "names job {id}: {}", log());
    }
    wait_until("the second run's jobs run", Duration::from_secs(60), || {
        let live = live_jobs(cluster);
        live.len() == 2
            && live
                .iter()
                .all(|(id, _)| !orphans.iter().any(|(o, _)| o == id))
    });

    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", log());
    assert!(log().contains("SIGTERM: no new stages"), "{}", log());
    wait_until(
        "no job of the store is left",
        Duration::from_secs(30),
        || live_jobs(cluster).is_empty(),
    );
}

/// Per-kind and per-stage `resources:` (time, partition, constraint, extra sbatch options)
/// reach each stage's own job: Slurm shows them.
fn stage_resources_become_the_jobs_requests(cluster: &Cluster) {
    let manifest = r#"
resources:
  util.work: {time: "10", constraint: testfeat}
stages:
  quick:
    kind: util.work
    params: {steps: 3, step_ms: 100, label: quick}
    resources: {partition: debug, sbatch_args: ["--nice=7"]}
  longer:
    kind: util.work
    params: {steps: 3, step_ms: 100, label: longer}
    resources: {time: "0:02:00"}
"#;
    let s = Scratch::new();
    let m = s.write("res.yaml", manifest);
    let out = bin()
        .env("SLURM_CONF", cluster.conf())
        .args(["run", "--plain", "--slurm", "--slurm-poll", "0.5"])
        .args(["--sbatch-arg=--time=3:00:00", "--sbatch-arg=--nice=1"])
        .arg(&m)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    // comment | time limit | features | partition | nice
    let jobs = cluster.squeue(&["-h", "-t", "all", "-o", "%k|%l|%f|%P|%y"]);
    let job = |stage: &str| {
        jobs.lines()
            .find(|l| l.starts_with(&format!("deeprepair stage={stage} ")))
            .unwrap_or_else(|| panic!("no job of {stage} in:\n{jobs}"))
            .split('|')
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // The kind's time wins over the run's --sbatch-arg, the stage's over the kind's.
    assert_eq!(job("quick"), ["10:00", "testfeat", "debug", "7"], "{jobs}");
    assert_eq!(job("longer"), ["2:00", "testfeat", "debug", "1"], "{jobs}");
}

/// A job that waits for what its partition never grants one job (here 5 minutes in a
/// partition of 1) fails its stage with Slurm's reason instead of waiting forever, and is
/// cancelled.
fn a_job_that_can_never_start_is_reported(cluster: &Cluster) {
    let manifest = r#"
stages:
  stuck:
    kind: util.work
    params: {steps: 1}
    resources: {partition: tiny, time: "5"}
"#;
    let s = Scratch::new();
    let m = s.write("stuck.yaml", manifest);
    let started = Instant::now();
    let mut run = bin()
        .env("SLURM_CONF", cluster.conf())
        .args(["run", "--plain", "--slurm", "--slurm-poll", "0.5"])
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while run.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            run.kill().unwrap();
            panic!("the run waited over a minute on a job that can never start");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("can never start (pending: PartitionTimeLimit); cancelled"),
        "{log}"
    );
    wait_until(
        "the stuck job is cancelled",
        Duration::from_secs(30),
        || live_jobs(cluster).is_empty(),
    );
}

/// A job that runs out of its time limit is retried with twice the time, and the retry
/// resumes from the last checkpoint. Its own cluster, beside the other test: Slurm's limits
/// are whole minutes, so this takes two or three.
#[test]
fn a_timed_out_job_is_retried_with_more_time() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    // 150 s of work in a 1-minute limit (Slurm ends it 60-90 s in), then in 2 minutes.
    let manifest = r#"
stages:
  slow:
    kind: util.work
    params: {steps: 150, step_ms: 1000, checkpoint_every: 5}
    resources: {time: "1", mem_mb: 256}
"#;
    let s = Scratch::new();
    let m = s.write("slow.yaml", manifest);
    let out = bin()
        .env("SLURM_CONF", cluster.conf())
        .env("DEEPREPAIR_LOG", "info")
        .args(["run", "--plain", "--slurm", "--slurm-poll", "1"])
        .arg(&m)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(
            "(TIMEOUT) without reporting; it ran out of time: the next job asks for 0-00:02:00"
        ),
        "{log}"
    );
    assert!(log.contains("with 256 MB, time 0-00:02:00"), "{log}");
    let store = s.path().join(".deeprepair/store.redb");
    let inspect = run_ok(&["inspect", "slow", "--store", store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("resumed from checkpoint at step"), "{text}");
    let jobs = cluster.squeue(&["-h", "-t", "all", "-o", "%l|%T"]);
    assert!(jobs.lines().any(|l| l == "1:00|TIMEOUT"), "{jobs}");
    assert!(jobs.lines().any(|l| l == "2:00|COMPLETED"), "{jobs}");
}

/// Two compute nodes on this machine, each `slurmd` in a network namespace of its own with
/// its own address, `run` reaching them over a bridge: stages spread over both; a node that
/// dies mid-stage (every process in its namespace killed, the node marked down as slurmctld
/// would after SlurmdTimeout) ends its job NODE_FAIL, and the stage is submitted again, not
/// counted as a retry, runs on the other node and resumes from its checkpoint; a 2-rank gang
/// asked to spread over 2 nodes runs a rank on each (TCP between them) and gives the bytes
/// two ranks as threads give.
#[test]
fn two_nodes_share_the_stages_and_survive_a_node_failure() {
    let Some(cluster) = Cluster::start_with(&[("SLURM_TEST_NODES", "2"), ("SLURM_TEST_GPUS", "0")])
    else {
        return;
    };
    let head = cluster.head_address();
    let run = |m: &Path, extra: &[&str]| {
        bin()
            .env("SLURM_CONF", cluster.conf())
            .env("DEEPREPAIR_LOG", "info")
            .args([
                "run",
                "--plain",
                "--slurm",
                "--slurm-poll",
                "0.5",
                "--advertise",
            ])
            .arg(&head)
            .args(extra)
            .arg(m)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "run failed:\n{log}");
        log
    };

    // Four stages of 2 CPUs on two nodes of 2 CPUs (as slurmd sees this machine): both nodes.
    let s = Scratch::new();
    let m = s.write(
        "spread.yaml",
        r#"
grid:
  seed: [1, 2, 3, 4]
stages:
  w:
    kind: util.work
    over: [seed]
    params: {steps: 20, step_ms: 100}
    resources: {cpus: 2, mem_mb: 256}
"#,
    );
    finish(run(&m, &[]));
    let nodes = cluster.squeue(&["-h", "-t", "all", "-o", "%N"]);
    for node in ["n1", "n2"] {
        assert!(nodes.lines().any(|l| l.trim() == node), "{node}:\n{nodes}");
    }

    // A 2-rank gang over both nodes: a rank on each, TCP between them across the bridge.
    if let Some(data) = data_dir() {
        let manifest = r#"
name: slurm-gang
vars:
  data: UNSET
stages:
  train-data: {kind: dataset, params: {path: "${data}", split: train, per_class: 20}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 2, batch: 16, lr: 0.05, ranks: 2}
    inputs: {train: train-data}
    resources: {cpus: 2, nodes: 2}
"#;
        let data = data.to_str().unwrap();
        let threads = in_process_outputs_with(manifest, &["--data", data]);
        let s = Scratch::new();
        let m = s.write("gang.yaml", manifest);
        let log = finish(run(&m, &["--data", data, "--slurm-cpu-only"]));
        assert!(log.contains("of 2 tasks, one per rank"), "{log}");
        assert_eq!(
            outputs(&m)["base.model"],
            threads["base.model"],
            "ranks on two nodes differ from ranks as threads"
        );
        // (The job may still be ending: its workers report before they exit.)
        let jobs = cluster.squeue(&["-h", "-t", "all", "-o", "%D|%N"]);
        assert!(
            jobs.lines().any(|l| l == "2|n[1-2]"),
            "a job over both nodes:\n{jobs}"
        );
    } else {
        eprintln!("SKIPPED the two-node gang: no ../shared/data/cifar10-lossless-subset");
    }

    // A node dies under a running stage.
    let s = Scratch::new();
    let m = s.write(
        "long.yaml",
        r#"
stages:
  long:
    kind: util.work
    params: {steps: 100, step_ms: 100, checkpoint_every: 5}
    resources: {cpus: 2, mem_mb: 256}
"#,
    );
    let child = run(&m, &[]);
    let mut victim = None;
    wait_until("the stage runs 3 s", Duration::from_secs(60), || {
        let running = cluster.squeue(&["-h", "-t", "RUNNING", "-o", "%i %N %M %k"]);
        victim = running.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // (The gang's job may still be ending.)
            if f.get(4) != Some(&"stage=long") {
                return None;
            }
            let (min, sec) = f.get(2)?.split_once(':')?;
            let secs = min.parse::<u64>().ok()? * 60 + sec.parse::<u64>().ok()?;
            (secs >= 3).then(|| (f[0].to_string(), f[1].to_string()))
        });
        victim.is_some()
    });
    let (job, node) = victim.unwrap();
    let port = std::fs::read_to_string(cluster.conf())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SlurmctldPort=").map(str::to_string))
        .unwrap();
    let netns = format!("dr{port}-{node}");
    let pids = Command::new("ip")
        .args(["netns", "pids", &netns])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    cluster.scontrol(&[
        "update",
        &format!("nodename={node}"),
        "state=down",
        "reason=killed by the test",
    ]);
    let log = finish(child);
    assert!(
        log.contains(&format!("Slurm job {job} ended (NODE_FAIL)"))
            && log.contains("not counted as a retry"),
        "{log}"
    );
    let rows = status_rows(&m);
    assert_eq!(
        rows[0]["attempt"].as_u64(),
        Some(0),
        "not counted: {rows:?}"
    );
    let store = s.path().join(".deeprepair/store.redb");
    let inspect = run_ok(&["inspect", "long", "--store", store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("resumed from checkpoint at step"),
        "{text}\n{log}"
    );
    let other = if node == "n1" { "n2" } else { "n1" };
    let jobs = cluster.squeue(&["-h", "-t", "all", "-o", "%i %N %T"]);
    assert!(
        jobs.lines()
            .any(|l| l.ends_with(&format!("{other} COMPLETED")) && !l.starts_with(&job)),
        "the stage ended on {other}:\n{jobs}"
    );
}
