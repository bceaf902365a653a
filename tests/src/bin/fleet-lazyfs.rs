//! A FUSE file system that keeps everything in a simulated disk
//! (`fleet_api::storage::SimDisk`) and loses, on command, what was not
//! synced: the process-level power-cut test runs the real hub binary on it.
//! LazyFS-style; the same fault model as the seeded torture tests.
//!
//! `fleet-lazyfs MOUNTPOINT`, then on stdin: `cut SEED` (the power fails:
//! only synced contents and synced directory entries are sure to stay; the
//! answer says what was lost), `quit`. Contents go straight to the disk
//! model (direct I/O, no kernel caching), so `fsync`/`fdatasync` and a
//! directory's `fsync` reach it.

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime};

use fleet_api::storage::{NodeInfo, NodeKind, SimDisk};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};
use rand::SeedableRng;

/// Nothing is cached by the kernel: after a cut, names and sizes are asked
/// again.
const TTL: Duration = Duration::ZERO;

struct LazyFs {
    disk: SimDisk,
}

/// FUSE node numbers start at 1 (the root); the disk's at 0.
fn ino(id: u64) -> INodeNo {
    INodeNo(id + 1)
}

fn id(ino: INodeNo) -> u64 {
    ino.0.saturating_sub(1)
}

fn attr(n: NodeInfo) -> FileAttr {
    let (kind, perm) = match n.kind {
        NodeKind::File => (FileType::RegularFile, 0o644),
        NodeKind::Dir => (FileType::Directory, 0o755),
    };
    FileAttr {
        ino: ino(n.id),
        size: n.len,
        blocks: n.len.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &std::io::Error) -> Errno {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => Errno::ENOENT,
        AlreadyExists => Errno::EEXIST,
        NotADirectory => Errno::ENOTDIR,
        IsADirectory => Errno::EISDIR,
        DirectoryNotEmpty => Errno::ENOTEMPTY,
        _ => Errno::EIO,
    }
}

fn name(n: &OsStr) -> Result<&str, Errno> {
    n.to_str().ok_or(Errno::EINVAL)
}

impl LazyFs {
    fn reply_attr(&self, i: INodeNo, reply: ReplyAttr) {
        match self.disk.node(id(i)) {
            Some(node) => reply.attr(&TTL, &attr(node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// `fsync` of a file or a directory: what it holds becomes durable.
    fn sync(&self, i: INodeNo, reply: ReplyEmpty) {
        match self.disk.sync_node(id(i)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn make(&self, parent: INodeNo, n: &OsStr, kind: NodeKind) -> Result<NodeInfo, Errno> {
        self.disk
            .create(id(parent), name(n)?, kind)
            .map_err(|e| errno(&e))
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        match name(n).ok().and_then(|n| self.disk.lookup(id(parent), n)) {
            Some(node) => reply.entry(&TTL, &attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(i, reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        i: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(len) = size
            && let Err(e) = self.disk.set_len_node(id(i), len)
        {
            return reply.error(errno(&e));
        }
        self.reply_attr(i, reply);
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.make(parent, n, NodeKind::File) {
            Ok(node) => reply.entry(&TTL, &attr(node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make(parent, n, NodeKind::Dir) {
            Ok(node) => reply.entry(&TTL, &attr(node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match name(n) {
            Ok(n) => match self.disk.unlink(id(parent), n) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        self.unlink(req, parent, n, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Ok(n), Ok(new_name)) = (name(n), name(new_name)) else {
            return reply.error(Errno::EINVAL);
        };
        match self
            .disk
            .rename_node(id(parent), n, id(new_parent), new_name)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.disk.node(id(i)).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & libc_o_trunc() != 0
            && let Err(e) = self.disk.set_len_node(id(i), 0)
        {
            return reply.error(errno(&e));
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(parent, n, NodeKind::File) {
            Ok(node) => reply.created(
                &TTL,
                &attr(node),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.disk.read_node(id(i), offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.disk.write_node(id(i), offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(i, reply);
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.node(id(i)) {
            Some(n) if n.kind == NodeKind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.disk.entries(id(i)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let all = [
            (".".to_string(), i, FileType::Directory),
            ("..".to_string(), i, FileType::Directory),
        ]
        .into_iter()
        .chain(entries.into_iter().map(|(n, node)| {
            let kind = match node.kind {
                NodeKind::File => FileType::RegularFile,
                NodeKind::Dir => FileType::Directory,
            };
            (n, ino(node.id), kind)
        }));
        for (k, (n, node, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(node, (k + 1) as u64, kind, n) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(i, reply);
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

/// `O_TRUNC` on Linux (fuser passes the open(2) flags through).
const fn libc_o_trunc() -> i32 {
    0o1000
}

fn main() -> std::process::ExitCode {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: fleet-lazyfs MOUNTPOINT (then `cut SEED` or `quit` on stdin)");
        return std::process::ExitCode::FAILURE;
    };
    let disk = SimDisk::new();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("fleet-lazyfs".into()),
        MountOption::AutoUnmount,
    ];
    config.acl = fuser::SessionACL::All;
    let session = match fuser::spawn_mount2(LazyFs { disk: disk.clone() }, &mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "fleet-lazyfs: cannot mount {}: {e}",
                mountpoint.to_string_lossy()
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "mounted");
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|s| s.parse::<u64>().ok()),
        ) {
            (Some("cut"), Some(seed)) => {
                let report = disk.power_cut(&mut rand::rngs::StdRng::seed_from_u64(seed));
                let _ = writeln!(
                    out,
                    "cut dropped={} kept={} torn={}",
                    report.dropped, report.kept, report.torn
                );
            }
            (Some("quit"), _) => break,
            _ => {
                let _ = writeln!(out, "error: expected `cut SEED` or `quit`");
            }
        }
        let _ = out.flush();
    }
    drop(session);
    std::process::ExitCode::SUCCESS
}
