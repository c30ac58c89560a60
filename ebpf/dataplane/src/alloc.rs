//! Contiguous range allocation in the `BACKENDS` and `MAGLEV` arrays. A service owns one range
//! in each; replacing a service's backends allocates a new range, fills it, publishes it with
//! one service update, then frees the old one, so the kernel never sees a half-written range.
//!
//! A freed range is not reused at once: a program that read the old service value a moment
//! before the update may still index the old range, and must find the old backends there, not
//! another service's. Freed ranges wait in quarantine for [`QUARANTINE`] (far longer than any
//! program runs) before they can be allocated again.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

/// How long a freed range waits before reuse.
pub const QUARANTINE: Duration = Duration::from_secs(1);

/// Best-fit allocator over `[0, capacity)` with coalescing of freed ranges.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    capacity: u32,
    /// start -> len of every free range.
    free: BTreeMap<u32, u32>,
    /// (len, start) of every free range, for best fit.
    by_len: BTreeSet<(u32, u32)>,
    /// Freed ranges not yet reusable: (when they may be, start, len), oldest first.
    quarantined: VecDeque<(Instant, u32, u32)>,
    quarantine: Duration,
    used: u64,
}

impl RangeAllocator {
    /// An allocator whose freed ranges wait [`QUARANTINE`] before reuse.
    pub fn new(capacity: u32) -> Self {
        Self::with_quarantine(capacity, QUARANTINE)
    }

    pub fn with_quarantine(capacity: u32, quarantine: Duration) -> Self {
        let mut alloc = Self {
            capacity,
            free: BTreeMap::new(),
            by_len: BTreeSet::new(),
            quarantined: VecDeque::new(),
            quarantine,
            used: 0,
        };
        if capacity > 0 {
            alloc.insert_free(0, capacity);
        }
        alloc
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Units in use (quarantined ones included).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The start of a free range of `len` units (the smallest that fits), or `None`. When only
    /// quarantined space would fit, waits for it (at most [`QUARANTINE`]): a full map that is
    /// being emptied must not refuse what its deletions made room for.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        loop {
            if let Some(start) = self.allocate_now(len, Instant::now()) {
                return Some(start);
            }
            let &(ready, _, _) = self.quarantined.front()?;
            std::thread::sleep(ready.saturating_duration_since(Instant::now()));
        }
    }

    /// Like [`RangeAllocator::allocate`], never waiting: `None` if the free space (without the
    /// quarantined ranges ready by `now`) has no room.
    pub fn allocate_now(&mut self, len: u32, now: Instant) -> Option<u32> {
        self.reclaim(now);
        self.allocate_free(len)
    }

    /// Moves quarantined ranges whose time has come to the free space.
    fn reclaim(&mut self, now: Instant) {
        while let Some(&(ready, start, len)) = self.quarantined.front() {
            if ready > now {
                break;
            }
            self.quarantined.pop_front();
            self.free_range(start, len);
        }
    }

    fn allocate_free(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let &(free_len, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start, free_len);
        if free_len > len {
            self.insert_free(start + len, free_len - len);
        }
        self.used += u64::from(len);
        Some(start)
    }

    /// Marks `[start, start + len)` as used; for rebuilding the state of adopted maps.
    /// False if any of it is not free.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some((&free_start, &free_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if end > free_start + free_len {
            return false;
        }
        self.remove_free(free_start, free_len);
        if start > free_start {
            self.insert_free(free_start, start - free_start);
        }
        if free_start + free_len > end {
            self.insert_free(end, free_start + free_len - end);
        }
        self.used += u64::from(len);
        true
    }

    /// Frees `[start, start + len)`, a range the kernel may have seen: it is reused only after
    /// the quarantine.
    pub fn release(&mut self, start: u32, len: u32) {
        self.release_at(start, len, Instant::now());
    }

    pub fn release_at(&mut self, start: u32, len: u32, now: Instant) {
        if len == 0 {
            return;
        }
        debug_assert!(start + len <= self.capacity);
        self.quarantined
            .push_back((now + self.quarantine, start, len));
        self.reclaim(now);
    }

    /// Frees a range the kernel never saw (allocated, then not published): reusable at once.
    pub fn release_unpublished(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        self.free_range(start, len);
    }

    /// Returns `[start, start + len)` to the free space, merging with its neighbours.
    fn free_range(&mut self, start: u32, len: u32) {
        self.used -= u64::from(len);
        let (mut start, mut len) = (start, len);
        if let Some((&prev_start, &prev_len)) = self.free.range(..start).next_back()
            && prev_start + prev_len == start
        {
            self.remove_free(prev_start, prev_len);
            start = prev_start;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.remove_free(start + len, next_len);
            len += next_len;
        }
        self.insert_free(start, len);
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_never_overlap_and_freed_space_coalesces() {
        let mut alloc = RangeAllocator::with_quarantine(100, Duration::ZERO);
        let a = alloc.allocate(30).expect("30 of 100 fit");
        let b = alloc.allocate(30).expect("60 of 100 fit");
        let c = alloc.allocate(40).expect("100 of 100 fit");
        let mut ranges = [(a, 30), (b, 30), (c, 40)];
        ranges.sort();
        assert_eq!(
            ranges,
            [(0, 30), (30, 30), (60, 40)],
            "ranges tile the space"
        );
        assert_eq!(alloc.allocate(1), None, "a full allocator refuses");
        alloc.release(b, 30);
        alloc.release(a, 30);
        assert_eq!(
            alloc.allocate(60),
            Some(0),
            "two freed neighbours merge into one range"
        );
        alloc.release(0, 60);
        alloc.release(c, 40);
        assert_eq!(alloc.used(), 0);
        assert_eq!(alloc.allocate(100), Some(0), "everything merges back");
    }

    #[test]
    fn best_fit_keeps_large_ranges_for_large_services() {
        let mut alloc = RangeAllocator::with_quarantine(100, Duration::ZERO);
        let small = alloc.allocate(10).unwrap();
        let _keep = alloc.allocate(10).unwrap();
        alloc.release(small, 10);
        // Free now: [0,10) and [20,100). A 5-unit range should come from the 10-unit hole.
        assert_eq!(alloc.allocate(5), Some(0));
        assert_eq!(
            alloc.allocate(80),
            Some(20),
            "the large range is still whole"
        );
    }

    #[test]
    fn a_freed_range_is_reused_only_after_the_quarantine() {
        let start = Instant::now();
        let mut alloc = RangeAllocator::with_quarantine(20, QUARANTINE);
        let old = alloc.allocate_now(10, start).unwrap();
        let _other = alloc.allocate_now(5, start).unwrap();
        alloc.release_at(old, 10, start);
        assert_eq!(alloc.used(), 15, "quarantined space still counts as used");
        let soon = start + QUARANTINE / 2;
        let next = alloc.allocate_now(5, soon);
        assert!(
            next.is_some_and(|n| n >= old + 10 || n + 5 <= old),
            "a new range never overlaps one freed a moment ago: {next:?}"
        );
        assert_eq!(
            alloc.allocate_now(10, soon),
            None,
            "only quarantined space is left"
        );
        assert_eq!(
            alloc.allocate_now(10, start + QUARANTINE),
            Some(old),
            "after the quarantine the space is reused"
        );
        // A range that was never published is reusable at once.
        let (mut alloc, now) = (RangeAllocator::with_quarantine(10, QUARANTINE), start);
        let r = alloc.allocate_now(10, now).unwrap();
        alloc.release_unpublished(r, 10);
        assert_eq!(alloc.allocate_now(10, now), Some(r));
    }

    #[test]
    fn allocation_waits_for_quarantined_space_instead_of_failing() {
        let mut alloc = RangeAllocator::with_quarantine(10, Duration::from_millis(50));
        let r = alloc.allocate(10).unwrap();
        alloc.release(r, 10);
        assert_eq!(
            alloc.allocate(10),
            Some(r),
            "the freed space serves after the wait"
        );
        assert_eq!(alloc.allocate_now(1, Instant::now()), None);
    }

    #[test]
    fn reserve_rebuilds_state_and_rejects_overlaps() {
        let mut alloc = RangeAllocator::with_quarantine(50, Duration::ZERO);
        assert!(alloc.reserve(10, 5));
        assert!(alloc.reserve(40, 10));
        assert!(
            !alloc.reserve(12, 2),
            "overlap with a reserved range is refused"
        );
        assert!(!alloc.reserve(45, 10), "a range past the end is refused");
        assert_eq!(alloc.used(), 15);
        assert_eq!(
            alloc.allocate(25),
            Some(15),
            "best fit between the reserved ranges"
        );
        assert_eq!(alloc.allocate(10), Some(0));
        assert_eq!(alloc.allocate(1), None);
    }
}
