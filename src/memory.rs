//! Process settings made through libc, the crate's only `unsafe` code: how
//! much memory the allocator keeps, the mode of the files the process
//! creates, and the priority of background threads. Each call is wrapped in a safe function here so that no other
//! module needs `unsafe`.
//!
//! ## The allocator's arenas
//!
//! glibc's allocator gives each thread that contends for it an arena of its
//! own, up to eight per core, and keeps what was freed in an arena for
//! reuse there. flashcore runs a dozen threads (HTTP workers, the actor
//! thread, the journal's writer and syncer, the snapshotter, sled's IO
//! threads), so the pages a burst freed (a drop's first minute, a snapshot's
//! encoding, an archive sweep) stay resident in many arenas and RSS follows
//! the peaks, not the live heap. `cargo bench --bench soak` (1,000,000
//! orders through their life, archived after 5 s) measured RSS going from
//! 255 to 496 MB while the live heap stayed at about 240 MB.
//!
//! [`limit_arenas`] caps the arenas at [`MALLOC_ARENAS_MAX`](crate::limits::MALLOC_ARENAS_MAX)
//! (the same as `MALLOC_ARENA_MAX`, which still wins when the operator sets
//! it). Periodic `malloc_trim(0)` was tried instead: RSS 184 to 315 MB over
//! the same run, but one trim held the allocator for up to 119 ms, a stall
//! a trading core cannot have.
//!
//! ## The file-creation mask
//!
//! [`restrict_new_files`] sets the umask to 0o077, so that
//! every file and directory the server creates (journal, snapshots, sled's
//! databases, the secret) is its user's alone (contract: "Authentication",
//! data at rest), including what libraries create with their own modes.

/// Caps glibc's arenas, unless `MALLOC_ARENA_MAX` is set. Call first thing
/// in `main`, before any thread starts. Does nothing with an allocator
/// other than glibc's.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = i32::try_from(crate::limits::MALLOC_ARENAS_MAX).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` takes two integers and only sets an allocator
        // parameter; called before other threads exist.
        let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// Sets the process umask to 0o077 (no permission for group or others).
/// Call first thing in `main`, before any thread starts and before anything
/// is created: the umask is process-wide. Does nothing off Unix.
pub fn restrict_new_files() {
    #[cfg(unix)]
    {
        // SAFETY: `umask` only swaps the process's file-creation mask and
        // cannot fail; it touches no memory of ours.
        let _previous = unsafe { libc::umask(0o077) };
    }
}

/// Lowers the calling thread's scheduling priority to nice 19, the lowest
/// that still runs when the CPU is busy (`SCHED_IDLE` would starve it under
/// a steady load, and a snapshot that never finishes lets the journal grow
/// without bound). For background work such as writing snapshots, which
/// must not take a core from the request path. Returns whether it took.
pub fn lower_thread_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` takes nothing and cannot fail.
        let tid = unsafe { libc::gettid() };
        let Ok(tid) = libc::id_t::try_from(tid) else {
            return false;
        };
        // SAFETY: `setpriority` on our own thread id only changes that
        // thread's nice value (a per-thread attribute on Linux); it touches
        // no memory of ours.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The process's effective user id (who owns what it creates).
#[cfg(unix)]
pub fn effective_uid() -> u32 {
    // SAFETY: `geteuid` takes nothing, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Writes `len` bytes of `file` from `offset` back to the disk and waits
/// for them, without committing the file system's metadata (Linux's
/// `sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`). A large file
/// written a slice at a time this way never holds more than a slice of
/// dirty data, so another file's `fdatasync` (the journal's) never waits for
/// it behind an ext4 commit, and it costs no commit of its own. Elsewhere:
/// `fdatasync`.
///
/// # Errors
/// The I/O error of the call.
pub fn write_back(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return file.sync_data();
        };
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: the descriptor is `file`'s own and open for the call;
        // `sync_file_range` reads no memory of ours.
        let done = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if done == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (offset, len);
        file.sync_data()
    }
}
