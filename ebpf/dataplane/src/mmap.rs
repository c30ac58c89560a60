//! Direct access to `BPF_F_MMAPABLE` array maps. Writing a service's backend and Maglev ranges
//! through a mapping costs a memcpy instead of one syscall per element, which is what keeps
//! programming 100,000 services fast.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
};

/// A shared mapping of an array map whose elements are `T` (8-byte aligned and sized, as the
/// kernel lays array elements out).
pub struct MmapArray<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
    _t: PhantomData<T>,
}

// SAFETY: the mapping is plain memory shared with the kernel; access goes through &self/&mut self.
unsafe impl<T: Send> Send for MmapArray<T> {}

impl<T: Copy> MmapArray<T> {
    /// Maps `len` elements of the array map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: u32) -> io::Result<Self> {
        const {
            assert!(
                size_of::<T>().is_multiple_of(8),
                "array elements are 8-byte multiples"
            )
        };
        let bytes = (len as usize * size_of::<T>()).next_multiple_of(page_size());
        // SAFETY: mapping a bpf map fd; the kernel checks the size against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            len: len as usize,
            bytes,
            _t: PhantomData,
        })
    }

    /// Elements in the array.
    pub fn len(&self) -> u32 {
        self.len as u32
    }

    pub fn read(&self, start: u32, count: u32) -> &[T] {
        let (start, count) = self.bounds(start, count);
        // SAFETY: in bounds of the mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), count) }
    }

    pub fn write(&mut self, start: u32, values: &[T]) {
        let (start, count) = self.bounds(start, values.len() as u32);
        // SAFETY: in bounds of the mapping. The kernel may read these elements concurrently
        // only if they belong to a published range, and callers only write unpublished ranges.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.as_ptr().add(start), count)
        };
    }

    fn bounds(&self, start: u32, count: u32) -> (usize, usize) {
        let (start, count) = (start as usize, count as usize);
        assert!(
            start + count <= self.len,
            "range {start}+{count} outside an array of {}",
            self.len
        );
        (start, count)
    }
}

impl<T> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
