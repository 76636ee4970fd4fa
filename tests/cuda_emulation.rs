//! Our CUDA kernels (src/kernels/cuda/*.cu), run on the CPU: `tests/cuda_emulation/run.cpp`
//! includes the same `.cu` sources with CUDA emulated (`emulation.h`: a host thread per CUDA
//! thread, real barriers, warp shuffles and WMMA by their meaning) and compares each kernel with an
//! f64 reference from the same rounded inputs. No GPU and no CUDA toolkit needed, only a C++20
//! compiler (`$CXX`, else `c++`). It tests the kernels' indexing, tiling, padding, masking and
//! synchronisation; speed, and what the emulation cannot see (register layouts, the driver's
//! limits), are `sdfix kernel-check`'s on a GPU (scripts/gpu_check.sh).

use std::path::PathBuf;
use std::process::Command;

use sdfix::kernels::cuda::attention::{shared_memory_bytes, HEAD_DIMS};

#[test]
fn the_cuda_kernels_match_an_f64_reference_when_run_on_the_cpu() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emulation");
    let exe = std::env::temp_dir().join(format!("sdfix-cuda-emulation-{}", std::process::id()));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-I"])
        .arg(&dir)
        .arg(dir.join("run.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (a C++20 compiler; set CXX): {e}"));
    assert!(
        built.status.success(),
        "{compiler} failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&exe).output().expect("running the emulation");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    println!("{stdout}");
    assert!(
        ran.status.success(),
        "a kernel failed on the CPU:\n{stdout}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    // Every head dim, both 16-bit types, three shapes each; group norm and GEGLU in 3 dtypes.
    let ok = stdout.lines().filter(|line| line.starts_with("ok ")).count();
    assert_eq!(ok, HEAD_DIMS.len() * 2 * 3 + 3 * 3, "{stdout}");
    // The launch's shared memory (attention.rs) is the kernel's own rule (attention.cu).
    for d in HEAD_DIMS {
        let line = format!("smem d{d} {}", shared_memory_bytes(d));
        assert!(stdout.lines().any(|l| l == line), "expected `{line}` in:\n{stdout}");
    }
}
