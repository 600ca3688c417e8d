//! A run's DAG as inline SVG: a layered layout (each stage one column right of its deepest
//! input), nodes ordered within a column by their inputs' mean row (one barycenter sweep), each
//! node a link to its stage page, coloured by state.

use deeprepair_pipeline::store::{StageRunRecord, StageState};
use maud::{html, Markup, PreEscaped};
use std::collections::HashMap;

const NODE_W: f64 = 250.0;
const NODE_H: f64 = 24.0;
const COL_GAP: f64 = 70.0;
const ROW_GAP: f64 = 8.0;
const MARGIN: f64 = 6.0;

/// Fill colour of a node in `state`.
pub fn state_colour(state: StageState) -> &'static str {
    match state {
        StageState::Pending => "#e5e7eb",
        StageState::Running => "#93c5fd",
        StageState::Cached => "#bbf7d0",
        StageState::Succeeded => "#4ade80",
        StageState::Failed => "#f87171",
        StageState::Skipped => "#f3f4f6",
    }
}

/// Where each stage sits: (column, row) by index into the records.
pub struct Layout {
    pub pos: Vec<(usize, usize)>,
    /// (from, to) by index.
    pub edges: Vec<(usize, usize)>,
    pub columns: usize,
    pub rows: usize,
}

/// Lays out `stages`, whose `deps` name the stage paths they read (paths outside the list are
/// ignored, as are cycles, which a plan never has).
pub fn layout(stages: &[StageRunRecord]) -> Layout {
    let index: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.stage.as_str(), i))
        .collect();
    let ups: Vec<Vec<usize>> = stages
        .iter()
        .map(|s| {
            s.deps
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();
    // Column = longest path from a source; iterative DFS with a visiting mark against cycles.
    let n = stages.len();
    let mut column: Vec<Option<usize>> = vec![None; n];
    let mut visiting = vec![false; n];
    for start in 0..n {
        let mut stack = vec![(start, 0usize)];
        while let Some((node, next)) = stack.pop() {
            if column[node].is_some() {
                continue;
            }
            visiting[node] = true;
            if let Some(&up) = ups[node].get(next) {
                stack.push((node, next + 1));
                if column[up].is_none() && !visiting[up] {
                    stack.push((up, 0));
                }
                continue;
            }
            let c = ups[node]
                .iter()
                .filter_map(|&u| column[u])
                .map(|c| c + 1)
                .max()
                .unwrap_or(0);
            column[node] = Some(c);
            visiting[node] = false;
        }
    }
    let column: Vec<usize> = column.into_iter().map(|c| c.unwrap_or(0)).collect();
    let columns = column.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_column: Vec<Vec<usize>> = vec![vec![]; columns];
    for (i, &c) in column.iter().enumerate() {
        by_column[c].push(i);
    }
    let mut row = vec![0usize; n];
    for members in by_column.iter_mut() {
        // Barycenter of the inputs' rows (already placed: they sit in earlier columns).
        let key = |i: usize| -> f64 {
            if ups[i].is_empty() {
                f64::MAX
            } else {
                ups[i].iter().map(|&u| row[u] as f64).sum::<f64>() / ups[i].len() as f64
            }
        };
        members.sort_by(|&a, &b| {
            key(a)
                .total_cmp(&key(b))
                .then_with(|| stages[a].stage.cmp(&stages[b].stage))
        });
        for (r, &i) in members.iter().enumerate() {
            row[i] = r;
        }
    }
    let rows = by_column.iter().map(Vec::len).max().unwrap_or(0);
    let edges = ups
        .iter()
        .enumerate()
        .flat_map(|(to, us)| us.iter().map(move |&from| (from, to)))
        .collect();
    Layout {
        pos: column.into_iter().zip(row).collect(),
        edges,
        columns,
        rows,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut t: String = text.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// The SVG of a run's DAG; `link(stage)` gives each node's href.
pub fn svg(stages: &[StageRunRecord], link: impl Fn(&str) -> String) -> Markup {
    let l = layout(stages);
    let x = |c: usize| MARGIN + c as f64 * (NODE_W + COL_GAP);
    let y = |r: usize| MARGIN + r as f64 * (NODE_H + ROW_GAP);
    let width = x(l.columns.max(1)) - COL_GAP + MARGIN;
    let height = y(l.rows.max(1)) - ROW_GAP + MARGIN;
    let mut paths = String::new();
    for &(from, to) in &l.edges {
        let (fc, fr) = l.pos[from];
        let (tc, tr) = l.pos[to];
        let (x1, y1) = (x(fc) + NODE_W, y(fr) + NODE_H / 2.0);
        let (x2, y2) = (x(tc), y(tr) + NODE_H / 2.0);
        let mid = (x1 + x2) / 2.0;
        paths.push_str(&format!(
            "<path d=\"M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}\"/>"
        ));
    }
    html! {
        svg class="dag" xmlns="http://www.w3.org/2000/svg" width=(format!("{width:.0}"))
            height=(format!("{height:.0}")) viewBox=(format!("0 0 {width:.0} {height:.0}")) {
            g class="edges" fill="none" stroke="#9ca3af" stroke-width="1.2" { (PreEscaped(paths)) }
            @for (i, s) in stages.iter().enumerate() {
                @let (c, r) = l.pos[i];
                a href=(link(&s.stage)) class="node" data-stage=(s.stage) data-state=(state_name(s.state)) {
                    title { (s.stage) " (" (state_name(s.state)) ")" }
                    rect x=(format!("{:.1}", x(c))) y=(format!("{:.1}", y(r))) width=(NODE_W)
                        height=(NODE_H) rx="4" fill=(state_colour(s.state)) stroke="#374151" {}
                    text x=(format!("{:.1}", x(c) + 6.0)) y=(format!("{:.1}", y(r) + 16.0))
                        font-size="11" font-family="monospace" { (truncate(&s.stage, 36)) }
                }
            }
        }
    }
}

pub fn state_name(state: StageState) -> &'static str {
    match state {
        StageState::Pending => "pending",
        StageState::Running => "running",
        StageState::Cached => "cached",
        StageState::Succeeded => "succeeded",
        StageState::Failed => "failed",
        StageState::Skipped => "skipped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(path: &str, deps: &[&str]) -> StageRunRecord {
        let mut r = StageRunRecord::pending(path, "util.text");
        r.deps = deps.iter().map(|d| d.to_string()).collect();
        r
    }

    #[test]
    fn every_stage_sits_right_of_its_inputs() {
        let stages = vec![
            stage("c", &["b", "a"]),
            stage("b", &["a"]),
            stage("a", &[]),
            stage("d", &["a"]),
            stage("loop1", &["loop2"]),
            stage("loop2", &["loop1"]),
        ];
        let l = layout(&stages);
        assert_eq!(l.pos[2].0, 0);
        assert_eq!(l.pos[1].0, 1);
        assert_eq!(l.pos[0].0, 2);
        assert_eq!(l.pos[3].0, 1);
        for &(from, to) in &l.edges {
            if !stages[from].stage.starts_with("loop") {
                assert!(l.pos[from].0 < l.pos[to].0, "{from} -> {to}");
            }
        }
        // No two stages share a cell.
        let mut cells: Vec<_> = l.pos.clone();
        cells.sort();
        cells.dedup();
        assert_eq!(cells.len(), stages.len());
    }
}
