//! The guest channel's wire format, shared by the host side ([`super`]) and `optimus guest`
//! ([`crate::guest`]): one JSON object per line (UTF-8, `\n`-terminated, at most
//! [`MAX_LINE_BYTES`]), each with `"v": 1` (the protocol version) and a `"type"`.
//!
//! Guest to host:
//!
//! ```text
//! {"v":1,"type":"hello","agent":"optimus 0.1.0","vm_uuid":"<SMBIOS UUID or null>"}
//! {"v":1,"type":"gpu","vm_uuid":"…","gpus":[{"uuid":"GPU-…","pci_bus_id":"0000:00:05.0",
//!   "energy_mj":1005000,"method":"counter"}]}
//! {"v":1,"type":"phase","vm_uuid":"…","line":"train epoch=3"}
//! ```
//!
//! - `energy_mj`: the GPU's cumulative energy in millijoules as the guest's NVML reads it
//!   (`nvmlDeviceGetTotalEnergyConsumption`, `method: "counter"`), or the guest's own
//!   integral of `nvmlDeviceGetPowerUsage` since it started (`method: "power"`). A
//!   non-negative integer.
//! - `pci_bus_id`: NVML's `pci.busId` inside the guest (the guest-side PCI address);
//!   `uuid`: NVML's UUID. The host matches them to the domain's passthrough GPUs
//!   (README "Guest channel").
//! - `vm_uuid` is optional; when given it must be this VM's UUID (QEMU sets the guest's
//!   SMBIOS system UUID to it), or the message is refused as `wrong_vm`.
//! - `line` is a phase line of `optimus measure`'s protocol (`NAME [key=value ...]` or `-`).
//! - A `hello` starts a new session: the host takes the next GPU readings as new baselines
//!   (a restarted `optimus guest` integrates power from zero again).
//!
//! Host to guest (every sampling interval, only this VM's own figures):
//!
//! ```text
//! {"v":1,"type":"hello","agent":"optimus 0.1.0"}
//! {"v":1,"type":"figures","interval":812,"interval_seconds":1.0,"vm_name":"web",
//!  "vm_uuid":"…","cpu_seconds":{"vcpu":10.2,"emulator":0.3,…},"vcpu_seconds":{"0":5.1,…},
//!  "energy":[{"zone":"package","source":"rapl-powercap","joules":120.5,"watts":3.2}],
//!  "carbon_grams":0.04,"phase":"train"}
//! ```
//!
//! - `interval` is the host agent's sample number (its `optimus_samples_total`) these
//!   figures are from, so a reader can compare both sides at the same instant.
//! - `carbon_grams` is null without a carbon source, `phase` null when the VM has no phases.
//!
//! Unknown fields are ignored (a newer peer may add some); a different `v` is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The virtio-serial port name (libvirt `<target type='virtio' name='…'/>`).
pub const PORT_NAME: &str = "org.optimus.agent.0";
/// Longest line, bytes, without its newline; longer ones are dropped as `oversized`.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most messages accepted from one guest per second; the rest are dropped as `flood`.
pub const MAX_MESSAGES_PER_SECOND: u32 = 100;
/// Most GPUs in one `gpu` message.
pub const MAX_GPUS: usize = 64;

/// One message from the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum GuestMessage {
    /// The guest agent started (or answers the host's hello).
    Hello {
        #[serde(default)]
        agent: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_uuid: Option<String>,
    },
    /// GPU energy readings.
    Gpu {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_uuid: Option<String>,
        gpus: Vec<GpuReading>,
    },
    /// A phase line.
    Phase {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_uuid: Option<String>,
        line: String,
    },
}

/// One GPU's reading inside the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    /// NVML UUID (`GPU-…`).
    #[serde(default)]
    pub uuid: String,
    /// NVML `pci.busId` as the guest sees it.
    pub pci_bus_id: String,
    /// Cumulative millijoules; a JSON number so that a negative or fractional value is told
    /// apart from a malformed message.
    pub energy_mj: serde_json::Number,
    /// `counter` or `power` (integrated by the guest).
    #[serde(default)]
    pub method: String,
}

/// One VM's energy in one zone, as sent to its guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneFigure {
    pub zone: String,
    pub source: String,
    pub joules: f64,
    pub watts: f64,
}

/// One message from the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HostMessage {
    Hello {
        #[serde(default)]
        agent: String,
    },
    Figures(Box<Figures>),
}

/// A VM's own figures at one host sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// The host agent's sample number.
    pub interval: u64,
    /// The host's sampling interval, seconds.
    #[serde(default)]
    pub interval_seconds: f64,
    pub vm_name: String,
    pub vm_uuid: String,
    /// Cumulative CPU seconds by thread kind (`vcpu`, `emulator`, `iothread`, `vhost`,
    /// `unclassified`).
    #[serde(default)]
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Cumulative CPU seconds per vCPU index (as text: JSON keys are strings).
    #[serde(default)]
    pub vcpu_seconds: BTreeMap<String, f64>,
    #[serde(default)]
    pub energy: Vec<ZoneFigure>,
    #[serde(default)]
    pub carbon_grams: Option<f64>,
    #[serde(default)]
    pub phase: Option<String>,
}

/// A message as a line: `{"v":1,...}` plus the newline.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(message)?;
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("v".to_owned(), VERSION.into());
    }
    let mut line = serde_json::to_vec(&value)?;
    line.push(b'\n');
    Ok(line)
}

/// Why a line from a peer was refused; the `kind` label of
/// `optimus_guest_channel_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum ErrorKind {
    /// Not a JSON object of a known type, or not UTF-8.
    #[error("malformed")]
    Malformed,
    /// Longer than [`MAX_LINE_BYTES`].
    #[error("oversized")]
    Oversized,
    /// Over [`MAX_MESSAGES_PER_SECOND`], or the host's queue for the VM was full.
    #[error("flood")]
    Flood,
    /// A `v` other than [`VERSION`].
    #[error("version")]
    Version,
    /// A negative or fractional energy, an unreadable PCI bus id, too many GPUs.
    #[error("invalid_value")]
    InvalidValue,
    /// `vm_uuid` names another VM.
    #[error("wrong_vm")]
    WrongVm,
    /// A GPU the domain does not pass through to this VM.
    #[error("not_owned")]
    NotOwned,
    /// An energy counter lower than the last accepted one.
    #[error("non_monotonic")]
    NonMonotonic,
    /// More energy than `--guest-gpu-max-watts` allows for the time elapsed.
    #[error("over_max_watts")]
    OverMaxWatts,
    /// A phase line the phase protocol rejects.
    #[error("bad_phase")]
    BadPhase,
}

impl ErrorKind {
    /// Every kind, in label order (exported at 0 from the start).
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::Malformed,
        ErrorKind::Oversized,
        ErrorKind::Flood,
        ErrorKind::Version,
        ErrorKind::InvalidValue,
        ErrorKind::WrongVm,
        ErrorKind::NotOwned,
        ErrorKind::NonMonotonic,
        ErrorKind::OverMaxWatts,
        ErrorKind::BadPhase,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::Oversized => "oversized",
            ErrorKind::Flood => "flood",
            ErrorKind::Version => "version",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::WrongVm => "wrong_vm",
            ErrorKind::NotOwned => "not_owned",
            ErrorKind::NonMonotonic => "non_monotonic",
            ErrorKind::OverMaxWatts => "over_max_watts",
            ErrorKind::BadPhase => "bad_phase",
        }
    }
}

/// Parses one line into a `T` (a [`GuestMessage`] or [`HostMessage`]): the version first,
/// then the shape.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ErrorKind> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|_| ErrorKind::Malformed)?;
    let v = value
        .get("v")
        .ok_or(ErrorKind::Malformed)?
        .as_u64()
        .ok_or(ErrorKind::Malformed)?;
    if v != u64::from(VERSION) {
        return Err(ErrorKind::Version);
    }
    serde_json::from_value(value).map_err(|_| ErrorKind::Malformed)
}

/// `dddd:bb:ss.f` in lowercase from NVML's `00000000:65:00.0`, libvirt's parts or
/// `65:00.0` (domain 0); `None` when it is no PCI address.
pub fn normalize_pci(text: &str) -> Option<String> {
    let text = text.trim();
    let (rest, function) = text.rsplit_once('.')?;
    let mut parts: Vec<&str> = rest.split(':').collect();
    if parts.len() == 2 {
        parts.insert(0, "0");
    }
    let [domain, bus, slot] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, max: u32| {
        (!s.is_empty() && s.len() <= 8)
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    Some(format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        hex(domain, 0xffff)?,
        hex(bus, 0xff)?,
        hex(slot, 0x1f)?,
        hex(function, 7)?
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_version() {
        let m = GuestMessage::Phase {
            vm_uuid: None,
            line: "train epoch=1".into(),
        };
        let line = encode(&m).unwrap();
        assert!(line.ends_with(b"\n"));
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.contains("\"v\":1"), "{text}");
        assert!(text.contains("\"type\":\"phase\""), "{text}");
        assert_eq!(decode::<GuestMessage>(&line[..line.len() - 1]).unwrap(), m);
        assert_eq!(
            decode::<GuestMessage>(br#"{"v":2,"type":"phase","line":"x"}"#),
            Err(ErrorKind::Version)
        );
        assert_eq!(
            decode::<GuestMessage>(br#"{"type":"phase","line":"x"}"#),
            Err(ErrorKind::Malformed)
        );
        assert_eq!(
            decode::<GuestMessage>(b"\xff\xfe junk"),
            Err(ErrorKind::Malformed)
        );
        assert_eq!(
            decode::<GuestMessage>(br#"{"v":1,"type":"launch","line":"x"}"#),
            Err(ErrorKind::Malformed)
        );
        // Unknown fields are ignored.
        assert!(decode::<GuestMessage>(br#"{"v":1,"type":"hello","new":3}"#).is_ok());
    }

    #[test]
    fn negative_energy_is_a_number_not_a_u64() {
        let m: GuestMessage =
            decode(br#"{"v":1,"type":"gpu","gpus":[{"pci_bus_id":"00:05.0","energy_mj":-5}]}"#)
                .unwrap();
        let GuestMessage::Gpu { gpus, .. } = m else {
            panic!("not a gpu message");
        };
        assert_eq!(gpus[0].energy_mj.as_u64(), None);
    }

    #[test]
    fn figures_roundtrip() {
        let f = Figures {
            interval: 7,
            vm_name: "a".into(),
            vm_uuid: "u".into(),
            vcpu_seconds: [("0".to_owned(), 1.5)].into(),
            ..Figures::default()
        };
        let line = encode(&HostMessage::Figures(Box::new(f.clone()))).unwrap();
        let back: HostMessage = decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, HostMessage::Figures(Box::new(f)));
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(
            normalize_pci("00000000:65:00.0").as_deref(),
            Some("0000:65:00.0")
        );
        assert_eq!(
            normalize_pci("0000:0A:1f.7").as_deref(),
            Some("0000:0a:1f.7")
        );
        assert_eq!(normalize_pci("05:00.1").as_deref(), Some("0000:05:00.1"));
        assert_eq!(normalize_pci("0000:00:20.0"), None);
        assert_eq!(normalize_pci("gpu"), None);
        assert_eq!(normalize_pci("0000:00:05.8"), None);
        assert_eq!(normalize_pci(":00:05.0"), None);
    }
}
