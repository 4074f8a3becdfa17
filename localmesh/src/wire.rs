//! Watching the wire: tcpdump on a link inside a namespace, and a reader for what it saved.
//!
//! Used to prove what crosses the node-to-node link: TLS to port 15008, never the app's
//! plaintext. Owns the capture process and pcap parsing (classic pcap, Ethernet frames,
//! IPv4/IPv6, TCP); nothing else.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use testbed::{Cluster, Netns, Proc};

use crate::wait_for;

/// A running tcpdump writing to a pcap file.
pub struct WireCapture {
    proc: Proc,
    file: PathBuf,
}

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

impl WireCapture {
    /// Starts tcpdump on `ifname` in `netns` and waits until it is capturing.
    pub fn start(
        cluster: &Cluster,
        netns: &Netns,
        ifname: &str,
        label: &str,
    ) -> anyhow::Result<WireCapture> {
        let file = cluster.dir().join(format!("{label}.pcap"));
        let mut cmd = Command::new("tcpdump");
        cmd.args([
            "-i",
            ifname,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .arg("tcp");
        let proc = cluster.spawn(netns, cmd, &format!("tcpdump-{label}"))?;
        let log = proc.log_path().to_path_buf();
        wait_for(
            Duration::from_secs(10),
            "tcpdump to start capturing",
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("No such device") || text.contains("not found") {
                    bail!("tcpdump failed: {text}");
                }
                Ok(text.contains("listening on"))
            },
        )?;
        Ok(WireCapture { proc, file })
    }

    /// Stops the capture and returns every TCP segment it saw. tcpdump reads the kernel's
    /// buffer asynchronously, so first wait until the file has stopped growing.
    pub fn finish(mut self) -> anyhow::Result<Vec<Segment>> {
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let mut last = size();
        let mut stable = 0;
        let _ = wait_for(Duration::from_secs(5), "the capture to settle", || {
            let now = size();
            stable = if now == last && now > 24 {
                stable + 1
            } else {
                0
            };
            last = now;
            Ok(stable >= 3)
        });
        self.proc.terminate(Duration::from_secs(5));
        read_pcap(&self.file)
    }
}

/// Parses a classic pcap file of Ethernet frames into TCP segments.
pub fn read_pcap(path: &Path) -> anyhow::Result<Vec<Segment>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if data.len() < 24 {
        bail!("{} is not a pcap file (too short)", path.display());
    }
    let le = match &data[0..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("{} is not a classic pcap file", path.display()),
    };
    let u32_at = |b: &[u8]| {
        if le {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        }
    };
    let linktype = u32_at(&data[20..24]);
    let mut segments = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let caplen = u32_at(&data[off + 8..off + 12]) as usize;
        let start = off + 16;
        let end = (start + caplen).min(data.len());
        if let Some(s) = parse_frame(&data[start..end], linktype) {
            segments.push(s);
        }
        off = start + caplen;
    }
    Ok(segments)
}

fn parse_frame(frame: &[u8], linktype: u32) -> Option<Segment> {
    // 1 = Ethernet; 113 = Linux cooked (SLL); 276 = SLL2.
    let (ethertype, ip) = match linktype {
        1 => (
            u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]),
            frame.get(14..)?,
        ),
        113 => (
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        276 => (
            u16::from_be_bytes([*frame.first()?, *frame.get(1)?]),
            frame.get(20..)?,
        ),
        _ => return None,
    };
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])).min(ip.len());
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst), ip.get(ihl..total)?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None; // extension headers are not expected on this testbed
            }
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                ip.get(40..(40 + plen).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src,
        dst,
        sport,
        dport,
        payload: tcp.get(doff..)?.to_vec(),
    })
}

/// Whether `needle` appears in any segment's payload.
pub fn payload_contains(segments: &[Segment], needle: &[u8]) -> bool {
    segments
        .iter()
        .any(|s| s.payload.windows(needle.len()).any(|w| w == needle))
}

/// Whether a TLS record (handshake or application data) went to or from `port` with payload.
pub fn tls_on_port(segments: &[Segment], port: u16) -> bool {
    segments.iter().any(|s| {
        (s.dport == port || s.sport == port) && matches!(s.payload.first(), Some(0x16 | 0x17))
    })
}
