//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what a thread freed in that thread's arena for
//! reuse, and gives back only the top of each heap. After a burst (a drop's
//! first minute, a snapshot's encoding, an archive sweep) the freed pages
//! stay resident, so over days RSS follows the peaks rather than the live
//! heap: `cargo bench --bench soak` showed RSS at twice the live heap after
//! 1,000,000 orders. [`release_free_memory`] returns every whole free page
//! of every arena (`malloc_trim(0)`); the supervisor calls it every
//! [`MEMORY_TRIM_EVERY_MS`](crate::limits::MEMORY_TRIM_EVERY_MS), off the async workers.

/// Returns the allocator's free pages to the system; whether any went.
/// Does nothing with an allocator other than glibc's.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers; it walks glibc's own free
        // lists under each arena's lock.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
