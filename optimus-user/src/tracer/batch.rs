//! Whole-map reads in a few syscalls: `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+) reads thousands of
//! entries per call, where iterating costs two syscalls per entry (`get_next_key`, then a
//! lookup). In: a per-CPU hash map's fd; out: every key with its per-CPU values.
//!
//! Layout of the request: `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h);
//! per-CPU values come back as one `round_up(value_size, 8)` slot per possible CPU.
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr`, the `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries asked for per call; a hash bucket larger than this makes the kernel answer
/// `ENOSPC`, and the request is retried with room for more.
const CHUNK: usize = 4096;

/// Every entry of a per-CPU hash map of `u32` keys and `u64` values: key and one value per
/// possible CPU (`ncpus` of them). Fails with the kernel's error (`EINVAL` on kernels
/// without batch operations: the caller then iterates).
pub fn percpu_u32_u64(fd: BorrowedFd<'_>, ncpus: usize) -> io::Result<Vec<(u32, Vec<u64>)>> {
    let map_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The batch token is opaque (a bucket index for hash maps): 8 bytes hold it.
    let (mut token_in, mut token_out) = (0_u64, 0_u64);
    let mut first = true;
    loop {
        let mut keys = vec![0_u32; chunk];
        let mut values = vec![0_u64; chunk * ncpus];
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut token_in) as u64
            },
            out_batch: std::ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).map_err(|_| io::ErrorKind::InvalidInput)?,
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers we own that hold `chunk` keys and `chunk` ×
        // `ncpus` values, and at two 8-byte tokens; the kernel writes at most that much
        // (it writes `count` entries back) and reads only `attr` itself.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let got = (attr.count as usize).min(chunk);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket holds more entries than asked for: ask for more, same start.
            Some(libc::ENOSPC) if got == 0 => {
                chunk *= 4;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        for (i, &key) in keys.iter().take(got).enumerate() {
            out.push((key, values[i * ncpus..(i + 1) * ncpus].to_vec()));
        }
        // ENOENT: that was the last of the map (and a call that gave nothing cannot move on).
        if err.is_some() || got == 0 {
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_request_has_the_kernel_layout() {
        // in_batch, out_batch, keys, values (8 each), count, map_fd (4 each), elem_flags,
        // flags (8 each).
        assert_eq!(size_of::<super::BatchAttr>(), 56);
    }
}
