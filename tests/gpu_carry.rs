//! A GPU run (scripts/gpu_check.sh through the device tool) sends at most 64 MiB, tracked files
//! included; `scripts/gpu_carry.sh` trims what the check does not read and adds the two CUDA
//! binaries and the diffusers wheel. The tracked tree grew from 30 to 81 MiB with the SDXL
//! fixtures before anyone noticed that no GPU run could start: this keeps what would travel under
//! the limit, so a new fixture the GPU check does not need goes on the script's trim list.

use std::process::Command;

/// What `gpu_carry.sh prepare` adds, measured on 2026-12-08 (docs/performance.md): both binaries
/// stripped and xz-compressed (19.9 MB each) and the diffusers 0.42.1 wheel (6.4 MB), 44.0 MiB;
/// rounded up for growth.
const CARRY_MIB: f64 = 46.0;
const LIMIT_MIB: f64 = 64.0;

#[test]
fn what_a_gpu_run_sends_fits_the_device_tools_limit() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .args(["scripts/gpu_carry.sh", "size"])
        .current_dir(root)
        .output()
        .expect("running scripts/gpu_carry.sh size");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "gpu_carry.sh size failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes: f64 = stdout
        .trim()
        .strip_prefix("tree_bytes ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {stdout}"));
    let tree_mib = bytes / (1024.0 * 1024.0);
    // The script reads git's index: this runs in a git checkout (CI's is a fresh clone).
    assert!(
        tree_mib > 1.0,
        "the trimmed tree cannot be {tree_mib:.2} MiB: is this a git checkout?"
    );
    assert!(
        tree_mib + CARRY_MIB <= LIMIT_MIB,
        "a GPU run would send {tree_mib:.1} MiB of files + {CARRY_MIB} MiB of binaries and wheel, over the \
         device tool's {LIMIT_MIB} MiB: add what scripts/gpu_check.sh does not read to the trim list in \
         scripts/gpu_carry.sh"
    );
}
