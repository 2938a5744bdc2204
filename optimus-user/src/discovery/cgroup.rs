//! Which VM exclusively owns which memory cgroup, so that block I/O submitted by kernel threads
//! can still be attributed to a VM.
//!
//! Why: most of a VM's writes reach the disk through page-cache writeback, and writeback I/O is
//! submitted by kworker threads, not by QEMU. For such I/O the eBPF program reads the memory
//! cgroup that owns the page being written
//! (`page->memcg_data` → `mem_cgroup.css.cgroup->kn->id`). That id is the inode number of the
//! cgroup's directory in the cgroupfs that holds the memory controller: under the v1 `memory`
//! mount (e.g. `/sys/fs/cgroup/memory/...`) or, with cgroup v2, under the unified mount when
//! `memory` is in its `cgroup.controllers`.
//!
//! libvirt puts each VM's QEMU in a cgroup of its own (v1:
//! `/sys/fs/cgroup/memory/machine/qemu-1-NAME.libvirt-qemu`; v2:
//! `machine.slice/machine-qemu\x2d1\x2dNAME.scope/...`), so every page charged to that cgroup or
//! below it was dirtied by that VM. A QEMU started by hand usually shares its cgroup with other
//! processes; its pages cannot be told apart from theirs, so it is not mapped and those bytes stay
//! unattributed. A cgroup is therefore mapped only when it and all its descendants hold no process
//! but the VM's QEMU (and the kernel vhost workers it created, which older kernels move into
//! QEMU's cgroups).
//!
//! With cgroup v2 a process's memory is charged to the nearest cgroup, at or above its own, where
//! the memory controller is enabled (libvirt keeps QEMU's main thread in a threaded `emulator`
//! sub-cgroup without the memory controller), so that cgroup is the one looked up and checked.
//!
//! Cost of [`VmCgroups::refresh`]: one read of `mountinfo`, and per VM one read of
//! `<proc>/<pid>/cgroup` plus, per directory of its cgroup subtree, a `stat`, a read of
//! `cgroup.procs` and a `readdir` (a few directories per VM); VMs that share a directory
//! cost only the first read. [`VmCgroups::update`] does that for new VMs only.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::discovery::VmId;

/// Deepest sub-cgroup level walked below a VM's cgroup.
const MAX_DEPTH: usize = 8;
/// Most cgroup directories walked per VM.
const MAX_DIRS: usize = 4096;

/// Where the memory controller's cgroups are, and which VM owns which of them.
#[derive(Debug)]
pub struct VmCgroups {
    proc_root: PathBuf,
    /// The memory controller's mount, or why none was found.
    mount: Result<MemoryMount, String>,
    /// Per VM process (id, QEMU pid) looked up so far: the memory cgroup ids it exclusively
    /// owns (empty when none).
    resolved: HashMap<(VmId, u32), Vec<u64>>,
    /// Memory cgroup id (inode number of its directory) → the VM that exclusively owns it.
    owners: HashMap<u64, VmId>,
}

/// A VM and its QEMU process id.
type VmProcess = (VmId, u32);

/// Which cgroup version holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

/// The cgroupfs mount that holds the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MemoryMount {
    pub(crate) version: Version,
    /// Where it is mounted.
    pub(crate) mount_point: PathBuf,
    /// The cgroup path mounted there (mountinfo's ROOT field; `/` for a whole hierarchy).
    pub(crate) root: PathBuf,
}

impl VmCgroups {
    /// `proc_root` is normally /proc (tests pass a fixture dir). Reads nothing yet.
    pub fn new(proc_root: PathBuf) -> VmCgroups {
        VmCgroups {
            proc_root,
            mount: Err("memory cgroup controller not looked up yet".to_owned()),
            resolved: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    /// Rebuilds the map for these VMs: (id, QEMU process pid), re-reading
    /// `<proc_root>/self/mountinfo` and every VM's cgroup. The caller rate-limits it (a
    /// process that joins a VM's cgroup later unmaps the VM only at the next refresh).
    ///
    /// A VM whose cgroup cannot be read, is shared with other processes, or is the root
    /// cgroup is left unmapped (logged at debug level); the other VMs are mapped regardless.
    pub fn refresh(&mut self, vms: &[(VmId, u32)]) {
        self.resolved.clear();
        self.owners.clear();
        self.mount = find_memory_mount(&self.proc_root);
        self.update(vms);
    }

    /// Looks up only the VMs not seen since the last [`refresh`](Self::refresh) and
    /// forgets the ones gone: cheap enough for every sample. Returns whether the map
    /// changed.
    pub fn update(&mut self, vms: &[(VmId, u32)]) -> bool {
        let Ok(mount) = &self.mount else {
            let changed = !self.owners.is_empty();
            self.owners.clear();
            return changed;
        };
        let live: HashSet<&(VmId, u32)> = vms.iter().collect();
        let known = self.resolved.len();
        self.resolved.retain(|vm, _| live.contains(vm));
        if self.resolved.len() == known && self.resolved.len() == live.len() {
            return false;
        }
        let new: Vec<(&VmProcess, Result<PathBuf, String>)> = vms
            .iter()
            .filter(|vm| !self.resolved.contains_key(*vm))
            .map(|vm| (vm, vm_cgroup_dir(&self.proc_root, mount, vm.1)))
            .collect();
        // VMs in one directory share it: none owns it, and telling so needs no read of
        // its (possibly long) cgroup.procs per VM.
        let mut per_dir: HashMap<&Path, usize> = HashMap::new();
        for dir in new.iter().filter_map(|(_, dir)| dir.as_ref().ok()) {
            *per_dir.entry(dir.as_path()).or_default() += 1;
        }
        for ((id, pid), dir) in &new {
            let ids = dir.clone().and_then(|dir| {
                if per_dir.get(dir.as_path()).copied().unwrap_or(0) > 1 {
                    return Err(format!("its cgroup {} holds other VMs too", dir.display()));
                }
                exclusive_subtree(&self.proc_root, &dir, *pid)
            });
            let ids = ids.unwrap_or_else(|why| {
                log::debug!(
                    "VM {} (pid {pid}): memory cgroup not mapped, its writeback I/O stays \
                     unattributed: {why}",
                    super::escape_controls(&id.name)
                );
                Vec::new()
            });
            self.resolved.insert((id.clone(), *pid), ids);
        }
        self.owners = self
            .resolved
            .iter()
            .flat_map(|((id, _), ids)| ids.iter().map(move |&cg| (cg, id.clone())))
            .collect();
        true
    }

    /// The VM that exclusively owns memory cgroup `id`, if any.
    pub fn vm_of(&self, id: u64) -> Option<&VmId> {
        self.owners.get(&id)
    }

    /// Every memory cgroup id that [`vm_of`](Self::vm_of) maps to a VM (in no order), e.g. to
    /// tell the eBPF program which cgroups' writeback to record.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.owners.keys().copied()
    }

    /// Why nothing can be mapped (no memory controller mounted, ...), for `optimus check`
    /// and a one-time warning; None when the memory controller was found.
    pub fn unavailable(&self) -> Option<&str> {
        self.mount.as_ref().err().map(String::as_str)
    }
}

/// Finds the memory controller's mount in `<proc_root>/self/mountinfo`: a v1 `cgroup` mount
/// with the `memory` super option (one mounting the whole hierarchy preferred), else a
/// `cgroup2` mount whose `cgroup.controllers` lists `memory`.
fn find_memory_mount(proc_root: &Path) -> Result<MemoryMount, String> {
    let path = proc_root.join("self/mountinfo");
    let text = fs::read(&path).map_err(|e| {
        format!(
            "cannot read {}: {e}; writeback I/O cannot be attributed to VMs",
            path.display()
        )
    })?;
    let mounts: Vec<Mount> = text
        .split(|&b| b == b'\n')
        .filter_map(parse_mount)
        .collect();
    let v1: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fstype == b"cgroup" && has_option(m.super_opts, b"memory"))
        .collect();
    let whole_v1 = v1.iter().find(|m| m.root == Path::new("/"));
    if let Some(m) = whole_v1.or(v1.first()) {
        return Ok(MemoryMount {
            version: Version::V1,
            mount_point: m.mount_point.clone(),
            root: m.root.clone(),
        });
    }
    let v2 = mounts.iter().filter(|m| m.fstype == b"cgroup2").find(|m| {
        fs::read_to_string(m.mount_point.join("cgroup.controllers")).is_ok_and(|c| lists_memory(&c))
    });
    match v2 {
        Some(m) => Ok(MemoryMount {
            version: Version::V2,
            mount_point: m.mount_point.clone(),
            root: m.root.clone(),
        }),
        None => Err(format!(
            "no memory cgroup controller: {} has no cgroup (v1) mount with the memory option \
             and no cgroup2 mount whose cgroup.controllers lists memory; writeback I/O \
             cannot be attributed to VMs",
            path.display()
        )),
    }
}

/// The fields of a mountinfo line that matter here.
#[derive(Debug)]
pub(crate) struct Mount<'a> {
    pub(crate) root: PathBuf,
    pub(crate) mount_point: PathBuf,
    pub(crate) fstype: &'a [u8],
    pub(crate) super_opts: &'a [u8],
}

/// Parses `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
pub(crate) fn parse_mount(line: &[u8]) -> Option<Mount<'_>> {
    let fields: Vec<&[u8]> = line
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .collect();
    let sep = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    Some(Mount {
        root: unescape(fields.get(3)?),
        mount_point: unescape(fields.get(4)?),
        fstype: fields.get(sep + 1)?,
        super_opts: fields.get(sep + 3)?,
    })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash); anything else is kept as is.
fn unescape(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(decoded) => {
                out.push(decoded);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Whether comma-separated `opts` contain `opt`.
pub(crate) fn has_option(opts: &[u8], opt: &[u8]) -> bool {
    opts.split(|&b| b == b',').any(|o| o == opt)
}

/// Whether a `cgroup.controllers` file's contents list `memory`.
pub(crate) fn lists_memory(controllers: &str) -> bool {
    controllers.split_ascii_whitespace().any(|c| c == "memory")
}

/// The directory of the memory cgroup the QEMU process `pid` is charged to (not the root
/// cgroup). `Err` says why there is none.
fn vm_cgroup_dir(proc_root: &Path, mount: &MemoryMount, pid: u32) -> Result<PathBuf, String> {
    let cgroup_path = memory_cgroup_path(proc_root, mount.version, pid)?;
    let mut dir = cgroup_dir_in_mount(mount, &cgroup_path)?;
    if mount.version == Version::V2 {
        dir = memory_domain(&mount.mount_point, dir)?;
    }
    if dir == mount.mount_point {
        return Err("it is in the root cgroup of the memory cgroup mount".to_owned());
    }
    Ok(dir)
}

/// The directory under the mount of cgroup path `cgroup_path` (from `/proc/<pid>/cgroup`);
/// `Err` when the path is not below the mount's root or would climb out of it (`..`).
pub(crate) fn cgroup_dir_in_mount(
    mount: &MemoryMount,
    cgroup_path: &[u8],
) -> Result<PathBuf, String> {
    let rel = Path::new(OsStr::from_bytes(cgroup_path))
        .strip_prefix(&mount.root)
        .map_err(|_| {
            format!(
                "its cgroup {} is not under {}, the root of the memory cgroup mount",
                String::from_utf8_lossy(cgroup_path),
                mount.root.display()
            )
        })?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!(
            "its cgroup path {} is outside the memory cgroup mount",
            rel.display()
        ));
    }
    Ok(mount.mount_point.join(rel))
}

/// The cgroup path of `pid` in the hierarchy with the memory controller, from
/// `<proc_root>/<pid>/cgroup` (`HIERARCHY:CONTROLLERS:PATH` lines).
fn memory_cgroup_path(proc_root: &Path, version: Version, pid: u32) -> Result<Vec<u8>, String> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    memory_cgroup_line(&text, version)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            format!(
                "{} has no line for the memory controller's hierarchy",
                path.display()
            )
        })
}

/// The cgroup path on the memory controller's line of a `/proc/<pid>/cgroup` text.
pub(crate) fn memory_cgroup_line(text: &[u8], version: Version) -> Option<&[u8]> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let mut fields = line.splitn(3, |&b| b == b':');
        let hierarchy = fields.next()?;
        let controllers = fields.next()?;
        let cgroup = fields.next()?;
        let wanted = match version {
            Version::V1 => has_option(controllers, b"memory"),
            Version::V2 => hierarchy == b"0" && controllers.is_empty(),
        };
        wanted.then_some(cgroup)
    })
}

/// cgroup v2: the cgroup at or above `dir` that the process's memory is charged to, the
/// nearest one whose `cgroup.controllers` lists `memory`.
fn memory_domain(mount_point: &Path, mut dir: PathBuf) -> Result<PathBuf, String> {
    loop {
        if dir == mount_point {
            return Ok(dir);
        }
        let path = dir.join("cgroup.controllers");
        let controllers = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if lists_memory(&controllers) {
            return Ok(dir);
        }
        if !dir.pop() {
            return Ok(mount_point.to_path_buf());
        }
    }
}

/// The inode numbers of `top` and of every directory below it, if none of them holds a
/// process other than `pid` (or a vhost worker of it).
fn exclusive_subtree(proc_root: &Path, top: &Path, pid: u32) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    let mut pending = vec![(top.to_path_buf(), 0_usize)];
    while let Some((dir, depth)) = pending.pop() {
        if ids.len() >= MAX_DIRS {
            return Err(format!(
                "its cgroup {} has more than {MAX_DIRS} sub-cgroups",
                top.display()
            ));
        }
        let meta = fs::symlink_metadata(&dir)
            .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        if let Some(other) = other_process(proc_root, &dir, pid)? {
            return Err(format!(
                "cgroup {} also holds process {other}",
                dir.display()
            ));
        }
        ids.push(meta.ino());
        let entries =
            fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                continue;
            }
            if depth >= MAX_DEPTH {
                return Err(format!(
                    "its cgroup {} is more than {MAX_DEPTH} levels deep",
                    top.display()
                ));
            }
            pending.push((entry.path(), depth + 1));
        }
    }
    Ok(ids)
}

/// The first process in cgroup `dir` other than `pid` and its vhost workers, from its
/// `cgroup.procs`. A cgroup v2 threaded cgroup has no readable `cgroup.procs`; its processes
/// are listed by its threaded domain, an ancestor already checked, so it counts as empty.
fn other_process(proc_root: &Path, dir: &Path, pid: u32) -> Result<Option<u32>, String> {
    let path = dir.join("cgroup.procs");
    let procs = match fs::read_to_string(&path) {
        Ok(procs) => procs,
        Err(_) if is_threaded(dir) => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    for line in procs.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let other: u32 = line
            .parse()
            .map_err(|_| format!("{} has a line {line:?} that is no pid", path.display()))?;
        if other != pid && !is_vhost_worker_of(proc_root, other, pid) {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

/// Whether cgroup v2 directory `dir` is a threaded cgroup.
fn is_threaded(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.type")).is_ok_and(|t| t.trim() == "threaded")
}

/// Whether process `worker` is a kernel vhost worker (kernels before 6.4) created by a thread
/// of process `pid`: a kernel thread named `vhost-<tid>` with `tid` a thread of `pid`. The
/// kernel moves such workers into their owner's cgroups, and what they dirty is the VM's.
fn is_vhost_worker_of(proc_root: &Path, worker: u32, pid: u32) -> bool {
    let worker_dir = proc_root.join(worker.to_string());
    let Ok(comm) = fs::read_to_string(worker_dir.join("comm")) else {
        return false;
    };
    let Some(tid) = comm.trim_end_matches('\n').strip_prefix("vhost-") else {
        return false;
    };
    if tid.is_empty() || !tid.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let is_kthread = fs::read_to_string(worker_dir.join("stat"))
        .ok()
        .and_then(|stat| crate::host::process_kind_of_stat(&stat))
        .is_some_and(|kind| kind == crate::host::ProcessKind::Kernel);
    is_kthread
        && proc_root
            .join(pid.to_string())
            .join("task")
            .join(tid)
            .is_dir()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A fake procfs (`proc/`) and cgroupfs (`cg/`) in a temporary directory.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let fixture = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            fs::create_dir_all(fixture.proc().join("self")).unwrap();
            fs::create_dir_all(fixture.cg()).unwrap();
            fixture
        }

        fn proc(&self) -> PathBuf {
            self.dir.path().join("proc")
        }

        fn cg(&self) -> PathBuf {
            self.dir.path().join("cg")
        }

        /// Writes `self/mountinfo`; `{cg}` stands for the fake cgroupfs.
        fn mountinfo(&self, text: &str) {
            let text = text.replace("{cg}", self.cg().to_str().unwrap());
            fs::write(self.proc().join("self/mountinfo"), text).unwrap();
        }

        /// A v1 hierarchy with the memory controller at `{cg}`, among unrelated mounts.
        fn v1(&self) {
            self.mountinfo(
                "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                 27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,memory\n\
                 31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                 32 31 0:29 / /none/cpu rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct\n\
                 35 31 0:32 / {cg} rw,nosuid,relatime shared:9 - cgroup cgroup rw,memory\n\
                 40 31 0:37 / /nonexistent/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                 41 31 0:38 / /nonexistent/unified rw,relatime - cgroup2 cgroup2 rw\n",
            );
        }

        /// `<proc>/<pid>/cgroup`.
        fn process(&self, pid: u32, cgroup: &str) {
            let dir = self.proc().join(pid.to_string());
            fs::create_dir_all(dir.join("task").join(pid.to_string())).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
            fs::write(dir.join("comm"), "qemu-system-x86\n").unwrap();
            fs::write(
                dir.join("stat"),
                format!("{pid} (x) S 1 1 1 0 -1 4194560 0"),
            )
            .unwrap();
        }

        /// A v1 process whose memory cgroup is `path`.
        fn v1_process(&self, pid: u32, path: &str) {
            self.process(
                pid,
                &format!(
                    "12:cpu,cpuacct:{path}/emulator\n4:memory:{path}\n1:name=systemd:/\n0::/\n"
                ),
            );
        }

        /// A cgroup directory `rel` under `{cg}` with these processes; returns its inode.
        fn cgroup(&self, rel: &str, procs: &[u32]) -> u64 {
            let dir = self.cg().join(rel);
            fs::create_dir_all(&dir).unwrap();
            let text: String = procs.iter().map(|p| format!("{p}\n")).collect();
            fs::write(dir.join("cgroup.procs"), text).unwrap();
            ino(&dir)
        }
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    fn vm(name: &str) -> VmId {
        VmId {
            name: name.to_owned(),
            uuid: format!("uuid-{name}"),
        }
    }

    fn refreshed(fixture: &Fixture, vms: &[(VmId, u32)]) -> VmCgroups {
        let mut cgroups = VmCgroups::new(fixture.proc());
        cgroups.refresh(vms);
        cgroups
    }

    #[test]
    fn vms_sharing_one_cgroup_own_none_of_it() {
        let f = Fixture::new();
        f.v1();
        let shared = f.cgroup("session", &[100, 200]);
        f.v1_process(100, "/session");
        f.v1_process(200, "/session");
        let cgroups = refreshed(&f, &[(vm("a"), 100), (vm("b"), 200)]);
        assert_eq!(cgroups.vm_of(shared), None);
        assert_eq!(cgroups.ids().count(), 0);
    }

    #[test]
    fn update_looks_up_new_vms_only_and_refresh_rereads_all() {
        let f = Fixture::new();
        f.v1();
        let a = f.cgroup("machine/a", &[100]);
        let b = f.cgroup("machine/b", &[200]);
        f.v1_process(100, "/machine/a");
        f.v1_process(200, "/machine/b");
        let mut cgroups = refreshed(&f, &[(vm("a"), 100)]);
        assert_eq!(cgroups.vm_of(a), Some(&vm("a")));
        // Another process joins a's cgroup: a stays mapped until the next full refresh.
        f.cgroup("machine/a", &[100, 300]);
        cgroups.update(&[(vm("a"), 100), (vm("b"), 200)]);
        assert_eq!(cgroups.vm_of(a), Some(&vm("a")));
        assert_eq!(cgroups.vm_of(b), Some(&vm("b")));
        cgroups.refresh(&[(vm("a"), 100), (vm("b"), 200)]);
        assert_eq!(cgroups.vm_of(a), None);
        assert_eq!(cgroups.vm_of(b), Some(&vm("b")));
        // A VM gone is forgotten by an update.
        cgroups.update(&[(vm("a"), 100)]);
        assert_eq!(cgroups.vm_of(b), None);
    }

    #[test]
    fn libvirt_exclusive_vm_with_sub_cgroup_maps_every_inode() {
        let f = Fixture::new();
        f.v1();
        let root = f.cgroup("", &[1, 2, 3]);
        let machine = f.cgroup("machine", &[]);
        let vm1 = f.cgroup("machine/qemu-1-vm1.libvirt-qemu", &[100]);
        let vm1_sub = f.cgroup("machine/qemu-1-vm1.libvirt-qemu/emulator", &[]);
        let vm2 = f.cgroup("machine/qemu-2-vm2.libvirt-qemu", &[200]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        f.v1_process(200, "/machine/qemu-2-vm2.libvirt-qemu");

        let cgroups = refreshed(&f, &[(vm("vm1"), 100), (vm("vm2"), 200)]);
        assert_eq!(cgroups.unavailable(), None);
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
        assert_eq!(cgroups.vm_of(vm1_sub), Some(&vm("vm1")));
        assert_eq!(cgroups.vm_of(vm2), Some(&vm("vm2")));
        assert_eq!(cgroups.vm_of(machine), None);
        assert_eq!(cgroups.vm_of(root), None);
        assert_eq!(cgroups.vm_of(ino(&f.proc())), None);
        let mut ids: Vec<u64> = cgroups.ids().collect();
        ids.sort_unstable();
        let mut want = vec![vm1, vm1_sub, vm2];
        want.sort_unstable();
        assert_eq!(ids, want);
    }

    #[test]
    fn refresh_forgets_vms_that_are_gone() {
        let f = Fixture::new();
        f.v1();
        let vm1 = f.cgroup("machine/qemu-1-vm1.libvirt-qemu", &[100]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        let mut cgroups = VmCgroups::new(f.proc());
        cgroups.refresh(&[(vm("vm1"), 100)]);
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
        cgroups.refresh(&[]);
        assert_eq!(cgroups.vm_of(vm1), None);
    }

    #[test]
    fn shared_cgroup_is_not_mapped() {
        let f = Fixture::new();
        f.v1();
        let shared = f.cgroup("user.slice/session-1.scope", &[300, 301]);
        let vm2 = f.cgroup("machine/qemu-2-vm2.libvirt-qemu", &[200]);
        // Another process only in a sub-cgroup also spoils exclusivity.
        let vm3 = f.cgroup("machine/qemu-3-vm3.libvirt-qemu", &[400]);
        let vm3_sub = f.cgroup("machine/qemu-3-vm3.libvirt-qemu/helper", &[401]);
        f.v1_process(300, "/user.slice/session-1.scope");
        f.v1_process(200, "/machine/qemu-2-vm2.libvirt-qemu");
        f.v1_process(400, "/machine/qemu-3-vm3.libvirt-qemu");

        let cgroups = refreshed(
            &f,
            &[(vm("byhand"), 300), (vm("vm2"), 200), (vm("vm3"), 400)],
        );
        assert_eq!(cgroups.vm_of(shared), None);
        assert_eq!(cgroups.vm_of(vm3), None);
        assert_eq!(cgroups.vm_of(vm3_sub), None);
        assert_eq!(cgroups.vm_of(vm2), Some(&vm("vm2")));
    }

    #[test]
    fn vm_in_root_cgroup_is_not_mapped() {
        let f = Fixture::new();
        f.v1();
        // Even alone in the root cgroup: the root also holds kernel threads' pages.
        let root = f.cgroup("", &[500]);
        f.v1_process(500, "/");
        let cgroups = refreshed(&f, &[(vm("root"), 500)]);
        assert_eq!(cgroups.unavailable(), None);
        assert_eq!(cgroups.vm_of(root), None);
        assert!(cgroups.owners.is_empty());
    }

    #[test]
    fn kernel_vhost_workers_of_the_vm_are_allowed() {
        let f = Fixture::new();
        f.v1();
        let vm1 = f.cgroup("machine/qemu-1-vm1.libvirt-qemu", &[100, 102]);
        let vm2 = f.cgroup("machine/qemu-2-vm2.libvirt-qemu", &[200, 201]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        fs::create_dir_all(f.proc().join("100/task/101")).unwrap();
        // vhost-101: a kernel thread (PF_KTHREAD in flags) created by QEMU's thread 101.
        fs::create_dir_all(f.proc().join("102")).unwrap();
        fs::write(f.proc().join("102/comm"), "vhost-101\n").unwrap();
        fs::write(
            f.proc().join("102/stat"),
            "102 (vhost-101) S 2 0 0 0 -1 2129984 0",
        )
        .unwrap();
        // A user process merely calling itself vhost-200.
        f.v1_process(200, "/machine/qemu-2-vm2.libvirt-qemu");
        fs::create_dir_all(f.proc().join("201")).unwrap();
        fs::write(f.proc().join("201/comm"), "vhost-200\n").unwrap();
        fs::write(
            f.proc().join("201/stat"),
            "201 (vhost-200) S 1 1 1 0 -1 4194560 0",
        )
        .unwrap();

        let cgroups = refreshed(&f, &[(vm("vm1"), 100), (vm("vm2"), 200)]);
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
        assert_eq!(cgroups.vm_of(vm2), None);
    }

    #[test]
    fn cgroup_v2() {
        let f = Fixture::new();
        f.mountinfo(
            "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
             31 23 0:28 / {cg} rw,nosuid,relatime shared:4 - cgroup2 cgroup2 \
             rw,nsdelegate,memory_recursiveprot\n",
        );
        fs::write(
            f.cg().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids\n",
        )
        .unwrap();
        let write_controllers = |rel: &str, c: &str| {
            fs::write(f.cg().join(rel).join("cgroup.controllers"), c).unwrap();
        };
        f.cgroup("machine.slice", &[]);
        write_controllers("machine.slice", "cpuset cpu io memory pids\n");

        // A QEMU alone in a scope with the memory controller.
        let scope1 = f.cgroup(r"machine.slice/machine-qemu\x2d1\x2dvm1.scope", &[100]);
        write_controllers(
            r"machine.slice/machine-qemu\x2d1\x2dvm1.scope",
            "cpu memory pids\n",
        );
        f.process(100, "0::/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope\n");

        // libvirt's layout: QEMU's main thread in the threaded `emulator` cgroup (no memory
        // controller, no readable cgroup.procs), its memory charged to `libvirt`.
        let scope2 = r"machine.slice/machine-qemu\x2d2\x2dvm2.scope";
        let scope2_ino = f.cgroup(scope2, &[]);
        write_controllers(scope2, "cpu memory pids\n");
        let libvirt = f.cgroup(&format!("{scope2}/libvirt"), &[200]);
        write_controllers(&format!("{scope2}/libvirt"), "cpu memory pids\n");
        let mut threaded = Vec::new();
        for sub in ["emulator", "vcpu0"] {
            let dir = f.cg().join(format!("{scope2}/libvirt/{sub}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup.controllers"), "cpu\n").unwrap();
            fs::write(dir.join("cgroup.type"), "threaded\n").unwrap();
            threaded.push(ino(&dir));
        }
        f.process(200, &format!("0::/{scope2}/libvirt/emulator\n"));

        // A QEMU alone in a cgroup without the memory controller, under a shared one.
        let session = f.cgroup("user.slice", &[300, 301]);
        write_controllers("user.slice", "cpu memory pids\n");
        let app = f.cgroup("user.slice/app.scope", &[300]);
        write_controllers("user.slice/app.scope", "cpu pids\n");
        f.process(300, "0::/user.slice/app.scope\n");

        let cgroups = refreshed(&f, &[(vm("vm1"), 100), (vm("vm2"), 200), (vm("app"), 300)]);
        assert_eq!(cgroups.unavailable(), None);
        assert_eq!(cgroups.vm_of(scope1), Some(&vm("vm1")));
        assert_eq!(cgroups.vm_of(libvirt), Some(&vm("vm2")));
        for t in threaded {
            assert_eq!(cgroups.vm_of(t), Some(&vm("vm2")));
        }
        assert_eq!(cgroups.vm_of(scope2_ino), None);
        assert_eq!(cgroups.vm_of(session), None);
        assert_eq!(cgroups.vm_of(app), None);
        assert_eq!(cgroups.owners.len(), 4);
    }

    #[test]
    fn v1_memory_mount_wins_over_cgroup2() {
        let f = Fixture::new();
        let unified = f.dir.path().join("unified");
        fs::create_dir_all(&unified).unwrap();
        fs::write(unified.join("cgroup.controllers"), "memory\n").unwrap();
        f.mountinfo(&format!(
            "41 31 0:38 / {} rw,relatime - cgroup2 cgroup2 rw\n\
             35 31 0:32 / {{cg}} rw,relatime - cgroup cgroup rw,memory\n",
            unified.display()
        ));
        let vm1 = f.cgroup("machine/qemu-1-vm1.libvirt-qemu", &[100]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        let cgroups = refreshed(&f, &[(vm("vm1"), 100)]);
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
    }

    #[test]
    fn mount_root_is_stripped_from_cgroup_paths() {
        let f = Fixture::new();
        // Only /machine of the hierarchy is mounted at {cg}.
        f.mountinfo("35 31 0:32 /machine {cg} rw,relatime - cgroup cgroup rw,memory\n");
        let vm1 = f.cgroup("qemu-1-vm1.libvirt-qemu", &[100]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        // Outside the mounted part, and a mere name prefix of it.
        f.cgroup("other", &[200]);
        f.v1_process(200, "/other");
        f.v1_process(300, "/machinex/qemu-3-vm3.libvirt-qemu");
        f.v1_process(400, "/machine/../escape");
        let cgroups = refreshed(
            &f,
            &[
                (vm("vm1"), 100),
                (vm("vm2"), 200),
                (vm("vm3"), 300),
                (vm("vm4"), 400),
            ],
        );
        assert_eq!(cgroups.unavailable(), None);
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
        assert_eq!(cgroups.owners.len(), 1);
    }

    #[test]
    fn octal_escaped_mount_point() {
        let f = Fixture::new();
        let cg = f.dir.path().join("cgroup fs\\x");
        let escaped = cg
            .to_str()
            .unwrap()
            .replace('\\', r"\134")
            .replace(' ', r"\040");
        f.mountinfo(&format!(
            "35 31 0:32 / {escaped} rw,relatime - cgroup cgroup rw,memory\n"
        ));
        let dir = cg.join("machine/qemu-1-vm1.libvirt-qemu");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.procs"), "100\n").unwrap();
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        let cgroups = refreshed(&f, &[(vm("vm1"), 100)]);
        assert_eq!(cgroups.unavailable(), None);
        assert_eq!(cgroups.vm_of(ino(&dir)), Some(&vm("vm1")));
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(
            unescape(br"/a\040b\011c\012d\134e"),
            PathBuf::from("/a b\tc\nd\\e")
        );
        // Not an escape: kept as is.
        assert_eq!(unescape(br"/a\09\"), PathBuf::from(r"/a\09\"));
    }

    #[test]
    fn missing_memory_controller_is_reported() {
        let f = Fixture::new();
        assert!(VmCgroups::new(f.proc()).unavailable().is_some());
        // No mountinfo at all.
        let cgroups = refreshed(&f, &[]);
        assert!(cgroups.unavailable().unwrap().contains("mountinfo"));

        // cgroup v1 without memory, cgroup2 without memory in its controllers.
        fs::write(f.cg().join("cgroup.controllers"), "cpu io pids\n").unwrap();
        f.mountinfo(
            "32 31 0:29 / /nonexistent/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             41 31 0:38 / {cg} rw,relatime - cgroup2 cgroup2 rw\n\
             27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,memory\n",
        );
        let machine = f.cgroup("machine", &[100]);
        f.process(100, "0::/machine\n");
        let cgroups = refreshed(&f, &[(vm("vm1"), 100)]);
        let why = cgroups.unavailable().unwrap();
        assert!(why.contains("no memory cgroup controller"), "{why}");
        assert_eq!(cgroups.vm_of(machine), None);
    }

    #[test]
    fn vanished_process_or_cgroup_is_skipped() {
        let f = Fixture::new();
        f.v1();
        let vm1 = f.cgroup("machine/qemu-1-vm1.libvirt-qemu", &[100]);
        f.v1_process(100, "/machine/qemu-1-vm1.libvirt-qemu");
        // 999 has no /proc entry; 300's cgroup directory is gone; 400 has no memory line.
        f.v1_process(300, "/machine/qemu-3-gone.libvirt-qemu");
        f.process(400, "1:name=systemd:/\n");
        let cgroups = refreshed(
            &f,
            &[
                (vm("gone"), 999),
                (vm("vm3"), 300),
                (vm("vm4"), 400),
                (vm("vm1"), 100),
            ],
        );
        assert_eq!(cgroups.vm_of(vm1), Some(&vm("vm1")));
        assert_eq!(cgroups.owners.len(), 1);
    }

    #[test]
    fn too_deep_tree_is_not_mapped() {
        let f = Fixture::new();
        f.v1();
        let deep = "machine/qemu-1-vm1.libvirt-qemu";
        let top = f.cgroup(deep, &[100]);
        let mut sub = deep.to_owned();
        for level in ["a", "b", "c", "d", "e", "f", "g", "h", "i"] {
            sub = format!("{sub}/{level}");
            f.cgroup(&sub, &[]);
        }
        f.v1_process(100, &format!("/{deep}"));
        let cgroups = refreshed(&f, &[(vm("vm1"), 100)]);
        assert_eq!(cgroups.vm_of(top), None);

        // Exactly MAX_DEPTH levels below is fine.
        fs::remove_dir_all(f.cg().join(&sub)).unwrap();
        let cgroups = refreshed(&f, &[(vm("vm1"), 100)]);
        assert_eq!(cgroups.vm_of(top), Some(&vm("vm1")));
    }

    /// Whether this machine's mountinfo has a v1 memory mount or a cgroup2 mount with memory,
    /// checked independently of the code under test.
    fn host_has_memory_controller(mountinfo: &str) -> bool {
        mountinfo.lines().any(|line| {
            let Some((pre, post)) = line.split_once(" - ") else {
                return false;
            };
            let post: Vec<&str> = post.split(' ').collect();
            match post.first() {
                Some(&"cgroup") => post
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|o| o == "memory")),
                Some(&"cgroup2") => pre.split(' ').nth(4).is_some_and(|mp| {
                    fs::read_to_string(Path::new(mp).join("cgroup.controllers"))
                        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
                }),
                _ => false,
            }
        })
    }

    #[test]
    fn real_host_does_not_panic() {
        let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut cgroups = VmCgroups::new(PathBuf::from("/proc"));
        cgroups.refresh(&[(vm("self"), std::process::id())]);
        if host_has_memory_controller(&mountinfo) {
            assert_eq!(cgroups.unavailable(), None);
        }
    }
}
