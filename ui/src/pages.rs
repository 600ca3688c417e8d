//! The pages over runs and stages: the runs list, a run (DAG + stage table), a stage, and the
//! comparison of two stages.

use crate::dag::{self, state_name};
use crate::viewers::{artifact_link, metric_numbers};
use crate::{App, UiError, UiResult};
use axum::extract::{Path, Query, State};
use axum::response::Html;
use deeprepair_pipeline::store::{now_ms, ActionRecord, RunRecord, StageRunRecord, StageState};
use deeprepair_pipeline::{Digest, Store};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Seconds between refreshes of a page that shows a running run.
pub const REFRESH_SECS: u32 = 2;

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:0;color:#111827;background:#fafafa}
header{background:#1f2937;color:#fff;padding:.5em 1em}header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:1em}h1{font-size:1.3em}h1.mono{font-size:1.2em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #d1d5db;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f4f6}code,.mono{font-family:monospace;font-size:.9em}pre{background:#f3f4f6;padding:.5em;overflow:auto;max-height:40em}
.state{padding:0 .4em;border-radius:3px;font-size:.9em}.error{color:#b91c1c;white-space:pre-wrap}
.bar{display:inline-block;width:10em;height:.8em;background:#e5e7eb;vertical-align:middle}.bar span{display:block;height:100%;background:#22c55e}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:96px;font-size:11px;text-align:center}
.sheet img{width:96px;height:96px;image-rendering:pixelated;display:block}.wrong{color:#b91c1c}
.dagbox{overflow:auto;border:1px solid #d1d5db;background:#fff;max-height:70vh}.diff{background:#fef3c7}
.cols{display:flex;gap:2em;flex-wrap:wrap}.heat td{text-align:right;min-width:2.5em}
"#;

/// The page frame: title, header links, an optional self-refresh.
pub fn layout(title: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if let Some(s) = refresh { meta http-equiv="refresh" content=(s); }
                title { (title) " · deeprepair" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { a href="/" { "deeprepair" } " · " (title) }
                main { (body) }
            }
        }
    }
}

/// RFC 3339 seconds, as the CLI prints.
pub fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn seconds(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if s < 120.0 {
        format!("{s:.1}s")
    } else if s < 7200.0 {
        format!("{:.1}min", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

pub fn enc(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

pub fn stage_href(run: u64, stage: &str) -> String {
    format!("/runs/{run}/stage?path={}", enc(stage))
}

fn state_badge(state: StageState) -> Markup {
    html! {
        span class="state" style=(format!("background:{}", dag::state_colour(state))) { (state_name(state)) }
    }
}

/// The template a stage path was expanded from: `augmix[corruption=fog,seed=1]` → `augmix`.
pub fn template(path: &str) -> &str {
    path.split('[').next().unwrap_or(path)
}

/// A run's counts, by state.
struct Counts {
    executed: usize,
    cached: usize,
    failed: usize,
    running: usize,
    pending: usize,
    skipped: usize,
}

fn counts(stages: &[StageRunRecord]) -> Counts {
    let n = |s: StageState| stages.iter().filter(|r| r.state == s).count();
    Counts {
        executed: n(StageState::Succeeded),
        cached: n(StageState::Cached),
        failed: n(StageState::Failed),
        running: n(StageState::Running),
        pending: n(StageState::Pending),
        skipped: n(StageState::Skipped),
    }
}

fn find_run(store: &Store, id: u64) -> UiResult<RunRecord> {
    store
        .runs()?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| UiError::NotFound(format!("no run {id} in the store")))
}

fn wall_ms(run: &RunRecord) -> u64 {
    run.ended_ms
        .unwrap_or_else(now_ms)
        .saturating_sub(run.started_ms)
}

/// Runs blocking store reads off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> UiResult<T> + Send + 'static,
) -> UiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UiError::Internal(format!("page worker: {e}")))?
}

pub async fn runs(State(app): State<Arc<App>>) -> UiResult<Html<String>> {
    blocking(move || {
        let mut runs = app.store.runs()?;
        runs.reverse();
        let mut rows = vec![];
        for run in &runs {
            let stages = app.store.stage_runs(run.id)?;
            rows.push((run.state_label(), counts(&stages), stages.len()));
        }
        let any_running = rows.iter().any(|(s, _, _)| s == "running");
        let body = html! {
            h1 { "Runs" }
            p { "Store " code { (app.store.path().display()) } ", " (runs.len()) " runs." }
            table id="runs" {
                tr { th { "run" } th { "manifest" } th { "state" } th { "started" } th { "ended" }
                     th { "wall time" } th { "executed" } th { "cached" } th { "failed" } th { "progress" } }
                @for (run, (label, c, total)) in runs.iter().zip(&rows) {
                    @let done = c.executed + c.cached + c.failed + c.skipped;
                    tr class=(format!("run {label}")) {
                        td { a href=(format!("/runs/{}", run.id)) { "run " (run.id) } }
                        td class="mono" { (run.manifest) }
                        td { (label) }
                        td { (when(run.started_ms)) }
                        td { @if let Some(e) = run.ended_ms { (when(e)) } }
                        td { (seconds(wall_ms(run))) }
                        td { (c.executed) }
                        td { (c.cached) }
                        td { (c.failed) }
                        td {
                            span class="bar" { span style=(format!("width:{}%", if *total == 0 { 100 } else { done * 100 / total })) {} }
                            " " (done) "/" (total)
                            @if c.running > 0 { " (" (c.running) " running)" }
                        }
                    }
                }
            }
        };
        let refresh = any_running.then_some(REFRESH_SECS);
        Ok(Html(layout("runs", refresh, body).into_string()))
    })
    .await
}

/// The edges of a run's DAG: the records' `deps`, or, for records written before they were
/// kept, the producers of each finished stage's input digests within the run.
fn with_deps(store: &Store, mut stages: Vec<StageRunRecord>) -> UiResult<Vec<StageRunRecord>> {
    if stages.iter().any(|s| !s.deps.is_empty()) {
        return Ok(stages);
    }
    let producer: BTreeMap<Digest, String> = stages
        .iter()
        .flat_map(|s| s.outputs.values().map(move |d| (*d, s.stage.clone())))
        .collect();
    for s in stages.iter_mut() {
        if let Some(action) = s.key.map(|k| store.action(&k)).transpose()?.flatten() {
            let deps: BTreeSet<String> = action
                .inputs
                .values()
                .flatten()
                .filter_map(|d| producer.get(d).cloned())
                .collect();
            s.deps = deps.into_iter().collect();
        }
    }
    Ok(stages)
}

pub async fn run(State(app): State<Arc<App>>, Path(id): Path<u64>) -> UiResult<Html<String>> {
    blocking(move || {
        let run = find_run(&app.store, id)?;
        let stages = with_deps(&app.store, app.store.stage_runs(id)?)?;
        let label = run.state_label();
        let c = counts(&stages);
        let body = html! {
            h1 { "Run " (run.id) ": " span class="mono" { (run.manifest) } }
            p id="summary" {
                "State " strong id="run-state" { (label) } ", started " (when(run.started_ms))
                @if let Some(e) = run.ended_ms { ", ended " (when(e)) }
                ", wall time " (seconds(wall_ms(&run))) ". "
                (stages.len()) " stages: " (c.executed) " executed, " (c.cached) " cached, "
                (c.failed) " failed, " (c.running) " running, " (c.pending) " pending, "
                (c.skipped) " skipped."
            }
            @if let Some(e) = &run.error { p class="error" { "Run error: " (e) } }
            p { a href=(format!("/runs/{id}/compare")) { "Compare two stages" } }
            h2 { "DAG" }
            div class="dagbox" { (dag::svg(&stages, |s| stage_href(id, s))) }
            h2 { "Stages" }
            table id="stages" {
                tr { th { "stage" } th { "kind" } th { "state" } th { "time" } th { "worker" } th { "attempt" } th { "error" } }
                @for s in &stages {
                    tr data-stage=(s.stage) {
                        td class="mono" { a href=(stage_href(id, &s.stage)) { (s.stage) } }
                        td { (s.kind) }
                        td { (state_badge(s.state)) }
                        td { (stage_time(s)) }
                        td { (s.worker.clone().unwrap_or_default()) }
                        td { @if s.started_ms.is_some() { (s.attempt + 1) } }
                        td class="error" { (s.error.as_deref().map(first_line).unwrap_or_default()) }
                    }
                }
            }
        };
        let refresh = (label == "running").then_some(REFRESH_SECS);
        Ok(Html(layout(&format!("run {id}"), refresh, body).into_string()))
    })
    .await
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(160)
        .collect()
}

fn stage_time(s: &StageRunRecord) -> String {
    match (s.started_ms, s.ended_ms) {
        (Some(a), Some(b)) => seconds(b.saturating_sub(a)),
        (Some(a), None) => format!("{} …", seconds(now_ms().saturating_sub(a))),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
pub struct StageQuery {
    path: Option<String>,
}

/// A stage's record in `run`, or 404.
fn find_stage(store: &Store, run: u64, path: &str) -> UiResult<StageRunRecord> {
    store
        .stage_runs(run)?
        .into_iter()
        .find(|s| s.stage == path)
        .ok_or_else(|| UiError::NotFound(format!("no stage '{path}' in run {run}")))
}

fn action_of(store: &Store, s: &StageRunRecord) -> UiResult<Option<ActionRecord>> {
    Ok(match s.key {
        Some(k) => store.action(&k)?,
        None => None,
    })
}

fn worker_label(worker: &str) -> String {
    match worker.strip_prefix("slurm:") {
        Some(rest) => format!(
            "Slurm job {} ({worker})",
            rest.split('/').next().unwrap_or(rest)
        ),
        None => worker.to_string(),
    }
}

/// A JSON value as a compact cell.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn stage(
    State(app): State<Arc<App>>,
    Path(id): Path<u64>,
    Query(q): Query<StageQuery>,
) -> UiResult<Html<String>> {
    blocking(move || {
        let path = q
            .path
            .ok_or_else(|| UiError::BadRequest("give the stage as ?path=".into()))?;
        let run = find_run(&app.store, id)?;
        let all = app.store.stage_runs(id)?;
        let s = all
            .iter()
            .find(|s| s.stage == path)
            .cloned()
            .ok_or_else(|| UiError::NotFound(format!("no stage '{path}' in run {id}")))?;
        let action = action_of(&app.store, &s)?;
        let checkpoint = match s.key {
            Some(k) => app.store.checkpoint_meta(&k)?,
            None => None,
        };
        // Who produced each input digest, within this run.
        let producer: BTreeMap<Digest, (String, String)> = all
            .iter()
            .flat_map(|r| {
                r.outputs
                    .iter()
                    .map(move |(name, d)| (*d, (r.stage.clone(), name.clone())))
            })
            .collect();
        let siblings: Vec<&StageRunRecord> = all
            .iter()
            .filter(|r| template(&r.stage) == template(&s.stage))
            .collect();
        let mut sibling_rows = vec![];
        for r in &siblings {
            let numbers = match r.outputs.get("metrics").or_else(|| r.outputs.values().next()) {
                Some(d) => metric_numbers(&app.store, &app.cache, d).unwrap_or_default(),
                None => BTreeMap::new(),
            };
            sibling_rows.push((*r, numbers));
        }
        let sibling_columns: BTreeSet<String> = sibling_rows
            .iter()
            .flat_map(|(_, n)| n.keys().cloned())
            .take(24)
            .collect();
        let refresh = (s.state == StageState::Running || s.state == StageState::Pending)
            && run.state_label() == "running";
        let body = html! {
            h1 class="mono" id="stage-path" { (s.stage) }
            p {
                "Kind " strong id="stage-kind" { (s.kind) }
                @if let Some(a) = &action { " version " strong { (a.version) } }
                @else if !s.version.is_empty() { " version " strong { (s.version) } }
                ", state " span id="stage-state" { (state_badge(s.state)) }
                ", run " a href=(format!("/runs/{id}")) { (id) } "."
            }
            @if let Some(e) = &s.error {
                h2 { "Failure" }
                p class="error" id="failure" { (e) }
            }
            table {
                @if let Some(k) = s.key { tr { th { "key" } td class="mono" { (k) } } }
                @if s.started_ms.is_some() { tr { th { "attempt" } td { (s.attempt + 1) } } }
                @if let Some(w) = &s.worker { tr { th { "worker" } td { (worker_label(w)) } } }
                @if let Some(t) = s.started_ms { tr { th { "started" } td { (when(t)) } } }
                @if let Some(t) = s.ended_ms { tr { th { "ended" } td { (when(t)) } } }
                tr { th { "time" } td { (stage_time(&s)) } }
                @if let Some(a) = &action {
                    @if a.run != id {
                        tr { th { "computed by" } td { "run " a href=(format!("/runs/{}", a.run)) { (a.run) }
                            " on " (worker_label(&a.worker)) " (attempt " (a.attempt) ", " (seconds(a.duration_ms)) " at " (when(a.started_ms)) ")" } }
                    }
                }
                @if let Some(c) = &checkpoint {
                    tr { th { "checkpoint" } td { (c.size) " bytes saved " (when(c.saved_ms)) " (digest " span class="mono" { (c.digest.short()) } ")" } }
                }
            }
            @if let Some(params) = action.as_ref().map(|a| &a.params).or((!s.params.is_null()).then_some(&s.params)) {
                h2 { "Params" }
                table id="params" {
                    @if let Some(obj) = params.as_object() {
                        @for (k, v) in obj { tr { th { (k) } td class="mono" { (cell(v)) } } }
                    } @else { tr { td class="mono" { (params) } } }
                }
            }
            @if let Some(a) = &action {
                h2 { "Inputs" }
                table id="inputs" {
                    @for (name, digests) in &a.inputs {
                        @for d in digests {
                            tr { th { (name) } td { (artifact_link(d)) }
                                 td { @if let Some((st, out)) = producer.get(d) { a href=(stage_href(id, st)) { (st) } "." (out) } } }
                        }
                    }
                }
            } @else if !s.deps.is_empty() {
                h2 { "Inputs from" }
                ul { @for d in &s.deps { li { a href=(stage_href(id, d)) { (d) } } } }
            }
            @if !s.outputs.is_empty() {
                h2 { "Outputs" }
                table id="outputs" {
                    tr { th { "output" } th { "digest" } th { "kind" } th { "bytes" } th {} }
                    @for (name, d) in &s.outputs {
                        @let rec = app.store.artifact_record(d).ok().flatten();
                        tr {
                            th { (name) }
                            td { (artifact_link(d)) }
                            td { (rec.as_ref().map(|r| r.header.kind.as_str()).unwrap_or("missing")) }
                            td { (rec.as_ref().map(|r| r.size.to_string()).unwrap_or_default()) }
                            td { a href=(format!("/artifacts/{}/download", d.hex())) { "download" } }
                        }
                    }
                }
            }
            @if !s.log_tail.is_empty() {
                h2 { "Log" }
                pre id="log" { @for line in &s.log_tail { (line) "\n" } }
            }
            @if siblings.len() > 1 {
                h2 { "Stages of template " code { (template(&s.stage)) } }
                table id="siblings" {
                    tr { th { "stage" } th { "state" } th { "time" } @for c in &sibling_columns { th class="mono" { (c) } } th {} }
                    @for (r, numbers) in &sibling_rows {
                        tr {
                            td class="mono" { a href=(stage_href(id, &r.stage)) { (r.stage) } }
                            td { (state_badge(r.state)) }
                            td { (stage_time(r)) }
                            @for c in &sibling_columns { td { @if let Some(v) = numbers.get(c) { (format_number(*v)) } } }
                            td { @if r.stage != s.stage { a href=(format!("/runs/{id}/compare?a={}&b={}", crate::pages::enc(&s.stage), crate::pages::enc(&r.stage))) { "compare" } } }
                        }
                    }
                }
            }
        };
        Ok(Html(
            layout(&s.stage, refresh.then_some(REFRESH_SECS), body).into_string(),
        ))
    })
    .await
}

pub fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

#[derive(Deserialize)]
pub struct CompareQuery {
    a: Option<String>,
    b: Option<String>,
}

pub async fn compare(
    State(app): State<Arc<App>>,
    Path(id): Path<u64>,
    Query(q): Query<CompareQuery>,
) -> UiResult<Html<String>> {
    blocking(move || {
        find_run(&app.store, id)?;
        let all = app.store.stage_runs(id)?;
        let templates: BTreeSet<&str> = all.iter().map(|s| template(&s.stage)).collect();
        let picker = |name: &str, chosen: Option<&str>| {
            html! {
                select name=(name) {
                    optgroup label="every stage of a template, matched by grid values" {
                        @for t in &templates {
                            @if Some(*t) == chosen { option selected value=(t) { (t) " (all)" } }
                            @else { option value=(t) { (t) " (all)" } }
                        }
                    }
                    optgroup label="one stage" {
                        @for s in &all {
                            @if Some(s.stage.as_str()) == chosen { option selected value=(s.stage) { (s.stage) } }
                            @else { option value=(s.stage) { (s.stage) } }
                        }
                    }
                }
            }
        };
        let form = html! {
            form method="get" action=(format!("/runs/{id}/compare")) {
                (picker("a", q.a.as_deref())) " vs " (picker("b", q.b.as_deref())) " "
                button type="submit" { "compare" }
            }
        };
        let (Some(a), Some(b)) = (q.a.as_deref(), q.b.as_deref()) else {
            let body = html! { h1 { "Compare two stages of run " (id) } (form) };
            return Ok(Html(layout("compare", None, body).into_string()));
        };
        if templates.contains(a) && templates.contains(b) && !a.contains('[') && !b.contains('[') {
            let body = html! { h1 { "Compare " code { (a) } " and " code { (b) } } (form) (compare_templates(&app, id, &all, a, b)) };
            return Ok(Html(layout("compare", None, body).into_string()));
        }
        let sa = find_stage(&app.store, id, a)?;
        let sb = find_stage(&app.store, id, b)?;
        let aa = action_of(&app.store, &sa)?;
        let ab = action_of(&app.store, &sb)?;
        // A stage's params, then which stage each input came from and that stage's params
        // (one level up, as `input: param`), so two evaluations show how their models differ.
        let params = |s: &StageRunRecord, act: &Option<ActionRecord>| -> BTreeMap<String, String> {
            let mut out = BTreeMap::new();
            let own = act.as_ref().map_or(&s.params, |a| &a.params);
            if let Some(o) = own.as_object() {
                out.extend(o.iter().map(|(k, v)| (k.clone(), cell(v))));
            }
            let Some(act) = act else { return out };
            for (input, digests) in &act.inputs {
                for (i, d) in digests.iter().enumerate() {
                    let Some(up) = all.iter().find(|r| r.outputs.values().any(|o| o == d)) else {
                        continue;
                    };
                    let label = if digests.len() > 1 {
                        format!("{input}[{i}]")
                    } else {
                        input.clone()
                    };
                    out.insert(format!("{label} ← stage"), up.stage.clone());
                    let Ok(Some(up_action)) = action_of(&app.store, up) else {
                        continue;
                    };
                    if let Some(o) = up_action.params.as_object() {
                        for (k, v) in o {
                            out.insert(format!("{label}: {k}"), cell(v));
                        }
                    }
                }
            }
            out
        };
        let (pa, pb) = (params(&sa, &aa), params(&sb, &ab));
        let keys: BTreeSet<&String> = pa.keys().chain(pb.keys()).collect();
        let metrics = |s: &StageRunRecord| -> BTreeMap<String, f64> {
            s.outputs
                .values()
                .flat_map(|d| metric_numbers(&app.store, &app.cache, d).unwrap_or_default())
                .collect()
        };
        let (ma, mb) = (metrics(&sa), metrics(&sb));
        let mkeys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
        let body = html! {
            h1 { "Compare" }
            (form)
            table id="compare-stages" {
                tr { th {} th { a href=(stage_href(id, a)) class="mono" { (a) } } th { a href=(stage_href(id, b)) class="mono" { (b) } } }
                tr { th { "kind" } td { (sa.kind) } td { (sb.kind) } }
                tr { th { "state" } td { (state_badge(sa.state)) } td { (state_badge(sb.state)) } }
                tr { th { "time" } td { (stage_time(&sa)) } td { (stage_time(&sb)) } }
            }
            h2 { "Params" }
            table id="params-diff" {
                tr { th { "param" } th { "A" } th { "B" } }
                @for k in &keys {
                    @let (x, y) = (pa.get(*k), pb.get(*k));
                    tr class=[(x != y).then_some("diff")] {
                        th { (k) } td class="mono" { (x.cloned().unwrap_or_else(|| "—".into())) } td class="mono" { (y.cloned().unwrap_or_else(|| "—".into())) }
                    }
                }
            }
            h2 { "Metrics" }
            @if mkeys.is_empty() { p { "Neither stage has metrics." } }
            @else {
                table id="metrics-diff" {
                    tr { th { "metric" } th { "A" } th { "B" } th { "B − A" } }
                    @for k in &mkeys {
                        @let (x, y) = (ma.get(*k), mb.get(*k));
                        tr {
                            th class="mono" { (k) }
                            td { @if let Some(v) = x { (format_number(*v)) } }
                            td { @if let Some(v) = y { (format_number(*v)) } }
                            td { @if let (Some(x), Some(y)) = (x, y) { (format_number(y - x)) } }
                        }
                    }
                }
            }
        };
        Ok(Html(layout("compare", None, body).into_string()))
    })
    .await
}

/// Every stage of template `a` beside the stage of template `b` with the same grid values
/// (`[corruption=fog,seed=1]`), their accuracies side by side, with the mean over the pairs.
fn compare_templates(app: &App, id: u64, all: &[StageRunRecord], a: &str, b: &str) -> Markup {
    let axes = |s: &StageRunRecord| s.stage[template(&s.stage).len()..].to_string();
    let numbers = |s: &StageRunRecord| -> BTreeMap<String, f64> {
        s.outputs
            .values()
            .flat_map(|d| metric_numbers(&app.store, &app.cache, d).unwrap_or_default())
            .filter(|(k, _)| k.starts_with("accuracy"))
            .collect()
    };
    let bs: BTreeMap<String, &StageRunRecord> = all
        .iter()
        .filter(|s| template(&s.stage) == b)
        .map(|s| (axes(s), s))
        .collect();
    let mut rows = vec![];
    let mut sums: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    for sa in all.iter().filter(|s| template(&s.stage) == a) {
        let key = axes(sa);
        let Some(sb) = bs.get(&key) else { continue };
        let (na, nb) = (numbers(sa), numbers(sb));
        for (metric, x) in &na {
            let y = nb.get(metric).copied();
            if let Some(y) = y {
                let e = sums.entry(metric.clone()).or_default();
                e.0 += x;
                e.1 += y;
                e.2 += 1;
            }
            rows.push((
                key.clone(),
                sa.stage.clone(),
                sb.stage.clone(),
                metric.clone(),
                *x,
                y,
            ));
        }
    }
    html! {
        @if rows.is_empty() {
            p { "No stages of " code { (a) } " and " code { (b) } " share grid values and accuracies." }
        } @else {
            h2 { "Mean over the matched stages" }
            table id="template-means" {
                tr { th { "metric" } th { "pairs" } th { (a) } th { (b) } th { "B − A" } }
                @for (metric, (x, y, n)) in &sums {
                    @let (mx, my) = (x / *n as f64, y / *n as f64);
                    tr { th class="mono" { (metric) } td { (n) } td { (format_number(mx)) } td { (format_number(my)) } td { (format_number(my - mx)) } }
                }
            }
            h2 { "Each pair" }
            table id="template-pairs" {
                tr { th { "grid values" } th { "metric" } th { (a) } th { (b) } th { "B − A" } th {} }
                @for (key, sa, sb, metric, x, y) in &rows {
                    tr {
                        td class="mono" { (key) }
                        td class="mono" { (metric) }
                        td { a href=(stage_href(id, sa)) { (format_number(*x)) } }
                        td { @if let Some(y) = y { a href=(stage_href(id, sb)) { (format_number(*y)) } } }
                        td { @if let Some(y) = y { (format_number(y - x)) } }
                        td { a href=(format!("/runs/{id}/compare?a={}&b={}", enc(sa), enc(sb))) { "compare" } }
                    }
                }
            }
        }
    }
}
