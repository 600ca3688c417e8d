//! A global allocator that keeps large freed blocks for reuse.
//!
//! Training allocates every activation and gradient afresh each step (candle has no caching
//! allocator), in blocks of megabytes. glibc serves blocks above its mmap threshold (at most
//! 32 MiB) with `mmap` and gives them back with `munmap` on free, so the next step faults every
//! page in again, and the kernel zeroes each one: a third of a small model's step, a tenth of a
//! large one's. [`BlockCache`] keeps freed blocks of `MIN_CACHED_BYTES` and more in size
//! classes (eight per power of two, so at most 12.5 % rounding) and hands them out again, up to
//! a limit on the bytes it holds; everything smaller goes to the system allocator untouched.
//! This is what PyTorch's caching allocators do for device memory.
//!
//! Install it in a binary:
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: deeprepair_alloc::BlockCache = deeprepair_alloc::BlockCache::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks smaller than this go straight to the system allocator (glibc reuses them well).
pub const MIN_CACHED_BYTES: usize = 256 << 10;
/// Size classes per power of two.
const CLASSES_PER_DOUBLING: usize = 8;
const MIN_SHIFT: u32 = MIN_CACHED_BYTES.trailing_zeros();
/// Classes up to 2^48 bytes; larger requests are not cached.
const CLASS_COUNT: usize = (48 - MIN_SHIFT as usize) * CLASSES_PER_DOUBLING;
/// Cached blocks have malloc's own alignment (asking for more makes glibc carve aligned blocks
/// out of its heap, which fragments it); requests for more alignment bypass the cache.
const BLOCK_ALIGN: usize = 16;
/// The default limit on bytes held in freed blocks.
pub const DEFAULT_LIMIT_BYTES: usize = 4 << 30;

/// The class of a request of `size` bytes and its rounded size, or `None` when it is not cached.
fn class_of(size: usize) -> Option<(usize, usize)> {
    if size < MIN_CACHED_BYTES {
        return None;
    }
    let shift = usize::BITS - 1 - size.leading_zeros(); // floor(log2(size))
    let step = 1usize << (shift - CLASSES_PER_DOUBLING.trailing_zeros());
    let steps = size.div_ceil(step); // 8..=16
    let class = (shift - MIN_SHIFT) as usize * CLASSES_PER_DOUBLING + steps - CLASSES_PER_DOUBLING;
    (class < CLASS_COUNT).then(|| (class, steps * step))
}

/// Heads of the per-class free lists; a free block's first word points to the next one.
struct FreeLists {
    heads: [*mut u8; CLASS_COUNT],
}

// SAFETY: the pointers are owned blocks, only touched under the mutex.
unsafe impl Send for FreeLists {}

/// What the cache has done so far (for benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Large requests served from a freed block.
    pub hits: u64,
    /// Large requests that went to the system allocator.
    pub misses: u64,
    /// Bytes held in freed blocks now.
    pub held_bytes: usize,
}

/// The allocator; see the crate docs.
pub struct BlockCache {
    free: Mutex<FreeLists>,
    held_bytes: AtomicUsize,
    limit_bytes: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    pub const fn new() -> Self {
        Self {
            free: Mutex::new(FreeLists {
                heads: [ptr::null_mut(); CLASS_COUNT],
            }),
            held_bytes: AtomicUsize::new(0),
            limit_bytes: AtomicUsize::new(DEFAULT_LIMIT_BYTES),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Sets the most bytes kept in freed blocks; 0 turns caching off. Blocks held beyond a new,
    /// lower limit are given back now.
    pub fn set_limit_bytes(&self, limit: usize) {
        self.limit_bytes.store(limit, Ordering::Relaxed);
        if self.held_bytes.load(Ordering::Relaxed) > limit {
            self.release_all();
        }
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            held_bytes: self.held_bytes.load(Ordering::Relaxed),
        }
    }

    /// Gives every held block back to the system.
    pub fn release_all(&self) {
        let mut free = self.lock();
        for (class, head) in free.heads.iter_mut().enumerate() {
            let size = class_size(class);
            while !head.is_null() {
                let block = *head;
                // SAFETY: `block` is a free block of this class; its first word is the link.
                unsafe {
                    *head = *(block as *mut *mut u8);
                    System.dealloc(block, Layout::from_size_align_unchecked(size, BLOCK_ALIGN));
                }
                self.held_bytes.fetch_sub(size, Ordering::Relaxed);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeLists> {
        // An allocator must not panic; the lists stay consistent under every early exit.
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A held block of `class`, if there is one.
    fn take(&self, class: usize, size: usize) -> *mut u8 {
        let mut free = self.lock();
        let block = free.heads[class];
        if !block.is_null() {
            // SAFETY: a free block's first word is the link to the next one.
            free.heads[class] = unsafe { *(block as *mut *mut u8) };
            self.held_bytes.fetch_sub(size, Ordering::Relaxed);
        }
        block
    }

    /// Keeps `block` for reuse, or gives it back when the cache is full.
    unsafe fn give(&self, block: *mut u8, class: usize, size: usize) {
        let limit = self.limit_bytes.load(Ordering::Relaxed);
        {
            let mut free = self.lock();
            if self.held_bytes.load(Ordering::Relaxed) + size <= limit {
                *(block as *mut *mut u8) = free.heads[class];
                free.heads[class] = block;
                self.held_bytes.fetch_add(size, Ordering::Relaxed);
                return;
            }
        }
        System.dealloc(block, Layout::from_size_align_unchecked(size, BLOCK_ALIGN));
    }

    /// The class and rounded size of a layout this cache serves.
    fn cached_class(layout: Layout) -> Option<(usize, usize)> {
        if layout.align() > BLOCK_ALIGN {
            return None;
        }
        class_of(layout.size())
    }

    unsafe fn alloc_cached(&self, class: usize, size: usize, zeroed: bool, used: usize) -> *mut u8 {
        let block = self.take(class, size);
        if !block.is_null() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            if zeroed {
                ptr::write_bytes(block, 0, used);
            }
            return block;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let layout = Layout::from_size_align_unchecked(size, BLOCK_ALIGN);
        // Fresh pages from the system are zero already: calloc skips the memset.
        if zeroed {
            System.alloc_zeroed(layout)
        } else {
            System.alloc(layout)
        }
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The rounded size of a class (the inverse of [`class_of`]).
fn class_size(class: usize) -> usize {
    let shift = MIN_SHIFT as usize + class / CLASSES_PER_DOUBLING;
    let steps = CLASSES_PER_DOUBLING + class % CLASSES_PER_DOUBLING;
    steps << (shift - CLASSES_PER_DOUBLING.trailing_zeros() as usize)
}

// SAFETY: every block handed out is either the system allocator's for the caller's own layout,
// or a block of at least the requested size and alignment that no one else holds; `dealloc`
// derives the same class from the layout that `alloc` saw.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::cached_class(layout) {
            Some((class, size)) => self.alloc_cached(class, size, false, layout.size()),
            None => System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::cached_class(layout) {
            Some((class, size)) => self.alloc_cached(class, size, true, layout.size()),
            None => System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match Self::cached_class(layout) {
            Some((class, size)) => self.give(block, class, size),
            None => System.dealloc(block, layout),
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (Self::cached_class(layout), Self::cached_class(new_layout)) {
            (None, None) => System.realloc(block, layout, new_size),
            (Some((old, _)), Some((new, _))) if old == new => block,
            _ => {
                let moved = self.alloc(new_layout);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                    self.dealloc(block, layout);
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_their_requests_with_at_most_an_eighth_to_spare() {
        assert_eq!(class_of(MIN_CACHED_BYTES - 1), None);
        let mut previous = (0, 0);
        let mut size = MIN_CACHED_BYTES;
        while size < 1 << 40 {
            let (class, rounded) = class_of(size).unwrap();
            assert!(
                rounded >= size && rounded - size <= size / 8,
                "{size} -> {rounded}"
            );
            assert_eq!(class_size(class), rounded, "class {class}");
            assert!(
                class >= previous.0 && rounded >= previous.1,
                "monotone at {size}"
            );
            // Every size inside a class maps to that class.
            assert_eq!(class_of(rounded), Some((class, rounded)));
            previous = (class, rounded);
            size = size + size / 13 + 1;
        }
        assert_eq!(class_of(MIN_CACHED_BYTES), Some((0, MIN_CACHED_BYTES)));
        assert_eq!(class_of(MIN_CACHED_BYTES + 1).unwrap().0, 1);
    }

    #[test]
    fn a_freed_block_is_handed_out_again_zeroed_when_asked() {
        let cache = BlockCache::new();
        let layout = Layout::from_size_align(3 << 20, 16).unwrap();
        unsafe {
            let first = cache.alloc(layout);
            ptr::write_bytes(first, 0xAB, layout.size());
            cache.dealloc(first, layout);
            assert_eq!(cache.stats().held_bytes, class_of(layout.size()).unwrap().1);
            // A slightly different size in the same class takes the same block.
            let smaller = Layout::from_size_align(layout.size() - 1000, 8).unwrap();
            let second = cache.alloc_zeroed(smaller);
            assert_eq!(second, first);
            let bytes = std::slice::from_raw_parts(second, smaller.size());
            assert!(
                bytes.iter().all(|&b| b == 0),
                "a reused block must be zeroed"
            );
            assert_eq!(
                cache.stats(),
                CacheStats {
                    hits: 1,
                    misses: 1,
                    held_bytes: 0
                }
            );
            cache.dealloc(second, smaller);
        }
        cache.release_all();
        assert_eq!(cache.stats().held_bytes, 0);
    }

    #[test]
    fn the_limit_bounds_what_is_held() {
        let cache = BlockCache::new();
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        cache.set_limit_bytes(2 << 20);
        unsafe {
            let blocks: Vec<_> = (0..3).map(|_| cache.alloc(layout)).collect();
            assert!(blocks.iter().all(|b| !b.is_null()));
            for &b in &blocks {
                cache.dealloc(b, layout);
            }
        }
        assert_eq!(
            cache.stats().held_bytes,
            2 << 20,
            "the third block goes back"
        );
        cache.set_limit_bytes(0);
        assert_eq!(
            cache.stats().held_bytes,
            0,
            "a lower limit releases what is held"
        );
        unsafe {
            let b = cache.alloc(layout);
            cache.dealloc(b, layout);
        }
        assert_eq!(cache.stats().held_bytes, 0, "limit 0 caches nothing");
    }

    #[test]
    fn realloc_keeps_contents_across_classes_and_the_block_within_one() {
        let cache = BlockCache::new();
        unsafe {
            let small = Layout::from_size_align(1000, 8).unwrap();
            let mut block = cache.alloc(small);
            for i in 0..1000 {
                *block.add(i) = i as u8;
            }
            // Small -> cached -> same class -> larger class -> small again.
            let mut layout = small;
            for new_size in [(1 << 20) + 100, (1 << 20) + 5000, 5 << 20, 999] {
                let before = block;
                block = cache.realloc(block, layout, new_size);
                assert!(!block.is_null());
                if new_size == (1 << 20) + 5000 {
                    assert_eq!(block, before, "within a class the block stays");
                }
                layout = Layout::from_size_align(new_size, 8).unwrap();
                for i in 0..999 {
                    assert_eq!(
                        *block.add(i),
                        i as u8,
                        "byte {i} after realloc to {new_size}"
                    );
                }
            }
            cache.dealloc(block, layout);
        }
        cache.release_all();
    }

    #[test]
    fn alignment_above_malloc_s_bypasses_the_cache() {
        let cache = BlockCache::new();
        for align in [64, 4096, 1 << 16] {
            let layout = Layout::from_size_align(1 << 20, align).unwrap();
            unsafe {
                let b = cache.alloc(layout);
                assert_eq!(b as usize % align, 0);
                cache.dealloc(b, layout);
            }
        }
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 0,
                misses: 0,
                held_bytes: 0
            }
        );
    }

    #[test]
    fn threads_share_the_cache_without_losing_blocks() {
        static CACHE: BlockCache = BlockCache::new();
        let layout = Layout::from_size_align(512 << 10, 8).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                s.spawn(move || unsafe {
                    for _ in 0..200 {
                        let b = CACHE.alloc(layout);
                        ptr::write_bytes(b, t, layout.size());
                        assert!(std::slice::from_raw_parts(b, layout.size())
                            .iter()
                            .all(|&x| x == t));
                        CACHE.dealloc(b, layout);
                    }
                });
            }
        });
        let stats = CACHE.stats();
        assert_eq!(stats.hits + stats.misses, 800);
        assert!(
            stats.misses <= 4,
            "at most one fresh block per thread: {stats:?}"
        );
        assert_eq!(stats.held_bytes, stats.misses as usize * layout.size());
        CACHE.release_all();
    }
}
