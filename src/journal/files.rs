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
const WRITE_SYNC_CHUNK_BYTES: usize = 2 << 20;

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
        let mut file = options.open(&tmp)?;
        // A large file (a snapshot) goes to the disk a slice at a time: a
        // flush of hundreds of megabytes at once would make the journal's
        // next fdatasync wait behind it, and every strict answer with it.
        for chunk in bytes.chunks(WRITE_SYNC_CHUNK_BYTES) {
            file.write_all(chunk)?;
            if bytes.len() > WRITE_SYNC_CHUNK_BYTES {
                file.sync_data()?;
            }
        }
        file.sync_all()?;
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

/// A number no other call in this process gets.
fn unique_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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
}
