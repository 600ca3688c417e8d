//! A damaged store file is an error, never a crash.
//!
//! redb checks most of what it reads and returns `Corrupted`, but some malformed pages reach an
//! `unreachable!()` or a debug assertion inside it. Every store operation therefore runs under
//! [`catch_store_panic`], which turns such a panic into [`StoreError::Damaged`], and classifies
//! redb's own corruption errors the same way ([`classify`]). While a store operation runs, the
//! panic hook stays quiet: the user gets one message saying what is damaged and what to do, not
//! a backtrace.

use super::StoreError;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

thread_local! {
    /// How many store operations this thread is inside (they nest: `get_artifact` → `reader`).
    static GUARD_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// What the last quieted panic said, for the error message.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL_HOOK: Once = Once::new();

/// Wraps the process's panic hook once: a panic inside a store operation is recorded for its
/// error instead of printed; every other panic goes to the previous hook unchanged.
fn install_quiet_hook() {
    INSTALL_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARD_DEPTH.with(Cell::get) > 0 {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "internal check failed".into());
                let place = info
                    .location()
                    .map(|l| format!(" ({}:{})", short_path(l.file()), l.line()))
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{place}")));
            } else {
                previous(info)
            }
        }));
    });
}

/// `.../redb-4.6.0/src/tree_store/btree.rs` → `redb-4.6.0/src/tree_store/btree.rs`.
fn short_path(file: &str) -> &str {
    file.find("redb-").map(|i| &file[i..]).unwrap_or(file)
}

/// Runs `op`; a panic inside it becomes [`StoreError::Damaged`] for the store at `path`.
pub(crate) fn catch_store_panic<T>(
    path: &Path,
    op: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    install_quiet_hook();
    GUARD_DEPTH.with(|d| d.set(d.get() + 1));
    let outcome = catch_unwind(AssertUnwindSafe(op));
    GUARD_DEPTH.with(|d| d.set(d.get() - 1));
    match outcome {
        Ok(result) => result,
        Err(_) => {
            let detail = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "internal check failed".into());
            Err(StoreError::Damaged {
                path: path.into(),
                detail: format!("redb: {detail}"),
            })
        }
    }
}

/// A redb error as a store error: corruption (and a file that is not a database at all) is
/// [`StoreError::Damaged`], anything else (I/O, a full disk) stays [`StoreError::Db`].
pub(crate) fn classify(path: &Path, error: redb::Error) -> StoreError {
    let damaged = match &error {
        redb::Error::Corrupted(_) => true,
        redb::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    };
    if damaged {
        StoreError::Damaged {
            path: path.into(),
            detail: error.to_string(),
        }
    } else {
        StoreError::Db {
            path: path.into(),
            detail: error.to_string(),
        }
    }
}

/// Conversion of any redb result into a store result, naming the store (one place instead of a
/// closure at every call).
pub(crate) trait InStore<T> {
    fn in_store(self, path: &Path) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> InStore<T> for Result<T, E> {
    fn in_store(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| classify(path, e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_a_store_operation_is_a_damaged_error_naming_the_store_and_the_site() {
        let err = catch_store_panic::<()>(Path::new("/tmp/x.redb"), || {
            panic!("Invalid page type byte 7")
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Damaged { .. }), "{text}");
        assert!(text.contains("/tmp/x.redb"), "{text}");
        assert!(text.contains("Invalid page type byte 7"), "{text}");
        assert!(text.contains("guard.rs"), "the site is named: {text}");
        assert!(text.contains("verify"), "says what to do: {text}");
    }

    #[test]
    fn errors_and_values_pass_through_and_guards_nest() {
        let path = Path::new("s.redb");
        let value = catch_store_panic(path, || catch_store_panic(path, || Ok(3))).unwrap();
        assert_eq!(value, 3);
        let err = catch_store_panic::<()>(path, || Err(StoreError::NotFound("x".into())));
        assert!(matches!(err, Err(StoreError::NotFound(_))));
        GUARD_DEPTH.with(|d| assert_eq!(d.get(), 0));
    }

    #[test]
    fn redb_corruption_is_damage_and_other_failures_are_not() {
        let path = Path::new("s.redb");
        let corrupt = classify(
            path,
            redb::Error::Corrupted("Malformed allocator state".into()),
        );
        assert!(matches!(corrupt, StoreError::Damaged { .. }));
        let full = classify(
            path,
            redb::Error::Io(std::io::Error::new(std::io::ErrorKind::StorageFull, "full")),
        );
        assert!(matches!(full, StoreError::Db { .. }));
    }
}
