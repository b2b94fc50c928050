//! A checkpoint file mapped into memory read-only, owned by Rust.
//!
//! Tensors are read straight from the mapping (no copy of the file), and each
//! one's pages are dropped from resident memory once the model has converted
//! it (`release`), so the peak stays near the model's own size instead of the
//! model plus the whole file. Release is only ever done on a mapping made
//! here: on any other memory (a numpy array, an anonymous buffer) the same
//! call would zero the pages.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Result, TritError};

/// A whole file mapped read-only and shared (`PROT_READ`, `MAP_SHARED`).
pub struct FileMapping {
    path: PathBuf,
    map: Mmap,
}

impl FileMapping {
    /// Maps the regular file at `path` (a device or a pipe is refused
    /// before it is opened).
    pub fn open(path: &Path) -> Result<Self> {
        super::files::check_regular(path)?;
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                TritError::invalid(format!("{} does not exist", path.display()))
            }
            _ => TritError::invalid(format!("{}: cannot read: {e}", path.display())),
        })?;
        // SAFETY: the mapping is read-only and nothing in this process writes
        // the file. Like every reader that maps files (the safetensors and
        // memmap2 documentation say the same), it relies on no other process
        // changing the file while it is loaded; one that truncated it would
        // make a read fault (SIGBUS) rather than show other bytes to safe code
        // that checked them.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| TritError::invalid(format!("{}: cannot map: {e}", path.display())))?;
        Ok(FileMapping {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Drops the whole pages inside `range` (byte offsets in the file) from
    /// this process's resident memory. Their content does not change: a later
    /// read maps them in again from the file.
    pub fn release(&self, range: Range<usize>) {
        // Whole pages only, so a neighbour's partly shared page stays resident.
        // 4096 divides every page size Linux uses; memmap2 rounds the start
        // down to the real page size, which only ever drops more file pages.
        const PAGE: usize = 4096;
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end.min(self.map.len()) / PAGE * PAGE;
        if end <= start {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: `map` is a shared (MAP_SHARED), read-only (PROT_READ)
            // mapping of a file, never written through (see `open`). For a
            // shared file mapping, MADV_DONTNEED only unmaps the pages from
            // this process: the next access reads them again from the file's
            // page cache, with the same bytes. (Only a private or anonymous
            // mapping would come back zero-filled, which is why this is never
            // done on memory this type did not map.) So slices borrowed from
            // `bytes()` keep their content. A refused advice only leaves the
            // pages resident: nothing to handle.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_unchanged() {
        let dir = std::env::temp_dir().join(format!("trit-mapping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages.bin");
        let content: Vec<u8> = (0..5 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let m = FileMapping::open(&path).unwrap();
        assert_eq!(m.bytes(), &content[..]);
        m.release(100..4 * 4096 + 5);
        m.release(0..m.bytes().len());
        assert_eq!(m.bytes(), &content[..]);
        assert_eq!(m.path(), path);
        let missing = FileMapping::open(&dir.join("absent")).err().unwrap();
        assert!(
            missing.to_string().ends_with("absent does not exist"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
