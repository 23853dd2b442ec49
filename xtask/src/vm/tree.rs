//! The initramfs as a tree of paths, written as a newc cpio archive.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

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

    /// Writes the archive; returns its size.
    pub(super) fn write_cpio(&self, w: &mut impl std::io::Write) -> anyhow::Result<u64> {
        let mut size = 0u64;
        let mut ino = 1u32;
        let mut entry = |w: &mut dyn std::io::Write,
                         name: &str,
                         mode: u32,
                         rdev: (u32, u32),
                         data: &[u8]|
         -> std::io::Result<()> {
            let header = format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            );
            ino += 1;
            let pad = |n: usize| (4 - n % 4) % 4;
            w.write_all(header.as_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0u8; 4][..1 + pad(header.len() + name.len() + 1)])?;
            w.write_all(data)?;
            w.write_all(&[0u8; 3][..pad(data.len())])?;
            size += (header.len() + name.len() + 1 + pad(header.len() + name.len() + 1)) as u64
                + (data.len() + pad(data.len())) as u64;
            Ok(())
        };
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => entry(w, path, 0o040755, (0, 0), &[])?,
                Node::Symlink(t) => entry(w, path, 0o120777, (0, 0), t.as_bytes())?,
                Node::CharDev(ma, mi) => entry(w, path, 0o020600, (*ma, *mi), &[])?,
                Node::File(Source::Bytes(b), mode) => entry(w, path, 0o100000 | mode, (0, 0), b)?,
                Node::File(Source::Host(p), mode) => {
                    let mut data = Vec::new();
                    std::fs::File::open(p)
                        .and_then(|mut f| f.read_to_end(&mut data))
                        .with_context(|| format!("reading {}", p.display()))?;
                    entry(w, path, 0o100000 | mode, (0, 0), &data)?;
                }
            }
        }
        entry(w, "TRAILER!!!", 0, (0, 0), &[])?;
        Ok(size)
    }
}
