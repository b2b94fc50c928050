//! The GGUF container (docs/formats.md "GGUF"): header, metadata and tensor
//! infos, read from untrusted bytes. Every length, count and offset is checked
//! against the bytes that are left before anything is allocated for it, so a
//! hostile header can neither make a read go out of bounds nor make an
//! allocation larger than a small multiple of the file.

use std::ops::Range;

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays may nest (the format allows it); deeper than this is refused, so a
/// hostile file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 3;
/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// The type tag of a metadata value (`gguf_type` in ggml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of one element; for a string or array, the least it can take
    /// (its length or type-and-count prefix).
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "uint8",
            I8 => "int8",
            U16 => "uint16",
            I16 => "int16",
            U32 => "uint32",
            I32 => "int32",
            F32 => "float32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "uint64",
            I64 => "int64",
            F64 => "float64",
        }
    }
}

/// One scalar of a fixed-size metadata type, widened.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Int(i128),
    Float(f64),
    Bool(bool),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Number(ValueType, Number),
    String(String),
    Array(MetaArray),
}

/// A metadata array. Arrays of numbers stay in the file (a token-type list
/// of a large vocabulary is read only by whoever needs it) and are decoded on
/// demand with `numbers`.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// `count` elements of the fixed-size `ty`, at byte range `at` of the file.
    Numbers {
        ty: ValueType,
        count: usize,
        at: Range<usize>,
    },
    Strings(Vec<String>),
    Arrays(Vec<MetaArray>),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::Number(ty, _) => ty.name(),
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }
}

/// Element `i` of an array of `ty` whose bytes are `bytes`.
fn number_at(ty: ValueType, bytes: &[u8]) -> Number {
    use ValueType::*;
    let b = |n: usize| -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..n].copy_from_slice(&bytes[..n]);
        out
    };
    match ty {
        U8 => Number::Int(i128::from(bytes[0])),
        I8 => Number::Int(i128::from(bytes[0] as i8)),
        U16 => Number::Int(i128::from(u16::from_le_bytes([bytes[0], bytes[1]]))),
        I16 => Number::Int(i128::from(i16::from_le_bytes([bytes[0], bytes[1]]))),
        U32 => Number::Int(i128::from(u32::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        I32 => Number::Int(i128::from(i32::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        U64 => Number::Int(i128::from(u64::from_le_bytes(b(8)))),
        I64 => Number::Int(i128::from(i64::from_le_bytes(b(8)))),
        F32 => Number::Float(f64::from(f32::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        F64 => Number::Float(f64::from_le_bytes(b(8))),
        Bool => Number::Bool(bytes[0] != 0),
        String | Array => unreachable!("only fixed-size types are stored as numbers"),
    }
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::Numbers { count, .. } => *count,
            MetaArray::Strings(s) => s.len(),
            MetaArray::Arrays(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of a number array, decoded from `file` (the bytes the
    /// array was parsed from); None for arrays of strings or arrays.
    pub fn numbers(&self, file: &[u8]) -> Option<Vec<Number>> {
        match self {
            MetaArray::Numbers { ty, at, .. } => Some(
                file[at.clone()]
                    .chunks_exact(ty.min_size())
                    .map(|e| number_at(*ty, e))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// One tensor as the header describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne`: `dims[0]` is the length of a row (the fastest-varying).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// Everything before the tensor data.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {} needs {n} bytes at offset {}, but the file ends {} bytes later",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// A count of things taking at least `min_size` bytes each, checked to
    /// fit in what is left of the file.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, String> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| {
            n.checked_mul(min_size)
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            format!(
                "{} is {n}, more than the {} bytes left in the file can hold",
                what(),
                self.remaining()
            )
        })
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let len = self.count(1, &|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{} is not UTF-8: {e}", what()))
    }

    fn value(
        &mut self,
        ty: ValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<MetaValue, String> {
        Ok(match ty {
            ValueType::String => MetaValue::String(self.string(what)?),
            ValueType::Array => MetaValue::Array(self.array(depth, what)?),
            _ => {
                let bytes = self.take(ty.min_size(), what)?;
                MetaValue::Number(ty, number_at(ty, bytes))
            }
        })
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<ValueType, String> {
        let id = self.u32(&|| format!("the type of {}", what()))?;
        ValueType::from_id(id).ok_or_else(|| format!("{} has unknown value type {id}", what()))
    }

    fn array(&mut self, depth: usize, what: &dyn Fn() -> String) -> Result<MetaArray, String> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!(
                "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                what()
            ));
        }
        let ty = self.value_type(&|| format!("the elements of {}", what()))?;
        let count = self.count(ty.min_size(), &|| {
            format!("the element count of {}", what())
        })?;
        let element = |i: usize| format!("element {i} of {}", what());
        Ok(match ty {
            ValueType::String => {
                // No reservation from the count: the vector grows with what
                // is actually read.
                let mut strings = Vec::new();
                for i in 0..count {
                    strings.push(self.string(&|| element(i))?);
                }
                MetaArray::Strings(strings)
            }
            ValueType::Array => {
                let mut arrays = Vec::new();
                for i in 0..count {
                    arrays.push(self.array(depth + 1, &|| element(i))?);
                }
                MetaArray::Arrays(arrays)
            }
            _ => {
                let start = self.pos;
                // `count` checked that count * size fits in what is left.
                self.take(count * ty.min_size(), what)?;
                MetaArray::Numbers {
                    ty,
                    count,
                    at: start..self.pos,
                }
            }
        })
    }
}

/// Parses the header of a GGUF file (versions 2 and 3, little-endian).
/// Errors say what is wrong and where; the caller adds the file's name.
pub fn parse(bytes: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, &|| "the magic number".into())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
        ));
    }
    let version = c.u32(&|| "the version".into())?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            " (a big-endian file; trit reads little-endian GGUF)"
        } else if version == 1 {
            " (version 1 predates 64-bit counts; convert the file again)"
        } else {
            ""
        };
        return Err(format!(
            "GGUF version {version} is not supported{hint}; expected 2 or 3"
        ));
    }
    // A tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
    let n_tensors = c.count(24, &|| "the tensor count".into())?;
    // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
    let n_kv = c.count(13, &|| "the metadata count".into())?;
    let mut metadata: Vec<(String, MetaValue)> = Vec::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = c.value_type(&|| format!("metadata {key:?}"))?;
        let value = c.value(ty, 0, &|| format!("metadata {key:?}"))?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(format!("metadata key {key:?} appears twice"));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::Number(ValueType::U32, Number::Int(a)))) => {
            let a = usize::try_from(*a).unwrap_or(0);
            if a == 0 || !a.is_power_of_two() {
                return Err(format!(
                    "general.alignment is {a}; it must be a power of two"
                ));
            }
            a
        }
        Some((_, v)) => {
            return Err(format!(
                "general.alignment is a {}; expected uint32",
                v.type_name()
            ))
        }
    };
    let mut tensors: Vec<TensorInfo> = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor {i}"))?;
        let what = |field: &str| format!("the {field} of tensor {name:?}");
        let n_dims = c.u32(&|| what("dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?} has {n_dims} dimensions; ggml tensors have 1 to {MAX_DIMS}"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| what("shape"))?);
        }
        let ggml_type = c.u32(&|| what("type"))?;
        let offset = c.u64(&|| what("data offset"))?;
        if offset % alignment as u64 != 0 {
            return Err(format!(
                "tensor {name:?} starts at data offset {offset}, which is not a multiple of \
                 the alignment {alignment}"
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let data_start = c
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or("the data section starts past the end of the address space")?;
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn header(n_tensors: u64, kvs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&n_tensors.to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for kv in kvs {
            out.extend_from_slice(kv);
        }
        out
    }

    fn kv_u32(key: &str, v: u32) -> Vec<u8> {
        let mut out = string(key);
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    #[test]
    fn reads_metadata_and_arrays() {
        let mut tokens = string("tokenizer.ggml.tokens");
        tokens.extend_from_slice(&9u32.to_le_bytes());
        tokens.extend_from_slice(&8u32.to_le_bytes());
        tokens.extend_from_slice(&2u64.to_le_bytes());
        tokens.extend(string("a"));
        tokens.extend(string("bc"));
        let mut types = string("types");
        types.extend_from_slice(&9u32.to_le_bytes());
        types.extend_from_slice(&5u32.to_le_bytes());
        types.extend_from_slice(&2u64.to_le_bytes());
        types.extend_from_slice(&1i32.to_le_bytes());
        types.extend_from_slice(&(-3i32).to_le_bytes());
        let bytes = header(0, &[kv_u32("a.b", 7), tokens, types]);
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(
            h.metadata[0].1,
            MetaValue::Number(ValueType::U32, Number::Int(7))
        );
        assert_eq!(
            h.metadata[1].1,
            MetaValue::Array(MetaArray::Strings(vec!["a".into(), "bc".into()]))
        );
        let MetaValue::Array(types) = &h.metadata[2].1 else {
            panic!()
        };
        assert_eq!(
            types.numbers(&bytes).unwrap(),
            [Number::Int(1), Number::Int(-3)]
        );
        assert_eq!(h.data_start, bytes.len().next_multiple_of(32));
    }

    #[test]
    fn refuses_hostile_headers() {
        let err = |bytes: &[u8]| parse(bytes).unwrap_err();
        assert!(err(b"GGU").contains("truncated"));
        assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        assert!(err(b"GGUF\x01\0\0\0").contains("version 1"));
        assert!(err(b"GGUF\0\0\0\x03").contains("big-endian"));
        // Counts no file of this size could hold.
        let mut huge = header(u64::MAX, &[]);
        assert!(err(&huge).contains("tensor count"), "{}", err(&huge));
        huge = header(0, &[]);
        huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(&huge).contains("metadata count"));
        // A string longer than the file.
        let mut long = header(0, &[]);
        long[16..24].copy_from_slice(&1u64.to_le_bytes());
        long.extend_from_slice(&u64::MAX.to_le_bytes());
        long.extend_from_slice(&[0; 8]);
        assert!(err(&long).contains("length of the key"), "{}", err(&long));
        // An unknown value type, an array count beyond the file, bad alignment.
        let mut unknown = string("k");
        unknown.extend_from_slice(&99u32.to_le_bytes());
        assert!(err(&header(0, &[unknown])).contains("unknown value type 99"));
        let mut array = string("k");
        array.extend_from_slice(&9u32.to_le_bytes());
        array.extend_from_slice(&0u32.to_le_bytes());
        array.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(&header(0, &[array])).contains("element count"));
        assert!(err(&header(0, &[kv_u32("general.alignment", 24)])).contains("power of two"));
        // Nested arrays beyond the depth limit.
        let mut nested = string("k");
        nested.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..5 {
            // An array of one element, which is an array.
            nested.extend_from_slice(&9u32.to_le_bytes());
            nested.extend_from_slice(&1u64.to_le_bytes());
        }
        nested.extend_from_slice(&[0; 64]);
        assert!(err(&header(0, &[nested])).contains("nests arrays"));
        // A tensor with too many dimensions, and one off the alignment.
        let mut t = header(1, &[]);
        t.extend(string("w"));
        t.extend_from_slice(&5u32.to_le_bytes());
        t.extend_from_slice(&[0; 64]);
        assert!(err(&t).contains("5 dimensions"));
        let mut t = header(1, &[]);
        t.extend(string("w"));
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&4u64.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        t.extend_from_slice(&3u64.to_le_bytes());
        assert!(err(&t).contains("not a multiple of the alignment"));
    }
}
