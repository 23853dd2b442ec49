//! The initramfs as a tree of paths, written as a newc cpio archive.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use cpio::NewcBuilder;

pub(super) enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

enum Node {
    Dir,
    File(Source, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// The initramfs as a path-sorted tree (parents before children), written as a newc cpio.
#[derive(Default)]
pub(super) struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            self.nodes
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            p = dir.parent();
        }
    }
    fn insert(&mut self, path: &str, node: Node) {
        self.parents(path);
        self.nodes.insert(path.to_owned(), node);
    }
    pub(super) fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }
    pub(super) fn file(&mut self, path: &str, src: Source, mode: u32) {
        self.insert(path, Node::File(src, mode));
    }
    pub(super) fn bytes(&mut self, path: &str, content: &str, mode: u32) {
        self.file(path, Source::Bytes(content.as_bytes().to_vec()), mode);
    }
    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_owned()));
    }
    pub(super) fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Node::CharDev(major, minor));
    }

    /// Writes the archive: owner root, mtime 0, one link each, inodes numbered from 1.
    pub(super) fn write_cpio(&self, w: &mut impl Write) -> anyhow::Result<()> {
        for (ino, (path, node)) in (1..).zip(&self.nodes) {
            let entry = NewcBuilder::new(path).ino(ino);
            match node {
                Node::Dir => data(entry.mode(0o040755), w, &[])?,
                Node::Symlink(t) => data(entry.mode(0o120777), w, t.as_bytes())?,
                Node::CharDev(ma, mi) => {
                    let entry = entry.mode(0o020600).rdev_major(*ma).rdev_minor(*mi);
                    data(entry, w, &[])?
                }
                Node::File(Source::Bytes(b), mode) => data(entry.mode(0o100000 | mode), w, b)?,
                Node::File(Source::Host(p), mode) => host_file(entry.mode(0o100000 | mode), w, p)?,
            }
        }
        cpio::newc::trailer(w)?;
        Ok(())
    }
}

/// An entry whose contents are in memory.
fn data(entry: NewcBuilder, w: &mut impl Write, bytes: &[u8]) -> anyhow::Result<()> {
    let size = u32::try_from(bytes.len()).context("an entry over 4 GiB: too big for newc")?;
    let mut out = entry.write(w, size);
    out.write_all(bytes)?;
    out.finish()?;
    Ok(())
}

/// An entry copied from a host file, streamed rather than read into memory.
fn host_file(entry: NewcBuilder, w: &mut impl Write, path: &Path) -> anyhow::Result<()> {
    let reading = || format!("reading {}", path.display());
    let mut file = File::open(path).with_context(reading)?;
    let len = file.metadata().with_context(reading)?.len();
    let size = u32::try_from(len)
        .with_context(|| format!("{}: over 4 GiB, too big for newc", path.display()))?;
    let mut out = entry.write(w, size);
    // The crate pads an entry only when its whole declared size was written.
    if std::io::copy(&mut file, &mut out).with_context(reading)? != len {
        bail!("{} changed while it was archived", path.display());
    }
    out.finish()?;
    Ok(())
}
