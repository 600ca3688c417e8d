//! Progress display: indicatif bars on a terminal (overall stages done/total, one bar per
//! running stage with rate and ETA); plain `tracing` lines otherwise.

use crate::kind::ProgressSink;
use crate::store::StageState;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    bars: Option<Bars>,
    /// Non-TTY: last time each stage logged progress, to rate-limit lines.
    last_line: Mutex<HashMap<String, Instant>>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    stages: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress {
    /// Bars when stderr is a terminal (unless `plain`), lines otherwise.
    pub fn new(total_stages: u64, plain: bool) -> Progress {
        let bars = (!plain && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
            let overall = multi.add(ProgressBar::new(total_stages));
            overall.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} stages {elapsed_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            overall.set_prefix("run");
            Bars {
                multi,
                overall,
                stages: Mutex::new(HashMap::new()),
            }
        });
        Progress {
            bars,
            last_line: Mutex::new(HashMap::new()),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bars {
            for (_, bar) in b.stages.lock().expect("progress lock").drain() {
                bar.finish_and_clear();
            }
            b.overall.finish();
        }
    }
}

impl ProgressSink for Progress {
    fn progress(&self, stage: &str, done: u64, total: u64, unit: &str) {
        match &self.bars {
            Some(b) => {
                let mut stages = b.stages.lock().expect("progress lock");
                let bar = stages.entry(stage.to_string()).or_insert_with(|| {
                    let bar = b.multi.add(ProgressBar::new(total));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  {msg:40!} [{bar:25}] {pos}/{len} {prefix} {per_sec} eta {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_message(stage.to_string());
                    bar.set_prefix(unit.to_string());
                    bar
                });
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                let mut last = self.last_line.lock().expect("progress lock");
                let due = last
                    .get(stage)
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
                if due || done == total {
                    last.insert(stage.to_string(), Instant::now());
                    tracing::info!("{stage}: {done}/{total} {unit}");
                }
            }
        }
    }

    fn stage_finished(&self, stage: &str, state: StageState) {
        match &self.bars {
            Some(b) => {
                b.overall.inc(1);
                if let Some(bar) = b.stages.lock().expect("progress lock").remove(stage) {
                    bar.finish_and_clear();
                }
                if state != StageState::Cached {
                    b.multi.suspend(|| eprintln!("{stage}: {state:?}"));
                }
            }
            None if state == StageState::Cached => tracing::debug!("{stage}: cached"),
            None => tracing::info!("{stage}: {state:?}"),
        }
    }

    fn log(&self, stage: &str, line: &str) {
        match &self.bars {
            Some(b) => b.multi.suspend(|| eprintln!("{stage}: {line}")),
            None => tracing::info!("{stage}: {line}"),
        }
    }
}
