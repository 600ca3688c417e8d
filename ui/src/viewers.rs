//! Artifact viewers: datasets as paged contact sheets (with the model's prediction beside the
//! true class for a `select-failures` output), metrics as tables and heat maps, reports'
//! tables and figures, models' architecture and tensors; every artifact downloadable.
//! Decoding goes through the crates that wrote the artifacts (`deeprepair_stages::artifacts`).

use crate::pages::{blocking, enc, format_number, layout, stage_href};
use crate::{App, UiError, UiResult};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use deeprepair_data::Dataset;
use deeprepair_pipeline::store::ActionRecord;
use deeprepair_pipeline::{Artifact, ArtifactKind, Digest, Store};
use deeprepair_stages::artifacts::{load_model, read_dataset, read_model_info, DatasetInfo};
use maud::{html, Markup, PreEscaped};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};

/// Images per contact-sheet page.
pub const SHEET_PAGE: usize = 64;
/// Decoded datasets kept in memory (the last few viewed), each at most this many bytes of
/// pixels (a larger one is decoded for each page).
const DATASETS_KEPT: usize = 4;
const DATASET_CACHE_MAX_BYTES: usize = 64 << 20;
/// Metrics artifacts larger than this are not flattened into numbers (siblings, compare).
const METRICS_MAX_BYTES: u64 = 4 << 20;

/// A decoded dataset artifact.
type Decoded = Arc<(Dataset, DatasetInfo)>;

/// Decoded artifacts by digest: content-addressed, so an entry is never stale.
#[derive(Default)]
pub struct Cache {
    datasets: Mutex<Vec<(Digest, Decoded)>>,
    numbers: Mutex<HashMap<Digest, Arc<BTreeMap<String, f64>>>>,
}

pub fn artifact_link(d: &Digest) -> Markup {
    html! { a class="mono digest" href=(format!("/artifacts/{}", d.hex())) title=(d.hex()) { (d.short()) } }
}

fn parse_digest(text: &str) -> UiResult<Digest> {
    Digest::from_hex(&text.to_ascii_lowercase())
        .ok_or_else(|| UiError::BadRequest(format!("'{text}' is not a digest (64 hex digits)")))
}

fn get(store: &Store, d: &Digest) -> UiResult<Artifact> {
    Ok(store.get_artifact(d)?)
}

fn dataset(app: &App, d: &Digest) -> UiResult<Decoded> {
    let mut kept = app.cache.datasets.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pos) = kept.iter().position(|(k, _)| k == d) {
        let hit = kept.remove(pos);
        kept.push(hit.clone());
        return Ok(hit.1);
    }
    drop(kept);
    let decoded = Arc::new(read_dataset(&get(&app.store, d)?)?);
    if decoded.0.images.len() <= DATASET_CACHE_MAX_BYTES {
        let mut kept = app.cache.datasets.lock().unwrap_or_else(|p| p.into_inner());
        kept.push((*d, decoded.clone()));
        if kept.len() > DATASETS_KEPT {
            kept.remove(0);
        }
    }
    Ok(decoded)
}

/// The actions whose outputs include `d` (who produced it).
fn producers(store: &Store, d: &Digest) -> UiResult<Vec<ActionRecord>> {
    Ok(store
        .actions()?
        .into_iter()
        .filter(|a| a.outputs.values().any(|o| o == d))
        .collect())
}

/// The numbers a metrics artifact holds, flattened to names: evaluate's accuracy and loss per
/// evaluation set, the report's records, and any top-level number (e.g. select-failures'
/// counts, a training run's best epoch). Empty for anything else.
pub fn metric_numbers(
    store: &Store,
    cache: &Cache,
    d: &Digest,
) -> anyhow::Result<BTreeMap<String, f64>> {
    if let Some(hit) = cache
        .numbers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(d)
    {
        return Ok((**hit).clone());
    }
    let mut out = BTreeMap::new();
    let Some(record) = store.artifact_record(d)? else {
        return Ok(out);
    };
    if record.header.kind == ArtifactKind::Metrics
        && record.header.media_type == "application/json"
        && record.size <= METRICS_MAX_BYTES
    {
        let v: Value = serde_json::from_slice(&store.get_artifact(d)?.bytes)?;
        flatten_metrics(&v, &mut out);
    }
    cache
        .numbers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(*d, Arc::new(out.clone()));
    Ok(out)
}

fn flatten_metrics(v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if let Some(n) = x.as_f64() {
                    out.insert(k.clone(), n);
                }
            }
            if let Some(details) = o.get("details").and_then(Value::as_array) {
                for dt in details {
                    let set = dt["eval_set"].as_str().unwrap_or("?");
                    for field in ["accuracy", "mean_loss"] {
                        if let Some(n) = dt[field].as_f64() {
                            out.insert(format!("{field}[{set}]"), n);
                        }
                    }
                }
            }
        }
        Value::Array(records) => {
            for r in records.iter().take(500) {
                if let (Some(set), Some(acc)) = (r["eval_set"].as_str(), r["accuracy"].as_f64()) {
                    let mut name = r["method"].as_str().unwrap_or("?").to_string();
                    if let Some(v) = r["variant"].as_str() {
                        name.push_str(&format!("/{v}"));
                    }
                    if let Some(c) = r["repaired_for"].as_str() {
                        name.push_str(&format!(" for {c}"));
                    }
                    out.insert(format!("accuracy[{name}, {set}, seed {}]", r["seed"]), acc);
                }
            }
        }
        _ => {}
    }
}

#[derive(Deserialize)]
pub struct ArtifactQuery {
    page: Option<usize>,
}

pub async fn artifact(
    State(app): State<Arc<App>>,
    Path(digest): Path<String>,
    Query(q): Query<ArtifactQuery>,
) -> UiResult<Html<String>> {
    blocking(move || {
        let d = parse_digest(&digest)?;
        let record = app
            .store
            .artifact_record(&d)?
            .ok_or_else(|| UiError::NotFound(format!("no artifact {}", d.hex())))?;
        let made_by = producers(&app.store, &d)?;
        let view = match record.header.kind {
            ArtifactKind::Dataset => dataset_view(&app, &d, &made_by, q.page.unwrap_or(0))?,
            ArtifactKind::Metrics => metrics_view(&get(&app.store, &d)?)?,
            ArtifactKind::Report => report_view(&d, &get(&app.store, &d)?)?,
            ArtifactKind::Model => model_view(&get(&app.store, &d)?)?,
            ArtifactKind::Image => html! { img src=(format!("/artifacts/{}/download", d.hex())) alt="image"; },
            ArtifactKind::Text => {
                let a = get(&app.store, &d)?;
                html! { pre { (String::from_utf8_lossy(&a.bytes)) } }
            }
            _ => html! { p { "No viewer for this kind; download it." } },
        };
        let body = html! {
            h1 { (record.header.kind.as_str()) " " span class="mono" { (d.short()) } }
            table id="artifact" {
                tr { th { "digest" } td class="mono" { (d.hex()) } }
                tr { th { "type" } td { (record.header.media_type) } }
                tr { th { "bytes" } td { (record.size) } }
                @for p in &made_by {
                    tr { th { "produced by" } td {
                        a href=(stage_href(p.run, &p.stage)) class="mono" { (p.stage) }
                        " (" (p.kind) " v" (p.version) ", run " (p.run) ")" } }
                }
                tr { th { "file" } td { a id="download" href=(format!("/artifacts/{}/download", d.hex())) { "download " (d.short()) "." (record.header.extension) } } }
            }
            (view)
            details { summary { "header metadata" } pre { (serde_json::to_string_pretty(&record.header.meta).unwrap_or_default()) } }
        };
        Ok(Html(layout(&format!("{} {}", record.header.kind.as_str(), d.short()), None, body).into_string()))
    })
    .await
}

/// The predicted classes of `images` by the model a `select-failures` stage read, when `d`
/// came out of one (None otherwise).
fn failure_predictions(
    app: &App,
    made_by: &[ActionRecord],
    ds: &Dataset,
    range: std::ops::Range<usize>,
) -> UiResult<Option<Vec<u8>>> {
    let Some(model_digest) = made_by
        .iter()
        .find(|a| a.kind == "select-failures")
        .and_then(|a| a.inputs.get("model"))
        .and_then(|m| m.first())
    else {
        return Ok(None);
    };
    let model = get(&app.store, model_digest)?;
    let info = read_model_info(&model)?;
    let device = candle_core::Device::Cpu;
    let (_vars, net) = load_model(&model.bytes, &info, &device)?;
    let idx: Vec<usize> = range.collect();
    let page = ds.subset(&idx);
    let eval = deeprepair_train::evaluate(
        &*net,
        &page.images,
        &page.labels,
        (page.len(), page.height, page.width),
        page.num_classes(),
        SHEET_PAGE,
        &device,
    )
    .map_err(|e| UiError::Internal(format!("predicting the failures: {e}")))?;
    Ok(Some(eval.predictions))
}

fn png_data_uri(pixels: &[u8], width: usize, height: usize) -> UiResult<String> {
    let png = deeprepair_data::encode_png(pixels, width, height)
        .map_err(|e| UiError::Internal(format!("encoding an image: {e}")))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

fn dataset_view(app: &App, d: &Digest, made_by: &[ActionRecord], page: usize) -> UiResult<Markup> {
    let decoded = dataset(app, d)?;
    let (ds, info) = &*decoded;
    let pages = ds.len().div_ceil(SHEET_PAGE).max(1);
    if page >= pages {
        return Err(UiError::NotFound(format!(
            "page {page} of a {}-image dataset (pages 0..{})",
            ds.len(),
            pages - 1
        )));
    }
    let range = page * SHEET_PAGE..((page + 1) * SHEET_PAGE).min(ds.len());
    let predicted = failure_predictions(app, made_by, ds, range.clone())?;
    let class = |c: u8| -> String {
        ds.class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    };
    let mut figures = vec![];
    for (k, i) in range.clone().enumerate() {
        let label = ds.labels[i];
        let pred = predicted.as_ref().and_then(|p| p.get(k)).copied();
        figures.push((
            i,
            png_data_uri(ds.image(i), ds.width, ds.height)?,
            label,
            pred,
        ));
    }
    let href = |p: usize| format!("/artifacts/{}?page={p}", d.hex());
    Ok(html! {
        h2 { "Dataset" }
        p {
            (ds.len()) " images of " (ds.width) "×" (ds.height) ", " (ds.num_classes()) " classes"
            @if let Some(s) = &info.eval_set { ", evaluation set " strong { (s) } }
            @if let Some(c) = &info.corruption { ", corruption " (c) }
            @if !info.severities.is_empty() { ", severities " (format!("{:?}", info.severities)) }
            "."
        }
        table id="class-counts" {
            tr { @for c in &ds.class_names { th { (c) } } }
            tr { @for n in ds.class_counts() { td { (n) } } }
        }
        h2 id="sheet-title" { "Images " (range.start) "–" (range.end.saturating_sub(1)) " (page " (page + 1) " of " (pages) ")" }
        @if predicted.is_some() { p { "Each image shows its true class and what the model this stage read predicts." } }
        p class="pager" {
            @if page > 0 { a href=(href(page - 1)) { "← previous" } " " }
            @if page + 1 < pages { a href=(href(page + 1)) { "next →" } }
        }
        div class="sheet" id="sheet" {
            @for (i, uri, label, pred) in &figures {
                figure data-index=(i) {
                    img src=(uri) alt=(format!("image {i}"));
                    figcaption {
                        span class="label" { (class(*label)) }
                        @if let Some(p) = pred {
                            br;
                            span class=(if p == label { "pred" } else { "pred wrong" }) { "→ " (class(*p)) }
                        }
                    }
                }
            }
        }
    })
}

fn heat(fraction: f64) -> String {
    let a = fraction.clamp(0.0, 1.0);
    format!(
        "background:rgba(37,99,235,{a:.3});color:{}",
        if a > 0.55 { "#fff" } else { "#111" }
    )
}

fn metrics_view(a: &Artifact) -> UiResult<Markup> {
    let v: Value = serde_json::from_slice(&a.bytes)
        .map_err(|e| UiError::BadRequest(format!("metrics are not JSON: {e}")))?;
    let classes: Vec<String> = v["model"]["class_names"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|x| x.as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default();
    let class = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
    let scalars: Vec<(&String, &Value)> = v
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, x)| !x.is_array() && !x.is_object())
                .collect()
        })
        .unwrap_or_default();
    let curve = (a.header.meta["curve"] == true)
        .then(|| deeprepair_stages::training_curve_png(a).ok())
        .flatten()
        .map(|png| {
            format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png)
            )
        });
    let history = v["history"].as_array();
    let details = v["details"].as_array();
    let records = v.as_array().or_else(|| v["records"].as_array());
    Ok(html! {
        h2 { "Metrics" }
        @if !scalars.is_empty() {
            table id="scalars" { @for (k, x) in &scalars { tr { th { (k) } td { (match x.as_f64() { Some(n) => format_number(n), None => x.to_string() }) } } } }
        }
        @if let Some(uri) = &curve { img src=(uri) alt="training curve"; }
        @if let Some(h) = history {
            @if let Some(first) = h.first().and_then(Value::as_object) {
                h3 { "Training history" }
                table id="history" {
                    tr { @for k in first.keys() { th { (k) } } }
                    @for row in h { tr { @for k in first.keys() { td { (row[k].as_f64().map(format_number).unwrap_or_else(|| row[k].to_string())) } } } }
                }
            }
        }
        @if let Some(details) = details {
            @for dt in details {
                @let set = dt["eval_set"].as_str().unwrap_or("?");
                section class="eval" data-eval-set=(set) {
                    h3 { "Evaluation set " (set) }
                    p { "Accuracy " strong { (dt["accuracy"].as_f64().map(|x| format!("{:.2}%", x * 100.0)).unwrap_or_default()) }
                        ", mean loss " (dt["mean_loss"].as_f64().map(format_number).unwrap_or_default()) }
                    div class="cols" {
                        @if let Some(per) = dt["per_class_accuracy"].as_array() {
                            table class="per-class" {
                                tr { th { "class" } th { "accuracy" } }
                                @for (i, x) in per.iter().enumerate() {
                                    tr { td { (class(i)) } td style=(heat(x.as_f64().unwrap_or(0.0))) { (x.as_f64().map(|x| format!("{:.1}%", x * 100.0)).unwrap_or_default()) } }
                                }
                            }
                        }
                        @if let Some(rows) = dt["confusion"].as_array() {
                            table class="heat confusion" title="rows: true class; columns: predicted" {
                                tr { th { "true \\ predicted" } @for j in 0..rows.len() { th { (class(j)) } } }
                                @for (i, row) in rows.iter().enumerate() {
                                    @let cells: Vec<u64> = row.as_array().map(|r| r.iter().map(|x| x.as_u64().unwrap_or(0)).collect()).unwrap_or_default();
                                    @let total = cells.iter().sum::<u64>().max(1) as f64;
                                    tr { th { (class(i)) } @for c in &cells { td style=(heat(*c as f64 / total)) { (c) } } }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(records) = records {
            @if records.first().is_some_and(|r| r.get("eval_set").is_some()) {
                h3 { "Records" }
                table id="records" {
                    tr { th { "arch" } th { "method" } th { "variant" } th { "repaired for" } th { "evaluation set" } th { "seed" } th { "accuracy" } th { "n" } }
                    @for r in records {
                        tr {
                            td { (r["arch"].as_str().unwrap_or("")) } td { (r["method"].as_str().unwrap_or("")) }
                            td { (r["variant"].as_str().unwrap_or("")) } td { (r["repaired_for"].as_str().unwrap_or("")) }
                            td { (r["eval_set"].as_str().unwrap_or("")) } td { (r["seed"]) }
                            td { (r["accuracy"].as_f64().map(|x| format!("{:.2}%", x * 100.0)).unwrap_or_default()) } td { (r["n"]) }
                        }
                    }
                }
            }
        }
        details { summary { "JSON" } pre { (String::from_utf8_lossy(&a.bytes[..a.bytes.len().min(256 * 1024)])) } }
    })
}

/// The files of a report artifact (a tar), by name.
fn report_files(a: &Artifact) -> UiResult<Vec<(String, Vec<u8>)>> {
    let mut archive = tar::Archive::new(a.bytes.as_slice());
    let mut files = vec![];
    let entries = archive
        .entries()
        .map_err(|e| UiError::BadRequest(format!("report is not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| UiError::BadRequest(format!("report tar: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut bytes = vec![];
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| UiError::BadRequest(format!("report tar: {e}")))?;
        files.push((name, bytes));
    }
    Ok(files)
}

/// A report's Markdown as HTML (pulldown-cmark, tables on). Raw HTML in the text is shown as
/// text, never passed through; a relative link or image (`table2.md`) points at that file of
/// the same report; any other link that is not http(s) is dropped.
fn markdown(text: &str, file_href: &dyn Fn(&str) -> String) -> Markup {
    use pulldown_cmark::{CowStr, Event, Options, Parser, Tag};
    let fix = |dest: CowStr<'_>| -> CowStr<'static> {
        let d = dest.to_string();
        if d.starts_with("http://") || d.starts_with("https://") || d.starts_with('#') {
            CowStr::from(d)
        } else if !d.contains(':') && !d.starts_with('/') {
            CowStr::from(file_href(&d))
        } else {
            CowStr::from(String::new())
        }
    };
    let events = Parser::new_ext(text, Options::ENABLE_TABLES).map(|event| match event {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) => Event::Start(Tag::Link {
            link_type,
            dest_url: fix(dest_url),
            title,
            id,
        }),
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => Event::Start(Tag::Image {
            link_type,
            dest_url: fix(dest_url),
            title,
            id,
        }),
        other => other,
    });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, events);
    PreEscaped(out)
}

fn report_view(d: &Digest, a: &Artifact) -> UiResult<Markup> {
    let files = report_files(a)?;
    let href = |name: &str| format!("/artifacts/{}/files/{}", d.hex(), enc(name));
    Ok(html! {
        h2 { "Report" }
        ul id="report-files" { @for (name, bytes) in &files { li { a href=(href(name)) { (name) } " (" (bytes.len()) " bytes)" } } }
        @for (name, bytes) in &files {
            @if name == "report.md" {
                section class="report-md" data-file=(name) { (markdown(&String::from_utf8_lossy(bytes), &href)) }
            }
        }
        @for (name, bytes) in &files {
            @if name.ends_with(".md") && name != "report.md" {
                details class="report-table" data-file=(name) {
                    summary class="mono" { (name) }
                    (markdown(&String::from_utf8_lossy(bytes), &href))
                }
            }
        }
        @for (name, _) in &files {
            @if name.ends_with(".png") {
                figure { img src=(href(name)) alt=(name) style="max-width:100%"; figcaption class="mono" { (name) } }
            }
        }
    })
}

fn model_view(a: &Artifact) -> UiResult<Markup> {
    let info = read_model_info(a)?;
    let tensors = safetensors::SafeTensors::deserialize(&a.bytes)
        .map_err(|e| UiError::BadRequest(format!("model is not safetensors: {e}")))?;
    let mut list: Vec<(String, String, Vec<usize>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, format!("{:?}", t.dtype()), t.shape().to_vec()))
        .collect();
    list.sort();
    let stored: usize = list
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    Ok(html! {
        h2 { "Model" }
        table id="model" {
            tr { th { "architecture" } td { (info.arch) } }
            tr { th { "parameters" } td id="param-count" { (info.parameters) } }
            tr { th { "classes" } td { (info.num_classes) ": " (info.class_names.join(", ")) } }
            tr { th { "method" } td { (info.method) @if let Some(v) = &info.variant { " (" (v) ")" } } }
            @if let Some(c) = &info.repaired_for { tr { th { "repaired for" } td { (c) } } }
            tr { th { "seed" } td { (info.seed) } }
            tr { th { "stored values" } td { (stored) " in " (list.len()) " tensors (parameters and buffers)" } }
        }
        h3 { "Tensors" }
        table id="tensors" {
            tr { th { "name" } th { "dtype" } th { "shape" } th { "values" } }
            @for (name, dtype, shape) in &list {
                tr { td class="mono" { (name) } td { (dtype) } td { (format!("{shape:?}")) } td { (shape.iter().product::<usize>()) } }
            }
        }
    })
}

/// A file name safe in a header: the extension's alphanumerics only.
fn safe_extension(ext: &str) -> String {
    let e: String = ext.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if e.is_empty() {
        "bin".into()
    } else {
        e
    }
}

pub async fn download(
    State(app): State<Arc<App>>,
    Path(digest): Path<String>,
) -> UiResult<Response> {
    blocking(move || {
        let d = parse_digest(&digest)?;
        let a = get(&app.store, &d)?;
        let media = HeaderValue::from_str(&a.header.media_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let disposition = format!(
            "attachment; filename=\"{}.{}\"",
            d.short(),
            safe_extension(&a.header.extension)
        );
        let disposition =
            HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment"));
        Ok((
            [
                (header::CONTENT_TYPE, media),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            a.bytes,
        )
            .into_response())
    })
    .await
}

pub async fn report_file(
    State(app): State<Arc<App>>,
    Path((digest, name)): Path<(String, String)>,
) -> UiResult<Response> {
    blocking(move || {
        let d = parse_digest(&digest)?;
        let a = get(&app.store, &d)?;
        if a.header.kind != ArtifactKind::Report {
            return Err(UiError::BadRequest(format!(
                "{} is not a report",
                d.short()
            )));
        }
        let (_, bytes) = report_files(&a)?
            .into_iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| {
                UiError::NotFound(format!("no file '{name}' in report {}", d.short()))
            })?;
        let media = match name.rsplit('.').next() {
            Some("png") => "image/png",
            Some("json") => "application/json",
            _ => "text/plain; charset=utf-8",
        };
        Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static(media))],
            bytes,
        )
            .into_response())
    })
    .await
}
