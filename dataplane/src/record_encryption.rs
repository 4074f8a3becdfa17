//! How a data-plane process seals and opens HBONE's TLS records: in user space (rustls) or in
//! the kernel (kTLS), decided once at start from `--kernel-tls` and what the kernel offers.
//!
//! Owns the setting, the start-up probe's answer, and how both are shown (start log, config
//! dump). Must not touch connections: the HBONE client pool and server take the answer as a
//! flag ([`RecordEncryption::in_use`]); the hand-over itself is `meshcore::hbone`'s.

use meshcore::ktls::{self, KernelTls};
use serde_json::json;

/// `--kernel-tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelTlsSetting {
    /// Hand records to the kernel where it has kTLS with key updates.
    #[default]
    Auto,
    /// rustls in user space for every connection.
    Off,
}

/// What `--kernel-tls` allows and what the kernel offers ([`ktls::probe`], asked once), and so
/// the path every new HBONE connection takes (a socket that refuses the `tls` ULP still falls
/// back to rustls, per connection).
#[derive(Debug, Clone)]
pub struct RecordEncryption {
    pub setting: KernelTlsSetting,
    pub kernel: KernelTls,
}

impl RecordEncryption {
    /// Probes the kernel (a few loopback sockets) and logs what it found and the path taken.
    pub fn probe(setting: KernelTlsSetting) -> Self {
        let this = RecordEncryption {
            setting,
            kernel: ktls::probe(),
        };
        tracing::info!(
            path = this.path(),
            kernel_tls = %this.kernel,
            setting = ?this.setting,
            "HBONE record encryption"
        );
        this
    }

    /// Whether new HBONE connections go to the kernel.
    pub fn in_use(&self) -> bool {
        self.setting == KernelTlsSetting::Auto
            && self.kernel == (KernelTls::Available { rekey: true })
    }

    /// The path new connections take, as the config dump and start log name it.
    pub fn path(&self) -> &'static str {
        if self.in_use() {
            "kernel (kTLS)"
        } else {
            "userspace (rustls)"
        }
    }

    /// The config dump's `hboneRecordEncryption`.
    pub fn dump(&self) -> serde_json::Value {
        json!({
            "path": self.path(),
            "kernelTls": self.kernel.to_string(),
            "setting": format!("{:?}", self.setting).to_lowercase(),
            "connectionsHandedToKernel": meshcore::hbone::kernel_tls_connections(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_path_needs_auto_and_a_kernel_with_key_updates() {
        let with = |setting, kernel| RecordEncryption { setting, kernel };
        let full = KernelTls::Available { rekey: true };
        let no_rekey = KernelTls::Available { rekey: false };
        let none = KernelTls::Unavailable {
            reason: "no CONFIG_TLS".into(),
        };
        let kernel = with(KernelTlsSetting::Auto, full.clone());
        assert_eq!(kernel.path(), "kernel (kTLS)");
        assert_eq!(kernel.dump()["setting"], "auto");
        for (setting, kernel) in [
            (KernelTlsSetting::Off, full),
            (KernelTlsSetting::Auto, no_rekey),
            (KernelTlsSetting::Auto, none),
        ] {
            let encryption = with(setting, kernel);
            assert!(!encryption.in_use(), "{encryption:?}");
            assert_eq!(encryption.path(), "userspace (rustls)");
            assert_eq!(encryption.dump()["path"], "userspace (rustls)");
        }
    }
}
