//! Starting the measured command: as the invoking user under sudo (uid, gid and their
//! groups, `HOME`/`USER`/`LOGNAME`), with `OPTIMUS_PHASE` in its environment.

use std::ffi::{CStr, CString, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

/// Whom the command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: String,
    pub home: String,
}

/// Under sudo (`SUDO_UID`/`SUDO_GID` set while running as root), the invoking user;
/// otherwise `None` (the command runs as measure does).
pub fn invoking_user() -> Result<Option<RunAs>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let (Ok(uid), Ok(gid)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID")) else {
        return Ok(None);
    };
    let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
        return Err(format!(
            "SUDO_UID={uid:?} / SUDO_GID={gid:?} are not numbers: unset them or pass --as-root"
        ));
    };
    if uid == 0 {
        return Ok(None);
    }
    let (name, home) = passwd(uid).ok_or_else(|| {
        format!(
            "uid {uid} (SUDO_UID) has no passwd entry: pass --as-root to run the command as root"
        )
    })?;
    let groups = group_list(&name, gid);
    Ok(Some(RunAs {
        uid,
        gid,
        groups,
        name,
        home,
    }))
}

fn passwd(uid: u32) -> Option<(String, String)> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pw = std::mem::MaybeUninit::<libc::passwd>::zeroed();
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into the struct and buffer we own, sized as passed.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            pw.as_mut_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: initialised by the successful call; its strings point into `buf`, alive here.
    let pw = unsafe { pw.assume_init() };
    let text = |p: *const libc::c_char| {
        (!p.is_null()).then(|| {
            // SAFETY: a NUL-terminated string from getpwuid_r, checked non-null, in `buf`.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        })
    };
    Some((
        text(pw.pw_name)?,
        text(pw.pw_dir).unwrap_or_else(|| "/".to_owned()),
    ))
}

fn group_list(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(64)];
        let mut count = n;
        // SAFETY: getgrouplist writes at most `count` entries into the buffer we own.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            return groups;
        }
        if count <= n || n > 65_536 {
            return vec![gid];
        }
        n = count;
    }
}

/// Builds the command: `argv`, `OPTIMUS_PHASE=phase_path`, and the switch to `run_as`
/// right before exec.
pub fn command(argv: &[OsString], phase_path: &Path, run_as: Option<&RunAs>) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env("OPTIMUS_PHASE", phase_path);
    if let Some(user) = run_as {
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    let ids = run_as.map(|u| (u.uid, u.gid, u.groups.clone()));
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigprocmask, setgroups, setgid, setuid) on memory
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Measure blocks the signals it reads from a signalfd; the command must get
            // them as usual (std leaves the mask as inherited).
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            for s in super::FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            if libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}
