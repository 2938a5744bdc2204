//! `optimus advise --apply`: recommended moves in, libvirt live migrations (peer to peer)
//! out, one at a time, each checked afterwards: the VM runs under the target's libvirt and
//! the target's agent reports it. libvirt leaves a VM whose migration failed running where
//! it was; that is checked and reported with libvirt's reason.

use std::time::{Duration, Instant};

use super::plan::Recommendation;
use super::prom::Prom;

/// How long the target's agent may take to report a moved VM (a scan plus a scrape).
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// What happened to one move.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Applied {
    pub vm_name: String,
    pub vm_uuid: String,
    pub from: String,
    pub to: String,
    pub ok: bool,
    pub detail: String,
}

/// The libvirt URI of `host` from the template (`qemu+ssh://{host}/system`).
pub fn uri_of(template: &str, host: &str) -> String {
    template.replace("{host}", host)
}

/// Where and how moves are carried out.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// libvirt URI template (`{host}` stands for the host's name).
    pub template: &'a str,
    /// Prometheus, to see the target's agent report a moved VM.
    pub prometheus: &'a str,
    /// The label naming hosts.
    pub host_label: &'a str,
    /// A migration still running after this long is aborted.
    pub timeout: Duration,
    /// Bandwidth cap, MiB/s (0: libvirt's default).
    pub bandwidth_mib_s: u64,
}

/// Carries out at most `max` of `recs`, in order.
pub fn apply(recs: &[Recommendation], max: usize, target: &Target<'_>) -> Vec<Applied> {
    // Unpinned: it must see the target's agent report the VM after the move.
    let prom = Prom::new(target.prometheus, Duration::from_secs(15));
    recs.iter()
        .take(max)
        .map(|r| {
            let (ok, detail) = match migrate(r, target, &prom) {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            Applied {
                vm_name: r.vm_name.clone(),
                vm_uuid: r.vm_uuid.clone(),
                from: r.from.clone(),
                to: r.to.clone(),
                ok,
                detail,
            }
        })
        .collect()
}

fn migrate(r: &Recommendation, target: &Target<'_>, prom: &Prom) -> Result<String, String> {
    use virt::connect::Connect;
    let (src_uri, dst_uri) = (
        uri_of(target.template, &r.from),
        uri_of(target.template, &r.to),
    );
    let label = target.host_label;
    let started = Instant::now();
    let src = Connect::open(Some(&src_uri)).map_err(|e| {
        format!(
            "cannot connect to the source libvirt {src_uri}: {}; nothing was moved",
            e.message()
        )
    })?;
    let result = (|| {
        let dom = src.lookup_domain_by_uuid_string(&r.vm_uuid).map_err(|e| {
            format!(
                "{src_uri} has no domain {}: {}; nothing was moved",
                r.vm_uuid,
                e.message()
            )
        })?;
        let flags = flags(dom.is_persistent().unwrap_or(false));
        // The migration call blocks until libvirt is done; it runs on its own thread so
        // that a migration that never converges can be aborted at the deadline.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let timed_out = std::thread::scope(|scope| {
            let dom = &dom;
            let dst_uri = &dst_uri;
            scope.spawn(move || {
                let res = dom
                    .migrate_to_uri(dst_uri, flags, None, target.bandwidth_mib_s)
                    .map_err(|e| e.message().to_owned());
                // The receiver waits for this send unless it gave up; ignoring is fine.
                let _ = done_tx.send(res);
            });
            match done_rx.recv_timeout(target.timeout) {
                Ok(res) => Ok(res),
                Err(_) => {
                    abort_job(dom);
                    // libvirt returns from the migration call once the job is aborted.
                    Err(done_rx.recv().ok())
                }
            }
        });
        let outcome = match timed_out {
            Ok(res) => res,
            Err(res) => {
                let now = where_it_runs(&dom, &r.from);
                return Err(match res {
                    Some(Ok(())) => format!(
                        "live migration to {dst_uri} finished only after the {} s \
                         --migration-timeout; check where the VM runs",
                        target.timeout.as_secs_f64()
                    ),
                    _ => format!(
                        "live migration to {dst_uri} did not finish within {} s \
                         (--migration-timeout; the guest may dirty memory faster than the \
                         link copies it) and was aborted; {now}",
                        target.timeout.as_secs_f64()
                    ),
                });
            }
        };
        outcome.map_err(|message| {
            // libvirt resumes the VM on the source when a migration fails; say what is
            // true rather than what should be.
            let now = where_it_runs(&dom, &r.from);
            format!("live migration to {dst_uri} failed: {message}; {now}")
        })
    })();
    drop(src);
    result?;
    let dst = Connect::open(Some(&dst_uri)).map_err(|e| {
        format!(
            "migrated, but cannot connect to the target libvirt {dst_uri} to check: {}",
            e.message()
        )
    })?;
    let running = dst
        .lookup_domain_by_uuid_string(&r.vm_uuid)
        .and_then(|d| d.is_active());
    drop(dst);
    match running {
        Ok(true) => {}
        Ok(false) => return Err(format!("{dst_uri} has the domain but it is not running")),
        Err(e) => {
            return Err(format!(
                "{dst_uri} does not list the domain after migration: {}",
                e.message()
            ))
        }
    }
    let moved_in = started.elapsed();
    let confirming = Instant::now();
    // Both values came from scraped labels: quoted as PromQL strings.
    let query = format!(
        "optimus_vm_info{{vm_uuid=\"{}\",{label}=\"{}\"}}",
        promql_string(&r.vm_uuid),
        promql_string(&r.to)
    );
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        if prom.query(&query).is_ok_and(|s| !s.is_empty()) {
            return Ok(format!(
                "running on {} after {:.1} s; its agent reported it {:.1} s later",
                r.to,
                moved_in.as_secs_f64(),
                confirming.elapsed().as_secs_f64()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the VM runs on {} but its agent did not report it within {} s (is {} scraped?)",
                r.to,
                REPORT_TIMEOUT.as_secs(),
                r.to
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether the VM still runs on the source, in words for a report.
fn where_it_runs(dom: &virt::domain::Domain, from: &str) -> String {
    match dom.is_active() {
        Ok(true) => format!("the VM still runs on {from}"),
        Ok(false) => format!("the VM is not running on {from} either: check it there"),
        Err(e) => format!(
            "cannot tell whether the VM still runs on {from}: {}",
            e.message()
        ),
    }
}

/// Aborts the domain's running job (the migration). A failure is left to the migration
/// call's own result.
fn abort_job(dom: &virt::domain::Domain) {
    // SAFETY: `dom` is a live domain handle for the whole call; virDomainAbortJob only
    // reads it, and libvirt allows it from another thread while the job runs (that is its
    // purpose).
    let rc = unsafe { virt::sys::virDomainAbortJob(dom.as_ptr()) };
    if rc < 0 {
        log::warn!("aborting the migration job failed");
    }
}

/// `s` escaped for a double-quoted PromQL string.
fn promql_string(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Live and peer to peer (the source's libvirtd talks to the target's itself). A persistent
/// domain moves with its definition: defined on the target, undefined on the source, so it
/// is not left defined (and startable) in two places; a transient one stays transient.
fn flags(persistent: bool) -> u32 {
    use virt::sys;
    let live = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER;
    if persistent {
        live | sys::VIR_MIGRATE_PERSIST_DEST | sys::VIR_MIGRATE_UNDEFINE_SOURCE
    } else {
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_the_host() {
        assert_eq!(
            uri_of("qemu+ssh://{host}/system", "node-2"),
            "qemu+ssh://node-2/system"
        );
    }

    #[test]
    fn a_persistent_domain_moves_with_its_definition() {
        use virt::sys;
        let transient = flags(false);
        assert_eq!(
            transient,
            sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER
        );
        let persistent = flags(true);
        assert_ne!(persistent & sys::VIR_MIGRATE_PERSIST_DEST, 0);
        assert_ne!(persistent & sys::VIR_MIGRATE_UNDEFINE_SOURCE, 0);
        assert_eq!(persistent & transient, transient);
    }
}
