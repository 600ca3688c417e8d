//! Loaders against the real data in ../shared/data (skipped when absent) and small
//! hand-made folders.

mod common;

use std::path::{Path, PathBuf};

use common::{data_dir, pseudo_random_bytes, psnr};
use deeprepair_data::*;

fn msg(e: DataError) -> String {
    e.to_string()
}

#[test]
fn binary_subset_loads_both_splits() {
    let Some(dir) = data_dir("cifar10-lossless-subset") else {
        return;
    };
    let test = load_cifar_binary(&dir, Split::Test).unwrap();
    test.validate().unwrap();
    assert_eq!((test.len(), test.height, test.width), (932, 32, 32));
    assert_eq!(test.images.len(), 932 * 3072);
    assert_eq!(test.class_names, CIFAR10_CLASSES.to_vec());
    let ids = test.source_ids.as_ref().unwrap();
    assert_eq!(ids[17], "test_batch.bin#17");
    // The first test_batch label is 3 (cat) in the official file.
    assert_eq!(test.labels[0], 3);
    assert!(test.labels.iter().all(|&l| l <= 9));

    let train = load_cifar_binary(&dir, Split::Train).unwrap();
    assert_eq!(train.len(), 5 * 932);
    let ids = train.source_ids.as_ref().unwrap();
    assert_eq!(ids[0], "data_batch_1.bin#0");
    assert_eq!(ids[932], "data_batch_2.bin#0");
    // Auto-detection gives the same.
    assert_eq!(load_dataset(&dir, Split::Test).unwrap(), test);

    // Round trip through the binary writer.
    let bytes = to_cifar_binary(&test).unwrap();
    assert_eq!(bytes, std::fs::read(dir.join("test_batch.bin")).unwrap());
}

#[test]
fn binary_matches_jpeg_folder_and_jpeg_test_split_loads() {
    let (Some(bin), Some(jpeg)) = (
        data_dir("cifar10-lossless-subset"),
        data_dir("cifar10-jpeg"),
    ) else {
        return;
    };
    let t = std::time::Instant::now();
    let cifar10: Vec<String> = CIFAR10_CLASSES.iter().map(|c| c.to_string()).collect();
    let folder = load_image_folder(&jpeg, Some("test"), &cifar10).unwrap();
    eprintln!(
        "loaded the 10,000-image JPEG test folder in {:?}",
        t.elapsed()
    );
    assert_eq!(folder.len(), 10_000);
    assert_eq!((folder.height, folder.width), (32, 32));
    assert_eq!(folder.class_names, CIFAR10_CLASSES.to_vec());
    assert_eq!(folder.class_counts(), vec![1000; 10]);
    let ids = folder.source_ids.as_ref().unwrap();
    assert_eq!(ids[0], "test/airplane/0000.jpg");
    assert_eq!(ids[1000 * 3], "test/cat/0000.jpg");
    assert!(folder.labels.windows(2).all(|w| w[0] <= w[1]));

    let binary = load_cifar_binary(&bin, Split::Test).unwrap();
    // Record i of class c is the k-th of its class -> test/<c>/<k>.jpg.
    let mut seen = [0usize; 10];
    let mut worst = f64::INFINITY;
    for i in 0..200 {
        let c = binary.labels[i] as usize;
        let k = seen[c];
        seen[c] += 1;
        let j = ids
            .iter()
            .position(|id| *id == format!("test/{}/{k:04}.jpg", CIFAR10_CLASSES[c]))
            .unwrap();
        assert_eq!(folder.labels[j] as usize, c);
        let p = psnr(binary.image(i), folder.image(j));
        if i == 0 {
            assert!(
                p > 20.0,
                "test image 0 vs test/cat/0000.jpg: PSNR {p:.1} dB"
            );
        }
        worst = worst.min(p);
    }
    assert!(worst > 20.0, "worst PSNR {worst:.1} dB");
}

fn write_records(path: &Path, labels: &[u8]) {
    let mut bytes = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        bytes.push(l);
        bytes.extend(pseudo_random_bytes(3072, i as u64));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn binary_rejects_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    // Wrong size (truncated).
    let trunc = tmp.path().join("truncated_batch.bin");
    write_records(&trunc, &[1, 2, 3]);
    let bytes = std::fs::read(&trunc).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() - 100]).unwrap();
    let e = msg(load_cifar_binary_files(std::slice::from_ref(&trunc)).unwrap_err());
    assert!(
        e.contains("truncated_batch.bin") && e.contains("3073"),
        "{e}"
    );
    // Empty.
    let empty = tmp.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let e = msg(load_cifar_binary_files(&[empty]).unwrap_err());
    assert!(e.contains("empty.bin"), "{e}");
    // Label 10.
    let bad = tmp.path().join("bad_label.bin");
    write_records(&bad, &[0, 10, 2]);
    let e = msg(load_cifar_binary_files(&[bad]).unwrap_err());
    assert!(
        e.contains("bad_label.bin") && e.contains("label 10") && e.contains("record 1"),
        "{e}"
    );
    // Missing file.
    let e = msg(load_cifar_binary_files(&[tmp.path().join("nope.bin")]).unwrap_err());
    assert!(e.contains("nope.bin"), "{e}");
    // Missing split file in a folder with only test_batch.bin.
    write_records(&tmp.path().join("test_batch.bin"), &[4, 5]);
    let ds = load_cifar_binary(tmp.path(), Split::Test).unwrap();
    assert_eq!(ds.labels, vec![4, 5]);
    let e = msg(load_cifar_binary(tmp.path(), Split::Train).unwrap_err());
    assert!(e.contains("data_batch_1.bin"), "{e}");
    // Pixels are converted from planar to HWC.
    let raw = std::fs::read(tmp.path().join("test_batch.bin")).unwrap();
    assert_eq!(ds.image(0)[0..3], [raw[1], raw[1 + 1024], raw[1 + 2048]]);
    assert_eq!(ds.image(1)[3], raw[3073 + 2]);
}

#[test]
fn load_dataset_detects_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    // Tarball layout: <dir>/cifar-10-batches-bin/*.bin
    let sub = tmp.path().join("tarball").join(CIFAR10_BINARY_SUBDIR);
    std::fs::create_dir_all(&sub).unwrap();
    write_records(&sub.join("test_batch.bin"), &[7, 8, 9]);
    let ds = load_dataset(&tmp.path().join("tarball"), Split::Test).unwrap();
    assert_eq!(ds.labels, vec![7, 8, 9]);
    // Single .bin file.
    let ds2 = load_dataset(&sub.join("test_batch.bin"), Split::Train).unwrap();
    assert_eq!(ds2, ds);
    // Encoded dataset file.
    let enc = tmp.path().join("ds.drdata");
    std::fs::write(&enc, ds.to_bytes()).unwrap();
    assert_eq!(load_dataset(&enc, Split::Test).unwrap(), ds);
    // Image folder layout.
    let root = tmp.path().join("folder");
    for (split, class, n) in [
        ("train", "a", 2),
        ("train", "b", 1),
        ("test", "a", 1),
        ("test", "b", 2),
    ] {
        let d = root.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..n {
            let px = pseudo_random_bytes(4 * 5 * 3, i);
            std::fs::write(
                d.join(format!("{i:04}.png")),
                encode_png(&px, 5, 4).unwrap(),
            )
            .unwrap();
        }
    }
    let ab = names(&["a", "b"]);
    let test = load_dataset_with_classes(&root, Split::Test, &ab).unwrap();
    assert_eq!((test.len(), test.height, test.width), (3, 4, 5));
    assert_eq!(test.labels, vec![0, 1, 1]);
    assert_eq!(test.class_names, vec!["a", "b"]);
    assert_eq!(test.source_ids.as_ref().unwrap()[2], "test/b/0001.png");
    assert_eq!(test.image(2), pseudo_random_bytes(60, 1).as_slice());
    let train = load_dataset_with_classes(&root, Split::Train, &ab).unwrap();
    assert_eq!(train.labels, vec![0, 0, 1]);
    // The classes are what the caller says, in its order, not the folders' sorted names.
    let ba = load_dataset_with_classes(&root, Split::Train, &names(&["b", "a"])).unwrap();
    assert_eq!(ba.labels, vec![0, 1, 1]);
    assert_eq!(ba.class_names, vec!["b", "a"]);
    // CIFAR-10's classes by default: these folders are not CIFAR-10's.
    let e = msg(load_dataset(&root, Split::Test).unwrap_err());
    assert!(
        e.contains("unexpected class folder \"a\"") && e.contains("airplane"),
        "{e}"
    );
    // Unknown layout.
    let e = msg(load_dataset(&root.join("test").join("a"), Split::Test).unwrap_err());
    assert!(e.contains("unrecognized dataset layout"), "{e}");
    let e = msg(load_dataset(&tmp.path().join("missing"), Split::Test).unwrap_err());
    assert!(e.contains("missing"), "{e}");
}

fn png_file(path: &Path, w: usize, h: usize, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        path,
        encode_png(&pseudo_random_bytes(w * h * 3, seed), w, h).unwrap(),
    )
    .unwrap();
}

#[test]
fn image_folder_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    png_file(&root.join("test/cat/0000.png"), 8, 8, 1);
    png_file(&root.join("test/dog/0000.png"), 8, 8, 2);
    let cat_dog = names(&["cat", "dog"]);
    let load_image_folder = |root: &Path, split| load_image_folder(root, split, &cat_dog);
    assert_eq!(load_image_folder(root, Some("test")).unwrap().len(), 2);

    // Unreadable image.
    std::fs::write(root.join("test/dog/0001.jpg"), b"this is not a jpeg at all").unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(
        e.contains("0001.jpg") && e.contains("unreadable image"),
        "{e}"
    );
    // Truncated JPEG with a valid header.
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpg)
        .encode(
            &pseudo_random_bytes(8 * 8 * 3, 3),
            8,
            8,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    std::fs::write(root.join("test/dog/0001.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("0001.jpg"), "{e}");
    // A valid JPEG decodes fine.
    std::fs::write(root.join("test/dog/0001.jpg"), &jpg).unwrap();
    assert_eq!(load_image_folder(root, Some("test")).unwrap().len(), 3);

    // Size mismatch.
    png_file(&root.join("test/dog/0002.png"), 9, 8, 4);
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("0002.png") && e.contains("9x8"), "{e}");
    std::fs::remove_file(root.join("test/dog/0002.png")).unwrap();

    // Stray file in a class folder / next to class folders.
    std::fs::write(root.join("test/dog/notes.txt"), b"x").unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("notes.txt"), "{e}");
    std::fs::remove_file(root.join("test/dog/notes.txt")).unwrap();
    std::fs::write(root.join("test/README"), b"x").unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("README"), "{e}");
    std::fs::remove_file(root.join("test/README")).unwrap();
    // Hidden files are ignored.
    std::fs::write(root.join("test/.DS_Store"), b"x").unwrap();
    assert_eq!(load_image_folder(root, Some("test")).unwrap().len(), 3);

    // Empty class folder.
    std::fs::remove_file(root.join("test/cat/0000.png")).unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("cat") && e.contains("empty class folder"), "{e}");
    png_file(&root.join("test/cat/0000.png"), 8, 8, 1);

    // A folder of no listed class (it would have shifted or added labels) and a missing one.
    png_file(&root.join("test/dragon/0000.png"), 8, 8, 5);
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(
        e.contains("dragon") && e.contains("unexpected class folder") && e.contains("cat, dog"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("test/dragon")).unwrap();
    std::fs::remove_dir_all(root.join("test/cat")).unwrap();
    let e = msg(load_image_folder(root, Some("test")).unwrap_err());
    assert!(e.contains("missing class folder(s) cat"), "{e}");

    // Missing split.
    let e = msg(load_image_folder(root, Some("train")).unwrap_err());
    assert!(e.contains("train"), "{e}");
}

#[test]
fn failure_folder_with_known_classes() {
    let classes: Vec<String> = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    png_file(&root.join("dog/b.png"), 32, 32, 1);
    png_file(&root.join("cat/x.png"), 32, 32, 2);
    png_file(&root.join("cat/a.png"), 32, 32, 3);
    std::fs::create_dir_all(root.join("ship")).unwrap(); // empty folder is fine here
    let ds = load_images_dir_with_classes(root, &classes).unwrap();
    assert_eq!(ds.labels, vec![3, 3, 5]);
    assert_eq!(ds.class_names, classes);
    assert_eq!(
        ds.source_ids.as_ref().unwrap(),
        &vec![
            "cat/a.png".to_string(),
            "cat/x.png".into(),
            "dog/b.png".into()
        ]
    );
    assert_eq!(ds.image(0), pseudo_random_bytes(3072, 3).as_slice());

    png_file(&root.join("kitten/k.png"), 32, 32, 4);
    let e = msg(load_images_dir_with_classes(root, &classes).unwrap_err());
    assert!(
        e.contains("kitten") && e.contains("airplane") && e.contains("truck"),
        "{e}"
    );

    let empty = tempfile::tempdir().unwrap();
    let e = msg(load_images_dir_with_classes(empty.path(), &classes).unwrap_err());
    assert!(e.contains("no images"), "{e}");
    let e = msg(
        load_images_dir_with_classes(&PathBuf::from("/nonexistent/failures"), &classes)
            .unwrap_err(),
    );
    assert!(e.contains("/nonexistent/failures"), "{e}");
}

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}
