//! Who may be a VM: the checks a process found in /proc must pass before its CPU time,
//! energy and carbon are charged to the VM its command line names.
//!
//! In: a `<proc>/<pid>` directory. Out: trusted, or the reason it is not. A command line is
//! written by whoever starts the process, so `-name` and `-uuid` prove nothing by
//! themselves; what an unprivileged user cannot forge is the executable's owner and mode
//! and the uid the process runs as. A process counts as a VM only when:
//!
//! - `<proc>/<pid>/exe` is a QEMU binary (`qemu-system-*`, `qemu-kvm`);
//! - that binary is owned by root (or [`QemuTrust::exe_owner`]) and writable by no one else
//!   (no group or other write bit), so nobody but root chose what it runs;
//! - the process runs as root or as one of the QEMU users (`--qemu-users`, by default
//!   `root,libvirt-qemu,qemu`): its real and effective uid are both in that set.
//!
//! libvirt's own QEMU processes need none of this: libvirt names their pid itself (see
//! [`super::libvirt_status`]).
//!
//! Reading another process's `exe` link needs ptrace-read access to it, which the agent
//! loses when it drops its capabilities after start (it keeps only `CAP_DAC_READ_SEARCH`).
//! Processes already running then were checked by their `exe` before the drop (the agent
//! scans once first); for a process started later whose `exe` is refused (`EACCES`), the
//! binary checked is the one its `argv[0]` names (an absolute path, else the first of
//! [`SYSTEM_BIN_DIRS`] holding that name). The uid rule, which is what keeps unprivileged
//! users out, is checked the same either way.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Where a QEMU binary named by a bare `argv[0]` is looked for when `exe` cannot be read.
pub const SYSTEM_BIN_DIRS: [&str; 5] = [
    "/usr/bin",
    "/usr/local/bin",
    "/usr/libexec",
    "/usr/sbin",
    "/bin",
];

/// The QEMU users when `--qemu-users` is not given: root, Debian's and Fedora's.
pub const DEFAULT_QEMU_USERS: &str = "root,libvirt-qemu,qemu";

/// What a process must be to count as a VM (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuTrust {
    /// uids a QEMU process may run as.
    pub qemu_uids: BTreeSet<u32>,
    /// The uid that must own the QEMU binary: 0 on a real host (tests use their own uid,
    /// since a fixture tree belongs to whoever checked it out).
    pub exe_owner: u32,
}

impl Default for QemuTrust {
    /// root only: what is always safe.
    fn default() -> Self {
        Self {
            qemu_uids: BTreeSet::from([0]),
            exe_owner: 0,
        }
    }
}

/// Why a QEMU-looking process is not trusted to be a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Untrusted {
    /// `exe` could not be read (a kernel thread, or a race with exit).
    NoExe,
    /// The executable is not named like QEMU.
    NotQemu(String),
    /// The executable belongs to another user.
    ExeOwner { exe: String, uid: u32 },
    /// The executable is writable by its group or by everyone.
    ExeWritable { exe: String, mode: u32 },
    /// The process runs as a user that is not a QEMU user.
    User { uid: u32 },
    /// `status` could not be read or holds no `Uid:` line.
    NoStatus,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Untrusted::NoExe => f.write_str("its executable cannot be read"),
            Untrusted::NotQemu(exe) => write!(f, "its executable {exe} is not QEMU"),
            Untrusted::ExeOwner { exe, uid } => {
                write!(f, "its executable {exe} is owned by uid {uid}, not root")
            }
            Untrusted::ExeWritable { exe, mode } => write!(
                f,
                "its executable {exe} is writable by group or others (mode {mode:o})"
            ),
            Untrusted::User { uid } => write!(
                f,
                "it runs as uid {uid}, which is not a QEMU user (--qemu-users)"
            ),
            Untrusted::NoStatus => f.write_str("its status cannot be read"),
        }
    }
}

impl QemuTrust {
    /// Whether the process in `pid_dir` (`<proc>/<pid>`), whose command line starts with
    /// `argv0`, is a VM by the module's rules.
    pub fn check(&self, pid_dir: &Path, argv0: &[u8]) -> Result<(), Untrusted> {
        let exe_link = pid_dir.join("exe");
        let (exe, meta) = match std::fs::read_link(&exe_link) {
            Ok(target) => {
                let text = target.to_string_lossy();
                // A binary replaced on disk (a package upgrade) reads "<path> (deleted)";
                // the process still runs the old inode, which metadata() below follows.
                let exe = text.strip_suffix(" (deleted)").unwrap_or(&text).to_owned();
                let base = exe.rsplit('/').next().unwrap_or(&exe);
                if !super::cmdline::is_qemu_binary(base.as_bytes()) {
                    return Err(Untrusted::NotQemu(exe));
                }
                // Through the magic link: the inode the process runs, even when its path
                // now names another file or lies in another mount namespace.
                let meta = std::fs::metadata(&exe_link).map_err(|_| Untrusted::NoExe)?;
                (exe, meta)
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                binary_of_argv0(argv0).ok_or(Untrusted::NoExe)?
            }
            Err(_) => return Err(Untrusted::NoExe),
        };
        if meta.uid() != self.exe_owner {
            return Err(Untrusted::ExeOwner {
                exe,
                uid: meta.uid(),
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(Untrusted::ExeWritable {
                exe,
                mode: meta.mode() & 0o7777,
            });
        }
        let status =
            std::fs::read_to_string(pid_dir.join("status")).map_err(|_| Untrusted::NoStatus)?;
        let (real, effective) = status_uids(&status).ok_or(Untrusted::NoStatus)?;
        for uid in [real, effective] {
            if !self.qemu_uids.contains(&uid) {
                return Err(Untrusted::User { uid });
            }
        }
        Ok(())
    }
}

/// The QEMU binary `argv0` names, for when `exe` cannot be read: an absolute path, or a
/// bare name looked up in [`SYSTEM_BIN_DIRS`] (never the caller's `PATH` or a relative path,
/// which the process's owner chose).
fn binary_of_argv0(argv0: &[u8]) -> Option<(String, std::fs::Metadata)> {
    let text = std::str::from_utf8(argv0).ok()?;
    if !super::cmdline::is_qemu_binary(argv0) {
        return None;
    }
    let candidates: Vec<std::path::PathBuf> = if text.starts_with('/') {
        vec![std::path::PathBuf::from(text)]
    } else if text.contains('/') {
        return None;
    } else {
        SYSTEM_BIN_DIRS
            .iter()
            .map(|d| Path::new(d).join(text))
            .collect()
    };
    candidates.into_iter().find_map(|path| {
        let meta = std::fs::metadata(&path)
            .ok()
            .filter(std::fs::Metadata::is_file)?;
        Some((path.to_string_lossy().into_owned(), meta))
    })
}

/// Real and effective uid from the `Uid:` line of `/proc/<pid>/status`.
fn status_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(str::parse::<u32>);
    Some((ids.next()?.ok()?, ids.next()?.ok()?))
}

/// Resolves `--qemu-users` (names or numeric uids, comma separated) to uids; root is always
/// included. Returns the uids and the names this host does not know (not an error: the
/// defaults name users of several distributions).
pub fn resolve_users(list: &str) -> (BTreeSet<u32>, Vec<String>) {
    let mut uids = BTreeSet::from([0]);
    let mut unknown = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name.parse::<u32>().ok().or_else(|| uid_of(name)) {
            Some(uid) => {
                uids.insert(uid);
            }
            None => unknown.push(name.to_owned()),
        }
    }
    (uids, unknown)
}

/// The uid of a user name, through NSS (`getpwnam_r`).
fn uid_of(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut pwd = std::mem::MaybeUninit::<libc::passwd>::zeroed();
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: a NUL-terminated name, a passwd struct,
    // a buffer of the length given, and the result slot; getpwnam_r writes only into them.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            pwd.as_mut_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: a non-null result means getpwnam_r filled `pwd`.
    Some(unsafe { pwd.assume_init() }.pw_uid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// A `<proc>/<pid>` with an `exe` link to `binary` (created with `mode`) and a status
    /// running as `uid`.
    fn process(dir: &Path, binary: &str, mode: u32, uid: u32) -> std::path::PathBuf {
        let bin = dir.join("bin").join(binary);
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"#!").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode)).unwrap();
        let pid_dir = dir.join("proc/42");
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::os::unix::fs::symlink(&bin, pid_dir.join("exe")).unwrap();
        std::fs::write(
            pid_dir.join("status"),
            format!("Name:\tqemu\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"),
        )
        .unwrap();
        pid_dir
    }

    fn trust() -> QemuTrust {
        QemuTrust {
            qemu_uids: BTreeSet::from([0, 64055]),
            exe_owner: euid(),
        }
    }

    #[test]
    fn a_qemu_binary_of_root_run_by_a_qemu_user_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "qemu-system-x86_64", 0o755, 64055);
        assert_eq!(trust().check(&p, b"qemu-system-x86_64"), Ok(()));
    }

    #[test]
    fn each_rule_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "python3", 0o755, 0);
        assert!(matches!(
            trust().check(&p, b"qemu-system-x86_64"),
            Err(Untrusted::NotQemu(_))
        ));

        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "qemu-system-x86_64", 0o775, 0);
        let err = trust().check(&p, b"qemu-system-x86_64").unwrap_err();
        assert!(
            matches!(err, Untrusted::ExeWritable { mode: 0o775, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mode 775"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "qemu-kvm", 0o755, 65534);
        let err = trust().check(&p, b"qemu-system-x86_64").unwrap_err();
        assert_eq!(err, Untrusted::User { uid: 65534 });
        assert!(err.to_string().contains("--qemu-users"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "qemu-system-x86_64", 0o755, 0);
        let other_owner = QemuTrust {
            exe_owner: euid() + 1,
            ..trust()
        };
        assert!(matches!(
            other_owner.check(&p, b"qemu-system-x86_64"),
            Err(Untrusted::ExeOwner { .. })
        ));

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            trust().check(dir.path(), b"qemu-system-x86_64"),
            Err(Untrusted::NoExe)
        );
    }

    #[test]
    fn argv0_names_the_binary_only_when_exe_is_refused() {
        // A system QEMU by absolute path or bare name, if this host has one.
        if let Some((path, meta)) = binary_of_argv0(b"qemu-system-x86_64") {
            assert!(path.starts_with('/'), "{path}");
            assert_eq!(meta.uid(), 0);
            assert!(binary_of_argv0(path.as_bytes()).is_some());
        }
        // Relative paths and non-QEMU names never.
        assert!(binary_of_argv0(b"./qemu-system-x86_64").is_none());
        assert!(binary_of_argv0(b"/usr/bin/python3").is_none());
        assert!(binary_of_argv0(b"/nonexistent/qemu-system-x86_64").is_none());
    }

    #[test]
    fn real_and_effective_uid_both_count() {
        assert_eq!(status_uids("Uid:\t0\t65534\t0\t0\n"), Some((0, 65534)));
        assert_eq!(status_uids("Name: x\n"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = process(dir.path(), "qemu-system-x86_64", 0o755, 0);
        std::fs::write(p.join("status"), "Uid:\t0\t65534\t0\t0\n").unwrap();
        assert_eq!(
            trust().check(&p, b"qemu-system-x86_64"),
            Err(Untrusted::User { uid: 65534 })
        );
    }

    #[test]
    fn users_resolve_by_name_or_number() {
        let (uids, unknown) = resolve_users("root, 4242,no-such-user-here,");
        assert_eq!(uids, BTreeSet::from([0, 4242]));
        assert_eq!(unknown, vec!["no-such-user-here".to_owned()]);
        let (uids, _) = resolve_users("");
        assert_eq!(uids, BTreeSet::from([0]), "root is always a QEMU user");
    }

    /// This very process: not named like QEMU, so never a VM.
    #[test]
    fn the_test_binary_itself_is_not_qemu() {
        let me = Path::new("/proc/self");
        assert!(matches!(
            QemuTrust::default().check(me, b"optimus"),
            Err(Untrusted::NotQemu(_))
        ));
    }
}
