//! The power-cut file system's state, apart from FUSE: every inode's
//! durable layer and its ordered log of volatile operations, what `fsync`
//! makes durable, and what a cut keeps. `fs.rs` drives it; the model is
//! explained there.
//!
//! Invariants: a file's (directory's) `live` bytes (entries) are always its
//! `durable` ones with its log applied in order; every entry names an inode
//! that exists (inodes go only at a cut, once no entry reaches them);
//! `volatile_bytes` is the sum of the logged writes' lengths.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo, RenameFlags, Request, TimeOrNow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Unsynced write bytes held in all logs together; a write past it gets
/// `ENOSPC` (tests write tens of MB between fsyncs at most).
pub const VOLATILE_BYTES_MAX: u64 = 512 << 20;
/// The largest file; a write or truncate past it gets `EFBIG`.
pub const FILE_BYTES_MAX: u64 = 1 << 30;
/// A file name's length limit, as on ext4.
pub const NAME_BYTES_MAX: usize = 255;
/// Block size reported by `stat` and `statfs`.
pub const BLOCK_BYTES: u32 = 4096;
/// Lost changes a [`CutReport`] names when shown; the rest are counted.
const LOST_SHOWN_MAX: usize = 12;

/// What survives a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Only what was fsynced.
    DropAll,
    /// Also a random prefix, per file, of its unsynced writes and truncates,
    /// and per directory of its unsynced entry changes.
    KeepRandomPrefix,
    /// Like `KeepRandomPrefix`, and the first dropped write of each file
    /// lands partly: a torn prefix of it.
    TearLastPage,
}

impl CutMode {
    /// Every mode, for tests that rotate through them.
    pub const ALL: [CutMode; 3] = [
        CutMode::DropAll,
        CutMode::KeepRandomPrefix,
        CutMode::TearLastPage,
    ];
}

/// What a cut dropped and kept, for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Unsynced file writes and truncates that survived.
    pub file_ops_kept: usize,
    /// Unsynced file writes and truncates that were lost.
    pub file_ops_dropped: usize,
    /// Unsynced directory entry changes that survived.
    pub dir_ops_kept: usize,
    /// Unsynced directory entry changes that were lost.
    pub dir_ops_dropped: usize,
    /// Writes that landed partly (counted as dropped too).
    pub torn_writes: usize,
    /// Inodes that no durable entry reaches any more, now gone.
    pub inodes_dropped: usize,
    /// What was lost, by path (as the live tree named it before the cut):
    /// `+dir/name` a creation undone, `-dir/name` a removal undone,
    /// `dir/a -> b` a rename undone, `file: k of n ops dropped` lost data.
    pub lost: Vec<String>,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "file ops kept {} dropped {} (torn {}), dir ops kept {} dropped {}, inodes dropped {}",
            self.file_ops_kept,
            self.file_ops_dropped,
            self.torn_writes,
            self.dir_ops_kept,
            self.dir_ops_dropped,
            self.inodes_dropped
        )?;
        if !self.lost.is_empty() {
            let shown: Vec<&str> = self
                .lost
                .iter()
                .take(LOST_SHOWN_MAX)
                .map(String::as_str)
                .collect();
            write!(f, "; lost: {}", shown.join(", "))?;
            if self.lost.len() > LOST_SHOWN_MAX {
                write!(f, ", and {} more", self.lost.len() - LOST_SHOWN_MAX)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    Truncate { len: u64 },
}

#[derive(Debug, Clone)]
pub enum DirOp {
    Link {
        name: OsString,
        ino: u64,
    },
    Unlink {
        name: OsString,
    },
    /// Within one directory a rename is one atomic change.
    Rename {
        from: OsString,
        to: OsString,
    },
}

pub struct FileBody {
    /// Invariant: `live` is `durable` with every op of `log` applied in order.
    pub live: Vec<u8>,
    pub durable: Vec<u8>,
    /// Unsynced ops, each with its global sequence number, oldest first.
    pub log: VecDeque<(u64, FileOp)>,
}

pub struct DirBody {
    /// Invariant: `live` is `durable` with every op of `log` applied in order.
    pub live: BTreeMap<OsString, u64>,
    pub durable: BTreeMap<OsString, u64>,
    pub log: VecDeque<(u64, DirOp)>,
    /// The directory that holds this one (live view; the root holds itself).
    pub parent: u64,
}

pub enum Body {
    File(FileBody),
    Dir(DirBody),
}

pub struct Node {
    /// Permission bits only.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub body: Body,
}

/// What a `setattr` asks to change (`None`: leave as is).
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A truncate (or extension with zeros), logged like a write.
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// The whole file system.
pub struct Inner {
    pub nodes: BTreeMap<u64, Node>,
    /// Never reused, so the kernel never mistakes one inode for another.
    pub next_ino: u64,
    /// The last sequence number given to a volatile op.
    pub seq: u64,
    /// Bytes of file writes in all logs. Invariant: <= `VOLATILE_BYTES_MAX`.
    pub volatile_bytes: u64,
    pub frozen: bool,
    pub stalled: bool,
    /// Bumped by every cut; a file handle carries the epoch it was opened in.
    pub epoch: u64,
    pub next_fh: u64,
    /// File handles opened and not yet released: the kernel refuses an
    /// unmount while any is open.
    pub open_files: u64,
}

pub const ROOT: u64 = INodeNo::ROOT.0;
/// File handles are `epoch << FH_EPOCH_SHIFT | counter`.
pub const FH_EPOCH_SHIFT: u32 = 32;

pub fn apply_file_op(bytes: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { offset, data } => write_at(bytes, *offset, data),
        // Lengths are checked against FILE_BYTES_MAX before an op is logged.
        FileOp::Truncate { len } => bytes.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

pub fn write_at(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(data.len());
    if bytes.len() < end {
        bytes.resize(end, 0); // a hole reads as zeros
    }
    bytes[start..end].copy_from_slice(data);
}

pub fn apply_dir_op(entries: &mut BTreeMap<OsString, u64>, op: &DirOp) {
    match op {
        DirOp::Link { name, ino } => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Unlink { name } => {
            entries.remove(name);
        }
        DirOp::Rename { from, to } => {
            if let Some(ino) = entries.remove(from) {
                entries.insert(to.clone(), ino);
            }
        }
    }
}

pub fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}

impl Inner {
    pub fn new() -> Inner {
        let now = SystemTime::now();
        let root = Node {
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: now,
            mtime: now,
            ctime: now,
            body: Body::Dir(DirBody {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                log: VecDeque::new(),
                parent: ROOT,
            }),
        };
        Inner {
            nodes: BTreeMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            seq: 0,
            volatile_bytes: 0,
            frozen: false,
            stalled: false,
            epoch: 0,
            next_fh: 1,
            open_files: 0,
        }
    }

    pub fn powered(&self) -> Result<(), Errno> {
        if self.frozen {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    pub fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    pub fn dir(&self, ino: u64) -> Result<&DirBody, Errno> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    pub fn dir_mut(&mut self, ino: u64) -> Result<&mut DirBody, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    pub fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        let (kind, size, nlink) = match &node.body {
            Body::File(f) => (FileType::RegularFile, f.live.len() as u64, 1),
            Body::Dir(d) => (FileType::Directory, d.live.len() as u64, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind,
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        check_name(name)?;
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    pub fn open_handle(&mut self) -> FileHandle {
        let fh = (self.epoch << FH_EPOCH_SHIFT) | (self.next_fh & ((1 << FH_EPOCH_SHIFT) - 1));
        self.next_fh += 1;
        FileHandle(fh)
    }

    /// A handle opened before the last cut is stale, like one held across a
    /// reboot.
    pub fn check_handle(&self, fh: FileHandle) -> Result<(), Errno> {
        if fh.0 >> FH_EPOCH_SHIFT != self.epoch {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Logs an entry change in `dir` and applies it to the live entries.
    pub fn dir_change(&mut self, dir: u64, op: DirOp) -> Result<(), Errno> {
        let seq = self.next_seq();
        let now = SystemTime::now();
        let node = self.node_mut(dir)?;
        node.mtime = now;
        node.ctime = now;
        let Body::Dir(d) = &mut node.body else {
            return Err(Errno::ENOTDIR);
        };
        apply_dir_op(&mut d.live, &op);
        d.log.push_back((seq, op));
        Ok(())
    }

    /// A new file or directory named `name` in `parent`.
    pub fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        perm: u32,
        dir: bool,
    ) -> Result<u64, Errno> {
        check_name(name)?;
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        let body = if dir {
            Body::Dir(DirBody {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                log: VecDeque::new(),
                parent,
            })
        } else {
            Body::File(FileBody {
                live: Vec::new(),
                durable: Vec::new(),
                log: VecDeque::new(),
            })
        };
        let node = Node {
            perm: (perm & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            atime: now,
            mtime: now,
            ctime: now,
            body,
        };
        self.nodes.insert(ino, node);
        self.dir_change(
            parent,
            DirOp::Link {
                name: name.to_os_string(),
                ino,
            },
        )?;
        Ok(ino)
    }

    /// A second name for file `ino` (a hard link): fails with `EEXIST` when
    /// the name is taken, so it can publish a file only if none is there.
    pub fn link(&mut self, ino: u64, newparent: u64, newname: &OsStr) -> Result<u64, Errno> {
        check_name(newname)?;
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(Errno::EPERM);
        }
        if self.dir(newparent)?.live.contains_key(newname) {
            return Err(Errno::EEXIST);
        }
        self.node_mut(ino)?.ctime = SystemTime::now();
        self.dir_change(
            newparent,
            DirOp::Link {
                name: newname.to_os_string(),
                ino,
            },
        )?;
        Ok(ino)
    }

    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (&self.node(ino)?.body, dir) {
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.node_mut(ino)?.ctime = SystemTime::now();
        // The inode stays until a cut: an old durable entry may still name it.
        self.dir_change(
            parent,
            DirOp::Unlink {
                name: name.to_os_string(),
            },
        )
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        check_name(newname)?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        let moving_dir = matches!(self.node(ino)?.body, Body::Dir(_));
        if let Some(&target) = self.dir(newparent)?.live.get(newname) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if target == ino {
                return Ok(());
            }
            match (&self.node(target)?.body, moving_dir) {
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if moving_dir {
            // A directory cannot move below itself.
            let mut at = newparent;
            for _ in 0..self.nodes.len() {
                if at == ino {
                    return Err(Errno::EINVAL);
                }
                if at == ROOT {
                    break;
                }
                at = self.dir(at)?.parent;
            }
            self.dir_mut(ino)?.parent = newparent;
        }
        self.node_mut(ino)?.ctime = SystemTime::now();
        if parent == newparent {
            self.dir_change(
                parent,
                DirOp::Rename {
                    from: name.to_os_string(),
                    to: newname.to_os_string(),
                },
            )
        } else {
            self.dir_change(
                parent,
                DirOp::Unlink {
                    name: name.to_os_string(),
                },
            )?;
            self.dir_change(
                newparent,
                DirOp::Link {
                    name: newname.to_os_string(),
                    ino,
                },
            )
        }
    }

    /// Logs a write or truncate of file `ino` and applies it to `live`.
    pub fn file_change(&mut self, ino: u64, op: FileOp) -> Result<(), Errno> {
        let (end, bytes) = match &op {
            FileOp::Write { offset, data } => (
                offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?,
                data.len() as u64,
            ),
            FileOp::Truncate { len } => (*len, 0),
        };
        if end > FILE_BYTES_MAX {
            return Err(Errno::EFBIG);
        }
        if self.volatile_bytes + bytes > VOLATILE_BYTES_MAX {
            return Err(Errno::ENOSPC);
        }
        let seq = self.next_seq();
        let now = SystemTime::now();
        let node = self.node_mut(ino)?;
        node.mtime = now;
        node.ctime = now;
        let Body::File(f) = &mut node.body else {
            return Err(Errno::EISDIR);
        };
        apply_file_op(&mut f.live, &op);
        f.log.push_back((seq, op));
        self.volatile_bytes += bytes;
        Ok(())
    }

    /// Makes durable the ops of `ino` (file or directory) numbered `upto` or less.
    pub fn sync(&mut self, ino: u64, upto: u64) -> Result<(), Errno> {
        let mut synced_bytes = 0;
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => {
                while f.log.front().is_some_and(|(seq, _)| *seq <= upto) {
                    let Some((_, op)) = f.log.pop_front() else {
                        break;
                    };
                    apply_file_op(&mut f.durable, &op);
                    if let FileOp::Write { data, .. } = &op {
                        synced_bytes += data.len() as u64;
                    }
                }
                if f.log.is_empty() {
                    assert_eq!(f.live.len(), f.durable.len(), "fully synced file {ino}");
                }
            }
            Body::Dir(d) => {
                while d.log.front().is_some_and(|(seq, _)| *seq <= upto) {
                    let Some((_, op)) = d.log.pop_front() else {
                        break;
                    };
                    apply_dir_op(&mut d.durable, &op);
                }
                if d.log.is_empty() {
                    assert_eq!(d.live, d.durable, "fully synced dir {ino}");
                }
            }
        }
        self.volatile_bytes -= synced_bytes;
        Ok(())
    }

    /// See [`PowerCutFs::cut`].
    pub fn cut(&mut self, mode: CutMode, seed: u64) -> CutReport {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut report = CutReport::default();
        let paths = self.live_paths();
        let path = |ino: &u64| {
            paths
                .get(ino)
                .cloned()
                .unwrap_or_else(|| format!("<unlinked inode {ino}>"))
        };
        for (ino, node) in self.nodes.iter_mut() {
            match &mut node.body {
                Body::File(f) => {
                    let n = f.log.len();
                    let keep = match mode {
                        CutMode::DropAll => 0,
                        CutMode::KeepRandomPrefix | CutMode::TearLastPage => {
                            rng.random_range(0..=n)
                        }
                    };
                    for (_, op) in f.log.iter().take(keep) {
                        apply_file_op(&mut f.durable, op);
                    }
                    if mode == CutMode::TearLastPage
                        && let Some((_, FileOp::Write { offset, data })) = f.log.get(keep)
                        && data.len() > 1
                    {
                        let torn = rng.random_range(1..data.len());
                        write_at(&mut f.durable, *offset, &data[..torn]);
                        report.torn_writes += 1;
                    }
                    report.file_ops_kept += keep;
                    report.file_ops_dropped += n - keep;
                    if keep < n {
                        report
                            .lost
                            .push(format!("{}: {} of {n} ops dropped", path(ino), n - keep));
                    }
                    f.log.clear();
                    f.live = f.durable.clone();
                }
                Body::Dir(d) => {
                    let n = d.log.len();
                    let keep = match mode {
                        CutMode::DropAll => 0,
                        CutMode::KeepRandomPrefix | CutMode::TearLastPage => {
                            rng.random_range(0..=n)
                        }
                    };
                    for (_, op) in d.log.iter().take(keep) {
                        apply_dir_op(&mut d.durable, op);
                    }
                    report.dir_ops_kept += keep;
                    report.dir_ops_dropped += n - keep;
                    let dir = path(ino);
                    for (_, op) in d.log.iter().skip(keep) {
                        report.lost.push(match op {
                            DirOp::Link { name, .. } => {
                                format!("+{dir}/{}", name.to_string_lossy())
                            }
                            DirOp::Unlink { name } => format!("-{dir}/{}", name.to_string_lossy()),
                            DirOp::Rename { from, to } => format!(
                                "{dir}/{} -> {}",
                                from.to_string_lossy(),
                                to.to_string_lossy()
                            ),
                        });
                    }
                    d.log.clear();
                    d.live = d.durable.clone();
                }
            }
        }
        report.inodes_dropped = self.collect_garbage();
        self.volatile_bytes = 0;
        self.frozen = false;
        self.epoch += 1;
        report
    }

    /// The path of every inode the live tree reaches ("" for the root).
    pub fn live_paths(&self) -> BTreeMap<u64, String> {
        let mut paths = BTreeMap::from([(ROOT, String::new())]);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let Some(Node {
                body: Body::Dir(d), ..
            }) = self.nodes.get(&dir)
            else {
                continue;
            };
            let prefix = paths.get(&dir).cloned().unwrap_or_default();
            for (name, &child) in &d.live {
                if let Entry::Vacant(slot) = paths.entry(child) {
                    slot.insert(format!("{prefix}/{}", name.to_string_lossy()));
                    queue.push_back(child);
                }
            }
        }
        paths
    }

    /// Drops every inode that no entry reaches from the root, sets each
    /// directory's parent, and returns how many inodes went.
    pub fn collect_garbage(&mut self) -> usize {
        let mut reached = BTreeSet::from([ROOT]);
        let mut queue = VecDeque::from([ROOT]);
        let mut parents: Vec<(u64, u64)> = Vec::new();
        while let Some(dir) = queue.pop_front() {
            let Some(Node {
                body: Body::Dir(d), ..
            }) = self.nodes.get(&dir)
            else {
                continue;
            };
            for &child in d.live.values() {
                assert!(
                    self.nodes.contains_key(&child),
                    "entry in dir {dir} names inode {child}, which is gone"
                );
                if reached.insert(child) {
                    queue.push_back(child);
                    parents.push((child, dir));
                }
            }
        }
        for (child, parent) in parents {
            if let Some(Node {
                body: Body::Dir(d), ..
            }) = self.nodes.get_mut(&child)
            {
                d.parent = parent;
            }
        }
        let before = self.nodes.len();
        self.nodes.retain(|ino, _| reached.contains(ino));
        before - self.nodes.len()
    }

    pub fn set_attr(&mut self, ino: u64, change: AttrChange) -> Result<FileAttr, Errno> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        if let Some(len) = size {
            self.file_change(ino, FileOp::Truncate { len })?;
        }
        let now = SystemTime::now();
        let at = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        let node = self.node_mut(ino)?;
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            node.uid = uid;
        }
        if let Some(gid) = gid {
            node.gid = gid;
        }
        if let Some(t) = atime {
            node.atime = at(t);
        }
        if let Some(t) = mtime {
            node.mtime = at(t);
        }
        node.ctime = now;
        self.attr(ino)
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        let Body::File(f) = &self.node(ino)?.body else {
            return Err(Errno::EISDIR);
        };
        let start = usize::try_from(offset).map_or(f.live.len(), |o| o.min(f.live.len()));
        let end = start.saturating_add(size as usize).min(f.live.len());
        Ok(&f.live[start..end])
    }
}
