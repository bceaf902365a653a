//! A simulated disk on which tests cut the power.
//!
//! Every file and directory keeps what is durable apart from what is only
//! current (in the "page cache"), plus the operations in between, in order.
//! [`SimDisk::power_cut`] keeps, for each file and each directory, a random
//! prefix of those unsynced operations; the first operation it drops, when a
//! write, may still land in part, as any subset of its 512-byte sectors (a
//! torn write, not only a cut-short one). Synced contents and synced
//! directory entries always survive; a file whose name was never synced into
//! its directory vanishes with its contents, and so does a directory.
//!
//! Processes use the disk through a [`SimDisk::mount`]: a power cut ends the
//! mount, so threads of the "dead" process that still run get errors and
//! change nothing of what the next mount sees. Randomness is the caller's
//! seeded generator, so a failing seed replays exactly.
//!
//! Written here rather than taken from a crate: the fault model (what a
//! power cut keeps) is the point of the tests, and it has to match the
//! storage trait exactly.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Open, Storage, StorageFile};

const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum FileOp {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone)]
enum DirOp {
    Insert(String, u64),
    Remove(String),
    /// Within one directory: atomic.
    Rename(String, String, u64),
}

#[derive(Debug, Default)]
struct FileNode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Default)]
struct DirNode {
    durable: BTreeMap<String, u64>,
    current: BTreeMap<String, u64>,
    pending: Vec<DirOp>,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug)]
struct Inner {
    generation: u64,
    next_id: u64,
    nodes: HashMap<u64, Node>,
    /// Changing operations so far (writes, syncs, names).
    ops: u64,
    /// Cut the power when `ops` reaches this, deciding with this seed.
    armed: Option<(u64, u64)>,
    /// What the armed cut did, once it fired.
    fired: Option<CutReport>,
}

const ROOT: u64 = 0;

/// What a power cut did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// Unsynced operations that were lost.
    pub dropped: usize,
    /// Unsynced operations that survived anyway.
    pub kept: usize,
    /// Writes that landed in part.
    pub torn: usize,
}

/// The simulated disk. Clones share it.
#[derive(Debug, Clone)]
pub struct SimDisk(Arc<Mutex<Inner>>);

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

fn apply_file(bytes: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { pos, data } => write_into(bytes, *pos as usize, data),
        FileOp::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

fn write_into(bytes: &mut Vec<u8>, pos: usize, data: &[u8]) {
    let end = pos + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[pos..end].copy_from_slice(data);
}

fn apply_dir(entries: &mut BTreeMap<String, u64>, op: &DirOp) {
    match op {
        DirOp::Insert(name, id) => {
            entries.insert(name.clone(), *id);
        }
        DirOp::Remove(name) => {
            entries.remove(name);
        }
        DirOp::Rename(from, to, id) => {
            entries.remove(from);
            entries.insert(to.clone(), *id);
        }
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

fn names(path: &Path) -> io::Result<Vec<String>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(
                n.to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| io::Error::other("not UTF-8")),
            ),
            Component::RootDir | Component::CurDir => None,
            Component::ParentDir | Component::Prefix(_) => {
                Some(Err(io::Error::other("unsupported path component")))
            }
        })
        .collect()
}

impl Inner {
    fn dir(&self, id: u64) -> Option<&DirNode> {
        match self.nodes.get(&id) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, id: u64) -> Option<&mut DirNode> {
        match self.nodes.get_mut(&id) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn file_mut(&mut self, id: u64) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&id) {
            Some(Node::File(f)) => Ok(f),
            _ => Err(io::Error::other("not a file")),
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut at = ROOT;
        for name in names(path)? {
            at = *self
                .dir(at)
                .and_then(|d| d.current.get(&name))
                .ok_or_else(|| not_found(path))?;
        }
        Ok(at)
    }

    /// The directory holding `path`, and the last name.
    fn parent(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut parts = names(path)?;
        let last = parts
            .pop()
            .ok_or_else(|| io::Error::other("no file name"))?;
        let mut at = ROOT;
        for name in parts {
            at = *self
                .dir(at)
                .and_then(|d| d.current.get(&name))
                .ok_or_else(|| not_found(path))?;
        }
        if self.dir(at).is_none() {
            return Err(io::Error::other(format!(
                "{}: parent is not a directory",
                path.display()
            )));
        }
        Ok((at, last))
    }

    fn dir_op(&mut self, dir: u64, op: DirOp) {
        if let Some(d) = self.dir_mut(dir) {
            apply_dir(&mut d.current, &op);
            d.pending.push(op);
        }
    }

    /// Counts a changing operation; the armed cut fires before the
    /// operation it lands on, which then fails.
    fn tick(&mut self) -> io::Result<()> {
        self.ops += 1;
        if let Some((at, seed)) = self.armed
            && self.ops >= at
        {
            self.armed = None;
            let report = self.cut(&mut StdRng::seed_from_u64(seed));
            self.fired = Some(report);
            return Err(gone());
        }
        Ok(())
    }

    fn cut(&mut self, rng: &mut impl Rng) -> CutReport {
        self.generation += 1;
        let mut report = CutReport::default();
        let mut ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids.sort_unstable(); // HashMap order is not seeded: fix it.
        for id in ids {
            match self.nodes.get_mut(&id) {
                Some(Node::File(f)) => {
                    let keep = rng.random_range(0..=f.pending.len());
                    for op in &f.pending[..keep] {
                        apply_file(&mut f.durable, op);
                    }
                    if let Some(FileOp::Write { pos, data }) = f.pending.get(keep)
                        && rng.random_bool(0.5)
                    {
                        for (i, sector) in data.chunks(SECTOR).enumerate() {
                            if rng.random_bool(0.5) {
                                write_into(&mut f.durable, *pos as usize + i * SECTOR, sector);
                            }
                        }
                        report.torn += 1;
                    }
                    report.kept += keep;
                    report.dropped += f.pending.len() - keep;
                    f.pending.clear();
                    f.current = f.durable.clone();
                }
                Some(Node::Dir(d)) => {
                    let keep = rng.random_range(0..=d.pending.len());
                    for op in &d.pending[..keep] {
                        apply_dir(&mut d.durable, op);
                    }
                    report.kept += keep;
                    report.dropped += d.pending.len() - keep;
                    d.pending.clear();
                    d.current = d.durable.clone();
                }
                None => {}
            }
        }
        report
    }

    fn new_node(&mut self, node: Node) -> u64 {
        self.next_id += 1;
        self.nodes.insert(self.next_id, node);
        self.next_id
    }
}

impl SimDisk {
    /// An empty disk with an empty, durable root directory.
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        SimDisk(Arc::new(Mutex::new(Inner {
            generation: 0,
            next_id: ROOT,
            nodes,
            ops: 0,
            armed: None,
            fired: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk as one process sees it, until the next power cut or kill.
    pub fn mount(&self) -> Arc<dyn Storage> {
        Arc::new(Mount {
            disk: self.clone(),
            generation: self.lock().generation,
        })
    }

    /// The power fails: every mount ends, and only what was synced is sure
    /// to be there afterwards (see the module documentation).
    pub fn power_cut(&self, rng: &mut impl Rng) -> CutReport {
        let mut inner = self.lock();
        inner.armed = None;
        inner.cut(rng)
    }

    /// Cuts the power just before the `n`-th changing operation from now
    /// (a write, set_len, sync, create, rename or remove), in whichever
    /// thread makes it, deciding what survives with `seed`. That operation
    /// and every later one of the mounts then fail.
    pub fn arm_cut(&self, n: u64, seed: u64) {
        let mut inner = self.lock();
        inner.armed = Some((inner.ops + n.max(1), seed));
        inner.fired = None;
    }

    /// What the armed cut did, once it has fired.
    pub fn fired(&self) -> Option<CutReport> {
        self.lock().fired
    }

    /// Changing operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// The process dies (kill -9) but the machine stays up: every mount
    /// ends, and everything written stays (in the page cache).
    pub fn kill(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.armed = None;
    }

    /// Takes back an armed cut that has not fired.
    pub fn disarm(&self) {
        self.lock().armed = None;
    }

    /// Makes everything durable, as a clean shutdown of the machine would.
    pub fn sync_all(&self) {
        let mut inner = self.lock();
        for node in inner.nodes.values_mut() {
            match node {
                Node::File(f) => {
                    f.durable = f.current.clone();
                    f.pending.clear();
                }
                Node::Dir(d) => {
                    d.durable = d.current.clone();
                    d.pending.clear();
                }
            }
        }
    }

    /// Flips bits of a file's durable and current contents (bit rot); for
    /// tests of corruption. Returns false when there is no such file or
    /// `pos` is beyond it.
    pub fn corrupt(&self, path: &Path, pos: u64, mask: u8) -> bool {
        let mut inner = self.lock();
        let Ok(id) = inner.lookup(path) else {
            return false;
        };
        let Ok(f) = inner.file_mut(id) else {
            return false;
        };
        let pos = pos as usize;
        if pos >= f.current.len() || pos >= f.durable.len() {
            return false;
        }
        f.current[pos] ^= mask;
        f.durable[pos] ^= mask;
        true
    }
}

/// One process's view of the disk.
#[derive(Debug)]
struct Mount {
    disk: SimDisk,
    generation: u64,
}

fn gone() -> io::Error {
    io::Error::other("simulated power cut: this process's disk is gone")
}

impl Mount {
    fn lock(&self) -> io::Result<MutexGuard<'_, Inner>> {
        let inner = self.disk.lock();
        if inner.generation != self.generation {
            return Err(gone());
        }
        Ok(inner)
    }
}

#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    generation: u64,
    id: u64,
    writable: bool,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut FileNode) -> io::Result<T>) -> io::Result<T> {
        let mut inner = self.disk.lock();
        if inner.generation != self.generation {
            return Err(gone());
        }
        f(inner.file_mut(self.id)?)
    }

    /// [`Self::with`] for an operation that changes the disk.
    fn changing<T>(&self, f: impl FnOnce(&mut FileNode) -> io::Result<T>) -> io::Result<T> {
        let mut inner = self.disk.lock();
        if inner.generation != self.generation {
            return Err(gone());
        }
        inner.tick()?;
        f(inner.file_mut(self.id)?)
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only",
            ))
        }
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.with(|f| {
            let pos = (pos as usize).min(f.current.len());
            let n = buf.len().min(f.current.len() - pos);
            buf[..n].copy_from_slice(&f.current[pos..pos + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.writable()?;
        self.changing(|f| {
            let op = FileOp::Write {
                pos,
                data: buf.to_vec(),
            };
            apply_file(&mut f.current, &op);
            f.pending.push(op);
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.changing(|f| {
            let op = FileOp::SetLen(len);
            apply_file(&mut f.current, &op);
            f.pending.push(op);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.changing(|f| {
            f.durable = f.current.clone();
            f.pending.clear();
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|f| Ok(f.current.len() as u64))
    }
}

impl Storage for Mount {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn StorageFile>> {
        let mut inner = self.lock()?;
        let existing = inner.lookup(path).ok();
        if how != Open::Read && how != Open::ReadWrite {
            inner.tick()?;
        }
        let id = match (how, existing) {
            (Open::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists", path.display()),
                ));
            }
            (Open::Read | Open::ReadWrite, None) => return Err(not_found(path)),
            (_, Some(id)) => {
                inner.file_mut(id)?;
                if how == Open::Truncate {
                    let f = inner.file_mut(id)?;
                    let op = FileOp::SetLen(0);
                    apply_file(&mut f.current, &op);
                    f.pending.push(op);
                }
                id
            }
            (Open::CreateNew | Open::Truncate, None) => {
                let (dir, name) = inner.parent(path)?;
                let id = inner.new_node(Node::File(FileNode::default()));
                inner.dir_op(dir, DirOp::Insert(name, id));
                id
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.disk.clone(),
            generation: self.generation,
            id,
            writable: how != Open::Read,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut inner = self.lock()?;
        let id = inner.lookup(path)?;
        Ok(inner.file_mut(id)?.current.clone())
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().is_ok_and(|inner| inner.lookup(path).is_ok())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.lock()?;
        if inner.lookup(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", path.display()),
            ));
        }
        inner.tick()?;
        let (dir, name) = inner.parent(path)?;
        let id = inner.new_node(Node::Dir(DirNode::default()));
        inner.dir_op(dir, DirOp::Insert(name, id));
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let inner = self.lock()?;
        let id = inner.lookup(dir)?;
        let d = inner
            .dir(id)
            .ok_or_else(|| io::Error::other(format!("{}: not a directory", dir.display())))?;
        Ok(d.current.keys().cloned().collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut inner = self.lock()?;
        inner.tick()?;
        let id = inner.lookup(from)?;
        let (from_dir, from_name) = inner.parent(from)?;
        let (to_dir, to_name) = inner.parent(to)?;
        if from_dir == to_dir {
            inner.dir_op(from_dir, DirOp::Rename(from_name, to_name, id));
        } else {
            inner.dir_op(to_dir, DirOp::Insert(to_name, id));
            inner.dir_op(from_dir, DirOp::Remove(from_name));
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.lock()?;
        inner.tick()?;
        let id = inner.lookup(path)?;
        inner.file_mut(id)?;
        let (dir, name) = inner.parent(path)?;
        inner.dir_op(dir, DirOp::Remove(name));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut inner = self.lock()?;
        inner.tick()?;
        let id = inner.lookup(dir)?;
        let d = inner
            .dir_mut(id)
            .ok_or_else(|| io::Error::other(format!("{}: not a directory", dir.display())))?;
        d.durable = d.current.clone();
        d.pending.clear();
        Ok(())
    }

    fn age(&self, path: &Path) -> io::Result<std::time::Duration> {
        // The simulated disk keeps no clock: files are always new, so age
        // based retention never deletes on it.
        self.lock()?.lookup(path)?;
        Ok(std::time::Duration::ZERO)
    }
}

mod inodes;
pub use inodes::{NodeInfo, NodeKind};
