//! `data fetch`: download, verify and unpack the CIFAR-10 binary tarball.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cifar::{find_cifar_binary_dir, CIFAR10_BINARY_SUBDIR, CIFAR_RECORD_LEN};
use crate::{DataError, Split};

/// Where the official CIFAR-10 binary tarball (`cifar-10-binary.tar.gz`, about 162 MiB) lives.
///
/// Its official MD5, as published on <https://www.cs.toronto.edu/~kriz/cifar.html>, is
/// `c32a1d4ab5d03f1284b67883e8d87530` ([`CIFAR10_BINARY_MD5`]).
pub const CIFAR10_BINARY_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// The official MD5 of `cifar-10-binary.tar.gz` (informational; [`fetch_cifar10`] verifies
/// SHA-256 when one is given).
pub const CIFAR10_BINARY_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// All six CIFAR-10 binary files.
fn all_bin_files() -> impl Iterator<Item = &'static str> {
    Split::Train
        .cifar_binary_files()
        .iter()
        .chain(Split::Test.cifar_binary_files())
        .copied()
}

/// Checks that `dir` holds all six `.bin` files, each a positive multiple of 3,073 bytes.
fn check_complete(dir: &Path) -> Result<(), String> {
    for name in all_bin_files() {
        let p = dir.join(name);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.len() > 0 && m.len() % CIFAR_RECORD_LEN as u64 == 0 => {}
            Ok(m) => {
                return Err(format!(
                    "{name} has {} bytes, expected a positive multiple of {CIFAR_RECORD_LEN}",
                    m.len()
                ))
            }
            Err(_) => return Err(format!("{name} is missing")),
        }
    }
    Ok(())
}

/// Where the bytes come from.
enum Source {
    Http(String),
    File(PathBuf),
}

fn parse_source(url: &str) -> Result<Source, DataError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(Source::Http(url.to_string()))
    } else if let Some(rest) = url.strip_prefix("file://") {
        // file:///abs/path or file://localhost/abs/path
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        if rest.is_empty() {
            return Err(DataError::Download {
                url: url.into(),
                message: "file:// URL has no path".into(),
            });
        }
        Ok(Source::File(PathBuf::from(rest)))
    } else if let Some((scheme, _)) = url.split_once("://") {
        Err(DataError::Download {
            url: url.into(),
            message: format!(
                "unsupported URL scheme {scheme:?}; use http://, https://, file:// or a plain path"
            ),
        })
    } else {
        Ok(Source::File(PathBuf::from(url)))
    }
}

fn open_http(url: &str) -> Result<(Box<dyn Read>, Option<u64>), DataError> {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => DataError::Download {
            url: url.into(),
            message: format!("the server answered HTTP {code}"),
        },
        ureq::Error::Io(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Timeout(_) => DataError::Unreachable {
            url: url.into(),
            message: e.to_string(),
        },
        other => DataError::Download {
            url: url.into(),
            message: other.to_string(),
        },
    })?;
    let total = resp.body().content_length();
    Ok((Box::new(resp.into_body().into_reader()), total))
}

fn progress_bar(progress: bool, total: Option<u64>) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => indicatif::ProgressBar::new(t).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                .expect("valid template"),
        ),
    };
    pb.set_message("cifar-10-binary.tar.gz");
    pb
}

/// Downloads the CIFAR-10 binary tarball from `url` (`http://`, `https://`, `file://` or a
/// plain path), verifies its SHA-256 when `sha256` is given (a mismatch is an error naming
/// both digests), unpacks it into `dest` and returns `dest/cifar-10-batches-bin`, the folder
/// holding the six `.bin` files.
///
/// Everything is written to temporary names inside `dest` and renamed into place at the
/// end, so an interrupted fetch leaves no half-written data (hidden temporaries a killed
/// fetch leaves in `dest` are removed by the next one). When `dest` already holds a
/// complete `cifar-10-batches-bin`, nothing is downloaded and that folder is returned.
/// With `progress`, an indicatif bar on stderr shows the download.
pub fn fetch_cifar10(
    url: &str,
    sha256: Option<&str>,
    dest: &Path,
    progress: bool,
) -> Result<PathBuf, DataError> {
    let expected = match sha256 {
        Some(s) => {
            let s = s.trim().to_ascii_lowercase();
            if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DataError::Invalid(format!(
                    "sha256 {s:?} is not 64 hexadecimal digits"
                )));
            }
            Some(s)
        }
        None => None,
    };
    let final_dir = dest.join(CIFAR10_BINARY_SUBDIR);
    if check_complete(&final_dir).is_ok() {
        return Ok(final_dir);
    }
    let source = parse_source(url)?;
    std::fs::create_dir_all(dest).map_err(|e| DataError::io(dest, e))?;
    remove_stale_temporaries(dest)?;

    let (mut reader, total): (Box<dyn Read>, Option<u64>) = match &source {
        Source::Http(u) => open_http(u)?,
        Source::File(p) => {
            let f = File::open(p).map_err(|e| DataError::io(p, e))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        }
    };

    let mut tmp = tempfile::Builder::new()
        .prefix(".cifar-10-download-")
        .suffix(".tar.gz")
        .tempfile_in(dest)
        .map_err(|e| DataError::io(dest, e))?;
    let pb = progress_bar(progress, total);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received: u64 = 0;
    let tmp_path = tmp.path().to_path_buf();
    {
        let mut out = std::io::BufWriter::new(tmp.as_file_mut());
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    pb.abandon();
                    return Err(DataError::Download {
                        url: url.into(),
                        message: format!("reading failed after {received} bytes: {e}"),
                    });
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| DataError::io(&tmp_path, e))?;
            received += n as u64;
            pb.inc(n as u64);
        }
        out.flush().map_err(|e| DataError::io(&tmp_path, e))?;
    }
    pb.finish_and_clear();
    if let Some(t) = total {
        if received != t {
            return Err(DataError::Download {
                url: url.into(),
                message: format!("received {received} bytes, expected {t}"),
            });
        }
    }
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(expected) = expected {
        if expected != actual {
            return Err(DataError::Checksum {
                source_name: url.into(),
                expected,
                actual,
            });
        }
    }

    // Unpack into a temporary folder inside dest, then move the .bin folder into place.
    let unpack = tempfile::Builder::new()
        .prefix(".cifar-10-unpack-")
        .tempdir_in(dest)
        .map_err(|e| DataError::io(dest, e))?;
    tmp.as_file_mut()
        .rewind()
        .map_err(|e| DataError::io(&tmp_path, e))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(tmp.as_file()));
    tar::Archive::new(gz)
        .unpack(unpack.path())
        .map_err(|e| DataError::Download {
            url: url.into(),
            message: format!("not a valid .tar.gz archive: {e}"),
        })?;
    let found = find_cifar_binary_dir(unpack.path())
        .or_else(|| single_subdir(unpack.path()).and_then(|d| find_cifar_binary_dir(&d)))
        .ok_or_else(|| DataError::Download {
            url: url.into(),
            message: format!(
                "the archive holds no CIFAR-10 binary files (expected {CIFAR10_BINARY_SUBDIR}/\
                 data_batch_1.bin … test_batch.bin); is this cifar-10-binary.tar.gz?"
            ),
        })?;
    check_complete(&found).map_err(|m| DataError::Download {
        url: url.into(),
        message: format!("the archive is incomplete: {m}"),
    })?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| DataError::io(&final_dir, e))?;
    }
    std::fs::rename(&found, &final_dir).map_err(|e| DataError::io(&final_dir, e))?;
    Ok(final_dir)
}

/// Removes what a killed earlier fetch into `dest` left behind (hidden temporaries).
fn remove_stale_temporaries(dest: &Path) -> Result<(), DataError> {
    let rd = std::fs::read_dir(dest).map_err(|e| DataError::io(dest, e))?;
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".cifar-10-download-") || name.starts_with(".cifar-10-unpack-") {
            let p = entry.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| DataError::io(&p, e))?;
        }
    }
    Ok(())
}

fn single_subdir(dir: &Path) -> Option<PathBuf> {
    let mut dirs = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir());
    let first = dirs.next()?;
    dirs.next().is_none().then_some(first)
}
