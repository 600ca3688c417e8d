//! Image-folder datasets: `<root>/<class>/*.{png,jpg,jpeg}`.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{decode_image, DataError, Dataset};

/// Decoded RGB8 pixels, width, height.
type Decoded = (Vec<u8>, usize, usize);

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

fn utf8_name(path: &Path) -> Result<String, DataError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| DataError::format(path, "file name is not valid UTF-8"))
}

/// Sorted, non-hidden entries of `dir` as (name, path, is_dir).
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let name = utf8_name(&path)?;
        if is_hidden(&name) {
            continue;
        }
        // Follows symlinks, so linked folders and files work.
        let is_dir = std::fs::metadata(&path)
            .map_err(|e| DataError::io(&path, e))?
            .is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The image files of one class folder, sorted by name. Anything else is an error.
fn list_class_images(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut files = Vec::new();
    for (name, path, is_dir) in list_dir(dir)? {
        if is_dir {
            return Err(DataError::format(
                &path,
                "unexpected folder inside a class folder; expected only .png/.jpg/.jpeg images",
            ));
        }
        let ext_ok = Path::new(&name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        if !ext_ok {
            return Err(DataError::format(
                &path,
                "stray file in a class folder; expected only .png/.jpg/.jpeg images",
            ));
        }
        files.push((name, path));
    }
    Ok(files)
}

/// Labels are u8: 1 to 256 classes.
fn check_class_count(class_names: &[String]) -> Result<(), DataError> {
    if class_names.is_empty() || class_names.len() > 256 {
        return Err(DataError::Invalid(format!(
            "{} class names given, expected 1..=256",
            class_names.len()
        )));
    }
    Ok(())
}

/// One image to load: path, provenance id, label.
struct Item {
    path: PathBuf,
    id: String,
    label: u8,
}

/// Decodes all items in parallel, checks they share one size, assembles the dataset.
fn decode_items(
    root: &Path,
    items: Vec<Item>,
    class_names: Vec<String>,
) -> Result<Dataset, DataError> {
    if items.is_empty() {
        return Err(DataError::format(root, "no images found"));
    }
    let decoded: Vec<Result<Decoded, DataError>> = items
        .par_iter()
        .map(|it| {
            let bytes = std::fs::read(&it.path).map_err(|e| DataError::io(&it.path, e))?;
            decode_image(&bytes)
                .map_err(|e| DataError::format(&it.path, format!("unreadable image: {e}")))
        })
        .collect();
    let mut decoded_ok = Vec::with_capacity(decoded.len());
    for r in decoded {
        decoded_ok.push(r?);
    }
    let (_, width, height) = decoded_ok[0];
    let image_len = width * height * 3;
    let mut images = Vec::with_capacity(image_len * items.len());
    for (i, (px, w, h)) in decoded_ok.into_iter().enumerate() {
        if (w, h) != (width, height) {
            return Err(DataError::format(
                &items[i].path,
                format!(
                    "image is {w}x{h}, but {} is {width}x{height}; all images must share one size",
                    items[0].path.display()
                ),
            ));
        }
        images.extend_from_slice(&px);
    }
    let ds = Dataset {
        height,
        width,
        images,
        labels: items.iter().map(|it| it.label).collect(),
        class_names,
        source_ids: Some(items.into_iter().map(|it| it.id).collect()),
    };
    ds.validate()
        .map_err(|e| DataError::format(root, e.to_string()))?;
    Ok(ds)
}

/// The images of `dir/<class>/*` whose class folders must be among `class_names` (a folder
/// of no listed class is an error naming it), labelled by position in `class_names` and ordered
/// by label, then file name; source ids are `"<prefix><class>/<file>"`. Also returns, per
/// class, whether its folder held any image.
fn class_items(
    dir: &Path,
    class_names: &[String],
    prefix: &str,
) -> Result<(Vec<Item>, Vec<bool>), DataError> {
    check_class_count(class_names)?;
    if !dir.is_dir() {
        return Err(DataError::format(
            dir,
            "not a folder; expected <root>/<class>/ image folders",
        ));
    }
    let mut found = vec![false; class_names.len()];
    let mut items = Vec::new();
    for (name, path, is_dir) in list_dir(dir)? {
        if !is_dir {
            return Err(DataError::format(
                &path,
                "stray file next to the class folders; expected only one folder per class",
            ));
        }
        let Some(label) = class_names.iter().position(|c| *c == name) else {
            return Err(DataError::format(
                &path,
                format!(
                    "unexpected class folder {name:?}; the classes are {} (give the data set's \
                     own names with class_names)",
                    class_names.join(", ")
                ),
            ));
        };
        for (f, p) in list_class_images(&path)? {
            found[label] = true;
            items.push(Item {
                path: p,
                id: format!("{prefix}{name}/{f}"),
                label: label as u8,
            });
        }
    }
    items.sort_by(|a, b| a.label.cmp(&b.label).then_with(|| a.id.cmp(&b.id)));
    Ok((items, found))
}

/// Loads `root/<split>/<class>/*.{png,jpg,jpeg}` (or `root/<class>/…` when `split` is `None`)
/// with the classes `class_names` in label order: there must be exactly one non-empty folder
/// per class, named as the class. A missing class folder or a folder of no listed class is an
/// error naming it and the expected classes, so labels can never shift with the folders that
/// happen to exist.
///
/// Files are sorted by name within a class; images are ordered by label. Hidden entries (names
/// starting with `.`) are skipped. All images must share one size and are converted to RGB.
/// Errors name the offending file: unreadable image, empty class folder, stray file, size
/// mismatch. Decoding runs in parallel (rayon). Source ids are paths relative to `root` with
/// `/` separators, e.g. `"test/cat/0000.jpg"`.
pub fn load_image_folder(
    root: &Path,
    split: Option<&str>,
    class_names: &[String],
) -> Result<Dataset, DataError> {
    let dir = match split {
        Some(s) => root.join(s),
        None => root.to_path_buf(),
    };
    if !dir.is_dir() {
        return Err(DataError::format(
            &dir,
            "not a folder; expected <root>/<split>/<class>/ image folders",
        ));
    }
    let prefix = split.map(|s| format!("{s}/")).unwrap_or_default();
    let (items, found) = class_items(&dir, class_names, &prefix)?;
    let mut missing = Vec::new();
    for (class, found) in class_names.iter().zip(&found) {
        let folder = dir.join(class);
        if !*found && folder.is_dir() {
            return Err(DataError::format(
                &folder,
                "empty class folder; expected .png/.jpg/.jpeg images",
            ));
        }
        if !*found {
            missing.push(class.as_str());
        }
    }
    if !missing.is_empty() {
        return Err(DataError::format(
            &dir,
            format!(
                "missing class folder(s) {}; expected one folder per class: {}",
                missing.join(", "),
                class_names.join(", ")
            ),
        ));
    }
    decode_items(&dir, items, class_names.to_vec())
}

/// Loads a user's folder of (failure) images `root/<class>/*.{png,jpg,jpeg}` whose class
/// folders must be among `class_names`; labels index `class_names`, which the result keeps.
/// Not every class needs a folder, and empty class folders are allowed, but at least one
/// image must exist. An unknown class folder is an error naming it and the expected names.
/// Images are ordered by class index, then file name; source ids are `"<class>/<file>"`.
pub fn load_images_dir_with_classes(
    root: &Path,
    class_names: &[String],
) -> Result<Dataset, DataError> {
    let (items, _) = class_items(root, class_names, "")?;
    decode_items(root, items, class_names.to_vec())
}
