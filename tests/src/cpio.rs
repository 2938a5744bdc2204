//! Writer of the initramfs archive format.

use std::fmt::Write as _;

use anyhow::Context;

/// Writer of the SVR4 "newc" cpio format the kernel unpacks as initramfs: per entry a
/// 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the NUL-terminated name
/// padded to 4 bytes, the data padded to 4 bytes; a `TRAILER!!!` entry ends it.
#[derive(Default)]
pub(crate) struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> anyhow::Result<()> {
        self.entry(name, libc::S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        self.entry(name, libc::S_IFREG | perm, 1, (0, 0), data)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> anyhow::Result<()> {
        self.entry(name, libc::S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub(crate) fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> anyhow::Result<()> {
        self.entry(name, libc::S_IFCHR | perm, 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> anyhow::Result<()> {
        self.next_ino += 1;
        let size = u32::try_from(data.len())
            .with_context(|| format!("cpio entry {name} is over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1)
            .with_context(|| format!("cpio entry name {name} too long"))?;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the image is reproducible
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            namesize,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            let _ = write!(header, "{field:08x}");
        }
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        // Cannot fail: empty data and a short name.
        let _ = self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;
    use crate::env::find_tool;

    #[test]
    fn newc_layout() {
        let mut cpio = Newc::default();
        cpio.dir("bin", 0o755).unwrap();
        cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        cpio.symlink("bin/sh", "busybox").unwrap();
        let out = cpio.finish();
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[..6], b"070701");
        // First header: ino 1, mode dir|0755, namesize 4 ("bin\0").
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000041ed");
        assert_eq!(&out[94..102], b"00000004");
        assert_eq!(&out[110..114], b"bin\0");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
    }

    /// The host's cpio (if installed) reads back what we wrote.
    #[test]
    fn newc_roundtrip_with_cpio() {
        if find_tool("cpio").is_none() {
            eprintln!("SKIPPED newc_roundtrip_with_cpio: no cpio on this host");
            return;
        }
        let mut cpio = Newc::default();
        cpio.dir("bin", 0o755).unwrap();
        cpio.file("bin/hello", 0o644, b"hello world").unwrap();
        cpio.symlink("bin/sh", "hello").unwrap();
        let out = crate::proc::run(
            Command::new("cpio").args(["-t", "-v"]),
            Some(&cpio.finish()),
            Duration::from_secs(10),
        )
        .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{:?}", out);
        assert!(listing.contains("bin/hello"), "{listing}");
        assert!(listing.contains("bin/sh -> hello"), "{listing}");
    }
}
