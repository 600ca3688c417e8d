//! Weights on disk: safetensors files keyed by the PyTorch `state_dict` names.
//!
//! [`load_weights`] checks a file against the names and shapes an architecture expects
//! ([`expected_tensors`]) and reports every missing, unexpected and mis-shaped tensor at once;
//! PyTorch's `num_batches_tracked` buffers are ignored. [`save_weights`] writes a [`VarMap`]
//! (which then loads in PyTorch with `model.load_state_dict(safetensors.torch.load_file(p))`).
//!
//! Note: a model built on a [`VarMap`] keeps its BatchNorm running statistics there too (candle
//! stores them as variables). They get no gradient, but optimizers and weight decay should use
//! [`trainable_vars`], which leaves them out.

use crate::{build, Arch, Classifier};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// True for BatchNorm buffers (`running_mean`, `running_var`), which are not parameters.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// A backend that hands out zeros and records which names/shapes were asked for.
/// `(name, shape)` pairs.
pub type TensorShapes = Vec<(String, Vec<usize>)>;

struct Recorder(Arc<Mutex<TensorShapes>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("recorder lock")
            .push((name.to_string(), s.dims().to_vec()));
        // One zero broadcast to the shape: recording a large model allocates nothing.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape of {name} unknown while recording")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The `(name, shape)` of every tensor that `build` reads from its `VarBuilder`, in
/// construction order (the builder hands out zeros).
pub fn record_tensors(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> candle_core::Result<TensorShapes> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend: Box<dyn SimpleBackend> = Box::new(Recorder(log.clone()));
    build(VarBuilder::from_backend(backend, DType::F32, Device::Cpu))?;
    let out = std::mem::take(&mut *log.lock().expect("recorder lock"));
    Ok(out)
}

/// The `(name, shape)` of every tensor `arch` reads (parameters and BatchNorm running stats,
/// not `num_batches_tracked`), in construction order.
pub fn expected_tensors(arch: Arch, num_classes: usize) -> candle_core::Result<TensorShapes> {
    record_tensors(|vb| build(arch, num_classes, vb).map(|_| ()))
}

/// Trainable parameters, as PyTorch's `sum(p.numel() for p in model.parameters())`.
pub fn param_count(arch: Arch, num_classes: usize) -> usize {
    expected_tensors(arch, num_classes)
        .expect("building an architecture with zeros cannot fail")
        .iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

/// The variables of `varmap` an optimizer should update (all but BatchNorm running stats),
/// sorted by name.
pub fn trainable_vars(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut named: Vec<_> = data
        .iter()
        .filter(|(name, _)| !is_running_stat(name))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

/// One disagreement between a weights file and an architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorProblem {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Unexpected {
        name: String,
        found: Vec<usize>,
    },
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// An integer or boolean tensor where the model holds floats: casting would invent values.
    Dtype {
        name: String,
        found: DType,
    },
    /// NaN or infinite values: the model's outputs would be NaN.
    NotFinite {
        name: String,
        count: usize,
    },
    /// A BatchNorm running variance below zero: no valid training produces one.
    NegativeVariance {
        name: String,
        count: usize,
    },
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorProblem::Missing { name, expected } => {
                write!(f, "missing    {name}: expected {expected:?}")
            }
            TensorProblem::Unexpected { name, found } => {
                write!(f, "unexpected {name}: found {found:?}")
            }
            TensorProblem::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "shape      {name}: expected {expected:?}, found {found:?}"
            ),
            TensorProblem::Dtype { name, found } => write!(
                f,
                "dtype      {name}: {found:?} (expected a float type: f32, f16, bf16 or f64)"
            ),
            TensorProblem::NotFinite { name, count } => {
                write!(f, "values     {name}: {count} NaN or infinite value(s)")
            }
            TensorProblem::NegativeVariance { name, count } => {
                write!(f, "values     {name}: {count} negative variance(s)")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading weights {path}: {source}")]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{path} is not a usable safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error(
        "weights {path} do not fit {arch} ({n} problem(s)):\n{list}",
        n = problems.len(),
        list = problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
    )]
    Mismatch {
        path: PathBuf,
        arch: &'static str,
        problems: Vec<TensorProblem>,
    },
    #[error("building {arch} from {path}: {source}")]
    Build {
        path: PathBuf,
        arch: &'static str,
        source: candle_core::Error,
    },
}

/// Compares `found` tensors with what `arch` expects; every problem, expected names first (in
/// construction order), then unexpected ones sorted by name. `num_batches_tracked` is ignored.
pub fn check_tensors(
    expected: &[(String, Vec<usize>)],
    found: &HashMap<String, Vec<usize>>,
) -> Vec<TensorProblem> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match found.get(name) {
            None => problems.push(TensorProblem::Missing {
                name: name.clone(),
                expected: shape.clone(),
            }),
            Some(f) if f != shape => problems.push(TensorProblem::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: f.clone(),
            }),
            Some(_) => {}
        }
    }
    let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<_> = found
        .iter()
        .filter(|(n, _)| !known.contains(n.as_str()) && !n.ends_with("num_batches_tracked"))
        .collect();
    extra.sort_by(|a, b| a.0.cmp(b.0));
    problems.extend(extra.into_iter().map(|(n, s)| TensorProblem::Unexpected {
        name: n.clone(),
        found: s.clone(),
    }));
    problems
}

/// Checks what safetensors' own parser lets through or reports vaguely: the file's length
/// against its header length, and tensor names listed twice in the header (a JSON object with a
/// repeated key, of which the parser silently keeps one).
pub fn check_safetensors_layout(bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len();
    if len < 8 {
        return Err(format!(
            "{len} bytes; a safetensors file starts with an 8-byte header length and a JSON header"
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > (len - 8) as u64 {
        return Err(format!(
            "its header claims {header_len} bytes but only {} follow the length field",
            len - 8
        ));
    }
    let header = &bytes[8..8 + header_len as usize];
    let keys: KeysInOrder = serde_json::from_slice(header)
        .map_err(|e| format!("its JSON header does not parse ({e})"))?;
    let mut seen = BTreeSet::new();
    for key in &keys.0 {
        if !seen.insert(key.as_str()) {
            return Err(format!("tensor '{key}' is listed twice in its header"));
        }
    }
    Ok(())
}

/// The keys of a JSON object, repeats kept.
struct KeysInOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeysInOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = KeysInOrder;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeysInOrder, A::Error> {
                let mut keys = vec![];
                while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(KeysInOrder(keys))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Loads a safetensors file written by [`save_weights`] or by PyTorch
/// (`safetensors.torch.save_file(model.state_dict(), p)`), converting floats to f32. Returns the
/// [`VarMap`] holding the loaded values (train on from them) and the model built on it.
pub fn load_weights(
    arch: Arch,
    num_classes: usize,
    path: &Path,
    device: &Device,
) -> Result<(VarMap, Box<dyn Classifier>), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    load_weights_from_buffer(arch, num_classes, &bytes, path, device)
}

/// [`load_weights`] from safetensors bytes in memory (a stored artifact); `source` names them
/// in errors.
pub fn load_weights_from_buffer(
    arch: Arch,
    num_classes: usize,
    bytes: &[u8],
    source: &Path,
    device: &Device,
) -> Result<(VarMap, Box<dyn Classifier>), LoadError> {
    check_safetensors_layout(bytes).map_err(|detail| LoadError::Format {
        path: source.to_path_buf(),
        detail,
    })?;
    let tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| LoadError::Format {
            path: source.to_path_buf(),
            detail: e.to_string(),
        })?;
    weights_from_tensors(arch, num_classes, &tensors, source, device)
}

/// Checks `tensors` against what `arch` expects, then builds the VarMap and the model on it.
fn weights_from_tensors(
    arch: Arch,
    num_classes: usize,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    device: &Device,
) -> Result<(VarMap, Box<dyn Classifier>), LoadError> {
    let build_err = |source| LoadError::Build {
        path: path.to_path_buf(),
        arch: arch.name(),
        source,
    };
    let expected = expected_tensors(arch, num_classes).map_err(build_err)?;
    let found: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let mut problems = check_tensors(&expected, &found);
    if problems.is_empty() {
        problems = check_values(&expected, tensors).map_err(build_err)?;
    }
    if !problems.is_empty() {
        return Err(LoadError::Mismatch {
            path: path.to_path_buf(),
            arch: arch.name(),
            problems,
        });
    }
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, _) in &expected {
            let t = tensors[name].to_dtype(DType::F32).map_err(build_err)?;
            data.insert(name.clone(), Var::from_tensor(&t).map_err(build_err)?);
        }
    }
    let model = build(
        arch,
        num_classes,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )
    .map_err(build_err)?;
    Ok((varmap, model))
}

/// The values a model cannot be trusted with: integer tensors, NaN/Inf, negative running
/// variances. A float type other than f32 is converted (exactly for f16/bf16, rounded for f64)
/// and said once in the log.
fn check_values(
    expected: &[(String, Vec<usize>)],
    tensors: &HashMap<String, Tensor>,
) -> candle_core::Result<Vec<TensorProblem>> {
    let mut problems = vec![];
    let mut converted = BTreeSet::new();
    for (name, _) in expected {
        let t = &tensors[name];
        match t.dtype() {
            DType::F32 => {}
            DType::F16 | DType::BF16 | DType::F64 => {
                converted.insert(format!("{:?}", t.dtype()));
            }
            other => {
                problems.push(TensorProblem::Dtype {
                    name: name.clone(),
                    found: other,
                });
                continue;
            }
        }
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            problems.push(TensorProblem::NotFinite {
                name: name.clone(),
                count,
            });
        }
        if name.ends_with(".running_var") {
            let count = values.iter().filter(|v| **v < 0.0).count();
            if count > 0 {
                problems.push(TensorProblem::NegativeVariance {
                    name: name.clone(),
                    count,
                });
            }
        }
    }
    if !converted.is_empty() {
        tracing::info!(
            "weights stored as {} converted to f32",
            converted.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(problems)
}

/// Writes every variable of `varmap` (parameters and running stats, PyTorch names) as
/// safetensors.
pub fn save_weights(varmap: &VarMap, path: &Path) -> candle_core::Result<()> {
    varmap.save(path)
}

/// Builds `arch` for inference on detached views of `varmap`'s tensors: the weights share
/// storage with the VarMap (no copy), but no autograd graph is recorded, so a forward pass frees
/// its intermediates as it goes. A model built on the VarMap itself keeps every intermediate
/// alive until the logits are dropped (GBs for DenseNet on a batch of 128). BatchNorm running
/// stats are copied at build time (candle's BatchNorm owns them), so rebuild after training on.
/// Gradients with respect to the input still flow (only the weights are detached).
pub fn build_detached(
    arch: Arch,
    num_classes: usize,
    varmap: &VarMap,
    device: &Device,
) -> candle_core::Result<Box<dyn Classifier>> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    build(
        arch,
        num_classes,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
}
