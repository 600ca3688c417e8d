//! A worker-side cache of input artifacts, keyed by digest: a folder on the node's disk (or on
//! a shared filesystem) given by `deeprepair worker --cache-dir` / `$DEEPREPAIR_CACHE_DIR`, so
//! an artifact crosses the wire once per cache instead of once per stage that reads it.
//!
//! - Each entry is one file, `<digest>.frame`, in the protocol's frame encoding (header and
//!   bytes); it is written to a temporary name and renamed into place, so a reader never sees
//!   half an entry.
//! - Every read re-hashes the bytes against the digest it is filed under; a corrupt or
//!   unreadable entry is deleted and the artifact fetched again.
//! - Fetches of one digest are serialized by an exclusive lock on `locks/<digest>` (the
//!   workers of a node share the folder and only the first fetches; the others then read its
//!   entry).
//! - The folder is bounded: after each insert, the least recently used entries (by
//!   modification time, refreshed on every hit) are removed until the total is within
//!   `max_bytes`. An artifact larger than the bound is passed through uncached.

use crate::protocol::{frame_parts, read_frame};
use anyhow::Context;
use deeprepair_pipeline::{Artifact, Digest};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Environment variable naming the cache folder (what `--cache-dir` defaults to).
pub const CACHE_DIR_ENV: &str = "DEEPREPAIR_CACHE_DIR";
/// Environment variable bounding the cache, in MiB (default [`DEFAULT_MAX_MIB`]).
pub const CACHE_MAX_ENV: &str = "DEEPREPAIR_CACHE_MAX_MIB";
pub const DEFAULT_MAX_MIB: u64 = 20 * 1024;

/// What the cache did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered from the folder.
    pub hits: u64,
    /// Artifacts fetched from the coordinator (misses).
    pub fetched: u64,
    /// Entries that failed verification (deleted, then fetched again).
    pub corrupt: u64,
    /// Entries removed to stay within the bound.
    pub evicted: u64,
}

pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
    stats: Mutex<CacheStats>,
}

impl ArtifactCache {
    /// Opens (creating) the cache folder `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> anyhow::Result<ArtifactCache> {
        std::fs::create_dir_all(dir.join("locks"))
            .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            max_bytes,
            stats: Mutex::new(CacheStats::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> CacheStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut CacheStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The file holding `digest`'s entry.
    pub fn entry_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.frame", digest.hex()))
    }

    /// The artifact `digest`, from the folder when a verified entry is there, else from
    /// `fetch` (then kept). Cache trouble (a full disk, a lost entry) never fails the read:
    /// it falls back to `fetch`.
    pub fn get_or_fetch(
        &self,
        digest: &Digest,
        fetch: impl FnOnce() -> anyhow::Result<Artifact>,
    ) -> anyhow::Result<Artifact> {
        let lock_path = self.dir.join("locks").join(digest.hex());
        // Held until this read is answered: one fetch per digest at a time, across processes.
        let lock = std::fs::File::create(&lock_path)
            .and_then(|file| file.lock().map(|()| file))
            .map_err(|e| {
                tracing::warn!(
                    "artifact cache: cannot lock {} ({e}); fetching without the cache",
                    lock_path.display()
                )
            })
            .ok();
        if lock.is_some() {
            if let Some(hit) = self.read(digest) {
                self.count(|s| s.hits += 1);
                return Ok(hit);
            }
        }
        let artifact = fetch()?;
        self.count(|s| s.fetched += 1);
        tracing::info!(
            "artifact cache: fetched {} ({} bytes) into {}",
            digest.short(),
            artifact.bytes.len(),
            self.dir.display()
        );
        if lock.is_some() {
            if let Err(e) = self.insert(digest, &artifact) {
                tracing::warn!("artifact cache: cannot keep {}: {e:#}", digest.short());
            }
        }
        Ok(artifact)
    }

    /// A verified entry, or `None` (missing; corrupt ones are deleted).
    fn read(&self, digest: &Digest) -> Option<Artifact> {
        let path = self.entry_path(digest);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("artifact cache: cannot open {}: {e}", path.display());
                return None;
            }
        };
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let verified = read_frame(&mut reader, u64::MAX).and_then(|(mut artifacts, _)| {
            match (artifacts.pop(), artifacts.is_empty()) {
                (Some(a), true) if a.digest() == *digest => Ok(a),
                _ => anyhow::bail!("it holds something other than {}", digest.short()),
            }
        });
        match verified {
            Ok(artifact) => {
                // Recently used: eviction goes by modification time.
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(artifact)
            }
            Err(e) => {
                tracing::warn!(
                    "artifact cache: entry {} is corrupt ({e:#}); deleting it and fetching again",
                    path.display()
                );
                self.count(|s| s.corrupt += 1);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn insert(&self, digest: &Digest, artifact: &Artifact) -> anyhow::Result<()> {
        let (head, bytes) = frame_parts(std::slice::from_ref(artifact), &[]);
        let size = (head.len() + artifact.bytes.len()) as u64;
        if size > self.max_bytes {
            return Ok(());
        }
        let path = self.entry_path(digest);
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", digest.hex(), std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            file.write_all(&head)?;
            for piece in bytes {
                file.write_all(piece)?;
            }
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(anyhow::Error::new(e).context(format!("writing {}", path.display())));
        }
        self.evict(&path)
    }

    /// Removes the least recently used entries (never `keep`) until the folder is within
    /// its bound.
    fn evict(&self, keep: &Path) -> anyhow::Result<()> {
        let mut entries = vec![];
        let mut total = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("frame") {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            total += meta.len();
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push((used, meta.len(), path));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                self.count(|s| s.evicted += 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn artifact(text: &str) -> Artifact {
        Artifact::text(text)
    }

    #[test]
    fn an_artifact_is_fetched_once_then_read_verified_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 1 << 20).unwrap();
        let a = artifact("the test set");
        let fetches = Cell::new(0);
        let fetch = || {
            fetches.set(fetches.get() + 1);
            Ok(a.clone())
        };
        for _ in 0..3 {
            let got = cache.get_or_fetch(&a.digest(), fetch).unwrap();
            assert_eq!(got.bytes, a.bytes);
            assert_eq!(got.header, a.header);
        }
        assert_eq!(fetches.get(), 1);
        // A second cache on the same folder (another worker of the node) fetches nothing.
        let other = ArtifactCache::open(dir.path(), 1 << 20).unwrap();
        other
            .get_or_fetch(&a.digest(), || panic!("already cached"))
            .unwrap();
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 2,
                fetched: 1,
                corrupt: 0,
                evicted: 0
            }
        );
    }

    #[test]
    fn a_corrupted_entry_is_detected_and_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 1 << 20).unwrap();
        let a = artifact(&"corruption ".repeat(100));
        cache.get_or_fetch(&a.digest(), || Ok(a.clone())).unwrap();
        // One bit flipped in the last byte of the artifact's bytes on disk.
        let path = cache.entry_path(&a.digest());
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let fetches = Cell::new(0);
        let got = cache
            .get_or_fetch(&a.digest(), || {
                fetches.set(fetches.get() + 1);
                Ok(a.clone())
            })
            .unwrap();
        assert_eq!(got.bytes, a.bytes, "the corrupt entry was not returned");
        assert_eq!(fetches.get(), 1, "refetched");
        assert_eq!(cache.stats().corrupt, 1);
        // The entry was rewritten whole: the next read is a verified hit.
        assert_eq!(std::fs::read(&path).unwrap().len(), bytes.len());
        cache.get_or_fetch(&a.digest(), || panic!("fixed")).unwrap();
        // A truncated entry too.
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let got = cache.get_or_fetch(&a.digest(), || Ok(a.clone())).unwrap();
        assert_eq!(got.bytes, a.bytes);
        assert_eq!(cache.stats().corrupt, 2);
    }

    #[test]
    fn the_cache_stays_within_its_bound_evicting_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            artifact(&"a".repeat(4000)),
            artifact(&"b".repeat(4000)),
            artifact(&"c".repeat(4000)),
        );
        // Room for two entries (each ~4.1 kB with its head), not three.
        let cache = ArtifactCache::open(dir.path(), 9000).unwrap();
        cache.get_or_fetch(&a.digest(), || Ok(a.clone())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.get_or_fetch(&b.digest(), || Ok(b.clone())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // a is used again: b is now the least recently used.
        cache
            .get_or_fetch(&a.digest(), || panic!("cached"))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.get_or_fetch(&c.digest(), || Ok(c.clone())).unwrap();
        assert!(cache.entry_path(&a.digest()).exists());
        assert!(!cache.entry_path(&b.digest()).exists(), "b was evicted");
        assert!(cache.entry_path(&c.digest()).exists());
        assert_eq!(cache.stats().evicted, 1);
        // Larger than the whole bound: passed through, not kept.
        let big = artifact(&"d".repeat(20_000));
        cache
            .get_or_fetch(&big.digest(), || Ok(big.clone()))
            .unwrap();
        assert!(!cache.entry_path(&big.digest()).exists());
    }
}
