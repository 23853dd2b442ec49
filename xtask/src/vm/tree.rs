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

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// Name, mode, rdev and contents of one entry.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Every entry up to the trailer.
    fn read_back(archive: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = cpio::NewcReader::new(rest).expect("a newc header");
            let e = reader.entry().clone();
            if e.is_trailer() {
                assert!(
                    reader.finish().unwrap().is_empty(),
                    "bytes after the trailer"
                );
                return entries;
            }
            assert_eq!((e.uid(), e.gid(), e.nlink(), e.mtime()), (0, 0, 1, 0));
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            let (name, mode, rdev) = (
                e.name().to_owned(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            entries.push((name, mode, rdev, data));
            rest = reader.finish().unwrap();
        }
    }

    #[test]
    fn cpio_has_every_node_with_parents_first() {
        let host = std::env::temp_dir().join(format!("xtask-vm-tree-{}", std::process::id()));
        std::fs::write(&host, b"from the host").unwrap();
        let mut fs = Tree::default();
        fs.file("usr/bin/tool", Source::Host(host.clone()), 0o755);
        fs.char_dev("dev/console", 5, 1);
        fs.symlink("var/run", "/run");
        fs.bytes("etc/hosts", "127.0.0.1 localhost\n", 0o644);
        fs.bytes("odd", "12345", 0o600);
        fs.dir("proc");
        let mut archive = Vec::new();
        fs.write_cpio(&mut archive).unwrap();
        std::fs::remove_file(&host).unwrap();

        assert_eq!(archive.len() % 4, 0);
        let dir = |name: &str| (name.to_owned(), 0o040755, (0, 0), Vec::new());
        let file =
            |name: &str, mode: u32, data: &[u8]| (name.to_owned(), mode, (0, 0), data.to_vec());
        assert_eq!(
            read_back(&archive),
            [
                dir("dev"),
                ("dev/console".into(), 0o020600, (5, 1), Vec::new()),
                dir("etc"),
                file("etc/hosts", 0o100644, b"127.0.0.1 localhost\n"),
                file("odd", 0o100600, b"12345"),
                dir("proc"),
                dir("usr"),
                dir("usr/bin"),
                file("usr/bin/tool", 0o100755, b"from the host"),
                dir("var"),
                file("var/run", 0o120777, b"/run"),
            ]
        );
    }
}
