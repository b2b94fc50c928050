//! Opening a model: a folder as transformers saves it (`config.json` beside
//! a safetensors checkpoint: `model.safetensors`, or shards and their index),
//! or a GGUF file (config from its metadata).

use std::path::Path;

use rayon::ThreadPool;

use super::config::{Config, ROPE_FREQS};
use super::weights::{load, HeadPrecision, Model};
use crate::checkpoint::{Checkpoint, GgufCheckpoint, SafetensorsCheckpoint};
use crate::error::{Result, TritError};
use crate::kernels::Packing;

/// The name of the config file in a model folder.
pub const CONFIG_FILE: &str = "config.json";

/// Reads the model at `path`: a model folder, or a GGUF file, its ternary
/// projections in `packing`. Returns it with the load warnings (all-zero or
/// unused tensors). Errors name the file at fault, or the folder (or GGUF
/// file) for a tensor the model needs but the checkpoint lacks or holds
/// wrongly.
pub fn open(
    path: &Path,
    pool: &ThreadPool,
    head: HeadPrecision,
    packing: Packing,
) -> Result<(Model, Vec<String>)> {
    if path.is_file() {
        let mut checkpoint = GgufCheckpoint::open(path)?;
        let config = Config::from_gguf(&checkpoint)?;
        if let Some((attn, ffn)) = config.family.sub_norms() {
            checkpoint.rename_sub_norms(attn, ffn);
        }
        // Read into the config's RoPE scaling (or refused) by `from_gguf`.
        checkpoint.remove(ROPE_FREQS);
        return build(path, config, &checkpoint, pool, head, packing);
    }
    let config = Config::from_json_file(&path.join(CONFIG_FILE))?;
    let checkpoint = SafetensorsCheckpoint::open(path)?;
    build(path, config, &checkpoint, pool, head, packing)
}

fn build(
    path: &Path,
    config: Config,
    checkpoint: &dyn Checkpoint,
    pool: &ThreadPool,
    head: HeadPrecision,
    packing: Packing,
) -> Result<(Model, Vec<String>)> {
    load(config, checkpoint, pool, head, packing).map_err(|e| match e {
        TritError::InvalidInput(msg) if !msg.starts_with(&path.display().to_string()) => {
            TritError::InvalidInput(format!("{}: {msg}", path.display()))
        }
        other => other,
    })
}
