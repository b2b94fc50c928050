//! Reading safetensors checkpoints: one `model.safetensors`, or the shards
//! that `model.safetensors.index.json` names, as one checkpoint.
//!
//! Headers are parsed and validated by the `safetensors` crate (header size,
//! UTF-8 JSON, offsets that tile the data without gaps or overlaps, byte
//! counts that match shape and dtype, data that ends with the file). This
//! file maps the files, turns the crate's verdicts into messages that name the
//! file and tensor, and holds each tensor's place for lookups. Layout:
//! docs/formats.md, "safetensors".

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Component, Path};

use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use super::files;
use super::mapping::FileMapping;
use super::{Checkpoint, DType, RawTensor};
use crate::error::{Result, TritError};

/// The single-file checkpoint's name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `{"weight_map": {tensor: shard file}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
struct Entry {
    file: usize, // index into `files`
    dtype: DType,
    shape: Vec<usize>,
    bytes: Range<usize>, // byte offsets in the file
}

/// A safetensors checkpoint, mapped read-only.
pub struct SafetensorsCheckpoint {
    files: Vec<FileMapping>,
    tensors: HashMap<String, Entry>,
}

impl SafetensorsCheckpoint {
    /// The checkpoint of a model folder: its index and shards if it has an
    /// index, else its `model.safetensors`.
    pub fn open(folder: &Path) -> Result<Self> {
        let index = folder.join(INDEX_FILE);
        let single = folder.join(SINGLE_FILE);
        if index.exists() {
            Self::open_index(folder, &index)
        } else if single.exists() {
            Self::open_files(&[single.as_path()])
        } else {
            Err(TritError::invalid(format!(
                "{} has no {SINGLE_FILE} or {INDEX_FILE}",
                folder.display()
            )))
        }
    }

    /// The tensors of `paths` together; a name in two files is an error.
    pub fn open_files(paths: &[&Path]) -> Result<Self> {
        let mut checkpoint = SafetensorsCheckpoint {
            files: Vec::with_capacity(paths.len()),
            tensors: HashMap::new(),
        };
        for path in paths {
            checkpoint.add_file(path)?;
        }
        Ok(checkpoint)
    }

    fn open_index(folder: &Path, index: &Path) -> Result<Self> {
        let shown = index.display();
        let json = files::read_json(index, files::MAX_JSON_BYTES)?;
        let weight_map = match json.get("weight_map") {
            Some(Value::Object(map)) if !map.is_empty() => map,
            _ => return Err(TritError::invalid(format!("{shown}: no weight_map"))),
        };
        // tensor name → shard file name, sorted for reproducible messages.
        let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(weight_map.len());
        for (tensor, file) in weight_map {
            let file = file
                .as_str()
                .filter(|f| is_plain_file_name(f))
                .ok_or_else(|| {
                    TritError::invalid(format!(
                        "{shown} maps {tensor:?} to {file}, which is not a file name in the folder"
                    ))
                })?;
            wanted.push((tensor, file));
        }
        wanted.sort_unstable();
        let files: BTreeSet<&str> = wanted.iter().map(|&(_, f)| f).collect();
        let mut paths = Vec::with_capacity(files.len());
        for file in &files {
            let path = folder.join(file);
            if !path.exists() {
                return Err(TritError::invalid(format!(
                    "{shown} names {file}, which does not exist"
                )));
            }
            paths.push(path);
        }
        let checkpoint = Self::open_files(&paths.iter().map(|p| p.as_path()).collect::<Vec<_>>())?;
        for (tensor, file) in wanted {
            let holder = checkpoint
                .tensors
                .get(tensor)
                .map(|e| checkpoint.files[e.file].path());
            if holder.and_then(Path::file_name) != Some(file.as_ref()) {
                return Err(TritError::invalid(format!(
                    "{shown} maps {tensor:?} to {file}, which does not hold it"
                )));
            }
        }
        Ok(checkpoint)
    }

    /// Maps the file at `path` and adds its tensors.
    fn add_file(&mut self, path: &Path) -> Result<()> {
        let mapping = FileMapping::open(path)?;
        let bytes = mapping.bytes();
        let shown = path.display();
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| header_error(path, bytes, e))?;
        // The data follows the 8-byte length and the header; the crate checked
        // that the last tensor ends at the end of the file, so no sum overflows.
        let data_start = 8 + header_len;
        let file = self.files.len();
        for name in metadata.offset_keys() {
            let Some(info) = metadata.info(&name) else {
                continue;
            };
            let dtype = engine_dtype(info.dtype).ok_or_else(|| {
                TritError::invalid(format!(
                    "{shown}: tensor {name:?} has dtype {}; trit reads U8, BF16, F16, F32",
                    info.dtype
                ))
            })?;
            let (begin, end) = info.data_offsets;
            let entry = Entry {
                file,
                dtype,
                shape: info.shape.clone(),
                bytes: data_start + begin..data_start + end,
            };
            if let Some(other) = self.tensors.get(&name) {
                return Err(TritError::invalid(format!(
                    "tensor {name:?} is in both {} and {shown}",
                    self.files[other.file].path().display()
                )));
            }
            self.tensors.insert(name, entry);
        }
        self.files.push(mapping);
        Ok(())
    }
}

impl Checkpoint for SafetensorsCheckpoint {
    fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        let e = self.tensors.get(name)?;
        Some(RawTensor {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.files[e.file].bytes()[e.bytes.clone()],
        })
    }

    fn release(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            self.files[e.file].release(e.bytes.clone());
        }
    }
}

/// The element types the engine reads (see `DType`).
fn engine_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::U8 => Some(DType::U8),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// One plain name, no folder part: an index cannot point outside its folder.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    )
}

/// The crate's verdict on a bad file, as a message naming the file and, where
/// the crate knows it or the header shows it, the tensor.
fn header_error(path: &Path, bytes: &[u8], err: SafeTensorError) -> TritError {
    let shown = path.display();
    let size = bytes.len();
    let message = match err {
        SafeTensorError::HeaderTooSmall => {
            format!("{shown}: truncated safetensors file ({size} bytes, no header length)")
        }
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => format!(
            "{shown}: header length {} does not fit the file ({size} bytes) or exceeds \
             100 MB; truncated or not a safetensors file",
            declared_header_len(bytes)
        ),
        SafeTensorError::InvalidHeader(e) => {
            format!("{shown}: the safetensors header is not UTF-8: {e}")
        }
        SafeTensorError::InvalidHeaderDeserialization(e) => match e.classify() {
            serde_json::error::Category::Data => {
                format!("{shown}: malformed safetensors header: {e}")
            }
            _ => format!("{shown}: the safetensors header is not JSON: {e}"),
        },
        SafeTensorError::InvalidOffset(name) => format!(
            "{shown}: tensor {name:?} has data_offsets that leave a gap before it or \
             overlap another tensor"
        ),
        other => locate_bad_tensor(bytes)
            .map(|what| format!("{shown}: {what}"))
            .unwrap_or_else(|| format!("{shown}: invalid safetensors file: {other}")),
    };
    TritError::invalid(message)
}

/// The header length the file's first 8 bytes declare (little-endian u64).
fn declared_header_len(bytes: &[u8]) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&bytes[..8.min(bytes.len())]);
    u64::from_le_bytes(prefix)
}

/// For a header the crate refused on sizes (byte counts, overflow, a file that
/// ends too soon or too late): which tensor is at fault, read back through the
/// crate's own entry type.
fn locate_bad_tensor(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(declared_header_len(bytes)).ok()?;
    let data_start = header_len.checked_add(8)?;
    let header: HashMap<String, Value> = serde_json::from_slice(bytes.get(8..data_start)?).ok()?;
    let mut entries: Vec<(String, TensorInfo)> = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| Some((name, serde_json::from_value(v).ok()?)))
        .collect::<Option<_>>()?;
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let size = bytes.len();
    let mut last_end = 0;
    for (name, info) in entries {
        let (begin, end) = info.data_offsets;
        let (dtype, shape) = (info.dtype, &info.shape);
        let bits = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize()));
        let Some(bits) = bits else {
            return Some(format!("tensor {name:?} ({dtype} {shape:?}) is too large"));
        };
        if bits % 8 != 0 || end.checked_sub(begin) != Some(bits / 8) {
            return Some(format!(
                "tensor {name:?} ({dtype} {shape:?}) has data_offsets [{begin}, {end}], \
                 which do not match its size"
            ));
        }
        if data_start.saturating_add(end) > size {
            return Some(format!(
                "tensor {name:?} ends at byte {} but the file has {size} bytes; the file is \
                 truncated",
                data_start.saturating_add(end)
            ));
        }
        last_end = end;
    }
    let trailing = size - data_start.saturating_add(last_end).min(size);
    (trailing > 0).then(|| {
        format!("{trailing} bytes follow the last tensor's data; the header does not cover them")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unique scratch folder, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "trit-st-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A safetensors file of (name, dtype, shape, bytes), offsets as given.
    fn file(tensors: &[(&str, &str, &[usize], &[u8])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        with_header(&serde_json::to_vec(&header).unwrap(), &data)
    }

    fn with_header(header: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(data);
        out
    }

    fn open_bytes(dir: &Scratch, bytes: &[u8]) -> Result<SafetensorsCheckpoint> {
        std::fs::write(dir.0.join(SINGLE_FILE), bytes).unwrap();
        SafetensorsCheckpoint::open(&dir.0)
    }

    fn error(dir: &Scratch, bytes: &[u8]) -> String {
        open_bytes(dir, bytes).err().unwrap().to_string()
    }

    #[test]
    fn reads_a_single_file() {
        let dir = Scratch::new("single");
        let c = open_bytes(
            &dir,
            &file(&[
                ("a", "BF16", &[2], &[0, 0x3f, 0x80, 0x3f]),
                ("b", "U8", &[3], &[1, 2, 3]),
            ]),
        )
        .unwrap();
        let mut names = c.names();
        names.sort_unstable();
        assert_eq!(names, ["a", "b"]);
        let a = c.tensor("a").unwrap();
        assert_eq!((a.dtype, a.shape), (DType::BF16, &[2][..]));
        assert_eq!(a.to_f32("a").unwrap(), [0.5, 1.0]);
        assert_eq!(c.tensor("b").unwrap().data, [1, 2, 3]);
        c.release("a");
        c.release("b");
        assert_eq!(c.tensor("b").unwrap().data, [1, 2, 3]);
        assert!(c.tensor("c").is_none());
    }

    #[test]
    fn names_the_file_and_tensor_of_every_fault() {
        let dir = Scratch::new("faults");
        let good = file(&[
            ("a", "U8", &[4], &[1, 2, 3, 4]),
            ("b", "F32", &[1], &[0; 4]),
        ]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..5].to_vec(), "truncated safetensors file (5 bytes"),
            (good[..good.len() - 2].to_vec(), "tensor \"b\" ends at byte"),
            ([&good[..], &[0]].concat(), "1 bytes follow the last tensor"),
            (
                [&(1u64 << 40).to_le_bytes()[..], &good[8..]].concat(),
                "header length 1099511627776 does not fit",
            ),
            (with_header(b"{{{{", &[]), "the safetensors header is not JSON"),
            (with_header(&[0xff, 0xfe], &[]), "not UTF-8"),
            (
                file(&[("a", "Q4_K", &[4], &[0; 4])]),
                "malformed safetensors header",
            ),
            (
                file(&[("a", "I16", &[2], &[0; 4])]),
                "tensor \"a\" has dtype I16; trit reads U8, BF16, F16, F32",
            ),
            (
                with_header(
                    br#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "tensor \"a\" (U8 [3]) has data_offsets [0, 4], which do not match its size",
            ),
            (
                with_header(
                    br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                    &[0; 3],
                ),
                "tensor \"b\" has data_offsets that leave a gap",
            ),
            (
                with_header(
                    br#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}}"#,
                    &[],
                ),
                "tensor \"a\" (U8 [4294967296, 4294967296, 2]) is too large",
            ),
        ];
        for (bytes, expected) in cases {
            let err = error(&dir, &bytes);
            assert!(err.contains(SINGLE_FILE), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
        std::fs::remove_file(dir.0.join(SINGLE_FILE)).unwrap();
        let err = SafetensorsCheckpoint::open(&dir.0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("has no model.safetensors or model.safetensors.index.json"),
            "{err}"
        );
    }

    #[test]
    fn shards_are_one_checkpoint() {
        let dir = Scratch::new("shards");
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.0.join(name), bytes).unwrap();
        write("one.safetensors", &file(&[("a", "U8", &[1], &[7])]));
        write(
            "two.safetensors",
            &file(&[("b", "U8", &[1], &[8]), ("c", "U8", &[1], &[9])]),
        );
        let index = |map: serde_json::Value| {
            write(
                INDEX_FILE,
                &serde_json::to_vec(&serde_json::json!({"weight_map": map})).unwrap(),
            )
        };
        index(
            serde_json::json!({"a": "one.safetensors", "b": "two.safetensors", "c": "two.safetensors"}),
        );
        let c = SafetensorsCheckpoint::open(&dir.0).unwrap();
        assert_eq!(c.tensor("c").unwrap().data, [9]);
        assert_eq!(c.names().len(), 3);

        let err = |map| {
            index(map);
            SafetensorsCheckpoint::open(&dir.0)
                .err()
                .unwrap()
                .to_string()
        };
        let e = err(serde_json::json!({"a": "one.safetensors", "b": "three.safetensors"}));
        assert!(
            e.contains("names three.safetensors, which does not exist"),
            "{e}"
        );
        let e = err(serde_json::json!({"a": "two.safetensors", "b": "two.safetensors"}));
        assert!(
            e.contains("maps \"a\" to two.safetensors, which does not hold it"),
            "{e}"
        );
        let e = err(serde_json::json!({"a": "../one.safetensors"}));
        assert!(e.contains("not a file name in the folder"), "{e}");
        let e = err(serde_json::json!({}));
        assert!(e.contains("no weight_map"), "{e}");

        write("dup.safetensors", &file(&[("a", "U8", &[1], &[6])]));
        let e = err(serde_json::json!({"a": "one.safetensors", "b": "dup.safetensors"}));
        assert!(e.contains("tensor \"a\" is in both"), "{e}");
        assert!(
            e.contains("dup.safetensors") && e.contains("one.safetensors"),
            "{e}"
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Numbers at and beyond the boundaries a size or offset can cross.
        fn edge() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                (0u64..40).prop_map(serde_json::Value::from),
                prop::sample::select(vec![
                    u64::MAX,
                    u64::MAX / 2,
                    1 << 32,
                    1 << 62,
                    (1 << 61) + 1
                ])
                .prop_map(serde_json::Value::from),
                (-5i64..0).prop_map(serde_json::Value::from),
                prop::sample::select(vec![1.5f64, 2.0, 1e300]).prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("3")),
                Just(serde_json::Value::Null),
            ]
        }

        fn entry() -> impl Strategy<Value = serde_json::Value> {
            let dtype =
                prop::sample::select(vec!["U8", "BF16", "F16", "F32", "I8", "F64", "Q4", ""]);
            (
                dtype,
                prop::collection::vec(edge(), 0..4),
                prop::collection::vec(edge(), 0..3),
            )
                .prop_map(|(dtype, shape, offsets)| {
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets})
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            /// Any header, any declared length, any data: the file is read
            /// or refused with an error naming it; never a panic.
            #[test]
            fn any_file_is_read_or_refused(
                entries in prop::collection::btree_map("[a-c]", entry(), 0..4),
                data_len in 0usize..48,
                declared in prop::option::of(any::<u64>()),
                raw in prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
            ) {
                let dir = Scratch::new("fuzz");
                let header = match raw {
                    Some(bytes) => bytes,
                    None => serde_json::to_vec(&entries).unwrap(),
                };
                let mut bytes = with_header(&header, &vec![0u8; data_len]);
                if let Some(n) = declared {
                    bytes[..8].copy_from_slice(&n.to_le_bytes());
                }
                match open_bytes(&dir, &bytes) {
                    Ok(c) => {
                        for name in c.names() {
                            let t = c.tensor(name).unwrap();
                            prop_assert_eq!(RawTensor::new(name, t.dtype, t.shape, t.data).is_ok(), true);
                        }
                    }
                    Err(e) => prop_assert!(e.to_string().contains(SINGLE_FILE), "{}", e),
                }
            }
        }
    }
}
