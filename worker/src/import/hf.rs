//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and `tokenizer.json`. Read in bf16, f16 or f32; written in
//! the dtype the user asks for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Result, WorkerError};
use crate::model::{LlamaConfig, ParamLayout};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub use dapt_proto::checkpoint::EXPORT_MARKER;

/// Makes `dir` ready to receive an exported or imported model: created when missing, kept when
/// empty or when it holds an earlier dapt export (its [`EXPORT_MARKER`]) and only the files an
/// export writes. Anything else is refused with an error naming what is there: a typo must not
/// overwrite a user's own model (`config.json`, `model.safetensors`) with ours.
pub fn claim_output_dir(dir: &Path) -> Result<()> {
    let refuse = |why: String| {
        Err(WorkerError::Invalid(format!(
            "output {} {why}; dapt writes a model only into a new or empty directory or over its own earlier export: choose another output",
            dir.display()
        )))
    };
    // A symlink to a directory (a model folder on another volume) is an output like the
    // directory it names, written into through the link; a link to anything else, or to nothing,
    // is refused naming its target.
    let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if link && !dir.is_dir() {
        let target = std::fs::read_link(dir).map_err(WorkerError::io(dir))?;
        return refuse(format!(
            "is a symlink to {}, which is not a directory{}",
            target.display(),
            if dir.exists() {
                ""
            } else {
                " (it does not exist)"
            }
        ));
    }
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(WorkerError::io(dir)(e)),
        Ok(meta) if !meta.is_dir() => return refuse("exists and is not a directory".into()),
        Ok(_) => {
            let names = file_names(dir)?;
            // Every entry a regular file: a symlink in an earlier export (say, `tokenizer.json`
            // to the user's own) would be written through.
            for name in &names {
                let path = dir.join(name);
                let meta = std::fs::symlink_metadata(&path).map_err(WorkerError::io(&path))?;
                if !meta.file_type().is_file() {
                    return refuse(format!(
                        "holds `{name}`, which is not a regular file (a symlink or a directory)"
                    ));
                }
            }
            let ours = names.iter().any(|n| n == EXPORT_MARKER);
            if let Some(name) = names
                .iter()
                .find(|n| !ours || !dapt_proto::checkpoint::is_export_entry(dir, n))
            {
                return refuse(format!(
                    "holds `{name}`, which {}",
                    if ours {
                        "is not part of a dapt export"
                    } else {
                        "dapt did not write (no dapt-export.json)"
                    }
                ));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(WorkerError::io(dir))?;
    // The carried files an earlier export wrote stay listed until this one says what it wrote.
    let earlier = dapt_proto::checkpoint::carried_files_written(dir);
    record_export(dir, &earlier, None)
}

/// Writes export directory `dir`'s marker ([`EXPORT_MARKER`]), listing `carried`: the base
/// model's files dapt wrote there (`dapt_proto::checkpoint::CARRIED_FILES`), which a later
/// export may then replace or remove; and `seq_len` and `micro_batch`, the sequence length and
/// micro-batch the model was trained with (`dapt eval`'s defaults), when known.
pub fn record_export(dir: &Path, carried: &[String], trained: Option<(u32, usize)>) -> Result<()> {
    let mut marker = serde_json::json!({
        "created_by": format!("dapt {}", env!("CARGO_PKG_VERSION")),
        "files": carried,
    });
    if let Some((seq_len, micro_batch)) = trained {
        marker["seq_len"] = seq_len.into();
        marker["micro_batch"] = micro_batch.into();
    }
    write_atomic(
        &dir.join(EXPORT_MARKER),
        serde_json::to_string_pretty(&marker)
            .unwrap_or_default()
            .as_bytes(),
    )
}

/// A model read into the flat layout.
pub struct HfWeights {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    pub weights: Vec<f32>,
}

/// The dtype of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            "f16" | "float16" => Ok(ExportDtype::F16),
            other => Err(format!("unknown dtype `{other}` (f32, bf16, f16)")),
        }
    }
}

/// `dir`'s `config.json`, checked ([`LlamaConfig::from_json`]); errors name the file.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let config_path = dir.join(CONFIG_FILE);
    LlamaConfig::from_json(
        &std::fs::read_to_string(&config_path).map_err(WorkerError::io(&config_path))?,
    )
    .map_err(|message| WorkerError::Config {
        path: config_path,
        message,
    })
}

/// Reads `dir`'s config and every tensor the layout needs, checking names and shapes, and that
/// every value is finite. A tensor in the files that the layout does not use refuses the load
/// (see [`super::refuse_unused`] for the few that are allowed): dapt would otherwise compute a
/// different function from the one the checkpoint defines.
pub fn load_dir(dir: &Path) -> Result<HfWeights> {
    let config = read_config(dir)?;
    let layout = ParamLayout::llama(&config);
    let (files, index) = super::shard_index::weight_files(dir)?;
    let maps = files
        .iter()
        .map(|f| {
            let file = File::open(f).map_err(WorkerError::io(f))?;
            // SAFETY: read-only map of a file we only read; a concurrent truncation would fault,
            // the usual contract of memory-mapped inputs.
            unsafe { Mmap::map(&file) }.map_err(WorkerError::io(f))
        })
        .collect::<Result<Vec<_>>>()?;
    let parsed = maps
        .iter()
        .zip(&files)
        .map(|(m, f)| {
            SafeTensors::deserialize(m).map_err(|e| WorkerError::Safetensors {
                path: f.clone(),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let owners = super::shard_index::tensor_owners(dir, &files, &parsed, index.as_ref())?;
    let find = |name: &str| {
        let &i = owners.get(name)?;
        parsed[i].tensor(name).ok().map(|t| (t, &files[i]))
    };
    // Every tensor is found and shaped as config.json says before the flat buffer is
    // allocated: a config whose sizes the files do not hold (a vocabulary of 2^34) is an error
    // naming the tensor, not an allocation of terabytes.
    let mut views = Vec::with_capacity(layout.params.len());
    for p in &layout.params {
        let found = find(&p.name);
        let Some((view, file)) = found else {
            return Err(WorkerError::Tensor {
                path: dir.to_path_buf(),
                tensor: p.name.clone(),
                message: "missing from the safetensors files".into(),
            });
        };
        if view.shape() != p.shape.as_slice() {
            return Err(WorkerError::Tensor {
                path: file.clone(),
                tensor: p.name.clone(),
                message: format!(
                    "shape {:?}, but config.json implies {:?}",
                    view.shape(),
                    p.shape
                ),
            });
        }
        views.push((view, file));
    }
    let mut weights = vec![0f32; layout.total];
    for (p, (view, file)) in layout.params.iter().zip(views) {
        to_f32(&view, &mut weights[p.range()]).map_err(|message| WorkerError::Tensor {
            path: file.clone(),
            tensor: p.name.clone(),
            message,
        })?;
        check_finite(file, [(p.name.as_str(), &weights[p.range()])])?;
    }
    // Sorted, each once: `owners` holds each tensor of the files exactly once.
    let mut unused: Vec<String> = owners
        .keys()
        .filter(|name| layout.get(name).is_none())
        .cloned()
        .collect();
    if config.tie_word_embeddings {
        if let Some(i) = unused.iter().position(|n| n == super::TIED_HEAD) {
            check_tied_head(dir, &parsed, &layout, &weights)?;
            unused.remove(i);
        }
    }
    super::refuse_unused(dir, &unused)?;
    for name in unused.iter().filter(|n| super::is_rotary_inv_freq(n)) {
        let Some((view, file)) = find(name) else {
            continue;
        };
        let mut values = vec![0f32; view.shape().iter().product()];
        let tensor_error = |message: String| WorkerError::Tensor {
            path: file.clone(),
            tensor: name.clone(),
            message,
        };
        to_f32(&view, &mut values).map_err(tensor_error)?;
        check_finite(file, [(name.as_str(), values.as_slice())])?;
        super::check_inv_freq(&config, &values).map_err(tensor_error)?;
    }
    Ok(HfWeights {
        config,
        layout,
        weights,
    })
}

/// A tied model's file may also hold `lm_head.weight` (some exporters write the tied matrix
/// twice). Hugging Face ties it to the embedding and ignores the file's copy; dapt accepts the
/// copy only when it is the embedding, value for value, because a different matrix means the
/// file and config.json disagree about which function the model is.
fn check_tied_head(
    dir: &Path,
    parsed: &[SafeTensors<'_>],
    layout: &ParamLayout,
    weights: &[f32],
) -> Result<()> {
    let embed = layout
        .get(super::EMBEDDING)
        .ok_or_else(|| WorkerError::Invalid("the layout has no embedding".into()))?;
    let differs = |message: String| WorkerError::Tensor {
        path: dir.to_path_buf(),
        tensor: super::TIED_HEAD.into(),
        message,
    };
    let Some(view) = parsed
        .iter()
        .find_map(|st| st.tensor(super::TIED_HEAD).ok())
    else {
        return Ok(());
    };
    if view.shape() != embed.shape.as_slice() {
        return Err(differs(format!(
            "present with shape {:?} in a model whose config.json ties it to the embedding {:?}",
            view.shape(),
            embed.shape
        )));
    }
    let mut head = vec![0f32; embed.len()];
    to_f32(&view, &mut head).map_err(differs)?;
    let same = head
        .iter()
        .zip(&weights[embed.range()])
        .all(|(a, b)| a.to_bits() == b.to_bits());
    if !same {
        return Err(differs(format!(
            "differs from `{}`, but config.json says tie_word_embeddings: true (Hugging Face \
             would use the embedding and drop this matrix): set tie_word_embeddings to false to \
             train with it, or remove it",
            super::EMBEDDING
        )));
    }
    Ok(())
}

/// Refuses `tensors` (name, values) unless every value is finite, naming the first tensor that
/// is not, and how many more are not: a NaN or an infinity in a weight is never a model.
pub fn check_finite<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
) -> Result<()> {
    let mut first: Option<(&str, usize, usize)> = None;
    let mut others = 0;
    for (name, values) in tensors {
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad == 0 {
            continue;
        }
        match first {
            None => first = Some((name, bad, values.len())),
            Some(_) => others += 1,
        }
    }
    match first {
        None => Ok(()),
        Some((tensor, bad, len)) => Err(WorkerError::NonFiniteTensor {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            bad,
            len,
            others,
        }),
    }
}

fn to_f32(view: &TensorView<'_>, out: &mut [f32]) -> std::result::Result<(), String> {
    let data = view.data();
    let width = match view.dtype() {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    };
    if data.len() != out.len() * width {
        return Err(format!("{} bytes for {} values", data.len(), out.len()));
    }
    match view.dtype() {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// Writes named tensors to one safetensors file in `dtype` (atomically: temp name, rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    dtype: ExportDtype,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| match dtype {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            ExportDtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        })
        .collect();
    let st_dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
        ExportDtype::F16 => Dtype::F16,
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            TensorView::new(st_dtype, shape.to_vec(), data)
                .map(|v| (name.to_string(), v))
                .map_err(|e| WorkerError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = metadata.map(|m| m.into_iter().collect());
    let serialized =
        safetensors::serialize(views, metadata).map_err(|e| WorkerError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &serialized)
}

/// Refuses `tensors` (name, values) that hold a finite f32 beyond the range of `dtype`, which
/// the conversion would write as an infinity, naming the first such tensor, the count and the
/// dtype.
fn check_representable<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    dtype: ExportDtype,
) -> Result<()> {
    let (fits, name, largest): (fn(f32) -> bool, &str, &str) = match dtype {
        ExportDtype::F32 => return Ok(()),
        ExportDtype::F16 => (|v| half::f16::from_f32(v).is_finite(), "f16", "65504"),
        ExportDtype::Bf16 => (
            |v| half::bf16::from_f32(v).is_finite(),
            "bf16",
            "about 3.39e38",
        ),
    };
    for (tensor, values) in tensors {
        let bad = values.iter().filter(|&&v| !fits(v)).count();
        if bad > 0 {
            return Err(WorkerError::Tensor {
                path: path.to_path_buf(),
                tensor: tensor.into(),
                message: format!(
                    "{bad} of {} values are beyond the range of {name} (largest finite {largest}) \
                     and would be written as infinities: export in f32",
                    values.len()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses weights that [`write_dir`] would refuse: not all finite
/// ([`WorkerError::NonFiniteTensor`]), or beyond the range of `dtype`. `dapt export` calls it
/// before it claims the output directory, so that a refused export leaves nothing behind.
pub fn check_writable(
    dir: &Path,
    layout: &ParamLayout,
    weights: &[f32],
    dtype: ExportDtype,
) -> Result<()> {
    let tensors = || {
        layout
            .params
            .iter()
            .map(|p| (p.name.as_str(), &weights[p.range()]))
    };
    check_finite(dir, tensors())?;
    check_representable(dir, tensors(), dtype)
}

/// Writes `config.json` and `model.safetensors` of a model in the flat layout into `dir`.
/// Refuses weights that are not all finite ([`WorkerError::NonFiniteTensor`]) or that `dtype`
/// cannot hold (they would be written as infinities), before writing anything.
pub fn write_dir(
    dir: &Path,
    config: &LlamaConfig,
    layout: &ParamLayout,
    weights: &[f32],
    dtype: ExportDtype,
) -> Result<()> {
    check_writable(dir, layout, weights, dtype)?;
    std::fs::create_dir_all(dir).map_err(WorkerError::io(dir))?;
    let mut json = config.to_json();
    if let Some(map) = json.as_object_mut() {
        let name = match dtype {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        };
        map.insert("torch_dtype".into(), name.into());
    }
    let text = serde_json::to_vec_pretty(&json).map_err(|e| WorkerError::Invalid(e.to_string()))?;
    let tensors: Vec<(&str, &[usize], &[f32])> = layout
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice(), &weights[p.range()]))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    // The weights first (each file is written whole and renamed into place): a write that fails
    // there (a full disk) leaves an earlier export in `dir` whole, where writing the config
    // first left a new config beside the old weights, which loads as a model (an audit).
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, dtype, Some(meta))?;
    write_atomic(&dir.join(CONFIG_FILE), &text).inspect_err(|_| {
        // New weights beside an old config are no model: without a config nothing loads them.
        let _ = std::fs::remove_file(dir.join(CONFIG_FILE));
    })
}

/// The names of the entries of `dir`, sorted (an entry that cannot be read is left out).
///
/// # Errors
/// `dir` cannot be listed.
pub fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(WorkerError::io(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(dapt_corpus::manifest::write_atomic(path, bytes)?)
}
