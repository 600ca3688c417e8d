//! Generic stage kinds that know nothing of ML: used by the orchestrator's tests, benchmarks
//! and demo manifests, and handy for gluing text into reports.

use crate::artifact::{Artifact, ArtifactHeader, ArtifactKind};
use crate::kind::{InputSpec, ParamSpec, ParamType, Registry, StageCtx, StageError, StageKind};
use anyhow::Context;
use serde_json::{json, Value};

/// `util.work`'s largest output: a bigger `size` is refused when planning, not an abort.
const MAX_WORK_OUTPUT: i64 = 1 << 30;

pub fn register(registry: &mut Registry) {
    registry.register(Text);
    registry.register(Concat);
    registry.register(Work);
}

/// `util.text`: emits its `text` param.
pub struct Text;

impl StageKind for Text {
    fn name(&self) -> &'static str {
        "util.text"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "emits its text param as a text artifact"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required(
            "text",
            ParamType::Str,
            "the text to emit",
        )]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["text"]
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        Ok(vec![Artifact::text(ctx.param::<String>("text")?)])
    }
}

/// `util.concat`: joins its inputs' bytes with a separator.
pub struct Concat;

impl StageKind for Concat {
    fn name(&self) -> &'static str {
        "util.concat"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "concatenates its inputs with a separator"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional(
            "separator",
            ParamType::Str,
            json!("\n"),
            "placed between inputs",
        )]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "parts",
            many: true,
            optional: false,
            help: "the artifacts to join, in plan order",
        }]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["text"]
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let sep: String = ctx.param("separator")?;
        let mut out = Vec::new();
        for (i, r) in ctx.input_refs("parts")?.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(sep.as_bytes());
            }
            out.extend(ctx.artifact(&r.digest)?.bytes);
        }
        Ok(vec![Artifact {
            header: ArtifactHeader::new(ArtifactKind::Text, "text/plain", "txt"),
            bytes: out,
        }])
    }
}

/// `util.work`: a deterministic iterative computation with progress and checkpoints, standing
/// in for training in tests: `steps` rounds of hashing (optionally sleeping `step_ms` each),
/// a checkpoint every `checkpoint_every` steps, output `size` bytes derived from the state.
pub struct Work;

#[derive(serde::Serialize, serde::Deserialize)]
struct WorkCheckpoint {
    step: u64,
    state: String,
}

impl StageKind for Work {
    fn name(&self) -> &'static str {
        "util.work"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "deterministic checkpointing busy-work (for tests and benchmarks)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("steps", ParamType::Int, json!(10), "rounds to compute"),
            ParamSpec::optional(
                "step_ms",
                ParamType::Int,
                json!(0),
                "sleep per round (simulated work)",
            ),
            ParamSpec::optional("seed", ParamType::Int, json!(0), "initial state"),
            ParamSpec::optional(
                "checkpoint_every",
                ParamType::Int,
                json!(0),
                "rounds between checkpoints (0: never)",
            ),
            ParamSpec::optional("size", ParamType::Int, json!(256), "output bytes"),
            ParamSpec::optional(
                "fail_attempts",
                ParamType::Int,
                json!(0),
                "fail transiently on this many first attempts",
            ),
            ParamSpec::optional("fail", ParamType::Bool, json!(false), "fail fatally"),
            ParamSpec::optional(
                "label",
                ParamType::Any,
                Value::Null,
                "free label (changes the key)",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "after",
            many: true,
            optional: true,
            help: "upstream artifacts mixed into the state",
        }]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["data"]
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        for p in [
            "steps",
            "step_ms",
            "checkpoint_every",
            "size",
            "fail_attempts",
        ] {
            if params[p].as_i64().unwrap_or(0) < 0 {
                return Err((p.into(), "must not be negative".into()));
            }
        }
        let size = params["size"].as_i64().unwrap_or(0);
        if size > MAX_WORK_OUTPUT {
            return Err((
                "size".into(),
                format!("{size} bytes; at most {MAX_WORK_OUTPUT} (1 GiB) of busy-work output"),
            ));
        }
        Ok(())
    }
    fn estimate(&self, params: &Value) -> f64 {
        1.0 + params["steps"].as_f64().unwrap_or(0.0) * params["step_ms"].as_f64().unwrap_or(0.0)
            / 1000.0
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let steps: u64 = ctx.param("steps")?;
        let step_ms: u64 = ctx.param("step_ms")?;
        let every: u64 = ctx.param("checkpoint_every")?;
        let size: usize = ctx.param("size")?;
        if ctx.param::<bool>("fail")? {
            ctx.log("failing as asked (fail: true)");
            return Err(StageError::Fatal(anyhow::anyhow!("asked to fail")));
        }
        if u64::from(ctx.task.attempt) < ctx.param::<u64>("fail_attempts")? {
            return Err(StageError::Transient(anyhow::anyhow!(
                "simulated transient failure on attempt {}",
                ctx.task.attempt
            )));
        }
        let (mut step, mut state) = match ctx.load_checkpoint()? {
            Some(bytes) => {
                let ck: WorkCheckpoint =
                    serde_json::from_slice(&bytes).context("reading util.work checkpoint")?;
                ctx.log(format!("resumed from checkpoint at step {}", ck.step));
                let state = blake3::Hash::from_hex(&ck.state).context("checkpoint state")?;
                (ck.step, *state.as_bytes())
            }
            None => {
                let mut h = blake3::Hasher::new();
                h.update(&ctx.param::<i64>("seed")?.to_le_bytes());
                h.update(ctx.params()["label"].to_string().as_bytes());
                if ctx.has_input("after") {
                    for r in ctx.input_refs("after")?.to_vec() {
                        h.update(&ctx.artifact(&r.digest)?.bytes);
                    }
                }
                (0, *h.finalize().as_bytes())
            }
        };
        while step < steps {
            ctx.check_cancelled()?;
            state = *blake3::hash(&state).as_bytes();
            if step_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(step_ms));
            }
            step += 1;
            ctx.progress(step, steps, "steps");
            if every > 0 && step % every == 0 && step < steps {
                let ck = WorkCheckpoint {
                    step,
                    state: blake3::Hash::from(state).to_hex().to_string(),
                };
                ctx.save_checkpoint(&serde_json::to_vec(&ck).context("checkpoint")?)?;
            }
        }
        let mut out = vec![0u8; size];
        blake3::Hasher::new()
            .update(&state)
            .finalize_xof()
            .fill(&mut out);
        Ok(vec![Artifact {
            header: ArtifactHeader::new(ArtifactKind::Tensor, "application/octet-stream", "bin")
                .with_meta(json!({"steps": steps, "bytes": size})),
            bytes: out,
        }])
    }
}
