//! `plan`: a manifest expanded, in text, DOT, Mermaid or JSON.

use crate::store_path;
use clap::{Args, ValueEnum};
use deeprepair_pipeline::render;
use deeprepair_pipeline::{plan_file_with_vars, Registry, Store};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

/// Manifest variables from the command line.
#[derive(Args, Clone, Default)]
pub struct VarArgs {
    /// Set a manifest variable: `--var name=value` (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub(crate) vars: Vec<String>,
    /// Shorthand for `--var data=PATH`: where the real data lives.
    #[arg(long, value_name = "PATH")]
    pub(crate) data: Option<PathBuf>,
}

impl VarArgs {
    pub(crate) fn map(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for v in &self.vars {
            let (k, val) = v.split_once('=').ok_or_else(|| {
                crate::ml_commands::UsageError(format!("--var '{v}': expected NAME=VALUE"))
            })?;
            out.insert(k.trim().to_string(), val.to_string());
        }
        if let Some(d) = &self.data {
            out.insert("data".into(), d.display().to_string());
        }
        Ok(out)
    }
}

#[derive(Args)]
pub struct PlanArgs {
    pub(crate) manifest: PathBuf,
    #[command(flatten)]
    pub(crate) vars: VarArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) format: PlanFormat,
    /// List every stage with its state and inputs.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
}

pub fn plan(args: PlanArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    let plan = plan_file_with_vars(&args.manifest, registry, &args.vars.map()?)?;
    let path = store_path(args.store, Some(&args.manifest));
    // Only read a store that exists; a plan never creates one.
    let store = if path.exists() {
        Some(Store::open_reader(&path)?)
    } else {
        None
    };
    let status = render::plan_status(&plan, store.as_ref())?;
    let out = match args.format {
        PlanFormat::Text => {
            let mut s = render::text(&plan, &status);
            if args.verbose {
                s.push_str(&render::text_stages(&plan, &status));
            }
            s
        }
        PlanFormat::Dot => render::dot(&plan, &status),
        PlanFormat::Mermaid => render::mermaid(&plan, &status),
        PlanFormat::Json => render::json(&plan, &status),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
