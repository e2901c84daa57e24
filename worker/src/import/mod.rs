//! Bringing foundation models in: Hugging Face directories and llama.cpp GGUF files.

pub mod gguf;
pub mod hf;

use std::path::Path;

use crate::error::{Result, WorkerError};
use crate::model::{LlamaConfig, ParamLayout};
use hf::{ExportDtype, HfWeights};

/// Converts a Llama GGUF into a Hugging Face directory at `out` (`config.json`,
/// `model.safetensors` in f32, `tokenizer.json`) and returns the model.
pub fn import_gguf(file: &gguf::GgufFile, out: &Path) -> Result<HfWeights> {
    let converted = gguf::to_hf(file)?;
    let config = LlamaConfig::from_json(&converted.config.to_string()).map_err(|message| {
        WorkerError::Config {
            path: file.path().to_path_buf(),
            message,
        }
    })?;
    let layout = ParamLayout::llama(&config);
    let mut weights = vec![0f32; layout.total];
    let mut filled = vec![false; layout.params.len()];
    for (name, shape, values) in converted.tensors {
        let Some(i) = layout.params.iter().position(|p| p.name == name) else {
            continue;
        };
        let p = &layout.params[i];
        if shape != p.shape {
            return Err(WorkerError::Tensor {
                path: file.path().to_path_buf(),
                tensor: name,
                message: format!("shape {shape:?}, but the metadata implies {:?}", p.shape),
            });
        }
        weights[p.range()].copy_from_slice(&values);
        filled[i] = true;
    }
    if let Some(i) = filled.iter().position(|f| !f) {
        return Err(WorkerError::Tensor {
            path: file.path().to_path_buf(),
            tensor: layout.params[i].name.clone(),
            message: "missing from the GGUF file".into(),
        });
    }
    hf::write_dir(out, &config, &layout, &weights, ExportDtype::F32)?;
    let tokenizer_path = out.join(hf::TOKENIZER_FILE);
    converted
        .tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| WorkerError::Config {
            path: tokenizer_path,
            message: e.to_string(),
        })?;
    Ok(HfWeights {
        config,
        layout,
        weights,
    })
}
