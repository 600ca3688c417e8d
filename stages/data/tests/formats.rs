//! Encodings and formats: .npy, Dataset bytes, subsets, PNG/JPEG codec, fetch.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use common::pseudo_random_bytes;
use deeprepair_data::*;
use sha2::Digest;

fn small_dataset(n: usize, with_ids: bool) -> Dataset {
    Dataset {
        height: 4,
        width: 3,
        images: pseudo_random_bytes(n * 36, 7),
        labels: (0..n).map(|i| (i % 3) as u8).collect(),
        class_names: vec!["a".into(), "b".into(), "c".into()],
        source_ids: with_ids.then(|| (0..n).map(|i| format!("f{i}.png")).collect()),
    }
}

#[test]
fn npy_round_trip_and_standard_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("CIFAR-10-C");
    let n = 20;
    let images = pseudo_random_bytes(n * 3072, 1);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    write_cifar_c_npy(&dir, "gaussian_noise", &images, n, &labels).unwrap();
    let (im2, lb2) = read_cifar_c_npy(&dir, "gaussian_noise").unwrap();
    assert_eq!(im2, images);
    assert_eq!(lb2, labels);

    // Standard .npy header text.
    let raw = std::fs::read(dir.join("gaussian_noise.npy")).unwrap();
    assert_eq!(&raw[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([raw[8], raw[9]]) as usize;
    let header = std::str::from_utf8(&raw[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '|u1'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    assert!(header.contains("'shape': (20, 32, 32, 3)"), "{header}");
    assert_eq!((10 + hlen) % 64, 0, "data is 64-byte aligned");
    assert_eq!(raw.len(), 10 + hlen + n * 3072);
    let raw = std::fs::read(dir.join("labels.npy")).unwrap();
    let hlen = u16::from_le_bytes([raw[8], raw[9]]) as usize;
    let header = std::str::from_utf8(&raw[10..10 + hlen]).unwrap();
    assert!(header.contains("'shape': (20,)"), "{header}");

    // A second corruption with the same labels is fine; with other labels it is refused.
    write_cifar_c_npy(&dir, "fog", &images, n, &labels).unwrap();
    let mut other = labels.clone();
    other[0] = 9;
    let e = write_cifar_c_npy(&dir, "frost", &images, n, &other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("labels.npy") && e.contains("different labels"),
        "{e}"
    );
    // Bad arguments.
    assert!(write_cifar_c_npy(&dir, "fog", &images[1..], n, &labels).is_err());
    assert!(write_cifar_c_npy(&dir, "../evil", &images, n, &labels).is_err());
    assert!(write_cifar_c_npy(&dir, "fog", &images, n, &labels[1..]).is_err());

    // int64 labels, as in the released set.
    let i64_dir = tmp.path().join("i64");
    write_cifar_c_npy(&i64_dir, "snow", &images, n, &labels).unwrap();
    let l64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    npyz::to_file_1d(i64_dir.join("labels.npy"), l64.iter().copied()).unwrap();
    let (_, lb) = read_cifar_c_npy(&i64_dir, "snow").unwrap();
    assert_eq!(lb, labels);
    // Label out of range.
    let mut bad = l64.clone();
    bad[3] = 10;
    npyz::to_file_1d(i64_dir.join("labels.npy"), bad.iter().copied()).unwrap();
    let e = read_cifar_c_npy(&i64_dir, "snow").unwrap_err().to_string();
    assert!(e.contains("labels.npy") && e.contains("label 10"), "{e}");
    // Wrong count.
    npyz::to_file_1d(i64_dir.join("labels.npy"), l64[..5].iter().copied()).unwrap();
    let e = read_cifar_c_npy(&i64_dir, "snow").unwrap_err().to_string();
    assert!(e.contains("labels.npy") && e.contains("5 labels"), "{e}");
    // Wrong dtype / shape of the image file.
    npyz::to_file_1d(i64_dir.join("snow.npy"), [1.0f32, 2.0].iter().copied()).unwrap();
    let e = read_cifar_c_npy(&i64_dir, "snow").unwrap_err().to_string();
    assert!(
        e.contains("snow.npy") && e.contains("[N, 32, 32, 3]"),
        "{e}"
    );
    // Not an npy file / missing file.
    std::fs::write(i64_dir.join("snow.npy"), b"garbage").unwrap();
    let e = read_cifar_c_npy(&i64_dir, "snow").unwrap_err().to_string();
    assert!(e.contains("snow.npy"), "{e}");
    let e = read_cifar_c_npy(&i64_dir, "contrast")
        .unwrap_err()
        .to_string();
    assert!(e.contains("contrast.npy"), "{e}");
}

#[test]
fn a_truncated_npy_names_both_sizes_and_an_empty_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("CIFAR-10-C");
    let n = 4;
    let images = pseudo_random_bytes(n * 3072, 2);
    let labels: Vec<u8> = (0..n).map(|i| i as u8).collect();
    write_cifar_c_npy(&dir, "fog", &images, n, &labels).unwrap();
    let full = std::fs::read(dir.join("fog.npy")).unwrap();
    std::fs::write(dir.join("fog.npy"), &full[..full.len() - 1000]).unwrap();
    let e = read_cifar_c_npy(&dir, "fog").unwrap_err().to_string();
    let (short, whole) = ((full.len() - 1000).to_string(), full.len().to_string());
    assert!(
        e.contains("fog.npy")
            && e.contains("truncated")
            && e.contains(&short)
            && e.contains(&whole),
        "{e}"
    );
    // Labels cut short too.
    write_cifar_c_npy(&dir, "snow", &images, n, &labels).unwrap();
    let labels_file = std::fs::read(dir.join("labels.npy")).unwrap();
    std::fs::write(
        dir.join("labels.npy"),
        &labels_file[..labels_file.len() - 2],
    )
    .unwrap();
    let e = read_cifar_c_npy(&dir, "snow").unwrap_err().to_string();
    assert!(e.contains("labels.npy") && e.contains("truncated"), "{e}");

    // Zero images: an error, not an empty set.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // A version-1 .npy of shape (0, 32, 32, 3), written by hand.
    let mut dict =
        "{'descr': '|u1', 'fortran_order': False, 'shape': (0, 32, 32, 3), }".to_string();
    while !(10 + dict.len() + 1).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut zero = b"\x93NUMPY\x01\x00".to_vec();
    zero.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    zero.extend_from_slice(dict.as_bytes());
    std::fs::write(empty.join("fog.npy"), zero).unwrap();
    npyz::to_file_1d(empty.join("labels.npy"), std::iter::empty::<u8>()).unwrap();
    let e = read_cifar_c_npy(&empty, "fog").unwrap_err().to_string();
    assert!(e.contains("fog.npy") && e.contains("no images"), "{e}");
}

#[test]
fn dataset_bytes_round_trip_and_corruption() {
    for with_ids in [false, true] {
        let ds = small_dataset(25, with_ids);
        ds.validate().unwrap();
        let bytes = ds.to_bytes();
        assert_eq!(Dataset::from_bytes(&bytes).unwrap(), ds);
        assert_eq!(bytes, ds.to_bytes(), "deterministic");
        // Every single-byte flip (sampled) is rejected.
        for pos in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[pos] ^= 0x20;
            assert!(Dataset::from_bytes(&b).is_err(), "flip at {pos} accepted");
        }
        // Truncations and extensions are rejected.
        for len in [0, 5, 16, bytes.len() / 2, bytes.len() - 1] {
            assert!(Dataset::from_bytes(&bytes[..len]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Dataset::from_bytes(&longer).is_err());
    }
    let e = Dataset::from_bytes(b"PNG not a dataset at all, definitely not one at all")
        .unwrap_err()
        .to_string();
    assert!(e.contains("magic"), "{e}");
    // An empty dataset round-trips.
    let empty = small_dataset(0, true);
    assert_eq!(Dataset::from_bytes(&empty.to_bytes()).unwrap(), empty);
}

#[test]
fn dataset_accessors_and_validate() {
    let ds = small_dataset(10, true);
    assert_eq!((ds.len(), ds.image_len(), ds.num_classes()), (10, 36, 3));
    assert!(!ds.is_empty());
    let sub = ds.subset(&[9, 0, 9]);
    assert_eq!(sub.len(), 3);
    assert_eq!(sub.image(0), ds.image(9));
    assert_eq!(sub.image(1), ds.image(0));
    assert_eq!(sub.labels, vec![ds.labels[9], ds.labels[0], ds.labels[9]]);
    assert_eq!(sub.source_ids.as_ref().unwrap()[1], "f0.png");
    sub.validate().unwrap();

    let mut bad = ds.clone();
    bad.labels[2] = 3;
    assert!(bad.validate().unwrap_err().to_string().contains("label 3"));
    let mut bad = ds.clone();
    bad.images.pop();
    assert!(bad.validate().is_err());
    let mut bad = ds.clone();
    bad.source_ids.as_mut().unwrap().pop();
    assert!(bad.validate().is_err());
    let mut bad = ds.clone();
    bad.class_names[1] = "a".into();
    assert!(bad.validate().is_err());
    let mut bad = ds;
    bad.width = 0;
    assert!(bad.validate().is_err());
}

#[test]
fn select_subset_is_deterministic_and_bounded() {
    let labels: Vec<u8> = (0..5000).map(|i| ((i * 7) % 10) as u8).collect();
    let a = select_subset(&labels, 10, Some(30), None, 42);
    let b = select_subset(&labels, 10, Some(30), None, 42);
    assert_eq!(a, b);
    assert_eq!(a.len(), 300);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    let mut counts = [0; 10];
    for &i in &a {
        counts[labels[i] as usize] += 1;
    }
    assert_eq!(counts, [30; 10]);
    assert_ne!(a, select_subset(&labels, 10, Some(30), None, 43));
    // limit
    let l = select_subset(&labels, 10, None, Some(123), 1);
    assert_eq!(l.len(), 123);
    assert!(l.windows(2).all(|w| w[0] < w[1]));
    let both = select_subset(&labels, 10, Some(30), Some(50), 1);
    assert_eq!(both.len(), 50);
    // per_class larger than available; no bounds -> everything.
    let few = [0u8, 0, 1];
    assert_eq!(select_subset(&few, 2, Some(5), None, 0), vec![0, 1, 2]);
    assert_eq!(select_subset(&few, 2, None, None, 0), vec![0, 1, 2]);
    assert_eq!(
        select_subset(&few, 2, Some(0), None, 0),
        Vec::<usize>::new()
    );
    // labels beyond num_classes are skipped, not a panic.
    assert_eq!(select_subset(&[5, 0], 2, Some(1), None, 0), vec![1]);
    assert!(select_subset(&[], 10, Some(3), Some(3), 0).is_empty());
}

#[test]
fn png_codec_round_trip_and_errors() {
    let px = pseudo_random_bytes(7 * 5 * 3, 9);
    let png = encode_png(&px, 7, 5).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let (back, w, h) = decode_image(&png).unwrap();
    assert_eq!((back, w, h), (px.clone(), 7, 5));
    assert!(encode_png(&px, 7, 4).is_err());
    assert!(encode_png(&[], 0, 0).is_err());
    let e = decode_image(b"GIF89a no").unwrap_err().to_string();
    assert!(e.contains("PNG or JPEG"), "{e}");
    assert!(decode_image(&png[..png.len() / 2]).is_err());
    assert!(decode_image(&[]).is_err());
}

// ---------------------------------------------------------------------------------------
// fetch

/// Builds a cifar-10-binary.tar.gz lookalike with a few records per file.
fn build_tarball() -> (Vec<u8>, Vec<u8>) {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut test_batch = Vec::new();
    for (k, name) in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ]
    .iter()
    .enumerate()
    {
        let mut bytes = Vec::new();
        for r in 0..3 {
            bytes.push(((k + r) % 10) as u8);
            bytes.extend(pseudo_random_bytes(3072, (k * 10 + r) as u64));
        }
        if *name == "test_batch.bin" {
            test_batch = bytes.clone();
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            bytes.as_slice(),
        )
        .unwrap();
    }
    let meta = b"airplane\nautomobile\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(meta.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(
        &mut header,
        "cifar-10-batches-bin/batches.meta.txt",
        &meta[..],
    )
    .unwrap();
    (tar.into_inner().unwrap().finish().unwrap(), test_batch)
}

/// Serves `body` at `/cifar-10-binary.tar.gz` (404 elsewhere) for `requests` connections.
fn serve(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        for _ in 0..requests {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req);
            let ok = req.starts_with("GET /cifar-10-binary.tar.gz ");
            let (status, payload): (&str, &[u8]) = if ok {
                ("200 OK", &body)
            } else {
                ("404 Not Found", b"not here")
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                payload.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(payload);
        }
    });
    (format!("http://{addr}"), handle)
}

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Names in `dir` (to check nothing half-written is left behind).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn fetch_over_http_with_checksum() {
    let (tgz, test_batch) = build_tarball();
    let digest = sha256_hex(&tgz);
    let (base, server) = serve(tgz, 3);
    let url = format!("{base}/cifar-10-binary.tar.gz");

    // Checksum mismatch: error with both digests, nothing left behind.
    let tmp = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let e = fetch_cifar10(&url, Some(&wrong), tmp.path(), false).unwrap_err();
    assert!(matches!(e, DataError::Checksum { .. }), "{e}");
    let e = e.to_string();
    assert!(e.contains(&wrong) && e.contains(&digest), "{e}");
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));

    // Right checksum (upper case accepted).
    let dir = fetch_cifar10(&url, Some(&digest.to_uppercase()), tmp.path(), true).unwrap();
    assert_eq!(dir, tmp.path().join("cifar-10-batches-bin"));
    assert_eq!(entries(tmp.path()), vec!["cifar-10-batches-bin"]);
    assert_eq!(
        std::fs::read(dir.join("test_batch.bin")).unwrap(),
        test_batch
    );
    let ds = load_cifar_binary(&dir, Split::Train).unwrap();
    assert_eq!(ds.len(), 15);
    assert_eq!(load_dataset(tmp.path(), Split::Test).unwrap().len(), 3);
    // Already complete: no download (the server would not answer a 4th request).
    assert_eq!(fetch_cifar10(&url, None, tmp.path(), false).unwrap(), dir);

    // 404.
    let tmp2 = tempfile::tempdir().unwrap();
    let e = fetch_cifar10(&format!("{base}/missing.tar.gz"), None, tmp2.path(), false).unwrap_err();
    assert!(matches!(e, DataError::Download { .. }), "{e}");
    assert!(e.to_string().contains("404"), "{e}");
    server.join().unwrap();
}

#[test]
fn fetch_from_file_url_and_path() {
    let (tgz, test_batch) = build_tarball();
    let src = tempfile::tempdir().unwrap();
    let archive = src.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, &tgz).unwrap();

    let d1 = tempfile::tempdir().unwrap();
    // Leftovers of a killed fetch are cleaned up.
    std::fs::write(d1.path().join(".cifar-10-download-old.tar.gz"), b"half").unwrap();
    std::fs::create_dir_all(d1.path().join(".cifar-10-unpack-old/x")).unwrap();
    let url = format!("file://{}", archive.display());
    let dir = fetch_cifar10(&url, Some(&sha256_hex(&tgz)), d1.path(), false).unwrap();
    assert_eq!(
        std::fs::read(dir.join("test_batch.bin")).unwrap(),
        test_batch
    );

    let d2 = tempfile::tempdir().unwrap();
    let dir = fetch_cifar10(
        archive.to_str().unwrap(),
        None,
        &d2.path().join("new/sub"),
        false,
    )
    .unwrap();
    assert!(dir.join("data_batch_5.bin").is_file());

    // Missing file names it.
    let d3 = tempfile::tempdir().unwrap();
    let missing = src.path().join("nope.tar.gz");
    let e = fetch_cifar10(missing.to_str().unwrap(), None, d3.path(), false).unwrap_err();
    assert!(e.to_string().contains("nope.tar.gz"), "{e}");
    // Not a tarball.
    let junk = src.path().join("junk.tar.gz");
    std::fs::write(&junk, b"junk").unwrap();
    let e = fetch_cifar10(junk.to_str().unwrap(), None, d3.path(), false).unwrap_err();
    assert!(e.to_string().contains("tar.gz"), "{e}");
    assert!(entries(d3.path()).is_empty(), "{:?}", entries(d3.path()));
    // A tarball without the .bin files.
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "readme.txt", &b"hi"[..]).unwrap();
    let other = src.path().join("other.tar.gz");
    std::fs::write(&other, tar.into_inner().unwrap().finish().unwrap()).unwrap();
    let e = fetch_cifar10(other.to_str().unwrap(), None, d3.path(), false).unwrap_err();
    assert!(e.to_string().contains("no CIFAR-10 binary files"), "{e}");
    assert!(entries(d3.path()).is_empty(), "{:?}", entries(d3.path()));
    // Bad checksum argument, unsupported scheme.
    assert!(fetch_cifar10(&url, Some("abc"), d3.path(), false).is_err());
    assert!(fetch_cifar10("ftp://x/y.tar.gz", None, d3.path(), false).is_err());
}

#[test]
fn fetch_unreachable_is_a_clear_error() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let e = fetch_cifar10(&url, None, tmp.path(), false).unwrap_err();
    assert!(matches!(e, DataError::Unreachable { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("cannot reach") && e.contains(&url) && e.contains("--data PATH"),
        "{e}"
    );
    assert!(entries(tmp.path()).is_empty());
}
