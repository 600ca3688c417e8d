//! The CIFAR-10 binary format and dataset auto-detection.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{DataError, Dataset};

/// CIFAR-10's class names, indexed by label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Bytes per CIFAR-10 binary record: 1 label byte + 3,072 pixel bytes (R plane, G, B).
pub const CIFAR_RECORD_LEN: usize = 1 + 3 * 32 * 32;
/// Name of the folder the official binary tarball unpacks to.
pub const CIFAR10_BINARY_SUBDIR: &str = "cifar-10-batches-bin";

/// A dataset split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// `"train"` or `"test"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// Parses `"train"` / `"test"`.
    pub fn from_name(name: &str) -> Option<Split> {
        match name {
            "train" => Some(Split::Train),
            "test" => Some(Split::Test),
            _ => None,
        }
    }

    /// The CIFAR-10 binary files of this split.
    pub fn cifar_binary_files(self) -> &'static [&'static str] {
        match self {
            Split::Train => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Split::Test => &["test_batch.bin"],
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Split::from_name(s).ok_or_else(|| format!("unknown split {s:?}, expected train or test"))
    }
}

fn has_cifar_bins(dir: &Path) -> bool {
    dir.join("test_batch.bin").is_file() || dir.join("data_batch_1.bin").is_file()
}

/// The folder holding CIFAR-10 `.bin` files: `dir` itself or its `cifar-10-batches-bin`
/// subfolder (what the official tarball unpacks to). `None` when neither holds
/// `data_batch_1.bin` or `test_batch.bin`.
pub fn find_cifar_binary_dir(dir: &Path) -> Option<PathBuf> {
    if has_cifar_bins(dir) {
        return Some(dir.to_path_buf());
    }
    let sub = dir.join(CIFAR10_BINARY_SUBDIR);
    has_cifar_bins(&sub).then_some(sub)
}

/// Loads a CIFAR-10 binary split from `dir` (or its `cifar-10-batches-bin` subfolder):
/// train = `data_batch_1.bin` … `data_batch_5.bin`, test = `test_batch.bin`.
pub fn load_cifar_binary(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let base = find_cifar_binary_dir(dir).unwrap_or_else(|| dir.to_path_buf());
    let files: Vec<PathBuf> = split
        .cifar_binary_files()
        .iter()
        .map(|f| base.join(f))
        .collect();
    for f in &files {
        if !f.is_file() {
            return Err(DataError::format(
                f,
                format!(
                    "missing CIFAR-10 binary file (the {} split needs {})",
                    split,
                    split.cifar_binary_files().join(", ")
                ),
            ));
        }
    }
    load_cifar_binary_files(&files)
}

/// Loads CIFAR-10 binary files, concatenated in the given order. Each file must hold a whole,
/// non-zero number of 3,073-byte records with labels 0..=9. Source ids are
/// `"<file name>#<record index>"`.
pub fn load_cifar_binary_files(files: &[PathBuf]) -> Result<Dataset, DataError> {
    if files.is_empty() {
        return Err(DataError::Invalid(
            "no CIFAR-10 binary files were given".into(),
        ));
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut ids = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        if bytes.is_empty() || bytes.len() % CIFAR_RECORD_LEN != 0 {
            return Err(DataError::format(
                path,
                format!(
                    "size {} bytes is not a positive multiple of {CIFAR_RECORD_LEN} \
                     (CIFAR-10 binary records: 1 label byte + 3,072 pixel bytes); \
                     the file is truncated or not a CIFAR-10 binary file",
                    bytes.len()
                ),
            ));
        }
        let n = bytes.len() / CIFAR_RECORD_LEN;
        if let Some((i, rec)) = bytes
            .chunks_exact(CIFAR_RECORD_LEN)
            .enumerate()
            .find(|(_, r)| r[0] > 9)
        {
            return Err(DataError::format(
                path,
                format!(
                    "record {i} (byte offset {}) has label {}, expected 0..=9",
                    i * CIFAR_RECORD_LEN,
                    rec[0]
                ),
            ));
        }
        let start = images.len();
        images.resize(start + n * 3072, 0);
        images[start..]
            .par_chunks_mut(3072)
            .zip(bytes.par_chunks_exact(CIFAR_RECORD_LEN))
            .for_each(|(dst, rec)| planar_to_hwc(&rec[1..], dst));
        labels.extend(bytes.chunks_exact(CIFAR_RECORD_LEN).map(|r| r[0]));
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        ids.extend((0..n).map(|i| format!("{name}#{i}")));
    }
    Ok(Dataset {
        height: 32,
        width: 32,
        images,
        labels,
        class_names: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        source_ids: Some(ids),
    })
}

/// Converts one 32x32 image from CIFAR's planar layout (R plane, G, B) to HWC.
fn planar_to_hwc(planes: &[u8], dst: &mut [u8]) {
    const P: usize = 32 * 32;
    for (p, px) in dst.chunks_exact_mut(3).enumerate() {
        px[0] = planes[p];
        px[1] = planes[P + p];
        px[2] = planes[2 * P + p];
    }
}

/// Converts HWC images back to CIFAR-10 binary records (for writing test files or exports).
/// Requires a 32x32 dataset.
pub fn to_cifar_binary(ds: &Dataset) -> Result<Vec<u8>, DataError> {
    ds.validate()?;
    if ds.height != 32 || ds.width != 32 {
        return Err(DataError::Invalid(format!(
            "CIFAR-10 binary records hold 32x32 images, this dataset is {}x{}",
            ds.width, ds.height
        )));
    }
    const P: usize = 32 * 32;
    let mut out = vec![0u8; ds.len() * CIFAR_RECORD_LEN];
    for (i, rec) in out.chunks_exact_mut(CIFAR_RECORD_LEN).enumerate() {
        rec[0] = ds.labels[i];
        for (p, px) in ds.image(i).chunks_exact(3).enumerate() {
            rec[1 + p] = px[0];
            rec[1 + P + p] = px[1];
            rec[1 + 2 * P + p] = px[2];
        }
    }
    Ok(out)
}

/// Loads a split from `path`, detecting the layout:
///
/// - a folder with `data_batch_*.bin` / `test_batch.bin`, or with a `cifar-10-batches-bin`
///   subfolder holding them: CIFAR-10 binary;
/// - a folder with a `train/` or `test/` subfolder: image folder (`<split>/<class>/*.png|jpg`);
/// - a single `.bin` file: CIFAR-10 binary records (the split is ignored);
/// - a file written by [`Dataset::to_bytes`] (the split is ignored).
///
/// The classes are CIFAR-10's ([`CIFAR10_CLASSES`]): an image folder must have exactly those
/// class folders. [`load_dataset_with_classes`] takes others.
pub fn load_dataset(path: &Path, split: Split) -> Result<Dataset, DataError> {
    let cifar10: Vec<String> = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
    load_dataset_with_classes(path, split, &cifar10)
}

/// [`load_dataset`] of a data set whose classes are `class_names` (in label order): an image
/// folder must have exactly these class folders; CIFAR-10 binary files take them as the names
/// of labels 0..9 (so there must be 10); an encoded dataset file keeps the names it carries.
pub fn load_dataset_with_classes(
    path: &Path,
    split: Split,
    class_names: &[String],
) -> Result<Dataset, DataError> {
    let binary = |mut ds: Dataset| -> Result<Dataset, DataError> {
        if class_names.len() != CIFAR10_CLASSES.len() {
            return Err(DataError::format(
                path,
                format!(
                    "CIFAR-10 binary files have 10 classes, but {} class names were given ({})",
                    class_names.len(),
                    class_names.join(", ")
                ),
            ));
        }
        ds.class_names = class_names.to_vec();
        Ok(ds)
    };
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.is_file() {
        if path.extension().is_some_and(|e| e == "bin") {
            return binary(load_cifar_binary_files(&[path.to_path_buf()])?);
        }
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        if bytes.starts_with(&crate::dataset::DATASET_MAGIC) {
            return Dataset::from_bytes(&bytes).map_err(|e| DataError::format(path, e.to_string()));
        }
        return Err(DataError::format(
            path,
            "is a file but neither a CIFAR-10 .bin file nor an encoded dataset; \
             expected a CIFAR-10 binary folder or an image folder with train/ and test/",
        ));
    }
    if let Some(dir) = find_cifar_binary_dir(path) {
        return binary(load_cifar_binary(&dir, split)?);
    }
    if path.join("train").is_dir() || path.join("test").is_dir() {
        return crate::folder::load_image_folder(path, Some(split.name()), class_names);
    }
    Err(DataError::format(
        path,
        "unrecognized dataset layout: expected CIFAR-10 binary files (data_batch_1..5.bin, \
         test_batch.bin, possibly in cifar-10-batches-bin/) or an image folder with \
         train/<class>/ and test/<class>/ subfolders",
    ))
}
