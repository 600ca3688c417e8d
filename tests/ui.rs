//! `deeprepair ui` against a real store: a small manifest (util stages, one of which fails, a
//! tiny synthetic image dataset, pretrain, two corruptions, select-failures, evaluate, report)
//! is run once; the routes are checked on their HTML; headless Chromium loads the pages (skipped
//! without Chromium unless `DEEPREPAIR_REQUIRE_BROWSER=1`); and a live run is watched changing
//! state through the UI.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MANIFEST: &str = r#"
name: ui-fixture
grid:
  corruption: [gaussian_noise, fog]
stages:
  note: {kind: util.text, params: {text: "<script>alert(1)</script> & co"}}
  broken: {kind: util.work, params: {fail: true}, inputs: {after: note}}
  train-data: {kind: dataset, params: {path: "data", split: train, class_names: [cat, dog]}}
  test-data: {kind: dataset, params: {path: "data", split: test, class_names: [cat, dog], eval_set: clean}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 1, batch: 8}
    inputs: {train: train-data}
  corrupted:
    kind: corrupt
    over: [corruption]
    params: {severities: [5]}
    inputs: {images: test-data}
  failures:
    kind: select-failures
    over: [corruption]
    params: {per_class: 2}
    inputs: {model: base.model, images: corrupted}
  eval:
    kind: evaluate
    over: [corruption]
    inputs: {model: base.model, sets: [test-data, corrupted, failures.unseen]}
  report:
    kind: report
    inputs: {results: {from: eval, all: true}}
"#;

/// Class folders of noisy grey 32×32 images whose brightness overlaps between the classes, so
/// a model trained on them gets some wrong (there are failures to collect).
fn write_images(root: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (split, n) in [("train", 12), ("test", 30)] {
        for class in ["cat", "dog"] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let base: i32 = rng.random_range(40..216);
                let px: Vec<u8> = (0..32 * 32 * 3)
                    .map(|_| (base + rng.random_range(-50..=50)).clamp(0, 255) as u8)
                    .collect();
                let png = deeprepair_data::encode_png(&px, 32, 32).unwrap();
                std::fs::write(dir.join(format!("{i}.png")), png).unwrap();
            }
        }
    }
}

/// The fixture store (built once per test process, under Cargo's target tmp dir) and a UI
/// served on it from this process.
struct Fixture {
    store: PathBuf,
    base: String,
    /// stage path + "." + output → digest.
    outputs: std::collections::BTreeMap<String, String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_images(&dir.join("data"));
        let manifest = dir.join("m.yaml");
        std::fs::write(&manifest, MANIFEST).unwrap();
        let out = bin()
            .current_dir(&dir)
            .args(["run", "--plain", "--keep-going", "m.yaml"])
            .output()
            .unwrap();
        // `broken` fails on purpose, so the run does.
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = dir.join(".deeprepair/store.redb");
        let outputs = outputs(&manifest);
        let base = serve(&store);
        Fixture {
            store,
            base,
            outputs,
        }
    })
}

/// Serves the UI over `store` from this process (a thread); returns its base URL.
fn serve(store: &Path) -> String {
    let opened = deeprepair_pipeline::Store::open_read_only(store).unwrap();
    let addr = deeprepair_ui::spawn(opened, None, "127.0.0.1:0".parse().unwrap()).unwrap();
    format!("http://{addr}")
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build(),
    )
}

/// (status, body) of a GET.
fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().expect("request");
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    (status, body)
}

fn page(path: &str) -> String {
    let (status, body) = get(&format!("{}{path}", fixture().base));
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn stage_page(path: &str) -> String {
    page(&format!("/runs/1/stage?path={}", enc(path)))
}

#[test]
fn the_runs_page_lists_the_run_with_its_state_counts_and_progress() {
    let html = page("/");
    assert!(html.contains(r#"<a href="/runs/1">run 1</a>"#), "{html}");
    assert!(html.contains("m.yaml"));
    assert!(html.contains(r#"<tr class="run failed">"#), "{html}");
    // 12 stages: 11 executed, none cached, 1 failed.
    assert!(html.contains("<td>11</td><td>0</td><td>1</td>"), "{html}");
    assert!(html.contains("12/12"));
    assert!(
        !html.contains("http-equiv=\"refresh\""),
        "a finished run does not refresh"
    );
}

#[test]
fn the_run_page_draws_every_stage_in_the_dag_coloured_by_state_and_linked() {
    let html = page("/runs/1");
    for stage in [
        "note",
        "broken",
        "base",
        "failures[corruption=fog]",
        "eval[corruption=gaussian_noise]",
        "report",
    ] {
        assert!(
            html.contains(&format!(
                r#"href="/runs/1/stage?path={}" class="node" data-stage="{stage}""#,
                enc(stage)
            )),
            "no node for {stage}"
        );
    }
    assert!(html.contains(r#"data-stage="broken" data-state="failed""#));
    assert!(html.contains(r#"data-stage="base" data-state="succeeded""#));
    // One SVG path per (stage, upstream stage): note→broken, train-data→base, and per
    // corruption test-data→corrupted, corrupted→failures, base→failures, base/test-data/
    // corrupted/failures→eval, eval→report.
    assert_eq!(html.matches("<path d=").count(), 2 + 2 * 8);
    assert!(html.contains("Run error: broken: asked to fail"));
}

#[test]
fn a_failed_stage_shows_why_with_its_log_and_inputs() {
    let html = stage_page("broken");
    assert!(
        html.contains(r#"<p class="error" id="failure">asked to fail</p>"#),
        "{html}"
    );
    assert!(html.contains("failing as asked (fail: true)"));
    assert!(
        html.contains(r#"<strong id="stage-kind">util.work</strong> version <strong>1</strong>"#),
        "{html}"
    );
    // What it was asked to do, though it never produced an action record.
    assert!(
        html.contains(r#"<th>fail</th><td class="mono">true</td>"#),
        "{html}"
    );
    assert!(html.contains(r#"href="/runs/1/stage?path=note""#));
}

#[test]
fn a_stage_shows_kind_version_params_key_inputs_outputs_and_its_siblings() {
    let f = fixture();
    let html = stage_page("eval[corruption=fog]");
    let mut registry = deeprepair_pipeline::kind::Registry::new();
    deeprepair_stages::register(&mut registry);
    let version = registry
        .get("evaluate")
        .expect("evaluate is registered")
        .version();
    assert!(
        html.contains(&format!(
            r#"<strong id="stage-kind">evaluate</strong> version <strong>{version}</strong>"#
        )),
        "{html}"
    );
    assert!(
        html.contains(r#"<th>batch</th><td class="mono">256</td>"#),
        "{html}"
    );
    assert!(html.contains("<th>key</th>"));
    assert!(html.contains("local:cpu"));
    // The model input links to its artifact and its producer.
    let model = &f.outputs["base.model"];
    assert!(html.contains(&format!(r#"href="/artifacts/{model}""#)));
    assert!(html.contains(r#"<a href="/runs/1/stage?path=base">base</a>.model"#));
    let metrics = &f.outputs["eval[corruption=fog].metrics"];
    assert!(html.contains(&format!(r#"href="/artifacts/{metrics}/download""#)));
    // Its sibling of the same template sits beside it, with its numbers.
    assert!(html.contains(r#"<table id="siblings">"#));
    assert!(html.contains("accuracy[failures:gaussian_noise]"));
    assert!(html.contains(
        "compare?a=eval%5Bcorruption%3Dfog%5D&amp;b=eval%5Bcorruption%3Dgaussian%5Fnoise%5D"
    ));
    assert!(
        html.contains("base accuracy") || html.contains("fog: "),
        "log lines shown"
    );
}

#[test]
fn collected_failures_show_as_a_contact_sheet_with_true_and_predicted_classes() {
    let f = fixture();
    let digest = &f.outputs["failures[corruption=fog].unseen"];
    let html = page(&format!("/artifacts/{digest}"));
    assert!(
        html.contains("evaluation set <strong>failures:fog</strong>"),
        "{html}"
    );
    let figures = html.matches("<figure data-index=").count();
    assert!(figures > 0, "{html}");
    assert_eq!(html.matches("data:image/png;base64,").count(), figures);
    // Every unseen failure is one the base model gets wrong: each caption shows a prediction
    // other than the true class.
    assert_eq!(html.matches(r#"class="pred wrong""#).count(), figures);
    assert!(!html.contains(r#"class="pred""#));
}

#[test]
fn a_contact_sheet_pages_through_a_dataset() {
    let f = fixture();
    let digest = &f.outputs["test-data.images"];
    // 60 test images: one page of 64.
    let html = page(&format!("/artifacts/{digest}?page=0"));
    assert_eq!(html.matches("<figure data-index=").count(), 60);
    assert!(
        html.contains("<th>cat</th><th>dog</th></tr><tr><td>30</td><td>30</td>"),
        "{html}"
    );
    assert!(
        !html.contains("pred"),
        "no predictions outside select-failures"
    );
    let (status, body) = get(&format!("{}/artifacts/{digest}?page=1", f.base));
    assert_eq!(status, 404, "{body}");
}

#[test]
fn metrics_show_per_class_accuracy_and_a_confusion_heat_map() {
    let f = fixture();
    let digest = &f.outputs["eval[corruption=fog].metrics"];
    let html = page(&format!("/artifacts/{digest}"));
    for set in ["clean", "fog", "failures:fog"] {
        assert!(html.contains(&format!(r#"data-eval-set="{set}""#)), "{set}");
    }
    assert!(html.contains(r#"<table class="per-class">"#));
    assert!(html.contains(r#"<table class="heat confusion""#));
    assert!(html.contains("background:rgba(37,99,235,"));
    assert!(html.contains(r#"<table id="records">"#));
}

#[test]
fn the_report_shows_its_tables_and_figures_and_serves_its_files() {
    let f = fixture();
    let digest = &f.outputs["report.report"];
    let html = page(&format!("/artifacts/{digest}"));
    assert!(html.contains("<h1>DeepRepair report</h1>"), "{html}");
    assert!(html.contains("<table>"), "tables rendered");
    assert!(html.contains(&format!(r#"href="/artifacts/{digest}/files/table2%2Emd""#)));
    let png = html
        .split(&format!(r#"<img src="/artifacts/{digest}/files/"#))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a figure");
    let mut r = agent()
        .get(format!("{}/artifacts/{digest}/files/{png}", f.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let bytes = r.body_mut().read_to_vec().unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG figure");
}

#[test]
fn a_model_shows_its_architecture_parameters_and_tensors_and_downloads_whole() {
    let f = fixture();
    let digest = &f.outputs["base.model"];
    let html = page(&format!("/artifacts/{digest}"));
    assert!(
        html.contains("<th>architecture</th><td>tiny-cnn</td>"),
        "{html}"
    );
    assert!(html.contains(r#"<td class="mono">fc.weight</td><td>F32</td><td>[2, 128]</td>"#));
    let mut r = agent()
        .get(format!("{}/artifacts/{digest}/download", f.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        disposition,
        format!("attachment; filename=\"{}.safetensors\"", &digest[..12])
    );
    let bytes = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), digest.as_str());
}

#[test]
fn compare_shows_a_params_diff_and_metrics_side_by_side() {
    let html = page(&format!(
        "/runs/1/compare?a={}&b={}",
        enc("eval[corruption=fog]"),
        enc("eval[corruption=gaussian_noise]")
    ));
    assert!(html.contains(r#"<table id="params-diff">"#));
    assert!(html.contains(r#"<table id="metrics-diff">"#));
    // Both evaluated the same clean set with the same model: equal, difference 0.
    let row = html
        .split(r#"<th class="mono">accuracy[clean]</th>"#)
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .expect("a clean accuracy row");
    let cells: Vec<&str> = row
        .split("<td>")
        .skip(1)
        .map(|c| c.trim_end_matches("</td>"))
        .collect();
    assert_eq!(cells.len(), 3, "{row}");
    assert_eq!(cells[0], cells[1]);
    assert_eq!(cells[2], "0");
    // Beside their own params, the stages they read and those stages' params: here the
    // corrupted sets differ by corruption, the model is the same.
    assert!(html.contains(r#"<tr class="diff"><th>sets[1] ← stage</th><td class="mono">corrupted[corruption=fog]</td><td class="mono">corrupted[corruption=gaussian_noise]</td></tr>"#), "{html}");
    assert!(html.contains(
        r#"<tr><th>model ← stage</th><td class="mono">base</td><td class="mono">base</td></tr>"#
    ));
    assert!(html.contains(r#"<tr><th>model: arch</th><td class="mono">tiny-cnn</td><td class="mono">tiny-cnn</td></tr>"#));
    let picker = page("/runs/1/compare");
    assert!(picker.contains(r#"<select name="a">"#));
    assert!(picker.contains(r#"<option value="eval">eval (all)</option>"#));
}

#[test]
fn comparing_two_templates_pairs_their_stages_by_grid_values() {
    let html = page("/runs/1/compare?a=eval&b=eval");
    assert!(html.contains(r#"<table id="template-means">"#), "{html}");
    for corruption in ["fog", "gaussian_noise"] {
        // The base model gets every one of its failures wrong, in both columns.
        let row = format!(
            r#"<td class="mono">[corruption={corruption}]</td><td class="mono">accuracy[failures:{corruption}]</td>"#
        );
        let cells = html
            .split(&row)
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap_or_else(|| panic!("no pair row for {corruption}: {html}"));
        assert_eq!(cells.matches(">0</a>").count(), 2, "{cells}");
    }
    // accuracy[clean] is in both stages of both templates: 2 pairs.
    assert!(
        html.contains(r#"<th class="mono">accuracy[clean]</th><td>2</td>"#),
        "{html}"
    );
}

#[test]
fn text_from_the_store_is_escaped() {
    let html = stage_page("note");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"),
        "{html}"
    );
    assert!(!html.contains("<script>"));
}

#[test]
fn bad_requests_get_error_pages_not_panics() {
    let f = fixture();
    for (path, status) in [
        ("/runs/99".to_string(), 404),
        ("/runs/1/stage?path=nope".to_string(), 404),
        ("/runs/1/stage".to_string(), 400),
        ("/artifacts/xyz".to_string(), 400),
        (format!("/artifacts/{}", "0".repeat(64)), 404),
        (
            format!("/artifacts/{}/files/nope.md", f.outputs["report.report"]),
            404,
        ),
        (
            format!("/artifacts/{}/files/x.md", f.outputs["base.model"]),
            400,
        ),
        ("/nowhere".to_string(), 404),
    ] {
        let (got, body) = get(&format!("{}{path}", f.base));
        assert_eq!(got, status, "{path}: {body}");
    }
    // Still serving.
    page("/");
}

#[test]
fn a_loopback_ui_answers_only_its_own_host_name_and_forbids_script() {
    let f = fixture();
    let foreign = agent()
        .get(format!("{}/", f.base))
        .header("Host", "rebound.example:8080")
        .call()
        .unwrap();
    assert_eq!(foreign.status().as_u16(), 403);
    let named = agent()
        .get(format!("{}/", f.base))
        .header("Host", "localhost:8080")
        .call()
        .unwrap();
    assert_eq!(named.status().as_u16(), 200);
    let csp = named.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
}

/// A `deeprepair ui` process, killed when dropped.
struct UiProcess {
    child: std::process::Child,
    first_line: String,
}

impl Drop for UiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ui(store: &Path, listen: &str) -> UiProcess {
    use std::io::BufRead;
    let mut child = bin()
        .args(["ui", "--store", store.to_str().unwrap(), "--listen", listen])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    UiProcess {
        child,
        first_line: line,
    }
}

#[test]
fn a_missing_store_is_a_usage_error() {
    let s = Scratch::new();
    let out = bin()
        .args([
            "ui",
            "--store",
            s.path().join("nothing.redb").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no store at"), "{err}");
}

#[test]
fn a_non_loopback_address_needs_the_token_it_prints_once() {
    let f = fixture();
    let ui = start_ui(&f.store, "0.0.0.0:0");
    let url = ui
        .first_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_string();
    let (base, token) = url.split_once("/?token=").expect("a token in the URL");
    assert_eq!(token.len(), 64, "{}", ui.first_line);
    assert_eq!(get(&format!("{base}/")).0, 401);
    assert_eq!(get(&format!("{base}/?token=wrong")).0, 401);
    let mut r = agent()
        .get(format!("{base}/?token={token}"))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let _ = r.body_mut().read_to_string();
    let with_cookie = agent()
        .get(format!("{base}/runs/1"))
        .header("Cookie", cookie.split(';').next().unwrap())
        .call()
        .unwrap();
    assert_eq!(with_cookie.status().as_u16(), 200);
    let with_bearer = agent()
        .get(format!("{base}/runs/1"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(with_bearer.status().as_u16(), 200);
    // Loopback needs none.
    let local = start_ui(&f.store, "127.0.0.1:0");
    assert!(!local.first_line.contains("token"), "{}", local.first_line);
}

/// Chromium (or Chrome) on the PATH, if any.
fn chromium() -> Option<PathBuf> {
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "chrome",
        "chromium-headless-shell",
    ];
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Headless Chromium: the DOM after load, and a screenshot at `shot`.
fn browse(chrome: &Path, profile: &Path, url: &str, shot: &Path) -> String {
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1280,900",
    ];
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let dom = std::process::Command::new(chrome)
        .args(common)
        .arg(&profile_arg)
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium");
    assert!(
        dom.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot_out = std::process::Command::new(chrome)
        .args(common)
        .arg(&profile_arg)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        shot_out.status.success(),
        "{}",
        String::from_utf8_lossy(&shot_out.stderr)
    );
    let png = std::fs::read(shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "{}",
        shot.display()
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

#[test]
fn a_headless_browser_shows_the_runs_a_failed_stage_and_a_contact_sheet() {
    let Some(chrome) = chromium() else {
        if std::env::var_os("DEEPREPAIR_REQUIRE_BROWSER").is_some() {
            panic!("no chromium on the PATH, and DEEPREPAIR_REQUIRE_BROWSER is set");
        }
        eprintln!(
            "SKIPPED: no chromium on the PATH (CI installs it; DEEPREPAIR_REQUIRE_BROWSER=1)"
        );
        return;
    };
    let f = fixture();
    let s = Scratch::new();
    let shots = s.path().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = s.path().join("profile");

    let runs = browse(
        &chrome,
        &profile,
        &format!("{}/", f.base),
        &shots.join("runs.png"),
    );
    assert!(runs.contains(r#"<tr class="run failed">"#), "{runs}");
    assert!(runs.contains("run 1"));

    let stage = browse(
        &chrome,
        &profile,
        &format!("{}/runs/1/stage?path=broken", f.base),
        &shots.join("stage.png"),
    );
    assert!(stage.contains("asked to fail"), "{stage}");
    assert!(stage.contains("failing as asked"));

    let unseen = &f.outputs["failures[corruption=gaussian_noise].unseen"];
    let sheet = browse(
        &chrome,
        &profile,
        &format!("{}/artifacts/{unseen}", f.base),
        &shots.join("sheet.png"),
    );
    let figures = sheet.matches("<figure data-index=").count();
    assert!(figures > 0, "{sheet}");
    assert_eq!(sheet.matches(r#"class="pred wrong""#).count(), figures);
    assert!(sheet.contains("failures:gaussian_noise"));
    eprintln!("screenshots in {}", shots.display());
}

const LIVE: &str = r#"
name: live
stages:
  first: {kind: util.work, params: {steps: 5, step_ms: 20}}
  slow: {kind: util.work, params: {steps: 30, step_ms: 100}, inputs: {after: first}}
"#;

fn state_of(base: &str, stage: &str) -> Option<String> {
    let (status, html) = get(&format!("{base}/runs/2/stage?path={stage}"));
    if status != 200 {
        return None;
    }
    let after = html.split(r#"<span id="stage-state">"#).nth(1)?;
    let inner = after.split('>').nth(1)?;
    Some(inner.split('<').next()?.to_string())
}

#[test]
fn the_ui_shows_a_stage_change_state_while_a_run_executes() {
    let s = Scratch::new();
    // A first run creates the store; the UI opens it before the second run starts writing.
    let warm = s.write(
        "warm.yaml",
        "stages:\n  w: {kind: util.text, params: {text: warm}}\n",
    );
    run_ok(&["run", "--plain", warm.to_str().unwrap()]);
    let base = serve(&s.store());
    let m = s.write("live.yaml", LIVE);
    let mut run = bin()
        .args(["run", "--plain", m.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen: Vec<String> = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(state) = state_of(&base, "slow") {
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            if state == "succeeded" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = run.wait().unwrap();
    assert!(status.success());
    eprintln!("states of `slow` seen through the UI: {seen:?}");
    assert!(
        seen.iter().any(|s| s == "running"),
        "the UI never showed `slow` running: {seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("succeeded"),
        "{seen:?}"
    );
    // While it ran, its page refreshed itself; the finished run's page does not.
    let (_, done) = get(&format!("{base}/runs/2"));
    assert!(
        done.contains(r#"<strong id="run-state">succeeded</strong>"#),
        "{done}"
    );
    assert!(!done.contains("http-equiv=\"refresh\""));
}
