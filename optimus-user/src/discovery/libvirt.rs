//! The VMs a libvirt daemon runs, through the `virt` crate.
//!
//! Calls block (libvirt RPC over a Unix socket, or whatever transport the URI names).

use std::sync::Once;

use virt::connect::Connect;
use virt::sys;

use super::cmdline::normalize_uuid;
use super::VmId;

/// Why libvirt could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("connect to libvirt at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("list active domains at {uri}")]
    ListDomains {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
}

impl LibvirtError {
    /// libvirt's own message, without its code and domain numbers: what a log line should say
    /// after "unreachable: ".
    pub fn cause(&self) -> &str {
        match self {
            LibvirtError::Connect { source, .. } | LibvirtError::ListDomains { source, .. } => {
                source.message()
            }
        }
    }
}

/// An open connection to libvirt.
pub struct LibvirtClient {
    uri: String,
    conn: Connect,
}

impl std::fmt::Debug for LibvirtClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtClient")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// libvirt prints every error to stderr through its default error callback; the agent logs
/// what matters itself, so the callback is replaced, once per process, before the first call.
/// See <https://libvirt.org/html/libvirt-virterror.html#virSetErrorFunc>.
fn silence_libvirt_stderr() {
    static ONCE: Once = Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

impl LibvirtClient {
    /// Opens a read-only connection to `uri` (`qemu:///system`, `test:///default`, ...):
    /// discovery only lists domains, and a read-only connection is what libvirt grants a
    /// non-root user (its `libvirt-sock-ro` socket) and can change nothing.
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        silence_libvirt_stderr();
        let conn = Connect::open_read_only(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_owned(),
            source,
        })?;
        Ok(Self {
            uri: uri.to_owned(),
            conn,
        })
    }

    /// The URI this client is connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Name and UUID (lowercase) of every running domain, sorted. A domain whose name or UUID
    /// cannot be read (it was undefined between listing and reading) is left out.
    pub fn active_domains(&self) -> Result<Vec<VmId>, LibvirtError> {
        let domains = self
            .conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|source| LibvirtError::ListDomains {
                uri: self.uri.clone(),
                source,
            })?;
        let mut ids: Vec<VmId> = domains
            .iter()
            .filter_map(|dom| {
                let name = dom.name();
                let uuid = dom.uuid_string();
                match (name, uuid) {
                    (Ok(name), Ok(uuid)) => Some(VmId {
                        name,
                        uuid: normalize_uuid(&uuid).unwrap_or(uuid),
                    }),
                    (Err(e), _) | (_, Err(e)) => {
                        log::debug!("libvirt at {}: skipping a domain: {e}", self.uri);
                        None
                    }
                }
            })
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// libvirt's built-in test driver: no daemon, one running domain called `test`.
    const TEST_URI: &str = "test:///default";
    const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";

    #[test]
    fn lists_the_test_driver_domain() {
        let client = LibvirtClient::connect(TEST_URI).unwrap();
        assert_eq!(client.uri(), TEST_URI);
        assert_eq!(
            client.active_domains().unwrap(),
            vec![VmId {
                name: "test".into(),
                uuid: TEST_UUID.into()
            }]
        );
    }

    #[test]
    fn lists_only_running_domains_with_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        std::fs::write(
            &node,
            r#"<node>
  <domain type='test'>
    <name>we"ird, name\ &lt;é&gt;</name>
    <uuid>12345678-9ABC-def0-1234-56789abcdef0</uuid>
    <memory>8192</memory>
    <os><type>hvm</type></os>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>stopped</name>
    <uuid>22345678-9abc-def0-1234-56789abcdef0</uuid>
    <memory>8192</memory>
    <os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>"#,
        )
        .unwrap();
        let client = LibvirtClient::connect(&format!("test://{}", node.display())).unwrap();
        assert_eq!(
            client.active_domains().unwrap(),
            vec![VmId {
                name: "we\"ird, name\\ <\u{e9}>".into(),
                uuid: "12345678-9abc-def0-1234-56789abcdef0".into()
            }]
        );
    }

    #[test]
    fn unreachable_daemon_is_an_error_not_a_panic() {
        let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
        let err = LibvirtClient::connect(uri).unwrap_err();
        assert_eq!(err.to_string(), format!("connect to libvirt at {uri}"));
        assert!(
            err.cause().contains("/nonexistent/libvirt-sock"),
            "{}",
            err.cause()
        );
    }
}
