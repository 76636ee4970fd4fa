//! A safetensors file read tensor by tensor with plain reads instead of a memory map.
//!
//! On the CPU every weight ends up in memory we own (candle's storage is a `Vec`, and our kernels
//! re-lay weights at load), so a mapped file only adds its touched pages to the process: loading
//! SD 2.1-base's f32 UNet from a map peaked at the 3.5 GB copy plus the 3.5 GB of mapped file
//! (`scripts/generate_compare.sh`, docs/performance.md). Reading each tensor straight into its
//! buffer keeps the file in the page cache only, where it does not count against the process.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use safetensors::tensor::{Metadata, TensorInfo};

/// The 8-byte little-endian header length that starts every safetensors file.
const HEADER_LENGTH_BYTES: u64 = 8;
/// Headers past this are not safetensors files (the format's own reader refuses 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Tensors are read in pieces of this many bytes, in parallel where the OS has positional reads:
/// the copy out of the page cache and the first touch of the fresh pages it lands in took half of
/// a load's time on one thread (`perf record`, docs/performance.md).
const READ_PIECE_BYTES: usize = 8 << 20;

/// One tensor's place in the file.
struct Entry {
    /// `Err(name)` for a dtype candle has no type for (I32 in many checkpoints'
    /// `model_ema.num_updates`): listed, but an error only when read.
    dtype: std::result::Result<DType, String>,
    shape: Shape,
    /// Absolute byte offset of the data.
    start: u64,
    bytes: usize,
}

/// An open safetensors file: its header parsed, its data read on demand.
pub struct SafetensorsReader {
    label: String,
    file: Mutex<File>,
    entries: HashMap<String, Entry>,
    /// The header's `__metadata__` strings (`modelspec.*` and the like).
    metadata: HashMap<String, String>,
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    Some(match dtype {
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        _ => return None,
    })
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): a message quoting the file's
/// strings (the safetensors crate's errors name tensors) stays one line and writes nothing to the
/// terminal.
fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

impl SafetensorsReader {
    /// Opens `path` and reads its header; every tensor's extent is checked against the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let mut file = File::open(path).with_context(|| format!("cannot open {label}"))?;
        let file_bytes = file.metadata().with_context(|| format!("cannot read {label}"))?.len();
        let mut length = [0u8; HEADER_LENGTH_BYTES as usize];
        file.read_exact(&mut length)
            .with_context(|| format!("{label} is too short for a safetensors file"))?;
        let header_bytes = u64::from_le_bytes(length);
        if header_bytes > MAX_HEADER_BYTES || HEADER_LENGTH_BYTES + header_bytes > file_bytes {
            bail!("{label} is not a safetensors file (header length {header_bytes} of a {file_bytes}-byte file)");
        }
        let mut header = vec![0u8; header_bytes as usize];
        file.read_exact(&mut header)
            .with_context(|| format!("cannot read the header of {label}"))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| anyhow::Error::msg(escape_controls(&e.to_string())))
            .with_context(|| format!("{label} has no valid safetensors header"))?;
        let data_start = HEADER_LENGTH_BYTES + header_bytes;
        let data_bytes = file_bytes - data_start;
        let mut entries = HashMap::new();
        for (name, info) in metadata.tensors() {
            let TensorInfo {
                dtype,
                shape,
                data_offsets: (begin, end),
            } = info;
            // Names go into messages and listings: a newline or escape sequence there is the
            // file writing to the terminal (found by tests/fuzz_readers.rs).
            if name.chars().any(char::is_control) {
                bail!(
                    "{label} is not a weights file: tensor name {:?} holds a control character",
                    name
                );
            }
            if *end as u64 > data_bytes {
                bail!("{label} is truncated: tensor {name} ends at byte {end} of {data_bytes} data bytes");
            }
            let dtype = candle_dtype(*dtype).ok_or_else(|| format!("{dtype:?}"));
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: Shape::from(shape.clone()),
                    start: data_start + *begin as u64,
                    bytes: end - begin,
                },
            );
        }
        Ok(Self {
            label,
            file: Mutex::new(file),
            entries,
            metadata: metadata.metadata().clone().unwrap_or_default(),
        })
    }

    /// Fills `buffer` from byte `start` of the file: pieces over the rayon pool with positional
    /// reads on Unix, one seek and read elsewhere.
    fn read_at(&self, start: u64, buffer: &mut [u8]) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use rayon::prelude::*;
            use std::os::unix::fs::FileExt;
            // Positional reads share no file offset, so a duplicate handle needs no lock; none is
            // held while the pool runs (a pool task waiting on it could be this thread's own).
            let file = self.file.lock().unwrap_or_else(PoisonError::into_inner).try_clone()?;
            buffer
                .par_chunks_mut(READ_PIECE_BYTES)
                .enumerate()
                .try_for_each(|(index, piece)| file.read_exact_at(piece, start + (index * READ_PIECE_BYTES) as u64))
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(buffer)
        }
    }

    /// The names of the tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// The shape of tensor `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&Shape> {
        self.entries.get(name).map(|e| &e.shape)
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Reads tensor `name` onto `device`, in the file's dtype.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.load_part(name, 0, 1, device)
    }

    /// Part `k` of `parts` equal pieces of tensor `name` along its first dimension, read alone
    /// (the rows are contiguous in the file): OpenCLIP's fused q/k/v projection, split without
    /// reading it whole.
    pub fn load_part(&self, name: &str, k: usize, parts: usize, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let dtype = entry.dtype.clone().map_err(|dtype| {
            candle_core::Error::Msg(format!(
                "{}: tensor {name} has dtype {dtype}, which sdfix cannot load",
                self.label
            ))
        })?;
        let mut dims = entry.shape.dims().to_vec();
        let rows = dims.first().copied().unwrap_or(1);
        if parts == 0 || k >= parts || !rows.is_multiple_of(parts) {
            candle_core::bail!("{}: tensor {name} {dims:?} has no part {k} of {parts}", self.label);
        }
        let bytes = entry.bytes / parts;
        let start = entry.start + (k * bytes) as u64;
        if let Some(first) = dims.first_mut() {
            *first = rows / parts;
        }
        let read = |buffer: &mut [u8]| -> candle_core::Result<()> {
            self.read_at(start, buffer)
                .map_err(|e| candle_core::Error::Msg(format!("{}: reading tensor {name}: {e}", self.label)))
        };
        if dtype == DType::F32 && device.is_cpu() && cfg!(target_endian = "little") {
            // Straight into the tensor's own buffer: the common CPU case, one copy from the cache.
            let mut values = vec![0f32; bytes / 4];
            // Any bit pattern is a valid f32, so bytemuck views the buffer as bytes without unsafe.
            read(bytemuck::cast_slice_mut(&mut values))?;
            return Tensor::from_vec(values, dims, device);
        }
        let mut buffer = vec![0u8; bytes];
        read(&mut buffer)?;
        Tensor::from_raw_buffer(&buffer, dtype, &dims, device)
    }
}

impl SimpleBackend for SafetensorsReader {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(entry) = self.entries.get(name) {
            if entry.shape != s {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: entry.shape.clone(),
                }
                .bt());
            }
        }
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tensors: &[(&str, Tensor)]) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".safetensors").tempfile().unwrap();
        let map: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, file.path()).unwrap();
        file
    }

    #[test]
    fn reads_every_dtype_as_candle_saved_it() {
        let device = Device::Cpu;
        let values = Tensor::arange(0f32, 24., &device).unwrap().reshape((2, 3, 4)).unwrap();
        let tensors = [
            ("f32", values.clone()),
            ("f16", values.to_dtype(DType::F16).unwrap()),
            ("bf16", values.to_dtype(DType::BF16).unwrap()),
            ("f64", values.to_dtype(DType::F64).unwrap()),
            ("u8", values.to_dtype(DType::U8).unwrap()),
            ("i64", values.to_dtype(DType::I64).unwrap()),
        ];
        let file = write(&tensors);
        let reader = SafetensorsReader::open(file.path()).unwrap();
        assert_eq!(reader.names().count(), tensors.len());
        for (name, expected) in &tensors {
            let got = reader.load(name, &device).unwrap();
            assert_eq!(got.dtype(), expected.dtype(), "{name}");
            assert_eq!(got.dims(), &[2, 3, 4], "{name}");
            let got = got
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let expected = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            assert_eq!(got, expected.to_vec1::<f64>().unwrap(), "{name}");
        }
    }

    #[test]
    fn tensors_larger_than_a_read_piece_arrive_whole_and_in_order() {
        let device = Device::Cpu;
        // Two and a half pieces, after a small tensor so the data starts off a piece boundary.
        let count = READ_PIECE_BYTES / 4 * 5 / 2 + 3;
        let large = Tensor::arange(0u32, count as u32, &device)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let small = Tensor::ones(7, DType::F16, &device).unwrap();
        let file = write(&[("a_small", small), ("large", large)]);
        let reader = SafetensorsReader::open(file.path()).unwrap();
        let got = reader.load("large", &device).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), count);
        assert!(got.iter().enumerate().all(|(i, &v)| v == i as f32));
        let small = reader.load("a_small", &device).unwrap();
        assert_eq!(
            small.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 7]
        );
    }

    #[test]
    fn a_part_along_the_first_dimension_is_those_rows() {
        let device = Device::Cpu;
        let values = Tensor::arange(0f32, 24., &device).unwrap().reshape((6, 4)).unwrap();
        let file = write(&[("w", values.clone()), ("h", values.to_dtype(DType::F16).unwrap())]);
        let reader = SafetensorsReader::open(file.path()).unwrap();
        for name in ["w", "h"] {
            let part = reader.load_part(name, 1, 3, &device).unwrap();
            let expected = values.narrow(0, 2, 2).unwrap();
            let part = part.to_dtype(DType::F32).unwrap();
            assert_eq!(
                part.to_vec2::<f32>().unwrap(),
                expected.to_vec2::<f32>().unwrap(),
                "{name}"
            );
        }
        assert!(reader.load_part("w", 0, 5, &device).is_err());
    }

    #[test]
    fn a_wrong_shape_or_name_is_an_error_naming_the_tensor() {
        let device = Device::Cpu;
        let file = write(&[("w", Tensor::zeros((2, 3), DType::F32, &device).unwrap())]);
        let reader = SafetensorsReader::open(file.path()).unwrap();
        let wrong = reader.get((3, 2).into(), "w", Init::Const(0.), DType::F32, &device);
        assert!(wrong.unwrap_err().to_string().contains("shape mismatch for w"));
        let missing = reader.load("nope", &device);
        assert!(missing.unwrap_err().to_string().contains("nope"));
        let ok = reader
            .get((2, 3).into(), "w", Init::Const(0.), DType::F16, &device)
            .unwrap();
        assert_eq!(ok.dtype(), DType::F16);
    }

    #[test]
    fn truncated_or_garbage_files_are_refused_with_their_name() {
        let device = Device::Cpu;
        let file = write(&[("w", Tensor::ones((64, 64), DType::F32, &device).unwrap())]);
        let bytes = std::fs::read(file.path()).unwrap();
        let truncated = tempfile::Builder::new().suffix(".safetensors").tempfile().unwrap();
        std::fs::write(truncated.path(), &bytes[..bytes.len() - 100]).unwrap();
        let err = SafetensorsReader::open(truncated.path()).err().unwrap().to_string();
        assert!(err.contains("truncated") && err.contains(".safetensors"), "{err}");
        std::fs::write(truncated.path(), b"not a safetensors file at all").unwrap();
        let err = SafetensorsReader::open(truncated.path()).err().unwrap().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
    }
}
