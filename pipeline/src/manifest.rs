//! YAML manifests: the raw schema (parsed with serde-saphyr, which keeps line/column spans)
//! and the errors that point into the file. Expansion into stages is in [`crate::plan`].
//! The schema is documented for users in `manifests/README.md`.

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::{Location, Spanned};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// An error in a manifest, with the place it points at.
#[derive(Debug, Clone)]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
    /// The offending source line, for display.
    pub snippet: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // No place in the file (it could not be read, or the error is about all of it).
            write!(f, "{}: {}", self.file.display(), self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )?;
        }
        if let Some(line) = &self.snippet {
            let gutter = self.line.to_string();
            let (shown, caret) = snippet_window(line, self.column.saturating_sub(1) as usize);
            write!(
                f,
                "\n {gutter} | {shown}\n {} | {}^",
                " ".repeat(gutter.len()),
                " ".repeat(caret)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

/// At most [`SNIPPET_CHARS`] characters of a source line around `column` (0-based), with `…`
/// where it is cut, and the caret's position in what is shown: a one-line 1 MB manifest is not
/// echoed whole.
fn snippet_window(line: &str, column: usize) -> (String, usize) {
    let chars: Vec<char> = line.chars().collect();
    let column = column.min(chars.len());
    if chars.len() <= SNIPPET_CHARS {
        return (line.to_string(), column);
    }
    let start = column
        .saturating_sub(SNIPPET_CHARS / 2)
        .min(chars.len() - SNIPPET_CHARS);
    let end = start + SNIPPET_CHARS;
    let mut shown = String::new();
    let mut caret = column - start;
    if start > 0 {
        shown.push('…');
        caret += 1;
    }
    shown.extend(&chars[start..end]);
    if end < chars.len() {
        shown.push('…');
    }
    (shown, caret)
}

const SNIPPET_CHARS: usize = 100;

/// The manifest source, kept to point errors at lines.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(path: &Path) -> Result<Source, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            file: path.into(),
            line: 0,
            column: 0,
            message: format!("cannot read manifest: {e}"),
            snippet: None,
        })?;
        Ok(Source {
            path: path.into(),
            text,
        })
    }

    pub fn error_at(&self, loc: &Location, message: impl Into<String>) -> ManifestError {
        self.error_at_line(loc.line(), loc.column(), message)
    }

    pub fn error_at_line(
        &self,
        line: u64,
        column: u64,
        message: impl Into<String>,
    ) -> ManifestError {
        let snippet = (line > 0)
            .then(|| self.text.lines().nth(line as usize - 1).map(str::to_string))
            .flatten();
        ManifestError {
            file: self.path.clone(),
            line,
            column,
            message: message.into(),
            snippet,
        }
    }
}

/// Top level of a manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Variables with defaults, used as `${name}` in string params; `--var name=value` sets them.
    #[serde(default)]
    pub vars: BTreeMap<String, Spanned<String>>,
    /// Axes: name → values. A stage lists the axes it is instanced over in `over:`.
    #[serde(default)]
    pub grid: BTreeMap<String, Spanned<Vec<Spanned<Value>>>>,
    /// Params applied to every stage of a kind: kind → param → value.
    #[serde(default)]
    pub defaults: BTreeMap<String, Spanned<BTreeMap<String, Spanned<Value>>>>,
    pub stages: BTreeMap<String, Spanned<RawStage>>,
    #[serde(default)]
    pub overrides: Vec<Spanned<RawOverride>>,
    /// Stages that may share one GPU (slots per GPU); 1 = a GPU per stage.
    #[serde(default)]
    pub gpu_share: Option<Spanned<u32>>,
    /// Resources for every stage of a kind: kind → resources (below a stage's own).
    #[serde(default)]
    pub resources: BTreeMap<String, Spanned<RawResources>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub over: Vec<Spanned<String>>,
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
    /// input name → `stage`, `stage.output`, or `{from: stage.output, all: true}`.
    #[serde(default)]
    pub inputs: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    pub resources: Option<Spanned<RawResources>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub cpus: Option<u32>,
    pub gpus: Option<u32>,
    pub mem_mb: Option<u64>,
    /// What a batch system (Slurm) is asked for besides; see [`crate::kind::ClusterRequest`].
    /// Wall-clock limit, in Slurm's formats (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`).
    pub time: Option<Spanned<String>>,
    pub partition: Option<Spanned<String>>,
    pub account: Option<Spanned<String>>,
    pub qos: Option<Spanned<String>>,
    pub constraint: Option<Spanned<String>>,
    /// The GPU model (`--gres=gpu:TYPE:N`).
    pub gpu_type: Option<Spanned<String>>,
    /// Nodes a gang spreads over (`--nodes`, ranks split evenly per node).
    pub nodes: Option<Spanned<u32>>,
    /// More `sbatch` options, each `--name=value`.
    pub sbatch_args: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    /// The stage this override applies to (all stages when absent).
    #[serde(default)]
    pub stage: Option<Spanned<String>>,
    /// Axis values an instance must have for the override to apply.
    #[serde(default)]
    pub when: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    pub resources: Option<Spanned<RawResources>>,
}

/// Parses the YAML text; syntax, type and unknown-key errors carry line and column.
pub fn parse(source: &Source) -> Result<RawManifest, ManifestError> {
    // A tag the schema does not know (`!custom x`) would otherwise be dropped without a word,
    // and one on a key would let a typo'd field through.
    let options = serde_saphyr::options! {
        reject_unsupported_tags: true,
        reject_tagged_field_names: true,
    };
    serde_saphyr::from_str_with_options::<RawManifest>(&source.text, options).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = match e.without_snippet() {
            serde_saphyr::Error::Budget { breach, .. } => budget_message(breach),
            serde_saphyr::Error::UnsupportedTag { tag, .. }
            | serde_saphyr::Error::TaggedStructFieldName { tag, .. } => format!(
                "YAML tag {tag} is not part of the manifest schema (write the value without it)"
            ),
            _ => first_line_of(&e.to_string()),
        };
        source.error_at_line(line, column, message)
    })
}

/// serde-saphyr's resource limits in words (its own message is the limit's Debug form).
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Depth { depth } => {
            format!("nested {depth} levels deep, deeper than a manifest may nest")
        }
        B::Events { events } => format!("too large: more than {events} YAML events"),
        B::Nodes { nodes } => format!("too large: more than {nodes} YAML nodes"),
        B::Aliases { aliases } => format!("too many aliases (*ref): {aliases}"),
        B::Anchors { anchors } => format!("too many anchors (&name): {anchors}"),
        B::AliasAnchorRatio { aliases, anchors } => format!(
            "{aliases} aliases to {anchors} anchors: aliases expanding like this are refused"
        ),
        B::ScalarBytes { total_scalar_bytes } => {
            format!("too much text: {total_scalar_bytes} bytes of values")
        }
        B::Documents { documents } => {
            format!("{documents} YAML documents; a manifest is one document")
        }
        other => format!("exceeds a YAML size limit ({other:?})"),
    }
}

/// serde-saphyr renders its own location and snippet; we keep its message and render ours.
fn first_line_of(rendered: &str) -> String {
    let mut first = rendered.lines().next().unwrap_or(rendered).trim();
    first = first.strip_prefix("error: ").unwrap_or(first);
    // "line 4 column 13: message" → "message"
    if first.starts_with("line ") {
        if let Some(i) = first.find(": ") {
            first = &first[i + 2..];
        }
    }
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}
