//! Opening a model folder as transformers saves it: `config.json` beside a
//! safetensors checkpoint (`model.safetensors`, or shards and their index).

use std::path::Path;

use rayon::ThreadPool;

use super::config::Config;
use super::weights::{load, HeadPrecision, Model};
use crate::checkpoint::SafetensorsCheckpoint;
use crate::error::{Result, TritError};

/// The name of the config file in a model folder.
pub const CONFIG_FILE: &str = "config.json";

/// Reads the model in `folder`. Returns it with the load warnings (all-zero
/// or unused tensors). Errors name the file at fault, or the folder for a
/// tensor the model needs but the checkpoint lacks or holds wrongly.
pub fn open(folder: &Path, pool: &ThreadPool, head: HeadPrecision) -> Result<(Model, Vec<String>)> {
    let config = Config::from_json_file(&folder.join(CONFIG_FILE))?;
    let checkpoint = SafetensorsCheckpoint::open(folder)?;
    load(config, &checkpoint, pool, head).map_err(|e| match e {
        TritError::InvalidInput(msg) => {
            TritError::InvalidInput(format!("{}: {msg}", folder.display()))
        }
        other => other,
    })
}
