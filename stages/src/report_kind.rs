//! `report`: the paper's tables and figures from every evaluation of a run, as one artifact
//! (a tar of `report.md`, the tables as Markdown/CSV/LaTeX and the PNG figures; `export`
//! unpacks it).

use deeprepair_pipeline::{
    Artifact, ArtifactHeader, ArtifactKind, InputSpec, ParamSpec, StageCtx, StageError, StageKind,
};
use deeprepair_report::{write_report, Record};
use serde_json::json;

pub struct ReportKind;

impl StageKind for ReportKind {
    fn name(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "Table 2/3, clean-vs-corrupted and cross-corruption figures from evaluation records"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "results",
            many: true,
            optional: false,
            help: "metrics of evaluate stages",
        }]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["report", "records"]
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let mut records: Vec<Record> = Vec::new();
        for r in ctx.input_refs("results")?.to_vec() {
            let a = ctx.artifact(&r.digest)?;
            let v: serde_json::Value =
                serde_json::from_slice(&a.bytes).map_err(anyhow::Error::from)?;
            let rs: Vec<Record> = serde_json::from_value(v["records"].clone())
                .map_err(|e| anyhow::anyhow!("{} is not an evaluation result: {e}", r.stage))?;
            records.extend(rs);
        }
        let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
        let files = write_report(&records, dir.path()).map_err(anyhow::Error::from)?;
        let mut tar = tar::Builder::new(Vec::new());
        for f in &files {
            let name = f.strip_prefix(dir.path()).unwrap_or(f);
            tar.append_path_with_name(f, name)
                .map_err(anyhow::Error::from)?;
        }
        let bytes = tar.into_inner().map_err(anyhow::Error::from)?;
        let summary = std::fs::read_to_string(dir.path().join("table2.md")).unwrap_or_default();
        ctx.log(format!("{} records, {} files", records.len(), files.len()));
        let report = Artifact {
            header: ArtifactHeader::new(ArtifactKind::Report, "application/x-tar", "tar")
                .with_meta(json!({ "records": records.len(), "files": files.iter().filter_map(|f| f.file_name().map(|n| n.to_string_lossy().to_string())).collect::<Vec<_>>(), "table2": summary })),
            bytes,
        };
        Ok(vec![
            report,
            Artifact::json(ArtifactKind::Metrics, &records),
        ])
    }
}
