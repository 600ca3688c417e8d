//! Expands a manifest into a DAG of stage instances: the grid's cartesian product per stage
//! template, params merged (kind defaults < manifest defaults < stage params < overrides, grid
//! values fixed), inputs matched on shared axis values, everything type-checked against the
//! stage kinds with errors pointing at the manifest's lines.

use crate::artifact::Digest;
use crate::did_you_mean;
use crate::kind::{
    check_param, parse_slurm_time, ClusterRequest, InputSpec, ParamSpec, Registry, Resources,
    StageKind,
};
use crate::manifest::{self, ManifestError, RawManifest, RawResources, RawStage, Source};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use serde_json::{Map, Value};
use serde_saphyr::{Location, Spanned};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// One upstream output feeding an input.
#[derive(Clone, Debug, Serialize)]
pub struct Edge {
    /// Index of the upstream stage in [`Plan::stages`].
    pub from: usize,
    pub output: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageInstance {
    /// `template[axis=value,…]`, unique in the plan.
    pub path: String,
    pub template: String,
    pub kind: String,
    pub version: String,
    pub params: Value,
    pub axes: BTreeMap<String, Value>,
    pub inputs: BTreeMap<String, Vec<Edge>>,
    pub outputs: Vec<String>,
    pub resources: Resources,
    /// What it asks of a batch system (Slurm) besides.
    #[serde(skip_serializing_if = "ClusterRequest::is_empty")]
    pub cluster: ClusterRequest,
    pub estimate: f64,
    /// What the stage reads outside the store, summarized (see `StageKind::fingerprint`).
    pub fingerprint: Option<String>,
}

/// A planned run: stages in topological order (every input points to an earlier index).
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub manifest: String,
    pub manifest_digest: Digest,
    pub name: String,
    pub stages: Vec<StageInstance>,
    /// Slots per GPU (the manifest's `gpu_share`, default 1).
    pub gpu_share: u32,
}

impl Plan {
    pub fn graph(&self) -> DiGraph<&str, String> {
        let mut g = DiGraph::new();
        let nodes: Vec<NodeIndex> = self
            .stages
            .iter()
            .map(|s| g.add_node(s.path.as_str()))
            .collect();
        for (i, s) in self.stages.iter().enumerate() {
            for (name, edges) in &s.inputs {
                for e in edges {
                    g.add_edge(nodes[e.from], nodes[i], format!("{}→{}", e.output, name));
                }
            }
        }
        g
    }

    pub fn counts_by_kind(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.stages {
            *counts.entry(s.kind.as_str()).or_insert(0) += 1;
        }
        counts
    }

    pub fn find(&self, path: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.path == path)
    }
}

/// Reads, parses and expands a manifest file.
pub fn plan_file(path: &Path, registry: &Registry) -> Result<Plan, ManifestError> {
    plan_file_with_vars(path, registry, &BTreeMap::new())
}

/// Plans with `${name}` variables set from the command line (overriding the manifest's
/// `vars:` defaults).
pub fn plan_file_with_vars(
    path: &Path,
    registry: &Registry,
    vars: &BTreeMap<String, String>,
) -> Result<Plan, ManifestError> {
    let source = Source::read(path)?;
    plan_source(&source, registry, vars)
}

pub fn plan_source(
    source: &Source,
    registry: &Registry,
    cli_vars: &BTreeMap<String, String>,
) -> Result<Plan, ManifestError> {
    let raw = manifest::parse(source)?;
    // Variables are plain text: one naming another would be left as literal `${…}` text.
    for (k, v) in &raw.vars {
        if v.value.contains("${") {
            return Err(source.error_at(
                &v.referenced,
                format!(
                    "variable '{k}' refers to another variable (\"{}\"); variables cannot \
                     refer to variables: give its value in full",
                    v.value
                ),
            ));
        }
    }
    for (k, v) in cli_vars {
        if v.contains("${") {
            return Err(source.error_at_line(
                1,
                1,
                format!("--var {k}={v}: a variable's value cannot refer to variables"),
            ));
        }
    }
    let mut vars: BTreeMap<String, String> = raw
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect();
    for (k, v) in cli_vars {
        if !vars.contains_key(k) {
            return Err(source.error_at_line(
                1,
                1,
                format!(
                    "--var {k}: the manifest declares no variable '{k}'{} (declare it under vars:)",
                    did_you_mean(k, raw.vars.keys().map(|s| s.as_str()))
                ),
            ));
        }
        vars.insert(k.clone(), v.clone());
    }
    Expander {
        source,
        registry,
        raw: &raw,
        vars: Some(&vars),
    }
    .expand()
}

/// Plans a manifest a program wrote from data (`import-model`, `repair`): every string is
/// taken as it is, `${…}` included (a class named `${model}` stays that name), and the manifest
/// declares no variables.
pub fn plan_literal(source: &Source, registry: &Registry) -> Result<Plan, ManifestError> {
    let raw = manifest::parse(source)?;
    if let Some((name, v)) = raw.vars.iter().next() {
        return Err(source.error_at(
            &v.referenced,
            format!("variable '{name}': a literal manifest declares no variables"),
        ));
    }
    Expander {
        source,
        registry,
        raw: &raw,
        vars: None,
    }
    .expand()
}

/// The most stage instances a plan may hold: far above any real grid (the paper's is 1,060),
/// far below what would exhaust memory while expanding.
pub const MAX_PLAN_STAGES: usize = 1_000_000;

/// Replaces `${name}` in every string inside `value`.
fn substitute(value: &Value, vars: &BTreeMap<String, String>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let end = rest[start..]
                    .find('}')
                    .ok_or_else(|| format!("unclosed '${{' in \"{s}\""))?;
                let name = &rest[start + 2..start + end];
                let v = vars.get(name).ok_or_else(|| {
                    format!(
                        "unknown variable '${{{name}}}'{}",
                        did_you_mean(name, vars.keys().map(|k| k.as_str()))
                    )
                })?;
                out.push_str(v);
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| substitute(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), substitute(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

struct Expander<'a> {
    source: &'a Source,
    registry: &'a Registry,
    raw: &'a RawManifest,
    /// `None`: strings are literal ([`plan_literal`]).
    vars: Option<&'a BTreeMap<String, String>>,
}

/// An input binding as written: `stage`, `stage.output` or `{from: …, all: true}`.
struct Binding {
    stage: String,
    output: Option<String>,
    all: bool,
    /// Shared axes *not* to match on: `{from: corrupted, all: true, across: [corruption]}`
    /// takes every corruption's instance (e.g. a cross-corruption evaluation).
    across: Vec<String>,
    loc: Location,
}

fn value_label(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Params with provenance: (value, location or None for a kind's default).
type Provenanced = BTreeMap<String, (Value, Option<Location>)>;

/// The manifest's stages as a graph of templates.
struct Templates<'a> {
    names: Vec<&'a String>,
    /// Per template (in `names` order): input → its bindings.
    bindings: Vec<BTreeMap<String, Vec<Binding>>>,
    /// Template indices, each after the templates its inputs name.
    order: Vec<usize>,
}

/// One stage template while its instances are made.
struct Template<'a> {
    name: &'a String,
    spanned: &'a Spanned<RawStage>,
    kind: Arc<dyn StageKind>,
    /// The grid axes it is over, with their values.
    axes: Vec<(&'a str, &'a Vec<Spanned<Value>>)>,
    /// Kind defaults < manifest defaults < the stage's params.
    base: Provenanced,
    bindings: &'a BTreeMap<String, Vec<Binding>>,
    input_specs: Vec<InputSpec>,
}

impl<'a> Expander<'a> {
    fn err(&self, loc: &Location, msg: impl Into<String>) -> ManifestError {
        self.source.error_at(loc, msg)
    }

    /// One binding, or a list of them (concatenated in order) for inputs that take many.
    fn parse_bindings(&self, spanned: &Spanned<Value>) -> Result<Vec<Binding>, ManifestError> {
        match &spanned.value {
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .map(|v| self.parse_binding(v, spanned.referenced))
                .collect(),
            Value::Array(_) => Err(self.err(&spanned.referenced, "empty list of input bindings")),
            v => Ok(vec![self.parse_binding(v, spanned.referenced)?]),
        }
    }

    fn parse_binding(&self, value: &Value, loc: Location) -> Result<Binding, ManifestError> {
        let (target, all, across) = match value {
            Value::String(s) => (s.clone(), false, vec![]),
            Value::Object(map) => {
                for key in map.keys() {
                    if key != "from" && key != "all" && key != "across" {
                        return Err(self.err(
                            &loc,
                            format!("unknown key '{key}' in input binding; expected 'from' and optionally 'all', 'across'"),
                        ));
                    }
                }
                let from = map.get("from").and_then(Value::as_str).ok_or_else(|| {
                    self.err(&loc, "input binding needs 'from: <stage>[.<output>]'")
                })?;
                let all = match map.get("all") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(self.err(&loc, format!("'all' must be true or false, found {other}")))
                    }
                };
                let across = match map.get("across") {
                    None => vec![],
                    Some(Value::Array(axes)) if all => axes.iter().map(value_label).collect(),
                    Some(_) if !all => {
                        return Err(self.err(&loc, "'across' needs 'all: true'"))
                    }
                    Some(other) => {
                        return Err(self.err(&loc, format!("'across' must be a list of grid axes, found {other}")))
                    }
                };
                (from.to_string(), all, across)
            }
            other => {
                return Err(self.err(
                    &loc,
                    format!("expected an input binding ('stage', 'stage.output', {{from: stage, all: true}} or a list of these), found {other}"),
                ))
            }
        };
        let (stage, output) = match target.split_once('.') {
            Some((s, o)) => (s.to_string(), Some(o.to_string())),
            None => (target, None),
        };
        Ok(Binding {
            stage,
            output,
            all,
            across,
            loc,
        })
    }

    fn expand(&self) -> Result<Plan, ManifestError> {
        self.check_manifest()?;
        let templates = self.templates()?;
        let mut stages: Vec<StageInstance> = Vec::new();
        // template → indices of its instances
        let mut instances: HashMap<&str, Vec<usize>> = HashMap::new();
        for &t in &templates.order {
            let name = templates.names[t];
            let template = self.template(name, &templates.bindings[t])?;
            let mine = self.instantiate(&template, stages.len())?;
            let first = stages.len();
            stages.extend(mine);
            let mine: Vec<usize> = (first..stages.len()).collect();
            self.bind_inputs(&template, &mine, &instances, &mut stages)?;
            instances.insert(name.as_str(), mine);
        }
        let raw = self.raw;
        Ok(Plan {
            manifest: self.source.path.display().to_string(),
            manifest_digest: Digest::of(self.source.text.as_bytes()),
            name: raw.name.clone().unwrap_or_else(|| {
                self.source
                    .path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            stages,
            gpu_share: raw.gpu_share.as_ref().map_or(1, |g| g.value),
        })
    }

    /// What can be checked before any stage is expanded: `gpu_share`, the grid's axes, the
    /// kinds `defaults:` and `resources:` name, stage names, what overrides refer to.
    fn check_manifest(&self) -> Result<(), ManifestError> {
        let raw = self.raw;
        if let Some(share) = &raw.gpu_share {
            if share.value == 0 {
                return Err(self.err(
                    &share.referenced,
                    "gpu_share must be at least 1 (stages per GPU)",
                ));
            }
        }
        // Grid axes: non-empty lists of scalars.
        for (axis, values) in &raw.grid {
            if values.value.is_empty() {
                return Err(self.err(
                    &values.referenced,
                    format!("grid axis '{axis}' has no values"),
                ));
            }
            for (i, v) in values.value.iter().enumerate() {
                if v.value.is_object() || v.value.is_array() || v.value.is_null() {
                    return Err(self.err(
                        &v.referenced,
                        format!("grid axis '{axis}': values must be strings, numbers or booleans"),
                    ));
                }
                if values.value[..i].iter().any(|u| u.value == v.value) {
                    return Err(self.err(
                        &v.referenced,
                        format!(
                            "grid axis '{axis}' lists {} twice (two stages would have one path)",
                            value_label(&v.value)
                        ),
                    ));
                }
            }
        }
        for (kind, params) in &raw.defaults {
            if self.registry.get(kind).is_none() {
                return Err(self.err(
                    &params.referenced,
                    format!(
                        "defaults for unknown stage kind '{kind}'{}",
                        did_you_mean(kind, self.registry.names().into_iter())
                    ),
                ));
            }
        }

        for (kind, resources) in &raw.resources {
            if self.registry.get(kind).is_none() {
                return Err(self.err(
                    &resources.referenced,
                    format!(
                        "resources for unknown stage kind '{kind}'{}",
                        did_you_mean(kind, self.registry.names().into_iter())
                    ),
                ));
            }
        }

        for (name, stage) in &raw.stages {
            if name.trim().is_empty() {
                return Err(self.err(&stage.referenced, "a stage needs a name; this one is empty"));
            }
        }
        for ov in &raw.overrides {
            if let Some(s) = &ov.value.stage {
                if !raw.stages.contains_key(&s.value) {
                    return Err(self.err(
                        &s.referenced,
                        format!(
                            "override for unknown stage '{}'{}",
                            s.value,
                            did_you_mean(&s.value, raw.stages.keys().map(|k| k.as_str()))
                        ),
                    ));
                }
            }
            for (axis, want) in &ov.value.when {
                if !raw.grid.contains_key(axis) {
                    return Err(self.err(
                        &want.referenced,
                        format!(
                            "override `when` names unknown grid axis '{axis}'{}",
                            did_you_mean(axis, raw.grid.keys().map(|k| k.as_str()))
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The template graph: each stage's parsed input bindings and a dependency order.
    fn templates(&self) -> Result<Templates<'a>, ManifestError> {
        let raw = self.raw;
        // Template graph: stage → the stages its inputs name.
        let names: Vec<&String> = raw.stages.keys().collect();
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut bindings: Vec<BTreeMap<String, Vec<Binding>>> = Vec::new();
        let mut graph = DiGraph::<usize, ()>::new();
        let nodes: Vec<NodeIndex> = (0..names.len()).map(|i| graph.add_node(i)).collect();
        for (i, name) in names.iter().enumerate() {
            let stage = &raw.stages[*name].value;
            let mut b = BTreeMap::new();
            for (input, spanned) in &stage.inputs {
                let list = self.parse_bindings(spanned)?;
                for binding in &list {
                    let Some(&from) = index.get(binding.stage.as_str()) else {
                        return Err(self.err(
                            &binding.loc,
                            format!(
                                "input '{input}' of stage '{name}' names unknown stage '{}'{}",
                                binding.stage,
                                did_you_mean(&binding.stage, names.iter().map(|s| s.as_str()))
                            ),
                        ));
                    };
                    graph.add_edge(nodes[from], nodes[i], ());
                }
                b.insert(input.clone(), list);
            }
            bindings.push(b);
        }
        let order = petgraph::algo::toposort(&graph, None).map_err(|cycle| {
            let name = names[graph[cycle.node_id()]];
            self.err(
                &raw.stages[name].referenced,
                format!("stage '{name}' is part of a cycle of inputs"),
            )
        })?;
        Ok(Templates {
            names,
            bindings,
            order: order.into_iter().map(|node| graph[node]).collect(),
        })
    }

    /// One stage template: its kind, the axes it is over, its params before the grid and
    /// overrides, its inputs checked against the kind's.
    fn template(
        &self,
        name: &'a String,
        bindings: &'a BTreeMap<String, Vec<Binding>>,
    ) -> Result<Template<'a>, ManifestError> {
        let raw = self.raw;
        let spanned_stage = &raw.stages[name];
        let stage = &spanned_stage.value;
        let kind_name = &stage.kind.value;
        let kind = self.registry.get(kind_name).ok_or_else(|| {
            self.err(
                &stage.kind.referenced,
                format!(
                    "unknown stage kind '{kind_name}'{}; known kinds: {}",
                    did_you_mean(kind_name, self.registry.names().into_iter()),
                    self.registry.names().join(", ")
                ),
            )
        })?;
        let specs = kind.params();
        let spec_names: Vec<&str> = specs.iter().map(|s| s.name).collect();

        // Axes this template varies over.
        let mut axes: Vec<(&str, &Vec<Spanned<Value>>)> = Vec::new();
        for axis in &stage.over {
            if axes.iter().any(|(a, _)| *a == axis.value) {
                return Err(self.err(
                    &axis.referenced,
                    format!(
                        "stage '{name}' lists grid axis '{}' twice in over:",
                        axis.value
                    ),
                ));
            }
            let Some(values) = raw.grid.get(&axis.value) else {
                return Err(self.err(
                    &axis.referenced,
                    format!(
                        "stage '{name}' is over unknown grid axis '{}'{}",
                        axis.value,
                        did_you_mean(&axis.value, raw.grid.keys().map(|s| s.as_str()))
                    ),
                ));
            };
            // An axis is a param of the kind, or flows in through an input whose stage is
            // over it (e.g. evaluating each corruption's repaired model); anything else
            // would make identical instances and is most likely a typo.
            let flows_in = bindings.values().flatten().any(|b| {
                raw.stages
                    .get(&b.stage)
                    .is_some_and(|up| up.value.over.iter().any(|o| o.value == axis.value))
            });
            if !spec_names.contains(&axis.value.as_str()) && !flows_in {
                return Err(self.err(&axis.referenced, format!(
                    "grid axis '{}' is not a param of stage kind '{kind_name}' (its params: {}) and no input of '{name}' varies over it",
                    axis.value,
                    spec_names.join(", ")
                )));
            }
            if stage.params.contains_key(&axis.value) {
                return Err(self.err(&stage.params[&axis.value].referenced, format!(
                    "param '{}' of stage '{name}' is set by the grid axis it is over; remove it here",
                    axis.value
                )));
            }
            axes.push((axis.value.as_str(), &values.value));
        }

        // Base params with provenance: (value, location or None for kind defaults).
        let mut base: Provenanced = BTreeMap::new();
        for spec in &specs {
            if let Some(d) = &spec.default {
                base.insert(spec.name.into(), (d.clone(), None));
            }
        }
        if let Some(d) = raw.defaults.get(kind_name) {
            self.layer(kind_name, &spec_names, &d.value, &mut base)?;
        }
        self.layer(kind_name, &spec_names, &stage.params, &mut base)?;

        // Inputs declared by the kind.
        let input_specs = kind.inputs();
        for (input, list) in bindings {
            if !input_specs.iter().any(|s| s.name == input) {
                return Err(self.err(
                    &list[0].loc,
                    format!(
                        "stage kind '{kind_name}' has no input '{input}'{}; its inputs: {}",
                        did_you_mean(input, input_specs.iter().map(|s| s.name)),
                        input_specs
                            .iter()
                            .map(|s| s.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for spec in &input_specs {
            if !spec.optional && !bindings.contains_key(spec.name) {
                return Err(self.err(
                    &spanned_stage.referenced,
                    format!(
                        "stage '{name}' (kind '{kind_name}') is missing required input '{}' ({})",
                        spec.name, spec.help
                    ),
                ));
            }
        }
        Ok(Template {
            name,
            spanned: spanned_stage,
            kind: kind.clone(),
            axes,
            base,
            bindings,
            input_specs,
        })
    }

    /// `params` over `base`, each checked to be a param of the kind, variables substituted.
    fn layer(
        &self,
        kind_name: &str,
        spec_names: &[&str],
        params: &BTreeMap<String, Spanned<Value>>,
        base: &mut Provenanced,
    ) -> Result<(), ManifestError> {
        for (k, v) in params {
            if !spec_names.contains(&k.as_str()) {
                return Err(self.err(
                    &v.referenced,
                    format!(
                        "unknown param '{k}' for stage kind '{kind_name}'{}; its params: {}",
                        did_you_mean(k, spec_names.iter().copied()),
                        spec_names.join(", ")
                    ),
                ));
            }
            let value = match self.vars {
                Some(vars) => substitute(&v.value, vars)
                    .map_err(|msg| self.err(&v.referenced, format!("param '{k}': {msg}")))?,
                None => v.value.clone(),
            };
            base.insert(k.clone(), (value, Some(v.referenced)));
        }
        Ok(())
    }

    /// The template's instances, one per point of its axes' product (bounded: `before` stages
    /// exist already), each with its params, resources and fingerprint; inputs not yet bound.
    fn instantiate(
        &self,
        template: &Template<'a>,
        before: usize,
    ) -> Result<Vec<StageInstance>, ManifestError> {
        let Template {
            name,
            spanned: spanned_stage,
            kind,
            axes,
            ..
        } = template;
        let specs = kind.params();
        let spec_names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        // Cartesian product of the axes, bounded before it is built.
        let count = axes
            .iter()
            .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()))
            .filter(|n| before.saturating_add(*n) <= MAX_PLAN_STAGES);
        let Some(_) = count else {
            let sizes: Vec<String> = axes
                .iter()
                .map(|(a, v)| format!("{a}: {}", v.len()))
                .collect();
            let n = axes.iter().fold(1f64, |n, (_, v)| n * v.len() as f64);
            return Err(self.err(
                &spanned_stage.referenced,
                format!(
                    "stage '{name}' over the grid ({}) would make {n:.3e} stages, {} before \
                     it; a plan holds at most {MAX_PLAN_STAGES}",
                    sizes.join(" × "),
                    before
                ),
            ));
        };
        let mut points: Vec<Vec<&Spanned<Value>>> = vec![vec![]];
        for (_, values) in axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.push(v);
                        q
                    })
                })
                .collect();
        }

        points
            .into_iter()
            .map(|point| self.instance(template, &specs, &spec_names, point))
            .collect()
    }

    /// The instance of `template` at one `point` of its axes: params (base < matching
    /// overrides < the axis values), type-checked and validated; resources; fingerprint.
    /// Layers the params of every override that matches this instance onto `params`;
    /// returns their resource layers, applied once the params are known.
    fn apply_overrides(
        &self,
        template: &Template<'a>,
        spec_names: &[&str],
        axis_values: &BTreeMap<String, Value>,
        params: &mut Provenanced,
    ) -> Result<Vec<&'a RawResources>, ManifestError> {
        let Template {
            name,
            spanned,
            axes,
            ..
        } = template;
        let kind_name = &spanned.value.kind.value;
        let mut override_resources = vec![];
        for ov in &self.raw.overrides {
            let ov_v = &ov.value;
            if let Some(s) = &ov_v.stage {
                if s.value != **name {
                    continue;
                }
            }
            let applies = ov_v.when.iter().all(|(axis, want)| {
                axis_values
                    .get(axis)
                    .is_some_and(|have| *have == want.value)
            });
            if applies {
                if let Some((axis, v)) = ov_v
                    .params
                    .iter()
                    .find(|(k, _)| axes.iter().any(|(a, _)| a == k))
                {
                    return Err(self.err(
                        &v.referenced,
                        format!(
                            "override sets param '{axis}' of stage '{name}', which is \
                         over grid axis '{axis}': its values come from the grid"
                        ),
                    ));
                }
                self.layer(kind_name, spec_names, &ov_v.params, params)?;
                if let Some(r) = &ov_v.resources {
                    override_resources.push(&r.value);
                }
            }
        }
        Ok(override_resources)
    }

    fn instance(
        &self,
        template: &Template<'a>,
        specs: &[ParamSpec],
        spec_names: &[&str],
        point: Vec<&Spanned<Value>>,
    ) -> Result<StageInstance, ManifestError> {
        let raw = self.raw;
        let Template {
            name,
            spanned: spanned_stage,
            kind,
            axes,
            base,
            ..
        } = template;
        let stage = &spanned_stage.value;
        let kind_name = &stage.kind.value;
        let axis_values: BTreeMap<String, Value> = axes
            .iter()
            .zip(&point)
            .map(|((a, _), v)| (a.to_string(), v.value.clone()))
            .collect();
        let path = if axes.is_empty() {
            name.to_string()
        } else {
            let parts: Vec<String> = axes
                .iter()
                .zip(&point)
                .map(|((a, _), v)| format!("{a}={}", value_label(&v.value)))
                .collect();
            format!("{name}[{}]", parts.join(","))
        };
        let mut params = base.clone();
        let override_resources =
            self.apply_overrides(template, spec_names, &axis_values, &mut params)?;
        for ((axis, _), v) in axes.iter().zip(&point) {
            if spec_names.contains(axis) {
                params.insert(axis.to_string(), (v.value.clone(), Some(v.referenced)));
            }
        }
        // Type-check and fill.
        let mut checked = Map::new();
        for spec in specs {
            match params.get(spec.name) {
                None => {
                    return Err(self.err(
                        &spanned_stage.referenced,
                        format!(
                            "stage '{name}' (kind '{kind_name}') needs param '{}': {}",
                            spec.name, spec.help
                        ),
                    ))
                }
                Some((v, loc)) => {
                    let v = check_param(&spec.ty, v).map_err(|msg| {
                        let loc = loc.unwrap_or(spanned_stage.referenced);
                        self.err(
                            &loc,
                            format!("param '{}' of stage '{name}': {msg}", spec.name),
                        )
                    })?;
                    checked.insert(spec.name.to_string(), v);
                }
            }
        }
        let params = Value::Object(checked);
        if let Err((param, msg)) = kind.validate(&params) {
            let loc = base
                .get(&param)
                .and_then(|(_, l)| *l)
                .unwrap_or(spanned_stage.referenced);
            return Err(self.err(&loc, format!("param '{param}' of stage '{name}': {msg}")));
        }
        // The kind's resources for these params < the manifest's for the kind < the
        // stage's < matching overrides.
        let mut res = kind.resources(&params);
        let mut cluster = ClusterRequest::default();
        let mut nodes_at = None;
        let layers = raw
            .resources
            .get(kind_name)
            .into_iter()
            .chain(&stage.resources)
            .map(|r| &r.value)
            .chain(override_resources);
        for r in layers {
            self.apply_resources(&mut res, &mut cluster, &mut nodes_at, r)?;
        }
        if let (Some(nodes), Some(loc)) = (cluster.nodes, nodes_at) {
            let ranks = res.ranks.max(1);
            if nodes > ranks || ranks % nodes != 0 {
                return Err(self.err(
                    &loc,
                    format!(
                        "stage '{name}' runs {ranks} rank(s), which cannot spread evenly \
                         over {nodes} nodes"
                    ),
                ));
            }
        }
        let estimate = kind.estimate(&params);
        let fingerprint = kind
            .fingerprint(&params)
            .map_err(|e| self.err(&spanned_stage.referenced, format!("stage '{name}': {e:#}")))?;
        Ok(StageInstance {
            path,
            template: name.to_string(),
            kind: kind_name.clone(),
            version: kind.version().to_string(),
            params,
            axes: axis_values,
            inputs: BTreeMap::new(),
            outputs: kind.outputs().iter().map(|s| s.to_string()).collect(),
            resources: res,
            cluster,
            estimate,
            fingerprint,
        })
    }

    /// Binds each input of the template's instances (`mine`) to the upstream instances that
    /// agree with it on their shared axes.
    fn bind_inputs(
        &self,
        template: &Template<'a>,
        mine: &[usize],
        instances: &HashMap<&str, Vec<usize>>,
        stages: &mut [StageInstance],
    ) -> Result<(), ManifestError> {
        let Template {
            name,
            spanned,
            kind,
            bindings,
            input_specs,
            ..
        } = template;
        let stage = &spanned.value;
        let kind_name = kind.name();
        // Bind inputs: upstream instances that agree on the shared axes.
        for (input, binding) in bindings
            .iter()
            .flat_map(|(input, list)| list.iter().map(move |b| (input, b)))
        {
            let spec = input_specs
                .iter()
                .find(|s| s.name == input)
                .expect("checked above");
            if bindings[input].len() > 1 && !spec.many {
                return Err(self.err(
                    &binding.loc,
                    format!("input '{input}' of kind '{kind_name}' takes one artifact, not a list"),
                ));
            }
            let upstream = &instances[binding.stage.as_str()];
            let up_kind = &stages[upstream[0]].outputs;
            let output = match &binding.output {
                Some(o) if up_kind.contains(o) => o.clone(),
                Some(o) => {
                    return Err(self.err(
                        &binding.loc,
                        format!(
                            "stage '{}' has no output '{o}'{}; its outputs: {}",
                            binding.stage,
                            did_you_mean(o, up_kind.iter().map(|s| s.as_str())),
                            up_kind.join(", ")
                        ),
                    ))
                }
                None if up_kind.len() == 1 => up_kind[0].clone(),
                None => {
                    return Err(self.err(
                        &binding.loc,
                        format!(
                            "stage '{}' has several outputs ({}); write '{}.<output>'",
                            binding.stage,
                            up_kind.join(", "),
                            binding.stage
                        ),
                    ))
                }
            };
            if binding.all && !spec.many {
                return Err(self.err(
                    &binding.loc,
                    format!(
                    "input '{input}' of kind '{kind_name}' takes one artifact; remove 'all: true'"
                ),
                ));
            }
            let up_axes: Vec<String> = stages[upstream[0]]
                .axes
                .keys()
                .filter(|a| !binding.across.contains(a))
                .cloned()
                .collect();
            let mut by_projection: HashMap<Vec<Value>, Vec<usize>> = HashMap::new();
            for &u in upstream {
                let key: Vec<Value> = up_axes
                    .iter()
                    .filter(|a| stage.over.iter().any(|o| o.value == **a))
                    .map(|a| stages[u].axes[a].clone())
                    .collect();
                by_projection.entry(key).or_default().push(u);
            }
            for &d in mine {
                let key: Vec<Value> = up_axes
                    .iter()
                    .filter(|a| stages[d].axes.contains_key(*a))
                    .map(|a| stages[d].axes[a].clone())
                    .collect();
                let matched = by_projection.get(&key).cloned().unwrap_or_default();
                if !binding.all && matched.len() != 1 {
                    let extra: Vec<&String> = up_axes
                        .iter()
                        .filter(|a| !stages[d].axes.contains_key(*a))
                        .collect();
                    return Err(self.err(&binding.loc, format!(
                        "input '{input}' of stage '{}' matches {} instances of '{}' (it varies over {:?}, which '{name}' is not over); write {{from: {}, all: true}} or add those axes to '{name}'",
                        stages[d].path,
                        matched.len(),
                        binding.stage,
                        extra,
                        binding.stage
                    )));
                }
                let edges: Vec<Edge> = matched
                    .into_iter()
                    .map(|from| Edge {
                        from,
                        output: output.clone(),
                    })
                    .collect();
                stages[d]
                    .inputs
                    .entry(input.clone())
                    .or_default()
                    .extend(edges);
            }
        }
        Ok(())
    }
}

/// `sbatch` options a stage may not set: deeprepair sets them to run and track its job, or a
/// `resources:` key says them (named in the error).
const RESERVED_SBATCH: &[(&str, &str)] = &[
    ("--job-name", ""),
    ("--comment", ""),
    ("--output", ""),
    ("--error", ""),
    ("--wrap", ""),
    ("--export", ""),
    ("--parsable", ""),
    ("--ntasks", ""),
    ("--cpus-per-task", "cpus"),
    ("--mem", "mem_mb"),
    ("--gres", "gpus and gpu_type"),
    ("--gpus", "gpus and gpu_type"),
    ("--gpus-per-task", "gpus and gpu_type"),
    ("--time", "time"),
    ("--partition", "partition"),
    ("--account", "account"),
    ("--qos", "qos"),
    ("--constraint", "constraint"),
    ("--nodes", "nodes"),
];

impl Expander<'_> {
    /// Layers `raw` over a stage's resources, checking each key where it is written.
    fn apply_resources(
        &self,
        r: &mut Resources,
        cluster: &mut ClusterRequest,
        nodes_at: &mut Option<Location>,
        raw: &RawResources,
    ) -> Result<(), ManifestError> {
        if let Some(c) = raw.cpus {
            r.cpus = c;
        }
        if let Some(g) = raw.gpus {
            r.gpus = g;
        }
        if let Some(m) = raw.mem_mb {
            r.mem_mb = m;
        }
        if let Some(t) = &raw.time {
            let seconds = parse_slurm_time(&t.value).ok_or_else(|| {
                self.err(
                    &t.referenced,
                    format!(
                        "time '{}': expected a positive Slurm time limit: MM, MM:SS, HH:MM:SS, \
                         D-HH, D-HH:MM or D-HH:MM:SS",
                        t.value
                    ),
                )
            })?;
            cluster.time_s = Some(seconds);
        }
        for (key, field, target) in [
            ("partition", &raw.partition, &mut cluster.partition),
            ("account", &raw.account, &mut cluster.account),
            ("qos", &raw.qos, &mut cluster.qos),
            ("constraint", &raw.constraint, &mut cluster.constraint),
            ("gpu_type", &raw.gpu_type, &mut cluster.gpu_type),
        ] {
            if let Some(v) = field {
                let text = v.value.trim();
                if text.is_empty()
                    || text.starts_with('-')
                    || text
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == '\'')
                {
                    return Err(self.err(
                        &v.referenced,
                        format!(
                            "{key} '{}': expected a Slurm name (no spaces or quotes, not \
                             starting with '-')",
                            v.value
                        ),
                    ));
                }
                if key == "gpu_type" && text.contains(':') {
                    return Err(self.err(
                        &v.referenced,
                        format!(
                            "gpu_type '{text}': the GPU model alone (e.g. a100); the count is \
                             `gpus`"
                        ),
                    ));
                }
                *target = Some(text.to_string());
            }
        }
        if let Some(n) = &raw.nodes {
            if n.value == 0 {
                return Err(self.err(&n.referenced, "nodes: at least 1"));
            }
            cluster.nodes = Some(n.value);
            *nodes_at = Some(n.referenced);
        }
        if let Some(args) = &raw.sbatch_args {
            let mut list = vec![];
            for a in args {
                let text = a.value.trim();
                let name = text.split('=').next().unwrap_or(text);
                if !name.starts_with("--") || name.len() < 3 || text.contains(['\n', '\r']) {
                    return Err(self.err(
                        &a.referenced,
                        format!(
                            "sbatch_args '{}': expected a long sbatch option, `--name` or \
                             `--name=value`",
                            a.value
                        ),
                    ));
                }
                if let Some((_, key)) = RESERVED_SBATCH.iter().find(|(opt, _)| *opt == name) {
                    let why = if key.is_empty() {
                        "deeprepair sets it to run and track the job".to_string()
                    } else {
                        format!("use the resources key `{key}`")
                    };
                    return Err(self.err(
                        &a.referenced,
                        format!("sbatch_args '{text}': {name} is not allowed here: {why}"),
                    ));
                }
                list.push(text.to_string());
            }
            cluster.sbatch_args = list;
        }
        Ok(())
    }
}
