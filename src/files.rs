//! Making files and directory entries durable, the POSIX way.
//!
//! `fsync` of a file makes its contents durable, not its name: a new or
//! renamed entry survives a power cut only once its *directory* is fsynced
//! too (ext4's ordered mode is kinder, but flashcore assumes only POSIX;
//! the power-cut file system in the tests holds it to that). Everything in
//! the data dir that later state depends on (the journal directory, the
//! snapshot directory, a snapshot, the JWT secret, sled's `conf`) is made
//! durable through these helpers before anything depends on it.
//!
//! Never: rename over a file before the new contents are synced, or
//! answer anything that depends on an entry before its directory is synced.
//!
//! Also here: [`restrict_to_owner`], which takes group and other
//! permissions off the data dir and what is in it (contract:
//! "Authentication", data at rest), for a data dir an earlier build made
//! with the default umask.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most directory levels [`create_dir_durably`] creates at once: a data dir
/// path deeper than this is a mistake, not a layout.
const DIR_LEVELS_MAX: usize = 64;

/// `fsync`s a directory, making the entries in it durable.
///
/// # Errors
/// The I/O error, when the directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, durably: each directory created
/// is fsynced, and so is the parent of each (so its entry survives a power
/// cut). An existing `dir` is fsynced as it is, and its parent too, which
/// also makes an entry an earlier run created (and a cut may have kept only
/// in the page cache) durable.
///
/// # Errors
/// The I/O error of the first step that failed.
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    // Walk up to the first existing ancestor, remembering what is missing.
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut probe = Some(dir);
    while let Some(path) = probe {
        if path.as_os_str().is_empty() || path.exists() {
            break;
        }
        if missing.len() >= DIR_LEVELS_MAX {
            return Err(std::io::Error::other(format!(
                "{} is more than {DIR_LEVELS_MAX} directories below anything that exists",
                dir.display()
            )));
        }
        missing.push(path.to_path_buf());
        probe = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    sync_dir(dir)?;
    // Every created directory's entry lives in its parent; the top existing
    // ancestor's entry for the first created one too.
    let mut parents: Vec<&Path> = missing.iter().filter_map(|p| p.parent()).collect();
    if missing.is_empty() {
        parents.extend(dir.parent());
    }
    for parent in parents {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        sync_dir(parent)?;
    }
    Ok(())
}

/// How [`write_file_durably`] treats a file already at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically).
    Replace,
    /// Keep it and fail with `AlreadyExists`: two racing writers cannot
    /// both believe their bytes are the file's.
    Keep,
}

/// How much of a file [`write_file_durably`] writes before it syncs what it
/// wrote (see there).
const WRITE_SYNC_CHUNK_BYTES: usize = 1 << 20;

/// The fastest [`write_file_durably`] writes a large file: a snapshot of
/// half a million orders (about 90 MB) takes a second, and the disk keeps
/// room for the journal's syncs meanwhile.
const WRITE_BACK_BYTES_PER_S: u64 = 96 << 20;

/// Writes `bytes` to `path` atomically and durably: a temporary file beside
/// it, written and fsynced, renamed over `path` (or linked to it, with
/// [`Existing::Keep`]), then the directory fsynced. A power cut leaves
/// either the old file (or none) or the whole new one, never a torn one.
///
/// # Errors
/// The I/O error of the first step that failed (the temporary file may be
/// left behind; it is overwritten by the next attempt); `AlreadyExists`
/// with [`Existing::Keep`] when the file is there.
pub fn write_file_durably(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    existing: Existing,
) -> std::io::Result<()> {
    write_file_durably_with(path, mode, existing, &mut |out| out.write_all(bytes))
}

/// [`write_file_durably`] for a file produced as it is written: `fill`
/// writes its bytes into a [`PacedWriter`] (a snapshot is encoded straight
/// into the file, never whole in memory). A `fill` that fails leaves no
/// file at `path` (and removes the temporary one).
///
/// # Errors
/// As [`write_file_durably`], or `fill`'s error.
pub fn write_file_durably_with(
    path: &Path,
    mode: Option<u32>,
    existing: Existing,
    fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    // One writer replaces (the snapshotter, its name fixed so a crash's
    // leftover is overwritten next time); writers that keep a file may race
    // (a `token` command and a first `serve`), so each gets a name of its own.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    if existing == Existing::Keep {
        tmp_name.push(format!(".{}-{}", std::process::id(), unique_suffix()));
    }
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if let Some(mode) = mode {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let file = options.open(&tmp)?;
        let mut out = PacedWriter::new(file);
        let written = fill(&mut out).and_then(|()| out.finish());
        if let Err(error) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
        out.file.sync_all()?;
    }
    match existing {
        Existing::Replace => std::fs::rename(&tmp, path)?,
        Existing::Keep => {
            let linked = std::fs::hard_link(&tmp, path);
            std::fs::remove_file(&tmp)?;
            linked?;
        }
    }
    sync_dir(dir)
}

/// A file written a slice of [`WRITE_SYNC_CHUNK_BYTES`] at a time, each
/// slice written back and waited for before the next (`sync_file_range`: no
/// metadata commit), at most [`WRITE_BACK_BYTES_PER_S`]. ext4 (ordered
/// data) makes the journal's next fdatasync wait for every dirty block of a
/// file whose blocks were allocated in the same commit, so a snapshot
/// written whole, or synced a slice at a time with an fdatasync (a commit)
/// each, stalled every strict answer behind it. Not durable by itself: the
/// caller's fdatasync is.
pub struct PacedWriter {
    file: std::fs::File,
    /// Bytes not yet handed to the file (less than a slice).
    slice: Vec<u8>,
    /// Bytes handed to the file so far.
    offset: u64,
    started: std::time::Instant,
}

impl PacedWriter {
    fn new(file: std::fs::File) -> PacedWriter {
        PacedWriter {
            file,
            slice: Vec::new(),
            offset: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Writes the slice held, writes it back, and rests if ahead of the
    /// rate.
    fn write_slice(&mut self) -> std::io::Result<()> {
        if self.slice.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.slice)?;
        let len = self.slice.len() as u64;
        self.slice.clear();
        // Only pacing: a file system that cannot do it (FUSE, say) still
        // writes, and the final sync covers it.
        if let Err(error) = crate::memory::write_back(&self.file, self.offset, len) {
            tracing::debug!(%error, "cannot write a slice back; the final sync covers it");
        }
        self.offset += len;
        #[allow(clippy::cast_precision_loss)] // a pacing delay
        let due =
            std::time::Duration::from_secs_f64(self.offset as f64 / WRITE_BACK_BYTES_PER_S as f64);
        if let Some(early) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(early);
        }
        Ok(())
    }

    /// Hands the last bytes to the file.
    fn finish(&mut self) -> std::io::Result<()> {
        self.write_slice()
    }
}

impl Write for PacedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.slice.capacity() == 0 {
            self.slice.reserve_exact(WRITE_SYNC_CHUNK_BYTES);
        }
        let room = WRITE_SYNC_CHUNK_BYTES.saturating_sub(self.slice.len());
        let taken = buf.len().min(room);
        self.slice.extend_from_slice(&buf[..taken]);
        if self.slice.len() >= WRITE_SYNC_CHUNK_BYTES {
            self.write_slice()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Slices go out whole; `finish` writes the last one.
        Ok(())
    }
}

/// A number no other call in this process gets.
fn unique_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Most entries [`restrict_to_owner`] looks at under the data dir. The data
/// dir holds a handful of entries and sled's directories (a few dozen files
/// each); a walk past this many is in the wrong directory or a tree nobody
/// should have put there, and stops rather than run for minutes.
const RESTRICT_WALK_ENTRIES_MAX: u64 = 100_000;

/// What [`restrict_to_owner`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restricted {
    /// The directory's own mode before, when it was looser than 0700.
    pub dir_mode_was: Option<u32>,
    /// Entries under it that lost group or other permissions.
    pub entries_tightened: u64,
    /// Entries looked at (symbolic links included, never followed).
    pub entries_seen: u64,
    /// The walk stopped at [`RESTRICT_WALK_ENTRIES_MAX`] entries.
    pub capped: bool,
}

/// Takes every permission of group and others off `dir` and everything
/// under it that the server's user owns (a 0755 directory becomes 0700, a
/// 0644 file 0600; the owner's own bits and setuid, setgid and sticky stay).
/// A `dir` another user owns is left alone (with a warning), and so is
/// anything in it owned by another user. Symbolic links are neither
/// followed nor changed. `dir` goes first, so no other user can
/// swap entries under it while the walk runs. The walk is iterative and
/// stops after [`RESTRICT_WALK_ENTRIES_MAX`] entries (`capped`). Logs a
/// warning for whatever it changed. Does nothing off Unix.
///
/// # Errors
/// The I/O error of the first listing or `chmod` that failed (an entry
/// that vanished meanwhile is skipped).
pub fn restrict_to_owner(dir: &Path) -> std::io::Result<Restricted> {
    let done = restrict_to_owner_capped(dir, RESTRICT_WALK_ENTRIES_MAX)?;
    if let Some(mode) = done.dir_mode_was {
        tracing::warn!(
            dir = %dir.display(),
            mode = %format!("{mode:03o}"),
            "the data dir was open to group or others; it is now its owner's alone"
        );
    }
    if done.entries_tightened > 0 {
        tracing::warn!(
            dir = %dir.display(),
            entries = done.entries_tightened,
            "entries in the data dir were open to group or others; those permissions are removed"
        );
    }
    if done.capped {
        tracing::warn!(
            dir = %dir.display(),
            entries = done.entries_seen,
            "the data dir holds more entries than the permission walk looks at; the rest are unchecked"
        );
    }
    Ok(done)
}

#[cfg(unix)]
fn restrict_to_owner_capped(dir: &Path, entries_max: u64) -> std::io::Result<Restricted> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut done = Restricted::default();
    let me = crate::memory::effective_uid();
    let top = std::fs::metadata(dir)?;
    if top.uid() != me {
        // A volume another user owns (a mount with a group for the
        // server, say): its permissions are that owner's business, and a
        // chmod would fail. The files the server creates in it are still
        // its own (umask 077).
        tracing::warn!(
            dir = %dir.display(),
            "the data dir belongs to another user; its permissions are left as they are"
        );
        return Ok(done);
    }
    let mode = top.permissions().mode();
    if mode & 0o077 != 0 {
        // The owner's bits and setuid, setgid and sticky stay.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & !0o077))?;
        done.dir_mode_was = Some(mode & 0o7777);
    }
    let vanished = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    // Directories still to list, each already tightened.
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(listing) = pending.pop() {
        let entries = match std::fs::read_dir(&listing) {
            Ok(entries) => entries,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            if done.entries_seen >= entries_max {
                done.capped = true;
                return Ok(done);
            }
            done.entries_seen += 1;
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            // Not followed: `DirEntry::metadata` is the link's own.
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            // Only what the server's user owns: never another user's file
            // that a mistaken --data-dir happened to hold.
            if metadata.file_type().is_symlink() || metadata.uid() != me {
                continue;
            }
            let path = entry.path();
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                match std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(mode & !0o077),
                ) {
                    Ok(()) => done.entries_tightened += 1,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    assert!(done.entries_seen <= entries_max && !done.capped);
    Ok(done)
}

#[cfg(not(unix))]
fn restrict_to_owner_capped(_dir: &Path, _entries_max: u64) -> std::io::Result<Restricted> {
    Ok(Restricted::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_directories_and_writes_files_whole() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("a/b/c");
        create_dir_durably(&deep).expect("created");
        assert!(deep.is_dir());
        // Again: an existing directory is fine.
        create_dir_durably(&deep).expect("exists");
        let file = deep.join("f");
        write_file_durably(&file, b"one", Some(0o600), Existing::Keep).expect("written");
        let kept = write_file_durably(&file, b"zzz", None, Existing::Keep);
        assert_eq!(
            kept.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::AlreadyExists)
        );
        assert_eq!(std::fs::read(&file).expect("read"), b"one");
        write_file_durably(&file, b"two", None, Existing::Replace).expect("replaced");
        assert_eq!(std::fs::read(&file).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(&deep)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")], "no temp left");
    }

    #[cfg(unix)]
    #[test]
    fn restrict_to_owner_takes_group_and_other_bits_off_everything_but_links() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| {
            std::fs::symlink_metadata(p)
                .expect("exists")
                .permissions()
                .mode()
                & 0o7777
        };
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
        };
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("data");
        let sled = data.join("archive").join("blobs");
        std::fs::create_dir_all(&sled).expect("dirs");
        std::fs::write(data.join("conf"), b"x").expect("file");
        std::fs::write(sled.join("1"), b"x").expect("file");
        std::fs::write(data.join("mine"), b"x").expect("file");
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"x").expect("file");
        std::os::unix::fs::symlink(&outside, data.join("link")).expect("symlink");
        chmod(&data, 0o755);
        chmod(&data.join("archive"), 0o775);
        chmod(&sled, 0o777);
        chmod(&data.join("conf"), 0o644);
        chmod(&sled.join("1"), 0o466);
        chmod(&data.join("mine"), 0o600);
        chmod(&outside, 0o644);

        let done = restrict_to_owner(&data).expect("restricted");
        assert_eq!(done.dir_mode_was, Some(0o755));
        assert_eq!(done.entries_tightened, 4, "{done:?}");
        assert_eq!(done.entries_seen, 6, "{done:?}");
        assert!(!done.capped);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("archive")), 0o700);
        assert_eq!(mode(&sled), 0o700);
        assert_eq!(mode(&data.join("conf")), 0o600);
        assert_eq!(mode(&sled.join("1")), 0o400, "the owner's bits kept");
        assert_eq!(mode(&data.join("mine")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a link is not followed");

        let again = restrict_to_owner(&data).expect("restricted");
        assert_eq!((again.dir_mode_was, again.entries_tightened), (None, 0));

        chmod(&data.join("conf"), 0o644);
        let capped = restrict_to_owner_capped(&data, 2).expect("restricted");
        assert!(capped.capped && capped.entries_seen == 2, "{capped:?}");
    }
}
