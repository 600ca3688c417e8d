//! Renders a plan for `deeprepair plan`: a text summary, DOT, Mermaid or JSON.

use crate::artifact::Digest;
use crate::key::stage_key_with_fingerprint;
use crate::plan::Plan;
use crate::store::Store;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// What the store already knows about each planned stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlannedState {
    /// In the action cache with all outputs present.
    Cached,
    /// Will run: its key is known and not cached.
    Run,
    /// Its key depends on outputs of stages that will run; may still turn out cached.
    AfterUpstream,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanStatus {
    pub states: Vec<PlannedState>,
    pub keys: Vec<Option<Digest>>,
}

impl PlanStatus {
    pub fn count(&self, state: PlannedState) -> usize {
        self.states.iter().filter(|s| **s == state).count()
    }
}

/// Resolves keys in topological order as far as the cache allows (a dry run: no verification
/// of bytes, just presence of the action and its artifact records).
pub fn plan_status(plan: &Plan, store: Option<&Store>) -> anyhow::Result<PlanStatus> {
    let n = plan.stages.len();
    let mut outputs: Vec<Option<BTreeMap<String, Digest>>> = vec![None; n];
    let mut states = vec![PlannedState::AfterUpstream; n];
    let mut keys = vec![None; n];
    for (i, s) in plan.stages.iter().enumerate() {
        let mut digests = BTreeMap::new();
        let mut known = true;
        for (name, edges) in &s.inputs {
            let mut list = vec![];
            for e in edges {
                match outputs[e.from].as_ref().and_then(|o| o.get(&e.output)) {
                    Some(d) => list.push(*d),
                    None => known = false,
                }
            }
            digests.insert(name.clone(), list);
        }
        if !known {
            continue;
        }
        let key = stage_key_with_fingerprint(
            &s.kind,
            &s.version,
            &s.params,
            &digests,
            s.fingerprint.as_deref(),
        );
        keys[i] = Some(key);
        states[i] = PlannedState::Run;
        if let Some(store) = store {
            if let Some(action) = store.action(&key)? {
                let mut present = true;
                for d in action.outputs.values() {
                    present &= store.artifact_record(d)?.is_some();
                }
                if present {
                    states[i] = PlannedState::Cached;
                    outputs[i] = Some(action.outputs);
                }
            }
        }
    }
    Ok(PlanStatus { states, keys })
}

pub fn text(plan: &Plan, status: &PlanStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan '{}' from {}: {} stages",
        plan.name,
        plan.manifest,
        plan.stages.len()
    );
    let mut by_kind: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    let mut work = [0.0f64; 3];
    for (s, st) in plan.stages.iter().zip(&status.states) {
        let slot = match st {
            PlannedState::Cached => 0,
            PlannedState::Run => 1,
            PlannedState::AfterUpstream => 2,
        };
        by_kind.entry(&s.kind).or_default()[slot] += 1;
        work[slot] += s.estimate;
    }
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>7} {:>7} {:>14}",
        "kind", "stages", "cached", "run", "after-upstream"
    );
    for (kind, c) in &by_kind {
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>7} {:>7} {:>14}",
            kind,
            c.iter().sum::<usize>(),
            c[0],
            c[1],
            c[2]
        );
    }
    let _ = writeln!(
        out,
        "cached: {}, will run: {}, after upstream (run unless their outputs turn out cached): {}",
        status.count(PlannedState::Cached),
        status.count(PlannedState::Run),
        status.count(PlannedState::AfterUpstream)
    );
    let _ = writeln!(
        out,
        "estimated work to do: {:.0} units (cached: {:.0})",
        work[1] + work[2],
        work[0]
    );
    out
}

/// Every stage with its state, inputs and params (for `plan --verbose`).
pub fn text_stages(plan: &Plan, status: &PlanStatus) -> String {
    let mut out = String::new();
    for (s, st) in plan.stages.iter().zip(&status.states) {
        let inputs: Vec<String> = s
            .inputs
            .iter()
            .map(|(name, edges)| {
                let ups: Vec<&str> = edges
                    .iter()
                    .map(|e| plan.stages[e.from].path.as_str())
                    .collect();
                format!("{name}←{}", ups.join("+"))
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<15} {}  {}",
            format!("{st:?}"),
            s.path,
            inputs.join(" ")
        );
    }
    out
}

fn node_id(i: usize) -> String {
    format!("s{i}")
}

pub fn dot(plan: &Plan, status: &PlanStatus) -> String {
    let mut out = String::from("digraph plan {\n  rankdir=LR;\n  node [shape=box, style=filled, fontname=\"monospace\"];\n");
    for (i, (s, st)) in plan.stages.iter().zip(&status.states).enumerate() {
        let color = match st {
            PlannedState::Cached => "palegreen",
            PlannedState::Run => "lightgoldenrod1",
            PlannedState::AfterUpstream => "lightgray",
        };
        let _ = writeln!(
            out,
            "  {} [label={:?}, fillcolor={color}];",
            node_id(i),
            format!("{}\n{}", s.path, s.kind)
        );
    }
    for (i, s) in plan.stages.iter().enumerate() {
        for (name, edges) in &s.inputs {
            for e in edges {
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={:?}];",
                    node_id(e.from),
                    node_id(i),
                    name
                );
            }
        }
    }
    out.push_str("}\n");
    out
}

pub fn mermaid(plan: &Plan, status: &PlanStatus) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, (s, st)) in plan.stages.iter().zip(&status.states).enumerate() {
        let label = s.path.replace('"', "'");
        let _ = writeln!(
            out,
            "  {}[\"{label}\"]:::{}",
            node_id(i),
            match st {
                PlannedState::Cached => "cached",
                PlannedState::Run => "run",
                PlannedState::AfterUpstream => "after",
            }
        );
    }
    for (i, s) in plan.stages.iter().enumerate() {
        for (name, edges) in &s.inputs {
            for e in edges {
                let _ = writeln!(out, "  {} -->|{name}| {}", node_id(e.from), node_id(i));
            }
        }
    }
    out.push_str(
        "  classDef cached fill:#9f9\n  classDef run fill:#ff9\n  classDef after fill:#ddd\n",
    );
    out
}

pub fn json(plan: &Plan, status: &PlanStatus) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        plan: &'a Plan,
        status: &'a PlanStatus,
    }
    serde_json::to_string_pretty(&Out { plan, status }).expect("plan serializes")
}
