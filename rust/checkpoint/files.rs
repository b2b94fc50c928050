//! Which files of a model folder are read, and how much of them.
//!
//! A model folder comes from anywhere (a download, a shared disk), so before
//! a file of it is opened: it must be a regular file (a device or a pipe
//! would be read forever or block), and a small file (JSON, a chat template)
//! must lie inside the folder once links are followed, and must not be larger
//! than a real one could be. A Hugging Face cache snapshot
//! (`<repo>/snapshots/<revision>/`) holds links into `<repo>/blobs/`, so
//! there the repo's folder is the bound.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TritError};

/// Most bytes of a JSON file read beside the weights (config, index,
/// generation and tokenizer configs): real ones are kilobytes to a few MB.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Most bytes of a `tokenizer.json` (the largest real ones are ~35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Checks that `path` names a regular file (links followed); returns its size.
pub fn check_regular(path: &Path) -> Result<u64> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TritError::invalid(format!("{shown} does not exist")),
        _ => TritError::invalid(format!("{shown}: cannot read: {e}")),
    })?;
    if !meta.is_file() {
        return Err(TritError::invalid(format!(
            "{shown} is not a regular file (a folder, a device or a pipe); refused"
        )));
    }
    Ok(meta.len())
}

/// The folder a file of `folder` may resolve into: the folder itself, or
/// for a Hugging Face cache snapshot, its repo's folder.
fn allowed_root(folder: &Path) -> Result<PathBuf> {
    let real = folder
        .canonicalize()
        .map_err(|e| TritError::invalid(format!("{}: cannot read: {e}", folder.display())))?;
    match real.parent() {
        Some(snapshots) if snapshots.file_name() == Some("snapshots".as_ref()) => Ok(snapshots
            .parent()
            .map_or_else(|| real.clone(), Path::to_path_buf)),
        _ => Ok(real),
    }
}

/// Checks, before anything opens it, that `path` is a regular file of at
/// most `max_bytes` that resolves inside its own folder (see the module
/// note); returns its size.
pub fn check_model_file(path: &Path, max_bytes: u64) -> Result<u64> {
    let shown = path.display();
    let size = check_regular(path)?;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let root = allowed_root(folder)?;
    let real = path
        .canonicalize()
        .map_err(|e| TritError::invalid(format!("{shown}: cannot read: {e}")))?;
    if !real.starts_with(&root) {
        return Err(TritError::invalid(format!(
            "{shown} leads to {}, outside the model folder; refused",
            real.display()
        )));
    }
    if size > max_bytes {
        return Err(TritError::invalid(format!(
            "{shown} has {size} bytes, more than the {max_bytes} bytes such a file may have"
        )));
    }
    Ok(size)
}

/// The JSON in the model file `path` (checked as `check_model_file` does),
/// read to at most `max_bytes` bytes.
pub fn read_json(path: &Path, max_bytes: u64) -> Result<Value> {
    let shown = path.display();
    check_model_file(path, max_bytes)?;
    let mut text = Vec::new();
    File::open(path)
        .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut text))
        .map_err(|e| TritError::invalid(format!("{shown}: cannot read: {e}")))?;
    if text.len() as u64 > max_bytes {
        return Err(TritError::invalid(format!(
            "{shown} has more than the {max_bytes} bytes such a file may have"
        )));
    }
    // serde_json refuses nesting deeper than 128 levels, so a hostile file
    // cannot exhaust the stack.
    serde_json::from_slice(&text)
        .map_err(|e| TritError::invalid(format!("{shown} is not readable JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[cfg(unix)]
    #[test]
    fn refuses_links_outside_devices_and_oversized_files() {
        use std::os::unix::fs::symlink;
        let base = std::env::temp_dir().join(format!("trit-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let scratch = Scratch(base.clone());
        let model = base.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), b"{\"a\": 1}").unwrap();
        std::fs::write(base.join("secret.json"), b"{}").unwrap();
        symlink(base.join("secret.json"), model.join("outside.json")).unwrap();
        symlink("/dev/zero", model.join("device.json")).unwrap();
        symlink(model.join("config.json"), model.join("inside.json")).unwrap();
        std::fs::create_dir(model.join("folder.json")).unwrap();

        assert_eq!(read_json(&model.join("config.json"), 100).unwrap()["a"], 1);
        assert_eq!(read_json(&model.join("inside.json"), 100).unwrap()["a"], 1);
        let err = |name: &str, max: u64| read_json(&model.join(name), max).unwrap_err().to_string();
        assert!(err("outside.json", 100).contains("outside the model folder"));
        assert!(err("device.json", 100).contains("not a regular file"));
        assert!(err("folder.json", 100).contains("not a regular file"));
        assert!(err("absent.json", 100).contains("does not exist"));
        assert!(err("config.json", 4).contains("more than the 4 bytes"));
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        std::fs::write(model.join("deep.json"), deep).unwrap();
        assert!(err("deep.json", 1 << 20).contains("not readable JSON"));

        // A Hugging Face cache snapshot links into its repo's blobs.
        let repo = base.join("models--org--name");
        let snapshot = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs").join("f00d"), b"{\"b\": 2}").unwrap();
        symlink("../../blobs/f00d", snapshot.join("config.json")).unwrap();
        assert_eq!(
            read_json(&snapshot.join("config.json"), 100).unwrap()["b"],
            2
        );
        drop(scratch);
    }
}
