//! The file operations behind every durable structure (the hub's event log,
//! its role and de-dup state, the agent's outbox), as a small trait: the real
//! file system in production, and a simulated disk ([`SimDisk`]) on which
//! tests cut the power.
//!
//! The trait is deliberately narrow — only what durable code needs — so that
//! the simulated disk can model exactly what a power cut may keep: contents
//! that were synced with [`StorageFile::sync_data`] and directory entries
//! that were synced with [`Storage::sync_dir`] survive; anything else may
//! survive in part or not at all.

mod real;
mod sim;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use real::RealStorage;
pub use sim::{CutReport, NodeInfo, NodeKind, SimDisk};

/// How [`Storage::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// An existing file, to read.
    Read,
    /// An existing file, to read and write.
    ReadWrite,
    /// A new file; fails if the name exists.
    CreateNew,
    /// A file emptied or created.
    Truncate,
}

/// One open file. Positional reads and writes only: no cursor to share.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Reads into `buf` from `pos`; fewer bytes at the end of the file.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `pos` (not durable until [`Self::sync_data`]).
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// Cuts or extends the file (not durable until [`Self::sync_data`]).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the contents and length durable (not the file's name: see
    /// [`Storage::sync_dir`]).
    fn sync_data(&self) -> io::Result<()>;
    /// The current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The file system as durable code sees it.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens `path` as `how` says.
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn StorageFile>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether `path` names a file or directory.
    fn exists(&self, path: &Path) -> bool;
    /// Creates one directory (its parent must exist); not durable until its
    /// parent is synced.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// The names in a directory, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Renames within or across directories (durable when both are synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (durable when its directory is synced).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of a directory durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// How long ago a file was last written, when known.
    fn age(&self, path: &Path) -> io::Result<std::time::Duration>;
}

/// The real file system.
pub fn real() -> Arc<dyn Storage> {
    Arc::new(RealStorage)
}

/// Creates `dir` and any missing parents so that they survive a power cut:
/// each new directory's entry is synced into its parent, and so is `dir`'s
/// even when it was there (a process that made it may have died before
/// syncing it).
///
/// # Errors
/// When a directory cannot be created or synced.
pub fn create_dir_durable(fs: &dyn Storage, dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !fs.exists(d))
        .collect();
    for d in missing.iter().rev() {
        match fs.create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, d)),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(|e| with_path(e, parent))?;
        }
    }
    if missing.is_empty()
        && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
    {
        fs.sync_dir(parent).map_err(|e| with_path(e, parent))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably: a synced temporary
/// file renamed over it, then the directory synced. After a power cut the
/// file holds either the old or the new bytes, never a mix.
///
/// # Errors
/// When any step fails (the old contents are then still in place).
pub fn replace_durable(fs: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let f = fs
        .open(&tmp, Open::Truncate)
        .map_err(|e| with_path(e, &tmp))?;
    f.write_all_at(bytes, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| with_path(e, &tmp))?;
    drop(f);
    fs.rename(&tmp, path).map_err(|e| with_path(e, path))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs.sync_dir(dir).map_err(|e| with_path(e, dir))?;
    }
    Ok(())
}

/// Writes a new file durably (contents synced, then its directory).
///
/// # Errors
/// When any step fails.
pub fn write_new_durable(fs: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = fs
        .open(path, Open::Truncate)
        .map_err(|e| with_path(e, path))?;
    f.write_all_at(bytes, 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| with_path(e, path))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs.sync_dir(dir).map_err(|e| with_path(e, dir))?;
    }
    Ok(())
}

/// Removes a file if it is there.
///
/// # Errors
/// When it is there and cannot be removed.
pub fn remove_if_present(fs: &dyn Storage, path: &Path) -> io::Result<()> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(with_path(e, path)),
    }
}

/// `e` with the path it concerns in its message.
pub fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
