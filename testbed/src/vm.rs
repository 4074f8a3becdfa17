//! A test program run under another Linux kernel: for kernel features this machine's own kernel
//! lacks (kTLS: it was built without `CONFIG_TLS`).
//!
//! Owns: booting one throwaway QEMU guest per [`VmKernel::run`] with an initramfs of our making
//! (busybox, the kernel's modules, the program and the shared libraries it links), and reading
//! the program's output and exit status back from the guest's serial console. The guest has no
//! disk and no network but loopback; it powers off when the program ends.
//!
//! Must not touch: the host's kernel state. The only files it writes are the initramfs under
//! [`crate::SCRATCH_ROOT`], removed when the run ends.
//!
//! The guest runs on QEMU's software CPU (TCG): this machine's nested KVM starts a guest but
//! never runs its kernel. A boot takes ~7 s here; everything inside is slow, so programs run
//! in it check behaviour, never timing.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::TestbedError;

/// Where `cargo xtask deps` puts the guest kernel: `vmlinuz`, and the modules to load at boot
/// (`*.ko`, uncompressed, loaded in name order).
pub const KERNEL_DIR: &str = "/var/cache/mesh-test/vm-kernel";

/// The printed line that carries the program's exit status out of the guest.
const EXIT_MARK: &str = "MESH-VM-EXIT=";

/// A kernel to boot test programs under.
#[derive(Debug, Clone)]
pub struct VmKernel {
    vmlinuz: PathBuf,
    modules: Vec<PathBuf>,
    /// `uname -r` of the kernel, from the name of the directory it came in.
    pub release: String,
}

/// What a program printed in the guest (with the kernel's console lines among it), and how it
/// ended: `None` when the guest stopped without the program's exit mark.
#[derive(Debug)]
pub struct VmOutput {
    pub console: String,
    pub exit: Option<i32>,
}

impl VmKernel {
    /// The kernel `cargo xtask deps` fetched, or an error saying to fetch it.
    pub fn installed() -> Result<VmKernel, TestbedError> {
        let dir = Path::new(KERNEL_DIR);
        let missing = |what: &str| {
            TestbedError::Invalid(format!(
                "no guest kernel in {KERNEL_DIR} ({what}): run `cargo xtask deps`"
            ))
        };
        let vmlinuz = dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            return Err(missing("vmlinuz"));
        }
        let release = std::fs::read_to_string(dir.join("release"))
            .map_err(|_| missing("release"))?
            .trim()
            .to_string();
        let mut modules: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| TestbedError::io(format!("reading {KERNEL_DIR}"), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "ko"))
            .collect();
        modules.sort();
        Ok(VmKernel {
            vmlinuz,
            modules,
            release,
        })
    }

    /// Boots the kernel with `program` as the guest's only process (after a busybox init that
    /// mounts /proc, /sys, /dev, /tmp, brings up loopback and loads the modules), passing it
    /// `args` and `env`, and waits up to `deadline` for the guest to power off.
    pub fn run(
        &self,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<VmOutput, TestbedError> {
        let image = self.initramfs(program, args, env)?;
        std::fs::create_dir_all(crate::SCRATCH_ROOT)
            .map_err(|e| TestbedError::io(format!("creating {}", crate::SCRATCH_ROOT), e))?;
        sweep_dead_images();
        let path = Path::new(crate::SCRATCH_ROOT).join(format!(
            "vm-{}-{}.cpio",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, &image)
            .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))?;
        let result = boot(&self.vmlinuz, &path, deadline);
        let _ = std::fs::remove_file(&path);
        result
    }

    fn initramfs(
        &self,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Vec<u8>, TestbedError> {
        let mut cpio = Cpio::default();
        for dir in ["bin", "mods", "proc", "sys", "dev", "tmp", "run"] {
            cpio.dir(dir);
        }
        cpio.file("bin/busybox", &read(Path::new(BUSYBOX))?, 0o755);
        let mut loads = String::new();
        for module in &self.modules {
            let name = module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            cpio.file(&format!("mods/{name}"), &read(module)?, 0o644);
            loads.push_str(&format!(
                "/bin/busybox insmod /mods/{name} || echo 'mesh-vm: insmod {name} failed'\n"
            ));
        }
        for lib in shared_libraries(program)? {
            let inside = lib.to_string_lossy().trim_start_matches('/').to_string();
            let mut parent = PathBuf::new();
            for part in Path::new(&inside)
                .parent()
                .into_iter()
                .flat_map(|p| p.iter())
            {
                parent.push(part);
                cpio.dir(&parent.to_string_lossy());
            }
            cpio.file(&inside, &read(&lib)?, 0o755);
        }
        cpio.file("program", &read(program)?, 0o755);
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let exports: String = env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mount -t proc proc /proc\n\
             /bin/busybox mount -t sysfs sys /sys\n\
             /bin/busybox mount -t devtmpfs dev /dev\n\
             /bin/busybox mount -t tmpfs tmp /tmp\n\
             /bin/busybox ip link set lo up\n\
             {loads}{exports}\
             /program {}\n\
             echo \"{EXIT_MARK}$?\"\n\
             /bin/busybox poweroff -f\n",
            quoted.join(" ")
        );
        cpio.file("init", init.as_bytes(), 0o755);
        Ok(cpio.finish())
    }
}

/// Removes the images of runs whose process is gone (killed before it could remove its own).
fn sweep_dead_images() {
    let Ok(entries) = std::fs::read_dir(crate::SCRATCH_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("vm-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && name.ends_with(".cpio")
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// busybox-static (`cargo xtask deps`): the guest's init and tools, needing no libraries.
const BUSYBOX: &str = "/bin/busybox";

fn read(path: &Path) -> Result<Vec<u8>, TestbedError> {
    std::fs::read(path).map_err(|e| TestbedError::io(format!("reading {}", path.display()), e))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shared libraries `program` loads, and its dynamic loader, as `ldd` resolves them here.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, TestbedError> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: "ldd".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("not a dynamic executable") {
        return Err(TestbedError::Command {
            cmd: format!("ldd {}", program.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Runs QEMU until the guest powers off or `deadline` passes (then it is killed).
fn boot(vmlinuz: &Path, initramfs: &Path, deadline: Duration) -> Result<VmOutput, TestbedError> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| TestbedError::Spawn {
        cmd: "qemu-system-x86_64 (run `cargo xtask deps`)".into(),
        source,
    })?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(TestbedError::Invalid(
            "qemu's output pipes were not set up".into(),
        ));
    };
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let mut console = Vec::new();
        let mut errors = Vec::new();
        let read: io::Result<usize> = stdout.read_to_end(&mut console);
        let _ = stderr.read_to_end(&mut errors);
        let _ = done.send((read, console, errors));
    });
    let outcome = finished.recv_timeout(deadline);
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| TestbedError::io("waiting for qemu", e))?;
    let (read, console, errors) = match outcome {
        Ok(output) => output,
        Err(_) => {
            // Killed: the reader sees EOF now; show what the guest printed until then.
            let console = finished
                .recv()
                .map(|(_, console, _)| String::from_utf8_lossy(&console).replace("\r\n", "\n"))
                .unwrap_or_default();
            return Err(TestbedError::Invalid(format!(
                "the guest did not power off within {deadline:?}; qemu killed. Console:\n{console}"
            )));
        }
    };
    read.map_err(|e| TestbedError::io("reading the guest's console", e))?;
    let console = String::from_utf8_lossy(&console).replace("\r\n", "\n");
    if !status.success() {
        return Err(TestbedError::Command {
            cmd: "qemu-system-x86_64".into(),
            status: status.to_string(),
            stderr: format!("{}\nconsole:\n{console}", String::from_utf8_lossy(&errors)),
        });
    }
    let exit = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARK)?.parse().ok());
    Ok(VmOutput { console, exit })
}

/// A "newc" cpio archive, the format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
    dirs: std::collections::HashSet<String>,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        if self.dirs.insert(path.to_string()) {
            self.entry(path, 0o040_755, &[]);
        }
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        self.entry(path, 0o100_000 | mode, data);
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let name_len = path.len() + 1;
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
            self.inode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.dir("bin");
        cpio.file("bin/x", b"hello", 0o755);
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // One directory (the repeat is dropped), one file, the trailer.
        assert_eq!(out.windows(6).filter(|w| w == b"070701").count(), 3);
        assert!(out.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn ldd_lists_the_loader_and_libc() {
        let libs = shared_libraries(Path::new("/bin/sh")).expect("ldd /bin/sh");
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
