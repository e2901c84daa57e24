//! The safetensors files of a Hugging Face directory, and which one holds each tensor.
//!
//! A sharded model lists its files in `model.safetensors.index.json`, whose `weight_map` names
//! the shard of every tensor. The index and the shards must agree exactly: a tensor in two
//! shards (an older copy left behind by a partial re-save), one the index places in a shard
//! that does not hold it, or one a shard holds that the index does not list would each leave
//! the model dapt loads up to the order of the files, so each is refused, naming the tensor and
//! the files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use super::hf::{INDEX_FILE, WEIGHTS_FILE};
use crate::error::{Result, WorkerError};

/// The index's `weight_map`: each tensor's file (joined to the model's directory).
pub(super) type WeightMap = BTreeMap<String, PathBuf>;

/// The files of a PEFT adapter saved into a model's directory: transformers (with peft
/// installed) loads the directory as the base model plus the adapter.
const ADAPTER_FILES: [&str; 3] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
];

/// The weights files of `dir` (sorted), and the index's tensor-to-file map when the model is
/// sharded (`None` for one `model.safetensors`).
///
/// Errors: a PEFT adapter in `dir` (the weights alone are not the model transformers loads
/// from it: merge the adapter first); both `model.safetensors` and an index that names other
/// files (two sets of weights: which is the model is a guess); no weights; an unreadable index.
pub(super) fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    let adapter: Vec<&str> = ADAPTER_FILES
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    if !adapter.is_empty() {
        return Err(WorkerError::Config {
            path: dir.to_path_buf(),
            message: format!(
                "holds a PEFT adapter ({}) beside the model's weights: transformers loads this \
                 directory as the base model plus the adapter, and dapt would load the base \
                 alone, a different model; merge the adapter into the weights first (peft: \
                 `model.merge_and_unload()`, then `save_pretrained`), or move its files out if \
                 the base model is meant",
                adapter.join(", ")
            ),
        });
    }
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(INDEX_FILE);
    if single.is_file() && !index.exists() {
        return Ok((vec![single], None));
    }
    let text = std::fs::read_to_string(&index).map_err(|_| WorkerError::Config {
        path: dir.to_path_buf(),
        message: format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is here"),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| WorkerError::Config {
        path: index.clone(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| WorkerError::Config {
            path: index.clone(),
            message: "no `weight_map` object".into(),
        })?;
    let mut owners = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| WorkerError::Config {
            path: index.clone(),
            message: format!("`weight_map` gives `{tensor}` the file {file}, not a file name"),
        })?;
        owners.insert(tensor.clone(), dir.join(file));
    }
    let mut files: Vec<PathBuf> = owners.values().cloned().collect();
    files.sort();
    files.dedup();
    if single.is_file() && files != [single.clone()] {
        // transformers takes `model.safetensors` and never reads the index: a stale single
        // file beside a newer sharded save (or the reverse) would be trained on by a guess.
        return Err(WorkerError::Config {
            path: dir.to_path_buf(),
            message: format!(
                "holds two sets of weights: {WEIGHTS_FILE} and the {} shards {INDEX_FILE} \
                 names; which one is the model is not said (transformers would load \
                 {WEIGHTS_FILE}); remove the set that is not the model",
                files.len()
            ),
        });
    }
    Ok((files, Some(owners)))
}

/// Which of `files` (parsed as `parsed`) holds each tensor, as an index into `files`, after
/// checking that every tensor is in exactly one file and, for a sharded model, in the one
/// `index` names.
pub(super) fn tensor_owners(
    dir: &Path,
    files: &[PathBuf],
    parsed: &[SafeTensors<'_>],
    index: Option<&WeightMap>,
) -> Result<BTreeMap<String, usize>> {
    let file_name = |path: &Path| {
        path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let refuse = |tensor: &str, message: String| WorkerError::Tensor {
        path: dir.to_path_buf(),
        tensor: tensor.to_owned(),
        message,
    };
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            if let Some(&j) = owners.get(name) {
                return Err(refuse(
                    name,
                    format!(
                        "is in both {} and {}: which of them is the model is unclear",
                        file_name(&files[j]),
                        file_name(&files[i])
                    ),
                ));
            }
            owners.insert(name.to_owned(), i);
        }
    }
    let Some(index) = index else {
        return Ok(owners);
    };
    for (name, &i) in &owners {
        match index.get(name) {
            None => {
                return Err(refuse(
                    name,
                    format!(
                        "{} holds it, but {INDEX_FILE} does not list it",
                        file_name(&files[i])
                    ),
                ))
            }
            Some(listed) if *listed != files[i] => {
                return Err(refuse(
                    name,
                    format!(
                        "{INDEX_FILE} places it in {}, which does not hold it ({} does)",
                        file_name(listed),
                        file_name(&files[i])
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some((name, listed)) = index.iter().find(|(n, _)| !owners.contains_key(*n)) {
        return Err(refuse(
            name,
            format!(
                "{INDEX_FILE} places it in {}, which does not hold it",
                file_name(listed)
            ),
        ));
    }
    Ok(owners)
}
