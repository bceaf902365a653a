//! The simulated disk by node number, for a file system server in front of
//! it (the FUSE pass-through of the process-level power-cut test): the
//! kernel names files by inode, not by path. Node 0 is the root. These calls
//! act on the live disk as the kernel does; [`SimDisk::power_cut`] applies
//! the same model as to mounts.

use std::io;

use super::{DirNode, DirOp, FileNode, FileOp, Inner, Node, ROOT, SimDisk, apply_file};

/// Whether a node is a file or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
}

/// A node and its current size (entries, for a directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u64,
    pub kind: NodeKind,
    pub len: u64,
}

fn info(inner: &Inner, id: u64) -> Option<NodeInfo> {
    match inner.nodes.get(&id)? {
        Node::File(f) => Some(NodeInfo {
            id,
            kind: NodeKind::File,
            len: f.current.len() as u64,
        }),
        Node::Dir(d) => Some(NodeInfo {
            id,
            kind: NodeKind::Dir,
            len: d.current.len() as u64,
        }),
    }
}

fn enoent() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

fn dir_mut(inner: &mut Inner, id: u64) -> io::Result<&mut DirNode> {
    match inner.nodes.get_mut(&id) {
        Some(Node::Dir(d)) => Ok(d),
        Some(Node::File(_)) => Err(io::Error::from(io::ErrorKind::NotADirectory)),
        None => Err(enoent()),
    }
}

fn file_mut(inner: &mut Inner, id: u64) -> io::Result<&mut FileNode> {
    match inner.nodes.get_mut(&id) {
        Some(Node::File(f)) => Ok(f),
        Some(Node::Dir(_)) => Err(io::Error::from(io::ErrorKind::IsADirectory)),
        None => Err(enoent()),
    }
}

impl SimDisk {
    /// The root directory's node.
    pub const ROOT: u64 = ROOT;

    /// A node, if it exists (also one no longer named anywhere).
    pub fn node(&self, id: u64) -> Option<NodeInfo> {
        info(&self.lock(), id)
    }

    /// The node `name` in directory `dir` names.
    pub fn lookup(&self, dir: u64, name: &str) -> Option<NodeInfo> {
        let inner = self.lock();
        let id = *inner.dir(dir)?.current.get(name)?;
        info(&inner, id)
    }

    /// The entries of a directory, by name.
    ///
    /// # Errors
    /// When `dir` is not a directory.
    pub fn entries(&self, dir: u64) -> io::Result<Vec<(String, NodeInfo)>> {
        let inner = self.lock();
        let d = inner.dir(dir).ok_or_else(enoent)?;
        Ok(d.current
            .iter()
            .filter_map(|(n, id)| Some((n.clone(), info(&inner, *id)?)))
            .collect())
    }

    /// Creates a file or directory `name` in `dir` (not durable until
    /// `dir` is synced).
    ///
    /// # Errors
    /// When the name exists or `dir` is not a directory.
    pub fn create(&self, dir: u64, name: &str, kind: NodeKind) -> io::Result<NodeInfo> {
        let mut inner = self.lock();
        if dir_mut(&mut inner, dir)?.current.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let id = inner.new_node(match kind {
            NodeKind::File => Node::File(FileNode::default()),
            NodeKind::Dir => Node::Dir(DirNode::default()),
        });
        inner.dir_op(dir, DirOp::Insert(name.to_string(), id));
        info(&inner, id).ok_or_else(enoent)
    }

    /// Up to `len` bytes of file `id` from `pos`.
    ///
    /// # Errors
    /// When `id` is not a file.
    pub fn read_node(&self, id: u64, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut inner = self.lock();
        let f = file_mut(&mut inner, id)?;
        let start = (pos as usize).min(f.current.len());
        let end = start.saturating_add(len).min(f.current.len());
        Ok(f.current[start..end].to_vec())
    }

    /// Writes into file `id` (not durable until synced).
    ///
    /// # Errors
    /// When `id` is not a file.
    pub fn write_node(&self, id: u64, pos: u64, data: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        let f = file_mut(&mut inner, id)?;
        let op = FileOp::Write {
            pos,
            data: data.to_vec(),
        };
        apply_file(&mut f.current, &op);
        f.pending.push(op);
        Ok(())
    }

    /// Cuts or extends file `id` (not durable until synced).
    ///
    /// # Errors
    /// When `id` is not a file.
    pub fn set_len_node(&self, id: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let f = file_mut(&mut inner, id)?;
        let op = FileOp::SetLen(len);
        apply_file(&mut f.current, &op);
        f.pending.push(op);
        Ok(())
    }

    /// Makes a file's contents, or a directory's entries, durable.
    ///
    /// # Errors
    /// When there is no such node.
    pub fn sync_node(&self, id: u64) -> io::Result<()> {
        let mut inner = self.lock();
        match inner.nodes.get_mut(&id) {
            Some(Node::File(f)) => {
                f.durable = f.current.clone();
                f.pending.clear();
            }
            Some(Node::Dir(d)) => {
                d.durable = d.current.clone();
                d.pending.clear();
            }
            None => return Err(enoent()),
        }
        Ok(())
    }

    /// Removes `name` from `dir` (a file, or an empty directory).
    ///
    /// # Errors
    /// When there is no such name, or it is a directory with entries.
    pub fn unlink(&self, dir: u64, name: &str) -> io::Result<()> {
        let mut inner = self.lock();
        let id = *dir_mut(&mut inner, dir)?
            .current
            .get(name)
            .ok_or_else(enoent)?;
        if let Some(Node::Dir(d)) = inner.nodes.get(&id)
            && !d.current.is_empty()
        {
            return Err(io::Error::from(io::ErrorKind::DirectoryNotEmpty));
        }
        inner.dir_op(dir, DirOp::Remove(name.to_string()));
        Ok(())
    }

    /// Renames `dir/name` to `new_dir/new_name`, replacing what was there.
    ///
    /// # Errors
    /// When there is no such name.
    pub fn rename_node(
        &self,
        dir: u64,
        name: &str,
        new_dir: u64,
        new_name: &str,
    ) -> io::Result<()> {
        let mut inner = self.lock();
        let id = *dir_mut(&mut inner, dir)?
            .current
            .get(name)
            .ok_or_else(enoent)?;
        dir_mut(&mut inner, new_dir)?;
        if dir == new_dir {
            inner.dir_op(
                dir,
                DirOp::Rename(name.to_string(), new_name.to_string(), id),
            );
        } else {
            inner.dir_op(new_dir, DirOp::Insert(new_name.to_string(), id));
            inner.dir_op(dir, DirOp::Remove(name.to_string()));
        }
        Ok(())
    }
}
