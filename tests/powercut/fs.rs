//! A power-cut file system for tests (in the spirit of LazyFS): a FUSE file
//! system, mounted over a test's temp dir, that keeps apart what is durable
//! from what is only written, and can forget the latter on command.
//!
//! # The model (strict POSIX durability)
//!
//! Everything lives in memory (`model.rs`). Every inode has a durable layer and,
//! above it, an ordered log of volatile operations:
//!
//! - A regular file has `durable` bytes and a log of writes and truncates
//!   made since its last `fsync`/`fdatasync` (both make data and size durable;
//!   the difference is metadata we do not model). `live` is `durable` with the
//!   log applied: what reads see.
//! - A directory has `durable` entries and a log of entry changes (link,
//!   unlink, rename within it) made since its last `fsync` of THAT directory.
//!   A new file is durable only once its data is fsynced AND its entry is:
//!   nothing like ext4's ordering of data before metadata is assumed. A rename
//!   between two directories is an unlink in one log and a link in the other,
//!   each made durable by its own directory's fsync.
//!
//! An `fsync` makes durable the operations that came before it (by a global
//! sequence number), not those that raced in after.
//!
//! # Power
//!
//! - [`PowerCutFs::freeze`]: the power is gone. Every later operation fails
//!   with `EIO`, so nothing more becomes durable; a stalled fsync wakes and
//!   fails. Call it before SIGKILLing the process under test.
//! - [`PowerCutFs::cut`]: keeps only what the chosen [`CutMode`] lets survive
//!   (each log's durable prefix, maybe a random prefix of its volatile part,
//!   maybe a torn write), drops inodes no durable entry reaches, then powers
//!   back on. File handles from before the cut fail with `EIO`.
//! - [`PowerCutFs::stall_fsync`]: a stalled disk. While on, fsync, fdatasync
//!   and fsyncdir wait (in a thread of their own, so the rest of the file
//!   system goes on) until it is turned off, the power goes, or
//!   [`STALL_MAX`] passes.
//!
//! # Kernel caches
//!
//! The kernel must never answer from what it cached before a cut: every open
//! uses `FOPEN_DIRECT_IO` (no page cache, so no writeback cache either, which
//! fuser does not ask for), and entries and attributes have a zero TTL, so
//! every path walk and `stat` comes back here. Inode numbers are never
//! reused, and survivors keep theirs across a cut. [`PowerCutFs::remount`]
//! also exists (a clean unmount and mount over the same state).
//!
//! # Never
//!
//! The file system thread never panics on what a caller sends (every error is
//! an errno) and never blocks on a stalled fsync. Memory is bounded:
//! `VOLATILE_BYTES_MAX` of unsynced writes in all, `FILE_BYTES_MAX` per file
//! (in `model.rs`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

#[path = "model.rs"]
mod model;

use model::{
    AttrChange, BLOCK_BYTES, Body, FILE_BYTES_MAX, FileOp, Inner, NAME_BYTES_MAX,
    VOLATILE_BYTES_MAX,
};
pub use model::{CutMode, CutReport};

/// Entry and attribute TTL: zero, so the kernel asks again every time and
/// cannot show a pre-cut view.
const TTL: Duration = Duration::ZERO;
/// How long a stalled fsync waits at most before it fails with `EIO`, so a
/// test that forgets to release it cannot hang.
pub const STALL_MAX: Duration = Duration::from_secs(120);
/// How long a remount waits for the files still open to be released.
const RELEASE_WAIT_MAX: Duration = Duration::from_secs(10);
/// The mount's source name is this and the pid, so a later run can find and
/// lazily unmount the mounts of a test process that died.
const FS_NAME_PREFIX: &str = "powercut-";

/// A mounted power-cut file system. Dropping it unmounts (lazily if busy).
pub struct PowerCutFs {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    session: Option<BackgroundSession>,
}

impl PowerCutFs {
    /// Mounts an empty file system over `mountpoint` (an existing, empty
    /// dir). First unmounts what earlier test processes that died left.
    ///
    /// # Errors
    /// When the mount fails (no `/dev/fuse`, no permission).
    pub fn mount(mountpoint: &Path) -> std::io::Result<PowerCutFs> {
        clean_stale_mounts();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::new()),
            power: Condvar::new(),
        });
        let session = spawn_session(&shared, mountpoint)?;
        Ok(PowerCutFs {
            mountpoint: mountpoint.to_path_buf(),
            shared,
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power is gone: every later operation fails with `EIO` until
    /// [`cut`](Self::cut).
    pub fn freeze(&self) {
        self.shared.lock().frozen = true;
        self.shared.power.notify_all();
    }

    /// While `on`, fsync, fdatasync and fsyncdir wait.
    pub fn stall_fsync(&self, on: bool) {
        self.shared.lock().stalled = on;
        self.shared.power.notify_all();
    }

    /// Drops the volatile layer as `mode` says (random choices from `seed`),
    /// then powers back on: a process started now sees only what survived.
    pub fn cut(&self, mode: CutMode, seed: u64) -> CutReport {
        let report = self.shared.lock().cut(mode, seed);
        self.shared.power.notify_all();
        report
    }

    /// A clean unmount and a new mount over the same state (volatile layer
    /// included): the kernel forgets every inode and cached entry.
    ///
    /// # Errors
    /// When the unmount fails (a file is still open) or the mount does.
    pub fn remount(&mut self) -> std::io::Result<()> {
        // A process's close() returns before the kernel's release reaches
        // us (and sled's own threads close their files a moment after the
        // database is dropped): wait for every file to be released.
        self.wait_closed(RELEASE_WAIT_MAX)?;
        if let Some(session) = self.session.take() {
            session.umount_and_join()?;
        }
        self.session = Some(spawn_session(&self.shared, &self.mountpoint)?);
        Ok(())
    }
}

impl PowerCutFs {
    fn wait_closed(&self, max: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + max;
        let mut inner = self.shared.lock();
        while inner.open_files > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    format!("{} files still open after {max:?}", inner.open_files),
                ));
            }
            inner = self
                .shared
                .power
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        // Wake stalled fsyncs so their threads end.
        self.freeze();
        if let Some(session) = self.session.take()
            && session.umount_and_join().is_err()
        {
            lazy_unmount(&self.mountpoint);
        }
    }
}

fn spawn_session(shared: &Arc<Shared>, mountpoint: &Path) -> std::io::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("{FS_NAME_PREFIX}{}", std::process::id())),
        MountOption::Subtype("powercut".to_string()),
        MountOption::NoAtime,
    ];
    config.n_threads = Some(1);
    fuser::spawn_mount(
        Fs {
            shared: Arc::clone(shared),
        },
        mountpoint,
        &config,
    )
}

/// Lazily unmounts every power-cut mount whose test process is gone.
fn clean_stale_mounts() {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in table.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mountpoint) = left.split(' ').nth(4) else {
            continue;
        };
        let mut fields = right.split(' ');
        let (Some(fstype), Some(source)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(pid) = source.strip_prefix(FS_NAME_PREFIX) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if fstype.starts_with("fuse") && !alive {
            lazy_unmount(Path::new(mountpoint));
        }
    }
}

fn lazy_unmount(mountpoint: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
}

/// The state and the condition stalled fsyncs wait on.
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled when `frozen`, `stalled`, `epoch` or `open_files` change.
    power: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while fsyncs are stalled, then makes durable what came before
    /// `upto` (if the power stayed on).
    fn stalled_sync(&self, ino: u64, upto: u64, epoch: u64) -> Result<(), Errno> {
        let deadline = Instant::now() + STALL_MAX;
        let mut inner = self.lock();
        while inner.stalled && !inner.frozen && inner.epoch == epoch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Errno::EIO);
            }
            inner = self
                .power
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if inner.frozen || inner.epoch != epoch {
            return Err(Errno::EIO);
        }
        inner.sync(ino, upto)
    }
}

/// What fuser drives: a thin shell that locks the state and replies.
struct Fs {
    shared: Arc<Shared>,
}

impl Fs {
    fn entry(&self, reply: ReplyEntry, result: Result<u64, Errno>) {
        let inner = self.shared.lock();
        match result.and_then(|ino| inner.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// fsync, fdatasync and fsyncdir: a stalled one waits in its own thread.
    fn sync(&self, ino: u64, fh: Option<FileHandle>, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let ready = inner
            .powered()
            .and_then(|()| fh.map_or(Ok(()), |fh| inner.check_handle(fh)))
            .and_then(|()| inner.node(ino).map(|_| ()));
        if let Err(e) = ready {
            return reply.error(e);
        }
        let upto = inner.seq;
        if !inner.stalled {
            return Fs::empty(reply, inner.sync(ino, upto));
        }
        let epoch = inner.epoch;
        drop(inner);
        let shared = Arc::clone(&self.shared);
        // If the thread cannot start, the dropped reply answers EIO.
        let _ = std::thread::Builder::new()
            .name("powercut-fsync".to_string())
            .spawn(move || Fs::empty(reply, shared.stalled_sync(ino, upto, epoch)));
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = {
            let inner = self.shared.lock();
            inner.powered().and_then(|()| inner.lookup(parent.0, name))
        };
        self.entry(reply, result);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = self.shared.lock();
        match inner.powered().and_then(|()| inner.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut inner = self.shared.lock();
        let result = inner.powered().and_then(|()| {
            let change = AttrChange {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            };
            inner.set_attr(ino.0, change)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = if mode & libc::S_IFMT != libc::S_IFREG {
            Err(Errno::EPERM) // regular files only
        } else {
            let mut inner = self.shared.lock();
            inner
                .powered()
                .and_then(|()| inner.make(req, parent.0, name, mode & !umask, false))
        };
        self.entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = {
            let mut inner = self.shared.lock();
            inner
                .powered()
                .and_then(|()| inner.make(req, parent.0, name, mode & !umask, true))
        };
        self.entry(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let result = {
            let mut inner = self.shared.lock();
            inner
                .powered()
                .and_then(|()| inner.link(ino.0, newparent.0, newname))
        };
        self.entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.remove(parent.0, name, false));
        Fs::empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.remove(parent.0, name, true));
        Fs::empty(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.rename(parent.0, name, newparent.0, newname, flags));
        Fs::empty(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| match inner.node(ino.0)?.body {
                Body::File(_) => {
                    inner.open_files += 1;
                    Ok(inner.open_handle())
                }
                Body::Dir(_) => Err(Errno::EISDIR),
            });
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut inner = self.shared.lock();
        let result = inner.powered().and_then(|()| {
            let ino = match inner.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) => {
                    if matches!(inner.node(ino)?.body, Body::Dir(_)) {
                        return Err(Errno::EISDIR);
                    }
                    if flags & libc::O_TRUNC != 0 {
                        inner.file_change(ino, FileOp::Truncate { len: 0 })?;
                    }
                    ino
                }
                Err(_) => inner.make(req, parent.0, name, mode & !umask, false)?,
            };
            let attr = inner.attr(ino)?;
            inner.open_files += 1;
            Ok((attr, inner.open_handle()))
        });
        match result {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.check_handle(fh))
            .and_then(|()| inner.read(ino.0, offset, size));
        match result {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.check_handle(fh))
            .and_then(|()| {
                let data = data.to_vec();
                inner.file_change(ino.0, FileOp::Write { offset, data })
            });
        match result {
            // The kernel never sends more than max_write (16 MiB), so it fits.
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Counted even without power: the kernel closes what it closes.
        let mut inner = self.shared.lock();
        inner.open_files = inner.open_files.saturating_sub(1);
        self.shared.power.notify_all();
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        Fs::empty(reply, self.shared.lock().powered());
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino.0, Some(fh), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.dir(ino.0).map(|_| ()))
            .map(|()| inner.open_handle());
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.shared.lock();
        let dir = match inner.powered().and_then(|()| inner.dir(ino.0)) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (dir.parent, FileType::Directory, OsStr::new("..")),
        ];
        let children = dir.live.iter().map(|(name, &child)| {
            let kind = match inner.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (child, kind, name.as_os_str())
        });
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (child, kind, name)) in dots.into_iter().chain(children).enumerate().skip(skip)
        {
            // The offset of an entry is where the next readdir resumes.
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino.0, None, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let inner = self.shared.lock();
        if let Err(e) = inner.powered() {
            return reply.error(e);
        }
        let blocks = FILE_BYTES_MAX / u64::from(BLOCK_BYTES) * 16;
        let free = (VOLATILE_BYTES_MAX - inner.volatile_bytes) / u64::from(BLOCK_BYTES);
        reply.statfs(
            blocks,
            free,
            free,
            1 << 20,
            1 << 20,
            BLOCK_BYTES,
            NAME_BYTES_MAX as u32,
            BLOCK_BYTES,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let inner = self.shared.lock();
        let result = inner.powered().and_then(|()| inner.node(ino.0).map(|_| ()));
        Fs::empty(reply, result);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.shared.lock();
        let result = inner
            .powered()
            .and_then(|()| inner.check_handle(fh))
            .and_then(|()| {
                if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                let size = inner.attr(ino.0)?.size;
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > size {
                    // Space is not modelled: only the size grows.
                    inner.file_change(ino.0, FileOp::Truncate { len: end })?;
                }
                Ok(())
            });
        Fs::empty(reply, result);
    }
}
