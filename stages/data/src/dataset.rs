//! The in-memory [`Dataset`], its compact byte encoding and seeded subset selection.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Magic bytes at the start of an encoded dataset.
pub const DATASET_MAGIC: [u8; 8] = *b"DRDATA\0\x01";
/// Current version of the encoding written by [`Dataset::to_bytes`].
pub const DATASET_FORMAT_VERSION: u32 = 1;
/// Upper bound for the JSON header of an encoded dataset (guards against absurd lengths).
const MAX_HEADER_LEN: usize = 64 << 20;

/// A labelled set of same-sized RGB images, stored NHWC (row-major, 8 bits per channel).
#[derive(Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels. Channels are always 3 (RGB).
    pub width: usize,
    /// `N * height * width * 3` bytes, NHWC, row-major, RGB.
    pub images: Vec<u8>,
    /// One label per image, each `< class_names.len()`.
    pub labels: Vec<u8>,
    /// Class names, indexed by label.
    pub class_names: Vec<String>,
    /// Optional per-image provenance, e.g. `"test_batch.bin#17"` or `"test/cat/0000.jpg"`.
    pub source_ids: Option<Vec<String>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("len", &self.labels.len())
            .field("height", &self.height)
            .field("width", &self.width)
            .field("images_bytes", &self.images.len())
            .field("class_names", &self.class_names)
            .field("has_source_ids", &self.source_ids.is_some())
            .finish()
    }
}

/// The JSON header of the byte encoding.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    count: u64,
    height: u64,
    width: u64,
    channels: u64,
    class_names: Vec<String>,
    source_ids: bool,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image: `height * width * 3`.
    pub fn image_len(&self) -> usize {
        self.height * self.width * 3
    }

    /// The HWC bytes of image `i`. Panics when `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Number of classes (`class_names.len()`).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Class counts, indexed by label (labels out of range are ignored).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// A new dataset holding the images at `indices`, in that order (repeats allowed).
    /// Panics when an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            height: self.height,
            width: self.width,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
            source_ids: self
                .source_ids
                .as_ref()
                .map(|ids| indices.iter().map(|&i| ids[i].clone()).collect()),
        }
    }

    /// Checks internal consistency: positive size, image buffer length, labels in range,
    /// class names present and distinct, provenance length.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.height == 0 || self.width == 0 {
            return Err(DataError::Invalid(format!(
                "image size {}x{} (width x height) must be positive",
                self.width, self.height
            )));
        }
        if self.class_names.is_empty() {
            return Err(DataError::Invalid("no class names".into()));
        }
        if self.class_names.len() > 256 {
            return Err(DataError::Invalid(format!(
                "{} classes, at most 256 fit u8 labels",
                self.class_names.len()
            )));
        }
        let mut sorted: Vec<&str> = self.class_names.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(DataError::Invalid(format!(
                "class name {:?} appears twice",
                w[0]
            )));
        }
        let expected = self
            .image_len()
            .checked_mul(self.labels.len())
            .ok_or_else(|| DataError::Invalid("image buffer size overflows".into()))?;
        if self.images.len() != expected {
            return Err(DataError::Invalid(format!(
                "{} image bytes, expected {} ({} images of {}x{}x3)",
                self.images.len(),
                expected,
                self.labels.len(),
                self.height,
                self.width
            )));
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.class_names.len())
        {
            return Err(DataError::Invalid(format!(
                "label {l} of image {i} is out of range (0..{})",
                self.class_names.len()
            )));
        }
        if let Some(ids) = &self.source_ids {
            if ids.len() != self.labels.len() {
                return Err(DataError::Invalid(format!(
                    "{} source ids for {} images",
                    ids.len(),
                    self.labels.len()
                )));
            }
        }
        Ok(())
    }

    /// Compact self-describing encoding:
    ///
    /// ```text
    /// magic "DRDATA\0\x01" (8) | version u32 LE | header_len u32 LE | JSON header
    /// | images (N*H*W*3) | labels (N) | [ids: N x (u32 LE len + UTF-8)] | BLAKE3 of all before (32)
    /// ```
    ///
    /// The JSON header holds `count`, `height`, `width`, `channels` (3), `class_names` and
    /// whether source ids follow. The encoding is deterministic for a given dataset.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            count: self.labels.len() as u64,
            height: self.height as u64,
            width: self.width as u64,
            channels: 3,
            class_names: self.class_names.clone(),
            source_ids: self.source_ids.is_some(),
        };
        let header = serde_json::to_vec(&header).expect("header serializes");
        let ids_len: usize = self
            .source_ids
            .as_ref()
            .map(|ids| ids.iter().map(|s| 4 + s.len()).sum())
            .unwrap_or(0);
        let mut out = Vec::with_capacity(
            16 + header.len() + self.images.len() + self.labels.len() + ids_len + 32,
        );
        out.extend_from_slice(&DATASET_MAGIC);
        out.extend_from_slice(&DATASET_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.images);
        out.extend_from_slice(&self.labels);
        if let Some(ids) = &self.source_ids {
            for id in ids {
                out.extend_from_slice(&(id.len() as u32).to_le_bytes());
                out.extend_from_slice(id.as_bytes());
            }
        }
        let digest = blake3::hash(&out);
        out.extend_from_slice(digest.as_bytes());
        out
    }

    /// Decodes [`Dataset::to_bytes`] output, checking magic, version, checksum, header and
    /// every length, then [`Dataset::validate`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Dataset, DataError> {
        let err = |m: String| DataError::Encoding(m);
        if bytes.len() < DATASET_MAGIC.len() + 8 + 32 {
            return Err(err(format!(
                "{} bytes is too short for an encoded dataset",
                bytes.len()
            )));
        }
        if bytes[..8] != DATASET_MAGIC {
            return Err(err(
                "missing magic bytes \"DRDATA\\0\\x01\": not an encoded dataset".into(),
            ));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != DATASET_FORMAT_VERSION {
            return Err(err(format!(
                "format version {version}, this build reads version {DATASET_FORMAT_VERSION}"
            )));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != digest {
            return Err(err(
                "checksum mismatch: the bytes are corrupted or truncated".into(),
            ));
        }
        let header_len = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
        if header_len > MAX_HEADER_LEN || 16 + header_len > body.len() {
            return Err(err(format!(
                "header length {header_len} exceeds the {} bytes available",
                body.len() - 16
            )));
        }
        let header: Header = serde_json::from_slice(&body[16..16 + header_len])
            .map_err(|e| err(format!("bad JSON header: {e}")))?;
        if header.channels != 3 {
            return Err(err(format!(
                "{} channels, only 3 (RGB) is supported",
                header.channels
            )));
        }
        let to_usize = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| err(format!("{what} {v} is too large")))
        };
        let count = to_usize(header.count, "count")?;
        let height = to_usize(header.height, "height")?;
        let width = to_usize(header.width, "width")?;
        let image_bytes = height
            .checked_mul(width)
            .and_then(|p| p.checked_mul(3))
            .and_then(|p| p.checked_mul(count))
            .ok_or_else(|| err("image size overflows".into()))?;
        let mut rest = &body[16 + header_len..];
        let needed = image_bytes
            .checked_add(count)
            .ok_or_else(|| err("image size overflows".into()))?;
        if rest.len() < needed {
            return Err(err(format!(
                "{} payload bytes, expected at least {needed} for {count} images of {height}x{width}x3 plus labels",
                rest.len()
            )));
        }
        let images = rest[..image_bytes].to_vec();
        let labels = rest[image_bytes..needed].to_vec();
        rest = &rest[needed..];
        let source_ids = if header.source_ids {
            let mut ids = Vec::with_capacity(count);
            for i in 0..count {
                if rest.len() < 4 {
                    return Err(err(format!("source id {i} is truncated")));
                }
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                rest = &rest[4..];
                if rest.len() < len {
                    return Err(err(format!("source id {i} is truncated")));
                }
                let id = std::str::from_utf8(&rest[..len])
                    .map_err(|_| err(format!("source id {i} is not UTF-8")))?;
                ids.push(id.to_string());
                rest = &rest[len..];
            }
            Some(ids)
        } else {
            None
        };
        if !rest.is_empty() {
            return Err(err(format!(
                "{} unexpected trailing bytes after the payload",
                rest.len()
            )));
        }
        let ds = Dataset {
            height,
            width,
            images,
            labels,
            class_names: header.class_names,
            source_ids,
        };
        ds.validate()
            .map_err(|e| err(format!("decoded dataset is inconsistent: {e}")))?;
        Ok(ds)
    }
}

/// Seeded subset selection.
///
/// Shuffles `0..labels.len()` with ChaCha8 seeded by `seed`, then walks the shuffled order,
/// keeping an index when its class still has room (`per_class`: at most k per class) and the
/// overall `limit` is not reached. Labels `>= num_classes` are never selected (when
/// `per_class` is given). With neither bound, all indices are returned. The result is sorted
/// ascending and depends only on the arguments.
pub fn select_subset(
    labels: &[u8],
    num_classes: usize,
    per_class: Option<usize>,
    limit: Option<usize>,
    seed: u64,
) -> Vec<usize> {
    if per_class.is_none() && limit.is_none_or(|l| l >= labels.len()) {
        return (0..labels.len()).collect();
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let limit = limit.unwrap_or(usize::MAX);
    let mut counts = vec![0usize; num_classes];
    let mut picked = Vec::new();
    for i in order {
        if picked.len() >= limit {
            break;
        }
        if let Some(k) = per_class {
            match counts.get_mut(labels[i] as usize) {
                Some(c) if *c < k => *c += 1,
                _ => continue,
            }
        }
        picked.push(i);
    }
    picked.sort_unstable();
    picked
}
