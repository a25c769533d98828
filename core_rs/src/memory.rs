//! Memory hints for per-arm arrays that outgrow the caches (100,000 arms: ~8 MB touched at
//! random when rewards are applied). Hints only: they never change what the code computes.

/// Starts loading the cache line holding `p` (a hint: never faults, any address is fine).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never dereferences in the Rust sense.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Reserves room for `additional` more elements and asks Linux to back the new, untouched
/// pages with 2 MiB pages when it can (transparent huge pages in `madvise` mode). Per-arm
/// arrays of 100,000 arms span ~2,000 small pages, as many as the TLB holds, so applying
/// rewards at random arms spent part of its time on page walks.
pub fn reserve_huge<T>(v: &mut Vec<T>, additional: usize) {
    v.reserve_exact(additional);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr().wrapping_add(v.len()) as usize;
        let end = v.as_ptr().wrapping_add(v.capacity()) as usize;
        let from = start.next_multiple_of(4096);
        if end >= from + HUGE {
            // SAFETY: a hint on pages this Vec owns and has not initialised; it cannot
            // change their contents or validity. A refusal (EINVAL etc.) is harmless.
            unsafe {
                libc::madvise(from as *mut libc::c_void, end - from, libc::MADV_HUGEPAGE);
            }
        }
    }
}
