//! CIFAR-10-C `.npy` files: `<corruption>.npy` (uint8 `[N, 32, 32, 3]`) and `labels.npy` (`[N]`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile, TypeChar};

use crate::DataError;

/// Bytes per CIFAR-10-C image (32x32x3).
const IMAGE_LEN: usize = 32 * 32 * 3;

fn check_corruption_name(dir: &Path, corruption: &str) -> Result<PathBuf, DataError> {
    let ok = !corruption.is_empty()
        && corruption != "labels"
        && corruption
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        && !corruption.starts_with('.');
    if !ok {
        return Err(DataError::format(
            dir,
            format!(
                "invalid corruption name {corruption:?}: expected a name such as gaussian_noise \
                 (letters, digits, _ - .; not \"labels\")"
            ),
        ));
    }
    Ok(dir.join(format!("{corruption}.npy")))
}

fn open_npy(path: &Path) -> Result<NpyFile<BufReader<File>>, DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    NpyFile::new(BufReader::new(f))
        .map_err(|e| DataError::format(path, format!("not a valid .npy file: {e}")))
}

/// Refuses a file shorter than its header says (a truncated download), naming both sizes,
/// before the array is read.
fn check_complete(path: &Path, data_bytes: u64) -> Result<(), DataError> {
    let mut prefix = [0u8; 12];
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| DataError::io(path, e))?.len();
    std::io::Read::read_exact(&mut f, &mut prefix).map_err(|_| {
        DataError::format(
            path,
            format!("{file_len} bytes: too short for a .npy header"),
        )
    })?;
    // Version 1 stores the header length in 2 bytes after the 8-byte magic+version, later
    // versions in 4.
    let header_end = if prefix[6] == 1 {
        10 + u64::from(u16::from_le_bytes([prefix[8], prefix[9]]))
    } else {
        12 + u64::from(u32::from_le_bytes([
            prefix[8], prefix[9], prefix[10], prefix[11],
        ]))
    };
    let needed = header_end + data_bytes;
    if file_len < needed {
        return Err(DataError::format(
            path,
            format!(
                "truncated: {file_len} bytes, but its header's shape needs {needed} \
                 ({header_end}-byte header + {data_bytes} bytes of data)"
            ),
        ));
    }
    Ok(())
}

fn describe(npy: &NpyFile<BufReader<File>>) -> String {
    format!("dtype {}, shape {:?}", npy.dtype().descr(), npy.shape())
}

/// Reads `<dir>/<corruption>.npy` (uint8, shape `[N, 32, 32, 3]`, C order) and
/// `<dir>/labels.npy` (shape `[N]`, any integer dtype, e.g. uint8 or int64, values 0..=9).
/// Returns `(images, labels)` with images as `N*32*32*3` HWC bytes.
pub fn read_cifar_c_npy(dir: &Path, corruption: &str) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    let path = check_corruption_name(dir, corruption)?;
    let npy = open_npy(&path)?;
    let shape = npy.shape().to_vec();
    let is_u8 = matches!(npy.dtype(), DType::Plain(ref t) if t.type_char() == TypeChar::Uint && t.size_field() == 1);
    if !is_u8 || shape.len() != 4 || shape[1..] != [32, 32, 3] {
        return Err(DataError::format(
            &path,
            format!(
                "{}; expected dtype uint8 (|u1) and shape [N, 32, 32, 3]",
                describe(&npy)
            ),
        ));
    }
    if npy.order() != npyz::Order::C {
        return Err(DataError::format(
            &path,
            "array is in Fortran order; expected C order",
        ));
    }
    let n = usize::try_from(shape[0])
        .map_err(|_| DataError::format(&path, "image count is too large"))?;
    if n == 0 {
        return Err(DataError::format(
            &path,
            "holds no images (shape [0, 32, 32, 3]); expected the corrupted test set",
        ));
    }
    check_complete(&path, (n * IMAGE_LEN) as u64)?;
    let images: Vec<u8> = npy
        .into_vec::<u8>()
        .map_err(|e| DataError::format(&path, format!("cannot read array data: {e}")))?;
    if images.len() != n * IMAGE_LEN {
        return Err(DataError::format(
            &path,
            format!(
                "read {} bytes, expected {} for shape {shape:?}",
                images.len(),
                n * IMAGE_LEN
            ),
        ));
    }
    let labels = read_labels(&dir.join("labels.npy"))?;
    if labels.len() != n {
        return Err(DataError::format(
            dir.join("labels.npy"),
            format!(
                "{} labels, but {} holds {n} images",
                labels.len(),
                path.display()
            ),
        ));
    }
    Ok((images, labels))
}

/// Reads a 1-D integer `.npy` label file with values 0..=9.
fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let npy = open_npy(path)?;
    let desc = describe(&npy);
    let bad = || {
        DataError::format(
            path,
            format!("{desc}; expected a 1-D integer array (e.g. uint8 or int64) of labels"),
        )
    };
    if npy.shape().len() != 1 {
        return Err(bad());
    }
    let DType::Plain(t) = npy.dtype() else {
        return Err(bad());
    };
    check_complete(path, npy.shape()[0] * t.size_field())?;
    let read_err = |e: std::io::Error| DataError::format(path, format!("cannot read labels: {e}"));
    let values: Vec<i128> = match (t.type_char(), t.size_field()) {
        (TypeChar::Uint, 1) => npy
            .into_vec::<u8>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Uint, 2) => npy
            .into_vec::<u16>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Uint, 4) => npy
            .into_vec::<u32>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Uint, 8) => npy
            .into_vec::<u64>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Int, 1) => npy
            .into_vec::<i8>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Int, 2) => npy
            .into_vec::<i16>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Int, 4) => npy
            .into_vec::<i32>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        (TypeChar::Int, 8) => npy
            .into_vec::<i64>()
            .map_err(read_err)?
            .into_iter()
            .map(i128::from)
            .collect(),
        _ => return Err(bad()),
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if (0..=9).contains(&v) {
                Ok(v as u8)
            } else {
                Err(DataError::format(
                    path,
                    format!("label {v} at index {i}, expected 0..=9"),
                ))
            }
        })
        .collect()
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> std::io::Result<()>,
) -> Result<(), DataError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".npy-write-")
        .tempfile_in(dir)
        .map_err(|e| DataError::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w)
            .and_then(|_| w.flush())
            .map_err(|e| DataError::io(path, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| DataError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| DataError::io(path, e.error))?;
    Ok(())
}

/// The standard `.npy` (version 1.0) preamble for a C-order uint8 array, exactly as
/// `numpy.save` writes it: magic, version, header length, the header dict padded with
/// spaces and a newline so the data starts at a multiple of 64 bytes.
pub(crate) fn npy_u8_preamble(shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape_text}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

fn write_npy_u8(path: &Path, data: &[u8], shape: &[u64]) -> Result<(), DataError> {
    write_atomic(path, |w| {
        w.write_all(&npy_u8_preamble(shape))?;
        w.write_all(data)
    })
}

/// Writes `<dir>/<corruption>.npy` (uint8 `[n, 32, 32, 3]`) and `<dir>/labels.npy` (uint8
/// `[n]`), creating `dir` if needed. Files are written atomically. If `labels.npy` already
/// exists with different content (e.g. written for another corruption with other labels),
/// this is an error rather than a silent overwrite.
pub fn write_cifar_c_npy(
    dir: &Path,
    corruption: &str,
    images: &[u8],
    n: usize,
    labels: &[u8],
) -> Result<(), DataError> {
    let path = check_corruption_name(dir, corruption)?;
    if n.checked_mul(IMAGE_LEN) != Some(images.len()) {
        return Err(DataError::Invalid(format!(
            "{} image bytes, expected {n} x 32 x 32 x 3 for {}",
            images.len(),
            path.display()
        )));
    }
    if labels.len() != n {
        return Err(DataError::Invalid(format!(
            "{} labels for {n} images for {}",
            labels.len(),
            path.display()
        )));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l > 9) {
        return Err(DataError::Invalid(format!(
            "label {l} at index {i}, expected 0..=9, for {}",
            path.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let labels_path = dir.join("labels.npy");
    if labels_path.exists() {
        let existing = read_labels(&labels_path)?;
        if existing != labels {
            return Err(DataError::format(
                &labels_path,
                format!(
                    "already exists with different labels ({} entries); refusing to overwrite \
                     it for {corruption}: write into an empty folder",
                    existing.len()
                ),
            ));
        }
    } else {
        write_npy_u8(&labels_path, labels, &[n as u64])?;
    }
    write_npy_u8(&path, images, &[n as u64, 32, 32, 3])
}
